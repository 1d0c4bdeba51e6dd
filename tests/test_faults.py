"""Fault tests: the service under CRM outages, kill -9, a vanishing FreeSWITCH, hostile ESL
input and an outbox that cannot be written.

Each test drives the real wiring (``Service``, or ``fs-cc360 run`` as a child process for
kill -9) between the fake FreeSWITCH and the fake CC360 on 127.0.0.1, replaying real
captures under fresh UUIDs; what the CRM must receive comes from the tracker's own rules
applied offline to the same frames (``bench.harness.expected_events``). Times in these
tests are bounds against hangs, never speed goals: the measured figures (reconnect time,
request counts) are printed and the benchmarks in ``bench/`` report the speeds.

Longer versions live in ``bench/`` (20 kills: ``bench_crash.py``, 100,000 hostile frames:
``bench_hostile.py``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest

from bench.harness import (
    CRM_LOGIN,
    CRM_PASSWORD,
    CRM_TOKEN,
    ORDER,
    Call,
    CallPlayer,
    crash_cycles,
    crm_kinds,
    expected_events,
    make_call,
    make_items,
    new_crm,
    new_fs,
    wait_until,
    write_config,
)
from fs_cc360.calls import CallTracker
from fs_cc360.cc360 import Cc360Client
from fs_cc360.config import load_settings
from fs_cc360.delivery import BackoffPolicy, Deliverer
from fs_cc360.events import parse_event
from fs_cc360.outbox import Outbox, OutboxStatus
from fs_cc360.service import Service, new_item, tracker_config
from fs_cc360.simulators.crm import FakeCrm
from fs_cc360.simulators.freeswitch import (
    FakeFreeSwitch,
    event_name,
    hostile_stream,
    mutated_frames,
)

pytestmark = pytest.mark.fault


# -- helpers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def running_service(tmp: Path, fs: FakeFreeSwitch, crm: FakeCrm, *, database: Path | None = None,
                    overrides: dict[str, dict[str, Any]] | None = None) -> Iterator[Service]:
    """The real Service in this process, connected to ``fs``; stopped on exit."""
    config = write_config(tmp / "service.ini", fs_port=fs.port, crm_url=crm.url,
                          database=database or tmp / "outbox.sqlite3", overrides=overrides)
    service = Service(load_settings(config, env={}))
    service.start()
    try:
        assert fs.wait_connected(10), "the service did not connect to the fake FreeSWITCH"
        yield service
    finally:
        service.stop()


@contextlib.contextmanager
def simulators() -> Iterator[tuple[FakeFreeSwitch, FakeCrm]]:
    crm = new_crm()
    fs = new_fs()
    try:
        yield fs, crm
    finally:
        fs.close()
        crm.stop()


def oracle(service: Service, calls: list[Call]) -> dict[str, list[str]]:
    return expected_events(calls, tracker_config(service.settings)).by_call


def outbox_rows(service: Service) -> dict[str, list[tuple[str, str]]]:
    """CC360 id -> [(kind, status)] in outbox (id) order."""
    rows = sorted(service.outbox.list_rows(limit=None), key=lambda row: row.id)
    out: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        out.setdefault(row.call_key, []).append((row.kind, row.status.value))
    return out


def open_rows(service: Service) -> int:
    stats = service.outbox.stats()
    return stats.count(OutboxStatus.pending) + stats.count(OutboxStatus.inflight)


def wait_delivered(service: Service, crm: FakeCrm, expected: dict[str, list[str]],
                   timeout: float = 30.0) -> bool:
    """Until the CRM accepted every expected event and the outbox has nothing open."""
    total = sum(len(kinds) for kinds in expected.values())
    return wait_until(lambda: len(crm.events()) >= total and open_rows(service) == 0
                      and not service.spooled and not service.tracker.waiting,
                      timeout, interval=0.1)


class CountingClient:
    """Wraps the CRM client: when each attempt started and ended, and how it went."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.attempts: list[tuple[float, float, bool]] = []

    def send(self, request: Any, lane: int = 0) -> Any:
        started = time.monotonic()
        ok = False
        try:
            response = self.client.send(request, lane)
            ok = True
            return response
        finally:
            self.attempts.append((started, time.monotonic(), ok))


def max_overlap(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    level = best = 0
    for _, step in edges:
        level += step
        best = max(best, level)
    return best


# -- CRM outage ----------------------------------------------------------------------------


@pytest.mark.slow
def test_crm_down_under_steady_load_loses_nothing_keeps_order_and_only_probes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A CRM outage of 4 s under 4 calls/s (a 10-minute outage with a 60 s backoff cap,
    compressed: the backoff is capped at 0.5 s here): every CC360 event arrives once, in
    order per call, the backlog drains, and while the CRM is down the connector sends one
    probe at a time at a bounded rate instead of retrying every row."""
    caplog.set_level(logging.WARNING)
    with simulators() as (fs, crm), running_service(tmp_path, fs, crm, overrides={
            "delivery": {"backoff_initial": 0.05, "backoff_max": 0.5}}) as service:
        counting = CountingClient(service.deliverer.client)
        service.deliverer.client = counting
        player = CallPlayer(fs, rate=4, calls=40, speedup=10, seed=11).start()
        gevent.sleep(2.5)
        crm.set_down(True)
        down_at = time.monotonic()
        gevent.sleep(4.0)
        up_at = time.monotonic()
        crm.set_down(False)
        assert player.join(60)
        expected = oracle(service, player.calls)
        assert wait_delivered(service, crm, expected), "the backlog did not drain"
        stats = service.outbox.stats()

    got = crm_kinds(crm)
    assert got == expected, "every CC360 event exactly once, in per-call order"
    assert stats.count(OutboxStatus.dead) == stats.count(OutboxStatus.expired) == 0
    assert sum(len(k) for k in expected.values()) >= 100, "the load must be real"
    # While down (after the requests in flight when it went down had failed): one probe
    # at a time, a handful per second at most.
    settled = down_at + 0.5
    probes = [(s, e) for s, e, ok in counting.attempts if settled <= s < up_at]
    failed_while_down = [(s, e) for s, e, ok in counting.attempts if down_at <= s < up_at]
    print(f"\nFAULT crm-outage: CRM down {up_at - down_at:.1f} s: {len(failed_while_down)} "
          f"attempts ({len(probes)} after the circuit opened), max {max_overlap(probes)} at once; "
          f"{len(counting.attempts)} attempts in all for {stats.total} rows")
    assert probes, "the connector must keep probing while the CRM is down"
    assert max_overlap(probes) == 1
    assert len(probes) <= 40, "a bounded probe rate, not a retry storm"
    assert all(not ok for s, _, ok in counting.attempts if settled <= s < up_at)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("crm.down") for m in messages)
    assert any(m.startswith("crm.up") for m in messages)


def test_crm_down_ten_minutes_with_production_backoff_pinned_clock(tmp_path: Path) -> None:
    """Ten simulated minutes of a refused CRM with the production backoff (1 s .. 60 s):
    about a dozen probes in all, one at a time; when it answers, every summary is
    delivered in per-call order, and the popups, ten minutes late, expire (by design)
    instead of popping up."""
    calls = [make_call(i, seed=21) for i in range(30)]
    outbox = Outbox(str(tmp_path / "outbox.sqlite3"))
    crm = new_crm()
    settings = load_settings(write_config(tmp_path / "x.ini", fs_port=1, crm_url=crm.url,
                                          database=tmp_path / "x.sqlite3"), env={})
    expected = expected_events(calls, tracker_config(settings))
    t0 = time.time()
    clock = [t0]
    for call in calls:
        tracker = CallTracker(tracker_config(settings))
        items = []
        for body in call.frames:
            items += [new_item(e, None) for e in tracker.feed(parse_event(body))]
        items += [new_item(e, None) for e in tracker.tick(t0 + 3600)]
        outbox.enqueue(items, now=t0)
    client = Cc360Client(crm.url, settings.crm.token, auth="forms", login=settings.crm.login,
                         password=settings.crm.password, timeout=2, lanes=8)
    counting = CountingClient(client)
    deliverer = Deliverer(outbox, counting, concurrency=8, realtime_ttl=120,
                          backoff=BackoffPolicy(initial=1.0, maximum=60.0),
                          clock=lambda: clock[0], rng=random.Random(5))
    crm.set_down(True)
    try:
        claimed_while_down = []
        while clock[0] < t0 + 600:
            claimed_while_down.append(deliverer.run_once(clock[0]))
            clock[0] += 0.5
        attempts_down = len(counting.attempts)
        crm.set_down(False)
        for _ in range(4000):  # simulated: at most 2000 s more
            deliverer.run_once(clock[0])
            if open_rows_of(outbox) == 0:
                break
            clock[0] += 0.5
        stats = outbox.stats()
        rows = sorted(outbox.list_rows(limit=None), key=lambda r: r.id)
    finally:
        outbox.close()
        client.close()
        crm.stop()
    print(f"\nFAULT crm-outage-10min: 600 simulated seconds down: {attempts_down} attempts; "
          f"drained {clock[0] - t0 - 600:.0f} simulated seconds after the CRM came back")
    assert 1 <= attempts_down <= 40
    # the probe schedule is capped at 60 s: delivery resumes within about a minute
    assert clock[0] - t0 - 600 <= 70
    # the first step sends on every lane (nothing says the CRM is down yet); then the
    # circuit is open: one probe at a time
    assert claimed_while_down[0] == 8
    assert max(claimed_while_down[1:]) == 1, "one probe at a time"
    assert open_rows_of_stats(stats) == 0
    got = crm_kinds(crm)
    summaries = {cid for cid, kinds in expected.by_call.items() if "summary" in kinds}
    assert {cid for cid, kinds in got.items() if "summary" in kinds} == summaries
    for row in rows:
        if row.kind == "summary":
            assert row.status == OutboxStatus.delivered
        else:  # a popup ten minutes late is worse than none, unless it was the probe
            assert row.status in (OutboxStatus.expired, OutboxStatus.delivered)
    for kinds in got.values():
        assert kinds == sorted(kinds, key=ORDER.__getitem__)
        assert len(kinds) == len(set(kinds))


def test_one_failed_wave_starts_the_probe_backoff_at_its_first_step(tmp_path: Path) -> None:
    """A CRM blip that fails the 8 requests in flight at once (one 503 each) is one
    failure of the CRM, not eight: the first probe must come within the first backoff
    steps (``initial`` 1 s: at most 2 s), or every popup waits (and may expire) for a
    blip that lasted a second."""
    outbox = Outbox(str(tmp_path / "outbox.sqlite3"))
    outbox.enqueue(make_items(100, seed=61))
    crm = new_crm()
    crm.fail_next(503, count=8)
    client = Cc360Client(crm.url, CRM_TOKEN, auth="forms", login=CRM_LOGIN,
                         password=CRM_PASSWORD, timeout=2, lanes=8)
    counting = CountingClient(client)
    clock = [time.time()]
    start = clock[0]
    deliverer = Deliverer(outbox, counting, concurrency=8, realtime_ttl=3600,
                          backoff=BackoffPolicy(initial=1.0, maximum=300.0),
                          clock=lambda: clock[0], rng=random.Random(1))
    try:
        deliverer.run_once(clock[0])
        assert deliverer.crm_down and len(counting.attempts) == 8
        while len(counting.attempts) == 8 and clock[0] < start + 600:
            clock[0] += 0.25
            deliverer.run_once(clock[0])
    finally:
        outbox.close()
        client.close()
        crm.stop()
    print(f"\nFAULT crm-blip: first probe {clock[0] - start:.1f} simulated s after one "
          f"failed wave of 8")
    assert clock[0] - start <= 2.0


def open_rows_of(outbox: Outbox) -> int:
    return open_rows_of_stats(outbox.stats())


def open_rows_of_stats(stats: Any) -> int:
    return stats.count(OutboxStatus.pending) + stats.count(OutboxStatus.inflight)


# -- kill -9 --------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill9_at_random_moments_under_load_delivers_every_committed_event(
        tmp_path: Path) -> None:
    """``fs-cc360 run`` killed with SIGKILL 4 times at random moments while calls flow
    and requests are in flight, restarted each time: every row committed before a kill
    is delivered, and repeated only if it was in flight at a kill (bench/bench_crash.py
    does 20 kills)."""
    seed = int(time.time()) % 10_000  # random moments; printed to replay a failure
    report = crash_cycles(tmp_path, kills=4, seed=seed)
    print(f"\nFAULT kill-9: (seed {seed}) " + report.summary())
    assert not report.problems, f"seed {seed}:\n" + "\n".join(report.problems[:20])
    assert report.kills == 4
    assert report.committed_before_kills > 0 and report.rows > report.committed_before_kills
    assert report.duplicates <= report.inflight_at_kills


# -- FreeSWITCH goes away ------------------------------------------------------------------


def _split(call: Call, *, seen_until: str | None) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """(before the gap, during it, after it): the gap ends at the first HANGUP_COMPLETE;
    it starts after the first ``seen_until`` event (None: the whole call up to then)."""
    names = [event_name(body) for body in call.frames]
    end = names.index("CHANNEL_HANGUP_COMPLETE")
    start = names.index(seen_until) + 1 if seen_until else 0
    return call.frames[:start], call.frames[start:end], call.frames[end:]


@pytest.mark.slow
def test_freeswitch_disappears_and_returns(tmp_path: Path) -> None:
    """FreeSWITCH drops the connection, refuses new ones for 1.5 s, then accepts: the
    service reconnects (backoff capped at 1 s), resynchronises with the channels up, and
    calls in progress across the gap get what a connector that never lost the connection
    sends, including a call whose every event before its HANGUP_COMPLETE went out while
    the service was disconnected. The calls go on on the simulated switch meanwhile
    (``play``: ``show channels`` and ``uuid_dump`` answer from them)."""
    answered = [make_call(i, scenario, seed=31) for i, scenario in enumerate(
        ("a_inbound_answered_caller_hangup", "h_ring_group_102_answers",
         "l_blind_transfer_101_to_102", "c_click_to_call_101_to_external"))]
    unseen = [make_call(10 + i, scenario, seed=31) for i, scenario in enumerate(
        ("a_inbound_answered_caller_hangup", "j_outgoing_from_101"))]
    delays = []
    with simulators() as (fs, crm), running_service(tmp_path, fs, crm) as service:
        parts = [_split(c, seen_until="CHANNEL_ANSWER") for c in answered]
        parts += [_split(c, seen_until=None) for c in unseen]
        first = [body for before, _, _ in parts for body in before]
        for cycle in range(3):
            if cycle == 0:  # the calls' beginnings are read before the first drop
                fs.play(first)
                assert wait_until(lambda: service.esl.events_read >= len(first), 10)
            gevent.sleep(0.2)
            fs.drop_clients()
            fs.refuse()
            assert wait_until(lambda: not service.esl.connected, 5)
            if cycle == 0:  # the calls go on while nobody listens
                assert fs.play([b for _, gap, _ in parts for b in gap]) == 0
            gevent.sleep(1.5)
            accepted_at = time.monotonic()
            fs.accept()
            assert fs.wait_connected(10), "no reconnect after FreeSWITCH came back"
            delays.append(time.monotonic() - accepted_at)
        fs.play([body for _, _, after in parts for body in after])
        expected = full = oracle(service, answered + unseen)
        assert wait_delivered(service, crm, expected), "the calls did not complete"
    shown = ", ".join(f"{d:.2f}" for d in delays)
    print(f"\nFAULT freeswitch-gap: reconnected {shown} s after FreeSWITCH accepted again"
          f" (backoff capped at 1 s)")
    got = crm_kinds(crm)
    assert got == expected
    assert service.esl.reconnects == 3
    for call_id, kinds in full.items():  # every part that should end did end
        if "hangup" in kinds:
            assert "hangup" in got.get(call_id, []), call_id
        if "summary" in kinds:
            assert "summary" in got.get(call_id, []), call_id
    for call in unseen:  # first heard of at HANGUP_COMPLETE: still summarised
        ids = set(oracle(service, [call]))
        assert ids and all("summary" in got[cid] for cid in ids), call.scenario


# -- hostile ESL input -----------------------------------------------------------------------


@pytest.mark.slow
def test_hostile_esl_input_is_skipped_and_good_events_around_it_get_through(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """5,000 mutated frames (bad/huge Content-Length, truncated bodies, bad
    percent-encoding, non-UTF-8, missing headers, 70-200 KB values, garbage lines) spread
    between the frames of 30 real calls, written in odd-sized pieces: the connection
    survives, the junk is logged and skipped, and every CC360 event of the good calls
    reaches the outbox, in order (bench/bench_hostile.py does 100,000)."""
    caplog.set_level(logging.WARNING)
    good_calls = [make_call(i, seed=41) for i in range(30)]
    donors = [body for i in range(9) for body in make_call(100 + i, seed=42).frames]
    hostile = mutated_frames(donors, 5000, seed=43)
    good = [body for call in good_calls for body in call.frames]
    stream = hostile_stream(good, hostile, seed=44)
    with simulators() as (fs, crm), running_service(tmp_path, fs, crm) as service:
        expected = oracle(service, good_calls)
        rng = random.Random(45)
        pos = 0
        while pos < len(stream):
            size = rng.choice((1, 7, 100, 4096, 65536, 1 << 20))
            assert fs.push_raw(stream[pos:pos + size]) == 1
            pos += size
        assert wait_delivered(service, crm, expected, timeout=60)
        # still alive and reading: one more ordinary call goes through
        last = make_call(999, "a_inbound_answered_caller_hangup", seed=46)
        fs.push_events(last.frames)
        more = oracle(service, [last])
        assert wait_delivered(service, crm, {**expected, **more}, timeout=30)
        rows = outbox_rows(service)
        esl = service.esl
    size = sum(map(len, hostile)) / 1e6
    print(f"\nFAULT hostile: {len(hostile)} hostile pieces ({size:.0f} MB) among "
          f"{len(good)} good frames: {esl.frames_skipped} frames skipped, "
          f"{esl.events_read} events read, {esl.reconnects} reconnects")
    assert esl.reconnects == 0 and esl.callback_errors == 0
    assert esl.frames_skipped > 0
    assert any("frame_skipped" in r.getMessage() for r in caplog.records)
    for call_id, kinds in {**expected, **more}.items():
        assert [kind for kind, _ in rows[call_id]] == kinds, call_id
    assert crm_kinds(crm).keys() >= {**expected, **more}.keys()


# -- the outbox cannot be written ---------------------------------------------------------------


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@contextlib.contextmanager
def immutable(paths: list[Path]) -> Iterator[Any]:
    """``chattr +i``: even root gets EPERM writing these files (chmod does not stop root)."""
    def chattr(flag: str) -> None:
        subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)

    state = {"on": False}

    def set_on(on: bool) -> None:
        chattr("+i" if on else "-i")
        state["on"] = on

    try:
        yield set_on
    finally:
        if state["on"]:
            chattr("-i")


@contextlib.contextmanager
def small_disk(where: Path, size: str = "4m") -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                   check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path) -> Path:
    """Write a file until the volume is full (ENOSPC)."""
    filler = disk / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as out:  # unbuffered: close() has nothing to flush
        try:
            while True:
                out.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def _can(command: list[str]) -> bool:
    return _is_root() and shutil.which(command[0]) is not None


def _http(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["read-only", "disk-full"])
def test_outbox_unwritable_is_reported_and_recovered(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, fault: str) -> None:
    """The outbox file becomes unwritable under load (``read-only``: ``chattr +i`` on the
    database and its WAL, which stops root too; ``disk-full``: the database on a 4 MB
    tmpfs filled to the last byte). The service says so (an ERROR log, /healthz 503 with
    ``outbox: false``, the ``fs_cc360_outbox_writable`` gauge at 0), keeps the new events
    in its memory spool, sends none of them (nothing uncommitted is delivered); when the
    fault clears, everything is committed and delivered in order."""
    tool = ["chattr"] if fault == "read-only" else ["mount"]
    if not _can(tool):
        pytest.skip(f"needs root and {tool[0]} to inject the fault at the OS level")
    caplog.set_level(logging.WARNING)
    before = [make_call(i, seed=51) for i in range(3)]
    during = [make_call(10 + i, seed=51) for i in range(6)]
    overrides = {"webapi": {"enabled": "true", "listen": "127.0.0.1:0",
                            "token": "fault-test-webapi-token-0123456789"}}
    with contextlib.ExitStack() as stack:
        if fault == "disk-full":
            try:
                disk = stack.enter_context(small_disk(tmp_path / "disk"))
            except subprocess.CalledProcessError as exc:
                pytest.skip(f"cannot mount a tmpfs here: {exc.stderr!r}")
            database = disk / "outbox.sqlite3"
        else:
            database = tmp_path / "outbox.sqlite3"
        fs, crm = stack.enter_context(simulators())
        set_immutable = stack.enter_context(immutable([database, Path(f"{database}-wal")]))
        service = stack.enter_context(running_service(tmp_path, fs, crm, database=database,
                                                      overrides=overrides))
        base = f"http://127.0.0.1:{service.web_server.server_port}"
        fs.push_events([b for call in before for b in call.frames])
        expected_before = oracle(service, before)
        assert wait_delivered(service, crm, expected_before)
        assert _http(base + "/healthz")[0] == 200

        filler = None
        if fault == "read-only":
            set_immutable(True)
        else:
            filler = fill(disk)
        fs.push_events([b for call in during for b in call.frames])
        assert wait_until(lambda: not service.health()["outbox"], 20), \
            "the service did not notice the unwritable outbox"
        assert wait_until(lambda: service.spooled > 0, 5)
        status, body = _http(base + "/healthz")
        metrics = _http(base + "/metrics")[1].decode()
        spooled = service.spooled
        gevent.sleep(1.0)  # time enough to (wrongly) deliver something
        delivered_during_fault = len(crm.events())

        if fault == "read-only":
            set_immutable(False)
        else:
            assert filler is not None
            filler.unlink()
        cleared_at = time.monotonic()
        expected = {**expected_before, **oracle(service, during)}
        assert wait_delivered(service, crm, expected, timeout=60), "no recovery"
        recovered_in = time.monotonic() - cleared_at
        assert wait_until(lambda: service.health()["outbox"], 10)
        healthz_after = _http(base + "/healthz")[0]
    print(f"\nFAULT outbox-{fault}: {spooled} CC360 events held in memory, healthz {status} "
          f"{body!r}; all delivered {recovered_in:.1f} s after the fault cleared")
    assert status == 503 and json.loads(body)["outbox"] is False
    assert "fs_cc360_outbox_writable 0.0" in metrics
    assert delivered_during_fault == sum(len(k) for k in expected_before.values())
    assert healthz_after == 200
    assert crm_kinds(crm) == expected
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    unwritable = [m for m in errors if m.startswith("outbox.unwritable")]
    print(f"FAULT outbox-{fault} logged: " + (unwritable[0] if unwritable else repr(errors[:3])))
    assert unwritable, errors[:5]
    # the operator is told the real cause (SQLite's own rollback used to mask it)
    assert ("disk full" if fault == "disk-full" else "I/O error") in unwritable[0]
