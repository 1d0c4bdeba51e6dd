"""Live-call resync (fs_cc360.resync): a connector that starts listening in the middle of
calls asks FreeSWITCH what is up and seeds its tracker.

FreeSWITCH's answers are those of the simulated switch (fs_cc360.simulators.switch),
which rebuilds each channel from the real captures' events as FreeSWITCH holds it: the
latest full event's headers and variables. For every capture and every moment in it, a
tracker seeded at that moment and fed the rest of the call must send the summaries of a
tracker that heard everything, open a popup for every agent phone ringing then, and close
every popup it opened.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fs_cc360 import backfill as bf
from fs_cc360 import resync
from fs_cc360.calls import CallTracker, CrmEvent, TrackerConfig
from fs_cc360.events import parse_event
from fs_cc360.simulators.switch import SwitchState
from tests.fakes.captures import SCENARIOS, capture_frames
from tests.test_calls import simplify


def gap_run(frames: list[bytes], cut: int, tmp: Path, heard_until: int = 0,
            config: TrackerConfig | None = None) -> tuple[list[CrmEvent], set[str]]:
    """The connector heard ``frames[:heard_until]``, then nothing until ``cut`` (a gap:
    start-up when ``heard_until`` is 0), then resynchronised and caught up as the service
    does, and heard the rest. Returns the CC360 events (caught-up summaries after the live
    ones, a second summary of a call dropped as the outbox drops it) and the channels up
    at the cut."""
    cdr_dir = tmp / f"cdr-{heard_until}-{cut}"
    cdr_dir.mkdir()
    switch = SwitchState(cdr_dir)
    tracker = CallTracker(config)
    out: list[CrmEvent] = []
    for n, body in enumerate(frames[:cut]):
        switch.apply(body)
        if n < heard_until:
            out += tracker.feed(parse_event(body))
    uuids = resync.channel_uuids(switch.show_channels_json())
    dumps = [d for d in (resync.dump_headers(switch.uuid_dump_json(u)) for u in uuids) if d]
    cdrs = [bf.read_cdr(p) for p in sorted(cdr_dir.glob("*.json"))]
    plan = resync.plan_gap(dumps, cdrs, open_legs=tracker.open_legs(), knows=tracker.knows,
                           now_us=max(int(d["Event-Date-Timestamp"]) for d in dumps)
                           if dumps else 0)
    for call in plan.live:  # as the service feeds them
        for event in call.history(plan.now_us):  # the past: close popups, summaries
            out += [e for e in tracker.feed(event) if e.kind in ("hangup", "summary")]
        for event in call.present(tracker.knows):
            out += tracker.feed(event)
    caught_up = [e for call in plan.catch_up for e in bf.summaries_from_legs(call, config)]
    last = 0.0
    for body in frames[cut:]:
        event = parse_event(body)
        out += tracker.feed(event)
        last = max(last, event.timestamp)
    out += tracker.tick(last + 3600)
    held = {e.call_id for e in out if e.kind == "summary"}
    out += [e for e in caught_up if e.call_id not in held]
    return out, set(uuids)


def full_run(frames: list[bytes], tmp: Path) -> list[CrmEvent]:
    return gap_run(frames, 0, tmp)[0]


def cuts(frames: list[bytes]) -> list[int]:
    """Every moment a channel event changes what a resync would see."""
    names = ("CHANNEL_CREATE", "CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA",
             "CHANNEL_ANSWER", "CHANNEL_BRIDGE", "CHANNEL_HANGUP_COMPLETE")
    return [i + 1 for i, body in enumerate(frames) if parse_event(body).name in names]


def summaries(events: list[CrmEvent]) -> list[tuple]:
    return sorted(e for e in simplify(events) if e[0] == "summary")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_start_at_any_moment_gives_the_summaries_of_hearing_everything(
        scenario: str, tmp_path: Path) -> None:
    """The connector starts at any moment of the call: resync (channels up), CDR files
    of the legs already over, the rest live: the summaries of hearing everything."""
    frames = capture_frames(scenario)
    expected = summaries(full_run(frames, tmp_path))
    for cut in cuts(frames):
        assert summaries(gap_run(frames, cut, tmp_path)[0]) == expected, cut


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_gap_anywhere_gives_the_summaries_of_hearing_everything(
        scenario: str, tmp_path: Path) -> None:
    """The ESL connection is lost at one moment and back at a later one (every pair of
    moments a few events apart): the same summaries, and every popup opened is closed."""
    frames = capture_frames(scenario)
    expected = summaries(full_run(frames, tmp_path))
    moments = cuts(frames)
    for i, lost in enumerate(moments):
        for back in moments[i + 1:i + 6]:
            got, _ = gap_run(frames, back, tmp_path, heard_until=lost)
            assert summaries(got) == expected, (lost, back)
            opened = {e.call_id for e in got if e.kind in ("ringing", "answer")}
            assert opened <= {e.call_id for e in got if e.kind == "hangup"}, (lost, back)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_popup_opened_after_a_resync_is_closed(scenario: str, tmp_path: Path) -> None:
    frames = capture_frames(scenario)
    for cut in cuts(frames):
        got, _ = gap_run(frames, cut, tmp_path)
        opened = {e.call_id for e in got if e.kind in ("ringing", "answer")}
        closed = {e.call_id for e in got if e.kind == "hangup"}
        assert opened <= closed, cut  # a restart closes what the last run may have opened


def test_agents_ringing_at_the_resync_get_their_popup(tmp_path: Path) -> None:
    """h, cut while both phones ring: both get ringing at once (from the resync), 102 its
    answer when it answers; q1 cut while 101 rings in the queue: 101's popup."""
    frames = capture_frames("h_ring_group_102_answers")
    cut = max(i for i in cuts(frames) if parse_event(frames[i - 1]).name == "CHANNEL_PROGRESS")
    got, up = gap_run(frames, cut, tmp_path)
    assert len(up) == 3  # the caller and both phones
    assert [e[:3] for e in simplify(got)][:2] == [("ringing", "7ac615b7", "101"),
                                                 ("ringing", "4842ba4e", "102")]
    q1 = capture_frames("q1_queue_first_agent_no_answer")
    first_ring = cuts(q1)[[parse_event(q1[i - 1]).name for i in cuts(q1)].index(
        "CHANNEL_PROGRESS")]
    got, _ = gap_run(q1, first_ring, tmp_path)
    assert simplify(got)[0][:4] == ("ringing", "2d29a888", "101", "79991234567")


def test_an_answered_call_gets_answer_then_its_summary(tmp_path: Path) -> None:
    frames = capture_frames("a_inbound_answered_caller_hangup")
    cut = next(i for i in cuts(frames) if parse_event(frames[i - 1]).name == "CHANNEL_BRIDGE")
    got, _ = gap_run(frames, cut, tmp_path)
    assert [e[:2] for e in simplify(got)] == [
        ("ringing", "0ed29c14"), ("answer", "0ed29c14"), ("hangup", "0ed29c14"),
        ("summary", "0ed29c14")]


def test_freeswitch_answers_are_parsed_as_1_10_prints_them() -> None:
    assert resync.channel_uuids('{"row_count":0}\n') == []
    body = json.dumps({"row_count": 2, "rows": [
        {"uuid": "b", "created_epoch": "20"}, {"uuid": "a", "created_epoch": "10"}]})
    assert resync.channel_uuids(body) == ["a", "b"]
    assert resync.dump_headers("-ERR No such channel!\n") is None
    for bad in ("+OK", "[]", '{"rows": []}'):
        with pytest.raises(resync.ResyncError):
            resync.channel_uuids(bad)
    with pytest.raises(resync.ResyncError):
        resync.dump_headers('{"Event-Name": "CHANNEL_DATA"}')
    headers = resync.dump_headers(json.dumps({
        "Unique-ID": "u1", "variable_x": "a b%c+d", "Bad: Name": "y", "nested": {"z": 1}}))
    assert headers == {"Unique-ID": "u1", "variable_x": "a b%c+d"}
    event = resync.make_event("CHANNEL_CREATE", headers, 1_800_000_000_000_000)
    assert event.var("x") == "a b%c+d" and event.timestamp == 1_800_000_000.0
    assert event.get(resync.RESYNC_HEADER) == "true"
