"""The CC360 client: turns a :class:`~fs_cc360.crm_request.CrmRequest` into one HTTP call.

Like ``requests.adapters.HTTPAdapter.send``, this is the one place where transport errors
become project errors, so the delivery loop chooses by class alone:

=============================================  ==========================================
what happened                                  raised
=============================================  ==========================================
connection refused / reset, TLS failure        :class:`CrmUnavailable`
no answer within the timeout                   :class:`CrmTimeout` (a ``CrmUnavailable``)
HTTP 5xx, 408, 429 (``retry_after`` parsed)    :class:`CrmUnavailable`
other 3xx (not to a login page)                :class:`CrmUnavailable` (misconfigured URL:
                                               keep the rows, let the operator fix it)
session lost, still lost after one re-login    :class:`CrmAuthError`
login refused / not a Creatio site             :class:`CrmAuthError`
other 4xx                                      :class:`CrmRejected`
2xx                                            :class:`CrmResponse` returned
=============================================  ==========================================

A *lost session* is 401, 403, a 3xx whose ``Location`` mentions ``login``, or a 2xx HTML
page (Creatio's login page). In forms mode the client logs in again (one login at a time,
shared by every lane) and retries the request once.

Secrets never leave this module: the token is masked as ``/***/`` in every URL logged or
put in an exception, and the password, cookies and ``BPMCSRF`` are never logged. Errors
are raised ``from None`` because ``requests``' own messages carry the unmasked URL.

The module uses plain ``requests`` and ``threading``; under the service they are
gevent-cooperative through monkey-patching.
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from requests.cookies import RequestsCookieJar

from fs_cc360 import __version__
from fs_cc360.crm_request import CrmRequest
from fs_cc360.errors import (
    ConfigError,
    CrmAuthError,
    CrmError,
    CrmRejected,
    CrmTimeout,
    CrmUnavailable,
)

log = logging.getLogger(__name__)

FORMS_SERVICE = "/0/rest/OmniWhoCallsService"
ANONYMOUS_SERVICE = "/0/ServiceModel/OmniWhoCallsService.svc"
LOGIN_PATH = "/ServiceModel/AuthService.svc/Login"
CSRF_COOKIE = "BPMCSRF"
CSRF_HEADER = "BPMCSRF"
TEXT_LIMIT = 500  #: characters of a response body kept in :class:`CrmResponse`
SNIPPET_LIMIT = 200  #: characters of a response body quoted in an error message
AUTH_MODES = ("forms", "anonymous")
_OBJECT_REPR = re.compile(r"<[^<>]* object at 0x[0-9a-f]+>:?\s*")


@dataclass(frozen=True)
class CrmResponse:
    """A successful (2xx) answer from CC360."""

    status: int
    elapsed: float  #: seconds from sending the request to the end of the answer
    text: str  #: body, cut at :data:`TEXT_LIMIT` characters


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), or None.

    Never negative: a date in the past means "now". ``now`` (epoch seconds) pins the clock
    for tests.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    parts = email.utils.parsedate_tz(value)
    if parts is None:
        return None
    if parts[9] is None:  # no zone (or -0000): HTTP dates are GMT
        parts = (*parts[:9], 0)
    when = email.utils.mktime_tz(parts)
    return max(0.0, when - (time.time() if now is None else now))


def normalise_base_url(url: str) -> str:
    """``scheme://host[:port][/prefix]`` without a trailing slash.

    A trailing ``/0`` (the Creatio application path people copy from the browser) is
    dropped too, since the client adds ``/0/...`` itself.
    """
    parts = urlsplit((url or "").strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            "crm.url must be the CRM site's base URL, such as https://crm.example.com",
            key="crm.url")
    if parts.username or parts.password:
        raise ConfigError("crm.url must not contain a user or password; "
                          "use crm.login and crm.password", key="crm.url")
    if parts.query or parts.fragment:
        raise ConfigError("crm.url must not contain a query string or fragment",
                          key="crm.url")
    path = parts.path.rstrip("/")
    if path.endswith("/0"):
        path = path[:-2]
    return f"{parts.scheme}://{parts.netloc}{path}"


def _encode_query(params: Mapping[str, Any]) -> str:
    """Percent-encode every key and value (space as ``%20``, ``+`` as ``%2B``)."""
    return "&".join(f"{quote(str(k), safe='')}={quote(str(v), safe='')}"
                    for k, v in params.items())


class Cc360Client:
    """Sends :class:`CrmRequest` objects to CC360 and translates every failure.

    One ``requests.Session`` per lane (created on first use), so concurrent deliveries do
    not share a connection; the login cookies are one jar shared by every lane, so the
    lanes share one CRM session. A lane must be used by one greenlet at a time.
    """

    def __init__(self, base_url: str, token: str, *, auth: str = "forms", login: str = "",
                 password: str = "", timeout: float = 10.0, verify: bool | str = True,
                 lanes: int = 1, user_agent: str = f"fs-cc360/{__version__}") -> None:
        if auth not in AUTH_MODES:
            raise ConfigError(f"crm.auth must be 'forms' or 'anonymous', not {auth!r}",
                              key="crm.auth")
        if not token:
            raise ConfigError("crm.token is empty: copy the CRM system setting "
                              "'Who Calls Token' (OmniWhoCallsToken)", key="crm.token")
        if auth == "forms" and not login:
            raise ConfigError("crm.login is empty (required with crm.auth = forms)",
                              key="crm.login")
        if not timeout or timeout <= 0:
            raise ConfigError(f"crm.timeout must be a positive number of seconds, not "
                              f"{timeout!r}", key="crm.timeout")
        if isinstance(verify, str) and not os.path.exists(verify):
            raise ConfigError(f"CA bundle for the CRM not found: {verify}")
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, not {lanes}")
        #: ``scheme://host[:port][/prefix]``, no trailing slash
        self.base_url = normalise_base_url(base_url)
        #: ``forms`` (cookie login + BPMCSRF) or ``anonymous`` (no login, other path)
        self.auth = auth
        #: (connect, read) seconds; never None, so a dead CRM can't hang a lane
        self.timeout: tuple[float, float] = (float(timeout), float(timeout))
        #: TLS verification: True, or a CA bundle path
        if verify is True:  # the usual environment override, read once like the proxies
            verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get(
                "CURL_CA_BUNDLE") or True
        self.verify = verify
        self.lanes = lanes
        self.user_agent = user_agent
        self._token = token
        self._login_name = login
        self._password = password
        self._sessions: dict[int, requests.Session] = {}
        self._sessions_lock = threading.Lock()
        self._cookies = RequestsCookieJar()  # shared by every lane's session
        self._login_lock = threading.Lock()
        #: successful logins so far; a request remembers the generation it was sent with
        self._generation = 0
        #: login attempts so far (successful or not), and the error of the last one
        self._attempts = 0
        self._last_login_error: CrmError | None = None

    # -- public API ------------------------------------------------------------------------

    @property
    def service_path(self) -> str:
        return FORMS_SERVICE if self.auth == "forms" else ANONYMOUS_SERVICE

    @property
    def login_url(self) -> str:
        return self.base_url + LOGIN_PATH

    def url_for(self, request: CrmRequest, masked: bool = True) -> str:
        """The full URL of ``request`` (query string included); the token is ``***``
        unless ``masked`` is False."""
        token = "***" if masked else quote(self._token, safe="")
        url = f"{self.base_url}{self.service_path}/{token}/{quote(request.endpoint, safe='')}"
        if request.params:
            url += "?" + _encode_query(request.params)
        return url

    def login(self) -> None:
        """Log in now (forms mode; anonymous mode never logs in).

        Raises :class:`CrmAuthError` for every failure, with a message telling wrong
        credentials, an unreachable CRM and a URL that is not a Creatio site apart.
        """
        if self.auth != "forms":
            log.debug("crm.login skipped auth=anonymous")
            return
        with self._login_lock:
            try:
                self._do_login()
            except CrmAuthError:
                raise
            except CrmError as exc:
                raise CrmAuthError(str(exc), status=exc.status,
                                   retry_after=exc.retry_after) from None

    def send(self, request: CrmRequest, lane: int = 0) -> CrmResponse:
        """Send ``request`` on ``lane``; return the 2xx answer or raise a :class:`CrmError`.

        In forms mode, logs in first if needed; on a lost session logs in again (or reuses
        a login another lane made meanwhile) and retries once.
        """
        session = self._session(lane)
        generation, attempts = self._ensure_login()
        response, elapsed = self._transmit(session, request)
        lost = _lost_session(response)
        if lost:
            if self.auth != "forms":
                raise self._anonymous_refused(request, response, lost)
            log.warning("crm.session_lost status=%s relogin=1 lane=%d", lost, lane)
            self._relogin(generation, attempts)
            response, elapsed = self._transmit(session, request)
            lost = _lost_session(response)
            if lost:
                raise CrmAuthError(
                    f"CC360 still refuses {request.endpoint} after a fresh login ({lost}): "
                    f"check that CRM user {self._login_name!r} may use OmniWhoCallsService "
                    f"and that crm.auth matches the CRM's setup", status=response.status_code)
        return self._result(request, response, elapsed, lane)

    def close(self) -> None:
        """Close every lane's connections (the login state is kept)."""
        with self._sessions_lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.close()

    def __enter__(self) -> Cc360Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Cc360Client {self.base_url} auth={self.auth} lanes={self.lanes}>"

    # -- sessions --------------------------------------------------------------------------

    def _new_session(self) -> requests.Session:
        """A lane's session. The environment (proxy variables, ``REQUESTS_CA_BUNDLE``) is
        read here, once, not by ``requests`` on every request: that lookup was about a
        fifth of the CPU a request costs (bench/bench_delivery.py)."""
        session = requests.Session()
        session.trust_env = False
        session.proxies.update(requests.utils.get_environ_proxies(self.base_url))
        session.headers["User-Agent"] = self.user_agent
        session.headers["Accept"] = "application/json"
        return session

    def _session(self, lane: int) -> requests.Session:
        if not 0 <= lane < self.lanes:
            raise ValueError(f"lane {lane} out of range 0..{self.lanes - 1}")
        session = self._sessions.get(lane)
        if session is None:
            with self._sessions_lock:
                session = self._sessions.get(lane)
                if session is None:
                    session = self._new_session()
                    session.cookies = self._cookies
                    self._sessions[lane] = session
        return session

    # -- login -----------------------------------------------------------------------------

    def _ensure_login(self) -> tuple[int, int]:
        """Log in if no lane has yet; return (generation, attempts) seen before sending."""
        if self.auth != "forms":
            return 0, 0
        if self._generation == 0:
            self._relogin(0, self._attempts)
        return self._generation, self._attempts

    def _relogin(self, generation: int, attempts: int) -> None:
        """Log in unless another lane did since (``generation``, ``attempts``) were seen.

        One login at a time. If another lane's attempt happened while we waited, its
        outcome is ours too: a new session is reused, a failure is re-raised (so N lanes
        with a wrong password cost one failed login, not N, and don't lock the account).
        """
        with self._login_lock:
            if self._generation != generation:
                log.debug("crm.relogin reused generation=%d", self._generation)
                return
            if self._attempts != attempts and self._last_login_error is not None:
                err = self._last_login_error
                raise type(err)(str(err), status=err.status, retry_after=err.retry_after)
            self._do_login()

    def _do_login(self) -> None:
        """POST the credentials; on success swap the shared cookie jar. Holds the lock."""
        try:
            self._post_login()
        except CrmError as exc:
            self._last_login_error = exc
            log.warning("crm.login failed status=%s error=%s", exc.status, exc)
            raise
        else:
            self._last_login_error = None
        finally:
            # Counted when the attempt *ends*: a lane that read the counter while this
            # attempt was in flight then sees it changed and shares the outcome.
            self._attempts += 1

    def _post_login(self) -> None:
        url = self.login_url
        start = time.monotonic()
        with self._new_session() as session:
            try:
                response = session.post(
                    url, json={"UserName": self._login_name, "UserPassword": self._password},
                    timeout=self.timeout, verify=self.verify, allow_redirects=False)
            except requests.RequestException as exc:
                raise self._transport_error(exc, f"log in at {url}") from None
            elapsed = time.monotonic() - start
            self._check_login_response(url, response)
            if not session.cookies:
                raise CrmAuthError(f"CRM login at {url} succeeded but set no cookie: a proxy "
                                   f"may strip Set-Cookie; try crm.auth = anonymous",
                                   status=response.status_code)
            self._replace_cookies(session.cookies)
        self._generation += 1
        log.info("crm.login ok user=%s generation=%d csrf=%s elapsed=%.3fs", self._login_name,
                 self._generation, "yes" if self._csrf() else "no", elapsed)

    def _check_login_response(self, url: str, response: requests.Response) -> None:
        status = response.status_code
        if status >= 500 or status in (408, 429):
            raise CrmUnavailable(
                f"CRM login at {url} failed with HTTP {status}: the CRM is having trouble, "
                f"retry later", status=status,
                retry_after=parse_retry_after(response.headers.get("Retry-After")))
        if 300 <= status < 400:
            location = self._scrub(response.headers.get("Location", ""))
            raise CrmAuthError(
                f"CRM login at {url} was redirected to {location!r} (HTTP {status}): set "
                f"crm.url to the CRM site's real base URL (scheme, host, path prefix)",
                status=status)
        if status == 404:
            raise CrmAuthError(
                f"no Creatio login service at {url} (HTTP 404): crm.url must be the CRM "
                f"site's base URL (e.g. https://crm.example.com), or use "
                f"crm.auth = anonymous", status=status)
        if status != 200:
            raise CrmAuthError(
                f"CRM login at {url} refused with HTTP {status}: check crm.login / "
                f"crm.password and that the CRM user is active", status=status)
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict) or "Code" not in data:
            ctype = response.headers.get("Content-Type", "?")
            raise CrmAuthError(
                f"{url} answered HTTP 200 ({ctype}) but not a Creatio login reply: check that "
                f"crm.url points at the CC360/Creatio site", status=status)
        if data["Code"] not in (0, "0"):
            message = self._scrub(str(data.get("Message") or ""))[:SNIPPET_LIMIT]
            raise CrmAuthError(
                f"CRM login rejected for user {self._login_name!r} (Code={data['Code']}, "
                f"{message!r}): check crm.login and crm.password", status=status)

    def _replace_cookies(self, fresh: RequestsCookieJar) -> None:
        """Make the shared jar hold exactly ``fresh``, replacing cookies in place.

        Other lanes may be iterating the jar (``requests`` does when it prepares a
        request); replacing values keeps the jar's dicts the same size, where ``clear()``
        followed by ``update()`` would not.
        """
        keep = {(c.domain, c.path, c.name) for c in fresh}
        for cookie in fresh:
            self._cookies.set_cookie(cookie)
        for cookie in list(self._cookies):
            if (cookie.domain, cookie.path, cookie.name) not in keep:
                self._cookies.clear(cookie.domain, cookie.path, cookie.name)

    def _csrf(self) -> str | None:
        # Iterate instead of jar.get(): two BPMCSRF cookies for different paths would raise.
        value = None
        for cookie in self._cookies:
            if cookie.name == CSRF_COOKIE:
                value = cookie.value
        return value

    # -- one HTTP exchange -----------------------------------------------------------------

    def _transmit(self, session: requests.Session, request: CrmRequest
                  ) -> tuple[requests.Response, float]:
        headers: dict[str, str] = {}
        if self.auth == "forms":
            csrf = self._csrf()
            if csrf:
                headers[CSRF_HEADER] = csrf
        start = time.monotonic()
        try:
            response = session.request(
                request.method, self.url_for(request, masked=False), headers=headers,
                json=request.body,
                timeout=self.timeout, verify=self.verify, allow_redirects=False)
        except requests.RequestException as exc:
            raise self._transport_error(exc, f"send {request.method} "
                                             f"{self.url_for(request)}") from None
        return response, time.monotonic() - start

    def _transport_error(self, exc: requests.RequestException, doing: str) -> CrmError:
        """Map a ``requests`` exception; ``doing`` must already be masked."""
        reason = self._scrub(_root_reason(exc))[:SNIPPET_LIMIT]
        if isinstance(exc, requests.Timeout):
            # ConnectTimeout is also a ConnectionError, so this test comes first.
            return CrmTimeout(f"CRM did not answer within {self.timeout[1]:g}s trying to "
                              f"{doing}: the CRM is slow or unreachable (crm.timeout)")
        if isinstance(exc, requests.exceptions.SSLError):
            return CrmUnavailable(f"TLS error trying to {doing}: {reason}; check the CRM's "
                                  f"certificate or configure its CA bundle")
        if isinstance(exc, requests.ConnectionError):
            return CrmUnavailable(f"cannot reach the CRM trying to {doing}: {reason}; check "
                                  f"crm.url and that the CRM is up")
        return CrmUnavailable(f"HTTP error trying to {doing}: {type(exc).__name__}: {reason}")

    def _result(self, request: CrmRequest, response: requests.Response, elapsed: float,
                lane: int) -> CrmResponse:
        status = response.status_code
        log.debug("crm.sent endpoint=%s status=%d elapsed=%.3fs lane=%d", request.endpoint,
                  status, elapsed, lane)
        if 200 <= status < 300:
            return CrmResponse(status, elapsed, response.text[:TEXT_LIMIT])
        where = f"{request.method} {self.url_for(request)}"
        if 300 <= status < 400:
            location = self._scrub(response.headers.get("Location", ""))
            raise CrmUnavailable(f"CC360 redirected {where} to {location!r} (HTTP {status}): "
                                 f"check crm.url (scheme, host, path prefix)", status=status)
        snippet = self._snippet(response)
        if status >= 500 or status in (408, 429):
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            raise CrmUnavailable(f"CC360 answered HTTP {status} to {where}{snippet}",
                                 status=status, retry_after=retry_after)
        hint = ""
        if status == 404:
            hint = " (check crm.token and crm.auth: the service path differs by mode)"
        raise CrmRejected(f"CC360 rejected {where}: HTTP {status}{hint}{snippet}",
                          status=status)

    def _anonymous_refused(self, request: CrmRequest, response: requests.Response,
                           lost: str) -> CrmAuthError:
        return CrmAuthError(
            f"CC360 refused anonymous {request.method} {self.url_for(request)} ({lost}): ask "
            f"the CRM admin to enable anonymous access to OmniWhoCallsService, or use "
            f"crm.auth = forms", status=response.status_code)

    # -- secrets ---------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        """``text`` with the token (raw or encoded) and the password replaced by ``***``."""
        for secret in (self._token, quote(self._token, safe=""), self._password):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _snippet(self, response: requests.Response) -> str:
        body = " ".join(response.text.split())[:SNIPPET_LIMIT]
        return f": {self._scrub(body)}" if body else ""


def _root_reason(exc: BaseException) -> str:
    """The innermost readable reason of a ``requests`` error (``[Errno 111] Connection
    refused``), without urllib3's pool and object reprs."""
    inner: object = exc
    for _ in range(5):  # requests error -> MaxRetryError -> NewConnectionError -> ...
        args = getattr(inner, "args", ())
        nxt = getattr(inner, "reason", None) or (args[0] if args else None)
        if not isinstance(nxt, BaseException):
            break
        inner = nxt
    text = _OBJECT_REPR.sub("", str(inner)).strip()
    return text or type(inner).__name__


def _lost_session(response: requests.Response) -> str | None:
    """Why ``response`` means the CRM session is gone, or None."""
    status = response.status_code
    if status in (401, 403):
        return str(status)
    if 300 <= status < 400 and "login" in response.headers.get("Location", "").lower():
        return f"{status}-to-login"
    content_type = response.headers.get("Content-Type", "").lower()
    if 200 <= status < 300 and content_type.startswith("text/html"):
        return "html-page"
    return None
