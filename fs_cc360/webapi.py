"""The PBX's HTTP face: click-to-call, recordings, health and metrics (spec §5, §6).

Everything the routes need is injected into :func:`make_app` (a :class:`MakeCall`,
:class:`RecordingLinks`, a ``health()`` callable, a :class:`Metrics`), so this module
imports no ESL, outbox or config object and is tested on its own over real HTTP.

Routes::

    GET  /webapi/<token>/makecall?first=&second=   200 {"id", "job"} | 400 | 403 | 429 | 503
    GET  /<token>/recording/<path>   (and HEAD)    200 | 206 | 304 | 403 | 404 | 416
    GET  /healthz                                  200 | 503 {"esl": bool, "outbox": bool}
    GET  /metrics                                  Prometheus text (optionally token-protected)
    GET|POST /ui/...                               the operator console (fs_cc360.console),
                                                   when ``[webapi] admin_token`` is set

The URLs face the network: tokens are compared in constant time; a recording path is
taken from the raw request line and percent-decoded exactly once (the server's
``PATH_INFO`` is already decoded, which would hide ``%2f`` and double encoding); an
unsafe or unknown recording answers 404 whatever the token, so an outsider learns
nothing about which files exist; handler exceptions answer a bare 500 (logged here);
the access log masks tokens.

TLS: either ``serve(certfile=, keyfile=)`` or a reverse proxy in front of a loopback
``listen``; the proxy must pass the request line through untouched (no ``$uri``, which is
decoded and normalised, and no access log of its own with tokens in it), e.g. nginx::

    log_format masked '$remote_addr [$time_local] "$request_method" $status $body_bytes_sent';
    server {
        listen 443 ssl;
        server_name pbx.example.com;
        ssl_certificate     /etc/ssl/pbx.pem;
        ssl_certificate_key /etc/ssl/pbx.key;
        access_log /var/log/nginx/fs-cc360.log masked;
        location / {
            proxy_pass http://127.0.0.1:8080;   # no URI part: the request goes as sent
            proxy_set_header Host $host;
            proxy_buffering off;                # stream recordings, honour Range
            proxy_read_timeout 60s;
        }
    }
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from email.utils import formatdate, parsedate_to_datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, quote, unquote, urlsplit

import gevent.ssl
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer

from fs_cc360.makecall import MakeCall, MakeCallError
from fs_cc360.metrics import Metrics
from fs_cc360.recordings import (
    Mp3Converter,
    RecordingError,
    RecordingLinks,
    content_type,
    decode_request_path,
)

log = logging.getLogger(__name__)
access_log = logging.getLogger(__name__ + ".access")

StartResponse = Callable[..., Any]
Headers = list[tuple[str, str]]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

#: Bytes read from a recording per write to the socket.
CHUNK_BYTES = 64 * 1024
#: A makecall query string longer than this is refused (two numbers fit in 100).
MAX_QUERY_CHARS = 2048
MAX_QUERY_FIELDS = 20
#: Seconds a client may stay silent (or not read) before its connection is closed.
SOCKET_TIMEOUT = 30.0

_JSON = "application/json"
_NOT_FOUND = {"error": "not found"}
_FORBIDDEN = {"error": "forbidden"}
_RANGE = re.compile(r"\s*bytes\s*=\s*(\d{0,20})\s*-\s*(\d{0,20})\s*")
_UNSATISFIABLE = "unsatisfiable"

_MASKS = (
    (re.compile(r"/webapi/[^/?#\s]*/"), "/webapi/***/"),
    (re.compile(r"/[^/?#\s]*/recording/"), "/***/recording/"),
    (re.compile(r"([?&]token=)[^&#\s\"]*"), r"\1***"),
)


def mask_tokens(text: str) -> str:
    """``text`` (a request line, a URL, a log message) with every token replaced by ``***``."""
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text


class _Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: Headers, body: Iterable[bytes]) -> None:
        self.status = status
        self.headers = headers
        self.body = body


def _json(status: int, payload: Mapping[str, Any], headers: Headers | None = None) -> _Response:
    data = json.dumps(payload, separators=(",", ": ")).encode("ascii")
    return _Response(status, [
        ("Content-Type", _JSON),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
        *(headers or []),
    ], [data])


class _FileBody:
    """A byte range of an open file, read in chunks as the server writes them.

    The file is opened (and checked) before the response starts, so an error there is a
    clean 404; ``close()`` is called by the WSGI server even when the client goes away.
    """

    def __init__(self, f: BinaryIO, start: int, length: int) -> None:
        self._f = f
        self._start = start
        self._length = length

    def __iter__(self) -> Iterator[bytes]:
        remaining = self._length
        try:
            self._f.seek(self._start)
            while remaining > 0:
                data = self._f.read(min(CHUNK_BYTES, remaining))
                if not data:  # truncated under us: the client sees a short body
                    log.warning("webapi.recording_truncated missing=%d", remaining)
                    return
                remaining -= len(data)
                yield data
        except OSError as exc:
            log.warning("webapi.recording_read_failed error=%s", exc)

    def close(self) -> None:
        self._f.close()


class WebApi:
    """The WSGI application; build it with :func:`make_app`."""

    def __init__(
        self,
        *,
        token: str,
        makecall: MakeCall,
        links: RecordingLinks,
        health: Callable[[], Mapping[str, bool]],
        metrics: Metrics,
        metrics_token: str = "",
        cors_origins: Sequence[str] = (),
        converter: Mp3Converter | None = None,
        console: WsgiApp | None = None,
    ) -> None:
        if not token:
            log.warning("webapi.no_token makecall=refused")
        self._token = token.encode("utf-8")
        self._metrics_token = metrics_token.encode("utf-8")
        self.makecall = makecall
        self.links = links
        self.health = health
        self.metrics = metrics
        self.cors_origins = tuple(o.rstrip("/") for o in cors_origins)
        self.converter = converter
        #: the ``/ui`` application (its own auth, headers and errors); None: 404 there
        self.console = console

    # -- WSGI entry --------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        raw = raw_path(environ)
        if self.console is not None and (raw == "/ui" or raw.startswith("/ui/")):
            return self.console(environ, start_response)
        try:
            response = self._dispatch(method, raw, environ)
        except Exception:
            log.error("webapi.error method=%s path=%s", method, mask_tokens(raw), exc_info=True)
            response = _json(500, {"error": "internal error"})
        headers = response.headers + self._cors_headers(environ, preflight=method == "OPTIONS")
        phrase = HTTPStatus(response.status).phrase
        start_response(f"{response.status} {phrase}", headers)
        if method == "HEAD" or response.status in (204, 304):
            close = getattr(response.body, "close", None)
            if close is not None:
                close()
            return []
        return response.body

    def _dispatch(self, method: str, raw: str, environ: dict[str, Any]) -> _Response:
        if raw == "/healthz":
            return self._methods(method, ("GET", "HEAD")) or self._healthz()
        if raw == "/metrics":
            return self._methods(method, ("GET", "HEAD")) or self._metrics(environ)
        parts = raw.split("/")
        if len(parts) == 4 and parts[0] == "" and parts[1] == "webapi" and parts[3] == "makecall":
            return self._methods(method, ("GET",)) or self._makecall(parts[2], environ)
        if len(parts) >= 4 and parts[0] == "" and parts[2] == "recording":
            return (self._methods(method, ("GET", "HEAD"))
                    or self._recording(parts[1], "/".join(parts[3:]), environ))
        return _json(404, _NOT_FOUND)

    @staticmethod
    def _methods(method: str, allowed: tuple[str, ...]) -> _Response | None:
        """``None`` when ``method`` may proceed; else the preflight or 405 answer."""
        if method in allowed:
            return None
        allow = ", ".join((*allowed, "OPTIONS"))
        if method == "OPTIONS":
            return _Response(204, [("Allow", allow)], [])
        return _json(405, {"error": "method not allowed"}, [("Allow", allow)])

    # -- makecall ----------------------------------------------------------------------

    def _makecall(self, token_segment: str, environ: dict[str, Any]) -> _Response:
        if not self._token_ok(token_segment):
            self.metrics.makecall("forbidden")
            return _json(403, _FORBIDDEN)
        query = environ.get("QUERY_STRING", "")
        try:
            first, second = _makecall_params(query)
        except MakeCallError as exc:
            self.metrics.makecall("invalid")
            return _error_response(exc)
        try:
            result = self.makecall.place(first, second)
        except MakeCallError as exc:
            return _error_response(exc)
        return _json(200, {"id": result.call_id, "job": result.job_uuid})

    def _token_ok(self, segment: str) -> bool:
        given = unquote(segment, errors="replace").encode("utf-8", "replace")
        # compare_digest first, always: the time taken does not depend on the content.
        return hmac.compare_digest(given, self._token) and bool(self._token)

    # -- recordings --------------------------------------------------------------------

    def _recording(self, token_segment: str, raw_rel: str, environ: dict[str, Any]) -> _Response:
        rel = decode_request_path(raw_rel)
        if rel is None:
            return _json(404, _NOT_FOUND)
        token = unquote(token_segment, errors="replace")
        if not self.links.verify(token, rel):
            return _json(403, _FORBIDDEN)
        path = self.links.resolve(rel)
        if path is None and self.converter is not None and rel.endswith(".mp3"):
            path = self._converted(rel)
        if path is None:
            return _json(404, _NOT_FOUND)
        return self._serve_file(path, environ)

    def _converted(self, rel: str) -> Path | None:
        assert self.converter is not None
        wav = self.links.resolve(rel[:-4] + ".wav")
        if wav is None:
            return None
        try:
            self.converter.convert(wav)
        except (RecordingError, OSError) as exc:
            log.error("webapi.convert_failed file=%s error=%s", rel, exc)
            return None
        return self.links.resolve(rel)

    def _serve_file(self, path: Path, environ: dict[str, Any]) -> _Response:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags)
        except OSError:
            return _json(404, _NOT_FOUND)
        f = os.fdopen(fd, "rb")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                f.close()
                return _json(404, _NOT_FOUND)
        except BaseException:
            f.close()
            raise
        size = st.st_size
        last_modified = formatdate(st.st_mtime, usegmt=True)
        etag = f'"{size:x}-{st.st_mtime_ns:x}"'
        headers: Headers = [
            ("Content-Type", content_type(path) or "application/octet-stream"),
            ("Accept-Ranges", "bytes"),
            ("Last-Modified", last_modified),
            ("ETag", etag),
            ("Cache-Control", "private, max-age=3600"),
            ("X-Content-Type-Options", "nosniff"),
        ]
        if _not_modified(environ, etag, st.st_mtime):
            f.close()
            return _Response(304, headers, [])
        wanted = environ.get("HTTP_RANGE")
        if wanted and _if_range_ok(environ.get("HTTP_IF_RANGE"), etag, last_modified):
            byte_range = parse_range(wanted, size)
            if byte_range == _UNSATISFIABLE:
                f.close()
                return _Response(416, [
                    ("Content-Range", f"bytes */{size}"), ("Content-Length", "0"),
                    *headers[1:],
                ], [])
            if isinstance(byte_range, tuple):
                start, end = byte_range
                length = end - start + 1
                return _Response(206, [
                    *headers,
                    ("Content-Range", f"bytes {start}-{end}/{size}"),
                    ("Content-Length", str(length)),
                ], _FileBody(f, start, length))
        return _Response(200, [*headers, ("Content-Length", str(size))], _FileBody(f, 0, size))

    # -- health and metrics ------------------------------------------------------------

    def _healthz(self) -> _Response:
        try:
            state = {str(k): bool(v) for k, v in dict(self.health()).items()}
        except Exception:
            log.error("webapi.health_failed", exc_info=True)
            return _json(503, {"error": "health check failed"})
        ok = bool(state) and all(state.values())
        return _json(200 if ok else 503, state)

    def _metrics(self, environ: dict[str, Any]) -> _Response:
        if self._metrics_token and not self._metrics_token_ok(environ):
            return _json(403, _FORBIDDEN)
        data, ctype = self.metrics.render()
        return _Response(200, [
            ("Content-Type", ctype),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
        ], [data])

    def _metrics_token_ok(self, environ: dict[str, Any]) -> bool:
        given = ""
        auth = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip()
        else:
            try:
                values = parse_qs(environ.get("QUERY_STRING", "")[:MAX_QUERY_CHARS],
                                  max_num_fields=MAX_QUERY_FIELDS).get("token", [])
            except ValueError:
                values = []
            given = values[0] if len(values) == 1 else ""
        return hmac.compare_digest(given.encode("utf-8", "replace"), self._metrics_token)

    # -- CORS --------------------------------------------------------------------------

    def _cors_headers(self, environ: dict[str, Any], *, preflight: bool) -> Headers:
        if not self.cors_origins:
            return []
        origin = environ.get("HTTP_ORIGIN", "")
        headers: Headers = []
        if "*" in self.cors_origins:
            allow = "*"
        else:
            headers.append(("Vary", "Origin"))
            allow = origin if origin and origin.rstrip("/") in self.cors_origins else ""
        if not allow:
            return headers
        headers += [
            ("Access-Control-Allow-Origin", allow),
            ("Access-Control-Expose-Headers",
             "Content-Length, Content-Range, Accept-Ranges, Retry-After"),
        ]
        if preflight:
            headers += [
                ("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS"),
                ("Access-Control-Allow-Headers", "Range, Authorization"),
                ("Access-Control-Max-Age", "600"),
            ]
        return headers


def make_app(
    *,
    token: str,
    makecall: MakeCall,
    links: RecordingLinks,
    health: Callable[[], Mapping[str, bool]],
    metrics: Metrics,
    metrics_token: str = "",
    cors_origins: Sequence[str] = (),
    converter: Mp3Converter | None = None,
    console: WsgiApp | None = None,
) -> WebApi:
    """The WSGI application (see the module docstring for the routes)."""
    return WebApi(
        token=token, makecall=makecall, links=links, health=health, metrics=metrics,
        metrics_token=metrics_token, cors_origins=cors_origins, converter=converter,
        console=console,
    )


# -- request helpers ---------------------------------------------------------------------

def raw_path(environ: Mapping[str, Any]) -> str:
    """The request path as sent, still percent-encoded.

    From ``RAW_URI``/``REQUEST_URI`` when the server gives it (``serve`` does); else
    re-quoted from ``PATH_INFO``, which can only make a path *more* encoded, never less.
    """
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        if not raw.startswith("/"):  # absolute-form request target
            return urlsplit(raw).path or "/"
        return raw.split("?", 1)[0].split("#", 1)[0]
    path = environ.get("PATH_INFO", "") or "/"
    return quote(path.encode("latin-1", "replace"), safe="/")


def _makecall_params(query: str) -> tuple[str | None, str | None]:
    if len(query) > MAX_QUERY_CHARS:
        raise MakeCallError(None, "query string too long")
    try:
        params = parse_qs(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError as exc:
        raise MakeCallError(None, "too many query parameters") from exc
    values: list[str | None] = []
    for name in ("first", "second"):
        got = params.get(name)
        if got is not None and len(got) > 1:
            raise MakeCallError(name, "repeated")
        values.append(got[0] if got else None)
    return values[0], values[1]


def _error_response(exc: MakeCallError) -> _Response:
    payload: dict[str, Any] = {"error": exc.problem}
    if exc.param:
        payload["param"] = exc.param
    headers: Headers = []
    if exc.retry_after is not None:
        headers.append(("Retry-After", str(max(1, math.ceil(exc.retry_after)))))
    return _json(exc.status, payload, headers)


def parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """One ``bytes=`` range as inclusive ``(start, end)``; ``"unsatisfiable"`` (416);
    ``None`` when the header is to be ignored (malformed, several ranges: full 200)."""
    m = _RANGE.fullmatch(header)
    if not m:
        return None
    first, last = m.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return _UNSATISFIABLE
        return max(0, size - n), size - 1
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        return _UNSATISFIABLE
    end = int(last) if last else size - 1
    return start, min(end, size - 1)


def _if_range_ok(if_range: str | None, etag: str, last_modified: str) -> bool:
    """``Range`` applies unless ``If-Range`` names another version of the file."""
    if not if_range:
        return True
    value = if_range.strip()
    return value == etag or value == last_modified


def _not_modified(environ: Mapping[str, Any], etag: str, mtime: float) -> bool:
    inm = environ.get("HTTP_IF_NONE_MATCH")
    if inm:
        tags = [t.strip() for t in inm.split(",")]
        return "*" in tags or etag in tags or f"W/{etag}" in tags
    ims = environ.get("HTTP_IF_MODIFIED_SINCE")
    if ims:
        try:
            return int(mtime) <= parsedate_to_datetime(ims).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return False
    return False


# -- server ------------------------------------------------------------------------------

class _MaskingLog:
    """A file-like sink for pywsgi's access/error lines, with tokens masked."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        self._logger = logger
        self._level = level

    def write(self, message: str) -> None:
        message = message.rstrip("\n")
        if message:
            self._logger.log(self._level, "%s", mask_tokens(message))

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass


class _Handler(WSGIHandler):
    """pywsgi's handler plus a socket timeout, ``RAW_URI`` and a masked access line."""

    def __init__(self, sock: Any, address: Any, server: Any, rfile: Any = None) -> None:
        sock.settimeout(getattr(server, "socket_timeout", SOCKET_TIMEOUT))
        super().__init__(sock, address, server, rfile)

    def get_environ(self) -> dict[str, Any]:
        env = super().get_environ()
        env["RAW_URI"] = self.path
        return env

    def format_request(self) -> str:
        return mask_tokens(super().format_request())


def _tls_context(certfile: str | os.PathLike[str] | None,
                 keyfile: str | os.PathLike[str] | None) -> gevent.ssl.SSLContext:
    """A server context with today's defaults (TLS 1.2+); gevent's class, so the sockets
    it wraps cooperate with the hub whether or not ``ssl`` was monkey-patched."""
    context = gevent.ssl.create_default_context(gevent.ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = gevent.ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(os.fspath(certfile or ""), os.fspath(keyfile or ""))
    return context


def serve(
    app: Callable[..., Iterable[bytes]],
    listen: tuple[str, int],
    *,
    max_connections: int = 100,
    certfile: str | os.PathLike[str] | None = None,
    keyfile: str | os.PathLike[str] | None = None,
    timeout: float = SOCKET_TIMEOUT,
) -> WSGIServer:
    """Start a gevent ``pywsgi`` server for ``app`` and return it (``.stop()`` to end).

    At most ``max_connections`` connections are handled at once (a gevent ``Pool``: the
    server stops accepting while it is full); a connection silent for ``timeout`` seconds
    is closed; TLS when ``certfile``/``keyfile`` are given (or use a reverse proxy).
    """
    ssl_args: dict[str, Any] = {}
    if certfile or keyfile:
        ssl_args = {"ssl_context": _tls_context(certfile or keyfile, keyfile or certfile)}
    host = listen[0] or "0.0.0.0"
    server = WSGIServer(
        (host, listen[1]),
        app,
        spawn=Pool(max_connections),
        handler_class=_Handler,
        log=_MaskingLog(access_log, logging.INFO),
        error_log=_MaskingLog(log, logging.WARNING),
        environ={"SERVER_NAME": host},  # no reverse DNS lookup at start
        **ssl_args,
    )
    server.socket_timeout = timeout
    server.start()
    log.info("webapi.listening address=%s:%d tls=%s max_connections=%d",
             host, server.server_port, bool(ssl_args), max_connections)
    return server
