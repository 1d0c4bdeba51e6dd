"""No call lost across a gap: the real service, a simulated FreeSWITCH that keeps its calls
(and writes their JSON CDR files) while nobody listens, a simulated CC360.

After every (re)connect the service asks FreeSWITCH which channels are up (resync: popups
for phones ringing now) and reads the CDR files of legs that ended since the last event it
read (catch-up: summaries of calls over). Every test checks the exact CC360 requests
against those of a connector that heard everything (tests/test_calls.py's EXPECTED).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest

from fs_cc360.events import parse_event
from fs_cc360.service import Service
from fs_cc360.simulators import wait_until
from fs_cc360.simulators.crm import FakeCrm
from tests.fakes.captures import capture_frames, remap, shift_to_now
from tests.fakes.esl import FakeFreeSwitch
from tests.test_pipeline import (
    CRM_TOKEN,
    ESL_PASSWORD,
    by_id,
    drained,
    heard_everything,
    running,
)


@contextlib.contextmanager
def connector(fs: FakeFreeSwitch, crm: FakeCrm, tmp: Path) -> Iterator[Service]:
    """A service on ``tmp``'s outbox with the automatic catch-up on ``fs``'s CDR files."""
    with running(fs, crm, tmp, {"backfill": {"cdr_dir": str(fs.switch.cdr_dir)}}) as service:
        yield service


@contextlib.contextmanager
def switch(tmp: Path) -> Iterator[tuple[FakeFreeSwitch, FakeCrm]]:
    (tmp / "cdr").mkdir()
    with FakeCrm(mode="forms", token=CRM_TOKEN) as crm, \
            FakeFreeSwitch(password=ESL_PASSWORD, cdr_dir=str(tmp / "cdr")) as fs:
        yield fs, crm


def call(scenario: str, seed: int, number: bytes, now: float | None = None) -> list[bytes]:
    """A fresh copy of a real call (new UUIDs, another caller number), happening now."""
    return shift_to_now(remap(capture_frames(scenario), seed,
                              replace={b"79991234567": number}), now)


def summaries_by_id(crm: FakeCrm) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in crm.events():
        if event.endpoint == "PushHistoryData":
            counts[event.params["id"]] = counts.get(event.params["id"], 0) + 1
    return counts


def test_calls_made_while_the_service_was_stopped_reach_the_history_once(
        tmp_path: Path) -> None:
    """Live call, stop, three calls on the switch (answered, missed, queue), start: each
    of their summaries arrives once, built from the CDR files exactly as live, no popup
    for them (history by then); the live call is not sent again."""
    with switch(tmp_path) as (fs, crm):
        live = call("a_inbound_answered_caller_hangup", 1, b"78120000001")
        with connector(fs, crm, tmp_path) as service:
            fs.play(live)
            assert wait_until(lambda: drained(service) and len(crm.events()) >= 4)
        assert service.position.path is not None and service.position.path.exists()
        gap_calls = {
            "a_inbound_answered_caller_hangup": call("a_inbound_answered_caller_hangup", 2,
                                                     b"78120000002"),
            "b_inbound_not_answered_caller_cancel": call(
                "b_inbound_not_answered_caller_cancel", 3, b"78120000003"),
            "q1_queue_first_agent_no_answer": call("q1_queue_first_agent_no_answer", 4,
                                                   b"78120000004"),
        }
        for frames in gap_calls.values():
            fs.play(frames)  # nobody listens; FreeSWITCH writes the CDR files
        assert len(fs.switch.cdr_files) == 2 + 2 + 2 + 3
        before = len(crm.events())
        want = [r for frames in gap_calls.values() for r in heard_everything(frames)
                if r[0] == "PushHistoryData"]
        with connector(fs, crm, tmp_path) as service:
            assert wait_until(lambda: drained(service) and len(crm.events()) >= before + 3,
                              timeout=15)
            gevent.sleep(0.3)  # nothing more may come
            got = [tuple(e) for e in crm.events()[before:]]
            assert by_id(got) == by_id(want)
            assert all(n == 1 for n in summaries_by_id(crm).values())
            assert service.metrics.catchup_summaries.labels(result="enqueued")._value.get() == 3


def test_a_restart_in_the_middle_of_calls(tmp_path: Path) -> None:
    """The service is stopped while a ring group rings; during the gap 102 answers; it
    starts again while they talk: 102 gets answer (its ringing popup came before the
    stop: the outbox remembers it, no second one), the ring group's loser its hangup
    (closing the popup opened before the stop), and at the end 102's summary, all
    once."""
    frames = call("h_ring_group_102_answers", 5, b"78120000005")
    events = [parse_event(b) for b in frames]
    both_ring = max(i for i, e in enumerate(events) if e.name == "CHANNEL_PROGRESS") + 1
    bridged = next(i for i, e in enumerate(events) if e.name == "CHANNEL_BRIDGE") + 1
    want = heard_everything(frames)
    with switch(tmp_path) as (fs, crm):
        with connector(fs, crm, tmp_path) as service:
            fs.play(frames[:both_ring])
            assert wait_until(lambda: drained(service) and len(crm.events()) >= 2)
        fs.play(frames[both_ring:bridged])
        with connector(fs, crm, tmp_path) as service:
            # 102's answer (it rang before the stop: no second ringing)
            assert wait_until(lambda: drained(service) and len(crm.events()) >= 3)
            fs.play(frames[bridged:])
            assert wait_until(lambda: drained(service) and len(crm.events()) >= len(want),
                              timeout=15)
            gevent.sleep(0.3)
            assert by_id([tuple(e) for e in crm.events()]) == by_id(want)


@pytest.mark.slow
def test_esl_down_for_30_seconds_in_the_middle_of_a_ring_group_and_a_queue_call(
        tmp_path: Path) -> None:
    """Both calls are going on when the ESL connection drops; FreeSWITCH refuses new
    connections for 30 s while the calls go on: in the queue 101 stops ringing and 102
    is offered, in the ring group both phones start ringing. After the reconnect the
    phones ringing then get their ringing popups, 101's popup (opened before the drop)
    is closed, and the rest of both calls is reported as if nothing had happened."""
    start = time.time()
    h = call("h_ring_group_102_answers", 6, b"78120000006", now=start)
    q1 = call("q1_queue_first_agent_no_answer", 7, b"78120000007", now=start)
    h_events, q_events = [parse_event(b) for b in h], [parse_event(b) for b in q1]
    h_drop = next(i for i, e in enumerate(h_events) if e.name == "CHANNEL_CREATE") + 1
    h_back = max(i for i, e in enumerate(h_events) if e.name == "CHANNEL_PROGRESS") + 1
    q_drop = next(i for i, e in enumerate(q_events) if e.name == "CHANNEL_PROGRESS") + 1
    q_back = [i for i, e in enumerate(q_events) if e.name == "CHANNEL_PROGRESS"][1] + 1
    gap = 30.0
    # the calls went on during the gap: what follows it happens 30 s later
    h_after = _later(h[h_back:], gap)
    q_after = _later(q1[q_back:], gap)
    want = by_id(heard_everything(h[:h_back] + h_after) + heard_everything(q1[:q_back] + q_after))
    with switch(tmp_path) as (fs, crm), connector(fs, crm, tmp_path) as service:
        fs.play(h[:h_drop] + q1[:q_drop])
        assert wait_until(lambda: len(crm.events()) >= 1)  # 101's queue popup
        fs.refuse()
        fs.drop_clients()
        assert wait_until(lambda: not service.esl.connected)
        fs.play(h[h_drop:h_back] + q1[q_drop:q_back])
        gevent.sleep(max(0.0, start + gap - time.time()))
        fs.accept()
        assert fs.wait_connected(10)
        # ringing popups for the three phones ringing now, hangup for 101's closed offer
        assert wait_until(lambda: len(crm.events()) >= 5, timeout=10)
        fs.play(h_after + q_after)
        assert wait_until(lambda: drained(service) and sum(len(v) for v in by_id(
            [tuple(e) for e in crm.events()]).values()) >= sum(len(v) for v in want.values()),
            timeout=20)
        gevent.sleep(0.3)
        assert by_id([tuple(e) for e in crm.events()]) == want
        assert service.esl.reconnects == 1


def _later(frames: list[bytes], seconds: float) -> list[bytes]:
    from fs_cc360.simulators.captures import shift_to_now

    first = min(parse_event(b).timestamp for b in frames)
    return shift_to_now(frames, first + seconds)
