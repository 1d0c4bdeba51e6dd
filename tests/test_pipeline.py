"""End to end over real sockets: fake FreeSWITCH -> the real Service -> fake CC360.

Each real capture is replayed into the running service; the test then checks the exact
HTTP requests the CRM received (path, query, JSON body, auth headers), written down from
the capture (tests/test_calls.py holds the expected events and says why).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest

from fs_cc360.config import Settings, load_settings
from fs_cc360.outbox import Outbox, OutboxStatus
from fs_cc360.service import Service
from fs_cc360.simulators import wait_until
from fs_cc360.simulators.crm import FakeCrm
from tests.fakes.captures import SCENARIOS, capture_frames, interleave, remap, shift_to_now
from tests.fakes.esl import FakeFreeSwitch
from tests.test_calls import CALLER, EXPECTED, REC, run

ESL_PASSWORD = "test-esl-secret"
CRM_TOKEN = "who-calls-token"
WEB_TOKEN = "webapi-token-0123456789abcdef"
SECRET = "recording-secret-for-tests"
PUBLIC = "https://pbx.example.com"
REPO = Path(__file__).resolve().parent.parent


def _overrides(fs: FakeFreeSwitch, crm: FakeCrm, tmp: Path, extra: dict | None = None) -> dict:
    values = {
        "freeswitch": {"host": "127.0.0.1", "port": str(fs.port), "password": ESL_PASSWORD,
                       "reconnect_max": "0.5"},
        "crm": {"url": crm.url, "auth": crm.mode, "login": "admin", "password": "secret",
                "token": CRM_TOKEN, "timeout": "2"},
        "outbox": {"database": str(tmp / "outbox.sqlite3")},
        "delivery": {"backoff_initial": "0.05", "backoff_max": "0.3", "concurrency": "4"},
        "calls": {"summary_wait": "1"},
        "webapi": {"listen": "127.0.0.1:0", "token": WEB_TOKEN, "public_url": PUBLIC,
                   "recording_secret": SECRET},
    }
    for section, keys in (extra or {}).items():
        values.setdefault(section, {}).update(keys)
    return values


@contextlib.contextmanager
def running(fs: FakeFreeSwitch, crm: FakeCrm, tmp: Path, extra: dict | None = None,
            connected: bool = True) -> Iterator[Service]:
    """The real Service on ``tmp``'s outbox, between ``fs`` and ``crm``; stopped on exit."""
    service = Service(load_settings(None, env={}, overrides=_overrides(fs, crm, tmp, extra)))
    service.start()
    try:
        if connected:
            assert fs.wait_connected(10), "the service did not connect to FreeSWITCH"
        yield service
    finally:
        service.stop()


@contextlib.contextmanager
def pipeline(tmp: Path, mode: str = "forms", **extra: dict
             ) -> Iterator[tuple[Service, FakeFreeSwitch, FakeCrm]]:
    with FakeCrm(mode=mode, token=CRM_TOKEN) as crm, \
            FakeFreeSwitch(password=ESL_PASSWORD) as fs, running(fs, crm, tmp, extra) as service:
        yield service, fs, crm


def drained(service: Service) -> bool:
    stats = service.outbox.stats()
    return (not service.spooled and not service.tracker.waiting
            and stats.count(OutboxStatus.pending) + stats.count(OutboxStatus.inflight) == 0)


def signed_link(path: str) -> str:
    rel = path.removeprefix(REC)
    token = hmac.new(SECRET.encode(), rel.encode(), hashlib.sha256).hexdigest()[:32]
    return f"{PUBLIC}/{token}/recording/{rel}"


def expected_requests(scenario: str, frames: list[bytes]) -> list[tuple]:
    """EXPECTED[scenario] as the CRM must receive it: full ids, exact params and FILES."""
    text = b"".join(frames).decode()
    import re

    uuids = set(re.findall(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                           text))

    def full(prefix: str) -> str:
        (match,) = [u for u in uuids if u.startswith(prefix)]
        return match

    recorded = set(re.findall(r"\nRecord-File-Path: ([^\n]+)", text))

    def recording(prefix: str) -> str:
        """The path FreeSWITCH recorded to (the stock captures use day folders)."""
        (match,) = [p for p in recorded if p.rpartition("/")[2].startswith(full(prefix))]
        return match

    out = []
    for kind, call, user, callerid, direction, duration, files in EXPECTED[scenario]:
        if kind == "summary":
            params = {"id": full(call), "callerid": callerid, "user": user,
                      "event": direction, "duration": str(duration)}
            body = {"FILES": [signed_link(recording(f)) for f in files]}
            out.append(("PushHistoryData", params, body))
        else:
            params = {"id": full(call), "eventName": kind, "callerid": callerid, "user": user}
            out.append(("RingingEventHandler", params, None))
    return out


def heard_everything(frames: list[bytes]) -> list[tuple]:
    """The CC360 requests of a connector that heard every event of ``frames``."""
    out = []
    for e in run(frames):
        if e.kind == "summary":
            out.append(("PushHistoryData",
                        {"id": e.call_id, "callerid": e.callerid, "user": e.user,
                         "event": e.direction, "duration": str(e.duration)},
                        {"FILES": [signed_link(f) for f in e.files]}))
        else:
            out.append(("RingingEventHandler", {"id": e.call_id, "eventName": e.kind,
                                                "callerid": e.callerid, "user": e.user}, None))
    return out


def by_id(events: list) -> dict[str, list]:
    calls: dict[str, list] = {}
    for event in events:
        calls.setdefault(event[1]["id"], []).append(tuple(event))
    return calls


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_capture_end_to_end_exact_requests(scenario: str, tmp_path: Path) -> None:
    frames = shift_to_now(capture_frames(scenario))
    expected = expected_requests(scenario, frames)
    with pipeline(tmp_path) as (service, fs, crm):
        fs.push_events(frames)
        assert wait_until(lambda: drained(service) and len(crm.events()) >= len(expected))
        gevent.sleep(0.2)  # nothing more may arrive
        got = [tuple(e) for e in crm.events()]
        assert by_id(got) == by_id(expected)
        assert len(got) == len(expected)
        # forms mode: every event request carried the session cookie and the BPMCSRF header
        for rec in crm.event_requests():
            assert rec.headers.get("bpmcsrf")
            assert ".aspxauth=" in rec.headers.get("cookie", "").lower()
            assert rec.method == ("POST" if rec.endpoint == "PushHistoryData" else "GET")
            assert f"/0/rest/OmniWhoCallsService/{CRM_TOKEN}/" in rec.path
        assert crm.logins == (1 if expected else 0)


def test_anonymous_mode_uses_the_service_path_and_never_logs_in(tmp_path: Path) -> None:
    frames = shift_to_now(capture_frames("a_inbound_answered_caller_hangup"))
    with pipeline(tmp_path, mode="anonymous",
                  crm={"auth": "anonymous", "login": "", "password": ""}) as (service, fs, crm):
        fs.push_events(frames)
        assert wait_until(lambda: len(crm.events()) >= 4 and drained(service))
        assert crm.logins == 0
        for rec in crm.event_requests():
            assert f"/0/ServiceModel/OmniWhoCallsService.svc/{CRM_TOKEN}/" in rec.path
            assert "bpmcsrf" not in rec.headers


def test_contact_center_calls_interleaved_with_the_others_end_to_end(tmp_path: Path) -> None:
    """q1, p1 and r1 with fresh UUIDs and caller numbers, interleaved with every other
    capture on one connection: the CRM gets exactly the requests of each call heard
    alone (the tracker's rules are checked per capture in tests/test_calls.py)."""
    calls = []
    for n, scenario in enumerate(SCENARIOS):
        number = b"7812%07d" % (500 + n)
        calls.append(remap(capture_frames(scenario), 500 + n,
                           replace={CALLER.encode(): number}))
    assert {"q1_queue_first_agent_no_answer", "p1_call_pickup_102_intercepts_101",
            "r1_loopback_ring_group_102_answers"} <= set(SCENARIOS)
    stream = shift_to_now(interleave(calls, seed=11))
    want: list[tuple] = []
    for frames in calls:
        want += heard_everything(shift_to_now(frames))
    with pipeline(tmp_path) as (service, fs, crm):
        fs.push_events(stream)
        assert wait_until(lambda: drained(service) and len(crm.events()) >= len(want), 30)
        gevent.sleep(0.3)
        got = by_id([tuple(e) for e in crm.events()])
    assert got == by_id(want)


@pytest.mark.parametrize("skew", [-900, 900], ids=["freeswitch-15min-behind",
                                                   "freeswitch-15min-ahead"])
def test_popups_survive_a_skewed_freeswitch_clock(skew: int, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """FreeSWITCH on another host with its clock 15 minutes off: the popups' age counts
    from when the connector read the events, so none expires; one warning says so, and
    the offset gauge shows it (positive: FreeSWITCH behind)."""
    caplog.set_level("INFO")
    scenario = "q1_queue_first_agent_no_answer"
    frames = shift_to_now(capture_frames(scenario), now=time.time() + skew)
    expected = expected_requests(scenario, frames)
    with pipeline(tmp_path) as (service, fs, crm):
        fs.push_events(frames)
        assert wait_until(lambda: drained(service) and len(crm.events()) >= len(expected))
        assert by_id([tuple(e) for e in crm.events()]) == by_id(expected)
        assert service.outbox.stats().count(OutboxStatus.expired) == 0
        # the replay sends the 9 s call at once: its timestamps span 9 s more than that
        assert service.clock_offset.offset == pytest.approx(-skew, abs=15)
        assert wait_until(lambda: b"fs_cc360_freeswitch_clock_skewed 1.0"
                          in service.metrics.render()[0])
        # a second call, same skew: no second warning
        fs.push_events(shift_to_now(remap(capture_frames("a_inbound_answered_caller_hangup"),
                                          3), now=time.time() + skew))
        assert wait_until(lambda: drained(service) and len(crm.events()) >= len(expected) + 4)
    warnings = [r for r in caplog.records if r.getMessage().startswith("clock.skew")]
    assert len(warnings) == 1
    assert ("behind" if skew < 0 else "ahead of") in warnings[0].getMessage()
    assert "outbox.expired" not in caplog.text


def test_interleaved_calls_on_one_connection_with_crm_outage(tmp_path: Path) -> None:
    """Every capture three times with fresh UUIDs, interleaved; the CRM is down while they
    arrive, then comes back: everything arrives, each call's events in order."""
    calls = [remap(capture_frames(s), seed * 100 + n)
             for seed in range(3) for n, s in enumerate(SCENARIOS)]
    stream = shift_to_now(interleave(calls, seed=7))
    expected_count = 3 * sum(len(v) for v in EXPECTED.values())
    with pipeline(tmp_path) as (service, fs, crm):
        crm.set_down(True)
        fs.push_events(stream)
        assert wait_until(lambda: not service.spooled and service.outbox.stats().total
                          == expected_count)
        gevent.sleep(0.5)
        assert crm.events() == []  # nothing could be delivered
        assert service.outbox.stats().count(OutboxStatus.delivered) == 0
        crm.set_down(False)
        assert wait_until(lambda: drained(service), timeout=30)
        got = crm.events()
        assert len(got) == expected_count
        order = {"ringing": 0, "answer": 1, "hangup": 2}
        for events in by_id([tuple(e) for e in got]).values():
            kinds = [order.get(e[1].get("eventName"), 3) for e in events]
            assert kinds == sorted(kinds)
            assert kinds.count(3) <= 1  # one summary per agent call
        assert service.outbox.stats().count(OutboxStatus.delivered) == expected_count


def test_session_expiry_mid_stream_relogs_in_once(tmp_path: Path) -> None:
    with pipeline(tmp_path) as (service, fs, crm):
        fs.push_events(shift_to_now(capture_frames("a_inbound_answered_caller_hangup")))
        assert wait_until(lambda: len(crm.events()) >= 4 and drained(service))
        crm.expire_sessions("redirect")
        fs.push_events(shift_to_now(remap(capture_frames("h_ring_group_102_answers"), 5)))
        assert wait_until(lambda: len(crm.events()) >= 10 and drained(service))
        assert crm.logins == 2


def test_click_to_call_through_the_web_api_is_reported_as_outgoing(tmp_path: Path) -> None:
    """makecall -> bgapi originate with cc360 tags; the (tagged) legs FreeSWITCH then
    reports give an outgoing summary, never an incoming popup for the agent."""
    import requests

    with pipeline(tmp_path) as (service, fs, crm):
        port = service.web_server.server_port
        url = f"http://127.0.0.1:{port}/webapi/{WEB_TOKEN}/makecall"
        response = requests.get(url, params={"first": "101", "second": "+7 999 123-45-67"},
                                timeout=5)
        assert response.status_code == 200, response.text
        call_id = response.json()["id"]
        command = fs.wait_for_command("bgapi originate", timeout=5)
        assert command is not None
        assert f"origination_uuid={call_id}" in command
        assert "cc360_direction=outgoing" in command and "cc360_client=79991234567" in command
        assert "user/101 79991234567 XML default" in command
        # FreeSWITCH's legs for that originate: the capture c, with our uuid and tags
        old = b"48154cd9-361e-4787-a2ac-f22bc528d3c7"
        tags = (b"\nvariable_cc360_direction: outgoing\nvariable_cc360_agent: 101\n"
                b"variable_cc360_client: 79991234567\n")
        frames = [b.replace(old, call_id.encode()).replace(b"\nvariable_dialed_user: 101\n",
                                                           b"\nvariable_dialed_user: 101" + tags)
                  for b in capture_frames("c_click_to_call_101_to_external")]
        fs.push_events(shift_to_now(frames))
        assert wait_until(lambda: len(crm.events()) >= 1 and drained(service))
        gevent.sleep(0.2)
        (summary,) = crm.events()
        assert summary.endpoint == "PushHistoryData"
        assert summary.params == {"id": call_id, "callerid": CALLER, "user": "101",
                                  "event": "outgoing", "duration": "3"}
        assert summary.body == {"FILES": [signed_link(f"{REC}{call_id}.wav")]}


def test_healthz_follows_freeswitch(tmp_path: Path) -> None:
    import requests

    with pipeline(tmp_path) as (service, fs, crm):
        url = f"http://127.0.0.1:{service.web_server.server_port}/healthz"
        assert requests.get(url, timeout=5).json() == {"esl": True, "outbox": True}
        fs.refuse()
        fs.drop_clients()
        assert wait_until(lambda: requests.get(url, timeout=5).status_code == 503)
        fs.accept()
        assert wait_until(lambda: requests.get(url, timeout=5).status_code == 200)


# -- the service as a real process: graceful stop and kill -9 ------------------------------


def _config_file(tmp: Path, fs: FakeFreeSwitch, crm: FakeCrm) -> Path:
    values = _overrides(fs, crm, tmp)
    lines = []
    for section, keys in values.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {v}" for k, v in keys.items()]
    config = tmp / "fs-cc360.ini"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def _start_process(config: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FS_CC360_")}
    return subprocess.Popen(
        [sys.executable, "-m", "fs_cc360.cli", "--config", str(config), "run"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _rows(db: Path) -> list:
    outbox = Outbox(str(db))
    try:
        return list(outbox.list_rows(limit=None))
    finally:
        outbox.close()


@pytest.mark.slow
@pytest.mark.fault
def test_kill_9_mid_delivery_loses_nothing_committed(tmp_path: Path) -> None:
    calls = [remap(capture_frames(s), 300 + n) for n, s in enumerate(SCENARIOS)]
    stream = shift_to_now(interleave(calls, seed=3))
    expected_count = sum(len(v) for v in EXPECTED.values())
    db = tmp_path / "outbox.sqlite3"
    with FakeCrm(token=CRM_TOKEN) as crm, FakeFreeSwitch(password=ESL_PASSWORD) as fs:
        config = _config_file(tmp_path, fs, crm)
        crm.latency = 0.3  # deliveries are slow: some will be in flight at the kill
        proc = _start_process(config)
        try:
            assert fs.wait_connected(20)
            fs.push_events(stream)
            assert wait_until(lambda: db.exists() and len(_rows(db)) == expected_count, 20)
            assert wait_until(lambda: len(crm.events()) >= 3, 20)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
        before = {r.id: r.status for r in _rows(db)}
        assert len(before) == expected_count  # committed before the kill: all still there
        assert OutboxStatus.pending in before.values() or OutboxStatus.inflight in before.values()
        crm.latency = 0.0
        proc = _start_process(config)
        try:
            assert wait_until(lambda: all(r.status == OutboxStatus.delivered
                                          for r in _rows(db)), 30)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        got = crm.events()
        ids = {r.call_key for r in _rows(db)}
        assert {e.params["id"] for e in got} == ids
        # at-least-once: every row arrived; a repeat is possible only for a row in flight
        # at the kill (at most one per lane)
        keys = [(e.params["id"], e.params.get("eventName", "summary")) for e in got]
        duplicates = len(keys) - len(set(keys))
        assert len(set(keys)) == expected_count
        assert duplicates <= 4


@pytest.mark.slow
def test_sigterm_stops_gracefully_and_releases_leases(tmp_path: Path) -> None:
    db = tmp_path / "outbox.sqlite3"
    with FakeCrm(token=CRM_TOKEN) as crm, FakeFreeSwitch(password=ESL_PASSWORD) as fs:
        config = _config_file(tmp_path, fs, crm)
        crm.set_down(True)
        proc = _start_process(config)
        try:
            assert fs.wait_connected(20)
            fs.push_events(shift_to_now(capture_frames("a_inbound_answered_caller_hangup")))
            assert wait_until(lambda: db.exists() and len(_rows(db)) == 4, 20)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            output = proc.stdout.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()
        assert "service.stopped" in output
        assert CRM_TOKEN not in output and ESL_PASSWORD not in output and "secret" not in output
        statuses = {r.status for r in _rows(db)}
        assert statuses == {OutboxStatus.pending}  # nothing left in flight, nothing lost
        assert any(fs_cmd.startswith("exit") for fs_cmd in fs.commands)


def test_settings_default_construction_is_valid() -> None:
    """The service builds from defaults plus the few keys only an admin can supply."""
    settings = load_settings(None, env={}, overrides={
        "crm": {"url": "https://crm.example.com", "login": "u", "password": "p",
                "token": "t"},
        "webapi": {"token": WEB_TOKEN}})
    assert isinstance(settings, Settings)
    assert settings.webapi.listen == "127.0.0.1:8080"
