"""EslClient against the fake FreeSWITCH, over real sockets on 127.0.0.1."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Iterator

import gevent
import pytest

from fs_cc360.errors import EslCommandError, EslConnectionError, EslError
from fs_cc360.esl import AUTH_REFUSED_HINT, REJECTED_HINT, EslClient, backoff_delay
from fs_cc360.events import ChannelEvent, parse_event
from fs_cc360.service import SUBSCRIBED_EVENTS
from fs_cc360.simulators import wait_until
from tests.fakes.captures import SCENARIOS, capture_frames, event_frame, interleave, remap
from tests.fakes.esl import (
    DISCONNECT_BODY,
    FakeFreeSwitch,
    event_name,
    hostile_stream,
    mutated_frames,
)

#: The subscription the captures were recorded with (tests/captures/README.md).
CAPTURE_EVENTS = (
    "CHANNEL_CREATE CHANNEL_PROGRESS CHANNEL_PROGRESS_MEDIA CHANNEL_ANSWER CHANNEL_BRIDGE "
    "CHANNEL_UNBRIDGE CHANNEL_HANGUP CHANNEL_HANGUP_COMPLETE CHANNEL_DESTROY CHANNEL_CALLSTATE "
    "CHANNEL_STATE RECORD_START RECORD_STOP CHANNEL_ORIGINATE CHANNEL_OUTGOING BACKGROUND_JOB"
).split()


class Recorder:
    """The callbacks' side: what the client handed over, in order."""

    def __init__(self) -> None:
        self.events: list[ChannelEvent] = []
        self.jobs: list[tuple[str, str]] = []
        self.states: list[bool] = []
        self.connects: list[bool] = []

    def on_event(self, event: ChannelEvent) -> None:
        self.events.append(event)

    def on_job(self, job_uuid: str, body: str) -> None:
        self.jobs.append((job_uuid, body))

    def on_state(self, up: bool) -> None:
        self.states.append(up)

    def on_connect(self, reconnect: bool) -> None:
        self.connects.append(reconnect)

    def keys(self) -> list[tuple[str, str]]:
        return [(e.uuid, e.name) for e in self.events]


def expected_keys(bodies: list[bytes], subscribed: tuple[str, ...] | list[str] | None = None
                  ) -> list[tuple[str, str]]:
    events = [parse_event(b) for b in bodies]
    return [(e.uuid, e.name) for e in events
            if e.name != "BACKGROUND_JOB" and (subscribed is None or e.name in subscribed)]


@pytest.fixture
def fs() -> Iterator[FakeFreeSwitch]:
    with FakeFreeSwitch() as fake:
        yield fake


@pytest.fixture
def make_client() -> Iterator[Callable[..., tuple[EslClient, Recorder]]]:
    clients: list[EslClient] = []

    def make(fake: FakeFreeSwitch, password: str = "ClueCon", *, start: bool = True,
             **kwargs: object) -> tuple[EslClient, Recorder]:
        rec = Recorder()
        options: dict[str, object] = dict(
            events=SUBSCRIBED_EVENTS,  # what `fs-cc360 run` subscribes to
            on_event=rec.on_event, on_job=rec.on_job, on_state=rec.on_state,
            on_connect=rec.on_connect, backoff_initial=0.05, backoff_max=0.5,
            connect_timeout=2.0, command_timeout=5.0, rng=random.Random(1),
        )
        options.update(kwargs)
        client = EslClient(fake.host, fake.port, password, **options)  # type: ignore[arg-type]
        clients.append(client)
        if start:
            client.start()
        return client, rec

    yield make
    for client in clients:
        client.stop(timeout=2.0)


def connected(fake: FakeFreeSwitch, client: EslClient) -> None:
    assert fake.wait_connected(5.0)
    assert wait_until(lambda: client.connected, 5.0)


# -- connection, subscription, stop --------------------------------------------------------

def test_connects_authenticates_and_subscribes_to_named_events(fs, make_client) -> None:
    client, rec = make_client(fs)
    connected(fs, client)
    assert fs.commands == ["auth ClueCon", "event plain " + " ".join(SUBSCRIBED_EVENTS)]
    assert "all" not in fs.commands[1].lower().split()
    assert rec.states == [True]
    assert client.reconnects == 0


def test_the_service_may_choose_the_events_but_never_all(fs, make_client) -> None:
    client, _ = make_client(fs, events=["CHANNEL_ANSWER", "BACKGROUND_JOB"])
    connected(fs, client)
    assert fs.commands[-1] == "event plain CHANNEL_ANSWER BACKGROUND_JOB"
    for bad in (["all"], ["ALL"], [], ["CHANNEL_ANSWER CHANNEL_CREATE"], ["X\nY"], [""]):
        with pytest.raises(ValueError):
            EslClient("127.0.0.1", 1, "x", events=bad, on_event=print)
    with pytest.raises(TypeError):  # no default list: the caller names what it reads
        EslClient("127.0.0.1", 1, "x", on_event=print)  # type: ignore[call-arg]


def test_stop_sends_exit_and_never_reconnects(fs, make_client) -> None:
    client, rec = make_client(fs)
    connected(fs, client)
    greenlet = client.start()
    client.stop()
    assert fs.commands[-1] == "exit"
    assert greenlet.dead
    assert not client.connected
    assert rec.states == [True, False]
    gevent.sleep(0.3)  # several backoff periods
    assert fs.connections == 1
    with pytest.raises(EslConnectionError):
        client.bgapi("status")
    with pytest.raises(EslError):
        client.start()


def test_stop_while_freeswitch_is_down_returns_promptly(make_client) -> None:
    with FakeFreeSwitch() as fake:
        fake.refuse()
        client, rec = make_client(fake)
        gevent.sleep(0.2)
        greenlet = client.start()
        with gevent.Timeout(3):
            client.stop()
        assert greenlet.dead
        assert rec.states == []


# -- replaying captures --------------------------------------------------------------------

@pytest.mark.parametrize("subscription", ["service", "capture"])
@pytest.mark.parametrize("name", SCENARIOS)
def test_replayed_capture_arrives_in_order(fs, make_client, name: str, subscription: str) -> None:
    events = SUBSCRIBED_EVENTS if subscription == "service" else tuple(CAPTURE_EVENTS)
    client, rec = make_client(fs, events=events)
    connected(fs, client)
    bodies = capture_frames(name)
    expected = expected_keys(bodies, events)
    jobs = [parse_event(b) for b in bodies if event_name(b) == "BACKGROUND_JOB"]
    fs.replay(name)
    assert wait_until(lambda: len(rec.events) >= len(expected) and len(rec.jobs) >= len(jobs))
    gevent.sleep(0.05)  # nothing more must come
    assert rec.keys() == expected
    assert rec.jobs == [(j["Job-UUID"], j.body.rstrip("\n")) for j in jobs]
    assert client.frames_skipped == 0
    if subscription == "capture":  # every channel event of the capture, nothing dropped
        assert len(rec.events) + len(rec.jobs) == len(bodies)


def test_click_to_call_capture_background_job_reaches_on_job(fs, make_client) -> None:
    client, rec = make_client(fs)
    connected(fs, client)
    fs.replay("c_click_to_call_101_to_external")
    assert wait_until(lambda: rec.jobs)
    assert rec.jobs == [("792032a3-ce01-4f01-8d28-8022a1629fda",
                         "+OK 48154cd9-361e-4787-a2ac-f22bc528d3c7")]


def test_several_calls_interleaved_on_one_connection(fs, make_client) -> None:
    client, rec = make_client(fs, events=tuple(CAPTURE_EVENTS))
    connected(fs, client)
    calls = [remap(capture_frames(name), seed=i) for i, name in enumerate(SCENARIOS)]
    stream = interleave(calls, seed=5)
    expected = expected_keys(stream)
    fs.push_events(stream)
    assert wait_until(lambda: len(rec.events) >= len(expected))
    assert rec.keys() == expected


def test_loopback_events_reach_the_tracker(fs, make_client) -> None:
    """Loopback halves are passed on like any leg: the tracker follows calls through
    them (r1) and never makes them agent legs."""
    client, rec = make_client(fs)
    connected(fs, client)
    create = next(b for b in capture_frames("a_inbound_answered_caller_hangup")
                  if event_name(b) == "CHANNEL_CREATE")
    (real,) = remap([create], seed=1)
    (named,) = remap([create], seed=3)
    named = re.sub(rb"\nChannel-Name: [^\n]*", b"\nChannel-Name: loopback/101-a", named)
    fs.push_events([real, named])
    assert wait_until(lambda: len(rec.events) >= 2)
    assert [e.uuid for e in rec.events] == [parse_event(real).uuid, parse_event(named).uuid]
    assert client.events_read == 2


def test_a_failing_callback_does_not_stop_the_reader(fs, make_client) -> None:
    seen: list[str] = []

    def on_event(event: ChannelEvent) -> None:
        seen.append(event.uuid)
        if len(seen) == 1:
            raise RuntimeError("tracker bug")

    client, _ = make_client(fs, on_event=on_event)
    connected(fs, client)
    bodies = capture_frames("a_inbound_answered_caller_hangup")
    expected = [k[0] for k in expected_keys(bodies, SUBSCRIBED_EVENTS)]
    fs.push_events(bodies)
    assert wait_until(lambda: len(seen) >= len(expected))
    assert seen == expected
    assert client.callback_errors == 1 and client.connected


def test_commands_from_the_reader_greenlet_are_refused(fs, make_client) -> None:
    errors: list[Exception] = []

    def on_event(event: ChannelEvent) -> None:
        try:
            client.api("status")
        except EslError as exc:
            errors.append(exc)

    client, _ = make_client(fs, on_event=on_event)
    connected(fs, client)
    fs.push_events([b for b in capture_frames("a_inbound_answered_caller_hangup")
                    if event_name(b) == "CHANNEL_CREATE"][:1])
    assert wait_until(lambda: errors)
    assert "reader greenlet" in str(errors[0])


# -- commands ------------------------------------------------------------------------------

def test_bgapi_returns_the_job_uuid_and_the_result_reaches_on_job(make_client) -> None:
    def result(command: str) -> str:
        return "-ERR USER_NOT_REGISTERED" if "user/999" in command else "+OK 1234-abcd"

    with FakeFreeSwitch(bgapi_result=result) as fake:
        client, rec = make_client(fake)
        connected(fake, client)
        job = client.bgapi("originate user/101 &park")
        assert re.fullmatch(r"[0-9a-f-]{36}", job)
        assert fake.commands[-1] == "bgapi originate user/101 &park"
        mine = client.bgapi("originate user/999 &park", "5f0c8c1e-0000-4000-8000-000000000001")
        assert mine == "5f0c8c1e-0000-4000-8000-000000000001"
        assert fake.commands[-1] == ("bgapi originate user/999 &park\n"
                                     "Job-UUID: 5f0c8c1e-0000-4000-8000-000000000001")
        assert wait_until(lambda: len(rec.jobs) == 2)
        assert dict(rec.jobs) == {job: "+OK 1234-abcd", mine: "-ERR USER_NOT_REGISTERED"}
        assert rec.events == []  # BACKGROUND_JOB is not a channel event


def test_bgapi_refused_raises_command_error(fs, make_client) -> None:
    client, _ = make_client(fs)
    connected(fs, client)
    fs.command_errors["bgapi"] = "-ERR no memory"
    with pytest.raises(EslCommandError, match="no memory"):
        client.bgapi("originate user/101 &park")
    assert client.connected


def test_api_returns_the_body_and_err_raises(make_client) -> None:
    def result(command: str) -> str:
        if command.startswith("uuid_kill"):
            return "-ERR No such channel!\n"
        return '{"row_count":0}\n' if command == "show channels as json" else "+OK\n"

    with FakeFreeSwitch(api_result=result) as fake:
        client, _ = make_client(fake)
        connected(fake, client)
        assert client.api("show channels as json") == '{"row_count":0}\n'
        with pytest.raises(EslCommandError, match="No such channel"):
            client.api("uuid_kill 1234")
        # Replies still line up with their commands after an error.
        assert client.api("status") == "+OK\n"


def test_many_concurrent_commands_get_their_own_replies(fs, make_client) -> None:
    fs.api_result = lambda command: f"echo {command}\n"
    client, _ = make_client(fs)
    connected(fs, client)
    jobs = [gevent.spawn(client.api, f"n{i}") for i in range(50)]
    gevent.joinall(jobs, timeout=10, raise_error=True)
    assert [j.value for j in jobs] == [f"echo n{i}\n" for i in range(50)]


def test_commands_fail_at_once_when_not_connected(make_client) -> None:
    with FakeFreeSwitch() as fake:
        idle, _ = make_client(fake, start=False)
        fake.refuse()
        down, _ = make_client(fake)
        gevent.sleep(0.1)
        for client in (idle, down):
            with gevent.Timeout(0.5):
                with pytest.raises(EslConnectionError):
                    client.bgapi("originate user/101 &park")
                with pytest.raises(EslConnectionError):
                    client.api("status")


def test_newlines_in_commands_are_refused(fs, make_client) -> None:
    client, _ = make_client(fs)
    connected(fs, client)
    before = list(fs.commands)
    for bad in ("originate user/101 &park\nJob-UUID: x", "status\n\nexit", "a\rb"):
        with pytest.raises(EslCommandError):
            client.bgapi(bad)
        with pytest.raises(EslCommandError):
            client.api(bad)
    with pytest.raises(EslCommandError):
        client.bgapi("status", "x\napi shutdown")
    assert client.api("status") == "+OK\n"
    assert fs.commands == [*before, "api status"]


def test_a_command_waiting_for_its_reply_fails_when_the_connection_drops(fs, make_client) -> None:
    client, _ = make_client(fs)
    connected(fs, client)
    fs.silent = True
    waiting = gevent.spawn(client.bgapi, "originate user/101 &park")
    assert fs.wait_for_command("bgapi")
    fs.drop_clients()
    waiting.join(3)
    assert isinstance(waiting.exception, EslConnectionError)


def test_a_command_without_reply_times_out(fs, make_client) -> None:
    client, _ = make_client(fs)
    connected(fs, client)
    fs.silent = True
    with gevent.Timeout(3), pytest.raises(EslConnectionError, match="no reply"):
        client.api("status", timeout=0.2)
    fs.silent = False  # let stop() have its "+OK bye"


# -- failures, backoff, reconnect ------------------------------------------------------------

def test_backoff_grows_is_capped_and_jittered() -> None:
    rng = random.Random(3)
    delays = [[backoff_delay(n, 0.5, 30.0, rng) for _ in range(50)] for n in range(12)]
    for n, samples in enumerate(delays):
        base = min(30.0, 0.5 * 2**n)
        assert all(base / 2 <= d <= base for d in samples)
        assert len(set(samples)) > 1  # jittered
    assert max(delays[-1]) <= 30.0 and min(delays[-1]) >= 15.0
    assert backoff_delay(10_000, 0.5, 30.0, rng) <= 30.0


def _messages(caplog: pytest.LogCaptureFixture, text: str, level: int = logging.WARNING
              ) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "fs_cc360.esl" and r.levelno >= level and text in r.getMessage()]


def test_wrong_password_retries_with_backoff_and_logs_once(make_client, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="fs_cc360.esl")
    with FakeFreeSwitch(password="not-ClueCon") as fake:
        client, rec = make_client(fake, backoff_initial=0.02, backoff_max=0.1)
        assert fake.wait_for_command("auth ", count=4, timeout=10)
        assert not client.connected and rec.states == []
        assert len(_messages(caplog, AUTH_REFUSED_HINT, logging.ERROR)) == 1
        assert not any("ClueCon" in r.getMessage() for r in caplog.records)  # no password
        assert not any(c.startswith("event") for c in fake.commands)


def test_acl_rejection_is_explained_once(make_client, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="fs_cc360.esl")
    with FakeFreeSwitch() as fake:
        fake.reject = True
        client, _ = make_client(fake, backoff_initial=0.02, backoff_max=0.1)
        assert wait_until(lambda: fake.connections >= 4)
        assert len(_messages(caplog, REJECTED_HINT, logging.ERROR)) == 1
        fake.reject = False
        connected(fake, client)


def test_reconnects_after_drop_and_refusal(make_client, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="fs_cc360.esl")
    with FakeFreeSwitch() as fake:
        client, rec = make_client(fake, backoff_initial=0.05, backoff_max=0.5)
        connected(fake, client)
        bodies = [b for b in remap(capture_frames("l_blind_transfer_101_to_102"), seed=4)
                  if event_name(b) in SUBSCRIBED_EVENTS]
        half = len(bodies) // 2
        first, second = bodies[:half], bodies[half:]
        fake.push_events(first)
        assert wait_until(lambda: len(rec.events) == len(first))
        fake.push_raw(event_frame(second[0])[:300])  # a frame cut short by the drop

        fake.refuse()
        fake.drop_clients(reset=True)
        assert wait_until(lambda: not client.connected)
        gevent.sleep(1.5)  # refused for a while: several attempts, backoff at its cap
        assert fake.connections == 1

        fake.accept()
        assert fake.wait_connected(timeout=2.0), "no reconnect within 2 s of accepting"
        assert wait_until(lambda: client.connected)
        fake.push_events(second)
        assert wait_until(lambda: len(rec.events) == len(bodies))
        gevent.sleep(0.05)
        assert rec.keys() == expected_keys(bodies)
        assert client.reconnects == 1
        assert rec.states == [True, False, True]
        assert wait_until(lambda: rec.connects == [False, True])
        assert len(_messages(caplog, "esl.lost")) == 1
        assert len(_messages(caplog, "esl.down")) == 1  # once, not per attempt
        assert len(_messages(caplog, "esl.connected", logging.INFO)) == 2


def test_reconnects_after_a_disconnect_notice(fs, make_client) -> None:
    client, rec = make_client(fs)
    connected(fs, client)
    fs.push_raw(b"Content-Type: text/disconnect-notice\nContent-Length: %d\n\n%s"
                % (len(DISCONNECT_BODY), DISCONNECT_BODY))
    fs.drop_clients()
    assert wait_until(lambda: client.reconnects == 1 and client.connected)
    assert fs.connections == 2
    fs.replay("a_inbound_answered_caller_hangup")
    expected = expected_keys(capture_frames("a_inbound_answered_caller_hangup"),
                             SUBSCRIBED_EVENTS)
    assert wait_until(lambda: len(rec.events) == len(expected))


# -- hostile input ---------------------------------------------------------------------------

@pytest.mark.fault
def test_hostile_input_never_stops_the_good_events(fs, make_client, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="fs_cc360.esl")
    client, rec = make_client(fs, events=tuple(CAPTURE_EVENTS))
    connected(fs, client)
    good = interleave([remap(capture_frames(n), seed=i) for i, n in enumerate(SCENARIOS)], seed=2)
    pool = [b for n in SCENARIOS for b in remap(capture_frames(n), seed=100)]
    hostile = mutated_frames(pool, 2000, seed=7)
    stream = hostile_stream(good, hostile, seed=3)
    expected = expected_keys(good)
    good_ids = {uuid for uuid, _ in expected}

    with gevent.Timeout(30):
        assert fs.push_raw(stream, chunk=4093) == 1
        assert wait_until(
            lambda: len([e for e in rec.events if e.uuid in good_ids]) >= len(expected), 25)
        assert client.api("status") == "+OK\n"  # the reply stream still lines up

    assert [(e.uuid, e.name) for e in rec.events if e.uuid in good_ids] == expected
    assert not any(e.uuid == "evil" for e in rec.events)
    assert client.connected and fs.connections == 1 and client.reconnects == 0
    assert client.frames_skipped > 500
    assert client.callback_errors == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
