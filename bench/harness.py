"""Shared machinery for the ``bench/`` scripts and ``tests/test_faults.py``.

Everything here runs on 127.0.0.1 with ephemeral ports. Callers must have applied gevent's
monkey-patching before importing this module (the bench scripts do it first thing, the
test suite in ``tests/conftest.py``), exactly as the service does in ``fs_cc360.cli``.

* :func:`make_call`: one call = one real capture from ``tests/captures`` with fresh UUIDs
  (:func:`~fs_cc360.simulators.captures.remap`), timestamps moved to now, and only the
  events the service subscribes to (FreeSWITCH never sends the others).
* :func:`expected_events`: what the tracker makes of those calls, computed offline with
  the same :class:`~fs_cc360.calls.TrackerConfig` the service uses (the oracle), and which
  ESL event produced each CC360 event (the latency bench needs it).
* :class:`CallPlayer`: plays calls into a :class:`FakeFreeSwitch` at a given rate with the
  captures' own timing (optionally compressed), recording when each frame was written.
* :func:`write_config` / :class:`ServiceProcess`: the real ``fs-cc360 run`` in a
  subprocess (kill -9, restart, RSS from ``/proc``).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
import gevent.event

from fs_cc360.calls import CallTracker, CrmEvent, TrackerConfig
from fs_cc360.config import load_settings
from fs_cc360.events import parse_event
from fs_cc360.outbox import NewItem
from fs_cc360.recordings import RecordingLinks
from fs_cc360.service import SUBSCRIBED_EVENTS, new_item, tracker_config
from fs_cc360.simulators import wait_until  # noqa: F401 - used by the benches
from fs_cc360.simulators.captures import remap, shift_to_now
from fs_cc360.simulators.crm import FakeCrm
from fs_cc360.simulators.freeswitch import FakeFreeSwitch, event_name
from tests.fakes.captures import SCENARIOS, capture_frames

ROOT = Path(__file__).resolve().parent.parent
ESL_PASSWORD = "bench-esl-password"
CRM_TOKEN = "bench-who-calls-token"
CRM_LOGIN, CRM_PASSWORD = "bench", "bench-password"
WEB_TOKEN = "bench-webapi-token-0123456789"
#: The order of one agent part's CC360 events.
ORDER = {"ringing": 0, "answer": 1, "hangup": 2, "summary": 3}
_SUBSCRIBED = frozenset(SUBSCRIBED_EVENTS)

# -- calls -------------------------------------------------------------------------------


@functools.cache
def subscribed_frames(scenario: str) -> tuple[bytes, ...]:
    """A capture's event bodies that the service subscribes to, in arrival order."""
    return tuple(b for b in capture_frames(scenario) if event_name(b).upper() in _SUBSCRIBED)


def _stamp(body: bytes) -> float:
    marker = b"\nEvent-Date-Timestamp: "
    start = body.find(marker)
    if start < 0:
        return 0.0
    start += len(marker)
    return int(body[start:body.index(b"\n", start)]) / 1e6


@dataclass
class Call:
    """One call to replay: its frames and each frame's offset from the call's start."""

    index: int
    scenario: str
    frames: list[bytes]
    offsets: list[float]

    @property
    def duration(self) -> float:
        return self.offsets[-1] if self.offsets else 0.0


def make_call(index: int, scenario: str | None = None, *, start: float | None = None,
              seed: int = 0) -> Call:
    """Call number ``index``: a real capture (round-robin over every scenario unless one is
    given), fresh UUIDs derived from ``(seed, index)``, first event at ``start`` (now)."""
    name = scenario or SCENARIOS[index % len(SCENARIOS)]
    frames = remap(list(subscribed_frames(name)), seed * 1_000_003 + index)
    frames = shift_to_now(frames, start)
    stamps = [_stamp(b) for b in frames]
    first = min(stamps) if stamps else 0.0
    return Call(index, name, frames, [s - first for s in stamps])


@dataclass
class Expected:
    """What the tracker makes of some calls (the oracle).

    ``by_call``: CC360 id -> kinds in order. ``producer``: ``(id, kind)`` -> ``(call
    index, frame index)`` of the ESL event whose ``feed`` returned it, or ``(call index,
    None)`` when only the summary timer released it.
    """

    by_call: dict[str, list[str]] = field(default_factory=dict)
    producer: dict[tuple[str, str], tuple[int, int | None]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(len(kinds) for kinds in self.by_call.values())

    def keys(self) -> set[tuple[str, str]]:
        return {(cid, kind) for cid, kinds in self.by_call.items() for kind in kinds}


def expected_events(calls: Iterable[Call], config: TrackerConfig) -> Expected:
    """Feed each call (all its frames) through a fresh tracker, then let every timer run."""
    out = Expected()
    for call in calls:
        tracker = CallTracker(config)
        last = 0.0
        for j, body in enumerate(call.frames):
            event = parse_event(body)
            last = max(last, _stamp(body))
            for crm_event in tracker.feed(event):
                out.by_call.setdefault(crm_event.call_id, []).append(crm_event.kind)
                out.producer[(crm_event.call_id, crm_event.kind)] = (call.index, j)
        for crm_event in tracker.tick(last + 24 * 3600):
            out.by_call.setdefault(crm_event.call_id, []).append(crm_event.kind)
            out.producer[(crm_event.call_id, crm_event.kind)] = (call.index, None)
    return out


class CallPlayer:
    """Plays calls into ``fs``: call ``i`` starts at ``i / rate`` seconds, each frame at
    its capture offset divided by ``speedup``. Frames due together go out in one write.

    ``pushed[(call, frame)]`` is ``time.time()`` just before the write carrying that frame
    (``lost`` counts frames written while no client was connected: FreeSWITCH drops
    those too). Stops after ``calls`` calls have started and finished, or on :meth:`stop`
    (calls already started are then cut short).
    """

    def __init__(self, fs: FakeFreeSwitch, *, rate: float, calls: int | None = None,
                 speedup: float = 1.0, seed: int = 0,
                 make: Callable[[int, float], Call] | None = None) -> None:
        self.fs = fs
        self.rate = rate
        self.calls_limit = calls
        self.speedup = speedup
        self.seed = seed
        self._make = make or (lambda i, start: make_call(i, start=start, seed=seed))
        self.calls: list[Call] = []
        self.pushed: dict[tuple[int, int], float] = {}
        self.frames_pushed = 0
        self.lost = 0
        self.max_lag = 0.0  #: how late a frame went out at worst (the pusher's own delay)
        self._stop = gevent.event.Event()
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> CallPlayer:
        self._greenlet = gevent.spawn(self.run)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._greenlet is not None:
            self._greenlet.join(10)

    def join(self, timeout: float | None = None) -> bool:
        assert self._greenlet is not None
        self._greenlet.join(timeout)
        return self._greenlet.dead

    @property
    def started_calls(self) -> int:
        return len(self.calls)

    def run(self) -> None:
        t0 = time.monotonic()
        wall0 = time.time()
        heap: list[tuple[float, int, int]] = []  # (due, call, frame)
        next_call = 0
        while not self._stop.is_set():
            now = time.monotonic() - t0
            while (self.calls_limit is None or next_call < self.calls_limit) \
                    and next_call / self.rate <= now:
                begin = next_call / self.rate
                call = self._make(next_call, wall0 + begin)
                self.calls.append(call)
                for j, offset in enumerate(call.offsets):
                    heapq.heappush(heap, (begin + offset / self.speedup, call.index, j))
                next_call += 1
            batch: list[tuple[int, int]] = []
            while heap and heap[0][0] <= now:
                due, i, j = heapq.heappop(heap)
                self.max_lag = max(self.max_lag, now - due)
                batch.append((i, j))
            if batch:
                stamp = time.time()
                written = self.fs.push_events([self.calls[i].frames[j] for i, j in batch])
                for key in batch:
                    self.pushed[key] = stamp
                self.frames_pushed += len(batch)
                if written < len(batch):
                    self.lost += len(batch) - written
                continue
            if not heap and self.calls_limit is not None and next_call >= self.calls_limit:
                return
            upcoming = [heap[0][0]] if heap else []
            if self.calls_limit is None or next_call < self.calls_limit:
                upcoming.append(next_call / self.rate)
            wait = max(0.0, min(upcoming) - (time.monotonic() - t0)) if upcoming else 0.05
            self._stop.wait(min(wait, 0.05))


# -- outbox rows -------------------------------------------------------------------------


def real_events() -> list[CrmEvent]:
    """Every CC360 event the tracker makes from the captures (default settings)."""
    config = tracker_config(load_settings(None, env={}, require_crm=False))
    out: list[CrmEvent] = []
    for scenario in SCENARIOS:
        tracker = CallTracker(config)
        last = 0.0
        for body in subscribed_frames(scenario):
            event = parse_event(body)
            out += tracker.feed(event)
            last = float(event.get("Event-Date-Timestamp") or 0) / 1e6
        out += tracker.tick(last + 3600)
    return out


def iter_items(count: int, *, seed: int = 0) -> Iterator[NewItem]:
    """``count`` outbox items, made lazily: the captures' CC360 events again and again,
    each call under a fresh id (several rows per call, as in production), recording
    links included, ``event_at`` = now."""
    links = RecordingLinks("https://pbx.example.com", "/var/lib/freeswitch/recordings",
                           secret=b"bench-recording-secret")
    calls: dict[str, list[CrmEvent]] = {}
    for event in real_events():
        calls.setdefault(event.call_id, []).append(event)
    now = time.time()
    made = n = 0
    while True:
        for events in calls.values():
            call_id = str(uuid.UUID(int=(seed << 64) + n, version=4))
            n += 1
            for event in events:
                if made >= count:
                    return
                made += 1
                yield new_item(dataclasses.replace(event, call_id=call_id, at=now), links)


def make_items(count: int, *, seed: int = 0) -> list[NewItem]:
    return list(iter_items(count, seed=seed))


# -- the CRM side ------------------------------------------------------------------------


def kind_of(params: Mapping[str, str]) -> str:
    """``ringing``/``answer``/``hangup`` for RingingEventHandler, ``summary`` otherwise."""
    return params.get("eventName") or "summary"


def crm_kinds(crm: FakeCrm) -> dict[str, list[str]]:
    """CC360 id -> kinds the fake CRM accepted, in arrival order (duplicates included)."""
    got: dict[str, list[str]] = {}
    for event in crm.events():
        got.setdefault(event.params["id"], []).append(kind_of(event.params))
    return got


def in_order(kinds: list[str]) -> bool:
    return kinds == sorted(kinds, key=ORDER.__getitem__)


# -- the service as a process ------------------------------------------------------------


def write_config(path: Path, *, fs_port: int, crm_url: str, database: Path | str,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """An INI for the service: short timeouts and backoffs, web API off, WARNING logs.
    ``overrides`` adds or replaces keys per section."""
    sections: dict[str, dict[str, Any]] = {
        "freeswitch": {"host": "127.0.0.1", "port": fs_port, "password": ESL_PASSWORD,
                       "connect_timeout": 2, "reconnect_max": 1},
        "crm": {"url": crm_url, "auth": "forms", "login": CRM_LOGIN, "password": CRM_PASSWORD,
                "token": CRM_TOKEN, "timeout": 2},
        "outbox": {"database": str(database)},
        "delivery": {"backoff_initial": 0.1, "backoff_max": 1, "lease_seconds": 15},
        "calls": {"summary_wait": 1},
        "webapi": {"enabled": "false", "public_url": "https://pbx.example.com",
                   "recording_secret": "bench-recording-secret-0123456789",
                   "recordings_dir": "/var/lib/freeswitch/recordings"},
        "logging": {"level": "WARNING"},
    }
    for section, values in (overrides or {}).items():
        sections.setdefault(section, {}).update(values)
    text = "".join(
        f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) + "\n"
        for name, values in sections.items())
    path.write_text(text, encoding="utf-8")
    return path


def new_crm(**kwargs: Any) -> FakeCrm:
    """A started fake CC360 with the credentials :func:`write_config` uses."""
    return FakeCrm(mode="forms", token=CRM_TOKEN, login=CRM_LOGIN, password=CRM_PASSWORD,
                   **kwargs).start()


class RemoteCrm:
    """The fake CC360 in a child process (``bench/crm_process.py``), so its CPU is not
    charged to the connector under test. ``url``, :meth:`count`, :meth:`events`,
    :meth:`set_down`, :meth:`set_latency`, :meth:`stop`."""

    def __init__(self, *, latency: float = 0.0, keep: bool = True) -> None:
        cmd = [sys.executable, str(ROOT / "bench" / "crm_process.py"), "--latency",
               str(latency), "--token", CRM_TOKEN, "--login", CRM_LOGIN,
               "--password", CRM_PASSWORD]
        if not keep:
            cmd.append("--no-keep")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=str(ROOT))
        hello = self._read()
        self.url: str = hello["url"]
        self.pid: int = hello["pid"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fake CRM process died")
        return json.loads(line)

    def _ask(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode())
        self.proc.stdin.flush()
        return self._read()

    def count(self) -> int:
        """Accepted CC360 event requests so far."""
        return int(self._ask("count")["accepted"])

    def events(self) -> list[tuple[str, str, float]]:
        """``(id, kind, received at)`` of every accepted event request, in arrival order."""
        return [tuple(e) for e in self._ask("events")["events"]]  # type: ignore[misc]

    def set_down(self, down: bool) -> None:
        self._ask("down" if down else "up")

    def set_latency(self, seconds: float) -> None:
        self._ask("latency", value=seconds)

    def wait_for(self, count: int, timeout: float, interval: float = 0.05) -> bool:
        return wait_until(lambda: self.count() >= count, timeout, interval)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self._ask("quit")
            except (OSError, RuntimeError, ValueError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> RemoteCrm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def new_fs() -> FakeFreeSwitch:
    fs = FakeFreeSwitch(password=ESL_PASSWORD)
    fs.accept()
    return fs


class ServiceProcess:
    """``fs-cc360 --config CONFIG run`` as a child process (stdout+stderr to ``log``)."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> ServiceProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("FS_CC360_CONFIG", None)
        with open(self.log, "ab") as out:
            out.write(f"--- start {self.starts + 1} at {time.time():.3f}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fs_cc360.cli", "--config", str(self.config), "run"],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        self.starts += 1
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed, the outbox is left as it is."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful stop), SIGKILL if it does not exit within ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def status_mb(self) -> dict[str, float]:
        return proc_status_mb(self.pid)

    def cpu_seconds(self) -> float:
        """User + system CPU time the process used so far."""
        return proc_cpu_seconds(self.pid)

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


# -- small utilities -----------------------------------------------------------------------


def proc_status_mb(pid: int | str = "self") -> dict[str, float]:
    """``VmRSS`` / ``VmHWM`` (peak RSS) of a process, in MB, from ``/proc/<pid>/status``."""
    out: dict[str, float] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def proc_cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process (``/proc/<pid>/stat``), 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def machine() -> str:
    """A one-line description of where the figures were measured."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({model or 'unknown CPU'}), Python "
            f"{sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M %Z')}")


def report(name: str, value: float, goal: str, note: str = "") -> str:
    """The last line every bench prints: ``RATIO name=12.3x (goal >= 10x) note``."""
    line = f"RATIO {name}={value:.2f}x ({goal})"
    return line + (f" {note}" if note else "")


# -- kill -9 under load ----------------------------------------------------------------------


@dataclass(frozen=True)
class OutboxSnapshot:
    """Every row of an outbox file at one moment: id -> (call key, kind, status)."""

    rows: dict[int, tuple[str, str, str]]

    def ids(self, status: str) -> set[int]:
        return {i for i, (_, _, s) in self.rows.items() if s == status}

    @property
    def open_rows(self) -> int:
        return sum(1 for _, _, s in self.rows.values() if s in ("pending", "inflight"))


def read_outbox(path: Path) -> OutboxSnapshot:
    """Read the outbox with plain sqlite3 (WAL included), as another process would."""
    db = sqlite3.connect(str(path), timeout=10)
    try:
        rows = {row[0]: (row[1], row[2], row[3]) for row in db.execute(
            "SELECT id, call_key, kind, status FROM outbox")}
    finally:
        db.close()
    return OutboxSnapshot(rows)


@dataclass
class CrashReport:
    """What ``kill -9`` did to delivery. See :func:`crash_cycles`."""

    kills: int = 0
    calls_started: int = 0
    frames_lost: int = 0  #: ESL frames played while no service was connected
    expected_events: int = 0  #: CC360 events the tracker makes of the calls played
    rows: int = 0  #: rows in the outbox at the end
    committed_before_kills: int = 0  #: distinct rows seen committed in a post-kill snapshot
    inflight_at_kills: int = 0  #: rows in flight in a post-kill snapshot (may be repeated)
    delivered_once: int = 0
    duplicates: int = 0  #: extra deliveries, all of rows that were in flight at a kill
    duplicate_rows: int = 0  #: rows delivered more than once
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.kills} kills, {self.calls_started} calls played in full, "
                f"{self.expected_events} CC360 events they make ({self.frames_lost} ESL "
                f"frames played while the service was down), {self.rows} committed rows, "
                f"{self.committed_before_kills} of them committed before a kill "
                f"({self.inflight_at_kills} in flight at a kill); delivered exactly once "
                f"{self.delivered_once}, duplicate deliveries {self.duplicates} "
                f"(of {self.duplicate_rows} rows), problems {len(self.problems)}")


def crash_cycles(tmp: Path, *, kills: int, seed: int, rate: float = 20.0,
                 speedup: float = 10.0, crm_latency: float = 0.02,
                 pause: tuple[float, float] = (0.3, 1.5),
                 say: Callable[[str], None] = lambda text: None) -> CrashReport:
    """Run ``fs-cc360 run`` under a steady call load and ``kill -9`` it ``kills`` times at
    random moments, restarting it each time; then let it drain and check every row.

    Rules checked (each violation is a line in ``CrashReport.problems``):

    * every row in the outbox (committed) ends ``delivered`` and reached the CRM;
    * a row the CRM got more than once was ``inflight`` in a snapshot taken right after
      some kill (its request may have been answered just before the kill);
    * a row already ``delivered`` at a kill is never sent again (unless it was in flight at
      an earlier kill);
    * the CRM got nothing that is not in the outbox, and no (call, kind) is enqueued twice.
    """
    import random

    rng = random.Random(seed)
    report = CrashReport()
    crm = new_crm()
    crm.latency = crm_latency
    fs = new_fs()
    db = tmp / "outbox.sqlite3"
    config = write_config(tmp / "service.ini", fs_port=fs.port, crm_url=crm.url, database=db,
                          overrides={"delivery": {"realtime_ttl": 3600}})
    service = ServiceProcess(config, tmp / "service.log")
    snapshots: list[OutboxSnapshot] = []
    player: CallPlayer | None = None
    try:
        service.start()
        if not fs.wait_connected(30):
            raise AssertionError("the service did not connect:\n" + service.log_text())
        player = CallPlayer(fs, rate=rate, speedup=speedup, seed=seed).start()
        for n in range(kills):
            gevent.sleep(rng.uniform(*pause))
            service.kill9()
            report.kills += 1
            snapshot = read_outbox(db)
            snapshots.append(snapshot)
            say(f"kill {n + 1}: {len(snapshot.rows)} rows committed, "
                f"{len(snapshot.ids('inflight'))} in flight, "
                f"{len(snapshot.ids('delivered'))} delivered")
            service.start()
            if not fs.wait_connected(30):
                raise AssertionError("no reconnect after a restart:\n" + service.log_text())
        gevent.sleep(rng.uniform(*pause))
        player.stop()
        # Drain; a graceful stop then flushes the summaries of calls cut short (they were
        # waiting for legs that will never end) into the outbox, so start once more to
        # deliver those, until a stop leaves nothing open.
        for _ in range(3):
            calm = [0]

            def drained(calm: list[int] = calm) -> bool:
                calm[0] = calm[0] + 1 if read_outbox(db).open_rows == 0 else 0
                return calm[0] >= 4
            if not wait_until(drained, timeout=120, interval=0.5):
                report.problems.append("the outbox did not drain within 120 s")
                break
            service.stop()
            if read_outbox(db).open_rows == 0:
                break
            service.start()
    finally:
        if player is not None:
            player.stop()
        if service.alive:
            service.stop()
        fs.close()
        crm.stop()
    final = read_outbox(db)
    report.calls_started = player.started_calls if player else 0
    report.frames_lost = player.lost if player else 0
    if player is not None:  # calls cut short by the end of the run are left out
        complete = [call for call in player.calls if all(
            (call.index, j) in player.pushed for j in range(len(call.frames)))]
        report.calls_started = len(complete)
        config_tracker = tracker_config(load_settings(config, env={}))
        report.expected_events = expected_events(complete, config_tracker).total
    _check_crashes(report, snapshots, final, crm)
    return report


def _check_crashes(report: CrashReport, snapshots: list[OutboxSnapshot],
                   final: OutboxSnapshot, crm: FakeCrm) -> None:
    problems = report.problems
    report.rows = len(final.rows)
    by_key: dict[tuple[str, str], int] = {}
    for row_id, (key, kind, status) in final.rows.items():
        if (key, kind) in by_key:
            problems.append(f"({key}, {kind}) enqueued twice: rows {by_key[(key, kind)]} "
                            f"and {row_id}")
        by_key[(key, kind)] = row_id
        if status != "delivered":
            problems.append(f"row {row_id} ({key[:8]} {kind}) ended {status}")
    received: dict[tuple[str, str], int] = {}
    for event in crm.events():
        key = (event.params["id"], kind_of(event.params))
        received[key] = received.get(key, 0) + 1
    for key in received:
        if key not in by_key:
            problems.append(f"the CRM got {key} which is in no outbox row")
    was_inflight: set[int] = set()
    committed: set[int] = set()
    for snapshot in snapshots:
        committed |= snapshot.rows.keys()
        was_inflight |= snapshot.ids("inflight")
    report.committed_before_kills = len(committed)
    report.inflight_at_kills = len(was_inflight)
    for row_id in committed:
        if row_id not in final.rows:
            problems.append(f"row {row_id} committed before a kill is gone")
    # Delivered at kill k and sent again later is a bug unless in flight at an earlier kill.
    delivered_at: dict[int, int] = {}
    for k, snapshot in enumerate(snapshots):
        for row_id in snapshot.ids("delivered"):
            delivered_at.setdefault(row_id, k)
    for row_id, (key, kind, _) in final.rows.items():
        count = received.get((key, kind), 0)
        if count == 0:
            problems.append(f"row {row_id} ({key[:8]} {kind}) never reached the CRM")
        elif count == 1:
            report.delivered_once += 1
        else:
            report.duplicates += count - 1
            report.duplicate_rows += 1
            if row_id not in was_inflight:
                problems.append(f"row {row_id} ({key[:8]} {kind}) delivered {count} times "
                                f"but was never in flight at a kill")
            elif row_id in delivered_at and not any(
                    row_id in s.ids("inflight") for s in snapshots[:delivered_at[row_id]]):
                problems.append(f"row {row_id} ({key[:8]} {kind}) sent again after it was "
                                f"marked delivered")
