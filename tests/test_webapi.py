"""The web API over real HTTP on 127.0.0.1: makecall, healthz, metrics, CORS, errors.

The app gets plain objects injected (a recording ``bgapi`` callable, a health dict, a
``Metrics``); tests/test_makecall.py drives ``MakeCall`` through a real ESL round-trip
when the fake FreeSWITCH is available. Recordings are in tests/test_recordings.py.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import logging
import pathlib
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gevent
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from fs_cc360.errors import EslCommandError, EslConnectionError
from fs_cc360.makecall import MakeCall
from fs_cc360.metrics import Metrics
from fs_cc360.numbers import NumberRules
from fs_cc360.recordings import Mp3Converter, RecordingLinks
from fs_cc360.webapi import make_app, mask_tokens, serve

TOKEN = "Tok-3f9a1c_7e.x~y"
METRICS_TOKEN = "metrics-secret-42"
SECRET = b"recording-secret"
EXTENSIONS = {"101", "102", "103", "5001"}


def fixed_uuids() -> Callable[[], str]:
    """Predictable UUIDs: calls and jobs get ...0001, ...0002, ... in order."""
    counter = itertools.count(1)
    return lambda: f"00000000-0000-4000-8000-{next(counter):012d}"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class RecordingBgapi:
    """A ``bgapi(cmd, job_uuid)`` stand-in: records commands, or raises ``fail``."""

    commands: list[tuple[str, str | None]] = field(default_factory=list)
    fail: BaseException | None = None

    def __call__(self, command: str, job_uuid: str | None) -> str:
        if self.fail is not None:
            raise self.fail
        self.commands.append((command, job_uuid))
        return job_uuid or "no-job-uuid"


@dataclass
class Stack:
    """One running web API and everything injected into it."""

    url: str
    server: Any
    session: requests.Session
    bgapi: RecordingBgapi
    makecall: MakeCall
    metrics: Metrics
    links: RecordingLinks
    health_state: dict[str, bool]
    clock: FakeClock
    recordings: pathlib.Path
    port: int

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.get(self.url + path, timeout=10, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.session.request(method, self.url + path, timeout=10, **kwargs)

    def raw(self, method: str, target: str, headers: dict[str, str] | None = None
            ) -> tuple[int, dict[str, str], bytes]:
        """A request whose target goes on the wire exactly as given (no normalisation)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.putrequest(method, target, skip_accept_encoding=True)
            for name, value in (headers or {}).items():
                conn.putheader(name, value)
            conn.endheaders()
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def makecall_url(self, token: str = TOKEN) -> str:
        return f"/webapi/{token}/makecall"

    def metric(self, name: str, **labels: str) -> float | None:
        body, _ = self.metrics.render()
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    return sample.value
        return None


@contextlib.contextmanager
def running_stack(
    recordings: pathlib.Path,
    *,
    bgapi: Callable[[str, str | None], str] | None = None,
    mode: str = "signed",
    metrics_token: str = METRICS_TOKEN,
    cors_origins: tuple[str, ...] = (),
    converter: Mp3Converter | None = None,
    rules: NumberRules | None = None,
    template: str | None = None,
) -> Iterator[Stack]:
    recordings.mkdir(parents=True, exist_ok=True)
    clock = FakeClock()
    metrics = Metrics()
    recorder = RecordingBgapi()
    extra = {"template": template} if template else {}
    makecall = MakeCall(
        bgapi or recorder,
        is_extension=EXTENSIONS.__contains__,
        rules=rules or NumberRules(),
        clock=clock,
        new_uuid=fixed_uuids(),
        metrics=metrics,
        **extra,
    )
    links = RecordingLinks("https://pbx.example.com", str(recordings), mode=mode,
                           secret=SECRET, shared_token=TOKEN)
    health_state = {"esl": True, "outbox": True}
    app = make_app(
        token=TOKEN, makecall=makecall, links=links, health=lambda: dict(health_state),
        metrics=metrics, metrics_token=metrics_token, cors_origins=cors_origins,
        converter=converter,
    )
    server = serve(app, ("127.0.0.1", 0), max_connections=20)
    session = requests.Session()
    session.trust_env = False  # never a proxy, even if the environment names one
    session.headers["Connection"] = "close"  # no idle keep-alive to wait for at stop()
    try:
        yield Stack(
            url=f"http://127.0.0.1:{server.server_port}", server=server, session=session,
            bgapi=recorder, makecall=makecall, metrics=metrics, links=links,
            health_state=health_state, clock=clock, recordings=recordings,
            port=server.server_port,
        )
    finally:
        session.close()
        server.stop(timeout=2)


@pytest.fixture
def stack(tmp_path: pathlib.Path) -> Iterator[Stack]:
    with running_stack(tmp_path / "recordings") as s:
        yield s


def expected_originate(call_id: str, agent: str = "101", client: str = "79991234567") -> str:
    return (
        "originate {"
        f"origination_uuid={call_id},"
        f"origination_caller_id_number={client},"
        f"origination_caller_id_name={client},"
        f"effective_caller_id_number={agent},"
        "cc360_direction=outgoing,"
        f"cc360_agent={agent},"
        f"cc360_client={client},"
        "ignore_early_media=true,"
        "originate_timeout=30"
        f"}}user/{agent} {client} XML default"
    )


CALL_1 = "00000000-0000-4000-8000-000000000001"
JOB_1 = "00000000-0000-4000-8000-000000000002"


# -- makecall: the happy path -----------------------------------------------------------

def test_makecall_sends_exact_originate_and_answers_ids(stack: Stack) -> None:
    resp = stack.get(stack.makecall_url(), params={"first": "101", "second": "79991234567"})
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.json() == {"id": CALL_1, "job": JOB_1}
    assert stack.bgapi.commands == [(expected_originate(CALL_1), JOB_1)]
    assert stack.metric("fs_cc360_makecall_total", result="accepted") == 1


@pytest.mark.parametrize(("second", "normalised"), [
    ("+7 (999) 123-45-67", "79991234567"),
    ("7-999-123-45-67", "79991234567"),
    ("+79991234567", "79991234567"),
    ("555", "555"),
])
def test_makecall_normalises_the_client_number(
    tmp_path: pathlib.Path, second: str, normalised: str
) -> None:
    with running_stack(tmp_path) as s:
        resp = s.get(s.makecall_url(), params={"first": "102", "second": second})
        assert resp.status_code == 200, resp.text
        assert s.bgapi.commands == [(expected_originate(CALL_1, "102", normalised), JOB_1)]


def test_makecall_uses_the_number_rules_national_prefix(tmp_path: pathlib.Path) -> None:
    with running_stack(tmp_path, rules=NumberRules(national_prefix="8:7")) as s:
        resp = s.get(s.makecall_url(), params={"first": "101", "second": "8 999 123 45 67"})
        assert resp.status_code == 200
        assert s.bgapi.commands[0][0] == expected_originate(CALL_1)


def test_makecall_ignores_unknown_parameters(stack: Stack) -> None:
    resp = stack.get(stack.makecall_url() + "?first=101&second=79991234567&foo=bar&x=%7B")
    assert resp.status_code == 200
    assert stack.bgapi.commands[0][0] == expected_originate(CALL_1)


def test_makecall_template_with_literal_braces(tmp_path: pathlib.Path) -> None:
    template = "{{sip_h_X-Src=cc360}}{vars}user/{agent} {client} XML outbound"
    with running_stack(tmp_path, template=template) as s:
        assert s.get(s.makecall_url(), params={"first": "101", "second": "79991234567"}
                     ).status_code == 200
        command = s.bgapi.commands[0][0]
        assert command.startswith("originate {sip_h_X-Src=cc360}{origination_uuid=")
        assert command.endswith("}user/101 79991234567 XML outbound")


# -- makecall: hostile input -------------------------------------------------------------

#: (query string exactly as sent, the parameter the 400 must name)
HOSTILE_QUERIES = [
    ("first=101,user/102&second=79991234567", "first"),
    ("first=101&second=79991234567%7D", "second"),
    ("first=101&second=7999%20123%7Bx%7D", "second"),
    ("first=%7Bx=y%7D101&second=79991234567", "first"),
    ("first=101&second=%7Bx=y%7D79991234567", "second"),
    ("first=101&second=%27", "second"),
    ("first=101%27&second=79991234567", "first"),
    ("first=101&second=79991234567%0A", "second"),
    ("first=101%0Abgapi%20status&second=79991234567", "first"),
    ("first=101&second=%250A", "second"),
    ("first=101&second=%26park()", "second"),
    ("first=101&second=&park()", "second"),
    ("first=101&second=abc", "second"),
    ("first=alice&second=79991234567", "first"),
    ("first=&second=79991234567", "first"),
    ("first=101&second=", "second"),
    ("second=79991234567", "first"),
    ("first=101", "second"),
    ("first=101&second=" + "9" * 40, "second"),
    ("first=" + "1" * 40 + "&second=79991234567", "first"),
    ("first=101&first=102&second=79991234567", "first"),
    ("first=101&second=79991234567&second=79991234568", "second"),
    ("first=101&second=79991234567%5E", "second"),
    ("first=101&second=79991234567%7C", "second"),
    ("first=101&second=7999123456%EF%BC%97", "second"),  # fullwidth digit 7
    ("first=%D9%A1%D9%A0%D9%A1&second=79991234567", "first"),  # Arabic-Indic 101
    ("first=999&second=79991234567", "first"),  # digits, but not an extension
    ("first=101&second=12", "second"),  # too short for a phone
    ("first=101&second=%FF%FE", "second"),  # invalid UTF-8
    ("first=101&second=sofia/gateway/gw/79991234567", "second"),
    ("first=101&second=79991234567%20XML%20public", "second"),
    ("first=101&second=+79991234567%00", "second"),
]


@pytest.mark.parametrize(("query", "param"), HOSTILE_QUERIES)
def test_makecall_rejects_hostile_input_before_esl(stack: Stack, query: str, param: str) -> None:
    status, headers, body = stack.raw("GET", stack.makecall_url() + "?" + query)
    assert status == 400
    assert headers["Content-Type"] == "application/json"
    payload = json.loads(body)
    assert payload["param"] == param
    assert payload["error"]
    assert stack.bgapi.commands == []
    assert stack.metric("fs_cc360_makecall_total", result="invalid") == 1


def test_makecall_rejects_a_huge_query(stack: Stack) -> None:
    status, _, body = stack.raw("GET", stack.makecall_url() + "?first=101&x=" + "a" * 3000)
    assert status == 400
    assert "too long" in json.loads(body)["error"]
    assert stack.bgapi.commands == []


def test_makecall_rejects_too_many_parameters(stack: Stack) -> None:
    query = "&".join(f"p{i}=1" for i in range(30)) + "&first=101&second=79991234567"
    status, _, _ = stack.raw("GET", stack.makecall_url() + "?" + query)
    assert status == 400
    assert stack.bgapi.commands == []


# -- makecall: token ---------------------------------------------------------------------

BAD_TOKENS = [
    "wrong",
    "",
    TOKEN[:-1],
    TOKEN + "x",
    TOKEN.upper(),
    "%54" + TOKEN[1:] + "%00",
    "***",
    "..",
    "%2e%2e",
    " " + TOKEN,
]


def test_makecall_wrong_token_is_403_with_one_body(stack: Stack) -> None:
    answers = set()
    for token in BAD_TOKENS:
        target = stack.makecall_url(token.replace(" ", "%20")) + "?first=101&second=79991234567"
        status, headers, body = stack.raw("GET", target)
        assert status == 403, token
        answers.add((headers["Content-Type"], headers["Content-Length"], body))
    status, _, _ = stack.raw("GET", "/webapi/makecall?first=101&second=79991234567")
    assert status == 404  # no token segment at all: not the makecall route
    assert answers == {("application/json", "22", b'{"error": "forbidden"}')}
    assert stack.bgapi.commands == []
    assert stack.metric("fs_cc360_makecall_total", result="forbidden") == len(BAD_TOKENS)


def test_makecall_wrong_token_wins_over_bad_parameters(stack: Stack) -> None:
    resp = stack.get(stack.makecall_url("nope") + "?first=x&first=y")
    assert resp.status_code == 403


def test_makecall_percent_encoded_token_is_decoded_once(stack: Stack) -> None:
    encoded = "".join(f"%{b:02X}" for b in TOKEN.encode())
    status, _, _ = stack.raw("GET", stack.makecall_url(encoded) + "?first=101&second=555")
    assert status == 200
    double = encoded.replace("%", "%25")
    status, _, _ = stack.raw("GET", stack.makecall_url(double) + "?first=102&second=555")
    assert status == 403


# -- makecall: limits and FreeSWITCH answers --------------------------------------------

def test_makecall_per_agent_limit(stack: Stack) -> None:
    ok = stack.get(stack.makecall_url(), params={"first": "101", "second": "79991234567"})
    assert ok.status_code == 200
    again = stack.get(stack.makecall_url(), params={"first": "101", "second": "79990000000"})
    assert again.status_code == 429
    assert again.json()["param"] == "first"
    assert int(again.headers["Retry-After"]) >= 1
    other = stack.get(stack.makecall_url(), params={"first": "102", "second": "79991234567"})
    assert other.status_code == 200

    # The job is still pending: even past the rate window the agent is busy...
    stack.clock.now += 15
    assert stack.get(stack.makecall_url(), params={"first": "101", "second": "555"}
                     ).status_code == 429
    # ...until FreeSWITCH reports the originate's outcome.
    assert stack.makecall.on_job_result(ok.json()["job"], "+OK " + ok.json()["id"] + "\n")
    third = stack.get(stack.makecall_url(), params={"first": "101", "second": "555"})
    assert third.status_code == 200
    assert len(stack.bgapi.commands) == 3
    assert stack.metric("fs_cc360_makecall_total", result="limited") == 2


def test_makecall_lost_job_result_frees_the_agent_eventually(stack: Stack) -> None:
    assert stack.get(stack.makecall_url(), params={"first": "101", "second": "555"}
                     ).status_code == 200
    stack.clock.now += stack.makecall.pending_seconds + 1
    assert stack.get(stack.makecall_url(), params={"first": "101", "second": "555"}
                     ).status_code == 200


def test_makecall_esl_down_is_503_and_nothing_is_held(tmp_path: pathlib.Path) -> None:
    bgapi = RecordingBgapi(fail=EslConnectionError("not connected"))
    with running_stack(tmp_path, bgapi=bgapi) as s:
        resp = s.get(s.makecall_url(), params={"first": "101", "second": "79991234567"})
        assert resp.status_code == 503
        assert resp.headers["Content-Type"] == "application/json"
        assert "not connected" in resp.json()["error"]
        assert s.metric("fs_cc360_makecall_total", result="unavailable") == 1
        bgapi.fail = None  # ESL back: the agent is not blocked by the failed attempt
        assert s.get(s.makecall_url(), params={"first": "101", "second": "79991234567"}
                     ).status_code == 200


def test_makecall_command_refused_is_502(tmp_path: pathlib.Path) -> None:
    bgapi = RecordingBgapi(fail=EslCommandError("-ERR invalid command"))
    with running_stack(tmp_path, bgapi=bgapi) as s:
        resp = s.get(s.makecall_url(), params={"first": "101", "second": "79991234567"})
        assert resp.status_code == 502
        assert resp.json() == {"error": "FreeSWITCH refused the command"}


def test_makecall_unexpected_error_is_500_without_details(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    bgapi = RecordingBgapi(fail=RuntimeError("secret internals /etc/freeswitch"))
    with running_stack(tmp_path, bgapi=bgapi) as s, caplog.at_level(logging.ERROR):
        resp = s.get(s.makecall_url(), params={"first": "101", "second": "79991234567"})
        assert resp.status_code == 500
        assert resp.json() == {"error": "internal error"}
        assert "secret" not in resp.text and "Traceback" not in resp.text
        assert any(r.msg.startswith("webapi.error") for r in caplog.records)
        assert not any(TOKEN in r.getMessage() for r in caplog.records)
        # the agent is free again
        s.bgapi.fail = None
        bgapi.fail = None
        assert s.get(s.makecall_url(), params={"first": "101", "second": "555"}
                     ).status_code == 200


def test_makecall_job_error_is_logged_and_counted(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    resp = stack.get(stack.makecall_url(), params={"first": "101", "second": "79991234567"})
    call_id, job = resp.json()["id"], resp.json()["job"]
    with caplog.at_level(logging.INFO, logger="fs_cc360.makecall"):
        assert stack.makecall.on_job_result(job, b"-ERR USER_NOT_REGISTERED\n")
    lines = [r.getMessage() for r in caplog.records if r.name == "fs_cc360.makecall"]
    assert any(f"call={call_id}" in line and "ok=false" in line
               and "reason=USER_NOT_REGISTERED" in line for line in lines)
    assert stack.metric("fs_cc360_makecall_total", result="failed") == 1
    assert stack.metric("fs_cc360_makecall_failures_total", reason="USER_NOT_REGISTERED") == 1
    assert not stack.makecall.on_job_result(job, b"-ERR USER_NOT_REGISTERED\n")  # only once


def test_makecall_methods(stack: Stack) -> None:
    post = stack.request("POST", stack.makecall_url(), data={"first": "101", "second": "555"})
    assert post.status_code == 405
    assert "GET" in post.headers["Allow"]
    assert stack.request("PUT", stack.makecall_url()).status_code == 405
    assert stack.request("OPTIONS", stack.makecall_url()).status_code == 204
    assert stack.bgapi.commands == []


# -- CORS --------------------------------------------------------------------------------

def test_cors_headers_for_configured_origins(tmp_path: pathlib.Path) -> None:
    crm = "https://crm.example.com"
    with running_stack(tmp_path, cors_origins=(crm,)) as s:
        pre = s.request("OPTIONS", s.makecall_url(), headers={
            "Origin": crm, "Access-Control-Request-Method": "GET"})
        assert pre.status_code == 204
        assert pre.headers["Access-Control-Allow-Origin"] == crm
        assert "GET" in pre.headers["Access-Control-Allow-Methods"]
        got = s.get(s.makecall_url(), params={"first": "101", "second": "555"},
                    headers={"Origin": crm})
        assert got.status_code == 200
        assert got.headers["Access-Control-Allow-Origin"] == crm
        assert "Origin" in got.headers["Vary"]
        evil = s.get(s.makecall_url(), params={"first": "102", "second": "555"},
                     headers={"Origin": "https://evil.example.com"})
        assert "Access-Control-Allow-Origin" not in evil.headers


def test_no_cors_headers_when_not_configured(stack: Stack) -> None:
    resp = stack.get("/healthz", headers={"Origin": "https://crm.example.com"})
    assert "Access-Control-Allow-Origin" not in resp.headers


# -- healthz -----------------------------------------------------------------------------

def test_healthz_flips_with_the_injected_state(stack: Stack) -> None:
    resp = stack.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"esl": True, "outbox": True}
    stack.health_state["esl"] = False
    resp = stack.get("/healthz")
    assert resp.status_code == 503
    assert resp.json() == {"esl": False, "outbox": True}
    stack.health_state.update(esl=True, outbox=False)
    assert stack.get("/healthz").json() == {"esl": True, "outbox": False}
    stack.health_state["outbox"] = True
    assert stack.get("/healthz").status_code == 200
    assert stack.request("HEAD", "/healthz").status_code == 200


def test_healthz_503_when_the_check_itself_fails(tmp_path: pathlib.Path) -> None:
    with running_stack(tmp_path) as s:
        s.server.application.health = lambda: 1 / 0
        resp = s.get("/healthz")
        assert resp.status_code == 503
        assert resp.json() == {"error": "health check failed"}


# -- metrics -----------------------------------------------------------------------------

METRIC_NAMES = {
    "fs_cc360_esl_connected", "fs_cc360_esl_events", "fs_cc360_crm_events",
    "fs_cc360_outbox_rows", "fs_cc360_outbox_oldest_pending_seconds",
    "fs_cc360_deliveries", "fs_cc360_delivery_seconds", "fs_cc360_makecall",
    "fs_cc360_outbox_writable",
}


def test_metrics_parse_and_name_everything(stack: Stack) -> None:
    m = stack.metrics
    m.esl_state(True)
    m.esl_event()
    m.crm_event("ringing")
    m.delivered("ringing", 200, 0.05)
    m.failed("summary", "retry", 503, 1.2)
    m.set_outbox({"counts": {"pending": 4, "dead": 1}, "oldest_pending_seconds": 7.5})
    resp = stack.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.text)}
    assert METRIC_NAMES <= families.keys()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("fs_cc360_esl_connected", ())] == 1
    assert samples[("fs_cc360_crm_events_total", (("kind", "ringing"),))] == 1
    assert samples[("fs_cc360_outbox_rows", (("status", "pending"),))] == 4
    assert samples[("fs_cc360_outbox_oldest_pending_seconds", ())] == 7.5
    assert samples[("fs_cc360_deliveries_total", (("result", "retry"), ("status", "503")))] == 1
    assert samples[("fs_cc360_delivery_seconds_count", ())] == 2


def test_metrics_token_enforced(stack: Stack) -> None:
    assert stack.get("/metrics").status_code == 403
    assert stack.get("/metrics", params={"token": "nope"}).status_code == 403
    assert stack.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert stack.get("/metrics", headers={"Authorization": f"Basic {METRICS_TOKEN}"}
                     ).status_code == 403
    assert stack.get("/metrics", params={"token": METRICS_TOKEN}).status_code == 200
    assert stack.get("/metrics", headers={"Authorization": f"bearer {METRICS_TOKEN}"}
                     ).status_code == 200


def test_metrics_open_without_token_and_refreshes_outbox(tmp_path: pathlib.Path) -> None:
    with running_stack(tmp_path, metrics_token="") as s:
        rows = {"pending": 1}
        s.metrics.set_outbox_source(lambda: {"counts": dict(rows), "writable": True})
        assert 'fs_cc360_outbox_rows{status="pending"} 1.0' in s.get("/metrics").text
        rows["pending"] = 9
        assert 'fs_cc360_outbox_rows{status="pending"} 9.0' in s.get("/metrics").text
        s.metrics.set_outbox_source(lambda: 1 / 0)  # a failing source keeps the last values
        assert s.get("/metrics").status_code == 200


# -- routing, errors, logging ------------------------------------------------------------

@pytest.mark.parametrize("target", [
    "/", "/webapi", "/webapi/x", "/webapi/" + TOKEN + "/makecall/extra", "/healthz/",
    "/metricsx", "/" + TOKEN + "/recordings/a.wav", "/favicon.ico", "*",
])
def test_unknown_routes_are_404_json(stack: Stack, target: str) -> None:
    status, headers, body = stack.raw("GET", target)
    assert status in (400, 404)
    if status == 404:
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body) == {"error": "not found"}


def test_access_log_masks_tokens(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="fs_cc360.webapi.access"):
        stack.get(stack.makecall_url(), params={"first": "101", "second": "555"})
        stack.get("/metrics", params={"token": METRICS_TOKEN})
        stack.raw("GET", "/" + TOKEN + "/recording/x.wav")
        lines: list[str] = []
        for _ in range(200):  # the server logs after sending: let its greenlet finish
            lines = [r.getMessage() for r in caplog.records
                     if r.name == "fs_cc360.webapi.access"]
            if len(lines) >= 3:
                break
            gevent.sleep(0.01)
    assert len(lines) >= 3
    text = "\n".join(lines)
    assert TOKEN not in text and METRICS_TOKEN not in text
    assert "/webapi/***/makecall" in text
    assert "/***/recording/x.wav" in text
    assert "token=***" in text


def test_mask_tokens() -> None:
    assert mask_tokens("GET /webapi/abc/makecall?first=1 HTTP/1.1") == (
        "GET /webapi/***/makecall?first=1 HTTP/1.1")
    assert mask_tokens("https://pbx/abc123/recording/x.mp3") == "https://pbx/***/recording/x.mp3"
    assert mask_tokens("/metrics?a=1&token=zzz&b=2") == "/metrics?a=1&token=***&b=2"


# -- server ------------------------------------------------------------------------------

def test_silent_client_is_disconnected(tmp_path: pathlib.Path) -> None:
    """A client that sends half a request and goes quiet loses its connection (slot)."""
    with running_stack(tmp_path) as s:
        app = s.server.application
    server = serve(app, ("127.0.0.1", 0), max_connections=2, timeout=0.2)
    try:
        sock = socket.create_connection(("127.0.0.1", server.server_port), timeout=10)
        with sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            received = b""
            for _ in range(100):  # bounded: each recv waits at most the socket timeout
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
            else:
                pytest.fail("the server kept the silent connection open")
        assert TOKEN.encode() not in received
    finally:
        server.stop(timeout=1)


def test_tls_with_cert_and_key(tmp_path: pathlib.Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    with running_stack(tmp_path / "rec") as s:
        app = s.server.application
    server = serve(app, ("127.0.0.1", 0), certfile=cert, keyfile=key)
    try:
        with requests.Session() as session:
            session.trust_env = False
            resp = session.get(f"https://127.0.0.1:{server.server_port}/healthz",
                               verify=str(cert), timeout=10, headers={"Connection": "close"})
        assert resp.status_code == 200 and resp.json() == {"esl": True, "outbox": True}
    finally:
        server.stop(timeout=1)
