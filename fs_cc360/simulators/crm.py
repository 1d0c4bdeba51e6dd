"""A fake CC360 (Creatio) server: real HTTP on 127.0.0.1, an ephemeral port, stdlib only.

It speaks the contract in ``shared/spec/cc360-call-events-api.md`` closely enough that
framing, cookie and encoding bugs in the client surface here rather than in production:

* **Forms login** ``POST {prefix}/ServiceModel/AuthService.svc/Login`` with a JSON body
  ``{"UserName", "UserPassword"}``. Good credentials: HTTP 200 ``{"Code": 0, ...}`` and
  ``Set-Cookie`` for ``.ASPXAUTH``, ``BPMCSRF``, ``BPMLOADER`` and ``UserName``. Wrong
  credentials: HTTP 200 ``{"Code": 1, "Message": "Invalid login"}``, like the real one.
  Unparsable body: 400.
* **Event endpoints** ``RingingEventHandler`` (GET only) and ``PushHistoryData`` (POST only,
  JSON body) under the mode's path: forms ``{prefix}/0/rest/OmniWhoCallsService/<token>/...``,
  anonymous ``{prefix}/0/ServiceModel/OmniWhoCallsService.svc/<token>/...``. In forms mode a
  request needs a live ``.ASPXAUTH`` cookie (else 401, or the :meth:`FakeCrm.expire_sessions`
  style) and a ``BPMCSRF`` header equal to its session's ``BPMCSRF`` cookie (else 403).
* Choices where the vendor is silent (documented so tests can rely on them):
  a wrong token answers **404** (no such service route); a wrong method answers **405**;
  success answers 200 ``application/json`` ``{"Success": true}``; with ``strict=True`` (the
  default) a request missing a parameter of the spec, or with an unknown ``eventName`` /
  ``event``, a non-integer ``duration`` or a bad ``FILES`` body answers **400**.

Path segments are percent-decoded one by one, so a token containing ``/`` or ``%`` must be
encoded by the client to match.

Every request is recorded in :attr:`FakeCrm.received` (login too). :meth:`FakeCrm.events`
gives the *accepted* event requests as :class:`Event` tuples, i.e. what the CRM
actually stored; failed attempts stay visible in ``received`` with their ``status``.

``tls=(certfile, keyfile)`` serves HTTPS instead, to test certificate verification.

Works with and without gevent monkey-patching (threads are greenlets under the patch).
"""

from __future__ import annotations

import json
import secrets
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote

LOGIN_PATH = "/ServiceModel/AuthService.svc/Login"
FORMS_SERVICE = "/0/rest/OmniWhoCallsService"
ANONYMOUS_SERVICE = "/0/ServiceModel/OmniWhoCallsService.svc"
LOGIN_PAGE = "/Login/NuiLogin.aspx"
ENDPOINTS = {"RingingEventHandler": "GET", "PushHistoryData": "POST"}
LOST_STYLES = ("401", "redirect", "html")

_RINGING_PARAMS = ("id", "eventName", "callerid", "user")
_HISTORY_PARAMS = ("id", "callerid", "user", "event", "duration")


@dataclass(frozen=True)
class Received:
    """One request as the fake saw it. ``headers`` keys are lower-case."""

    method: str
    path: str  #: raw (still percent-encoded) path, without the query string
    endpoint: str | None  #: ``RingingEventHandler`` / ``PushHistoryData`` / ``Login`` / None
    params: dict[str, str]  #: decoded query parameters (last value wins)
    body: dict[str, Any] | None  #: parsed JSON body, if any
    headers: dict[str, str]
    at: float  #: ``time.time()`` when the request arrived
    status: int = 0  #: what the fake answered
    query: str = ""  #: raw query string, as sent
    #: the CRM took the event in (a login page answered with 200 is *not* accepted)
    accepted: bool = False

    @property
    def is_event(self) -> bool:
        return self.endpoint in ENDPOINTS


class Event(NamedTuple):
    """An accepted CC360 event; compares equal to a plain ``(endpoint, params, body)`` tuple."""

    endpoint: str
    params: dict[str, str]
    body: dict[str, Any] | None


@dataclass
class _Failure:
    status: int
    count: int
    retry_after: str | None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # socketserver's 5 drops SYNs when lanes connect at once (1 s stall)
    fake: FakeCrm

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out, or an outage we caused, closes sockets under a handler:
        # that is the point of those tests, not an error worth a traceback.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class FakeCrm:
    """A fake CC360 server; use as a context manager.

    ``with FakeCrm(mode="forms") as crm: ... crm.url ...``. Switches: :meth:`set_down`,
    :meth:`fail_next`, :attr:`latency`, :meth:`expire_sessions`, :meth:`reject_all`.
    """

    def __init__(self, mode: str = "forms", token: str = "tok123", login: str = "admin",
                 password: str = "secret", *, prefix: str = "", strict: bool = True,
                 tls: tuple[str, str] | None = None) -> None:
        if mode not in ("forms", "anonymous"):
            raise ValueError(f"mode must be 'forms' or 'anonymous', not {mode!r}")
        self.mode = mode
        self.token = token
        self.login = login
        self.password = password
        self.prefix = prefix.rstrip("/")
        self.strict = strict
        #: server-side TLS from (certfile, keyfile); the URL is then https
        self.tls_context: ssl.SSLContext | None = None
        if tls is not None:
            self.tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls_context.load_cert_chain(*tls)
        #: seconds every request (login included) waits before being answered
        self.latency: float = 0.0
        #: every request, in arrival-completion order
        self.received: list[Received] = []
        #: successful logins
        self.logins = 0
        #: login attempts, successful or not
        self.login_attempts = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._sessions: dict[str, str] = {}  # .ASPXAUTH value -> BPMCSRF value
        self._lost_style = "401"
        self._failures: list[_Failure] = []
        self._reject_status: int | None = None
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.port = 0
        #: called with each :class:`Received` as it is recorded (the demo prints them)
        self.on_request: Callable[[Received], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL of the fake CRM (what goes into ``[crm] url``)."""
        scheme = "https" if self.tls_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}{self.prefix}"

    def start(self) -> FakeCrm:
        self._stopping.clear()
        self._bind(self.port)
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._unbind()

    def __enter__(self) -> FakeCrm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _bind(self, port: int) -> None:
        server = _Server(("127.0.0.1", port), _Handler)
        server.fake = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"fake-crm-{self.port}", daemon=True)
        self._thread.start()

    def _unbind(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # keep-alive connections too: a real outage drops them
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # -- switches --------------------------------------------------------------------------

    def set_down(self, down: bool = True) -> None:
        """Down: close the listening socket and open connections (clients get *connection
        refused*). Up: listen again on the same port. Sessions survive an outage."""
        if down:
            self._unbind()
        elif self._server is None:
            self._bind(self.port)

    @property
    def is_down(self) -> bool:
        return self._server is None

    def fail_next(self, status: int, count: int = 1, retry_after: float | str | None = None
                  ) -> None:
        """Answer the next ``count`` event requests (not logins) with ``status``, optionally
        with a ``Retry-After`` header (seconds, or a preformatted HTTP date string)."""
        with self._lock:
            self._failures.append(_Failure(status, count,
                                           None if retry_after is None else str(retry_after)))

    def reject_all(self, status: int | None) -> None:
        """Answer every event request with ``status`` until called with ``None``."""
        with self._lock:
            self._reject_status = status

    def expire_sessions(self, style: str = "401") -> None:
        """Forget every session. Requests with a dead (or no) session then get ``style``:
        ``"401"``; ``"redirect"`` (302 to the login page); ``"html"`` (200 with a login page)."""
        if style not in LOST_STYLES:
            raise ValueError(f"style must be one of {LOST_STYLES}, not {style!r}")
        with self._lock:
            self._sessions.clear()
            self._lost_style = style

    # -- inspection ------------------------------------------------------------------------

    def events(self, accepted_only: bool = True) -> list[Event]:
        """CC360 event requests in arrival order (by default only the accepted ones)."""
        with self._lock:
            return [Event(r.endpoint, r.params, r.body) for r in self.received
                    if r.is_event and (r.accepted or not accepted_only)]

    def event_requests(self) -> list[Received]:
        """Every CC360 event request (accepted or not), with full details."""
        with self._lock:
            return [r for r in self.received if r.is_event]

    def wait_for(self, n: int, timeout: float = 5.0, accepted_only: bool = True) -> bool:
        """Wait until at least ``n`` event requests were received (accepted by default)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                got = sum(1 for r in self.received if r.is_event
                          and (r.accepted or not accepted_only))
                if got >= n:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.1))

    def clear(self) -> None:
        """Forget what was received (keeps sessions and switches)."""
        with self._lock:
            self.received.clear()

    # -- used by the handler ---------------------------------------------------------------

    def _record(self, rec: Received) -> None:
        with self._changed:
            self.received.append(rec)
            self._changed.notify_all()
        if self.on_request is not None:
            self.on_request(rec)

    def _take_failure(self) -> tuple[int, str | None] | None:
        with self._lock:
            if self._reject_status is not None:
                return self._reject_status, None
            while self._failures:
                failure = self._failures[0]
                if failure.count <= 0:
                    self._failures.pop(0)
                    continue
                failure.count -= 1
                return failure.status, failure.retry_after
            return None

    def _new_session(self) -> tuple[str, str]:
        auth, csrf = secrets.token_hex(16), secrets.token_urlsafe(16)
        with self._lock:
            self._sessions[auth] = csrf
            self.logins += 1
        return auth, csrf

    def _session_csrf(self, auth: str | None) -> str | None:
        with self._lock:
            return self._sessions.get(auth) if auth else None

    def _wait_latency(self) -> None:
        if self.latency > 0:
            self._stopping.wait(self.latency)


def _cookies(header: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (header or "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            out[name] = value
    return out


class _Handler(BaseHTTPRequestHandler):
    _accepted = False
    protocol_version = "HTTP/1.1"  # keep-alive, like IIS: the client's pool gets exercised
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stalls
    server: _Server

    def setup(self) -> None:
        context = self.server.fake.tls_context
        if context is not None:  # handshake here, in the connection's thread, not in accept
            self.request = self.connection = context.wrap_socket(self.request, server_side=True)
        super().setup()
        with self.server.fake._lock:
            self.server.fake._connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.fake._lock:
                self.server.fake._connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # keep pytest output clean; everything is in FakeCrm.received

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    # -- dispatch --------------------------------------------------------------------------

    def _handle(self) -> None:
        fake = self.server.fake
        raw_path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        params = dict(parse_qsl(query, keep_blank_values=True))
        body: dict[str, Any] | None = None
        body_error = False
        if raw_body:
            try:
                body = json.loads(raw_body)
            except ValueError:
                body_error = True
        at = time.time()
        fake._wait_latency()

        endpoint, token = self._route(fake, raw_path)
        self._accepted = False
        if endpoint == "Login":
            status = self._login(fake, body, body_error)
        elif endpoint in ENDPOINTS:
            status = self._event(fake, endpoint, token, params, body, body_error, headers)
        else:
            status = self._reply(404, "text/plain", b"Not Found")
        fake._record(Received(self.command, raw_path, endpoint, params, body, headers, at,
                              status, query, self._accepted))

    def _route(self, fake: FakeCrm, raw_path: str) -> tuple[str | None, str | None]:
        """(endpoint, decoded token) for a path, or (None, None) when nothing matches."""
        if not raw_path.startswith(fake.prefix + "/"):
            return None, None
        rest = raw_path[len(fake.prefix):]
        if rest == LOGIN_PATH:
            return "Login", None
        base = FORMS_SERVICE if fake.mode == "forms" else ANONYMOUS_SERVICE
        if not rest.startswith(base + "/"):
            return None, None
        segments = rest[len(base) + 1:].split("/")
        if len(segments) != 2 or segments[1] not in ENDPOINTS:
            return None, None
        return segments[1], unquote(segments[0])

    # -- login -----------------------------------------------------------------------------

    def _login(self, fake: FakeCrm, body: dict[str, Any] | None, body_error: bool) -> int:
        with fake._lock:
            fake.login_attempts += 1
        if self.command != "POST":
            return self._reply(405, "text/plain", b"Method Not Allowed")
        if body_error or not isinstance(body, dict):
            return self._reply(400, "text/html", b"<html><body>Bad Request</body></html>")
        if fake.mode == "forms" and (body.get("UserName") == fake.login
                                     and body.get("UserPassword") == fake.password):
            auth, csrf = fake._new_session()
            cookies = [
                f".ASPXAUTH={auth}; path=/; HttpOnly",
                f"BPMCSRF={csrf}; path=/",
                f"BPMLOADER={secrets.token_hex(8)}; path=/; HttpOnly",
                f"UserName={fake.login}; path=/",
            ]
            payload = {"Code": 0, "Message": "", "Exception": None, "PasswordChangeUrl": None,
                       "RedirectUrl": None}
            return self._reply(200, "application/json", json.dumps(payload).encode(),
                               [("Set-Cookie", c) for c in cookies])
        payload = {"Code": 1, "Message": "Invalid login", "Exception": None,
                   "PasswordChangeUrl": None, "RedirectUrl": None}
        return self._reply(200, "application/json", json.dumps(payload).encode())

    # -- events ----------------------------------------------------------------------------

    def _event(self, fake: FakeCrm, endpoint: str, token: str | None, params: dict[str, str],
               body: dict[str, Any] | None, body_error: bool, headers: dict[str, str]) -> int:
        failure = fake._take_failure()
        if failure is not None:
            status, retry_after = failure
            extra = [("Retry-After", retry_after)] if retry_after is not None else []
            return self._reply(status, "text/plain", f"injected {status}".encode(), extra)
        if fake.mode == "forms":
            refused = self._check_session(fake, headers)
            if refused is not None:
                return refused
        if token != fake.token:
            return self._reply(404, "text/plain", b"Not Found")
        if self.command != ENDPOINTS[endpoint]:
            return self._reply(405, "text/plain", b"Method Not Allowed")
        problem = _validate(endpoint, params, body, body_error) if fake.strict else None
        if problem:
            return self._reply(400, "application/json",
                               json.dumps({"Success": False, "Message": problem}).encode())
        self._accepted = True
        return self._reply(200, "application/json", b'{"Success":true}')

    def _check_session(self, fake: FakeCrm, headers: dict[str, str]) -> int | None:
        cookies = _cookies(headers.get("cookie"))
        csrf = fake._session_csrf(cookies.get(".ASPXAUTH"))
        if csrf is None:
            style = fake._lost_style
            if style == "redirect":
                location = f"{fake.prefix}{LOGIN_PAGE}?ReturnUrl={self.path}"
                return self._reply(302, "text/html", b"<html>Object moved</html>",
                                   [("Location", location)])
            if style == "html":
                page = b"<!DOCTYPE html><html><head><title>Login</title></head>" \
                       b"<body><form action='Login'></form></body></html>"
                return self._reply(200, "text/html; charset=utf-8", page)
            return self._reply(401, "text/plain", b"Unauthorized")
        if headers.get("bpmcsrf") != csrf or cookies.get("BPMCSRF") != csrf:
            return self._reply(403, "text/plain", b"Forbidden: CSRF token check failed")
        return None

    # -- output ----------------------------------------------------------------------------

    def _reply(self, status: int, content_type: str, payload: bytes,
               extra: list[tuple[str, str]] | None = None) -> int:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in extra or []:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)
        return status


def _validate(endpoint: str, params: dict[str, str], body: dict[str, Any] | None,
              body_error: bool) -> str | None:
    """Why the request breaks the spec, or None. Values may be empty (anonymous callers)."""
    if endpoint == "RingingEventHandler":
        missing = [p for p in _RINGING_PARAMS if p not in params]
        if missing:
            return f"missing parameter(s): {', '.join(missing)}"
        if params["eventName"] not in ("ringing", "answer", "hangup"):
            return f"unknown eventName {params['eventName']!r}"
        return None
    missing = [p for p in _HISTORY_PARAMS if p not in params]
    if missing:
        return f"missing parameter(s): {', '.join(missing)}"
    if params["event"] not in ("incoming", "outgoing"):
        return f"unknown event {params['event']!r}"
    if not params["duration"].isdigit():
        return f"duration must be whole seconds, not {params['duration']!r}"
    if body_error or not isinstance(body, dict):
        return "body must be a JSON object"
    files = body.get("FILES")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return "FILES must be a list of URLs"
    return None

