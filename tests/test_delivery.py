"""The Deliverer with the real Cc360Client against the fake CC360 over real HTTP on
127.0.0.1, and a real SQLite outbox. Backoff is driven by a pinned clock: no test sleeps
to wait for a retry."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest

from fs_cc360.cc360 import Cc360Client
from fs_cc360.delivery import BackoffPolicy, Deliverer
from fs_cc360.outbox import Outbox, OutboxStatus, OutboxWriter
from tests.fakes.crm import FakeCrm
from tests.fixtures import item

TOKEN = "tok123"
LOGIN = "admin"
PASSWORD = "secret"
T0 = 1_700_000_000.0
KINDS = ("ringing", "answer", "hangup", "summary")


def arrived(crm: FakeCrm) -> list[tuple[str, str]]:
    """Accepted events as (call id, kind) in arrival order."""
    return [(e.params["id"], e.params.get("eventName", "summary")) for e in crm.events()]


def per_call(events: list[tuple[str, str]]) -> dict[str, list[str]]:
    calls: dict[str, list[str]] = {}
    for call, kind in events:
        calls.setdefault(call, []).append(kind)
    return calls


class Clock:
    """A pinned clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    """An observer that remembers what it was told."""

    def __init__(self) -> None:
        self.delivered_calls: list[tuple[str, int | None]] = []
        self.failures: list[tuple[str, str, int | None]] = []

    def delivered(self, kind: str, status: int | None, seconds: float) -> None:
        self.delivered_calls.append((kind, status))

    def failed(self, kind: str, reason: str, status: int | None = None,
               seconds: float | None = None) -> None:
        self.failures.append((kind, reason, status))


@pytest.fixture
def crm() -> Iterator[FakeCrm]:
    with FakeCrm(mode="forms", token=TOKEN, login=LOGIN, password=PASSWORD) as fake:
        yield fake


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Outbox]:
    outbox = Outbox(str(tmp_path / "outbox.sqlite3"), synchronous="NORMAL")
    yield outbox
    outbox.close()


@pytest.fixture
def make_client(crm: FakeCrm) -> Iterator[Any]:
    made: list[Cc360Client] = []

    def make(lanes: int = 4, password: str = PASSWORD) -> Cc360Client:
        client = Cc360Client(crm.url, TOKEN, auth="forms", login=LOGIN, password=password,
                             timeout=5.0, lanes=lanes)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def drain(deliverer: Deliverer, clock: Clock, box: Outbox, step: float = 1.0,
          max_steps: int = 2000) -> int:
    """Step the pinned clock until nothing is pending or in flight; returns the steps."""
    for n in range(max_steps):
        deliverer.run_once()
        stats = box.stats()
        if stats.count("pending") == 0 and stats.count("inflight") == 0:
            return n
        clock.now += step
    raise AssertionError(f"not drained after {max_steps} steps: {box.stats()}")


# -- BackoffPolicy ---------------------------------------------------------------------------


def test_backoff_full_jitter_is_capped_and_honours_retry_after() -> None:
    policy = BackoffPolicy(initial=1.0, maximum=300.0)
    rng = random.Random(7)
    assert [policy.window(n) for n in (0, 1, 2, 8, 9, 1000)] == [1, 2, 4, 256, 300, 300]
    for attempt in range(40):
        assert 0.0 <= policy.delay(attempt, rng) <= policy.window(attempt)
    assert policy.delay(0, rng, retry_after=30) == 30  # the jitter (< 1 s) is below it
    assert policy.delay(20, random.Random(1), retry_after=0) > 0  # jitter wins when larger
    assert BackoffPolicy(retry_after_cap=60).delay(0, rng, retry_after=10_000) == 60
    delays = [BackoffPolicy().delay(5, random.Random(3)) for _ in range(2)]
    assert delays[0] == delays[1]  # a seeded rng makes it reproducible


# -- order and concurrency -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["Outbox", "OutboxWriter"])
def test_per_call_order_holds_with_concurrent_lanes_and_interleaved_calls(
        crm: FakeCrm, tmp_path: Path, make_client: Any, backend: str) -> None:
    path = str(tmp_path / "o.sqlite3")
    box = Outbox(path) if backend == "Outbox" else OutboxWriter(path)
    crm.latency = 0.05
    rng = random.Random(42)
    calls = [f"call-{n}" for n in range(8)]
    # interleave: each call's events in order, calls shuffled together, several batches
    queues = {call: list(KINDS) for call in calls}
    while any(queues.values()):
        batch = []
        for call in rng.sample(calls, k=3):
            if queues[call]:
                batch.append(item(call, queues[call].pop(0)))
        box.enqueue(batch)
    deliverer = Deliverer(box, make_client(lanes=4), concurrency=4, rng=random.Random(1))
    deliverer.run(gevent.event.Event(), burst=True)

    events = arrived(crm)
    assert len(events) == 32
    assert per_call(events) == {call: list(KINDS) for call in calls}
    # requests overlapped: some arrived before the previous one could have been answered
    times = [r.at for r in crm.event_requests()]
    assert any(b - a < crm.latency / 2 for a, b in zip(times, times[1:], strict=False))
    assert box.stats().count("delivered") == 32
    assert deliverer.counts.delivered == 32 and deliverer.in_flight == 0
    box.close()


def test_run_wakes_on_notify_instead_of_polling(
        crm: FakeCrm, tmp_path: Path, make_client: Any) -> None:
    """With a 30 s idle poll, the rows can only arrive in time because notify() (wired
    to the writer's group commit) wakes the loop. Uses the service's OutboxWriter."""
    writer = OutboxWriter(str(tmp_path / "o.sqlite3"), synchronous="NORMAL")
    deliverer = Deliverer(writer, make_client(lanes=2), concurrency=2, idle_poll=30.0)
    writer.on_commit = lambda ids: deliverer.notify()
    stop = gevent.event.Event()
    runner = gevent.spawn(deliverer.run, stop)
    try:
        gevent.sleep(0.05)  # the loop is now asleep on its 30 s poll
        for kind in KINDS:
            writer.enqueue_nowait(item("call-1", kind))
        assert crm.wait_for(4, timeout=10)
        writer.enqueue_nowait(item("call-2", "ringing")).get(timeout=5)
        assert crm.wait_for(5, timeout=10)
    finally:
        stop.set()
        runner.join(timeout=10)
        writer.close()
    assert runner.dead and runner.successful()
    assert arrived(crm) == [("call-1", kind) for kind in KINDS] + [("call-2", "ringing")]


# -- the CRM is down -------------------------------------------------------------------------


def test_crm_down_then_up_everything_arrives_in_order_with_bounded_probes(
        crm: FakeCrm, box: Outbox, make_client: Any) -> None:
    clock = Clock()
    recorder = Recorder()
    calls = [f"call-{n}" for n in range(5)]
    for kind in KINDS:
        box.enqueue([item(call, kind, event_at=T0) for call in calls], now=T0)
    deliverer = Deliverer(box, make_client(lanes=4), concurrency=4, clock=clock,
                          realtime_ttl=10_000, rng=random.Random(5), observer=recorder)
    crm.set_down(True)
    for _ in range(600):  # ten simulated minutes of outage, a step per second
        deliverer.run_once()
        clock.now += 1
    attempts = len(recorder.failures)
    assert deliverer.crm_down
    # one probe at a time behind a global capped backoff: ~log2(300) + 600/150 tries,
    # not one per row per second (20 rows x 600 s) nor one per row
    assert 3 <= attempts <= 25, recorder.failures
    assert {reason for _, reason, _ in recorder.failures} == {"unavailable"}
    assert crm.events() == []

    crm.set_down(False)
    clock.now = max(clock.now, T0 + 1000)  # past any backoff
    assert deliverer.run_once() == 1  # still down: a single probe...
    assert not deliverer.crm_down  # ...which succeeds and closes the circuit
    assert deliverer.run_once() == 4  # then full concurrency again
    drain(deliverer, clock, box)
    assert per_call(arrived(crm)) == {call: list(KINDS) for call in calls}
    assert box.stats().count("delivered") == 20


def test_503_with_retry_after_is_honoured(
        crm: FakeCrm, box: Outbox, make_client: Any) -> None:
    clock = Clock()
    box.enqueue([item("call-1", "summary")], now=T0)
    deliverer = Deliverer(box, make_client(lanes=1), concurrency=1, clock=clock,
                          rng=random.Random(0))
    crm.fail_next(503, 1, retry_after=30)
    assert deliverer.run_once() == 1
    (row,) = box.list_rows()
    assert row.status is OutboxStatus.pending and row.last_status == 503
    assert row.attempts == 1 and row.next_attempt_at == T0 + 30
    clock.now = T0 + 29.9
    assert deliverer.run_once() == 0
    assert len(crm.event_requests()) == 1  # nothing sent before Retry-After
    clock.now = T0 + 30
    assert deliverer.run_once() == 1
    assert [r.status for r in crm.event_requests()] == [503, 200]
    assert box.get(row.id).status is OutboxStatus.delivered


def test_lost_login_is_retried_not_dead(
        crm: FakeCrm, box: Outbox, make_client: Any) -> None:
    """A failing login (CrmAuthError) is an outage, retried with backoff, never dead."""
    clock = Clock()
    box.enqueue([item("call-1", "summary")], now=T0)
    deliverer = Deliverer(box, make_client(lanes=1, password="wrong"), concurrency=1,
                          clock=clock, max_rejections=1, rng=random.Random(0))
    for _ in range(5):
        deliverer.run_once()
        clock.now += 400  # past any backoff window
    (row,) = box.list_rows()
    assert row.status is OutboxStatus.pending and row.attempts == 5 and row.rejections == 0
    assert deliverer.crm_down and crm.login_attempts == 5


# -- rejections, expiry, leases ----------------------------------------------------------------


def test_4xx_goes_dead_after_max_rejections_and_the_summary_still_goes(
        crm: FakeCrm, box: Outbox, make_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    recorder = Recorder()
    ringing, summary = box.enqueue([item("call-1", "ringing", event_at=T0),
                                    item("call-1", "summary")], now=T0)
    deliverer = Deliverer(box, make_client(lanes=2), concurrency=2, clock=clock,
                          max_rejections=3, rng=random.Random(0), observer=recorder)
    crm.fail_next(400, 3)
    with caplog.at_level(logging.WARNING, logger="fs_cc360.delivery"):
        for _ in range(3):
            assert deliverer.run_once() == 1
            assert box.get(summary).status is OutboxStatus.pending  # waits its turn
            clock.now += 5  # past the short rejection backoff
    dead = box.get(ringing)
    assert dead.status is OutboxStatus.dead
    assert dead.attempts == 3 and dead.rejections == 3 and dead.last_status == 400
    assert "HTTP 400" in (dead.last_error or "")
    assert not deliverer.crm_down  # a 4xx means the CRM is up
    assert any("outbox.dead" in r.getMessage() and f"id={ringing}" in r.getMessage()
               and "status=400" in r.getMessage() for r in caplog.records)
    assert deliverer.run_once() == 1
    assert box.get(summary).status is OutboxStatus.delivered
    assert arrived(crm) == [("call-1", "summary")]
    assert [reason for _, reason, _ in recorder.failures] == ["rejected", "rejected",
                                                              "rejected", "dead"]


def test_stale_realtime_events_expire_and_summaries_never_do(
        crm: FakeCrm, box: Outbox, make_client: Any) -> None:
    clock = Clock()
    old = T0 - 500
    box.enqueue([item("old", "ringing", event_at=old), item("old", "hangup", event_at=old),
                 item("old", "summary", event_at=old)], now=T0)
    box.enqueue([item("fresh", "ringing", event_at=T0 - 5)], now=T0)
    deliverer = Deliverer(box, make_client(lanes=2), concurrency=2, clock=clock,
                          realtime_ttl=120, rng=random.Random(0))
    drain(deliverer, clock, box, step=0.0, max_steps=10)
    assert sorted(arrived(crm)) == [("fresh", "ringing"), ("old", "summary")]
    stats = box.stats()
    assert stats.count("expired") == 2 and stats.count("delivered") == 2
    assert deliverer.counts.expired == 2


def test_rows_left_inflight_by_a_crash_are_reclaimed_after_their_lease(
        crm: FakeCrm, box: Outbox, make_client: Any) -> None:
    clock = Clock()
    box.enqueue([item("call-1", "ringing", event_at=T0), item("call-1", "summary"),
                 item("call-2", "summary")], now=T0)
    crashed = box.claim_due(T0, 10, lease_seconds=60)  # claimed, then the process died
    assert len(crashed) == 2
    deliverer = Deliverer(box, make_client(lanes=2), concurrency=2, clock=clock,
                          realtime_ttl=10_000, rng=random.Random(0))
    clock.now = T0 + 30
    assert deliverer.run_once() == 0  # the leases still hold: nothing is sent twice
    assert crm.events() == []
    clock.now = T0 + 61
    drain(deliverer, clock, box, step=0.0, max_steps=10)
    assert arrived(crm) in (
        [("call-1", "ringing"), ("call-2", "summary"), ("call-1", "summary")],
        [("call-2", "summary"), ("call-1", "ringing"), ("call-1", "summary")],
    )
    assert per_call(arrived(crm))["call-1"] == ["ringing", "summary"]


def test_run_releases_stale_leases_at_start_up(
        crm: FakeCrm, box: Outbox, make_client: Any) -> None:
    box.enqueue([item("call-1", "ringing"), item("call-1", "summary")])
    box.claim_due(box.get(1).created_at, 10, lease_seconds=3600)  # a crashed process's lease
    deliverer = Deliverer(box, make_client(lanes=1), concurrency=1)
    stop = gevent.event.Event()
    runner = gevent.spawn(deliverer.run, stop)
    try:
        assert crm.wait_for(2, timeout=10)  # no hour-long wait for the lease
    finally:
        stop.set()
        runner.join(timeout=10)
    assert arrived(crm) == [("call-1", "ringing"), ("call-1", "summary")]


def test_graceful_stop_releases_what_is_still_in_flight(
        crm: FakeCrm, box: Outbox, make_client: Any) -> None:
    crm.latency = 3.0  # the request is still waiting for its answer at stop time
    (row_id,) = box.enqueue([item("call-1", "summary")])
    deliverer = Deliverer(box, make_client(lanes=1), concurrency=1, stop_timeout=0.2)
    stop = gevent.event.Event()
    runner = gevent.spawn(deliverer.run, stop)
    for _ in range(200):
        if box.get(row_id).status is OutboxStatus.inflight:
            break
        gevent.sleep(0.01)
    assert box.get(row_id).status is OutboxStatus.inflight
    stop.set()
    runner.join(timeout=10)
    assert runner.dead
    row = box.get(row_id)
    assert row.status is OutboxStatus.pending and row.attempts == 0 and row.lease_until is None
    assert deliverer.in_flight == 0


def test_session_expiry_mid_stream_loses_nothing(
        crm: FakeCrm, box: Outbox, make_client: Any) -> None:
    box.enqueue([item("call-1", kind) for kind in KINDS])
    deliverer = Deliverer(box, make_client(lanes=2), concurrency=2)
    assert deliverer.run_once() == 1
    crm.expire_sessions("redirect")
    deliverer.run(gevent.event.Event(), burst=True)
    assert arrived(crm) == [("call-1", kind) for kind in KINDS]
    assert crm.logins == 2 and deliverer.counts.retried == 0


# -- batched outcomes, claiming ahead, lease reclaim ---------------------------------------


class CountingOutbox:
    """Wraps an outbox and records every outcome batch and lease reclaim it is asked for."""

    def __init__(self, box: Any) -> None:
        self.box = box
        self.batches: list[list[Any]] = []  # the marks of each mark_and_claim call
        self.reclaims: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.box, name)

    def mark_and_claim(self, marks: Any, *args: Any, **kwargs: Any) -> Any:
        marks = list(marks)
        if marks:
            self.batches.append(marks)
        return self.box.mark_and_claim(marks, *args, **kwargs)

    def reclaim_expired_leases(self, now: float) -> int:
        self.reclaims.append(now)
        return self.box.reclaim_expired_leases(now)


def test_a_steps_outcomes_are_committed_together_and_each_call_keeps_its_order(
        crm: FakeCrm, box: Outbox, make_client: Any) -> None:
    """One write per step for all its outcomes (not one per row), and the marks being
    batched never lets a call's next row go before its previous row's outcome is in."""
    clock = Clock()
    calls = [f"call-{n}" for n in range(4)]
    box.enqueue([item(call, kind, event_at=T0) for kind in KINDS for call in calls], now=T0)
    counting = CountingOutbox(box)
    deliverer = Deliverer(counting, make_client(lanes=4), concurrency=4, clock=clock,
                          realtime_ttl=10_000, rng=random.Random(0))
    crm.latency = 0.02
    for step in range(len(KINDS)):
        assert deliverer.run_once() == 4
        # the step's four outcomes went out in one batch, and are committed on return
        assert [len(batch) for batch in counting.batches] == [4] * (step + 1)
        assert box.stats().count("delivered") == 4 * (step + 1)
        assert box.stats().count("inflight") == 0
    assert deliverer.run_once() == 0
    assert per_call(arrived(crm)) == {call: list(KINDS) for call in calls}
    # a kind of every call arrived before any call's next kind (each wave is one kind)
    assert [kind for _, kind in arrived(crm)] == [k for k in KINDS for _ in calls]
    assert deliverer.counts.delivered == 16 and deliverer.in_flight == 0


@pytest.mark.parametrize("backend", ["Outbox", "OutboxWriter"])
def test_run_with_batched_outcomes_and_rows_claimed_ahead_keeps_every_calls_order(
        crm: FakeCrm, tmp_path: Path, make_client: Any, backend: str) -> None:
    path = str(tmp_path / "o.sqlite3")
    box = Outbox(path) if backend == "Outbox" else OutboxWriter(path)
    calls = [f"call-{n}" for n in range(12)]
    box.enqueue([item(call, kind) for kind in KINDS for call in calls])
    crm.latency = 0.01
    counting = CountingOutbox(box)
    deliverer = Deliverer(counting, make_client(lanes=4), concurrency=4, prefetch=4)
    deliverer.run(gevent.event.Event(), burst=True)
    assert per_call(arrived(crm)) == {call: list(KINDS) for call in calls}
    assert sum(len(batch) for batch in counting.batches) == 48  # every outcome, once
    stats = box.stats()
    assert stats.count("delivered") == 48 and stats.count("inflight") == 0
    assert deliverer.in_flight == 0
    box.close()


def test_a_crash_before_the_batched_outcomes_commit_resends_only_what_was_in_flight(
        crm: FakeCrm, tmp_path: Path, make_client: Any) -> None:
    """The process dies after the CRM answered some requests but before the step that
    would have committed those outcomes: after a restart exactly those rows are sent
    again (at-least-once), nothing committed is, and each call's order still holds."""
    path = str(tmp_path / "o.sqlite3")
    box = Outbox(path)
    calls = [f"call-{n}" for n in range(3)]
    box.enqueue([item(call, kind) for kind in KINDS for call in calls])
    deliverer = Deliverer(box, make_client(lanes=4), concurrency=4, prefetch=0)
    assert deliverer.run_once() == 3  # every ringing delivered and committed
    assert deliverer.run_once(wait=False) == 3  # the answers are sent...
    deliverer._pool.join(timeout=10)  # ...and answered; their outcomes are queued
    assert deliverer.counts.delivered == 6 and len(deliverer._marks) == 3
    box.close()  # the process dies here: the queued outcomes are never written

    again = Outbox(path)
    stats = again.stats()
    assert stats.count("delivered") == 3 and stats.count("inflight") == 3
    restarted = Deliverer(again, make_client(lanes=4), concurrency=4)
    stop = gevent.event.Event()
    runner = gevent.spawn(restarted.run, stop)  # releases the leases at start-up
    try:
        assert crm.wait_for(12 + 3, timeout=10)
        for _ in range(100):
            if again.stats().count("delivered") == 12:
                break
            gevent.sleep(0.02)
    finally:
        stop.set()
        runner.join(timeout=10)
    got = per_call(arrived(crm))
    # only the three answers that were in flight at the crash arrived twice
    assert got == {call: ["ringing", "answer", "answer", "hangup", "summary"]
                   for call in calls}
    assert again.stats().count("delivered") == 12
    again.close()


def test_rows_claimed_ahead_are_given_back_at_stop_and_when_the_crm_goes_down(
        crm: FakeCrm, box: Outbox, make_client: Any) -> None:
    calls = [f"call-{n}" for n in range(4)]
    box.enqueue([item(call, "summary") for call in calls])

    def statuses() -> list[tuple[str, int]]:
        return sorted((row.status.value, row.attempts) for row in box.list_rows())

    # at stop: one request in flight finishes, the rows claimed ahead go back untouched
    crm.latency = 0.3
    deliverer = Deliverer(box, make_client(lanes=1), concurrency=1, prefetch=2)
    stop = gevent.event.Event()
    runner = gevent.spawn(deliverer.run, stop)
    for _ in range(200):
        if box.stats().count("inflight") == 3:
            break
        gevent.sleep(0.01)
    assert box.stats().count("inflight") == 3  # one sending, two claimed ahead
    stop.set()
    runner.join(timeout=10)
    assert statuses() == [("delivered", 0), ("pending", 0), ("pending", 0), ("pending", 0)]
    assert len(arrived(crm)) == 1

    # the CRM goes down: one failed request, then the rows claimed ahead go back and
    # only one probe at a time is sent
    crm.latency = 0.0
    crm.set_down(True)
    deliverer = Deliverer(box, make_client(lanes=1), concurrency=1, prefetch=2,
                          backoff=BackoffPolicy(initial=60.0, maximum=60.0))
    stop = gevent.event.Event()
    runner = gevent.spawn(deliverer.run, stop)
    try:
        for _ in range(200):
            if deliverer.crm_down and box.stats().count("inflight") == 0:
                break
            gevent.sleep(0.01)
        assert deliverer.crm_down
        assert statuses() == [("delivered", 0), ("pending", 0), ("pending", 0),
                              ("pending", 1)]
    finally:
        stop.set()
        runner.join(timeout=10)
    assert deliverer.counts.retried == 1 and deliverer.in_flight == 0


def test_expired_leases_are_reclaimed_every_few_seconds_not_on_every_step(
        crm: FakeCrm, box: Outbox, make_client: Any) -> None:
    """A crashed deliverer's rows come back within ``reclaim_interval`` (here 5 s) after
    their lease ends, while the steps in between do not ask the outbox each time."""
    clock = Clock()
    box.enqueue([item("call-1", "ringing", event_at=T0), item("call-1", "summary"),
                 item("call-2", "summary")], now=T0)
    assert len(box.claim_due(T0, 10, lease_seconds=60)) == 2  # then that process died
    counting = CountingOutbox(box)
    deliverer = Deliverer(counting, make_client(lanes=2), concurrency=2, clock=clock,
                          lease_seconds=60, realtime_ttl=10_000, rng=random.Random(0))
    assert deliverer.reclaim_interval == 5.0
    assert Deliverer(box, make_client(lanes=1), concurrency=1,
                     lease_seconds=8).reclaim_interval == 2.0  # a quarter of a short lease
    sent_at = None
    for second in range(1, 80):
        clock.now = T0 + second
        deliverer.run_once()
        if sent_at is None and arrived(crm):
            sent_at = second
    assert sent_at is not None and 60 < sent_at <= 65  # lease end + at most the interval
    assert 14 <= len(counting.reclaims) <= 17  # about one per 5 s, not 79
    assert all(b - a >= 5 for a, b in zip(counting.reclaims, counting.reclaims[1:],
                                          strict=False))
    assert per_call(arrived(crm)) == {"call-1": ["ringing", "summary"],
                                      "call-2": ["summary"]}
    # a clock that goes back (a pinned test clock, a corrected system clock) looks again
    clock.now = T0
    before = len(counting.reclaims)
    deliverer.run_once()
    assert len(counting.reclaims) == before + 1
