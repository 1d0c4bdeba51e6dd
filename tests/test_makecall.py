"""MakeCall on its own, then through a real ESL round-trip with the fake FreeSWITCH.

The round-trip tests run ``EslClient`` against ``tests/fakes/esl.FakeFreeSwitch`` on
127.0.0.1: the originate string is checked as FreeSWITCH receives it (``bgapi`` block
with its ``Job-UUID`` header), and the BACKGROUND_JOB the fake sends back goes through
``EslClient``'s ``on_job`` into ``MakeCall.on_job_result``.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fs_cc360.errors import ConfigError, EslConnectionError
from fs_cc360.makecall import (
    DEFAULT_TEMPLATE,
    MakeCall,
    MakeCallError,
    check_template,
    job_failure_reason,
    originate_value,
)
from fs_cc360.metrics import Metrics
from fs_cc360.numbers import NumberRules
from fs_cc360.simulators import wait_until
from tests.test_webapi import (
    CALL_1,
    EXTENSIONS,
    HOSTILE_QUERIES,
    JOB_1,
    TOKEN,
    FakeClock,
    RecordingBgapi,
    expected_originate,
    fixed_uuids,
    running_stack,
)


def make(bgapi: Callable[[str, str | None], str], **kwargs: Any) -> MakeCall:
    kwargs.setdefault("is_extension", EXTENSIONS.__contains__)
    kwargs.setdefault("rules", NumberRules())
    kwargs.setdefault("new_uuid", fixed_uuids())
    kwargs.setdefault("clock", FakeClock())
    return MakeCall(bgapi, **kwargs)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


# -- unit ------------------------------------------------------------------------------

def test_place_builds_the_documented_originate() -> None:
    bgapi = RecordingBgapi()
    result = make(bgapi).place("101", "+7 999 123-45-67")
    assert (result.call_id, result.job_uuid) == (CALL_1, JOB_1)
    assert bgapi.commands == [(expected_originate(CALL_1), JOB_1)]
    # The agent's phone shows the client; the dialled leg gets the agent's caller ID.
    assert "origination_caller_id_number=79991234567," in bgapi.commands[0][0]
    assert "effective_caller_id_number=101," in bgapi.commands[0][0]


def test_template_variants() -> None:
    bgapi = RecordingBgapi()
    make(bgapi, template="{vars}user/{agent} {client} XML default", originate_timeout=45
         ).place("102", "555")
    assert bgapi.commands[0][0].endswith("originate_timeout=45}user/102 555 XML default")
    bgapi = RecordingBgapi()
    make(bgapi, template="{{origination_caller_id_name=Sales}}{vars}sofia/internal/{agent}"
                         "@pbx.local &bridge(sofia/gateway/gw1/{client})").place("101", "555")
    command = bgapi.commands[0][0]
    assert command.startswith("originate {origination_caller_id_name=Sales}{origination_uuid=")
    assert command.endswith("}sofia/internal/101@pbx.local &bridge(sofia/gateway/gw1/555)")


@pytest.mark.parametrize(("template", "problem"), [
    ("user/{agent} {client} XML default", "{vars}"),
    ("{vars}user/{agent} XML default", "{client}"),
    ("{vars}{agent}{client}{uuid}", "unknown placeholder"),
    ("{vars}{agent}{client}{agent.__class__}", "unknown placeholder"),
    ("{vars}{agent!r}{client}", "unknown placeholder"),
    ("{x=y}{vars}{agent}{client}", "unknown placeholder"),
    ("{vars}{agent} {client", "braces"),
    ("{vars}{agent}\n{client}", "one line"),
])
def test_bad_templates_are_config_errors(template: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_template(template)
    assert info.value.key == "originate"
    assert problem in str(info.value)
    with pytest.raises(ConfigError):
        make(RecordingBgapi(), template=template)
    check_template(DEFAULT_TEMPLATE)


@pytest.mark.parametrize("value", [
    "", "1,2", "1}", "{", "'", "1 2", "1\n", "^^:", "a|b", "1=2", "1\\", "٣", "1\x00", "1;2",
])
def test_originate_value_whitelist(value: str) -> None:
    with pytest.raises(ValueError):
        originate_value(value)


def test_originate_value_accepts_what_we_send() -> None:
    for value in ("101", "79991234567", CALL_1, "outgoing", "true", "30"):
        assert originate_value(value) == value


@pytest.mark.parametrize(("first", "second", "param"), [
    (None, "555", "first"), ("", "555", "first"), ("101 ", "555", "first"),
    ("+101", "555", "first"), ("1" * 16, "555", "first"), ("999", "555", "first"),
    ("101", None, "second"), ("101", "", "second"), ("101", "555\n", "second"),
    ("101", "\t555", "second"), ("101", "12", "second"), ("101", "5" * 16, "second"),
    ("101", "5" * 41, "second"), ("101", "+7 999 abc", "second"), ("101", "５５５", "second"),
])
def test_invalid_values_raise_before_bgapi(first: str | None, second: str | None,
                                           param: str) -> None:
    bgapi = RecordingBgapi()
    metrics = Metrics()
    with pytest.raises(MakeCallError) as info:
        make(bgapi, metrics=metrics).place(first, second)
    assert (info.value.param, info.value.status) == (param, 400)
    assert bgapi.commands == []
    assert sample(metrics, "fs_cc360_makecall_total", result="invalid") == 1


def test_is_extension_is_consulted() -> None:
    seen: list[str] = []
    mc = make(RecordingBgapi(), is_extension=lambda e: seen.append(e) or e == "7")
    mc.place("7", "555")
    with pytest.raises(MakeCallError):
        mc.place("8", "555")
    assert seen == ["7", "8"]


def test_rate_window_without_job_results() -> None:
    clock = FakeClock()
    mc = make(RecordingBgapi(), clock=clock, per_agent_seconds=10, pending_seconds=60)
    first = mc.place("101", "555")
    mc.on_job_result(first.job_uuid, "+OK x")
    clock.now += 9.5
    with pytest.raises(MakeCallError) as info:
        mc.place("101", "555")
    assert info.value.status == 429 and info.value.retry_after == 1.0
    clock.now += 0.5
    mc.place("101", "555")


def test_pending_job_blocks_until_result_or_expiry(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    mc = make(RecordingBgapi(), clock=clock, per_agent_seconds=0, pending_seconds=60)
    mc.place("101", "555")
    clock.now += 59
    with pytest.raises(MakeCallError):
        mc.place("101", "555")
    assert mc.pending() == 1
    clock.now += 1
    with caplog.at_level(logging.WARNING, logger="fs_cc360.makecall"):
        mc.place("101", "555")
    assert any("makecall.no_result" in r.getMessage() for r in caplog.records)
    assert mc.pending() == 1


def test_job_result_during_bgapi_is_not_lost() -> None:
    """The BACKGROUND_JOB may be dispatched before ``bgapi`` returns to us."""
    holder: dict[str, MakeCall] = {}

    def bgapi(command: str, job_uuid: str | None) -> str:
        assert holder["mc"].on_job_result(job_uuid or "", "-ERR NO_ANSWER\n")
        return job_uuid or ""

    metrics = Metrics()
    holder["mc"] = mc = make(bgapi, metrics=metrics)
    mc.place("101", "555")
    assert mc.pending() == 0
    assert sample(metrics, "fs_cc360_makecall_failures_total", reason="NO_ANSWER") == 1


def test_job_uuid_from_freeswitch_differs() -> None:
    mc = make(lambda command, job: "other-job")
    result = mc.place("101", "555")
    assert result.job_uuid == "other-job"
    assert mc.on_job_result("other-job", "+OK")
    assert mc.pending() == 0


def test_unknown_job_is_ignored() -> None:
    assert not make(RecordingBgapi()).on_job_result("someone-elses-job", "+OK")


@pytest.mark.parametrize(("line", "reason"), [
    ("-ERR USER_NOT_REGISTERED", "USER_NOT_REGISTERED"),
    ("-ERR NO_ANSWER extra words", "NO_ANSWER"),
    ("-ERR", "UNKNOWN"),
    ("-ERR lower case", "UNKNOWN"),
    ("-ERR " + "X" * 100, "UNKNOWN"),
    ("garbage", "UNKNOWN"),
    ("", "UNKNOWN"),
])
def test_job_failure_reason(line: str, reason: str) -> None:
    assert job_failure_reason(line) == reason


def test_esl_down_frees_the_agent() -> None:
    bgapi = RecordingBgapi(fail=EslConnectionError("down"))
    metrics = Metrics()
    mc = make(bgapi, metrics=metrics)
    with pytest.raises(MakeCallError) as info:
        mc.place("101", "555")
    assert info.value.status == 503
    assert mc.pending() == 0
    bgapi.fail = None
    mc.place("101", "555")
    assert sample(metrics, "fs_cc360_makecall_total", result="unavailable") == 1
    assert sample(metrics, "fs_cc360_makecall_total", result="accepted") == 1


# -- real ESL round-trip -----------------------------------------------------------------

@contextlib.contextmanager
def esl_to_fake(bgapi_result: Callable[[str], str] | None = None
                ) -> Iterator[tuple[Any, Any, dict[str, MakeCall]]]:
    """A FakeFreeSwitch and a connected EslClient whose ``on_job`` feeds ``holder['mc']``.

    Imported here, not at the top, so the unit tests above still run in a checkout that
    lacks the ESL client or its fake.
    """
    EslClient = pytest.importorskip("fs_cc360.esl").EslClient  # noqa: N806
    FakeFreeSwitch = pytest.importorskip("tests.fakes.esl").FakeFreeSwitch  # noqa: N806
    holder: dict[str, MakeCall] = {}
    kwargs = {"bgapi_result": bgapi_result} if bgapi_result else {}
    with FakeFreeSwitch(**kwargs) as fs:
        client = EslClient(
            fs.host, fs.port, "ClueCon", events=("BACKGROUND_JOB",),
            on_event=lambda event: None,
            on_job=lambda job, body: holder["mc"].on_job_result(job, body) if holder else None,
            backoff_initial=0.05, backoff_max=0.2, connect_timeout=2.0, command_timeout=5.0,
        )
        client.start()
        try:
            assert wait_until(lambda: client.connected), "EslClient never connected"
            yield fs, client, holder
        finally:
            client.stop(timeout=2.0)


def test_originate_reaches_freeswitch_exactly() -> None:
    with esl_to_fake(lambda cmd: "+OK " + CALL_1) as (fs, client, holder):
        metrics = Metrics()
        holder["mc"] = mc = make(client.bgapi, metrics=metrics)
        result = mc.place("101", "79991234567")
        assert (result.call_id, result.job_uuid) == (CALL_1, JOB_1)
        block = fs.wait_for_command("bgapi ")
        assert block == "bgapi " + expected_originate(CALL_1) + "\nJob-UUID: " + JOB_1
        assert wait_until(lambda: mc.pending() == 0)
        assert sample(metrics, "fs_cc360_makecall_total", result="originated") == 1


def test_background_job_error_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    with esl_to_fake(lambda cmd: "-ERR USER_NOT_REGISTERED") as (fs, client, holder), \
            caplog.at_level(logging.INFO, logger="fs_cc360.makecall"):
        metrics = Metrics()
        holder["mc"] = mc = make(client.bgapi, metrics=metrics)
        result = mc.place("102", "555")
        assert wait_until(lambda: mc.pending() == 0)
        assert sample(metrics, "fs_cc360_makecall_total", result="failed") == 1
        assert sample(metrics, "fs_cc360_makecall_failures_total",
                      reason="USER_NOT_REGISTERED") == 1
        lines = [r.getMessage() for r in caplog.records if r.name == "fs_cc360.makecall"]
        assert any(f"call={result.call_id}" in line and "ok=false" in line
                   and "reason=USER_NOT_REGISTERED" in line for line in lines)


def test_webapi_over_esl_end_to_end(tmp_path: pathlib.Path) -> None:
    """HTTP makecall -> EslClient -> fake FreeSWITCH -> BACKGROUND_JOB -> metrics;
    then FreeSWITCH goes away: makecall answers 503, healthz 503, and nothing is sent."""
    with esl_to_fake(lambda cmd: "-ERR NO_ANSWER") as (fs, client, holder), \
            running_stack(tmp_path, bgapi=client.bgapi) as s:
        holder["mc"] = s.makecall
        s.health_state.clear()
        s.server.application.health = lambda: {"esl": client.connected, "outbox": True}

        assert s.get("/healthz").status_code == 200
        resp = s.get(s.makecall_url(), params={"first": "101", "second": "+7 999 123 45 67"})
        assert resp.status_code == 200
        assert resp.json() == {"id": CALL_1, "job": JOB_1}
        assert fs.wait_for_command("bgapi ") == (
            "bgapi " + expected_originate(CALL_1) + "\nJob-UUID: " + JOB_1)
        assert wait_until(lambda: s.makecall.pending() == 0)
        assert s.metric("fs_cc360_makecall_failures_total", reason="NO_ANSWER") == 1

        for query in ("first=101,user/102&second=555", "first=102&second=555%0Aapi%20x"):
            assert s.raw("GET", s.makecall_url() + "?" + query)[0] == 400
        assert len([c for c in fs.commands if c.startswith("bgapi")]) == 1

        fs.refuse()
        fs.drop_clients()
        assert wait_until(lambda: not client.connected)
        health = s.get("/healthz")
        assert health.status_code == 503 and health.json() == {"esl": False, "outbox": True}
        down = s.get(s.makecall_url(), params={"first": "102", "second": "555"})
        assert down.status_code == 503
        assert s.metric("fs_cc360_makecall_total", result="unavailable") == 1

        fs.accept()
        assert wait_until(lambda: client.connected)
        assert s.get("/healthz").status_code == 200
        assert s.get(s.makecall_url(), params={"first": "102", "second": "555"}
                     ).status_code == 200
        assert len([c for c in fs.commands if c.startswith("bgapi")]) == 2


def test_hostile_input_never_reaches_freeswitch(tmp_path: pathlib.Path) -> None:
    with esl_to_fake() as (fs, client, holder), \
            running_stack(tmp_path, bgapi=client.bgapi) as s:
        holder["mc"] = s.makecall
        for query, param in HOSTILE_QUERIES:
            status, _, body = s.raw("GET", s.makecall_url() + "?" + query)
            assert status == 400 and param in body.decode(), query
        for token in ("wrong", "", TOKEN.upper()):
            assert s.raw("GET", f"/webapi/{token}/makecall?first=101&second=555")[0] == 403
        assert s.get(s.makecall_url(), params={"first": "103", "second": "555"}
                     ).status_code == 200  # the connection works: the 4xx were ours
        assert fs.wait_for_command("bgapi ") is not None
        assert [c for c in fs.commands if c.startswith("bgapi")] == [
            "bgapi " + expected_originate(CALL_1, "103", "555") + "\nJob-UUID: " + JOB_1]
