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

Queues (rule 11, q1)
    mod_callcenter answers the caller's leg itself, then places each agent leg with no
    ``originator`` and no Other-Leg: its only link to the caller is
    ``variable_cc_member_session_uuid`` (the member session), which stands in for the
    originator. So an offered agent leg is an ``incoming`` part of the caller's call,
    whatever the strategy (top-down, ring-all, longest-idle...): ringing, a closing
    hangup, answer and the summary for the one who answers (duration = its own
    ``billsec``, never the caller's time in the queue), the caller leg's recordings, and
    the missed-call rule over the agents offered when the caller gives up.

Pickups (rule 12, p1)
    ``intercept`` (``**101``, and group pickup, which ends the same way) ends the ringing
    leg with ``PICKED_OFF`` and bridges the picking phone's *own* leg to the caller's
    leg. An agent leg a phone placed (``inbound``), bridged to another ``inbound`` leg
    (placed by a caller, never for this phone) has taken the call over: it becomes that
    agent's ``incoming`` part, from the caller's ``Caller-Orig-Caller-ID-Number``
    (intercept rewrites ``Caller-Caller-ID-Number`` to the picker's), ``answer`` with no
    ``ringing`` (its phone never rang), talk time from the takeover bridge to the end of
    either side. A ``PICKED_OFF`` leg means the call was taken: no missed call.

Loopback legs (rule 13, r1)
    FusionPBX ring groups and follow-me (and queue contacts ``loopback/101``) put a
    mod_loopback pair between the caller and the phones: the ``-a`` half is placed from
    the caller, the ``-b`` half (``other_loopback_leg_uuid``, ``other_loopback_from_uuid``)
    runs the dialplan and places the phone legs. A pair is followed as one link: a phone
    leg's originator is the leg beyond the pair, and a summary waits for, and takes the
    recordings of, the legs on both sides. Loopback halves are never agent legs.

Order (rule 14)
    A leg first heard of at its end (restart, backfill) is never taken for a non-agent:
    a part classified without the leg it hangs on, or a bridge to an unknown leg, is
    judged again when that leg is heard of (or as it stands after ``summary_wait``); the
    missed-call decision waits until every leg linked to the caller has completed. So
    legs that end in the same clock tick give the same answer in any order.

Recordings (rule 9)
    Files recorded (RECORD_START/RECORD_STOP ``Record-File-Path``, or the channel
    variable ``recording_variable``) on the agent leg or on a leg it was bridged to (its
    originator included) while the agent's part was answered. The caller leg's
    RECORD_STOP often arrives after the agent leg's HANGUP_COMPLETE (a), so a summary
    waits until every related leg has completed, at most ``summary_wait`` seconds
    (:meth:`CallTracker.tick`).

Tenants (rule 15)
    With ``[calls] domains`` set, an agent leg must also belong to one of those directory
    domains (``dialed_domain`` on a leg the ``user/`` endpoint placed, ``domain_name`` on
    one a phone placed): 101 of another tenant is not an agent here, so its calls give
    nothing, as any non-agent leg.

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
#: Seconds a missed-call decision waits after the call's legs ended, for legs that ended
#: in the same clock tick and are read a moment later.
MISSED_SETTLE = 0.5

#: Channel variables the tracker reads (the freeswitch_conf tests check each is set
#: by FreeSWITCH itself or by the shipped dialplan / click-to-call originate).
VARIABLES_READ = (
    "dialed_user", "user_name", "originator", "originated_legs", "billsec",
    "answer_epoch", "bridge_epoch", "progress_epoch", "progress_media_epoch",
    "last_bridge_to", "bridge_uuid",
    "cc_member_session_uuid", "loopback_leg", "other_loopback_leg_uuid",
    "other_loopback_from_uuid", "loopback_from_uuid", "hangup_cause",
    "dialed_domain", "domain_name", "presence_id",
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
    #: Directory domains whose agents are ours (lowercase); empty: every domain.
    domains: tuple[str, ...] = ()


@dataclass
class _Recording:
    started_at: float | None = None
    stopped_at: float | None = None


@dataclass
class _Leg:
    uuid: str
    seen_at: float  #: FreeSWITCH time of its latest event
    touched_at: float = 0.0  #: connector time of its latest event (forgetting)
    direction: str = ""
    extension: str | None = None
    originator: str | None = None
    caller_number: str = ""
    orig_caller_number: str = ""
    destination: str = ""
    cc360_direction: str = ""
    cc360_client: str = ""
    #: ``a`` / ``b`` for a half of a mod_loopback pair, ``""`` for any other leg.
    loopback: str = ""
    loopback_peer: str | None = None  #: the other half (``other_loopback_leg_uuid``)
    loopback_from: str | None = None  #: the leg the ``-a`` half was placed from
    progress_at: float | None = None
    answered_at: float | None = None
    bridged_at: float | None = None
    ended_at: float | None = None
    complete: bool = False
    hangup_cause: str = ""
    domain: str = ""  #: directory domain (rule 15), as its hangup names it
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
    #: Classified while the leg it hangs on was still unknown (a restart, a backfill):
    #: classified again when that leg is heard of, or taken as it is after a while.
    waits_for: str | None = None
    rang_at: float | None = None
    ringing_sent: bool = False
    answer_sent: bool = False
    hangup_sent: bool = False
    taken_at: float | None = None  #: when it took the call over (pickup)
    taken_from: str | None = None  #: the leg it was bridged to then
    summary_due_at: float | None = None  # deadline once the agent leg completed
    done: bool = False

    @property
    def user(self) -> str:
        return self.leg.extension or ""


class CallTracker:
    """Feeds on channel events, returns the CC360 events they imply.

    ``feed(event, now)`` and ``tick(now)`` are the whole interface; ``now`` (epoch
    seconds, the connector's clock) only drives the bounded waits and forgetting, so
    tests pin it, and FreeSWITCH's clock may differ from it. The tracker keeps state for
    calls in progress and forgets each call shortly after its end.
    """

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        self._pattern = re.compile(self.config.extension_pattern)
        self._legs: dict[str, _Leg] = {}
        self._parts: dict[str, _Part] = {}
        self._groups: dict[str, list[_Part]] = {}  # caller leg -> its incoming parts
        self._groups_done: set[str] = set()
        #: caller legs over whose missed-call decision waits for related legs (deadline)
        self._groups_due: dict[str, float] = {}
        self._due: dict[str, _Part] = {}  # summaries waiting for related legs
        self._dependents: dict[str, dict[str, None]] = {}  # leg -> parts waiting on it
        #: leg not heard of yet -> agent legs classified without it
        self._unclassified: dict[str, dict[str, None]] = {}
        #: leg not heard of yet -> (agent leg, its peer, time) of bridges with it, to
        #: judge once it is
        self._joins: dict[str, list[tuple[str, str, float]]] = {}
        self._order = 0

    # -- public interface ---------------------------------------------------------

    def feed(self, event: ChannelEvent, now: float | None = None) -> list[CrmEvent]:
        """Apply one event; return the CC360 events it completes, in order."""
        at = event.timestamp
        now = at if now is None else now
        uuid = event.uuid
        if not uuid or event.name == "BACKGROUND_JOB":
            return []
        handler = _HANDLERS.get(event.name)
        if handler is None:
            return []
        out: list[CrmEvent] = []
        leg = self._update_leg(event, at, now, out)
        handler(self, leg, event, at, now, out)
        return out

    def tick(self, now: float) -> list[CrmEvent]:
        """Release summaries and decisions whose wait is over; forget finished calls."""
        out: list[CrmEvent] = []
        for part in [p for p in self._parts.values() if p.waits_for and p.leg.complete]:
            if part.summary_due_at is not None and now >= part.summary_due_at:
                self._settle_unclassified(part, now, out)
        for part in list(self._due.values()):
            if part.summary_due_at is not None and now >= part.summary_due_at:
                self._emit_summary(part, out)
        for group, due in list(self._groups_due.items()):
            if now >= due:
                self._decide_missed(group, now, out, force=True)
        self._forget(now, out)
        return out

    def flush(self) -> list[CrmEvent]:
        """Emit every summary still waiting (used at shutdown: better early than lost)."""
        out: list[CrmEvent] = []
        for part in [p for p in self._parts.values() if p.waits_for and p.leg.complete]:
            self._settle_unclassified(part, 0.0, out)
        for group in list(self._groups_due):
            self._decide_missed(group, 0.0, out, force=True)
        for part in list(self._due.values()):
            self._emit_summary(part, out)
        return out

    def knows(self, uuid: str) -> bool:
        """Whether events of this leg itself were heard (a resync leaves such legs be)."""
        leg = self._legs.get(uuid)
        return leg is not None and leg.profiled

    def completed(self, uuid: str) -> bool:
        """Whether this leg's CHANNEL_HANGUP_COMPLETE was heard."""
        leg = self._legs.get(uuid)
        return leg is not None and leg.complete

    def open_legs(self) -> set[str]:
        """Legs heard of that have not completed: after a gap, those FreeSWITCH no longer
        has ended while nobody listened."""
        return {uuid for uuid, leg in self._legs.items() if not leg.complete}

    @property
    def active_legs(self) -> int:
        return len(self._legs)

    @property
    def waiting(self) -> int:
        """Summaries held back, waiting for a related leg to complete, and calls whose
        missed-call decision is still to come."""
        return len(self._due) + len(self._groups_due)

    # -- legs ---------------------------------------------------------------------

    def _update_leg(self, event: ChannelEvent, at: float, now: float,
                    out: list[CrmEvent]) -> _Leg:
        uuid = event.uuid
        leg = self._legs.get(uuid)
        if leg is None:
            leg = self._legs[uuid] = _Leg(uuid=uuid, seen_at=at, first_event=event.name)
        leg.seen_at = at
        leg.touched_at = now
        get = event.get
        first = not leg.profiled
        if first:
            self._profile(leg, event)
        # What changes during a call: transfers rewrite the caller ID and destination.
        leg.caller_number = get("Caller-Caller-ID-Number") or leg.caller_number
        leg.destination = get("Caller-Destination-Number") or leg.destination
        if first and (uuid in self._unclassified or uuid in self._joins):
            self._heard_of(leg, at, now, out)
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
        # Who placed this leg: ``originator`` (bridge, originate), else the Other-Leg of
        # an ``originator`` profile, else mod_callcenter's member session: the queue
        # places agent legs itself and links them to the caller's leg only by
        # ``cc_member_session_uuid`` (q1).
        originator = event.var("originator")
        if not originator and get("Other-Type") == "originator":
            originator = get("Other-Leg-Unique-ID")
        if not originator:
            originator = event.var("cc_member_session_uuid")
        if originator and originator != leg.uuid:
            leg.originator = originator
        channel = get("Channel-Name") or ""
        if channel.startswith("loopback/"):
            side = (event.var("loopback_leg") or channel.rpartition("-")[2]).lower()
            leg.loopback = side if side in ("a", "b") else "a"
            leg.loopback_peer = event.var("other_loopback_leg_uuid") or None
            leg.loopback_from = (event.var("other_loopback_from_uuid")
                                 or event.var("loopback_from_uuid") or None)
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
        extension = self._as_extension(user)
        if extension is not None and self.config.domains and (
                _domain_of(event) not in self.config.domains):
            return None  # another tenant's agent (rule 15)
        return extension

    def _as_extension(self, user: str) -> str | None:
        mapped = self.config.extensions.get(user, user)
        # The spec: an extension is ASCII digits only (\d alone also matches other scripts).
        if mapped.isascii() and mapped.isdigit() and self._pattern.fullmatch(mapped):
            return mapped
        return None

    def _is_extension_number(self, number: str) -> bool:
        return bool(number) and self._as_extension(number) is not None

    # -- how legs link -------------------------------------------------------------

    def _across_loopback(self, leg: _Leg) -> str | None:
        """The leg on the far side of loopback half ``leg``, looking towards the caller:
        a ``-b`` half leads through its ``-a`` half to the leg that placed it (r1)."""
        if leg.loopback == "b":
            pair = self._legs.get(leg.loopback_peer) if leg.loopback_peer else None
            if pair is not None and pair.originator:
                return pair.originator
            return leg.loopback_from
        return leg.originator

    def _origin(self, leg: _Leg) -> tuple[str | None, str | None]:
        """``(origin, unknown)``: the leg that placed ``leg``, followed through loopback
        pairs (a FusionPBX ring group or a queue's ``loopback/`` contact puts a pair
        between the caller and the phone), and the first leg on that path not heard of
        yet (then the origin is only a best guess), or None."""
        uuid = leg.originator
        seen = {leg.uuid}
        while uuid and uuid not in seen:
            seen.add(uuid)
            up = self._legs.get(uuid)
            if up is None or not up.profiled:
                return uuid, uuid
            if not up.loopback:
                return uuid, None
            uuid = self._across_loopback(up)
        return uuid, None

    def _far_end(self, peer: _Leg, own: _Leg) -> _Leg:
        """``peer`` itself, or for a loopback half the leg beyond the pair (when that is
        not ``own``'s side of the call)."""
        far = peer
        seen = {own.uuid}
        while far.loopback and far.uuid not in seen:
            seen.add(far.uuid)
            beyond = self._across_loopback(far)
            nxt = self._legs.get(beyond) if beyond else None
            if nxt is None or nxt.uuid in seen:
                return peer if far.loopback else far
            far = nxt
        return far

    def _linked(self, leg: _Leg) -> list[str]:
        """Legs one step from ``leg``: bridge partners, originator, loopback pair, legs
        it originated."""
        out = list(leg.partners)
        for uuid in (leg.originator, leg.loopback_peer):
            if uuid and uuid not in out:
                out.append(uuid)
        for uuid, _ in leg.originated:
            if uuid not in out:
                out.append(uuid)
        return out

    def _closure(self, start: _Leg, linked: Callable[[_Leg], list[str]]) -> list[str]:
        """Legs linked to ``start``, passing through loopback halves (a pair joins the
        legs on either side of it: r1) but not through other legs."""
        out: list[str] = []
        seen = {start.uuid}
        frontier = [start]
        while frontier:
            leg = frontier.pop(0)
            for uuid in linked(leg):
                if uuid in seen:
                    continue
                seen.add(uuid)
                out.append(uuid)
                other = self._legs.get(uuid)
                if other is not None and other.loopback:
                    frontier.append(other)
        return out

    # -- parts --------------------------------------------------------------------

    def _part(self, leg: _Leg) -> _Part | None:
        """The agent part of ``leg``, classified on first need; None for other legs."""
        if leg.extension is None:
            return None
        part = self._parts.get(leg.uuid)
        if part is None:
            self._order += 1
            part = self._parts[leg.uuid] = _Part(leg, "", "", None, self._order)
            self._classify_part(part)
        return part

    def _classify_part(self, part: _Part) -> None:
        kind, callerid, group, unknown = self._classify(part.leg)
        part.kind, part.callerid = kind, callerid
        self._set_group(part, group)
        part.waits_for = unknown
        if unknown:
            self._unclassified.setdefault(unknown, {})[part.leg.uuid] = None

    def _set_group(self, part: _Part, group: str | None) -> None:
        if part.group and part in self._groups.get(part.group, ()):
            self._groups[part.group].remove(part)
        part.group = group
        if group:
            self._groups.setdefault(group, []).append(part)

    def _classify(self, leg: _Leg) -> tuple[str, str, str | None, str | None]:
        """``(kind, callerid, group, unknown)`` of an agent leg; ``unknown`` names the leg
        the answer hangs on when it has not been heard of yet."""
        numbers = self.config.numbers
        if leg.cc360_direction == "outgoing":
            client = leg.cc360_client or leg.caller_number
            return "outgoing", numbers.normalize(client), None, None
        if leg.direction == "outbound":
            origin_uuid, unknown = self._origin(leg)
            if origin_uuid is None:
                return "originated", "", None, None
            origin = self._legs.get(origin_uuid)
            if origin is not None and origin.profiled:
                internal = origin.extension is not None
            else:  # originator unknown (restart): judge by the number the phone shows
                internal = self._is_extension_number(leg.caller_number)
            caller = leg.caller_number
            if internal:
                return ("internal_in", self._as_extension(caller) or caller, origin_uuid,
                        unknown)
            return "incoming", numbers.normalize(caller), origin_uuid, unknown
        # A phone placed this leg: it dials an extension or a number.
        dest = leg.destination
        if self._is_extension_number(dest):
            return "internal_out", self._as_extension(dest) or dest, None, None
        phone = numbers.phone_or_none(dest)
        if phone is None:
            return "ignored", "", None, None  # feature codes (*97, **101), voicemail...
        return "outgoing", phone, None, None

    def _heard_of(self, leg: _Leg, at: float, now: float, out: list[CrmEvent]) -> None:
        """``leg``'s first own event: judge again what was decided without it."""
        for uuid in self._unclassified.pop(leg.uuid, {}):
            part = self._parts.get(uuid)
            if part is not None and part.waits_for == leg.uuid and not part.done:
                self._classify_part(part)
                if part.leg.complete and not part.waits_for:
                    self._agent_leg_done(part, part.leg.ended_at or at, now, out)
        for agent_uuid, peer_uuid, bridged_at in self._joins.pop(leg.uuid, ()):
            agent, peer = self._legs.get(agent_uuid), self._legs.get(peer_uuid)
            if agent is None or peer is None or not (agent.profiled and peer.profiled):
                continue
            part = self._part(agent)
            if part is None or (part.done and self._reported(part)):
                continue
            kind = part.kind
            self._joined(part, peer, bridged_at, out)
            if part.done and part.kind != kind and part.leg.complete:
                # ended before the bridge told what it was (a pickup's own leg, p1)
                part.done = False
                self._agent_leg_done(part, part.leg.ended_at or at, now, out)

    def _settle_unclassified(self, part: _Part, now: float, out: list[CrmEvent]) -> None:
        """The leg ``part`` hangs on never came: take the best guess as it is."""
        waits = self._unclassified.get(part.waits_for or "", {})
        waits.pop(part.leg.uuid, None)
        part.waits_for = None
        if not part.done:
            self._agent_leg_done(part, part.leg.ended_at or now, now, out)

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

    def _answer(self, part: _Part, at: float, out: list[CrmEvent], ring: bool = True) -> None:
        if ring:
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
            other = self._legs[other_uuid] = _Leg(uuid=other_uuid, seen_at=at, touched_at=now)
            other.direction = event.get("Other-Leg-Direction") or ""
            other.caller_number = event.get("Other-Leg-Caller-ID-Number") or ""
            other.orig_caller_number = event.get("Other-Leg-Orig-Caller-ID-Number") or ""
            other.destination = event.get("Other-Leg-Destination-Number") or ""
        leg.add_partner(other.uuid)
        other.add_partner(leg.uuid)
        leg.bridged_at = leg.bridged_at or at
        other.bridged_at = other.bridged_at or at
        for agent, peer in ((leg, other), (other, leg)):
            if not other.profiled:  # not heard of (restart, backfill): judge once it is
                self._joins.setdefault(other.uuid, []).append((agent.uuid, peer.uuid, at))
                continue
            part = self._part(agent)
            if part is not None:
                self._joined(part, peer, at, out)

    def _joined(self, part: _Part, peer: _Leg, at: float, out: list[CrmEvent]) -> None:
        """``part``'s agent leg is now bridged to ``peer``: pickups, transfers and API
        originates. Through a loopback pair, the leg beyond it counts."""
        far = self._far_end(peer, part.leg)
        if far.loopback:
            return  # nothing known beyond the pair
        if part.leg.direction == "inbound" and far.direction == "inbound" and (
                part.kind in ("ignored", "internal_out")):
            self._take_over(part, peer, far, at, out)
            return
        if far.extension is not None:
            return  # agent to agent: a consultation or an internal call, nothing changes
        numbers = self.config.numbers
        if part.kind == "originated" or (part.kind == "outgoing" and not part.callerid):
            self._promote_outgoing(part, far)
            self._answer(part, at, out)
        elif part.kind == "internal_in" and far.direction == "inbound":
            # Attended transfer: the consultation leg now talks to the original caller.
            part.kind = "incoming"
            part.callerid = numbers.normalize(far.orig_caller_number or far.caller_number)
            self._set_group(part, far.uuid)
            self._answer(part, at, out)
        elif part.kind == "internal_out" and far.direction == "outbound":
            part.kind = "outgoing"
            part.callerid = numbers.normalize(far.destination)
            self._answer(part, at, out)

    def _take_over(self, part: _Part, peer: _Leg, caller: _Leg, at: float,
                   out: list[CrmEvent]) -> None:
        """Pickup (p1): a phone's own leg (``**101``, ``*8``: ``intercept``) bridged to
        a caller's leg, which FreeSWITCH placed for nobody else: the agent took the call
        over. It is that agent's incoming call from the caller's original number
        (``intercept`` rewrites the caller leg's ``Caller-Caller-ID-Number`` to the
        picking phone's); its phone never rang for it, so the first popup is answer."""
        if caller.extension is not None:
            part.kind = "internal_in"
            part.callerid = caller.extension
        else:
            part.kind = "incoming"
            part.callerid = self.config.numbers.normalize(
                caller.orig_caller_number or caller.caller_number)
        self._set_group(part, caller.uuid)
        part.taken_at = at
        part.taken_from = peer.uuid
        self._answer(part, at, out, ring=False)

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
        leg.hangup_cause = event.get("Hangup-Cause") or event.var("hangup_cause") or ""
        leg.domain = _domain_of(event)
        leg.billsec = _int(event.var("billsec"))
        answered_epoch = _int(event.var("answer_epoch"))
        if leg.answered_at is None and answered_epoch:
            leg.answered_at = float(answered_epoch)
        if leg.progress_at is None:
            progress_us = _int(event.var("progress_uepoch")) or _int(
                event.var("progress_media_uepoch"))
            progress_epoch = _int(event.var("progress_epoch")) or _int(
                event.var("progress_media_epoch"))
            if progress_us:
                leg.progress_at = progress_us / 1_000_000
            elif progress_epoch:
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
        if part is not None and not part.waits_for:
            self._agent_leg_done(part, at, now, out)
        elif part is not None:
            part.summary_due_at = now + self.config.summary_wait  # for the guess
            self._hangup_popup(part, at, out)
        for waiting in self._dependents.pop(leg.uuid, ()):
            waiting_part = self._due.get(waiting)
            if waiting_part is not None and self._ready(waiting_part):
                self._emit_summary(waiting_part, out)
        if part is not None and part.group:
            self._decide_missed(part.group, now, out)
        self._decide_missed(leg.uuid, now, out)
        for group in list(self._groups_due):
            self._decide_missed(group, now, out)

    def _hangup_popup(self, part: _Part, at: float, out: list[CrmEvent]) -> None:
        """Close the agent's popup: every part that got ringing or answer gets hangup."""
        restarted = part.leg.first_event == "CHANNEL_HANGUP_COMPLETE"
        if self._realtime(part) and not part.hangup_sent:
            if part.ringing_sent or part.answer_sent or (
                restarted and (part.leg.answered_at or part.leg.progress_at)
            ):
                part.hangup_sent = True
                self._send(part, "hangup", at, out)

    def _agent_leg_done(self, part: _Part, at: float, now: float, out: list[CrmEvent]) -> None:
        if part.kind == "originated":
            self._settle_originated(part)
        self._hangup_popup(part, at, out)
        if not self._reported(part):
            part.done = True
            return
        if part.kind in ("outgoing", "internal_out") or part.leg.answered_at:
            self._wait_for_summary(part, now, out)
        elif part.group in self._groups_done:
            part.done = True  # its call was decided without it (forced after a wait)
        elif part.group:  # unanswered: the missed-call decision of its call
            self._decide_missed(part.group, now, out)

    # -- summaries -----------------------------------------------------------------

    def _settle_originated(self, part: _Part) -> None:
        """An API-originated agent leg ended before we saw it bridged (restart): it was an
        outgoing call if it was bridged to a leg that is not an agent's, or, failing
        that knowledge, if it was bridged while its destination was a phone number."""
        for uuid in part.leg.partners:
            peer = self._legs.get(uuid)
            if peer is not None and peer.profiled and peer.extension is None:
                self._promote_outgoing(part, peer)
                return
        leg = part.leg
        if leg.bridged_at and self.config.numbers.phone_or_none(leg.destination):
            self._promote_outgoing(part, leg)

    def _related(self, part: _Part) -> list[str]:
        """The legs whose end (and recordings) an agent's summary waits for: its bridge
        partners and originator, and through loopback pairs the legs beyond them."""
        return self._closure(part.leg, _bridged_or_placed)

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
            duration = self._talk_seconds(part)
        else:
            duration = self._client_seconds(part)
        files = self._files(part) if leg.answered_at else ()  # nobody talked: nothing to hear
        out.append(CrmEvent(
            "summary", leg.uuid, part.user, part.callerid, leg.ended_at or leg.seen_at,
            direction=direction, duration=duration, files=files,
        ))

    def _talk_seconds(self, part: _Part) -> int:
        leg = part.leg
        if part.taken_at is not None:  # a pickup: from the takeover to either side's end
            end = leg.ended_at
            peer = self._legs.get(part.taken_from or "")
            if peer is not None and peer.ended_at is not None:
                end = peer.ended_at if end is None else min(end, peer.ended_at)
            return max(0, round(end - part.taken_at)) if end is not None else 0
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
            if other is None or other.loopback or (
                    other.extension is not None and part.kind == "outgoing"):
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

    def _decide_missed(self, group: str, now: float, out: list[CrmEvent],
                       force: bool = False) -> None:
        """Once a call (the caller's leg ``group``) is over, and every leg linked to it
        too (or ``summary_wait`` has passed): if nobody answered, pick the parts that
        get a missed-call summary.

        Waiting for the linked legs makes the answer independent of the order in which
        legs that end together are read: the picking phone's leg (p1) or a loopback
        pair's far side (r1) may come after the caller's leg.
        """
        if group in self._groups_done:
            self._groups_due.pop(group, None)
            return
        caller = self._legs.get(group)
        if caller is None or not caller.complete:
            return
        parts = [p for p in self._groups.get(group, ()) if p.kind in ("incoming", "internal_in")]
        taken = any(p.leg.answered_at or p.leg.hangup_cause == "PICKED_OFF" for p in parts)
        if not force:
            derive = not parts and caller.originated and not any(
                uuid in self._parts for uuid, _ in caller.originated)
            if not parts and not derive:
                return  # nothing to decide (yet: a part may still join)
            pending = any(not p.leg.complete or p.waits_for for p in parts) or any(
                not (self._legs.get(uuid) and self._legs[uuid].complete)
                for uuid in self._closure(caller, self._linked))
            if pending or derive:
                self._groups_due.setdefault(group, now + self.config.summary_wait)
                return
            if not taken:
                # A missed call: first let the legs that ended in the same tick come in
                # (a queue's caller names none of its agent legs, q1).
                due = self._groups_due.get(group)
                self._groups_due[group] = min(due, now + MISSED_SETTLE) if due else (
                    now + MISSED_SETTLE)
                return
        self._groups_due.pop(group, None)
        if not parts:
            self._derive_missed_from_caller(caller, out)
            return
        self._groups_done.add(group)
        done = [p for p in parts if p.leg.complete]
        unanswered = [p for p in done if not p.leg.answered_at]
        # intercept ends the picked-off leg PICKED_OFF: somebody took the call (p1)
        if not taken:
            for p in self._missed_parts(parts):
                self._emit_summary(p, out)
        for p in unanswered:
            p.done = True

    def _missed_parts(self, parts: list[_Part]) -> list[_Part]:
        mode = self.config.missed_calls
        if mode == "none":
            return []
        reported = [p for p in parts if self._reported(p) and p.leg.complete]
        rang = sorted((p for p in reported if _rang_at(p) is not None),
                      key=lambda p: (_rang_at(p), p.order))
        chosen = rang or sorted(reported, key=_tried_order)
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
        if self.config.domains and leg.domain not in self.config.domains:
            return  # it dialled another tenant's users (rule 15)
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
            idle = now - leg.touched_at
            part = self._parts.get(uuid)
            finished = leg.complete and (part is None or part.done) and (
                uuid not in self._groups_due)
            if (finished and idle > grace) or idle > stale:
                if part is not None and not part.done:
                    if part.summary_due_at is not None:
                        self._emit_summary(part, out)
                    log.warning("calls.forgotten leg=%s user=%s: no HANGUP_COMPLETE seen",
                                uuid, part.user)
                self._legs.pop(uuid, None)
                self._dependents.pop(uuid, None)
                self._unclassified.pop(uuid, None)
                self._joins.pop(uuid, None)
                self._groups.pop(uuid, None)
                self._groups_done.discard(uuid)
                self._groups_due.pop(uuid, None)
                if part is not None:
                    self._parts.pop(uuid, None)
                    self._due.pop(uuid, None)
                    if part.group in self._groups and part in self._groups[part.group]:
                        self._groups[part.group].remove(part)


def _bridged_or_placed(leg: _Leg) -> list[str]:
    """Bridge partners, originator and loopback pair: the legs a summary waits for."""
    out = list(leg.partners)
    for uuid in (leg.originator, leg.loopback_peer):
        if uuid and uuid not in out:
            out.append(uuid)
    return out


def _tried_order(part: _Part) -> int:
    return part.order


def _rang_at(part: _Part) -> float | None:
    """When the agent's phone began to ring: its first progress event, or for a leg
    first heard of at its end (restart, backfill) its ``progress_uepoch``."""
    return part.rang_at if part.rang_at is not None else part.leg.progress_at


_HANDLERS = {
    "CHANNEL_CREATE": CallTracker._on_create,
    # uuid_dump's event (fs_cc360.resync): a channel first heard of in the middle of it
    "CHANNEL_DATA": CallTracker._on_create,
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
#: CHANNEL_DATA is not one: the connector builds it from ``uuid_dump`` after a gap.
TRACKED_EVENTS = tuple(name for name in _HANDLERS if name != "CHANNEL_DATA")




def _domain_of(event: ChannelEvent) -> str:
    """The directory domain of an agent leg: ``dialed_domain`` on a leg the ``user/``
    endpoint placed, ``domain_name`` on one an authenticated phone placed (sofia sets it
    from the directory), else the domain of ``presence_id`` (``101@domain``)."""
    domain = event.var("dialed_domain") or event.var("domain_name") or (
        (event.var("presence_id") or "").rpartition("@")[2])
    return domain.strip().lower()


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
