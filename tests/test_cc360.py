"""Cc360Client against the fake CC360 over real HTTP on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from fs_cc360.cc360 import Cc360Client, CrmResponse, normalise_base_url, parse_retry_after
from fs_cc360.crm_request import CrmRequest
from fs_cc360.errors import (
    ConfigError,
    CrmAuthError,
    CrmRejected,
    CrmTimeout,
    CrmUnavailable,
)
from tests.fakes.crm import FakeCrm

TOKEN = "tok123"
PASSWORD = "pa55-Wörd&secret"

RINGING = CrmRequest("GET", "RingingEventHandler",
                     {"id": "call-1", "eventName": "ringing", "callerid": "79991234567",
                      "user": "101"})
SUMMARY = CrmRequest("POST", "PushHistoryData",
                     {"id": "call-1", "callerid": "79991234567", "user": "101",
                      "event": "incoming", "duration": "42"},
                     {"FILES": ["https://pbx.example/t/recording/a.mp3"]})

MakeClient = Callable[..., Cc360Client]


@pytest.fixture
def crm() -> Iterator[FakeCrm]:
    with FakeCrm(mode="forms", token=TOKEN, password=PASSWORD) as fake:
        yield fake


@pytest.fixture
def anon_crm() -> Iterator[FakeCrm]:
    with FakeCrm(mode="anonymous", token=TOKEN) as fake:
        yield fake


@pytest.fixture
def make_client() -> Iterator[MakeClient]:
    """Builds clients for a fake (forms credentials by default) and closes them after."""
    made: list[Cc360Client] = []

    def make(fake: FakeCrm, **kw: object) -> Cc360Client:
        kw.setdefault("auth", fake.mode)
        if fake.mode == "forms":
            kw.setdefault("login", "admin")
            kw.setdefault("password", PASSWORD)
        kw.setdefault("timeout", 5.0)
        url = kw.pop("url", fake.url)
        token = kw.pop("token", TOKEN)
        client = Cc360Client(url, token, **kw)  # type: ignore[arg-type]
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def _secrets_absent(text: str, *secrets: str) -> bool:
    return all(s not in text for s in secrets)


# -- forms mode ---------------------------------------------------------------------------


def test_forms_login_then_bpmcsrf_header_on_every_request(crm: FakeCrm,
                                                          make_client: MakeClient) -> None:
    client = make_client(crm)
    response = client.send(RINGING)
    assert isinstance(response, CrmResponse)
    assert (response.status, response.text) == (200, '{"Success":true}')
    assert response.elapsed >= 0
    client.send(SUMMARY)
    client.send(RINGING)

    login, *events = crm.received
    assert login.endpoint == "Login" and login.method == "POST"
    assert login.path == "/ServiceModel/AuthService.svc/Login"
    assert login.body == {"UserName": "admin", "UserPassword": PASSWORD}
    assert crm.logins == 1
    assert len(events) == 3
    for rec in events:
        cookies = dict(c.strip().split("=", 1) for c in rec.headers["cookie"].split(";"))
        assert {".ASPXAUTH", "BPMCSRF", "BPMLOADER", "UserName"} <= set(cookies)
        assert rec.headers["bpmcsrf"] == cookies["BPMCSRF"]
        assert rec.headers["user-agent"].startswith("fs-cc360/")
        assert rec.status == 200
    assert events[0].path == f"/0/rest/OmniWhoCallsService/{TOKEN}/RingingEventHandler"
    assert crm.events() == [
        ("RingingEventHandler", RINGING.params, None),
        ("PushHistoryData", SUMMARY.params, SUMMARY.body),
        ("RingingEventHandler", RINGING.params, None),
    ]
    assert events[1].headers["content-type"] == "application/json"


def test_fake_enforces_session_and_csrf(crm: FakeCrm) -> None:
    """The BPMCSRF test above only means something if the fake really checks it."""
    url = f"{crm.url}/0/rest/OmniWhoCallsService/{TOKEN}/RingingEventHandler"
    with requests.Session() as s:
        assert s.get(url, params=RINGING.params, timeout=5).status_code == 401
        r = s.post(f"{crm.url}/ServiceModel/AuthService.svc/Login", timeout=5,
                   json={"UserName": "admin", "UserPassword": PASSWORD})
        assert r.json()["Code"] == 0
        assert s.get(url, params=RINGING.params, timeout=5).status_code == 403
        ok = s.get(url, params=RINGING.params, timeout=5,
                   headers={"BPMCSRF": s.cookies["BPMCSRF"]})
        assert ok.status_code == 200


def test_explicit_login(crm: FakeCrm, make_client: MakeClient) -> None:
    client = make_client(crm)
    client.login()
    client.send(RINGING)
    assert crm.logins == 1
    assert len(crm.events()) == 1


@pytest.mark.parametrize("style", ["401", "redirect", "html"])
def test_lost_session_relogs_in_once_and_retries(crm: FakeCrm, make_client: MakeClient,
                                                 style: str) -> None:
    client = make_client(crm)
    client.send(RINGING)
    crm.expire_sessions(style)

    assert client.send(SUMMARY).status == 200

    assert crm.logins == 2
    statuses = [r.status for r in crm.event_requests()]
    refused = {"401": 401, "redirect": 302, "html": 200}[style]
    assert statuses == [200, refused, 200]
    assert [r.accepted for r in crm.event_requests()] == [True, False, True]
    assert crm.events() == [("RingingEventHandler", RINGING.params, None),
                            ("PushHistoryData", SUMMARY.params, SUMMARY.body)]
    client.send(RINGING)  # the new session sticks
    assert crm.logins == 2


def test_still_refused_after_relogin_is_auth_error(crm: FakeCrm,
                                                   make_client: MakeClient) -> None:
    client = make_client(crm)
    client.login()
    crm.fail_next(403, count=2)
    with pytest.raises(CrmAuthError) as info:
        client.send(RINGING)
    assert info.value.status == 403
    assert crm.logins == 2  # one re-login, not a loop
    assert _secrets_absent(str(info.value), TOKEN, PASSWORD)


def test_wrong_password_is_auth_error_without_the_password(crm: FakeCrm,
                                                           make_client: MakeClient) -> None:
    bad = "Wr0ng-pa55word!"
    client = make_client(crm, password=bad)
    with pytest.raises(CrmAuthError) as info:
        client.login()
    message = str(info.value)
    assert "crm.password" in message and "admin" in message
    assert _secrets_absent(message, bad, PASSWORD, TOKEN)
    with pytest.raises(CrmAuthError):  # the implicit login of send() too
        client.send(RINGING)
    assert crm.logins == 0
    assert crm.events(accepted_only=False) == []


def test_concurrent_lanes_with_wrong_password_cost_one_login(crm: FakeCrm,
                                                             make_client: MakeClient) -> None:
    """Lanes queued behind a failed login share its outcome (no account lockout)."""
    lanes = 6
    client = make_client(crm, password="wrong", lanes=lanes)
    crm.latency = 0.3  # keeps the first login in flight while the other lanes queue up
    errors: list[BaseException] = []

    def run(lane: int) -> None:
        try:
            client.send(RINGING, lane)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(lane,)) for lane in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(errors) == lanes and all(isinstance(e, CrmAuthError) for e in errors)
    assert crm.login_attempts == 1


def test_concurrent_lanes_share_one_login_and_one_relogin(crm: FakeCrm,
                                                          make_client: MakeClient) -> None:
    lanes = 8
    client = make_client(crm, lanes=lanes)
    results: list[object] = []

    def run(lane: int) -> None:
        try:
            results.append(client.send(RINGING, lane).status)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            results.append(exc)

    def all_lanes() -> None:
        threads = [threading.Thread(target=run, args=(lane,)) for lane in range(lanes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)

    all_lanes()
    assert results == [200] * lanes
    assert crm.logins == 1
    assert len(client._sessions) == lanes  # one requests.Session per lane

    crm.expire_sessions("401")
    results.clear()
    all_lanes()
    assert results == [200] * lanes
    assert crm.logins == 2
    assert len(crm.events()) == 2 * lanes


def test_lane_out_of_range(crm: FakeCrm, make_client: MakeClient) -> None:
    with pytest.raises(ValueError):
        make_client(crm, lanes=2).send(RINGING, lane=2)


# -- anonymous mode -----------------------------------------------------------------------


def test_anonymous_uses_service_path_and_never_logs_in(anon_crm: FakeCrm,
                                                       make_client: MakeClient) -> None:
    client = make_client(anon_crm)
    client.login()  # a no-op in anonymous mode
    client.send(RINGING)
    client.send(SUMMARY)

    assert anon_crm.login_attempts == 0
    paths = [r.path for r in anon_crm.received]
    assert paths == [
        f"/0/ServiceModel/OmniWhoCallsService.svc/{TOKEN}/RingingEventHandler",
        f"/0/ServiceModel/OmniWhoCallsService.svc/{TOKEN}/PushHistoryData",
    ]
    for rec in anon_crm.received:
        assert "bpmcsrf" not in rec.headers and "cookie" not in rec.headers
    assert anon_crm.events() == [("RingingEventHandler", RINGING.params, None),
                                 ("PushHistoryData", SUMMARY.params, SUMMARY.body)]


def test_anonymous_client_against_forms_only_crm_is_rejected(crm: FakeCrm,
                                                             make_client: MakeClient) -> None:
    client = make_client(crm, auth="anonymous")
    with pytest.raises(CrmRejected) as info:
        client.send(RINGING)
    assert info.value.status == 404
    assert "crm.auth" in str(info.value) and TOKEN not in str(info.value)


# -- transport failures -------------------------------------------------------------------


def test_crm_down_is_unavailable_then_recovers(crm: FakeCrm, make_client: MakeClient) -> None:
    client = make_client(crm)
    client.send(RINGING)  # leaves a keep-alive connection in the pool
    crm.set_down(True)
    with pytest.raises(CrmUnavailable) as info:
        client.send(RINGING)
    assert not isinstance(info.value, CrmTimeout)
    assert info.value.status is None
    assert "***" in str(info.value) and TOKEN not in str(info.value)

    crm.set_down(False)
    assert client.send(RINGING).status == 200
    assert crm.logins == 1  # sessions survive a network outage


def test_first_send_while_down_is_unavailable_not_auth(crm: FakeCrm,
                                                       make_client: MakeClient) -> None:
    """The implicit login of send() keeps the transport class, so delivery backs off."""
    client = make_client(crm)
    crm.set_down(True)
    with pytest.raises(CrmUnavailable):
        client.send(RINGING)
    with pytest.raises(CrmAuthError) as info:  # explicit login() says why in its own words
        client.login()
    assert "cannot reach the CRM" in str(info.value)


def test_slow_crm_is_timeout(anon_crm: FakeCrm, make_client: MakeClient) -> None:
    client = make_client(anon_crm, timeout=0.2)
    anon_crm.latency = 5  # the fake's handler wakes up when the fake stops
    with pytest.raises(CrmTimeout) as info:
        client.send(RINGING)
    assert isinstance(info.value, CrmUnavailable)
    assert "crm.timeout" in str(info.value) and TOKEN not in str(info.value)


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
def test_transient_statuses_are_unavailable(anon_crm: FakeCrm, make_client: MakeClient,
                                            status: int) -> None:
    anon_crm.fail_next(status)
    with pytest.raises(CrmUnavailable) as info:
        make_client(anon_crm).send(RINGING)
    assert info.value.status == status
    assert info.value.retry_after is None


def test_retry_after_seconds_and_http_date(anon_crm: FakeCrm, make_client: MakeClient) -> None:
    client = make_client(anon_crm)
    anon_crm.fail_next(503, retry_after=30)
    with pytest.raises(CrmUnavailable) as info:
        client.send(RINGING)
    assert info.value.status == 503 and info.value.retry_after == 30.0

    anon_crm.fail_next(429, retry_after="Wed, 21 Oct 2099 07:28:00 GMT")
    with pytest.raises(CrmUnavailable) as info:
        client.send(RINGING)
    assert info.value.status == 429
    assert info.value.retry_after is not None and info.value.retry_after > 3600

    assert client.send(RINGING).status == 200  # failures were one-shot


def test_parse_retry_after() -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now=now) == 0.0  # past
    assert parse_retry_after("Wed, 21 Oct 2015 09:28:30 +0200", now=now) == 30.0
    for junk in (None, "", "soon", "nan", "-5x"):
        assert parse_retry_after(junk) is None
    assert parse_retry_after("-5") == 0.0


def test_client_error_is_rejected(anon_crm: FakeCrm, make_client: MakeClient) -> None:
    client = make_client(anon_crm)
    anon_crm.fail_next(400)
    with pytest.raises(CrmRejected) as info:
        client.send(RINGING)
    assert info.value.status == 400
    assert "HTTP 400" in str(info.value)

    anon_crm.reject_all(422)
    for _ in range(2):
        with pytest.raises(CrmRejected):
            client.send(SUMMARY)
    anon_crm.reject_all(None)
    assert client.send(SUMMARY).status == 200


def test_redirect_elsewhere_is_unavailable_not_relogin(crm: FakeCrm,
                                                       make_client: MakeClient) -> None:
    """A 3xx that is not to a login page is a misconfigured URL: keep the row, no re-login."""
    client = make_client(crm)
    client.login()
    crm.fail_next(307)
    with pytest.raises(CrmUnavailable) as info:
        client.send(RINGING)
    assert info.value.status == 307 and "crm.url" in str(info.value)
    assert crm.logins == 1


def test_strict_fake_rejects_requests_off_the_spec(anon_crm: FakeCrm,
                                                   make_client: MakeClient) -> None:
    bad = CrmRequest("GET", "RingingEventHandler", {"id": "x", "eventName": "ring"})
    with pytest.raises(CrmRejected) as info:
        make_client(anon_crm).send(bad)
    assert "missing parameter" in str(info.value)


# -- secrets and URLs ---------------------------------------------------------------------


def test_token_is_masked_and_encoded(make_client: MakeClient) -> None:
    token = "s3cr/t+tok en%"
    with FakeCrm(mode="anonymous", token=token) as fake:
        client = make_client(fake, token=token)
        masked = client.url_for(RINGING)
        assert masked.startswith(
            f"{fake.url}/0/ServiceModel/OmniWhoCallsService.svc/***/RingingEventHandler?")
        assert token not in masked
        raw = client.url_for(RINGING, masked=False)
        assert "/s3cr%2Ft%2Btok%20en%25/" in raw

        assert client.send(RINGING).status == 200  # the fake decoded the token back

        fake.fail_next(400)
        with pytest.raises(CrmRejected) as rejected:
            client.send(RINGING)
        fake.set_down(True)
        with pytest.raises(CrmUnavailable) as down:
            client.send(RINGING)
    for exc in (rejected.value, down.value):
        assert "/***/" in str(exc)
        assert _secrets_absent(str(exc), token, "s3cr%2Ft", "s3cr/t")


def test_secrets_never_logged(crm: FakeCrm, make_client: MakeClient,
                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG", logger="fs_cc360")
    client = make_client(crm)
    client.send(RINGING)
    crm.expire_sessions("redirect")
    client.send(RINGING)
    crm.fail_next(403, count=2)
    with pytest.raises(CrmAuthError):
        client.send(RINGING)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "crm.login ok" in text and "crm.session_lost status=302-to-login relogin=1" in text
    cookies = [r.headers.get("cookie", "") for r in crm.received]
    csrf = [r.headers.get("bpmcsrf", "") for r in crm.received]
    assert _secrets_absent(text, TOKEN, PASSWORD, *filter(None, csrf))
    for header in cookies:  # the session cookies (UserName is the login, not a secret)
        for pair in filter(None, header.split(";")):
            name, value = pair.strip().split("=", 1)
            if name != "UserName":
                assert value not in text


def test_params_are_url_encoded(anon_crm: FakeCrm, make_client: MakeClient) -> None:
    params = {"id": "a b&c=d#e", "eventName": "ringing", "callerid": "+7 (999) 123-45-67",
              "user": "101", "extra": "ü/?%"}
    request = CrmRequest("GET", "RingingEventHandler", params)
    client = make_client(anon_crm)
    client.send(request)
    (rec,) = anon_crm.received
    assert rec.params == params
    assert "id=a%20b%26c%3Dd%23e" in rec.query and "callerid=%2B7%20%28999%29" in rec.query
    assert client.url_for(request).endswith("?" + rec.query)


@pytest.mark.parametrize("suffix", ["", "/", "/0", "/0/"])
def test_base_url_with_path_prefix_and_trailing_slash(make_client: MakeClient,
                                                      suffix: str) -> None:
    with FakeCrm(mode="forms", token=TOKEN, password=PASSWORD, prefix="/crm") as fake:
        client = make_client(fake, url=fake.url + suffix)
        assert client.base_url == fake.url
        assert client.send(RINGING).status == 200
        assert [r.path for r in fake.received] == [
            "/crm/ServiceModel/AuthService.svc/Login",
            f"/crm/0/rest/OmniWhoCallsService/{TOKEN}/RingingEventHandler"]


def test_login_at_wrong_url_says_not_a_creatio_site(make_client: MakeClient) -> None:
    with FakeCrm(mode="forms", token=TOKEN, password=PASSWORD, prefix="/crm") as fake:
        client = make_client(fake, url=fake.url.removesuffix("/crm"))
        with pytest.raises(CrmAuthError) as info:
            client.login()
    assert info.value.status == 404 and "crm.url" in str(info.value)


@pytest.mark.parametrize("url", ["crm.example.com", "ftp://crm.example.com",
                                 "https://u:pw@crm.example.com", "https://crm.example.com/?a=1"])
def test_bad_base_url_is_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        normalise_base_url(url)
    assert info.value.key == "crm.url" and "pw" not in str(info.value)


def test_constructor_validates(crm: FakeCrm) -> None:
    for kw, key in [({"auth": "basic"}, "crm.auth"), ({"token": ""}, "crm.token"),
                    ({"login": ""}, "crm.login"), ({"timeout": 0}, "crm.timeout")]:
        args = {"token": TOKEN, "login": "admin", **kw}
        token = args.pop("token")
        with pytest.raises(ConfigError) as info:
            Cc360Client(crm.url, token, **args)  # type: ignore[arg-type]
        assert info.value.key == key
    Cc360Client(crm.url, TOKEN, auth="anonymous").close()  # no login needed


def test_works_without_gevent_patching() -> None:
    """The fake and the client also run on plain threads (the CLI, bench scripts)."""
    script = (
        "import sys, threading\n"
        "from tests.fakes.crm import FakeCrm\n"
        "from fs_cc360.cc360 import Cc360Client\n"
        "from fs_cc360.crm_request import CrmRequest\n"
        "assert 'gevent.monkey' not in sys.modules\n"
        "r = CrmRequest('GET', 'RingingEventHandler',"
        " {'id': '1', 'eventName': 'ringing', 'callerid': '2', 'user': '101'})\n"
        "with FakeCrm() as crm:\n"
        "    c = Cc360Client(crm.url, 'tok123', login='admin', password='secret', lanes=4,"
        " timeout=5)\n"
        "    ts = [threading.Thread(target=c.send, args=(r, i)) for i in range(4)]\n"
        "    [t.start() for t in ts]; [t.join(10) for t in ts]\n"
        "    crm.expire_sessions('html'); c.send(r)\n"
        "    crm.set_down(True); crm.set_down(False); c.send(r)\n"
        "    assert crm.wait_for(6, 5) and crm.logins == 2, (crm.logins, crm.events())\n"
        "    c.close()\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# -- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A throwaway self-signed certificate for 127.0.0.1 (made by the openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30)
    return str(cert), str(key)


def test_tls_verified_by_default(tls_files: tuple[str, str], make_client: MakeClient) -> None:
    with FakeCrm(mode="anonymous", token=TOKEN, tls=tls_files) as fake:
        assert fake.url.startswith("https://")
        with pytest.raises(CrmUnavailable) as info:
            make_client(fake).send(RINGING)
        assert "TLS" in str(info.value) and TOKEN not in str(info.value)
        assert fake.events() == []


def test_tls_with_ca_bundle_path(tls_files: tuple[str, str], make_client: MakeClient) -> None:
    with FakeCrm(mode="forms", token=TOKEN, password=PASSWORD, tls=tls_files) as fake:
        client = make_client(fake, verify=tls_files[0])
        assert client.send(SUMMARY).status == 200
        assert fake.logins == 1 and len(fake.events()) == 1


def test_missing_ca_bundle_is_config_error(crm: FakeCrm, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Cc360Client(crm.url, TOKEN, login="admin", verify=str(tmp_path / "nope.pem"))


def test_environment_proxies_and_ca_bundle_are_read_once_per_session(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """requests would re-read the environment on every request; the client reads it when
    it makes a lane's session, so proxied deployments keep working."""
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not used: no request is sent\n")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = Cc360Client("https://crm.example.com", "tok", auth="anonymous")
    session = client._new_session()
    assert session.trust_env is False
    assert session.proxies.get("https") == "http://127.0.0.1:9"
    assert client.verify == str(bundle)
    monkeypatch.setenv("NO_PROXY", "crm.example.com")
    assert "https" not in client._new_session().proxies
    client.close()
