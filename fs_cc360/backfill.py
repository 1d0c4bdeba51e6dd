"""CDR backfill: the summaries of calls that happened while the connector was stopped.

FreeSWITCH's ``mod_json_cdr`` writes one JSON file per leg when the leg ends (its
``log-dir``, ``<uuid>.cdr.json``). :func:`backfill` reads those files, rebuilds from
each the ``CHANNEL_HANGUP_COMPLETE`` event the connector would have heard (plus the
``RECORD_START``/``RECORD_STOP`` events of its recordings), feeds them in time order to a
fresh :class:`~fs_cc360.calls.CallTracker` built with the service's own rules (rule 10 in
:mod:`fs_cc360.calls`: a leg first heard of at its hangup is rebuilt from its variables),
and enqueues the ``summary`` events whose ``(call_id, "summary")`` the outbox has never
held, so a call the live service already reported is never sent twice. The ids are the
agent legs' ``Unique-ID`` exactly as live. Realtime popups (ringing/answer/hangup) of old
calls are pointless and are dropped.

How a CDR becomes an event (:func:`hangup_event`):

* ``variables`` → ``variable_<name>`` headers. ``mod_json_cdr`` URL-encodes the values
  by default (``encode-values``, on unless turned off); :func:`values_encoded` tells the
  two forms apart, so both work.
* ``callflow[0].caller_profile`` (the channel's current profile: mod_json_cdr lists the
  newest first) → ``Caller-*`` headers; its ``originatee``/``originator`` profile →
  ``Other-Type`` and ``Other-Leg-Unique-ID``.
* ``Unique-ID``, ``Channel-Name`` (``variables.channel_name``), ``Call-Direction``
  (``variables.direction`` or ``channel_data.direction``), ``Event-Date-Timestamp``
  (``variables.end_uepoch``).

Recordings: the CDR has no ``Record-File-Path``; the path of a ``record_session`` run by
the dialplan is in ``app_log`` (expanded: ``/var/lib/freeswitch/recordings/<uuid>.wav``),
so it becomes a RECORD_START at the application's time and a RECORD_STOP at the leg's
end. A recording started another way (``uuid_record``, ``execute_on_answer``) is not in
``app_log``: for those, the dialplan should also ``set`` a channel variable to the path
and ``[calls] recording_variable`` name it (the shipped dialplan sets
``cc360_recording=$${recordings_dir}/${uuid}.wav`` and records to ``${cc360_recording}``);
the tracker reads that variable from the rebuilt hangup event as it does live.

Which files were handled is remembered in a small JSON state file next to the outbox
(``<outbox file>.backfill.json``), keyed by directory and file name with the file's size
and mtime, so a changed file is read again. Files are not moved: the CDR directory
belongs to FreeSWITCH (the connector often may only read it) and its own rotation keeps
working; entries of files that are gone are dropped, so the state stays as small as the
directory. A bad file (invalid JSON, a missing field) is reported once, remembered, and
skipped.

What waits, what is skipped:

* files younger than ``min_age`` (five minutes) wait for the next run: mod_json_cdr may
  still be writing, and a running service may still be about to report the call itself;
* a leg whose related legs (``originator``, ``bridge_uuid``) have no CDR yet waits up to
  :data:`PARTNER_WAIT` after its end: after a blind transfer the caller talks on, and the
  recording to link is on the caller's leg;
* calls older than ``max_age`` (the CLI passes ``[outbox] retention_days``) are skipped:
  the outbox purges delivered rows after that, so it could no longer tell that such a
  call was sent. (A manual ``outbox purge`` with fewer days narrows that window too.)

Memory: the first pass keeps a few fields per file (:meth:`CdrLeg.light`); a leg's
header block is read again when its first event comes up and dropped after its hangup,
so a week of CDRs costs the calls in progress at one moment, not the whole directory.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

from fs_cc360.calls import CallTracker, CrmEvent, TrackerConfig
from fs_cc360.crm_request import request_for
from fs_cc360.errors import FsCc360Error
from fs_cc360.events import ChannelEvent, header_value
from fs_cc360.outbox import NewItem

log = logging.getLogger(__name__)

#: Name of the state file, appended to the outbox database path.
STATE_SUFFIX = ".backfill.json"
STATE_VERSION = 1
#: Files younger than this (seconds, by mtime and by the call's end) wait for the next run.
DEFAULT_MIN_AGE = 300.0
#: A leg whose related legs have no CDR yet waits this long (seconds after its end) for
#: them: a transferred caller may talk for a while after the first agent hung up, and the
#: recording to link is on the caller's leg. After that it is used alone.
PARTNER_WAIT = 2 * 3600.0
_UUID_IN_NAME = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
#: The far-future tick that releases everything still waiting at the end of a run.
_FAR_FUTURE = 10 * 365 * 86400.0
#: Rows enqueued per outbox transaction.
ENQUEUE_BATCH = 500

#: Characters ``switch_url_encode`` always escapes; an encoded CDR value never has them.
_RAW_ONLY = re.compile(r"[\s\"<>@:;|{}\[\]^`\\]|%(?![0-9A-Fa-f]{2})")

# Caller profile field -> Caller-* header (the fields switch_caller_profile_event_set_data
# writes that mod_json_cdr keeps).
_PROFILE_HEADERS = (
    ("username", "Username"),
    ("dialplan", "Dialplan"),
    ("caller_id_name", "Caller-ID-Name"),
    ("caller_id_number", "Caller-ID-Number"),
    ("orig_caller_id_name", "Orig-Caller-ID-Name"),
    ("orig_caller_id_number", "Orig-Caller-ID-Number"),
    ("callee_id_name", "Callee-ID-Name"),
    ("callee_id_number", "Callee-ID-Number"),
    ("network_addr", "Network-Addr"),
    ("ani", "ANI"),
    ("aniii", "ANI-II"),
    ("rdnis", "RDNIS"),
    ("destination_number", "Destination-Number"),
    ("uuid", "Unique-ID"),
    ("source", "Source"),
    ("context", "Context"),
    ("chan_name", "Channel-Name"),
)
_PROFILE_TIMES = (
    ("created_time", "Channel-Created-Time"),
    ("answered_time", "Channel-Answered-Time"),
    ("progress_time", "Channel-Progress-Time"),
    ("progress_media_time", "Channel-Progress-Media-Time"),
    ("hangup_time", "Channel-Hangup-Time"),
    ("bridged_time", "Channel-Bridged-Time"),
    ("transfer_time", "Channel-Transfer-Time"),
)


class CdrError(FsCc360Error):
    """A CDR file that cannot be used (not JSON, not a mod_json_cdr leg, a field missing)."""


class BackfillBusy(FsCc360Error):
    """Another backfill holds the state lock."""


class BackfillOutbox(Protocol):
    """What backfill needs from :class:`fs_cc360.outbox.Outbox`."""

    def has_request(self, call_key: str, kind: str) -> bool: ...

    def enqueue(self, items: Sequence[NewItem]) -> list[int]: ...


# --------------------------------------------------------------------------- one CDR


@dataclass(frozen=True)
class CdrLeg:
    """One leg's CDR, checked and ready to become events."""

    uuid: str
    end_us: int  #: when the leg ended (µs since the epoch): its hangup event's time
    headers: str  #: the event header block without Event-Name / Event-Date-Timestamp
    recordings: tuple[tuple[int, str], ...] = ()  #: (start µs, path) of record_session runs
    bridged_to: str | None = None  #: the leg it was last bridged to (``bridge_uuid``)
    bridged_us: int | None = None  #: when that bridge began (``bridge_uepoch``)
    originator: str | None = None  #: the leg that originated it (``originator``)
    #: What a CHANNEL_BRIDGE on its partner says about it (``Other-Leg-*`` headers).
    other_leg: tuple[tuple[str, str], ...] = ()
    source: Path | None = None  #: the file it was read from
    #: Every leg this one names (originator, bridge, loopback pair, queue member session,
    #: legs it originated): which legs make one call, after a gap (fs_cc360.resync).
    links: tuple[str, ...] = ()

    def event(self, name: str, at_us: int, extra: str = "") -> ChannelEvent:
        head = f"Event-Name: {name}\nEvent-Date-Timestamp: {at_us}\n{extra}{self.headers}"
        return ChannelEvent(head)

    @property
    def related(self) -> tuple[str, ...]:
        """The legs the tracker waits for before this leg's summary (live: its partners)."""
        return tuple(dict.fromkeys(u for u in (self.originator, self.bridged_to) if u))

    def light(self) -> CdrLeg:
        """This leg without its header block (kilobytes of variables): what a run keeps
        for every file while it orders them; :func:`read_cdr` gives the block back."""
        return replace(self, headers="")


def values_encoded(variables: dict[str, Any]) -> bool:
    """Whether the CDR's variable values are URL-encoded (mod_json_cdr ``encode-values``).

    Encoded values never contain the characters ``switch_url_encode`` escapes (spaces,
    ``@``, ``:``, ``<``...) nor a ``%`` not followed by two hex digits, while every real
    CDR written raw has some (``channel_name`` has ``@``, ``sip_full_from`` has ``<``).
    """
    return not any(isinstance(v, str) and _RAW_ONLY.search(v) for v in variables.values())


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _int_us(value: Any) -> int | None:
    text = _text(value)
    if text and text.isascii() and text.isdigit() and int(text) > 0:
        return int(text)
    return None


def parse_cdr(data: Any, *, source: str = "") -> CdrLeg:
    """Check one mod_json_cdr document and turn it into a :class:`CdrLeg`.

    Raises :class:`CdrError` naming what is missing.
    """
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise CdrError(f"{where}not a JSON object")
    variables = data.get("variables")
    if not isinstance(variables, dict) or not variables:
        raise CdrError(f"{where}no 'variables' object (not a mod_json_cdr leg file?)")
    encoded = values_encoded(variables)

    def var(name: str) -> str | None:
        text = _text(variables.get(name))
        if text is None:
            return None
        return unquote(text) if encoded else text

    callflow = data.get("callflow")
    current: dict[str, Any] = {}
    if isinstance(callflow, list) and callflow and isinstance(callflow[0], dict):
        current = callflow[0]
    elif isinstance(callflow, dict):  # some versions write one profile as an object
        current = callflow
    profile = current.get("caller_profile") if isinstance(current.get("caller_profile"),
                                                          dict) else {}
    times = current.get("times") if isinstance(current.get("times"), dict) else {}
    channel_data = data.get("channel_data") if isinstance(data.get("channel_data"), dict) \
        else {}

    uuid = var("uuid") or _text(profile.get("uuid"))
    if not uuid:
        raise CdrError(f"{where}no leg uuid (variables.uuid)")
    end_us = _int_us(var("end_uepoch")) or _int_us(times.get("hangup_time"))
    if end_us is None:
        end_epoch = _int_us(var("end_epoch"))
        end_us = end_epoch * 1_000_000 if end_epoch else None
    if end_us is None:
        raise CdrError(f"{where}no end time (variables.end_uepoch)")
    direction = var("direction") or _text(channel_data.get("direction"))
    if direction not in ("inbound", "outbound"):
        raise CdrError(f"{where}no call direction (variables.direction)")

    lines: list[tuple[str, str]] = [
        ("Core-UUID", _text(data.get("core-uuid")) or ""),
        ("Unique-ID", uuid),
        ("Channel-Name", var("channel_name") or _text(profile.get("chan_name")) or ""),
        ("Call-Direction", direction),
        ("Caller-Direction", direction),
    ]
    for key, header in _PROFILE_HEADERS:
        value = _text(profile.get(key))
        if value:
            lines.append((f"Caller-{header}", value))
    for key, header in _PROFILE_TIMES:
        value = _text(times.get(key))
        if value:
            lines.append((f"Caller-{header}", value))
    other = _other_leg(profile)
    if other:
        lines += [("Other-Type", other[0]), ("Other-Leg-Unique-ID", other[1])]
    head = "".join(f"{k}: {header_value(v)}\n" for k, v in lines if v)
    head += "".join(
        f"variable_{name}: {header_value(text)}\n"
        for name, text in ((n, var(n)) for n in variables if _valid_name(n))
        if text is not None
    )
    other_leg = tuple(
        (f"Other-Leg-{name}", value) for name, value in (
            ("Direction", direction),
            ("Caller-ID-Number", _text(profile.get("caller_id_number")) or ""),
            ("Orig-Caller-ID-Number", _text(profile.get("orig_caller_id_number")) or ""),
            ("ANI", _text(profile.get("ani")) or ""),
            ("Destination-Number", _text(profile.get("destination_number")) or ""),
        ) if value)
    bridged_to = var("bridge_uuid") or var("last_bridge_to")
    bridged_us = _int_us(var("bridge_uepoch"))
    originator = var("originator")
    return CdrLeg(uuid=uuid, end_us=end_us, headers=head,
                  recordings=tuple(_recordings(data, end_us)),
                  bridged_to=bridged_to if bridged_to and bridged_to != uuid else None,
                  bridged_us=bridged_us if bridged_us and bridged_us <= end_us else None,
                  originator=originator if originator and originator != uuid else None,
                  other_leg=other_leg,
                  links=tuple(u for u in dict.fromkeys(_links(var)) if u and u != uuid))


#: Variables that name another leg of the same call.
LINK_VARIABLES = ("originator", "bridge_uuid", "last_bridge_to", "signal_bond",
                  "other_loopback_leg_uuid", "other_loopback_from_uuid",
                  "loopback_from_uuid", "cc_member_session_uuid")


def _links(var: Callable[[str], str | None]) -> Iterator[str]:
    for name in LINK_VARIABLES:
        value = var(name)
        if value:
            yield value
    for item in (var("originated_legs") or "").removeprefix("ARRAY::").split("|:"):
        uuid = item.split(";", 1)[0]
        if uuid:
            yield uuid


def _valid_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and not any(c in name for c in ": \n\r")


def _other_leg(profile: dict[str, Any]) -> tuple[str, str] | None:
    """``(Other-Type, Other-Leg-Unique-ID)`` as FreeSWITCH puts them on the hangup event.

    The CDR does not say which of the two profiles the channel used last; the originatee
    is, when both exist (an agent leg that dialled on: m, 101's leg).
    """
    for kind in ("originatee", "originator"):
        block = profile.get(kind)
        if not isinstance(block, dict):
            continue
        profiles = block.get(f"{kind}_caller_profiles")
        if isinstance(profiles, list) and profiles and isinstance(profiles[0], dict):
            uuid = _text(profiles[0].get("uuid"))
            if uuid:
                return kind, uuid
    return None


def _recordings(data: dict[str, Any], end_us: int) -> Iterator[tuple[int, str]]:
    """``(start µs, path)`` of each ``record_session`` in the leg's ``app_log``."""
    app_log = data.get("app_log")
    apps = app_log.get("applications") if isinstance(app_log, dict) else None
    if not isinstance(apps, list):
        return
    seen: set[str] = set()
    for app in apps:
        if not isinstance(app, dict) or app.get("app_name") != "record_session":
            continue
        path = _record_path(_text(app.get("app_data")) or "")
        if not path or path in seen or "${" in path:
            continue
        seen.add(path)
        yield min(_int_us(app.get("app_stamp")) or end_us, end_us), path


def _record_path(app_data: str) -> str:
    """The file of ``record_session [{vars}]<path> [+limit]``."""
    text = app_data.strip()
    if text.startswith("{") and "}" in text:
        text = text[text.index("}") + 1:].strip()
    return text.split()[0] if text else ""


def read_cdr(path: Path) -> CdrLeg:
    """Read and check one CDR file; :class:`CdrError` when it is not usable."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CdrError(f"{path.name}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CdrError(f"{path.name}: not valid JSON ({exc})") from None
    return replace(parse_cdr(data, source=path.name), source=path)


def hangup_event(leg: CdrLeg) -> ChannelEvent:
    """The CHANNEL_HANGUP_COMPLETE FreeSWITCH sent for this leg, as far as the CDR tells."""
    return leg.event("CHANNEL_HANGUP_COMPLETE", leg.end_us)


#: An event of the rebuilt timeline, before it is built: (place µs, rank, name, extra,
#: time µs): where it goes in the timeline, and the time it says it happened.
_Spec = tuple[int, int, str, str, int]


def _leg_specs(leg: CdrLeg, partner: CdrLeg | None = None) -> list[_Spec]:
    """What :func:`leg_events` builds, without building it (a run orders thousands)."""
    out: list[_Spec] = []
    for start_us, path in leg.recordings:
        extra = f"Record-File-Path: {header_value(path)}\n"
        out.append((start_us, 0, "RECORD_START", extra, start_us))
        out.append((leg.end_us, 2, "RECORD_STOP", extra, leg.end_us))
    if leg.bridged_to:
        other = [("Other-Leg-Unique-ID", leg.bridged_to)]
        if partner is not None:
            other += partner.other_leg
        extra = "".join(f"{k}: {header_value(v)}\n" for k, v in other)
        out.append((leg.end_us, 1, "CHANNEL_BRIDGE", extra, leg.bridged_us or leg.end_us))
    out.append((leg.end_us, 3, "CHANNEL_HANGUP_COMPLETE", "", leg.end_us))
    return out


def leg_events(leg: CdrLeg, partner: CdrLeg | None = None
               ) -> list[tuple[int, int, ChannelEvent]]:
    """``(time µs, rank, event)`` for one leg: its recordings, its last bridge, its hangup.

    The bridge (``bridge_uuid``, with ``partner``'s CDR for the ``Other-Leg-*`` headers
    when it is known) is reported just before the hangup: rule 10 alone cannot tell that
    an attended transfer's consultation leg (m: 102, originated by agent 101) ended up
    talking to the original caller, while a CHANNEL_BRIDGE to the caller's leg lets the
    tracker apply the transfer rule as it did live. ``rank`` orders events of the same
    microsecond: bridge, then RECORD_STOP, then the hangup (FreeSWITCH's own order).
    """
    return [(at_us, rank, leg.event(name, stamp_us, extra))
            for at_us, rank, name, extra, stamp_us in _leg_specs(leg, partner)]


def summaries_from_legs(
    legs: Iterable[CdrLeg],
    config: TrackerConfig | None = None,
    *,
    on_error: Callable[[CdrLeg, CdrError], None] | None = None,
) -> list[CrmEvent]:
    """Feed the legs' events in time order to a fresh tracker; return its summaries.

    The tracker is ticked at each event's time, as the service ticks it every second, so
    its bounded waits behave as they did live; a final flush and a tick far in the future
    release whatever still waits (a partner leg whose CDR is missing).

    A :meth:`~CdrLeg.light` leg's header block is read again from its file when its first
    event comes up and dropped after its hangup, so memory holds the calls in progress at
    one moment, not the whole directory. A file that cannot be read again then (deleted,
    rewritten) goes to ``on_error`` and its remaining events are skipped.
    """
    ordered = sorted(legs, key=lambda leg: leg.end_us)  # stable: ties keep the given order
    by_uuid = {leg.uuid: leg for leg in ordered}
    timeline: list[tuple[int, int, int, str, str, int]] = []
    for n, leg in enumerate(ordered):
        partner = by_uuid.get(leg.bridged_to) if leg.bridged_to else None
        for at_us, rank, name, extra, stamp_us in _leg_specs(leg, partner):
            timeline.append((at_us, rank, n, name, extra, stamp_us))
    timeline.sort(key=lambda item: item[:3])
    tracker = CallTracker(config)
    out: list[CrmEvent] = []
    loaded: dict[int, CdrLeg] = {}
    failed: set[int] = set()
    last = 0.0
    for at_us, _rank, n, name, extra, stamp_us in timeline:
        if n in failed:
            continue
        leg = loaded.get(n) or ordered[n]
        if not leg.headers:
            try:
                leg = loaded[n] = _reload(leg)
            except CdrError as exc:
                failed.add(n)
                log.warning("backfill.bad_file file=%s error=%s", leg.source, exc)
                if on_error is not None:
                    on_error(leg, exc)
                continue
        if name == "CHANNEL_HANGUP_COMPLETE":
            loaded.pop(n, None)  # the leg's last event
        at = at_us / 1_000_000
        out += tracker.tick(at)
        out += tracker.feed(leg.event(name, stamp_us, extra), now=at)
        last = max(last, at)
    out += tracker.flush()
    out += tracker.tick(last + _FAR_FUTURE)
    return [event for event in out if event.kind == "summary"]


def _reload(leg: CdrLeg) -> CdrLeg:
    if leg.source is None:
        raise CdrError(f"leg {leg.uuid}: no header block and no file to read it from")
    full = read_cdr(leg.source)
    if full.uuid != leg.uuid or full.end_us != leg.end_us:
        raise CdrError(f"{leg.source.name}: changed while the backfill ran")
    return full


# --------------------------------------------------------------------------- state


def state_path_for(outbox_path: str) -> Path | None:
    """The state file next to the outbox database; None for an in-memory outbox."""
    if not outbox_path or outbox_path == ":memory:" or outbox_path.startswith("file::memory:"):
        return None
    return Path(outbox_path + STATE_SUFFIX)


def _signature(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns]


class ProcessedFiles:
    """The CDR files already handled, per directory: ``name -> [size, mtime_ns, outcome]``.

    ``outcome`` is ``ok`` or ``bad``. Saved atomically (temp file + rename).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._dirs: dict[str, dict[str, list[Any]]] = {}
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FsCc360Error(
                f"backfill state {path} is unreadable ({exc}): move it aside to start over "
                f"(the outbox still prevents duplicates)") from None
        dirs = data.get("dirs") if isinstance(data, dict) else None
        if isinstance(dirs, dict):
            self._dirs = {str(k): dict(v) for k, v in dirs.items() if isinstance(v, dict)}

    def files(self, directory: Path) -> dict[str, list[Any]]:
        return self._dirs.setdefault(str(directory.resolve()), {})

    def seen(self, directory: Path, name: str, stat: os.stat_result) -> bool:
        entry = self.files(directory).get(name)
        return bool(entry) and list(entry[:2]) == _signature(stat)

    def add(self, directory: Path, name: str, stat: os.stat_result, outcome: str) -> None:
        self.files(directory)[name] = [*_signature(stat), outcome]

    def prune(self, directory: Path, present: set[str]) -> None:
        """Forget the files no longer in the directory (rotated or deleted)."""
        files = self.files(directory)
        for name in [n for n in files if n not in present]:
            del files[name]

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"version": STATE_VERSION, "dirs": self._dirs},
                                  separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, self.path)


@contextmanager
def state_lock(state: Path | None) -> Iterator[None]:
    """Hold ``<state>.lock`` (flock) so two backfills never run at once."""
    if state is None:
        yield
        return
    lock_path = state.with_name(state.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise BackfillBusy(f"another backfill is running (lock {lock_path})") from None
            raise
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the run


@dataclass
class SummaryOutcome:
    """One summary found, and what became of it."""

    event: CrmEvent
    status: str  #: ``enqueued`` / ``would enqueue`` (dry run) / ``duplicate``
    id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        e = self.event
        return {"call_id": e.call_id, "user": e.user, "callerid": e.callerid, "at": e.at,
                "direction": e.direction, "duration": e.duration, "files": list(e.files),
                "status": self.status, "id": self.id}


@dataclass
class BackfillResult:
    """What a run did (``fs-cc360 backfill`` prints it)."""

    directory: str
    dry_run: bool = False
    files_seen: int = 0  #: CDR files in the directory
    files_read: int = 0  #: new files read and used
    already_done: int = 0  #: remembered from an earlier run
    too_recent: int = 0  #: left for the next run (younger than ``min_age``)
    too_old: int = 0  #: older than ``max_age``: the outbox may have purged their rows
    waiting: int = 0  #: left for the next run: a related leg's CDR is not there yet
    bad: list[tuple[str, str]] = field(default_factory=list)  #: (file, why)
    summaries: list[SummaryOutcome] = field(default_factory=list)

    @property
    def enqueued(self) -> int:
        return sum(1 for s in self.summaries if s.status != "duplicate")

    @property
    def duplicates(self) -> int:
        return sum(1 for s in self.summaries if s.status == "duplicate")

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": self.directory, "dry_run": self.dry_run,
            "files_seen": self.files_seen, "files_read": self.files_read,
            "already_done": self.already_done, "too_recent": self.too_recent,
            "too_old": self.too_old, "waiting_for_partner": self.waiting,
            "bad_files": [{"file": name, "error": why} for name, why in self.bad],
            "summaries_found": len(self.summaries), "enqueued": self.enqueued,
            "duplicates": self.duplicates,
            "summaries": [s.to_dict() for s in self.summaries],
        }


def cdr_files(directory: Path) -> list[Path]:
    """The ``*.json`` files directly in ``directory`` (sub-directories are not read)."""
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        raise FsCc360Error(f"CDR directory {directory} does not exist") from None
    except NotADirectoryError:
        raise FsCc360Error(f"{directory} is not a directory") from None
    except OSError as exc:
        raise FsCc360Error(f"cannot read CDR directory {directory}: {exc.strerror}") from None
    return sorted(Path(e.path) for e in entries
                  if e.name.endswith(".json") and not e.name.startswith(".")
                  and e.is_file())


#: Directory entries examined between two pauses of :func:`recent_cdrs`.
SCAN_CHUNK = 256


def recent_cdrs(directory: str | os.PathLike[str], *, ended_after_us: int,
                modified_after: float, pause: Callable[[], None] = lambda: None,
                ) -> tuple[list[CdrLeg], list[tuple[str, str]]]:
    """The legs of ``directory`` that ended after ``ended_after_us`` (FreeSWITCH's clock),
    read fully: ``(legs, bad files)``.

    For the automatic catch-up: a directory may hold a year of files, so only files
    modified after ``modified_after`` (this host's clock) are opened, and ``pause()``
    is called every :data:`SCAN_CHUNK` entries and after every file read (the service
    passes a pauser that yields to the hub every couple of milliseconds of work). No
    minimum age: a leg that ended a moment ago is read too (the outbox keeps one summary
    per call).
    """
    legs: list[CdrLeg] = []
    bad: list[tuple[str, str]] = []
    try:
        scan = os.scandir(directory)
    except OSError as exc:
        raise FsCc360Error(f"cannot read CDR directory {directory}: "
                           f"{exc.strerror or exc}") from None
    with scan:
        for n, entry in enumerate(scan):
            if n % SCAN_CHUNK == SCAN_CHUNK - 1:
                pause()
            if not entry.name.endswith(".json") or entry.name.startswith("."):
                continue
            try:
                if entry.stat().st_mtime < modified_after or not entry.is_file():
                    continue
            except OSError:
                continue  # rotated away meanwhile
            try:
                leg = read_cdr(Path(entry.path))
            except CdrError as exc:
                bad.append((entry.name, str(exc)))
                continue
            finally:
                pause()
            if leg.end_us > ended_after_us:
                legs.append(leg)
    return legs, bad


def backfill(
    directory: str | os.PathLike[str],
    outbox: BackfillOutbox,
    *,
    config: TrackerConfig | None = None,
    new_item: Callable[[CrmEvent], NewItem] | None = None,
    state: ProcessedFiles | None = None,
    dry_run: bool = False,
    min_age: float = DEFAULT_MIN_AGE,
    max_age: float | None = None,
    now: float | None = None,
) -> BackfillResult:
    """Read the CDR files of ``directory`` and enqueue the summaries the outbox lacks.

    ``new_item(event) -> NewItem`` builds the row (the service's, with recording links;
    default: no links). ``state`` remembers handled files (None: read everything every
    time). Calls that ended less than ``min_age`` seconds ago are left for the next run;
    calls that ended more than ``max_age`` seconds ago are skipped, because the outbox
    forgets delivered rows after ``[outbox] retention_days`` and could not tell that they
    were sent (pass a little less than the retention). With ``dry_run`` nothing is
    enqueued and the state is not saved.
    """
    directory = Path(directory)
    now = time.time() if now is None else now
    newest = now - min_age
    oldest = None if max_age is None else now - max_age
    result = BackfillResult(directory=str(directory), dry_run=dry_run)
    files = cdr_files(directory)
    result.files_seen = len(files)
    legs: list[CdrLeg] = []
    used: dict[str, tuple[os.stat_result, str]] = {}  # name -> (stat, outcome)

    def bad(name: str, stat: os.stat_result | None, exc: CdrError) -> None:
        log.warning("backfill.bad_file file=%s error=%s", directory / name, exc)
        result.bad.append((name, str(exc)))
        if stat is not None:
            used[name] = (stat, "bad")

    for path in files:
        try:
            stat = path.stat()
        except OSError:
            continue  # rotated away meanwhile
        if state is not None and state.seen(directory, path.name, stat):
            result.already_done += 1
            continue
        if stat.st_mtime > newest:  # mod_json_cdr may still be writing it
            result.too_recent += 1
            continue
        if oldest is not None and stat.st_mtime < oldest:
            result.too_old += 1
            used[path.name] = (stat, "old")
            continue
        try:
            leg = read_cdr(path)
        except CdrError as exc:
            bad(path.name, stat, exc)
            continue
        ended = leg.end_us / 1_000_000
        if ended > newest:
            result.too_recent += 1
            continue
        if oldest is not None and ended < oldest:
            result.too_old += 1
            used[path.name] = (stat, "old")
            continue
        legs.append(leg.light())
        used[path.name] = (stat, "ok")
    done_before: set[str] = set()
    if state is not None:
        for name, entry in state.files(directory).items():
            found = _UUID_IN_NAME.search(name)
            if found and entry[2:3] == ["ok"]:
                done_before.add(found.group(0).lower())
    legs, held = hold_back(legs, done_before, now - PARTNER_WAIT)
    for leg in held:
        result.waiting += 1
        if leg.source is not None:
            used.pop(leg.source.name, None)
    result.files_read = len(legs)

    def reread_failed(leg: CdrLeg, exc: CdrError) -> None:
        name = leg.source.name if leg.source else leg.uuid
        used.pop(name, None)  # not remembered: read again next time
        bad(name, None, exc)

    seen_now: set[str] = set()
    items: list[tuple[SummaryOutcome, NewItem]] = []
    for event in summaries_from_legs(legs, config, on_error=reread_failed):
        if event.call_id in seen_now or outbox.has_request(event.call_id, "summary"):
            result.summaries.append(SummaryOutcome(event, "duplicate"))
            continue
        seen_now.add(event.call_id)
        outcome = SummaryOutcome(event, "would enqueue" if dry_run else "enqueued")
        result.summaries.append(outcome)
        items.append((outcome, _item(event, new_item)))
    if dry_run:
        return result
    for start in range(0, len(items), ENQUEUE_BATCH):
        batch = items[start:start + ENQUEUE_BATCH]
        ids = outbox.enqueue([item for _, item in batch])
        for (outcome, _), new_id in zip(batch, ids, strict=True):
            outcome.id = new_id
    if state is not None:
        for name, (stat, outcome_text) in used.items():
            state.add(directory, name, stat, outcome_text)
        state.prune(directory, {p.name for p in files})
        state.save()
    log.info("backfill.done dir=%s files=%d bad=%d enqueued=%d duplicates=%d",
             directory, result.files_read, len(result.bad), result.enqueued,
             result.duplicates)
    return result


def hold_back(legs: list[CdrLeg], known: set[str], wait_until: float
              ) -> tuple[list[CdrLeg], list[CdrLeg]]:
    """Split ``legs`` into (ready, held): a leg is held while one of its related legs is
    neither ready nor in ``known`` (handled by an earlier run) and it ended after
    ``wait_until``. Repeated until stable, since holding a leg may hold its partners."""
    ready = {leg.uuid.lower(): leg for leg in legs}
    held: list[CdrLeg] = []
    changed = True
    while changed:
        changed = False
        for key, leg in list(ready.items()):
            if leg.end_us / 1_000_000 <= wait_until:
                continue
            if any(u.lower() not in ready and u.lower() not in known for u in leg.related):
                held.append(ready.pop(key))
                changed = True
    return list(ready.values()), held


def _item(event: CrmEvent, new_item: Callable[[CrmEvent], NewItem] | None) -> NewItem:
    if new_item is not None:
        return new_item(event)
    return NewItem(call_key=event.call_id, kind=event.kind, request=request_for(event),
                   user=event.user, callerid=event.callerid, event_at=event.at)
