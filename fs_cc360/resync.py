"""Live-call resync: the calls FreeSWITCH has up when the connector (re)connects.

While the connector is not listening (start-up, restart, a lost ESL connection) calls go
on. Right after it subscribes it asks FreeSWITCH what is up (``show channels as json``,
then ``uuid_dump <uuid> json`` for each channel the tracker has not heard of, since only
the dump carries the channel variables the mapping rules read: ``dialed_user``,
``originator``, ``cc_member_session_uuid``, the loopback pair...). This module turns those
answers into the events the tracker would have heard, so a phone ringing at that moment
gets its ringing popup, an answered call its answer (and later hangup and summary):

* a ``CHANNEL_DATA`` per channel (the dump itself), oldest first
  (``Caller-Channel-Created-Time``), so every leg is known before anything refers to it;
  the tracker takes it as a leg first heard of in the middle of its life;
* ``CHANNEL_ANSWER`` for an answered leg (``Answer-State: answered``), else
  ``CHANNEL_PROGRESS`` for a leg FreeSWITCH placed that rang
  (``Caller-Channel-Progress-Time``: ``Answer-State: ringing`` alone is set when the leg
  is created, before the phone rings);
* one ``CHANNEL_BRIDGE`` per bridged pair (``variable_signal_bond`` or ``bridge_uuid``
  naming another answered channel that names it back or that it originated).

It also builds the ``CHANNEL_HANGUP_COMPLETE`` of a leg the tracker follows but
FreeSWITCH no longer has (it ended during the gap), when no CDR file tells more.

What FreeSWITCH 1.10 answers (``mod_commands``/``switch_core_sqldb.c``): ``show channels
as json`` is ``{"row_count":N,"rows":[{"uuid":…,"direction":…,"created_epoch":…,"name":…,
"callstate":…,"call_uuid":…},…]}``, and just ``{"row_count":0}`` when nothing is up;
loopback halves and mod_callcenter's agent legs are channels like any other. ``uuid_dump
<uuid> json`` is the channel's CHANNEL_DATA event serialised as one JSON object (header
name -> value, variables as ``variable_<name>``), ``-ERR No such channel!`` once it is gone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from fs_cc360.backfill import LINK_VARIABLES, CdrLeg, leg_events
from fs_cc360.errors import FsCc360Error
from fs_cc360.events import ChannelEvent, header_value

log = logging.getLogger(__name__)

#: Marks the events this module builds (never sent by FreeSWITCH), for logs and tests.
RESYNC_HEADER = "X-FS-CC360-Resync"


class ResyncError(FsCc360Error):
    """FreeSWITCH's answer to ``show channels`` / ``uuid_dump`` is not what 1.10 prints."""


def channel_uuids(body: str) -> list[str]:
    """The ``uuid`` column of ``show channels as json``, oldest channel first."""
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise ResyncError(f"show channels as json: not JSON ({exc}): {body[:120]!r}") from None
    if not isinstance(data, dict) or "row_count" not in data:
        raise ResyncError(f"show channels as json: no row_count in {body[:120]!r}")
    rows = data.get("rows") or []
    if not isinstance(rows, list):
        raise ResyncError("show channels as json: rows is not a list")
    good = [r for r in rows if isinstance(r, dict) and isinstance(r.get("uuid"), str)
            and r["uuid"]]
    good.sort(key=lambda r: _int(r.get("created_epoch")) or 0)
    return [r["uuid"] for r in good]


def dump_headers(body: str) -> dict[str, str] | None:
    """``uuid_dump <uuid> json`` as a header dict; None when the channel is gone."""
    text = body.strip()
    if text.startswith("-ERR") or not text:
        return None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ResyncError(f"uuid_dump json: not JSON ({exc}): {text[:120]!r}") from None
    if not isinstance(data, dict) or not data.get("Unique-ID"):
        raise ResyncError(f"uuid_dump json: no Unique-ID in {text[:120]!r}")
    return {str(k): str(v) for k, v in data.items()
            if isinstance(v, str | int | float) and _valid_name(str(k))}


def make_event(name: str, headers: Mapping[str, str], at_us: int,
               extra: Sequence[tuple[str, str]] = ()) -> ChannelEvent:
    """An event as FreeSWITCH would send it: ``headers`` with ``name`` and ``at_us``."""
    lines = [("Event-Name", name), ("Event-Date-Timestamp", str(at_us)),
             (RESYNC_HEADER, "true"), *extra]
    lines += [(k, v) for k, v in headers.items()
              if k not in ("Event-Name", "Event-Date-Timestamp", RESYNC_HEADER)]
    return ChannelEvent("".join(f"{k}: {header_value(v)}\n" for k, v in lines))


def replay_events(dumps: Iterable[Mapping[str, str]],
                  known: Callable[[str], bool] = lambda uuid: False) -> list[ChannelEvent]:
    """The events that bring a tracker to the state of these channels; see the module
    docstring for the order. A channel the tracker ``known`` already gets no
    CHANNEL_DATA, only what may have changed while nobody listened (answer, bridge): the
    tracker ignores what it has heard before."""
    channels = sorted(dumps, key=lambda h: _int(h.get("Caller-Channel-Created-Time")) or 0)
    by_uuid = {h["Unique-ID"]: h for h in channels}
    out: list[ChannelEvent] = []
    for h in channels:
        if not known(h["Unique-ID"]):
            out.append(make_event("CHANNEL_DATA", h, _time(h, "Caller-Channel-Created-Time")))
    for h in channels:
        rang = _int(h.get("Caller-Channel-Progress-Time")) or _int(
            h.get("Caller-Channel-Progress-Media-Time"))
        if _answered(h):
            out.append(make_event("CHANNEL_ANSWER", h,
                                  _time(h, "Caller-Channel-Answered-Time")))
        elif rang and h.get("Call-Direction") == "outbound":
            # it rings, or rang and is hanging up (a ring group's loser): its popup
            out.append(make_event("CHANNEL_PROGRESS", h, rang))
    paired: set[str] = set()
    for h in channels:
        uuid = h["Unique-ID"]
        other = _bridged_to(h, by_uuid)
        if other is None or uuid in paired or other in paired:
            continue
        paired.update((uuid, other))
        peer = by_uuid[other]
        out.append(make_event("CHANNEL_BRIDGE", h, _time(h, "Caller-Channel-Bridged-Time"), (
            ("Other-Leg-Unique-ID", other),
            ("Other-Leg-Direction", peer.get("Call-Direction", "")),
            ("Other-Leg-Caller-ID-Number", peer.get("Caller-Caller-ID-Number", "")),
            ("Other-Leg-Orig-Caller-ID-Number", peer.get("Caller-Orig-Caller-ID-Number", "")),
            ("Other-Leg-Destination-Number", peer.get("Caller-Destination-Number", "")),
        )))
    return out


def ended_event(uuid: str, at_us: int) -> ChannelEvent:
    """The CHANNEL_HANGUP_COMPLETE of a leg that ended while nobody listened and left no
    CDR file: only its end is known (the tracker keeps what it heard before)."""
    return make_event("CHANNEL_HANGUP_COMPLETE", {"Unique-ID": uuid}, at_us,
                      (("Hangup-Cause", "NORMAL_CLEARING"),))


@dataclass
class GapCall:
    """One call the live tracker must hear about after a gap (see :func:`plan_gap`)."""

    #: Its legs that ended while nobody listened, with their CDR files.
    ended: list[CdrLeg] = field(default_factory=list)
    #: Its legs the tracker followed that ended without a CDR file.
    closed_blind: list[str] = field(default_factory=list)
    #: Its channels up now (``uuid_dump``).
    dumps: list[Mapping[str, str]] = field(default_factory=list)

    def history(self, now_us: int) -> list[ChannelEvent]:
        """The past, in time order: the ended legs' CDR events, then a bare hangup for
        the legs gone without a CDR file. Of what they produce, only hangups (closing
        popups opened before the gap) and summaries are worth sending."""
        legs = sorted(self.ended, key=lambda leg: leg.end_us)
        by_uuid = {leg.uuid: leg for leg in legs}
        timeline = []
        for n, leg in enumerate(legs):
            partner = by_uuid.get(leg.bridged_to) if leg.bridged_to else None
            timeline += [(at_us, rank, n, event)
                         for at_us, rank, event in leg_events(leg, partner)]
        out = [event for *_, event in sorted(timeline, key=lambda t: t[:3])]
        return out + [ended_event(uuid, now_us) for uuid in self.closed_blind]

    def present(self, known: Callable[[str], bool]) -> list[ChannelEvent]:
        """The channels up now (:func:`replay_events`): popups as live. Built just before
        they are fed: ``known`` is asked then."""
        return replay_events(self.dumps, known)


@dataclass
class GapPlan:
    """What to do after a gap, from FreeSWITCH's channels and the CDR files of legs that
    ended since the last event read before it (see :func:`plan_gap`)."""

    #: Calls for the live tracker: each to be fed whole (history, then present), one
    #: call at a time, so the hub can read ESL between two.
    live: list[GapCall] = field(default_factory=list)
    #: Calls wholly over, none of whose legs was heard live, each a list of legs: for a
    #: fresh tracker (the backfill).
    catch_up: list[list[CdrLeg]] = field(default_factory=list)
    #: Followed legs gone without a CDR file (closed with :func:`ended_event`).
    closed_blind: list[str] = field(default_factory=list)
    #: Channels up that the tracker did not know.
    seeded: int = 0
    #: FreeSWITCH's time now (µs): the end of the legs closed without a CDR file.
    now_us: int = 0


def plan_gap(dumps: Sequence[Mapping[str, str]], cdr_legs: Iterable[CdrLeg], *,
             open_legs: set[str], knows: Callable[[str], bool], now_us: int) -> GapPlan:
    """Split what a gap left into what the live tracker must hear and what a fresh tracker
    reports on its own.

    ``dumps``: ``uuid_dump`` of every channel up now. ``cdr_legs``: legs that ended since
    the last event read before the gap. ``open_legs`` / ``knows``: the live tracker's legs
    not completed / heard of. Legs are grouped into calls by every variable that names
    another leg (:data:`fs_cc360.backfill.LINK_VARIABLES`, ``originated_legs``); a call
    with a channel still up or a leg the tracker heard of goes to the live tracker (which
    holds its beginning, or will hear its end), any other call to the catch-up. A leg the
    tracker heard complete is left out: it was reported live. Cheap (no event is built
    here): the service may hold the hub for it.
    """
    live = {h["Unique-ID"] for h in dumps}
    # a channel the tracker heard complete meanwhile (its end came during the dumps)
    dumps = [h for h in dumps if h["Unique-ID"] in open_legs or not knows(h["Unique-ID"])]
    legs = [leg for leg in cdr_legs if leg.uuid not in live
            and (leg.uuid in open_legs or not knows(leg.uuid))]
    calls = _UnionFind()
    for h in dumps:
        for other in _dump_links(h):
            calls.union(h["Unique-ID"], other)
    for leg in legs:
        for other in leg.links:
            calls.union(leg.uuid, other)
    followed = {calls.find(u) for u in live | open_legs}
    followed |= {calls.find(leg.uuid) for leg in legs
                 if any(knows(u) for u in (leg.uuid, *leg.links))}
    plan = GapPlan(now_us=now_us)
    by_call: dict[str, GapCall] = {}
    over: dict[str, list[CdrLeg]] = {}
    for leg in legs:
        root = calls.find(leg.uuid)
        if root in followed:
            by_call.setdefault(root, GapCall()).ended.append(leg)
        else:
            over.setdefault(root, []).append(leg)
    plan.catch_up = list(over.values())
    with_cdr = {leg.uuid for leg in legs}
    for uuid in sorted(open_legs - live - with_cdr):
        plan.closed_blind.append(uuid)
        by_call.setdefault(calls.find(uuid), GapCall()).closed_blind.append(uuid)
    for h in dumps:
        by_call.setdefault(calls.find(h["Unique-ID"]), GapCall()).dumps.append(h)
    plan.seeded = sum(1 for h in dumps if not knows(h["Unique-ID"]))
    plan.live = list(by_call.values())
    return plan


def _dump_links(h: Mapping[str, str]) -> Iterable[str]:
    for name in LINK_VARIABLES:
        value = h.get(f"variable_{name}")
        if value:
            yield value
    if h.get("Other-Leg-Unique-ID"):
        yield h["Other-Leg-Unique-ID"]
    for item in (h.get("variable_originated_legs") or "").removeprefix("ARRAY::").split("|:"):
        uuid = item.split(";", 1)[0]
        if uuid:
            yield uuid


class _UnionFind:
    def __init__(self) -> None:
        self._parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        parent = self._parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[ra] = rb


def _bridged_to(h: Mapping[str, str], by_uuid: Mapping[str, Mapping[str, str]]) -> str | None:
    """The channel ``h`` talks to now: an answered channel named by ``signal_bond`` /
    ``bridge_uuid`` (set on both sides while bridged)."""
    if not _answered(h):
        return None
    for key in ("variable_signal_bond", "variable_bridge_uuid", "Other-Leg-Unique-ID"):
        other = h.get(key)
        if other and other != h.get("Unique-ID") and other in by_uuid and _answered(
                by_uuid[other]):
            return other
    return None


def _answered(h: Mapping[str, str]) -> bool:
    return (h.get("Answer-State") or "").lower() == "answered" or bool(
        _int(h.get("Caller-Channel-Answered-Time")))


def _time(h: Mapping[str, str], *keys: str) -> int:
    """The first non-zero time (µs) of ``keys``, else when the dump was made."""
    for key in keys:
        value = _int(h.get(key))
        if value:
            return value
    return _int(h.get("Event-Date-Timestamp")) or 0


def _int(value: object) -> int | None:
    text = str(value) if value is not None else ""
    return int(text) if text.isascii() and text.isdigit() else None


def _valid_name(name: str) -> bool:
    return bool(name) and not any(c in name for c in ": \n\r")
