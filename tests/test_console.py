"""The operator console over real HTTP (no browser): login, sessions, CSRF, masking,
assets, and what it reads from the running service. tests/test_console_browser.py
drives the same pages in headless Chromium."""

from __future__ import annotations

import http.client
import logging
import re
from pathlib import Path

import pytest
import requests

from fs_cc360 import console as console_module
from fs_cc360.config import load_settings
from fs_cc360.console import Sessions, make_redactor, number_candidates
from fs_cc360.errors import ConfigError
from fs_cc360.numbers import NumberRules
from fs_cc360.outbox import OutboxStatus
from fs_cc360.simulators import wait_until
from tests.console_stack import ADMIN_TOKEN, ConsoleStack, console_stack, secrets_of_the_stack
from tests.test_calls import CALLER
from tests.test_pipeline import WEB_TOKEN, pipeline


@pytest.fixture(autouse=True)
def _fast_failed_logins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console_module, "FAILED_LOGIN_DELAY", 0.0)


def logged_in(stack: ConsoleStack) -> requests.Session:
    session = requests.Session()
    resp = session.post(stack.base + "/ui/login", data={"token": ADMIN_TOKEN},
                        allow_redirects=False)
    assert resp.status_code == 303 and resp.headers["Location"] == "/ui/"
    return session


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def make_dead_call(stack: ConsoleStack, seed: int) -> str:
    """One call whose four rows the CRM refused for good; returns its summary's call id."""
    before = len(stack.crm.events(accepted_only=False))
    stack.crm.reject_all(404)
    stack.play("a_inbound_answered_caller_hangup", seed)
    stack.settle(before + 4)
    stack.crm.reject_all(None)
    (row,) = stack.service.outbox.list_rows(status="dead", kind="summary", limit=1)
    return row.call_key


# --------------------------------------------------------------------------- login


def test_no_admin_token_no_console(tmp_path: Path) -> None:
    with pipeline(tmp_path) as (service, _fs, _crm):
        assert service.console is None
        base = f"http://127.0.0.1:{service.web_server.server_port}"
        assert requests.get(base + "/ui/", allow_redirects=False).status_code == 404
        assert requests.post(base + "/ui/login", data={"token": "x"}).status_code == 404


def test_login_by_form_gives_a_signed_httponly_strict_cookie(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with console_stack(tmp_path) as stack:
        anonymous = requests.get(stack.ui, allow_redirects=False)
        assert anonymous.status_code == 303 and anonymous.headers["Location"] == "/ui/login"
        assert requests.get(stack.base + "/ui", allow_redirects=False).headers["Location"] \
            == "/ui/"
        form = requests.get(stack.base + "/ui/login")
        assert form.status_code == 200 and 'type="password"' in form.text
        assert form.headers["Cache-Control"] == "no-store"
        assert "script-src 'self'" in form.headers["Content-Security-Policy"]
        assert form.headers["X-Frame-Options"] == "DENY"

        wrong = requests.post(stack.base + "/ui/login", data={"token": ADMIN_TOKEN + "x"},
                              allow_redirects=False)
        assert wrong.status_code == 401 and "Set-Cookie" not in wrong.headers
        assert "Wrong token" in wrong.text
        # a GET with the token in the URL is no login
        assert requests.get(stack.base + "/ui/login", params={"token": ADMIN_TOKEN},
                            allow_redirects=False).headers.get("Set-Cookie") is None

        good = requests.post(stack.base + "/ui/login", data={"token": ADMIN_TOKEN},
                             allow_redirects=False)
        assert good.status_code == 303
        cookie = good.headers["Set-Cookie"]
        assert cookie.startswith("fs_cc360_console=")
        for flag in ("HttpOnly", "SameSite=Strict", "Path=/ui/", "Max-Age=43200"):
            assert flag in cookie
        assert "Secure" not in cookie  # plain http on loopback; behind https it is set
        value = cookie.split(";")[0].split("=", 1)[1]
        assert ADMIN_TOKEN not in value and value
        page = requests.get(stack.ui, cookies={"fs_cc360_console": value})
        assert page.status_code == 200 and 'id="counts"' in page.text
        # a forged or altered session is no session
        for forged in (ADMIN_TOKEN, value[:-2] + "xx", "abc.def.ghi", ""):
            resp = requests.get(stack.ui, cookies={"fs_cc360_console": forged},
                                allow_redirects=False)
            assert resp.status_code == 303, forged
        behind_tls = requests.post(stack.base + "/ui/login", data={"token": ADMIN_TOKEN},
                                   headers={"X-Forwarded-Proto": "https"},
                                   allow_redirects=False)
        assert "Secure" in behind_tls.headers["Set-Cookie"]
    assert ADMIN_TOKEN not in caplog.text
    assert "console.login_failed" in caplog.text


def test_logout_ends_the_session(tmp_path: Path) -> None:
    with console_stack(tmp_path) as stack:
        session = logged_in(stack)
        cookie = session.cookies["fs_cc360_console"]
        page = session.get(stack.ui)
        assert session.post(stack.base + "/ui/logout", data={"csrf": "0" * 64},
                            allow_redirects=False).status_code == 403
        out = session.post(stack.base + "/ui/logout", data={"csrf": csrf_of(page.text)},
                           allow_redirects=False)
        assert out.status_code == 303 and "Max-Age=0" in out.headers["Set-Cookie"]
        again = requests.get(stack.ui, cookies={"fs_cc360_console": cookie},
                             allow_redirects=False)
        assert again.status_code == 303  # the old cookie is revoked


def test_sessions_expire_and_belong_to_their_token() -> None:
    now = [1000.0]
    sessions = Sessions("a" * 20, max_age=60, clock=lambda: now[0])
    cookie = sessions.new()
    session = sessions.check(cookie)
    assert session is not None
    assert sessions.csrf_ok(session, sessions.csrf(session))
    assert not sessions.csrf_ok(session, sessions.csrf(session)[:-1] + "0")
    assert not sessions.csrf_ok(session, None)
    assert Sessions("b" * 20, clock=lambda: now[0]).check(cookie) is None  # token changed
    now[0] += 61
    assert sessions.check(cookie) is None


# --------------------------------------------------------------------------- send again


def test_send_again_needs_the_session_csrf_token_and_keeps_call_order(tmp_path: Path) -> None:
    with console_stack(tmp_path) as stack:
        call = make_dead_call(stack, seed=31)
        session = logged_in(stack)
        dead = session.get(stack.base + "/ui/dead")
        assert dead.status_code == 200 and call[:8] in dead.text
        ids = [int(i) for i in re.findall(r'name="ids" value="(\d+)"', dead.text)]
        assert len(ids) == 4
        token = csrf_of(dead.text)
        url = stack.base + "/ui/dead"
        refused = [
            session.post(url, data={"ids": ids}, allow_redirects=False),
            session.post(url, data={"ids": ids, "csrf": "f" * 64}, allow_redirects=False),
            session.post(url, data={"ids": ids, "csrf": token}, allow_redirects=False,
                         headers={"Sec-Fetch-Site": "cross-site"}),
            requests.post(url, data={"ids": ids, "csrf": token}, allow_redirects=False),
        ]
        assert [r.status_code for r in refused] == [403, 403, 403, 403]
        assert stack.service.outbox.stats().count(OutboxStatus.dead) == 4
        # the whole call, in one go: delivered in its order
        done = session.post(url, data={"ids": ids, "csrf": token, "back": "//evil.example/"},
                            allow_redirects=False)
        assert done.status_code == 303
        assert done.headers["Location"] == "/ui/dead?sent=4&skipped=0&stale=0"
        assert wait_until(lambda: [e.params.get("eventName", "summary") for e in
                                   stack.crm.events() if e.params["id"] == call]
                          == ["ringing", "answer", "hangup", "summary"], 10)
        again = session.post(url, data={"one": str(ids[0]), "csrf": token},
                             allow_redirects=False)
        assert again.headers["Location"] == "/ui/dead?sent=0&skipped=1&stale=0"
        flash = session.get(stack.base + again.headers["Location"])
        assert "not dead any more" in flash.text


# --------------------------------------------------------------------------- pages


def test_pages_show_no_secret(tmp_path: Path) -> None:
    with console_stack(tmp_path, webapi={"recording_auth": "shared"}) as stack:
        call = make_dead_call(stack, seed=32)
        session = logged_in(stack)
        pages = {
            "overview": session.get(stack.ui),
            "live": session.get(stack.ui, params={"fragment": "live"}),
            "search": session.get(stack.base + "/ui/calls", params={"q": CALLER}),
            "call": session.get(stack.base + f"/ui/calls/{call}"),
            "dead": session.get(stack.base + "/ui/dead"),
        }
        for name, page in pages.items():
            assert page.status_code == 200, name
            for secret in secrets_of_the_stack():
                assert secret not in page.text, (name, secret)
        timeline = pages["call"].text
        assert "/OmniWhoCallsService/***/PushHistoryData" in timeline
        assert "/***/recording/" in timeline  # the shared webapi token, masked
        assert WEB_TOKEN not in timeline
        assert 'data-outcome="dead"' in timeline and "HTTP 404" in timeline
        assert "<html" not in pages["live"].text and 'id="counts"' in pages["live"].text


def test_search_pages_and_unknown_calls(tmp_path: Path) -> None:
    with console_stack(tmp_path) as stack:
        stack.play("a_inbound_answered_caller_hangup", 33)
        stack.settle(4)
        session = logged_in(stack)
        found = session.get(stack.base + "/ui/calls", params={"q": "+7 (999) 123-45-67"})
        assert found.status_code == 200 and found.text.count('href="/ui/calls/') == 1
        by_agent = session.get(stack.base + "/ui/calls", params={"q": "101", "by": "agent"})
        assert by_agent.text.count('href="/ui/calls/') == 1
        by_number_only = session.get(stack.base + "/ui/calls",
                                     params={"q": "101", "by": "number"})
        assert 'id="no-calls"' in by_number_only.text
        assert session.get(stack.base + "/ui/calls/no-such-call").status_code == 404
        assert session.get(stack.base + "/ui/calls/bad%20id%3Cscript").status_code == 404
        assert session.get(stack.base + "/ui/nowhere").status_code == 404
        assert session.post(stack.ui, allow_redirects=False).status_code == 405
        xss = session.get(stack.base + "/ui/calls", params={"q": "<script>alert(1)</script>"})
        assert "<script>alert(1)" not in xss.text and "&lt;script&gt;" in xss.text


def test_static_assets_ship_in_the_package(tmp_path: Path) -> None:
    with console_stack(tmp_path) as stack:
        for name, ctype in console_module.STATIC_FILES.items():
            resp = requests.get(stack.base + f"/ui/static/{name}")
            assert resp.status_code == 200 and resp.headers["Content-Type"] == ctype, name
            assert resp.content
        port = stack.service.web_server.server_port
        for bad in ("../console.py", "..%2fconsole.py", "nope.js", ""):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", f"/ui/static/{bad}")  # sent as is (requests would resolve ..)
            assert conn.getresponse().status == 404, bad
            conn.close()
        page = logged_in(stack).get(stack.ui).text
        # nothing from another origin: the machines it runs on often have no internet
        assert not re.search(r'(src|href)="(https?:)?//', page)


def test_overview_follows_the_crm_circuit_and_the_metric(tmp_path: Path) -> None:
    with console_stack(tmp_path) as stack:
        session = logged_in(stack)
        assert 'id="crm">' in session.get(stack.ui).text.replace('class="card ok" ', "")
        stack.crm.set_down(True)
        stack.play("a_inbound_answered_caller_hangup", 34)
        assert wait_until(lambda: stack.service.deliverer.crm_down, 10)
        live = session.get(stack.ui, params={"fragment": "live"}).text
        assert re.search(r'class="card bad" id="crm">\s*<h2>CRM</h2>\s*<p class="big">down',
                         live)
        assert "last error" in live
        assert b"fs_cc360_crm_up 0.0" in stack.service.metrics.render()[0]
        stack.crm.set_down(False)
        assert wait_until(lambda: not stack.service.deliverer.crm_down, 15)
        assert b"fs_cc360_crm_up 1.0" in stack.service.metrics.render()[0]


# --------------------------------------------------------------------------- helpers


def test_redactor_and_number_candidates() -> None:
    redact = make_redactor(["s3cr3t-token", "", "ab", "pass/word"])
    assert redact("GET /x/s3cr3t-token/y?p=pass/word ab") == "GET /x/***/y?p=*** ab"
    assert make_redactor([])("as is") == "as is"
    rules = NumberRules(national_prefix="8:7")
    assert number_candidates("8 (999) 123-45-67", rules) == [
        "8 (999) 123-45-67", "79991234567", "89991234567", "+89991234567"]
    assert number_candidates("anonymous", rules) == ["anonymous"]


@pytest.mark.parametrize("overrides, fragment", [
    ({"admin_token": WEB_TOKEN, "token": WEB_TOKEN}, "not [webapi] token"),
    ({"admin_token": "x" * 20, "enabled": "false"}, "enabled = false"),
    ({"admin_token": "change-me"}, "placeholder"),
    ({"admin_token": "has a space in it ok"}, "without spaces"),
])
def test_admin_token_is_validated_at_startup(overrides: dict[str, str], fragment: str) -> None:
    values = {"crm": {"url": "https://crm.example.com", "token": "t", "login": "l",
                      "password": "p"},
              "webapi": {"token": "makecall-token-0123456789", **overrides}}
    with pytest.raises(ConfigError) as caught:
        load_settings(None, env={}, overrides=values)
    assert caught.value.key == "webapi.admin_token" and fragment in str(caught.value)
    assert "x" * 20 not in str(caught.value)
