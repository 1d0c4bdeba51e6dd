"""The operator console under ``/ui/``: the outbox and each call's story, in a browser.

For the support person asked "my popup never showed": an overview (FreeSWITCH and CRM
state, outbox counts, deliveries per minute), a search for calls by caller number, agent
or call id with each call's timeline (the CC360 requests it produced and every recorded
outcome), and the dead rows with a "send again" button, the only action the page can
take (:meth:`~fs_cc360.outbox.Outbox.requeue`, as ``fs-cc360 outbox retry`` does).

Served by the web API's listener (same TLS) when ``[webapi] admin_token`` is set, as a
WSGI app the :class:`~fs_cc360.webapi.WebApi` hands every ``/ui`` request to.

Security:

* Login by a POSTed form (the token never appears in a URL, so never in an access log);
  the token is compared in constant time; a failed login costs the client a second.
* The session is a cookie signed with a key derived from the admin token
  (``itsdangerous``; it holds a random session id and its time, never the token),
  ``HttpOnly``, ``SameSite=Strict``, ``Path=/ui/``, ``Secure`` over HTTPS, valid
  :data:`SESSION_SECONDS`. Changing the admin token ends every session.
* The POST actions (send again, log out) carry a CSRF token bound to the session
  (an HMAC of its id) and are refused from another site (``Sec-Fetch-Site``).
* Everything shown passes through :func:`make_redactor` (every configured secret
  becomes ``***``); CRM URLs come with their token masked and recording links with
  theirs (:func:`fs_cc360.webapi.mask_tokens`), as ``outbox show`` prints them.
* A strict Content-Security-Policy: only this package's own CSS and JS, no inline
  script, no third-party anything (the machines often have no internet anyway).

Never blocks the hub: every read goes through an :class:`~fs_cc360.outbox.OutboxReader`
(its own connection and native thread), the one write through the service's
:class:`~fs_cc360.outbox.OutboxWriter`; no transaction is open while a page is sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import gevent
import itsdangerous
import jinja2

from fs_cc360.cli.common import format_age, format_time
from fs_cc360.cli.outbox_cmds import health
from fs_cc360.crm_request import CrmRequest
from fs_cc360.errors import OutboxError
from fs_cc360.numbers import NumberRules
from fs_cc360.outbox import (
    Attempt,
    CallLine,
    Outbox,
    OutboxReader,
    OutboxStats,
    OutboxStatus,
    Row,
)
from fs_cc360.webapi import mask_tokens, raw_path

if TYPE_CHECKING:
    from fs_cc360.service import Service

log = logging.getLogger(__name__)

PREFIX = "/ui"
SESSION_COOKIE = "fs_cc360_console"
#: A login lasts this long (seconds).
SESSION_SECONDS = 12 * 3600
#: A failed login answers only after this many seconds (slows guessing; costs a greenlet).
FAILED_LOGIN_DELAY = 1.0
#: Calls or dead rows per page.
PAGE_SIZE = 50
#: The overview refreshes itself this often (seconds).
REFRESH_SECONDS = 10
#: The deliveries chart covers this many minutes.
CHART_MINUTES = 60
#: "Recent" dead and expired rows: became so within this many seconds.
RECENT_SECONDS = 24 * 3600
#: A POSTed form larger than this is refused (a page of ids fits many times).
MAX_FORM_BYTES = 32 * 1024
MAX_FORM_FIELDS = 2 * PAGE_SIZE + 10
#: Characters a search term may have (a phone number, an extension, a call id).
MAX_QUERY = 100
#: The assets under ``fs_cc360/console_assets/static`` and their content types.
STATIC_FILES = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
SEARCH_FIELDS = ("any", "number", "agent", "call")

_CALL_KEY = re.compile(r"[A-Za-z0-9._:@+-]{1,200}")
_SECURITY_HEADERS = [
    ("Content-Security-Policy",
     "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
     "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
]
_HTML = "text/html; charset=utf-8"

StartResponse = Callable[..., Any]
Headers = list[tuple[str, str]]


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ServiceState:
    """What the overview shows about the running service besides the outbox."""

    esl_connected: bool
    esl_since: float | None  #: when the ESL state last changed (None: never connected)
    crm_up: bool  #: the delivery circuit is closed
    crm_since: float | None  #: when the circuit last changed (None: not since start)
    crm_last_error: str | None
    crm_last_error_at: float | None
    clock_offset: float | None  #: FreeSWITCH's clock behind ours, seconds (None: unknown)
    clock_skewed: bool
    outbox_writable: bool
    spooled: int  #: events produced, not yet committed to the outbox


def make_redactor(values: Iterable[str]) -> Callable[[str], str]:
    """A function that replaces every occurrence of each of ``values`` by ``***``.

    Fed with every configured secret, so no error text, URL or body shown by the
    console can carry one, whatever put it there. Values shorter than 4 characters are
    ignored (they would mask ordinary text, and no real secret is that short).
    """
    wanted = sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)
    if not wanted:
        return lambda text: text
    pattern = re.compile("|".join(re.escape(v) for v in wanted))
    return lambda text: pattern.sub("***", text)


def number_candidates(term: str, rules: NumberRules) -> list[str]:
    """The callerid values a typed number may be stored as: as typed, normalised by the
    configured ``[calls]`` rules (what the tracker stored), digits only, ``+digits``."""
    digits = re.sub(r"\D+", "", term)
    found = [term, rules.normalize(term), digits, f"+{digits}" if digits else ""]
    return [value for value in dict.fromkeys(found) if value]


# --------------------------------------------------------------------------- sessions


class Sessions:
    """Signed, expiring login sessions and the CSRF token of each.

    A session is a random id signed with its creation time (``itsdangerous``'s
    ``TimestampSigner``) under a key derived from the admin token. Logging out revokes
    the id until it would have expired anyway (a small in-memory set).
    """

    def __init__(self, admin_token: str, *, max_age: float = SESSION_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        key = hmac.new(admin_token.encode("utf-8"), b"fs-cc360 console session",
                       hashlib.sha256).digest()
        self._key = key
        self._clock = clock
        self.max_age = max_age
        outer = self

        class _Signer(itsdangerous.TimestampSigner):
            def get_timestamp(self) -> int:
                return int(outer._clock())

        self._signer = _Signer(key, salt="fs-cc360-console", digest_method=hashlib.sha256)
        self._revoked: dict[str, float] = {}

    def new(self) -> str:
        """A new session: the cookie value."""
        return self._signer.sign(secrets.token_urlsafe(24)).decode("ascii")

    def check(self, cookie: str | None) -> str | None:
        """The session id of a valid, unexpired, not revoked cookie; else None."""
        if not cookie:
            return None
        try:
            session = self._signer.unsign(cookie, max_age=self.max_age).decode("ascii")
        except (itsdangerous.BadData, UnicodeError):
            return None
        return None if session in self._revoked else session

    def revoke(self, session: str) -> None:
        now = self._clock()
        self._revoked = {s: until for s, until in self._revoked.items() if until > now}
        self._revoked[session] = now + self.max_age

    def csrf(self, session: str) -> str:
        return hmac.new(self._key, b"csrf:" + session.encode("ascii"), hashlib.sha256).hexdigest()

    def csrf_ok(self, session: str, given: str | None) -> bool:
        return hmac.compare_digest(self.csrf(session).encode(),
                                   (given or "").encode("utf-8", "replace"))


# --------------------------------------------------------------------------- views


@dataclass(frozen=True)
class Bar:
    """One minute of the deliveries chart (SVG coordinates)."""

    x: float
    y: float
    height: float
    count: int
    label: str


@dataclass(frozen=True)
class Chart:
    bars: list[Bar]
    peak: int
    total: int
    width: float
    height: float
    bar_width: float


def deliveries_chart(per_minute: Sequence[tuple[float, int]], *, width: float = 600.0,
                     height: float = 100.0) -> Chart:
    """Bars for :meth:`Outbox.delivered_per_minute`, scaled to the busiest minute."""
    peak = max((count for _, count in per_minute), default=0)
    slot = width / max(1, len(per_minute))
    bars = []
    for index, (minute, count) in enumerate(per_minute):
        h = 0.0 if not peak else max(1.0, height * count / peak) if count else 0.0
        bars.append(Bar(index * slot, height - h, h, count,
                        f"{time.strftime('%H:%M', time.localtime(minute))}: {count}"))
    return Chart(bars, peak, sum(count for _, count in per_minute), width, height,
                 max(1.0, slot - 1.0))


@dataclass(frozen=True)
class RequestView:
    """A CC360 request as the console shows it: URL and body with secrets masked."""

    method: str
    url: str
    body: str | None
    files: list[str]


@dataclass(frozen=True)
class RowView:
    row: Row
    request: RequestView | None
    request_error: str | None
    attempts: list[Attempt]
    error: str  #: last error, redacted


@dataclass(frozen=True)
class CallView:
    """The facts of one call for a search line or the timeline's header."""

    call_key: str
    user: str
    callerid: str
    started_at: float
    direction: str
    duration: str
    steps: list[tuple[str, str]]  #: (kind, status) of each row, oldest first
    dead: bool


def call_view(call_key: str, rows: Sequence[Row]) -> CallView:
    summary = next((row for row in rows if row.kind == "summary"), None)
    params: Mapping[str, str] = {}
    if summary is not None:
        try:
            params = summary.crm_request().params
        except (ValueError, KeyError, TypeError):
            params = {}
    first = rows[0]
    return CallView(
        call_key=call_key, user=first.user, callerid=first.callerid,
        started_at=min(row.event_at or row.created_at for row in rows),
        direction=params.get("event", ""), duration=params.get("duration", ""),
        steps=[(row.kind, row.status.value) for row in rows],
        dead=any(row.status is OutboxStatus.dead for row in rows),
    )


# --------------------------------------------------------------------------- the app


@dataclass
class _Page:
    status: int
    headers: Headers
    body: bytes


class Console:
    """The ``/ui`` WSGI application (build it with :func:`build_console` in the service).

    ``reader`` serves every read; ``requeue(ids)`` puts dead rows back in the queue and
    wakes the deliverer, returning the rows it matched (as ``Outbox.requeue``);
    ``state()`` describes the service; ``request_url`` gives a request's URL with the
    CRM token masked; ``redact`` masks configured secrets in any text shown.
    """

    def __init__(
        self,
        *,
        admin_token: str,
        reader: OutboxReader,
        requeue: Callable[[list[int]], list[Row]],
        state: Callable[[], ServiceState],
        request_url: Callable[[CrmRequest], str],
        redact: Callable[[str], str] = lambda text: text,
        numbers: NumberRules | None = None,
        realtime_ttl: float = 120.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not admin_token:
            raise ValueError("the console needs an admin token")
        self._admin = admin_token.encode("utf-8")
        self.sessions = Sessions(admin_token, clock=clock)
        self.reader = reader
        self._requeue = requeue
        self._state = state
        self._request_url = request_url
        self._redact = redact
        self._numbers = numbers or NumberRules()
        self.realtime_ttl = realtime_ttl
        self._clock = clock
        self._templates = jinja2.Environment(
            loader=jinja2.PackageLoader("fs_cc360", "console_assets/templates"),
            autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
            lstrip_blocks=True)
        self._templates.filters.update(
            time=format_time, ago=self._ago, redact=self._redact, short=_short)
        self._templates.globals.update(prefix=PREFIX, refresh_seconds=REFRESH_SECONDS)

    def close(self) -> None:
        self.reader.close()

    # -- WSGI ----------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        path = raw_path(environ)
        try:
            page = self._route(method, path, environ)
        except OutboxError as exc:
            log.error("console.outbox_error path=%s error=%s", path, exc)
            page = self._render(503, "error.html", environ, None, title="Outbox unavailable",
                                message=self._redact(str(exc)))
        except Exception:
            log.error("console.error method=%s path=%s", method, path, exc_info=True)
            page = _plain(500, "internal error")
        headers = [*page.headers, *_SECURITY_HEADERS]
        if not any(name == "Cache-Control" for name, _ in headers):
            headers.append(("Cache-Control", "no-store"))
        headers.append(("Content-Length", str(len(page.body))))
        start_response(f"{page.status} {HTTPStatus(page.status).phrase}", headers)
        return [] if method == "HEAD" else [page.body]

    def _route(self, method: str, path: str, environ: dict[str, Any]) -> _Page:
        if path == PREFIX:
            return _redirect(f"{PREFIX}/", 308)
        sub = path[len(PREFIX):]
        if sub.startswith("/static/"):
            return _allow(method, ("GET", "HEAD")) or _static(sub[len("/static/"):])
        if sub == "/login":
            if method == "POST":
                return self._login(environ)
            return _allow(method, ("GET", "HEAD")) or self._render(
                200, "login.html", environ, None, error=None)
        session = self.sessions.check(_cookie(environ, SESSION_COOKIE))
        if session is None:
            if method in ("GET", "HEAD"):
                return _redirect(f"{PREFIX}/login")
            return _plain(403, "not logged in")
        if sub == "/logout":
            return _allow(method, ("POST",)) or self._logout(environ, session)
        if sub == "/":
            return _allow(method, ("GET", "HEAD")) or self._overview(environ, session)
        if sub == "/calls":
            return _allow(method, ("GET", "HEAD")) or self._calls(environ, session)
        if sub.startswith("/calls/"):
            key = unquote(sub[len("/calls/"):], errors="replace")
            if not _CALL_KEY.fullmatch(key):
                return self._not_found(environ, session)
            return _allow(method, ("GET", "HEAD")) or self._call(environ, session, key)
        if sub == "/dead":
            if method == "POST":
                return self._send_again(environ, session)
            return _allow(method, ("GET", "HEAD")) or self._dead(environ, session)
        return self._not_found(environ, session)

    # -- login ---------------------------------------------------------------------------

    def _login(self, environ: dict[str, Any]) -> _Page:
        form = _form(environ)
        given = (form.get("token") or [""])[0].encode("utf-8", "replace")
        # compare_digest first, always: the time taken does not depend on the content
        if not hmac.compare_digest(given, self._admin):
            log.warning("console.login_failed remote=%s", environ.get("REMOTE_ADDR", "-"))
            gevent.sleep(FAILED_LOGIN_DELAY)
            return self._render(401, "login.html", environ, None,
                                error="Wrong token.")
        log.info("console.login remote=%s", environ.get("REMOTE_ADDR", "-"))
        page = _redirect(f"{PREFIX}/")
        page.headers.append(("Set-Cookie", self._cookie_header(
            environ, self.sessions.new(), int(self.sessions.max_age))))
        return page

    def _logout(self, environ: dict[str, Any], session: str) -> _Page:
        refused = self._refuse_post(environ, session, _form(environ))
        if refused is not None:
            return refused
        self.sessions.revoke(session)
        page = _redirect(f"{PREFIX}/login")
        page.headers.append(("Set-Cookie", self._cookie_header(environ, "", 0)))
        return page

    @staticmethod
    def _cookie_header(environ: dict[str, Any], value: str, max_age: int) -> str:
        cookie: SimpleCookie = SimpleCookie()
        cookie[SESSION_COOKIE] = value
        morsel = cookie[SESSION_COOKIE]
        morsel["path"] = f"{PREFIX}/"
        morsel["httponly"] = True
        morsel["samesite"] = "Strict"
        morsel["max-age"] = max_age
        if _is_https(environ):
            morsel["secure"] = True
        return morsel.OutputString()

    def _refuse_post(self, environ: dict[str, Any], session: str,
                     form: Mapping[str, list[str]]) -> _Page | None:
        """None when a POST may proceed: same site, and the session's CSRF token."""
        if environ.get("HTTP_SEC_FETCH_SITE", "same-origin") not in ("same-origin", "none"):
            return _plain(403, "cross-site request refused")
        if not self.sessions.csrf_ok(session, (form.get("csrf") or [""])[0]):
            log.warning("console.csrf_refused remote=%s", environ.get("REMOTE_ADDR", "-"))
            return _plain(403, "form expired or forged (CSRF token): reload the page")
        return None

    # -- overview ------------------------------------------------------------------------

    def _overview(self, environ: dict[str, Any], session: str) -> _Page:
        now = self._clock()

        def read(box: Outbox) -> tuple[OutboxStats, dict[tuple[OutboxStatus, str], int],
                                       list[tuple[float, int]]]:
            return (box.stats(), box.final_counts_since(now - RECENT_SECONDS),
                    box.delivered_per_minute(now - (CHART_MINUTES - 1) * 60, now))

        stats, recent, per_minute = self.reader.run(read)
        verdict = health(stats, now)
        recent_counts = {status: sum(n for (s, _), n in recent.items() if s is status)
                         for status in (OutboxStatus.dead, OutboxStatus.expired)}
        kinds = sorted({kind for _, kind in stats.by_kind} | {"ringing", "answer", "hangup",
                                                               "summary"},
                       key=_kind_order)
        context = dict(
            now=now, state=self._state(), stats=stats, verdict=verdict, kinds=kinds,
            statuses=list(OutboxStatus), recent=recent,
            recent_dead=recent_counts[OutboxStatus.dead],
            recent_expired=recent_counts[OutboxStatus.expired],
            chart=deliveries_chart(per_minute), recent_hours=RECENT_SECONDS // 3600,
            oldest_age=None if stats.oldest_pending_at is None
            else max(0.0, now - stats.oldest_pending_at),
            oldest_summary_age=None if stats.oldest_summary_at is None
            else max(0.0, now - stats.oldest_summary_at),
        )
        query = _query(environ)
        if (query.get("fragment") or [""])[0] == "live":
            return self._render(200, "_live.html", environ, session, **context)
        return self._render(200, "overview.html", environ, session, **context)

    # -- calls ---------------------------------------------------------------------------

    def _calls(self, environ: dict[str, Any], session: str) -> _Page:
        query = _query(environ)
        term = (query.get("q") or [""])[0].strip()[:MAX_QUERY]
        field = (query.get("by") or ["any"])[0]
        if field not in SEARCH_FIELDS:
            field = "any"
        before = _int((query.get("before") or [""])[0])
        lines: list[CallView] = []
        next_before = None
        if term:
            callerids = number_candidates(term, self._numbers) \
                if field in ("any", "number") else []
            users = [term] if field in ("any", "agent") else []
            keys = [term] if field in ("any", "call") else []
            page = self.reader.run(lambda box: box.search_calls(
                callerids=callerids, users=users, call_keys=keys, before_id=before,
                limit=PAGE_SIZE))
            lines = [self._line(call) for call in page.calls]
            next_before = page.next_before
        more = None
        if next_before is not None:
            more = f"{PREFIX}/calls?" + urlencode({"q": term, "by": field,
                                                   "before": next_before})
        return self._render(200, "calls.html", environ, session, term=term, field=field,
                            fields=SEARCH_FIELDS, lines=lines, more=more,
                            first_page=before is None)

    @staticmethod
    def _line(call: CallLine) -> CallView:
        return call_view(call.call_key, call.rows)

    def _call(self, environ: dict[str, Any], session: str, key: str) -> _Page:
        rows, attempts = self.reader.run(lambda box: box.call_history(key))
        if not rows:
            return self._not_found(environ, session, f"No call {key} in the outbox.")
        by_row: dict[int, list[Attempt]] = {}
        for attempt in attempts:
            by_row.setdefault(attempt.row_id, []).append(attempt)
        views = [self._row_view(row, by_row.get(row.id, [])) for row in rows]
        done = _flash(_query(environ))
        return self._render(200, "call.html", environ, session, call=call_view(key, rows),
                            rows=views, flash=done, now=self._clock())

    def _row_view(self, row: Row, attempts: list[Attempt]) -> RowView:
        try:
            request = row.crm_request()
        except (ValueError, KeyError, TypeError) as exc:
            return RowView(row, None, f"unreadable request JSON: {exc}", attempts,
                           self._redact(row.last_error or ""))
        files = []
        body = None
        if request.body is not None:
            masked = json.loads(self._mask(json.dumps(request.body, ensure_ascii=False)))
            files = [str(link) for link in masked.get("FILES", []) or []] \
                if isinstance(masked, dict) else []
            body = json.dumps(masked, ensure_ascii=False, indent=1)
        view = RequestView(request.method, self._mask(self._request_url(request)), body, files)
        return RowView(row, view, None, attempts, self._redact(row.last_error or ""))

    def _mask(self, text: str) -> str:
        return self._redact(mask_tokens(text))

    # -- dead rows -----------------------------------------------------------------------

    def _dead(self, environ: dict[str, Any], session: str) -> _Page:
        query = _query(environ)
        before = _int((query.get("before") or [""])[0])

        def read(box: Outbox) -> tuple[list[Row], int]:
            return (box.list_page(status=OutboxStatus.dead, before_id=before,
                                  limit=PAGE_SIZE + 1),
                    box.count_status(OutboxStatus.dead))

        rows, total = self.reader.run(read)
        more = None
        if len(rows) > PAGE_SIZE:
            rows = rows[:PAGE_SIZE]
            more = f"{PREFIX}/dead?" + urlencode({"before": rows[-1].id})
        return self._render(200, "dead.html", environ, session, rows=rows, total=total,
                            more=more, flash=_flash(query), now=self._clock())

    def _send_again(self, environ: dict[str, Any], session: str) -> _Page:
        form = _form(environ)
        refused = self._refuse_post(environ, session, form)
        if refused is not None:
            return refused
        chosen = form.get("one") or form.get("ids") or []
        ids = list(dict.fromkeys(i for i in (_int(v) for v in chosen) if i is not None))
        back = (form.get("back") or [""])[0]
        if not back.startswith(f"{PREFIX}/") or "//" in back or "\\" in back:
            back = f"{PREFIX}/dead"
        if not ids:
            return _redirect(_with_query(back, {"sent": "0", "skipped": "0", "stale": "0"}))
        matched = self._requeue(ids)
        now = self._clock()
        stale = sum(1 for row in matched if row.kind != "summary"
                    and now - (row.event_at or row.created_at) > self.realtime_ttl)
        log.info("console.send_again ids=%s requeued=%d remote=%s", ids[:20], len(matched),
                 environ.get("REMOTE_ADDR", "-"))
        return _redirect(_with_query(back, {"sent": str(len(matched)),
                                            "skipped": str(len(ids) - len(matched)),
                                            "stale": str(stale)}))

    # -- rendering -----------------------------------------------------------------------

    def _not_found(self, environ: dict[str, Any], session: str,
                   message: str = "No such page.") -> _Page:
        return self._render(404, "error.html", environ, session, title="Not found",
                            message=message)

    def _render(self, status: int, template: str, environ: dict[str, Any],
                session: str | None, **context: Any) -> _Page:
        context.setdefault("now", self._clock())
        body = self._templates.get_template(template).render(
            csrf=self.sessions.csrf(session) if session else "",
            logged_in=session is not None, path=raw_path(environ), **context)
        return _Page(status, [("Content-Type", _HTML)], body.encode("utf-8"))

    def _ago(self, at: float | None) -> str:
        if at is None:
            return "-"
        return format_age(self._clock() - at)


# --------------------------------------------------------------------------- wiring


def service_state(service: Service) -> ServiceState:
    """The overview's facts about a running :class:`~fs_cc360.service.Service`."""
    deliverer = service.deliverer
    return ServiceState(
        esl_connected=bool(service.esl.connected), esl_since=service.esl.state_since,
        crm_up=not deliverer.crm_down, crm_since=deliverer.crm_since,
        crm_last_error=deliverer.crm_last_error,
        crm_last_error_at=deliverer.crm_last_error_at,
        clock_offset=service.clock_offset.offset, clock_skewed=service.clock_offset.skewed,
        outbox_writable=service.outbox_ok, spooled=service.spooled,
    )


def build_console(service: Service) -> Console:
    """The console of a service: its own outbox reader, the service's writer for
    "send again" (then the deliverer is woken), every configured secret redacted."""
    settings = service.settings

    def requeue(ids: list[int]) -> list[Row]:
        matched = service.outbox.requeue(ids=ids, statuses=[OutboxStatus.dead])
        if matched:
            service.deliverer.notify()
        return matched

    web, crm = settings.webapi, settings.crm
    redact = make_redactor([settings.freeswitch.password, crm.password, crm.token,
                            web.token, web.recording_secret, web.metrics_token,
                            web.admin_token, settings.outbox.password,
                            urlsplit(settings.outbox.database).password or ""])
    return Console(
        admin_token=web.admin_token,
        reader=OutboxReader(settings.outbox.database,
                            password=settings.outbox.password or None),
        requeue=requeue,
        state=lambda: service_state(service),
        request_url=lambda request: service.client.url_for(request, masked=True),
        redact=redact,
        numbers=settings.number_rules(),
        realtime_ttl=settings.delivery.realtime_ttl,
        clock=service.clock,
    )


# --------------------------------------------------------------------------- helpers


def _kind_order(kind: str) -> tuple[int, str]:
    order = ("ringing", "answer", "hangup", "summary")
    return (order.index(kind) if kind in order else len(order), kind)


def _short(text: str | None, limit: int = 80) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() and len(text) < 19 else None


def _query(environ: Mapping[str, Any]) -> dict[str, list[str]]:
    try:
        return parse_qs(environ.get("QUERY_STRING", "")[:4096], max_num_fields=20)
    except ValueError:
        return {}


def _form(environ: Mapping[str, Any]) -> dict[str, list[str]]:
    """A urlencoded POST body, bounded; anything else reads as an empty form."""
    if not environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
        return {}
    length = _int(str(environ.get("CONTENT_LENGTH") or "0")) or 0
    if length > MAX_FORM_BYTES:
        return {}
    data = environ["wsgi.input"].read(length) if length else b""
    try:
        return parse_qs(data.decode("utf-8"), max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError):
        return {}


def _cookie(environ: Mapping[str, Any], name: str) -> str | None:
    header = environ.get("HTTP_COOKIE", "")
    if not header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


def _is_https(environ: Mapping[str, Any]) -> bool:
    # behind nginx (TLS there) the scheme comes in X-Forwarded-Proto; trusting it can
    # only add the Secure flag, never remove one
    return (environ.get("wsgi.url_scheme") == "https"
            or environ.get("HTTP_X_FORWARDED_PROTO", "").lower() == "https")


def _flash(query: Mapping[str, list[str]]) -> dict[str, int] | None:
    if "sent" not in query:
        return None
    return {name: _int((query.get(name) or ["0"])[0]) or 0
            for name in ("sent", "skipped", "stale")}


def _with_query(path: str, params: Mapping[str, str]) -> str:
    base = path.split("?", 1)[0].split("#", 1)[0]
    return f"{quote(base, safe='/%:@.-_~')}?{urlencode(params)}"


def _allow(method: str, allowed: tuple[str, ...]) -> _Page | None:
    if method in allowed:
        return None
    page = _plain(405, "method not allowed")
    page.headers.append(("Allow", ", ".join(allowed)))
    return page


def _plain(status: int, text: str) -> _Page:
    return _Page(status, [("Content-Type", "text/plain; charset=utf-8")],
                 (text + "\n").encode("utf-8"))


def _redirect(location: str, status: int = 303) -> _Page:
    return _Page(status, [("Location", location)], b"")


def _static(name: str) -> _Page:
    ctype = STATIC_FILES.get(name)
    if ctype is None:
        return _plain(404, "not found")
    data = (resources.files("fs_cc360") / "console_assets" / "static" / name).read_bytes()
    return _Page(200, [("Content-Type", ctype), ("Cache-Control", "private, max-age=300")],
                 data)

