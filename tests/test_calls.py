"""The call mapping rules, checked against every real FreeSWITCH capture (no I/O).

The expected CC360 events below were written down by reading each capture
(tests/captures/<scenario>.esl): which leg is the agent's, when it rang, answered and
hung up, its billsec, and which leg recorded what.
"""

from __future__ import annotations

import dataclasses

import pytest

from fs_cc360.calls import CallTracker, CrmEvent, TrackerConfig
from fs_cc360.events import parse_event
from fs_cc360.numbers import NumberRules
from tests.fakes.captures import SCENARIOS, capture_frames, interleave, remap

REC = "/var/lib/freeswitch/recordings/"
CALLER = "79991234567"

# (kind, id prefix, user, callerid, direction, duration, recording file prefixes)
EXPECTED: dict[str, list[tuple]] = {
    # 5000 -> 101: agent leg 0ed29c14 rings, answers after ~2 s, billsec 3; the caller
    # leg dda67ca4 recorded the call and its RECORD_STOP comes after 101's hangup.
    "a_inbound_answered_caller_hangup": [
        ("ringing", "0ed29c14", "101", CALLER, None, None, ()),
        ("answer", "0ed29c14", "101", CALLER, None, None, ()),
        ("hangup", "0ed29c14", "101", CALLER, None, None, ()),
        ("summary", "0ed29c14", "101", CALLER, "incoming", 3, ("dda67ca4",)),
    ],
    # 101 rings, the caller gives up (ORIGINATOR_CANCEL): popup closed, missed call.
    "b_inbound_not_answered_caller_cancel": [
        ("ringing", "0bc8335b", "101", CALLER, None, None, ()),
        ("hangup", "0bc8335b", "101", CALLER, None, None, ()),
        ("summary", "0bc8335b", "101", CALLER, "incoming", 0, ()),
    ],
    # originate user/101 ... XML default (no cc360 tags): 101's own phone ringing is not
    # an incoming call; bridged to the carrier leg 91095c72 (billsec 3): outgoing.
    "c_click_to_call_101_to_external": [
        ("summary", "48154cd9", "101", CALLER, "outgoing", 3, ("48154cd9",)),
    ],
    # 101 answers 486 Busy: never rang, so no popup; missed call for the agent tried.
    "d2_busy_user": [
        ("summary", "48029f2b", "101", CALLER, "incoming", 0, ()),
    ],
    # 102 -> 101: internal, skipped by default.
    "g_internal_102_to_101_answered": [],
    # 5010 rings 101 and 102; 102 answers (billsec 3), 101 is cancelled (LOSE_RACE).
    "h_ring_group_102_answers": [
        ("ringing", "7ac615b7", "101", CALLER, None, None, ()),
        ("ringing", "4842ba4e", "102", CALLER, None, None, ()),
        ("answer", "4842ba4e", "102", CALLER, None, None, ()),
        ("hangup", "7ac615b7", "101", CALLER, None, None, ()),
        ("hangup", "4842ba4e", "102", CALLER, None, None, ()),
        ("summary", "4842ba4e", "102", CALLER, "incoming", 3, ("c98d065f",)),
    ],
    # 101 dials 79991234567; the carrier answers after ~1 s, billsec 3 on its leg.
    "j_outgoing_from_101": [
        ("summary", "b4979ba4", "101", CALLER, "outgoing", 3, ("b4979ba4",)),
    ],
    # 101 answers (billsec 2), uuid_transfer to 102, 102 answers (billsec 2).
    "l_blind_transfer_101_to_102": [
        ("ringing", "98bb708a", "101", CALLER, None, None, ()),
        ("answer", "98bb708a", "101", CALLER, None, None, ()),
        ("hangup", "98bb708a", "101", CALLER, None, None, ()),
        ("ringing", "d3c26172", "102", CALLER, None, None, ()),
        ("answer", "d3c26172", "102", CALLER, None, None, ()),
        ("hangup", "d3c26172", "102", CALLER, None, None, ()),
        ("summary", "98bb708a", "101", CALLER, "incoming", 2, ("4ddb0120",)),
        ("summary", "d3c26172", "102", CALLER, "incoming", 2, ("4ddb0120",)),
    ],
    # 101 answers (billsec 6), consults 102 (internal: no popup with callerid 101), hangs
    # up; the caller is joined to 102 (its Caller-Caller-ID-Number now reads 102, the
    # original number survives in Caller-Orig-Caller-ID-Number): 102 gets its popup
    # then, and a summary of its own leg (billsec 4).
    "m_attended_transfer": [
        ("ringing", "639babb0", "101", CALLER, None, None, ()),
        ("answer", "639babb0", "101", CALLER, None, None, ()),
        ("hangup", "639babb0", "101", CALLER, None, None, ()),
        ("ringing", "0b140142", "102", CALLER, None, None, ()),
        ("answer", "0b140142", "102", CALLER, None, None, ()),
        ("hangup", "0b140142", "102", CALLER, None, None, ()),
        ("summary", "0b140142", "102", CALLER, "incoming", 4, ("dc6bd1ac",)),
        ("summary", "639babb0", "101", CALLER, "incoming", 6, ("dc6bd1ac",)),
    ],
    # Queue (mod_callcenter, top-down): the queue answers the caller leg 73a8880a itself
    # and places each agent leg with only cc_member_session_uuid=73a8880a as a link.
    # 101 (2d29a888) rings ~3 s, NO_ANSWER: popup opened and closed, no missed call
    # (the call was answered). 102 (63a15826) rings, answers, billsec 3 (its talk time,
    # not the caller's 9 s in the queue); the caller leg's recording.
    "q1_queue_first_agent_no_answer": [
        ("ringing", "2d29a888", "101", CALLER, None, None, ()),
        ("hangup", "2d29a888", "101", CALLER, None, None, ()),
        ("ringing", "63a15826", "102", CALLER, None, None, ()),
        ("answer", "63a15826", "102", CALLER, None, None, ()),
        ("hangup", "63a15826", "102", CALLER, None, None, ()),
        ("summary", "63a15826", "102", CALLER, "incoming", 3, ("73a8880a",)),
    ],
    # Pickup: 101's leg 93cb3fa8 rings, ends PICKED_OFF (no missed call); 102's own leg
    # 003cfad6 (dialled **101) is bridged by intercept to the caller leg 41d28e69: its
    # incoming call from the caller's original number, answer without ringing (its phone
    # never rang), talk time = bridged to the caller 2.41 s -> 5.39 s (its leg lives
    # 2 s longer: sleep 2000), the caller leg's recording.
    "p1_call_pickup_102_intercepts_101": [
        ("ringing", "93cb3fa8", "101", CALLER, None, None, ()),
        ("hangup", "93cb3fa8", "101", CALLER, None, None, ()),
        ("answer", "003cfad6", "102", CALLER, None, None, ()),
        ("hangup", "003cfad6", "102", CALLER, None, None, ()),
        ("summary", "003cfad6", "102", CALLER, "incoming", 3, ("41d28e69",)),
    ],
    # Ring group over loopback/101 and loopback/102: the phone legs 280fbd7a (101) and
    # ed608011 (102) point at their loopback-b legs; through each pair they belong to
    # the caller leg 95023bdd. 102 answers (billsec 3): the recordings of its loopback-b
    # leg 3df6e2bb and of the caller leg, released as soon as the last leg ends.
    "r1_loopback_ring_group_102_answers": [
        ("ringing", "ed608011", "102", CALLER, None, None, ()),
        ("ringing", "280fbd7a", "101", CALLER, None, None, ()),
        ("answer", "ed608011", "102", CALLER, None, None, ()),
        ("hangup", "280fbd7a", "101", CALLER, None, None, ()),
        ("hangup", "ed608011", "102", CALLER, None, None, ()),
        ("summary", "ed608011", "102", CALLER, "incoming", 3, ("3df6e2bb", "95023bdd")),
    ],
    # Stock FreeSWITCH with freeswitch_conf/ applied (users 1000-1019, recordings in day
    # folders). DID 5551212 -> 1000 (d375affc), answered, billsec 3; the carrier's leg
    # 04c24ef1 recorded the call.
    "stock_inbound_answered": [
        ("ringing", "d375affc", "1000", CALLER, None, None, ()),
        ("answer", "d375affc", "1000", CALLER, None, None, ()),
        ("hangup", "d375affc", "1000", CALLER, None, None, ()),
        ("summary", "d375affc", "1000", CALLER, "incoming", 3, ("04c24ef1",)),
    ],
    "stock_inbound_not_answered": [
        ("ringing", "eee15a44", "1000", CALLER, None, None, ()),
        ("hangup", "eee15a44", "1000", CALLER, None, None, ()),
        ("summary", "eee15a44", "1000", CALLER, "incoming", 0, ()),
    ],
    # 1001 -> 1000: internal, skipped by default.
    "stock_internal_1001_to_1000": [],
    # makecall 1000 -> 79991234567 (legs tagged by fs-cc360's originate template).
    "stock_click_to_call_via_makecall": [
        ("summary", "60c95e56", "1000", CALLER, "outgoing", 3, ("60c95e56",)),
    ],
    "stock_outgoing_from_1000": [
        ("summary", "b561066b", "1000", CALLER, "outgoing", 3, ("b561066b",)),
    ],
}


def run(frames: list[bytes], config: TrackerConfig | None = None,
        settle: bool = True) -> list[CrmEvent]:
    tracker = CallTracker(config)
    out: list[CrmEvent] = []
    last = 0.0
    for body in frames:
        event = parse_event(body)
        out += tracker.feed(event)
        last = max(last, float(event.get("Event-Date-Timestamp") or 0) / 1e6)
    if settle:
        out += tracker.tick(last + 3600)
        assert tracker.active_legs == 0, "a finished call must be forgotten"
    return out


def simplify(events: list[CrmEvent]) -> list[tuple]:
    return [
        (e.kind, e.call_id[:8], e.user, e.callerid, e.direction, e.duration,
         tuple(f.rpartition("/")[2][:8] for f in e.files))
        for e in events
    ]


def by_call(events: list[tuple]) -> dict[str, list[tuple]]:
    calls: dict[str, list[tuple]] = {}
    for e in events:
        calls.setdefault(e[1], []).append(e)
    return calls


def test_every_capture_has_an_expectation() -> None:
    assert sorted(EXPECTED) == SCENARIOS


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_capture_maps_to_expected_cc360_events(scenario: str) -> None:
    events = run(capture_frames(scenario))
    assert simplify(events) == EXPECTED[scenario]
    for e in events:
        assert len(e.call_id) == 36  # the agent leg's full Unique-ID
        if e.kind == "summary":
            assert all(f.startswith(REC) and f.endswith(".wav") for f in e.files)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_replaying_the_same_events_gives_the_same_ids(scenario: str) -> None:
    frames = capture_frames(scenario)
    assert run(frames) == run(frames)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rules_generalise_to_other_calls_interleaved_on_one_connection(seed: int) -> None:
    """Every capture with fresh UUIDs and another caller number, all interleaved."""
    calls = []
    expected: list[tuple] = []
    for n, scenario in enumerate(SCENARIOS):
        number = b"7812%07d" % (seed * 100 + n)
        frames = capture_frames(scenario)
        copy = remap(frames, seed * 1000 + n, replace={CALLER.encode(): number})
        calls.append(copy)
        # map the expected ids through the same UUID remapping
        ids = {}
        for old, new in zip(frames, copy, strict=True):
            ids.update(_uuid_pairs(old, new))
        for e in EXPECTED[scenario]:
            full_old = next(u for u in ids if u.startswith(e[1]))
            callerid = number.decode() if e[3] == CALLER else e[3]
            files = tuple(ids[next(u for u in ids if u.startswith(f))][:8] for f in e[6])
            expected.append((e[0], ids[full_old][:8], e[2], callerid, e[4], e[5], files))
    got = simplify(run(interleave(calls, seed)))
    assert sorted(got) == sorted(expected)
    # per-call order is what CC360 sees: it must match exactly
    assert by_call(got) == by_call(expected)


def _uuid_pairs(old: bytes, new: bytes) -> dict[str, str]:
    import re

    pattern = rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    return {a.decode(): b.decode()
            for a, b in zip(re.findall(pattern, old), re.findall(pattern, new), strict=True)}


def test_internal_calls_reported_when_asked() -> None:
    events = simplify(run(capture_frames("g_internal_102_to_101_answered"),
                          TrackerConfig(internal_calls="report")))
    assert ("ringing", "017fbd9d", "101", "102", None, None, ()) in events
    assert ("summary", "017fbd9d", "101", "102", "incoming", 3, ("bc66ea2a",)) in events
    assert ("summary", "bc66ea2a", "102", "101", "outgoing", 3, ("bc66ea2a",)) in events
    # the caller's own phone does not "ring" for itself while outgoing realtime is off
    assert not [e for e in events if e[1] == "bc66ea2a" and e[0] != "summary"]


@pytest.mark.parametrize("scenario,agent_leg", [
    ("c_click_to_call_101_to_external", "48154cd9"),
    ("j_outgoing_from_101", "b4979ba4"),
])
def test_outgoing_realtime_follows_the_client_leg(scenario: str, agent_leg: str) -> None:
    events = run(capture_frames(scenario), TrackerConfig(outgoing_realtime=True))
    kinds = [(e.kind, e.call_id[:8], e.callerid) for e in events]
    assert kinds == [("ringing", agent_leg, CALLER), ("answer", agent_leg, CALLER),
                     ("hangup", agent_leg, CALLER), ("summary", agent_leg, CALLER)]
    ringing, answer = events[0], events[1]
    assert ringing.at < answer.at  # rings when the carrier leg progresses, not at bridge


def test_click_to_call_tagged_by_us_is_outgoing_even_before_the_bridge() -> None:
    frames = [b.replace(b"\nvariable_dialed_user: 101\n",
                        b"\nvariable_dialed_user: 101\nvariable_cc360_direction: outgoing\n"
                        b"variable_cc360_client: 79991234567\n")
              for b in capture_frames("c_click_to_call_101_to_external")]
    events = simplify(run(frames, TrackerConfig(outgoing_realtime=True)))
    assert [e[0] for e in events] == ["ringing", "answer", "hangup", "summary"]
    assert events[-1] == ("summary", "48154cd9", "101", CALLER, "outgoing", 3, ("48154cd9",))


@pytest.mark.parametrize("mode,expected", [
    ("none", []),
    ("first", [("summary", "0bc8335b", "101", CALLER, "incoming", 0, ())]),
    ("all", [("summary", "0bc8335b", "101", CALLER, "incoming", 0, ())]),
])
def test_missed_calls_modes(mode: str, expected: list[tuple]) -> None:
    events = simplify(run(capture_frames("b_inbound_not_answered_caller_cancel"),
                          TrackerConfig(missed_calls=mode)))
    assert [e for e in events if e[0] == "summary"] == expected


def _ring_group_nobody_answers() -> list[bytes]:
    """h with 102's answer removed: both phones ring, the caller gives up."""
    out = []
    for body in capture_frames("h_ring_group_102_answers"):
        event = parse_event(body)
        if event.name in ("CHANNEL_ANSWER", "CHANNEL_BRIDGE", "CHANNEL_UNBRIDGE"):
            continue
        out.append(body.replace(b"\nvariable_answer_epoch: 1795762324\n",
                                b"\nvariable_answer_epoch: 0\n")
                       .replace(b"\nvariable_billsec: 3\n", b"\nvariable_billsec: 0\n"))
    return out


def test_missed_ring_group_first_vs_all() -> None:
    first = simplify(run(_ring_group_nobody_answers(), TrackerConfig(missed_calls="first")))
    summaries = [e for e in first if e[0] == "summary"]
    assert summaries == [("summary", "7ac615b7", "101", CALLER, "incoming", 0, ())]
    both = simplify(run(_ring_group_nobody_answers(), TrackerConfig(missed_calls="all")))
    assert {e[2] for e in both if e[0] == "summary"} == {"101", "102"}
    # every agent whose phone rang gets its popup closed
    assert {e[2] for e in first if e[0] == "hangup"} == {"101", "102"}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_restart_mid_call_still_sends_hangup_and_summary(scenario: str) -> None:
    """The connector starts listening just before the first leg completes."""
    frames = capture_frames(scenario)
    first_done = next(i for i, b in enumerate(frames)
                      if parse_event(b).name == "CHANNEL_HANGUP_COMPLETE")
    full = simplify(run(frames))
    late = simplify(run(frames[first_done:]))
    assert [e for e in late if e[0] == "summary"] == [e for e in full if e[0] == "summary"]
    # every popup that was open (or opened after the restart) is closed
    full_hangups = {e[1] for e in full if e[0] == "hangup"}
    assert {e[1] for e in late if e[0] == "hangup"} == full_hangups


def test_missed_call_derived_from_caller_leg_alone() -> None:
    """Only the caller leg's completion is seen: originated_legs names the agent tried."""
    frames = [b for b in capture_frames("b_inbound_not_answered_caller_cancel")
              if b"\nUnique-ID: 85a07dca" in b and b"CHANNEL_HANGUP_COMPLETE" in b[:40]]
    assert len(frames) == 1
    events = simplify(run(frames))
    assert events == [("summary", "0bc8335b", "101", CALLER, "incoming", 0, ())]


def test_summary_waits_for_the_caller_legs_recording_then_gives_up() -> None:
    """a: 101's leg completes before the caller leg's RECORD_STOP. Without the caller
    leg's completion the summary is held for summary_wait, then sent with the link
    known from RECORD_START."""
    frames = [b for b in capture_frames("a_inbound_answered_caller_hangup")
              if not (b"\nUnique-ID: dda67ca4" in b and (
                  b"CHANNEL_HANGUP_COMPLETE" in b[:40] or b"RECORD_STOP" in b[:40]))]
    tracker = CallTracker(TrackerConfig(summary_wait=10))
    out: list[CrmEvent] = []
    for body in frames:
        out += tracker.feed(parse_event(body))
    assert [e.kind for e in out] == ["ringing", "answer", "hangup"]
    hangup_at = out[-1].at
    assert tracker.tick(hangup_at + 9) == []
    late = tracker.tick(hangup_at + 10)
    assert simplify(late) == [("summary", "0ed29c14", "101", CALLER, "incoming", 3,
                               ("dda67ca4",))]


def test_extension_map_for_non_digit_sip_users() -> None:
    frames = [b.replace(b"variable_dialed_user: 101", b"variable_dialed_user: ali")
               .replace(b"Caller-Destination-Number: 101", b"Caller-Destination-Number: ali")
              for b in capture_frames("a_inbound_answered_caller_hangup")]
    assert run(frames) == []  # "ali" is not an extension: not an agent leg
    mapped = simplify(run(frames, TrackerConfig(extensions={"ali": "101"})))
    assert mapped == EXPECTED["a_inbound_answered_caller_hangup"]


def test_callerid_normalisation_rules() -> None:
    frames = [b.replace(b"79991234567", b"89991234567")
              for b in capture_frames("a_inbound_answered_caller_hangup")]
    assert {e.callerid for e in run(frames)} == {"89991234567"}
    rules = NumberRules(national_prefix="8:7")
    assert {e.callerid for e in run(frames, TrackerConfig(numbers=rules))} == {CALLER}
    e164 = NumberRules(mode="e164", default_region="RU")
    assert {e.callerid for e in run(frames, TrackerConfig(numbers=e164))} == {CALLER}


def test_anonymous_caller_passes_through() -> None:
    frames = [b.replace(b"Caller-Caller-ID-Number: 79991234567",
                        b"Caller-Caller-ID-Number: anonymous")
              for b in capture_frames("a_inbound_answered_caller_hangup")]
    assert {e.callerid for e in run(frames)} == {"anonymous"}


def test_trunk_tag_and_public_context_are_never_agents() -> None:
    """A carrier calling from a short number is not PBX user 5555."""
    frames = [b.replace(b"Caller-Username: 79991234567", b"Caller-Username: 5555")
              for b in capture_frames("a_inbound_answered_caller_hangup")]
    events = run(frames)
    assert {e.user for e in events} == {"101"}


def test_events_without_a_uuid_and_unknown_events_are_ignored() -> None:
    tracker = CallTracker()
    assert tracker.feed(parse_event(b"Event-Name: HEARTBEAT\nCore-UUID: x\n\n")) == []
    job = b"Event-Name: BACKGROUND_JOB\nJob-UUID: 1\nContent-Length: 4\n\n+OK\n"
    assert tracker.feed(parse_event(job)) == []


def test_crm_event_is_immutable() -> None:
    event = run(capture_frames("a_inbound_answered_caller_hangup"))[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.user = "102"  # type: ignore[misc]


def test_loopback_ring_group_summary_needs_no_wait() -> None:
    """r1: the summary goes out with the last leg's HANGUP_COMPLETE (the loopback pair is
    followed, so every related leg is known to be over), never by the summary_wait
    timer; both loopback halves stay out of the popups."""
    tracker = CallTracker(TrackerConfig(summary_wait=3600))
    out: list[CrmEvent] = []
    for body in capture_frames("r1_loopback_ring_group_102_answers"):
        event = parse_event(body)
        out += tracker.feed(event)
    out += tracker.tick(event.timestamp + 1)  # the missed-call settle, not summary_wait
    assert tracker.waiting == 0
    assert [e.kind for e in out if e.kind == "summary"] == ["summary"]
    assert {e.user for e in out} == {"101", "102"}

