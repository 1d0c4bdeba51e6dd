"""``fs-cc360 demo``: the real service between a simulated FreeSWITCH and a simulated CC360.

Everything runs on 127.0.0.1 with ephemeral ports and a throw-away directory:

1. a simulated CC360 (forms login, BPMCSRF checks) prints every request it accepts;
2. a simulated FreeSWITCH replays real call captures (with fresh UUIDs, timestamps moved
   to now, 10x faster than real time), several calls overlapping;
3. in the middle of the second round the CRM goes down for ``outage`` seconds: the events
   wait in the outbox and are delivered, in order per call, once it is back;
4. the demo checks that every CC360 event the tracker produced reached the CRM exactly in
   per-call order, prints ``outbox stats`` and exits 0 (1 if anything is missing).
"""

from __future__ import annotations

import contextlib
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import gevent

from fs_cc360.config import load_settings
from fs_cc360.events import parse_event
from fs_cc360.outbox import Outbox, OutboxStatus
from fs_cc360.service import Service
from fs_cc360.simulators.captures import demo_frames, demo_scenarios, remap, shift_to_now
from fs_cc360.simulators.crm import FakeCrm, Received
from fs_cc360.simulators.freeswitch import FakeFreeSwitch

ESL_PASSWORD = "demo-esl-password"
CRM_TOKEN = "demo-who-calls-token"
CRM_LOGIN, CRM_PASSWORD = "demo", "demo-password"
WEB_TOKEN = "demo-webapi-token-0123456789"
SPEEDUP = 10.0
ORDER = {"ringing": 0, "answer": 1, "hangup": 2, "summary": 3}


def _describe(rec: Received) -> str:
    p = rec.params
    if rec.endpoint == "PushHistoryData":
        files = len((rec.body or {}).get("FILES") or [])
        return (f"POST PushHistoryData    {p.get('event', '?'):8} user={p.get('user')} "
                f"callerid={p.get('callerid')} duration={p.get('duration')}s files={files} "
                f"id={p.get('id', '')[:8]}")
    return (f"GET  RingingEventHandler {p.get('eventName', '?'):8} user={p.get('user')} "
            f"callerid={p.get('callerid')} id={p.get('id', '')[:8]}")


def _round_frames(scenarios: list[str], seed: int) -> list[tuple[float, bytes]]:
    """One round of calls: every scenario once, fresh UUIDs, starts staggered, merged by
    time. Returns (seconds from the round's start, event body)."""
    rng = random.Random(seed)
    merged: list[tuple[float, bytes]] = []
    now = time.time()
    for n, name in enumerate(scenarios):
        start = now + n * 0.4 + rng.random() * 0.2
        frames = shift_to_now(remap(demo_frames(name), seed * 100 + n), start)
        for body in frames:
            stamp = int(parse_event(body).get("Event-Date-Timestamp") or 0) / 1e6
            merged.append(((stamp - now) / SPEEDUP + n * 0.4 * (1 - 1 / SPEEDUP), body))
    merged.sort(key=lambda item: item[0])
    return merged


def _play(fs: FakeFreeSwitch, frames: list[tuple[float, bytes]]) -> None:
    started = time.monotonic()
    for offset, body in frames:
        delay = offset - (time.monotonic() - started)
        if delay > 0:
            gevent.sleep(delay)
        fs.push_events([body])


def _write_config(tmp: Path, crm: FakeCrm, fs: FakeFreeSwitch) -> Path:
    config = tmp / "demo.ini"
    config.write_text(
        "[freeswitch]\n"
        f"host = 127.0.0.1\nport = {fs.port}\npassword = {ESL_PASSWORD}\n"
        "reconnect_max = 2\n\n"
        "[crm]\n"
        f"url = {crm.url}\nauth = forms\nlogin = {CRM_LOGIN}\npassword = {CRM_PASSWORD}\n"
        f"token = {CRM_TOKEN}\ntimeout = 2\n\n"
        "[outbox]\n"
        f"database = {tmp / 'outbox.sqlite3'}\n\n"
        "[delivery]\nbackoff_initial = 0.2\nbackoff_max = 1\n\n"
        "[calls]\nsummary_wait = 2\n\n"
        "[webapi]\n"
        f"listen = 127.0.0.1:0\ntoken = {WEB_TOKEN}\npublic_url = https://pbx.example.com\n"
        f"recordings_dir = /var/lib/freeswitch/recordings\n\n"
        "[logging]\nlevel = WARNING\n",
        encoding="utf-8",
    )
    return config


def run_demo(*, calls: int = 2, outage: float = 4.0, quiet: bool = False,
             out: TextIO = sys.stdout) -> int:
    def say(text: str) -> None:
        if not quiet:
            print(text, file=out, flush=True)

    scenarios = demo_scenarios()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fs-cc360-demo-")))
        crm = stack.enter_context(FakeCrm(mode="forms", token=CRM_TOKEN, login=CRM_LOGIN,
                                          password=CRM_PASSWORD))
        fs = stack.enter_context(FakeFreeSwitch(password=ESL_PASSWORD))
        config = _write_config(tmp, crm, fs)
        settings = load_settings(config, env={})
        crm.on_request = lambda rec: say(f"  CRM <- {_describe(rec)}") if (
            rec.is_event and rec.accepted) else None

        say(f"Simulated CC360 at {crm.url} (forms login), simulated FreeSWITCH ESL on "
            f"127.0.0.1:{fs.port}, outbox {tmp / 'outbox.sqlite3'}")
        service = Service(settings)
        service.start()
        try:
            if not fs.wait_connected(10):
                print("demo: the service did not connect to the simulated FreeSWITCH",
                      file=out)
                return 1
            say(f"Connected. Replaying {len(scenarios)} real FreeSWITCH calls x {calls} "
                f"({', '.join(s.split('_', 1)[1] for s in scenarios)}), {SPEEDUP:.0f}x speed.")
            for round_no in range(calls):
                frames = _round_frames(scenarios, seed=round_no + 1)
                say(f"\n-- round {round_no + 1}: {len(frames)} ESL events --")
                if outage > 0 and round_no == calls // 2:
                    crm.set_down(True)
                    say(f"-- CRM DOWN (connections refused) for {outage:.0f} s: events are "
                        "held in the outbox --")
                    player = gevent.spawn(_play, fs, frames)
                    gevent.sleep(outage)
                    crm.set_down(False)
                    say("-- CRM back up: the backlog drains, in order per call --")
                    player.join()
                else:
                    _play(fs, frames)
            ok = _wait_drained(service, timeout=60)
        finally:
            service.stop()
        return _report(tmp / "outbox.sqlite3", config, crm, ok, out)


def _wait_drained(service: Service, timeout: float) -> bool:
    """Wait until the tracker has nothing waiting and the outbox nothing left to send."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = service.outbox.stats()
        busy = stats.count(OutboxStatus.pending) + stats.count(OutboxStatus.inflight)
        if not busy and not service.tracker.waiting and not service.spooled:
            return True
        gevent.sleep(0.2)
    return False


def _report(db: Path, config: Path, crm: FakeCrm, drained: bool, out: TextIO) -> int:
    outbox = Outbox(str(db))
    try:
        stats = outbox.stats()
        sent = {row.id: row for row in outbox.list_rows(limit=None)}
    finally:
        outbox.close()
    got: dict[str, list[str]] = {}
    for event in crm.events():
        kind = event.params.get("eventName") or "summary"
        got.setdefault(event.params["id"], []).append(kind)
    expected: dict[str, list[str]] = {}
    for row in sorted(sent.values(), key=lambda r: r.id):
        if row.status == OutboxStatus.delivered:
            expected.setdefault(row.call_key, []).append(row.kind)
    in_order = all(kinds == sorted(kinds, key=ORDER.__getitem__) for kinds in got.values())
    complete = got == expected
    undelivered = stats.total - stats.count(OutboxStatus.delivered)
    print(f"\n$ fs-cc360 --config {config} outbox stats", file=out, flush=True)
    from fs_cc360.cli import main as cli_main

    with contextlib.redirect_stdout(out):
        cli_main(["--config", str(config), "outbox", "stats"])
    print(f"\n{sum(len(v) for v in got.values())} CC360 requests for {len(got)} agent calls; "
          f"per-call order {'kept' if in_order else 'BROKEN'}; "
          f"{'every event delivered exactly once' if complete and not undelivered else 'MISSING or extra events'}; "  # noqa: E501
          f"CRM logins: {crm.logins}.", file=out)
    ok = drained and in_order and complete and not undelivered
    print("demo: OK" if ok else "demo: FAILED", file=out)
    return 0 if ok else 1
