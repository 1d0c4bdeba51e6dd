"""Call mapping rules: FreeSWITCH channel events in, CC360 events out. Pure code, no I/O.

:class:`CallTracker` follows every channel (leg) it hears of and, for each *agent leg*
(a leg whose PBX user is a digit extension), one *part*: that agent's share of one call.
Each part gets the CC360 id of its agent leg (``Unique-ID``), so ringing, answer, hangup
and the summary of one agent in one call share an id, and replaying the same events
gives the same ids.

The rules below name the capture in ``tests/captures/`` that shows each case.

Agent legs (rule 1)
    A leg FreeSWITCH places to a phone (``Call-Direction: outbound``): the user is
    ``variable_dialed_user``, else ``Caller-Destination-Number`` (not for
    ``sofia/gateway/...`` legs nor legs tagged ``cc360_trunk=true``). A leg a phone
    places (``inbound``): ``variable_user_name``, else ``Caller-Username`` unless the leg
    is in the ``public`` context (a carrier's caller is not a PBX user) or tagged as a
    trunk. ``variable_cc360_extension`` overrides both. The user then goes through the
    ``[extensions]`` map and must match ``extension_pattern``.

Kinds of part
    ``incoming``
        an outbound agent leg whose originator is not an agent leg (a: 5000 → 101).
    ``internal_in`` / ``internal_out``
        extension to extension (g: 102 → 101); skipped unless ``internal_calls=report``.
    ``outgoing``
        an inbound agent leg that dials a phone number (j), or a leg tagged
        ``cc360_direction=outgoing`` by our click-to-call.
    ``originated``
        an outbound agent leg with no originator: FreeSWITCH placed it from an API call
        (c: ``originate user/101 ... XML default``). It becomes ``outgoing`` once bridged
        to a leg that is not an agent's; otherwise it is never reported.

Realtime events (rule 2)
    incoming: ``ringing`` on the agent leg's first CHANNEL_PROGRESS(_MEDIA), ``answer``
    on its CHANNEL_ANSWER (``ringing`` first if the phone answered without ringing),
    ``hangup`` on its CHANNEL_HANGUP_COMPLETE for every part that got ``ringing`` -
    ring-group losers (h: 101 ``LOSE_RACE``) and agents the caller gave up on (b)
    included. The caller's own leg never produces ``ringing``. Outgoing parts
    (``outgoing_realtime=true`` only): ``ringing`` when the client's leg progresses,
    ``answer`` when it answers, ``hangup`` at the agent leg's end.

Summaries
    One per part that was answered: incoming duration = the agent leg's ``billsec``;
    outgoing duration = the client leg's ``billsec`` (0 if it never answered). Unanswered
    incoming calls are decided per call (the caller's leg) once it is over: with
    ``missed_calls=first`` one summary, duration 0, for the first agent that rang, or,
    when none rang (d2: busy), the first agent leg tried; ``all``: every such agent;
    ``none``: no summary. Unanswered outgoing calls: one summary with duration 0.

Transfers (rule 6)
    Blind (l): the new agent leg has the caller's leg as originator, so it is a new
    incoming part; the first agent's summary covers only its own leg. Attended (m): the
    consultation leg (originator = the first agent's leg) is internal; when it is then
    bridged to the caller, the part turns ``incoming`` from the caller's original number
    (``Caller-Orig-Caller-ID-Number``/``Caller-ANI``: FreeSWITCH has rewritten
    ``Caller-Caller-ID-Number`` by then) and gets its own ringing/answer/hangup.

Recordings (rule 9)
    Files recorded (RECORD_START/RECORD_STOP ``Record-File-Path``, or the channel
    variable ``recording_variable``) on the agent leg or on a leg it was bridged to (its
    originator included) while the agent's part was answered. The caller leg's
    RECORD_STOP often arrives after the agent leg's HANGUP_COMPLETE (a), so a summary
    waits until every related leg has completed, at most ``summary_wait`` seconds
    (:meth:`CallTracker.tick`).

Restarts (rule 10)
    A leg first heard of at its CHANNEL_HANGUP_COMPLETE is rebuilt from that event's
    variables (``billsec``, ``answer_epoch``, ``originator``, ``originated_legs``), so a
    connector restarted mid-call still sends the hangup and the summary.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from fs_cc360.events import ChannelEvent
from fs_cc360.numbers import NumberRules

log = logging.getLogger(__name__)

REALTIME_KINDS = ("ringing", "answer", "hangup")

#: Channel variables the tracker reads (the freeswitch_conf tests check each is set
#: by FreeSWITCH itself or by the shipped dialplan / click-to-call originate).
VARIABLES_READ = (
    "dialed_user", "user_name", "originator", "originated_legs", "billsec",
    "answer_epoch", "bridge_epoch", "progress_epoch", "progress_media_epoch",
    "last_bridge_to", "bridge_uuid",
    "cc360_extension", "cc360_trunk", "cc360_direction", "cc360_client",
)


@dataclass(frozen=True)
class CrmEvent:
    """One CC360 event for one agent's part in one call.

    ``kind`` is ``ringing``/``answer``/``hangup`` (RingingEventHandler) or ``summary``
    (PushHistoryData). ``call_id`` is the CC360 ``id``: the same for every event of one
    agent's part in one call. ``files`` are recording paths as FreeSWITCH wrote them.
    """

    kind: str
    call_id: str
    user: str
    callerid: str
    at: float  #: FreeSWITCH event time, epoch seconds
    direction: str | None = None  #: ``incoming`` / ``outgoing`` (summary only)
    duration: int | None = None  #: seconds (summary only)
    files: tuple[str, ...] = ()

    @property
    def realtime(self) -> bool:
        return self.kind in REALTIME_KINDS


@dataclass(frozen=True)
class TrackerConfig:
    """The ``[calls]`` and ``[extensions]`` settings the mapping rules use."""

    extension_pattern: str = r"^\d{2,7}$"
    extensions: Mapping[str, str] = field(default_factory=dict)
    missed_calls: str = "first"  #: first | all | none
    outgoing_realtime: bool = False
    internal_calls: str = "skip"  #: skip | report
    numbers: NumberRules = field(default_factory=NumberRules)
    recording_variable: str = ""
    summary_wait: float = 10.0
    #: A leg silent for this long without completing is forgotten (lost HANGUP_COMPLETE).
    stale_after: float = 6 * 3600.0


@dataclass
class _Recording:
    started_at: float | None = None
    stopped_at: float | None = None


@dataclass
class _Leg:
    uuid: str
    seen_at: float
    direction: str = ""
    extension: str | None = None
    originator: str | None = None
    caller_number: str = ""
    orig_caller_number: str = ""
    destination: str = ""
    cc360_direction: str = ""
    cc360_client: str = ""
    progress_at: float | None = None
    answered_at: float | None = None
    bridged_at: float | None = None
    ended_at: float | None = None
    complete: bool = False
    billsec: int | None = None
    partners: list[str] = field(default_factory=list)
    originated: list[tuple[str, str]] = field(default_factory=list)  # (uuid, extension)
    recordings: dict[str, _Recording] = field(default_factory=dict)
    first_event: str = ""
    profiled: bool = False  # its own event was read (not only the peer side of a bridge)

    def add_partner(self, uuid: str | None) -> None:
        if uuid and uuid != self.uuid and uuid not in self.partners:
            self.partners.append(uuid)


_REPORTED_DIRECTION = {
    "incoming": "incoming",
    "internal_in": "incoming",
    "outgoing": "outgoing",
    "internal_out": "outgoing",
}


@dataclass
class _Part:
    leg: _Leg
    kind: str
    callerid: str
    group: str | None  # the caller's leg, for the missed-call decision
    order: int
    rang_at: float | None = None
    ringing_sent: bool = False
    answer_sent: bool = False
    hangup_sent: bool = False
    summary_due_at: float | None = None  # deadline once the agent leg completed
    done: bool = False

    @property
    def user(self) -> str:
        return self.leg.extension or ""


class CallTracker:
    """Feeds on channel events, returns the CC360 events they imply.

    ``feed(event, now)`` and ``tick(now)`` are the whole interface; ``now`` (epoch
    seconds) only drives the bounded waits and forgetting, so tests pin it. The tracker
    keeps state for calls in progress and forgets each call shortly after its end.
    """

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        self._pattern = re.compile(self.config.extension_pattern)
        self._legs: dict[str, _Leg] = {}
        self._parts: dict[str, _Part] = {}
        self._groups: dict[str, list[_Part]] = {}  # caller leg -> its incoming parts
        self._groups_done: set[str] = set()
        self._due: dict[str, _Part] = {}  # summaries waiting for related legs
        self._dependents: dict[str, dict[str, None]] = {}  # leg -> parts waiting on it
        self._order = 0

    # -- public interface ---------------------------------------------------------

    def feed(self, event: ChannelEvent, now: float | None = None) -> list[CrmEvent]:
        """Apply one event; return the CC360 events it completes, in order."""
        at = _event_time(event)
        now = at if now is None else now
        uuid = event.uuid
        if not uuid or event.name == "BACKGROUND_JOB":
            return []
        handler = _HANDLERS.get(event.name)
        if handler is None:
            return []
        out: list[CrmEvent] = []
        leg = self._update_leg(event, at)
        handler(self, leg, event, at, now, out)
        return out

    def tick(self, now: float) -> list[CrmEvent]:
        """Release summaries whose wait is over; forget finished and stale calls."""
        out: list[CrmEvent] = []
        for part in list(self._due.values()):
            if part.summary_due_at is not None and now >= part.summary_due_at:
                self._emit_summary(part, out)
        self._forget(now, out)
        return out

    def flush(self) -> list[CrmEvent]:
        """Emit every summary still waiting (used at shutdown: better early than lost)."""
        out: list[CrmEvent] = []
        for part in list(self._due.values()):
            self._emit_summary(part, out)
        return out

    @property
    def active_legs(self) -> int:
        return len(self._legs)

    @property
    def waiting(self) -> int:
        """Summaries held back, waiting for a related leg to complete."""
        return len(self._due)

    # -- legs ---------------------------------------------------------------------

    def _update_leg(self, event: ChannelEvent, at: float) -> _Leg:
        uuid = event.uuid
        leg = self._legs.get(uuid)
        if leg is None:
            leg = self._legs[uuid] = _Leg(uuid=uuid, seen_at=at, first_event=event.name)
        leg.seen_at = at
        get = event.get
        if not leg.profiled:
            self._profile(leg, event)
        # What changes during a call: transfers rewrite the caller ID and destination.
        leg.caller_number = get("Caller-Caller-ID-Number") or leg.caller_number
        leg.destination = get("Caller-Destination-Number") or leg.destination
        return leg

    def _profile(self, leg: _Leg, event: ChannelEvent) -> None:
        """What does not change over a leg's life, read once from its first own event
        (a verbose event has ~300 headers; the hot path reads as few as it can)."""
        get = event.get
        leg.profiled = True
        leg.first_event = leg.first_event or event.name
        leg.direction = get("Call-Direction") or leg.direction
        leg.orig_caller_number = (
            get("Caller-Orig-Caller-ID-Number") or get("Caller-ANI") or leg.orig_caller_number
        )
        originator = event.var("originator")
        if not originator and get("Other-Type") == "originator":
            originator = get("Other-Leg-Unique-ID")
        if originator and originator != leg.uuid:
            leg.originator = originator
        leg.cc360_direction = event.var("cc360_direction") or ""
        leg.cc360_client = event.var("cc360_client") or ""
        leg.extension = self._extension_of(event)

    def _extension_of(self, event: ChannelEvent) -> str | None:
        """The agent's extension for this leg, or None when it is not an agent leg."""
        user = event.var("cc360_extension")
        if not user:
            if (event.var("cc360_trunk") or "").lower() == "true":
                return None
            channel = event.get("Channel-Name") or ""
            if channel.startswith(("sofia/gateway/", "loopback/")):
                return None
            if event.get("Call-Direction") == "outbound":
                dialed = event.var("dialed_user")
                dest = event.get("Caller-Destination-Number")
                if event.name not in ("CHANNEL_CREATE", "CHANNEL_ORIGINATE") and dest and (
                    self._as_extension(dest)
                ):
                    # Seen first mid-call (restart): a leg that later dials someone itself
                    # (att_xfer, m) has its dialed_user overwritten; its destination is not.
                    dialed = dest
                user = dialed or dest
            else:
                user = event.var("user_name")
                if not user and event.get("Caller-Context") not in (None, "public"):
                    user = event.get("Caller-Username")
        if not user:
            return None
        return self._as_extension(user)

    def _as_extension(self, user: str) -> str | None:
        mapped = self.config.extensions.get(user, user)
        # The spec: an extension is ASCII digits only (\d alone also matches other scripts).
        if mapped.isascii() and mapped.isdigit() and self._pattern.fullmatch(mapped):
            return mapped
        return None

    def _is_extension_number(self, number: str) -> bool:
        return bool(number) and self._as_extension(number) is not None

    # -- parts --------------------------------------------------------------------

    def _part(self, leg: _Leg) -> _Part | None:
        """The agent part of ``leg``, classified on first need; None for other legs."""
        if leg.extension is None:
            return None
        part = self._parts.get(leg.uuid)
        if part is None:
            self._order += 1
            kind, callerid, group = self._classify(leg)
            part = self._parts[leg.uuid] = _Part(leg, kind, callerid, group, self._order)
            self._set_group(part, group)
        return part

    def _set_group(self, part: _Part, group: str | None) -> None:
        if part.group and part in self._groups.get(part.group, ()):
            self._groups[part.group].remove(part)
        part.group = group
        if group:
            self._groups.setdefault(group, []).append(part)

    def _classify(self, leg: _Leg) -> tuple[str, str, str | None]:
        numbers = self.config.numbers
        if leg.cc360_direction == "outgoing":
            client = leg.cc360_client or leg.caller_number
            return "outgoing", numbers.normalize(client), None
        if leg.direction == "outbound":
            if leg.originator is None:
                return "originated", "", None
            origin = self._legs.get(leg.originator)
            if origin is not None:
                internal = origin.extension is not None
            else:  # originator unknown (restart): judge by the number the phone shows
                internal = self._is_extension_number(leg.caller_number)
            caller = leg.caller_number
            if internal:
                return "internal_in", self._as_extension(caller) or caller, leg.originator
            return "incoming", numbers.normalize(caller), leg.originator
        # A phone placed this leg: it dials an extension or a number.
        dest = leg.destination
        if self._is_extension_number(dest):
            return "internal_out", self._as_extension(dest) or dest, None
        phone = numbers.phone_or_none(dest)
        if phone is None:
            return "ignored", "", None  # feature codes (*97), voicemail, conferences
        return "outgoing", phone, None

    def _reported(self, part: _Part) -> bool:
        if part.kind in ("incoming", "outgoing"):
            return True
        if part.kind in ("internal_in", "internal_out"):
            return self.config.internal_calls == "report"
        return False

    def _realtime(self, part: _Part) -> bool:
        if not self._reported(part):
            return False
        if part.kind in ("outgoing", "internal_out"):
            return self.config.outgoing_realtime
        return True

    def _send(self, part: _Part, kind: str, at: float, out: list[CrmEvent]) -> None:
        out.append(CrmEvent(kind, part.leg.uuid, part.user, part.callerid, at))

    def _ring(self, part: _Part, at: float, out: list[CrmEvent]) -> None:
        if part.rang_at is None:
            part.rang_at = at
        if not part.ringing_sent and self._realtime(part):
            part.ringing_sent = True
            self._send(part, "ringing", at, out)

    def _answer(self, part: _Part, at: float, out: list[CrmEvent]) -> None:
        self._ring(part, at, out)
        if not part.answer_sent and self._realtime(part):
            part.answer_sent = True
            self._send(part, "answer", at, out)

    def _client_parts(self, leg: _Leg) -> list[_Part]:
        """Outgoing parts whose client leg is ``leg`` (a leg the agent's leg originated).

        An API-originated agent leg (``originated``) becomes ``outgoing`` as soon as it
        originates a leg that is not an agent's: that leg is the client (c).
        """
        part = self._parts.get(leg.originator) if leg.originator else None
        if part is None:
            return []
        if part.kind == "originated" and leg.extension is None:
            self._promote_outgoing(part, leg)
        if part.kind in ("outgoing", "internal_out"):
            return [part]
        return []

    def _promote_outgoing(self, part: _Part, client: _Leg) -> None:
        part.kind = "outgoing"
        part.callerid = self.config.numbers.normalize(
            part.leg.cc360_client or client.destination or part.leg.destination
        )

    # -- event handlers -------------------------------------------------------------

    def _on_create(self, leg: _Leg, event: ChannelEvent, at: float, now: float,
                   out: list[CrmEvent]) -> None:
        self._part(leg)
        if leg.originator:
            origin = self._legs.get(leg.originator)
            if origin is not None:
                origin.add_partner(leg.uuid)
                leg.add_partner(origin.uuid)

    def _on_progress(self, leg: _Leg, event: ChannelEvent, at: float, now: float,
                     out: list[CrmEvent]) -> None:
        if leg.progress_at is None:
            leg.progress_at = at
        self._advance(leg, self._ring, at, out)

    def _on_answer(self, leg: _Leg, event: ChannelEvent, at: float, now: float,
                   out: list[CrmEvent]) -> None:
        if leg.answered_at is None:
            leg.answered_at = at
        self._advance(leg, self._answer, at, out)

    def _advance(self, leg: _Leg, step: Callable[[_Part, float, list[CrmEvent]], None],
                 at: float, out: list[CrmEvent]) -> None:
        """Ring or answer: the agent's own phone for incoming parts (never the caller's
        leg, never a phone the agent is dialling from), the client's leg for outgoing."""
        part = self._part(leg)
        if part is not None and leg.direction == "outbound" and part.kind in (
            "incoming", "internal_in"
        ):
            step(part, at, out)
        for client_of in self._client_parts(leg):
            step(client_of, at, out)

    def _on_bridge(self, leg: _Leg, event: ChannelEvent, at: float, now: float,
                   out: list[CrmEvent]) -> None:
        other_uuid = event.get("Other-Leg-Unique-ID")
        if not other_uuid:
            return
        other = self._legs.get(other_uuid)
        if other is None:
            other = self._legs[other_uuid] = _Leg(uuid=other_uuid, seen_at=at)
            other.direction = event.get("Other-Leg-Direction") or ""
            other.caller_number = event.get("Other-Leg-Caller-ID-Number") or ""
            other.orig_caller_number = event.get("Other-Leg-Orig-Caller-ID-Number") or ""
            other.destination = event.get("Other-Leg-Destination-Number") or ""
        leg.add_partner(other.uuid)
        other.add_partner(leg.uuid)
        leg.bridged_at = leg.bridged_at or at
        other.bridged_at = other.bridged_at or at
        for agent, peer in ((leg, other), (other, leg)):
            part = self._part(agent)
            if part is not None:
                self._joined(part, peer, at, out)

    def _joined(self, part: _Part, peer: _Leg, at: float, out: list[CrmEvent]) -> None:
        """``part``'s agent leg is now bridged to ``peer``: transfers and API originates."""
        if peer.extension is not None:
            return  # agent to agent: a consultation or an internal call, nothing changes
        numbers = self.config.numbers
        if part.kind == "originated" or (part.kind == "outgoing" and not part.callerid):
            self._promote_outgoing(part, peer)
            self._answer(part, at, out)
        elif part.kind == "internal_in" and peer.direction == "inbound":
            # Attended transfer: the consultation leg now talks to the original caller.
            part.kind = "incoming"
            part.callerid = numbers.normalize(peer.orig_caller_number or peer.caller_number)
            self._set_group(part, peer.uuid)
            self._answer(part, at, out)
        elif part.kind == "internal_out" and peer.direction == "outbound":
            part.kind = "outgoing"
            part.callerid = numbers.normalize(peer.destination)
            self._answer(part, at, out)

    def _on_record(self, leg: _Leg, event: ChannelEvent, at: float, now: float,
                   out: list[CrmEvent]) -> None:
        path = event.get("Record-File-Path")
        if not path:
            return
        rec = leg.recordings.setdefault(path, _Recording())
        if event.name == "RECORD_START":
            rec.started_at = rec.started_at or at
        else:
            rec.stopped_at = at

    def _on_hangup_complete(self, leg: _Leg, event: ChannelEvent, at: float, now: float,
                            out: list[CrmEvent]) -> None:
        leg.complete = True
        leg.ended_at = at
        leg.billsec = _int(event.var("billsec"))
        answered_epoch = _int(event.var("answer_epoch"))
        if leg.answered_at is None and answered_epoch:
            leg.answered_at = float(answered_epoch)
        if leg.progress_at is None:
            progress_epoch = _int(event.var("progress_epoch")) or _int(
                event.var("progress_media_epoch"))
            if progress_epoch:
                leg.progress_at = float(progress_epoch)
        bridge_epoch = _int(event.var("bridge_epoch"))
        if leg.bridged_at is None and bridge_epoch:
            leg.bridged_at = float(bridge_epoch)
        for key in ("last_bridge_to", "bridge_uuid"):
            leg.add_partner(event.var(key))
        if leg.originator:
            leg.add_partner(leg.originator)
        leg.originated = _originated_legs(event.var("originated_legs"))
        path_var = self.config.recording_variable
        if path_var:
            path = event.var(path_var)
            if path:
                leg.recordings.setdefault(path, _Recording(leg.answered_at, at))

        part = self._part(leg)
        if part is not None:
            self._agent_leg_done(part, at, now, out)
        for waiting in self._dependents.pop(leg.uuid, ()):
            waiting_part = self._due.get(waiting)
            if waiting_part is not None and self._ready(waiting_part):
                self._emit_summary(waiting_part, out)
        if part is not None and part.group:
            self._decide_missed(part.group, now, out)
        self._decide_missed(leg.uuid, now, out)
        self._derive_missed_from_caller(leg, out)

    def _agent_leg_done(self, part: _Part, at: float, now: float, out: list[CrmEvent]) -> None:
        restarted = part.leg.first_event == "CHANNEL_HANGUP_COMPLETE"
        if part.kind == "originated":
            self._settle_originated(part)
        if self._realtime(part) and not part.hangup_sent:
            if part.ringing_sent or part.answer_sent or (
                restarted and (part.leg.answered_at or part.leg.progress_at)
            ):
                part.hangup_sent = True
                self._send(part, "hangup", at, out)
        if not self._reported(part):
            part.done = True
            return
        if part.kind in ("outgoing", "internal_out") or part.leg.answered_at:
            self._wait_for_summary(part, now, out)
        # unanswered incoming parts wait for the missed-call decision of their call

    # -- summaries -----------------------------------------------------------------

    def _settle_originated(self, part: _Part) -> None:
        """An API-originated agent leg ended before we saw it bridged (restart): it was an
        outgoing call if it was bridged to a leg that is not an agent's, or, failing
        that knowledge, if it was bridged while its destination was a phone number."""
        for uuid in part.leg.partners:
            peer = self._legs.get(uuid)
            if peer is not None and peer.extension is None:
                self._promote_outgoing(part, peer)
                return
        leg = part.leg
        if leg.bridged_at and self.config.numbers.phone_or_none(leg.destination):
            self._promote_outgoing(part, leg)

    def _related(self, part: _Part) -> list[str]:
        related = list(part.leg.partners)
        if part.leg.originator and part.leg.originator not in related:
            related.append(part.leg.originator)
        return related

    def _ready(self, part: _Part) -> bool:
        for uuid in self._related(part):
            other = self._legs.get(uuid)
            if other is None or not other.complete:
                return False
        return True

    def _wait_for_summary(self, part: _Part, now: float, out: list[CrmEvent]) -> None:
        """Send the summary once every related leg completed, or after ``summary_wait``."""
        part.summary_due_at = now + self.config.summary_wait
        if self._ready(part):
            self._emit_summary(part, out)
            return
        self._due[part.leg.uuid] = part
        for uuid in self._related(part):
            self._dependents.setdefault(uuid, {})[part.leg.uuid] = None

    def _emit_summary(self, part: _Part, out: list[CrmEvent]) -> None:
        self._due.pop(part.leg.uuid, None)
        if part.done:
            return
        part.done = True
        leg = part.leg
        direction = _REPORTED_DIRECTION.get(part.kind)
        if direction is None:
            return
        if direction == "incoming":
            duration = self._talk_seconds(leg)
        else:
            duration = self._client_seconds(part)
        files = self._files(part) if leg.answered_at else ()  # nobody talked: nothing to hear
        out.append(CrmEvent(
            "summary", leg.uuid, part.user, part.callerid, leg.ended_at or leg.seen_at,
            direction=direction, duration=duration, files=files,
        ))

    def _talk_seconds(self, leg: _Leg) -> int:
        if leg.billsec is not None:
            return leg.billsec
        if leg.answered_at and leg.ended_at:
            return max(0, round(leg.ended_at - leg.answered_at))
        return 0

    def _client_seconds(self, part: _Part) -> int:
        """Seconds the client was connected on an outgoing part."""
        best: int | None = None
        for uuid in self._related(part):
            other = self._legs.get(uuid)
            if other is None or other.extension is not None and part.kind == "outgoing":
                continue
            if other.complete and other.billsec is not None:
                seconds = other.billsec
            elif other.answered_at and part.leg.ended_at:
                seconds = max(0, round(part.leg.ended_at - other.answered_at))
            else:
                continue
            best = seconds if best is None else max(best, seconds)
        if best is not None:
            return best
        leg = part.leg
        if leg.bridged_at and leg.ended_at:  # only the agent leg is known (restart)
            return max(0, round(leg.ended_at - leg.bridged_at))
        return 0

    def _files(self, part: _Part) -> tuple[str, ...]:
        leg = part.leg
        start = leg.answered_at or leg.bridged_at
        end = leg.ended_at
        files: list[str] = []
        for uuid in [leg.uuid, *self._related(part)]:
            other = self._legs.get(uuid)
            if other is None:
                continue
            for path, rec in other.recordings.items():
                if rec.stopped_at is not None and start is not None and rec.stopped_at < start:
                    continue
                if rec.started_at is not None and end is not None and rec.started_at > end:
                    continue
                if path not in files:
                    files.append(path)
        return tuple(files)

    # -- missed calls --------------------------------------------------------------

    def _decide_missed(self, group: str, now: float, out: list[CrmEvent]) -> None:
        """Once a call (the caller's leg ``group``) is over and all its agent legs too:
        if nobody answered, pick the parts that get a missed-call summary."""
        parts = [p for p in self._groups.get(group, ()) if p.kind in ("incoming", "internal_in")]
        if not parts or group in self._groups_done:
            return
        caller = self._legs.get(group)
        if caller is None or not caller.complete or not all(p.leg.complete for p in parts):
            return
        self._groups_done.add(group)
        unanswered = [p for p in parts if not p.leg.answered_at]
        if len(unanswered) == len(parts):
            for p in self._missed_parts(parts):
                self._emit_summary(p, out)
        for p in unanswered:
            p.done = True

    def _missed_parts(self, parts: list[_Part]) -> list[_Part]:
        mode = self.config.missed_calls
        if mode == "none":
            return []
        reported = [p for p in parts if self._reported(p)]
        rang = sorted((p for p in reported if p.rang_at is not None),
                      key=lambda p: (p.rang_at, p.order))
        chosen = rang or sorted(reported, key=lambda p: p.order)
        return chosen if mode == "all" else chosen[:1]

    def _derive_missed_from_caller(self, leg: _Leg, out: list[CrmEvent]) -> None:
        """A caller leg completed, unanswered, whose agent legs we never saw (restart):
        rebuild the tried agent legs from its ``originated_legs`` variable."""
        if (not leg.originated or leg.uuid in self._groups_done or leg.extension is not None
                or any(uuid in self._parts for uuid, _ in leg.originated)):
            return
        self._groups_done.add(leg.uuid)
        if leg.bridged_at or self.config.missed_calls == "none":
            return  # answered: the agent leg's own completion reported it
        tried: dict[str, str] = {}
        for uuid, user in leg.originated:
            extension = self._as_extension(user)
            if extension:
                tried.setdefault(uuid, extension)
        chosen = list(tried.items())
        if self.config.missed_calls == "first":
            chosen = chosen[:1]
        callerid = self.config.numbers.normalize(leg.orig_caller_number or leg.caller_number)
        for uuid, extension in chosen:
            out.append(CrmEvent("summary", uuid, extension, callerid,
                                leg.ended_at or leg.seen_at, direction="incoming", duration=0))

    # -- forgetting ----------------------------------------------------------------

    def _forget(self, now: float, out: list[CrmEvent]) -> None:
        """Drop finished calls (a grace period after their end) and silent stale legs."""
        grace = max(self.config.summary_wait * 3, 60.0)
        stale = self.config.stale_after
        for uuid, leg in list(self._legs.items()):
            idle = now - leg.seen_at
            part = self._parts.get(uuid)
            finished = leg.complete and (part is None or part.done)
            if (finished and idle > grace) or idle > stale:
                if part is not None and not part.done:
                    if part.summary_due_at is not None:
                        self._emit_summary(part, out)
                    log.warning("calls.forgotten leg=%s user=%s: no HANGUP_COMPLETE seen",
                                uuid, part.user)
                self._legs.pop(uuid, None)
                self._dependents.pop(uuid, None)
                self._groups.pop(uuid, None)
                self._groups_done.discard(uuid)
                if part is not None:
                    self._parts.pop(uuid, None)
                    self._due.pop(uuid, None)
                    if part.group in self._groups and part in self._groups[part.group]:
                        self._groups[part.group].remove(part)


_HANDLERS = {
    "CHANNEL_CREATE": CallTracker._on_create,
    "CHANNEL_ORIGINATE": CallTracker._on_create,
    "CHANNEL_PROGRESS": CallTracker._on_progress,
    "CHANNEL_PROGRESS_MEDIA": CallTracker._on_progress,
    "CHANNEL_ANSWER": CallTracker._on_answer,
    "CHANNEL_BRIDGE": CallTracker._on_bridge,
    "RECORD_START": CallTracker._on_record,
    "RECORD_STOP": CallTracker._on_record,
    "CHANNEL_HANGUP_COMPLETE": CallTracker._on_hangup_complete,
}

#: Events the tracker uses: subscribe to these (and BACKGROUND_JOB for click-to-call).
TRACKED_EVENTS = tuple(_HANDLERS)


def _event_time(event: ChannelEvent) -> float:
    raw = event.get("Event-Date-Timestamp")
    if raw and raw.isdigit():
        return int(raw) / 1_000_000
    return 0.0


def _int(value: str | None) -> int | None:
    if value and value.lstrip("-").isdigit():
        return int(value)
    return None


def _originated_legs(value: str | None) -> list[tuple[str, str]]:
    """Parse ``originated_legs``: ``[ARRAY::]uuid;Outbound Call;101|:uuid;...``."""
    if not value:
        return []
    if value.startswith("ARRAY::"):
        value = value[len("ARRAY::"):]
    legs = []
    for item in value.split("|:"):
        fields = item.split(";")
        if len(fields) >= 3 and fields[0]:
            legs.append((fields[0], fields[2]))
    return legs
