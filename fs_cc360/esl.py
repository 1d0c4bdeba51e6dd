"""Inbound ESL connection to FreeSWITCH: auth, ``event plain`` subscription, reconnect forever.

greenswitch's ``InboundESL`` is kept as the base class (host, port, password, the
``connected`` flag, ``connect()`` / ``receive_events()`` / ``stop()`` shape), but its wire
handling is replaced, because as shipped (0.0.19) it cannot run a long-lived connector:

* ``ESLEvent.parse_data`` URL-decodes the whole payload before splitting it into lines,
  so an encoded newline in a caller name injects or overwrites headers, and the body of a
  BACKGROUND_JOB ends up glued to ``Content-Length``;
* its receive loop decodes each line as UTF-8, so one non-UTF-8 byte kills the loop;
* it never reconnects, and ``send()`` waits forever for a reply that a dropped
  connection will never bring.

Here one greenlet (the one :meth:`EslClient.start` returns) owns the socket: it connects,
authenticates, subscribes, then reads bytes into :class:`~fs_cc360.events.FrameReader`
and dispatches frames until the socket drops, and then does it again, with capped
exponential backoff, until :meth:`EslClient.stop`. Channel events are handed to
``on_event`` in that greenlet, in order. Other greenlets send commands (``bgapi``/``api``);
their replies arrive in the reader greenlet, in the order the commands were written, and
are matched to the waiting callers through a FIFO.
"""

from __future__ import annotations

import logging
import random
import socket as _stdsocket
from collections import deque
from collections.abc import Callable, Sequence
from time import monotonic, time

import gevent
import gevent.socket
from gevent.event import AsyncResult, Event
from gevent.lock import Semaphore
from greenswitch.esl import InboundESL

from fs_cc360.errors import EslCommandError, EslConnectionError, EslError, FrameError
from fs_cc360.events import ChannelEvent, Frame, FrameReader, parse_event

log = logging.getLogger(__name__)

#: Bytes asked of the socket per read.
RECV_BYTES = 256 * 1024
#: A connection that stayed up this long resets the backoff; a shorter one (FreeSWITCH
#: accepting and then dropping us in a loop) keeps escalating it.
STABLE_AFTER = 10.0
#: Frame-skip warnings are logged at most this often (the rest are counted).
SKIP_LOG_EVERY = 1.0

AUTH_REFUSED_HINT = (
    "FreeSWITCH refused the ESL password: check [freeswitch] password and event_socket.conf.xml"
)
REJECTED_HINT = (
    "FreeSWITCH rejected the ESL connection (text/rude-rejection): allow this host in "
    "apply-inbound-acl of event_socket.conf.xml"
)


class _AuthRefused(EslConnectionError):
    """``auth`` answered with ``-ERR``: a configuration problem, retrying will not fix it."""


class _Rejected(EslConnectionError):
    """FreeSWITCH's ACL turned the connection away (``text/rude-rejection``)."""


def backoff_delay(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): ``initial * 2**attempt`` capped
    at ``maximum``, then "equal jitter" (between half and all of it) so that several
    connectors do not reconnect in lockstep, yet none of them hammers a switch that is down.
    """
    base = min(maximum, initial * (2 ** min(attempt, 32)))
    return base / 2 + rng.uniform(0, base / 2)


def _check_line(what: str, value: str) -> None:
    # An ESL command is a block of lines ended by a blank line: a newline in a value would
    # let the caller add headers or whole commands (``api`` after ``bgapi``...).
    if "\n" in value or "\r" in value:
        raise EslCommandError(f"{what} must not contain a newline")


class _Link:
    """One TCP connection: its socket, frame reader, and the replies being awaited."""

    def __init__(self, sock: gevent.socket.socket, on_error: Callable[[FrameError], None]) -> None:
        self.sock = sock
        self.reader = FrameReader(on_error=on_error)
        #: Frames read but not dispatched yet (the handshake reads ahead).
        self.backlog: deque[Frame] = deque()
        #: One per command written, in write order; FreeSWITCH replies in that order.
        self.pending: deque[AsyncResult] = deque()
        #: Held while appending to ``pending`` and writing, so both orders agree.
        self.send_lock = Semaphore()
        self.closed = False
        self.up_at = 0.0
        self.close_reason = ""


class EslClient(InboundESL):
    """A long-lived inbound ESL connection that reconnects by itself.

    Callbacks run in the reader greenlet and must not block (no ``api()``/``bgapi()``
    from them: their replies could only be read by that same greenlet):

    * ``on_event(event)`` for each channel event, in arrival order (loopback legs too: the
      tracker follows calls through loopback pairs);
    * ``on_job(job_uuid, body)`` for each BACKGROUND_JOB (body without its trailing newline);
    * ``on_state(connected)`` on each change (``True`` once subscribed, ``False`` when lost).

    ``on_connect(reconnect)`` runs in a greenlet of its own after every connection (once
    subscribed; ``reconnect`` is False for the first), so it may query FreeSWITCH (e.g.
    ``api("show channels as json")``) to resynchronise while events keep flowing.

    Commands may be sent from any greenlet of the client's hub, not from native threads
    (replies are handed over through gevent primitives).
    """

    def __init__(
        self,
        host: str,
        port: int,
        password: str,
        *,
        events: Sequence[str],
        on_event: Callable[[ChannelEvent], None],
        on_state: Callable[[bool], None] | None = None,
        on_job: Callable[[str, str], None] | None = None,
        on_connect: Callable[[bool], None] | None = None,
        connect_timeout: float = 5.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        command_timeout: float = 30.0,
        still_down_every: float = 300.0,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(host, int(port), password, timeout=connect_timeout)
        names = tuple(events)
        if not names:
            raise ValueError("events: subscribe to at least one event")
        for name in names:
            if name.lower() == "all" or not name or any(c.isspace() for c in name):
                raise ValueError(f"events: {name!r} is not an event name (and never 'all')")
        #: Event names sent with ``event plain``. No default here: the caller says what it
        #: reads (the service: :data:`fs_cc360.service.SUBSCRIBED_EVENTS`, the list the
        #: FreeSWITCH docs give), never ``all``: a busy switch emits far more.
        self.events = names
        self.connect_timeout = connect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = max(backoff_max, backoff_initial)
        #: Default wait for a command's reply, in seconds.
        self.command_timeout = command_timeout
        #: While FreeSWITCH stays unreachable, remind the log this often.
        self.still_down_every = still_down_every
        self._on_event = on_event
        self._on_state = on_state
        self._on_job = on_job
        self._on_connect = on_connect
        self._rng = rng or random.Random()

        self.connected = False
        #: Wall-clock time ``connected`` last changed (None: never connected yet).
        self.state_since: float | None = None
        #: ``text/event-plain`` frames parsed (channel events, BACKGROUND_JOB).
        self.events_read = 0
        #: Frames that could not be used: malformed, unexpected, or not an event.
        self.frames_skipped = 0
        #: Connections made after the first one.
        self.reconnects = 0
        #: Exceptions raised by the callbacks (logged, the loop goes on).
        self.callback_errors = 0

        self._link: _Link | None = None
        self._greenlet: gevent.Greenlet | None = None
        self._stopping = False
        self._wake = Event()
        self._connections = 0
        # Outage bookkeeping, so that each state change is logged once.
        self._down_since: float | None = None
        self._down_reason: str | None = None
        self._down_reminded_at = 0.0
        self._attempts = 0
        self._skips_unlogged = 0
        self._skip_logged_at = -SKIP_LOG_EVERY

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> gevent.Greenlet:
        """Spawn :meth:`run` (once); the greenlet ends only after :meth:`stop`."""
        if self._stopping:
            raise EslError("this client was stopped; make a new one")
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self.run)
        return self._greenlet

    def run(self) -> None:
        """Connect, read until the socket drops, back off, and again, until :meth:`stop`."""
        failures = 0
        try:
            while not self._stopping:
                try:
                    self.connect()
                except Exception as exc:  # anything: the loop must outlive it
                    if self._stopping:
                        break
                    self._note_failure(exc)
                    self._pause(backoff_delay(failures, self.backoff_initial,
                                              self.backoff_max, self._rng))
                    failures += 1
                    continue
                link = self._link
                assert link is not None
                self._note_connected()
                self.receive_events()
                self._close_link(link, link.close_reason or "closed")
                up_for = monotonic() - link.up_at
                self._note_lost(link.close_reason or "closed", up_for)
                if self._stopping:
                    break
                if up_for >= STABLE_AFTER:
                    failures = 0
                self._pause(backoff_delay(failures, self.backoff_initial,
                                          self.backoff_max, self._rng))
                failures += 1
        finally:
            if self._link is not None:
                self._close_link(self._link, "stopped")
            if self.connected:
                self._set_connected(False)
            log.info("esl.stopped host=%s port=%d", self.host, self.port)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop reading, send ``exit`` if connected, close; never reconnect afterwards."""
        self._stopping = True
        self._run = False  # greenswitch's own loop flag, for good measure
        self._wake.set()
        link = self._link
        in_reader = gevent.getcurrent() is self._greenlet
        was_connected = self.connected
        if link is not None and self.connected and not link.closed:
            try:
                if in_reader:  # cannot wait for the reply we would have to read ourselves
                    link.sock.sendall(b"exit\n\n")
                else:
                    self._command("exit", timeout=min(2.0, timeout))
            except (EslError, OSError):
                pass
        if link is not None:
            self._close_link(link, "stopped")
        greenlet = self._greenlet
        if greenlet is not None and not in_reader:
            # Connected: the closed socket ends its read at once. Otherwise it may sit in a
            # TCP connect for up to connect_timeout: interrupt it.
            if was_connected:
                greenlet.join(timeout)
            if not greenlet.dead:
                greenlet.kill(block=True, timeout=timeout)

    def __enter__(self) -> EslClient:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- one connection ----------------------------------------------------------------

    def connect(self) -> None:
        """One attempt: TCP connect, ``auth/request``, ``auth``, ``event plain ...``.

        Raises :class:`EslConnectionError` (or ``OSError``); on success ``connected`` is
        true and the frames read ahead wait for :meth:`receive_events`.
        """
        sock = gevent.socket.create_connection((self.host, self.port),
                                               timeout=self.connect_timeout)
        _tune_socket(sock)
        link = _Link(sock, self._frame_error)
        self.sock = sock  # greenswitch's attribute name
        self._link = link
        try:
            with gevent.Timeout(self.connect_timeout, EslConnectionError(
                    f"no ESL handshake within {self.connect_timeout:g}s")):
                self._await_auth_request(link)
                self.authenticate()
                self._subscribe(link)
        except BaseException:
            self._close_link(link, "handshake failed")
            raise
        link.up_at = monotonic()
        self._set_connected(True)

    def authenticate(self) -> None:
        link = self._link
        assert link is not None
        reply = self._handshake_command(link, f"auth {self.password}", "auth")
        if reply.headers.get("Reply-Text", "") != "+OK accepted":
            raise _AuthRefused(AUTH_REFUSED_HINT)

    def _subscribe(self, link: _Link) -> None:
        command = "event plain " + " ".join(self.events)
        reply = self._handshake_command(link, command, command)
        text = reply.headers.get("Reply-Text", "")
        if not text.startswith("+OK"):
            raise EslConnectionError(f"subscription refused: {text[:120]}")

    def _await_auth_request(self, link: _Link) -> None:
        while True:
            frame = self._next_frame(link)
            if frame.content_type == "auth/request":
                return
            self._handshake_frame(link, frame)

    def _handshake_command(self, link: _Link, command: str, shown: str) -> Frame:
        """Write ``command`` and read up to its reply (nothing else is pending yet)."""
        log.debug("esl.send command=%s", shown)
        link.sock.sendall(command.encode("utf-8") + b"\n\n")
        while True:
            frame = self._next_frame(link)
            if frame.content_type in ("command/reply", "api/response"):
                return frame
            self._handshake_frame(link, frame)

    def _handshake_frame(self, link: _Link, frame: Frame) -> None:
        if frame.content_type == "text/rude-rejection":
            raise _Rejected(REJECTED_HINT)
        if frame.content_type == "text/disconnect-notice":
            raise EslConnectionError("FreeSWITCH closed the connection during the handshake")
        self._dispatch(link, frame)

    def _next_frame(self, link: _Link) -> Frame:
        while not link.backlog:
            data = link.sock.recv(RECV_BYTES)
            if not data:
                raise EslConnectionError("FreeSWITCH closed the connection during the handshake")
            link.backlog.extend(link.reader.feed(data))
        return link.backlog.popleft()

    def receive_events(self) -> None:
        """Read and dispatch frames until the connection ends (greenswitch's loop, redone:
        bytes in, frames out; nothing read from the wire can end it but EOF or an error)."""
        link = self._link
        assert link is not None
        while link.backlog and not link.closed:
            self._dispatch(link, link.backlog.popleft())
        while not link.closed and not self._stopping:
            try:
                data = link.sock.recv(RECV_BYTES)
            except OSError as exc:
                link.close_reason = link.close_reason or f"read error: {exc}"
                return
            if not data:
                link.close_reason = link.close_reason or "closed by FreeSWITCH"
                return
            try:
                frames = link.reader.feed(data)
            except Exception:  # a reader bug must not end the connector
                log.exception("esl.reader_failed bytes=%d; buffer discarded", len(data))
                self.frames_skipped += 1
                link.reader = FrameReader(on_error=self._frame_error)
                continue
            for frame in frames:
                try:
                    self._dispatch(link, frame)
                except Exception:  # same: log it, skip the frame, keep reading
                    log.exception("esl.dispatch_failed content_type=%s", frame.content_type)
                    self.frames_skipped += 1

    def _close_link(self, link: _Link, reason: str) -> None:
        if link.closed:
            return
        link.closed = True
        link.close_reason = link.close_reason or reason
        try:
            link.sock.close()
        except OSError:
            pass
        error = EslConnectionError(f"connection to FreeSWITCH lost ({link.close_reason})")
        while link.pending:
            link.pending.popleft().set_exception(error)
        if self._link is link and self.connected:
            self._set_connected(False)

    # -- frames --------------------------------------------------------------------------

    def _dispatch(self, link: _Link, frame: Frame) -> None:
        kind = frame.content_type
        if kind == "text/event-plain":
            self._event_frame(frame)
        elif kind in ("command/reply", "api/response"):
            if link.pending:
                link.pending.popleft().set(frame)
            else:
                self._skip(f"{kind} without a command waiting for it")
        elif kind == "text/disconnect-notice":
            if frame.headers.get("Content-Disposition") != "linger":
                log.info("esl.disconnect_notice host=%s port=%d", self.host, self.port)
                link.close_reason = "disconnect notice"
        elif kind == "text/rude-rejection":
            log.error("esl.rejected host=%s port=%d: %s", self.host, self.port, REJECTED_HINT)
            link.close_reason = "rude rejection"
        else:  # auth/request after auth, log/data, anything new
            self._skip(f"unexpected frame {kind[:40]!r}")

    def _event_frame(self, frame: Frame) -> None:
        try:
            event = parse_event(frame.body)
        except FrameError as exc:
            self._frame_error(exc)
            return
        self.events_read += 1
        if event.name == "BACKGROUND_JOB":
            self._job_event(event)
            return
        if not event.uuid and event.name.startswith(("CHANNEL_", "RECORD_")):
            self._frame_error(FrameError(f"{event.name} without Unique-ID"))
            return
        if self._stopping:
            return
        try:
            self._on_event(event)
        except Exception:
            self.callback_errors += 1
            log.exception("esl.on_event_failed event=%s uuid=%s", event.name, event.uuid)

    def _job_event(self, event: ChannelEvent) -> None:
        job_uuid = event.get("Job-UUID") or ""
        body = event.body.rstrip("\r\n")
        log.debug("esl.job job=%s result=%s", job_uuid, body[:80])
        if self._on_job is None or not job_uuid:
            return
        try:
            self._on_job(job_uuid, body)
        except Exception:
            self.callback_errors += 1
            log.exception("esl.on_job_failed job=%s", job_uuid)

    def _frame_error(self, exc: FrameError) -> None:
        self._skip(str(exc))

    def _skip(self, reason: str) -> None:
        """Count a skipped frame; warn at most once per :data:`SKIP_LOG_EVERY` seconds."""
        self.frames_skipped += 1
        now = monotonic()
        if now - self._skip_logged_at < SKIP_LOG_EVERY:
            self._skips_unlogged += 1
            return
        log.warning("esl.frame_skipped reason=%s also_skipped=%d total=%d",
                    reason[:200], self._skips_unlogged, self.frames_skipped)
        self._skip_logged_at = now
        self._skips_unlogged = 0

    # -- commands ------------------------------------------------------------------------

    def bgapi(self, command: str, job_uuid: str | None = None) -> str:
        """Send ``bgapi <command>`` and return its Job-UUID; the result comes to ``on_job``.

        Raises :class:`EslConnectionError` at once when not connected (or if the
        connection drops before the reply), :class:`EslCommandError` on ``-ERR`` or when
        ``command`` or ``job_uuid`` contains a newline.
        """
        _check_line("bgapi command", command)
        text = f"bgapi {command}"
        if job_uuid:
            _check_line("Job-UUID", job_uuid)
            text += f"\nJob-UUID: {job_uuid}"
        reply = self._command(text)
        reply_text = reply.headers.get("Reply-Text", "")
        if not reply_text.startswith("+OK"):
            raise EslCommandError(f"bgapi refused: {reply_text[:200]}")
        returned = reply.headers.get("Job-UUID") or reply_text.partition("Job-UUID:")[2].strip()
        if not returned:
            raise EslCommandError(f"bgapi reply without a Job-UUID: {reply_text[:200]}")
        return returned

    def api(self, command: str, timeout: float | None = None) -> str:
        """Send ``api <command>`` and return the response body.

        Raises like :meth:`bgapi`; a body starting with ``-ERR`` or ``-USAGE`` is an
        :class:`EslCommandError`. ``timeout`` defaults to ``command_timeout``.
        """
        _check_line("api command", command)
        reply = self._command(f"api {command}", timeout=timeout)
        if reply.content_type != "api/response":
            text = reply.headers.get("Reply-Text", "")
            raise EslCommandError(f"api refused: {text[:200]}")
        body = reply.body.decode("utf-8", "replace")
        if body.startswith(("-ERR", "-USAGE")):
            raise EslCommandError(body.strip()[:500])
        return body

    def send(self, data: str) -> Frame:  # type: ignore[override]
        """greenswitch's ``send``: write one command, return its reply frame."""
        _check_line("command", data)
        return self._command(data)

    def _command(self, text: str, timeout: float | None = None) -> Frame:
        link = self._link
        if link is None or link.closed or not self.connected:
            raise EslConnectionError("not connected to FreeSWITCH")
        if gevent.getcurrent() is self._greenlet:
            raise EslError("ESL commands cannot be sent from the reader greenlet "
                           "(on_event/on_job/on_state callbacks)")
        wait = self.command_timeout if timeout is None else timeout
        result: AsyncResult = AsyncResult()
        verb = text.split(" ", 1)[0]
        with link.send_lock:
            if link.closed:
                raise EslConnectionError("not connected to FreeSWITCH")
            link.pending.append(result)
            try:
                with gevent.Timeout(wait, EslConnectionError(
                        f"could not write {verb} within {wait:g}s")):
                    link.sock.sendall(text.encode("utf-8") + b"\n\n")
            except (OSError, EslConnectionError) as exc:
                # A half-written command leaves the stream unusable: start over.
                link.close_reason = f"write failed: {exc}"
                self._close_link(link, link.close_reason)
                raise EslConnectionError(f"could not send {verb}: {exc}") from exc
        try:
            return result.get(timeout=wait)
        except gevent.Timeout:
            # The reply may still come: its slot stays in ``pending`` and absorbs it.
            raise EslConnectionError(f"no reply to {verb} within {wait:g}s") from None

    # -- state and logs ------------------------------------------------------------------

    def _set_connected(self, up: bool) -> None:
        self.connected = up
        self.state_since = time()
        if self._on_state is None:
            return
        try:
            self._on_state(up)
        except Exception:
            self.callback_errors += 1
            log.exception("esl.on_state_failed connected=%s", up)

    def _note_connected(self) -> None:
        self._connections += 1
        reconnect = self._connections > 1
        if reconnect:
            self.reconnects += 1
        down_for = monotonic() - self._down_since if self._down_since is not None else 0.0
        log.info("esl.connected host=%s port=%d events=%d reconnects=%d down_for=%.1fs",
                 self.host, self.port, len(self.events), self.reconnects, down_for)
        self._down_since = None
        self._down_reason = None
        self._attempts = 0
        if self._on_connect is not None:
            gevent.spawn(self._run_connect_hook, reconnect)

    def _run_connect_hook(self, reconnect: bool) -> None:
        try:
            assert self._on_connect is not None
            self._on_connect(reconnect)
        except Exception:
            self.callback_errors += 1
            log.exception("esl.on_connect_failed reconnect=%s", reconnect)

    def _note_lost(self, reason: str, up_for: float) -> None:
        now = monotonic()
        self._down_since = now
        self._down_reason = "lost"
        self._down_reminded_at = now
        if self._stopping:
            return
        log.warning("esl.lost host=%s port=%d reason=%s up_for=%.1fs; reconnecting",
                    self.host, self.port, reason, up_for)

    def _note_failure(self, exc: BaseException) -> None:
        """Log a failed attempt once per distinct reason, then a reminder now and then."""
        now = monotonic()
        self._attempts += 1
        if self._down_since is None:
            self._down_since = now
        key = _reason_key(exc)
        if key != self._down_reason:
            self._down_reason = key
            self._down_reminded_at = now
            if isinstance(exc, _AuthRefused | _Rejected):
                log.error("esl.down host=%s port=%d: %s", self.host, self.port, exc)
            else:
                log.warning("esl.down host=%s port=%d reason=%s; retrying, backoff up to %gs",
                            self.host, self.port, _describe(exc), self.backoff_max)
            return
        if now - self._down_reminded_at >= self.still_down_every:
            self._down_reminded_at = now
            log.warning("esl.still_down host=%s port=%d reason=%s attempts=%d down_for=%.0fs",
                        self.host, self.port, _describe(exc), self._attempts,
                        now - self._down_since)
        else:
            log.debug("esl.retry_failed host=%s port=%d reason=%s attempt=%d",
                      self.host, self.port, _describe(exc), self._attempts)

    def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` unless :meth:`stop` wakes us first."""
        if not self._stopping:
            self._wake.wait(seconds)


def _reason_key(exc: BaseException) -> str:
    errno = getattr(exc, "errno", None)
    return f"{type(exc).__name__}:{errno}" if errno is not None else type(exc).__name__


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _tune_socket(sock: gevent.socket.socket) -> None:
    """No timeout on reads (a quiet switch is normal), Nagle off for small commands, and
    TCP keepalive so that a switch that vanished without a FIN is noticed in ~1 minute."""
    sock.settimeout(None)
    options = [
        (_stdsocket.IPPROTO_TCP, getattr(_stdsocket, "TCP_NODELAY", None), 1),
        (_stdsocket.SOL_SOCKET, _stdsocket.SO_KEEPALIVE, 1),
        (_stdsocket.IPPROTO_TCP, getattr(_stdsocket, "TCP_KEEPIDLE", None), 30),
        (_stdsocket.IPPROTO_TCP, getattr(_stdsocket, "TCP_KEEPINTVL", None), 10),
        (_stdsocket.IPPROTO_TCP, getattr(_stdsocket, "TCP_KEEPCNT", None), 3),
    ]
    for level, option, value in options:
        if option is None:
            continue
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            pass
