"""Several tenants on one FreeSWITCH (FusionPBX domains): one connector per tenant.

The captures' directory domain is 127.0.0.1 (``variable_dialed_domain`` on the legs the
``user/`` endpoint places, ``variable_domain_name`` on the legs an authenticated phone
places, ``presence_id``). Copies of them moved into tenant1.example.com and
tenant2.example.com (fresh UUIDs) make the calls of two tenants on one switch.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator

import pytest

from fs_cc360.calls import CallTracker, CrmEvent, TrackerConfig
from fs_cc360.config import load_settings
from fs_cc360.errors import ConfigError
from fs_cc360.events import parse_event
from fs_cc360.makecall import MakeCall
from fs_cc360.numbers import NumberRules
from fs_cc360.recordings import RecordingLinks
from fs_cc360.service import Service
from fs_cc360.simulators import wait_until
from fs_cc360.simulators.crm import FakeCrm
from tests.fakes.captures import SCENARIOS, capture_frames, remap, shift_to_now
from tests.fakes.esl import FakeFreeSwitch
from tests.test_calls import EXPECTED, run, simplify
from tests.test_pipeline import CRM_TOKEN, ESL_PASSWORD, by_id, drained, running

T1, T2 = "tenant1.example.com", "tenant2.example.com"
_DOMAIN_HEADERS = (b"variable_dialed_domain", b"variable_domain_name",
                   b"variable_requested_domain_name", b"variable_sip_auth_realm")


def in_domain(frames: list[bytes], domain: str) -> list[bytes]:
    """A call of ``domain``: its legs' directory domain (and presence) moved there."""
    out = []
    for body in frames:
        for header in _DOMAIN_HEADERS:
            body = body.replace(header + b": 127.0.0.1\n", header + b": " + domain.encode()
                                + b"\n")
        body = body.replace(b"%40127.0.0.1\n", b"%40" + domain.encode() + b"\n")
        body = body.replace(b"@127.0.0.1\n", b"@" + domain.encode() + b"\n")
        out.append(body)
    return out


def tenant_call(scenario: str, domain: str, seed: int) -> list[bytes]:
    return in_domain(remap(capture_frames(scenario), seed), domain)


def feed(frames: list[bytes], domains: tuple[str, ...]) -> list[CrmEvent]:
    tracker = CallTracker(TrackerConfig(domains=domains))
    out: list[CrmEvent] = []
    last = 0.0
    for body in frames:
        event = parse_event(body)
        out += tracker.feed(event)
        last = max(last, event.timestamp)
    return out + tracker.tick(last + 3600)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_tenants_connector_reports_only_its_agents(scenario: str) -> None:
    """Every capture as tenant 1's call and as tenant 2's: tenant 1's connector gives
    exactly the capture's events for the first and nothing for the second."""
    ours = tenant_call(scenario, T1, seed=1)
    theirs = tenant_call(scenario, T2, seed=2)
    want = [(e[0], e[2], e[3], e[4], e[5]) for e in EXPECTED[scenario]]
    got = [(e[0], e[2], e[3], e[4], e[5]) for e in simplify(feed(ours, (T1,)))]
    assert got == want
    assert feed(theirs, (T1,)) == []
    # and with no domains set, both are reported (one tenant per switch, as before)
    assert len(feed(ours + theirs, ())) == 2 * len(EXPECTED[scenario])


def test_extension_101_of_two_tenants_are_two_agents() -> None:
    """The same call shape in both domains, interleaved on one connection: each tenant's
    connector sees its own 101 only."""
    ours = tenant_call("a_inbound_answered_caller_hangup", T1, seed=3)
    theirs = tenant_call("a_inbound_answered_caller_hangup", T2, seed=4)
    both = [b for pair in zip(ours, theirs, strict=True) for b in pair]
    mine = {e.call_id for e in feed(both, (T1,))}
    other = {e.call_id for e in feed(both, (T2,))}
    assert len(mine) == len(other) == 1 and mine.isdisjoint(other)
    assert mine == {e.call_id for e in run(ours)}


def test_makecall_dials_inside_the_tenants_domain() -> None:
    commands: list[str] = []

    def bgapi(command: str, job: str | None) -> str:
        commands.append(command)
        return job or "job"

    call = MakeCall(bgapi, template="{vars}user/{agent}@{domain} {client} XML default",
                    is_extension=lambda user: True, rules=NumberRules(), domain=T1)
    call.place("101", "79991234567")
    assert commands[0].split("}", 1)[1] == f"user/101@{T1} 79991234567 XML default"
    with pytest.raises(ConfigError, match="inside the tenant's domain"):
        MakeCall(bgapi, template="{vars}user/{agent} {client} XML default",
                 is_extension=lambda user: True, rules=NumberRules(), domain=T1)
    with pytest.raises(ConfigError, match="domains is empty"):
        MakeCall(bgapi, template="{vars}user/{agent}@{domain} {client} XML default",
                 is_extension=lambda user: True, rules=NumberRules())


def test_recording_links_reach_only_the_tenants_recordings(tmp_path: pathlib.Path) -> None:
    """FusionPBX keeps recordings under <recordings>/<domain>/archive/YYYY/Mon/DD/."""
    for domain in (T1, T2):
        day = tmp_path / domain / "archive" / "2026" / "Nov" / "29"
        day.mkdir(parents=True)
        (day / "a.wav").write_bytes(b"RIFF")
    (tmp_path / "loose.wav").write_bytes(b"RIFF")
    (tmp_path / T1 / "archive" / "peek.wav").symlink_to(
        tmp_path / T2 / "archive" / "2026" / "Nov" / "29" / "a.wav")
    links = RecordingLinks("https://pbx", str(tmp_path), secret=b"k", domains=(T1,))
    mine = f"{tmp_path}/{T1}/archive/2026/Nov/29/a.wav"
    assert links.url_for(mine) is not None
    assert links.url_for(f"{tmp_path}/{T2}/archive/2026/Nov/29/a.wav") is None
    assert links.url_for(f"{tmp_path}/loose.wav") is None
    assert links.resolve(f"{T1}/archive/2026/Nov/29/a.wav") is not None
    assert links.resolve(f"{T2}/archive/2026/Nov/29/a.wav") is None
    assert links.resolve("loose.wav") is None
    assert links.resolve(f"{T1}/archive/peek.wav") is None  # a symlink out of the tenant
    single = RecordingLinks("https://pbx", str(tmp_path), secret=b"k")
    assert single.resolve(f"{T2}/archive/2026/Nov/29/a.wav") is not None


def test_domains_setting() -> None:
    env = {"FS_CC360_CALLS_DOMAINS": f" {T1.upper()}, {T2},{T1} "}
    settings = load_settings(None, env=env, require_crm=False)
    assert settings.calls.domains == (T1, T2)


@contextlib.contextmanager
def tenant_connector(fs: FakeFreeSwitch, crm: FakeCrm, tmp: pathlib.Path,
                     domain: str) -> Iterator[Service]:
    with running(fs, crm, tmp, {"calls": {"domains": domain}}, connected=False) as service:
        yield service


def test_two_tenants_on_one_switch_each_crm_sees_exactly_its_calls(
        tmp_path: pathlib.Path) -> None:
    """One simulated FreeSWITCH, two connectors (one per tenant, each with its own CRM,
    outbox and port), calls of both tenants interleaved: each CRM gets exactly the
    requests its tenant's calls give, nothing of the other's."""
    calls1 = [tenant_call(s, T1, seed=10 + n) for n, s in enumerate(
        ("a_inbound_answered_caller_hangup", "q1_queue_first_agent_no_answer",
         "p1_call_pickup_102_intercepts_101"))]
    calls2 = [tenant_call(s, T2, seed=20 + n) for n, s in enumerate(
        ("h_ring_group_102_answers", "b_inbound_not_answered_caller_cancel"))]
    want1 = [e for c in calls1 for e in run(c)]
    want2 = [e for c in calls2 for e in run(c)]
    stream = shift_to_now([b for c in calls1 + calls2 for b in c])
    (tmp_path / "t1").mkdir()
    (tmp_path / "t2").mkdir()
    with FakeFreeSwitch(password=ESL_PASSWORD) as fs, \
            FakeCrm(mode="forms", token=CRM_TOKEN) as crm1, \
            FakeCrm(mode="forms", token=CRM_TOKEN) as crm2, \
            tenant_connector(fs, crm1, tmp_path / "t1", T1) as one, \
            tenant_connector(fs, crm2, tmp_path / "t2", T2) as two:
        assert wait_until(lambda: fs.ready_clients == 2, 10)
        fs.play(stream)
        assert wait_until(lambda: drained(one) and drained(two)
                          and len(crm1.events()) >= len(want1)
                          and len(crm2.events()) >= len(want2), 20)
        got1 = by_id([tuple(e) for e in crm1.events()])
        got2 = by_id([tuple(e) for e in crm2.events()])
    assert set(got1) == {e.call_id for e in want1}
    assert set(got2) == {e.call_id for e in want2}
    assert sum(map(len, got1.values())) == len(want1)
    assert sum(map(len, got2.values())) == len(want2)
