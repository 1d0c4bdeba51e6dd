"""The delivery loop: drains the outbox to CC360, one call's events strictly in order.

Shaped like rq's ``work()`` and sized like huey's ``loop()``: :meth:`Deliverer.run_once`
is one step (reclaim stale leases, claim the due heads, expire stale realtime rows, send
the rest on free lanes, record each outcome in ``_on_delivered`` / ``_on_retry`` /
``_on_dead``); :meth:`Deliverer.run` only repeats it until stopped, sleeping while there
is nothing to do and waking at once on :meth:`Deliverer.notify`.

Per-call order comes from the outbox: only the head of a key (its oldest non-final row)
is ever claimed, and the next row becomes the head only when this one is final
(delivered, dead or expired). So a dead ringing never blocks its call's summary.

When the CRM is down the loop does not hammer it: after a transient failure (connection
refused, timeout, 5xx/408/429, lost session) a global circuit opens, and only ONE probe
at a time is sent, no sooner than a global backoff allows (which honours
``Retry-After``). The first success closes the circuit and the backlog drains with full
concurrency. The database is never touched while a request is in flight: a row is
claimed (a short transaction), sent, then its outcome is written (another one).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

import gevent
import gevent.event
import gevent.pool

from fs_cc360.crm_request import CrmRequest
from fs_cc360.errors import (
    CrmAuthError,
    CrmError,
    CrmRejected,
    CrmTimeout,
    CrmUnavailable,
    OutboxError,
)
from fs_cc360.outbox import Row

log = logging.getLogger(__name__)

#: Kinds that are popups: pointless when late, so they expire after ``realtime_ttl``.
REALTIME_KINDS = ("ringing", "answer", "hangup")
#: HTTP statuses that are transient even if a client reports them as a rejection.
TRANSIENT_STATUSES = (408, 429)


@dataclass(frozen=True)
class BackoffPolicy:
    """Capped exponential backoff with full jitter (AWS's "Exponential Backoff And
    Jitter"): attempt ``n`` waits ``uniform(0, min(maximum, initial * multiplier**n))``.

    Full jitter spreads the retries of many rows (and of several connectors) over the
    window instead of synchronising them into waves. A server's ``Retry-After`` is a
    floor: we wait at least that long (capped by ``retry_after_cap`` against absurd
    values).
    """

    initial: float = 1.0  #: cap of the first retry's window, seconds
    maximum: float = 300.0  #: the window never grows beyond this, seconds
    multiplier: float = 2.0
    retry_after_cap: float = 3600.0  #: a larger ``Retry-After`` is clipped to this

    def window(self, attempt: int) -> float:
        """The upper bound of the jittered delay for ``attempt`` (0-based)."""
        exponent = min(max(attempt, 0), 64)  # 2.0 ** 64 * initial is far past any maximum
        return min(self.maximum, self.initial * self.multiplier ** exponent)

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None
              ) -> float:
        jittered = rng.uniform(0.0, self.window(attempt))
        if retry_after is None:
            return jittered
        return max(min(float(retry_after), self.retry_after_cap), jittered)


class DeliveryObserver(Protocol):
    """What the deliverer reports to (``fs_cc360.metrics.Metrics`` implements it)."""

    def delivered(self, kind: str, status: int | None, seconds: float) -> None: ...

    def failed(self, kind: str, reason: str, status: int | None = None,
               seconds: float | None = None) -> None: ...


class CrmClient(Protocol):
    """The part of :class:`fs_cc360.cc360.Cc360Client` the deliverer uses."""

    def send(self, request: CrmRequest, lane: int = 0) -> Any: ...


@dataclass
class DeliveryCounts:
    """Running totals since start (cheap to read for healthz, tests and logs)."""

    delivered: int = 0
    retried: int = 0  #: failed attempts that will be retried
    dead: int = 0
    expired: int = 0
    last_latency: float | None = None  #: seconds of the last successful request


@dataclass(frozen=True)
class _Outcome:
    """Why an attempt failed, already classified."""

    reason: str  #: ``unavailable`` / ``timeout`` / ``auth`` / ``rejected`` / ``error``
    error: str
    status: int | None = None
    retry_after: float | None = None
    transient: bool = True  #: a CRM outage (opens the circuit); else counts as a rejection


class Deliverer:
    """Sends outbox rows to CC360 with per-call order, bounded concurrency and backoff.

    ``outbox`` is an :class:`~fs_cc360.outbox.Outbox` or
    :class:`~fs_cc360.outbox.OutboxWriter` (same methods); ``client`` a
    :class:`~fs_cc360.cc360.Cc360Client` with at least ``concurrency`` lanes.
    Everything time-related reads ``clock`` (or the ``now`` given to :meth:`run_once`),
    so tests drive backoff with a pinned clock and never sleep.
    """

    def __init__(
        self,
        outbox: Any,
        client: CrmClient,
        *,
        concurrency: int = 8,
        realtime_ttl: float = 120.0,
        max_rejections: int = 3,
        lease_seconds: float = 60.0,
        backoff: BackoffPolicy | None = None,
        rejection_backoff: BackoffPolicy | None = None,
        realtime_kinds: Collection[str] = REALTIME_KINDS,
        idle_poll: float = 1.0,
        stop_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        observer: DeliveryObserver | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, not {concurrency}")
        lanes = getattr(client, "lanes", None)
        if isinstance(lanes, int) and lanes < concurrency:
            raise ValueError(f"the CRM client has {lanes} lanes, fewer than "
                             f"concurrency={concurrency}")
        self.outbox = outbox
        self.client = client
        #: requests in flight at most (one lane each)
        self.concurrency = concurrency
        #: ringing/answer/hangup older than this (seconds) when their turn comes expire
        self.realtime_ttl = realtime_ttl
        #: 4xx answers (other than 408/429) before a row is dead
        self.max_rejections = max(1, max_rejections)
        #: how long a claimed row is ours; must exceed a send (timeout + relogin + retry)
        self.lease_seconds = lease_seconds
        #: per row and for the global probe while the CRM is down
        self.backoff = backoff or BackoffPolicy()
        #: between tries of a rejected request (short: it is probably permanent)
        self.rejection_backoff = rejection_backoff or BackoffPolicy(initial=1.0, maximum=30.0)
        self.realtime_kinds = frozenset(realtime_kinds)
        #: longest sleep when idle; :meth:`notify` cuts it short
        self.idle_poll = idle_poll
        #: graceful stop waits this long for in-flight requests, then releases them
        self.stop_timeout = stop_timeout
        self.observer = observer
        self.counts = DeliveryCounts()
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._pool = gevent.pool.Pool(concurrency)
        self._free_lanes = list(range(concurrency - 1, -1, -1))  # pop() gives lane 0 first
        self._sending: dict[str, Row] = {}  # call_key -> row being sent by us
        self._wake = gevent.event.Event()
        self._down = False  # the circuit: True after a transient failure, until a success
        self._failures = 0  # consecutive transient failures (drives the global backoff)
        self._probe_at = 0.0  # while down: no request before this time
        timeout = getattr(client, "timeout", None)
        if isinstance(timeout, tuple) and timeout and lease_seconds < 3 * sum(timeout):
            log.warning("delivery.short_lease lease=%.0fs crm_timeout=%s: a slow request "
                        "may outlive its lease and be sent twice", lease_seconds, timeout)

    # -- state, for healthz / tests ---------------------------------------------------

    @property
    def crm_down(self) -> bool:
        """True while the circuit is open (the last CRM attempt failed transiently)."""
        return self._down

    @property
    def in_flight(self) -> int:
        return len(self._sending)

    def notify(self) -> None:
        """New rows were committed: claim now instead of at the next poll."""
        self._wake.set()

    # -- one step ---------------------------------------------------------------------

    def run_once(self, now: float | None = None, *, wait: bool = True) -> int:
        """One step: reclaim stale leases, claim due heads, expire or send each.

        Returns how many rows were claimed (sent or expired). With ``wait`` (the default:
        burst, cron, tests) it returns once the requests it started are answered and
        recorded; :meth:`run` passes ``wait=False`` so lanes refill as soon as one frees.
        With an explicit ``now`` the outcomes are recorded at that time too.
        """
        fixed = now is not None
        now = self._clock() if now is None else now
        self.outbox.reclaim_expired_leases(now)
        limit = self._claim_limit(now)
        if limit <= 0:
            return 0
        rows = self.outbox.claim_due(now, limit, self.lease_seconds,
                                     exclude_keys=tuple(self._sending))
        started: list[gevent.Greenlet] = []
        for row in rows:
            if self._is_stale(row, now):
                self._on_expired(row, now)
            else:
                started.append(self._start(row, now if fixed else None))
        if wait and started:
            gevent.joinall(started)
        return len(rows)

    def _claim_limit(self, now: float) -> int:
        if self._down:
            # one probe at a time, and not before the global backoff allows
            return 1 if not self._sending and now >= self._probe_at else 0
        return len(self._free_lanes)

    def _is_stale(self, row: Row, now: float) -> bool:
        if row.kind not in self.realtime_kinds:
            return False
        happened = row.event_at if row.event_at is not None else row.created_at
        return now - happened > self.realtime_ttl

    def _start(self, row: Row, fixed_now: float | None) -> gevent.Greenlet:
        lane = self._free_lanes.pop()
        self._sending[row.call_key] = row
        return self._pool.spawn(self._deliver, row, lane, fixed_now)

    def _deliver(self, row: Row, lane: int, fixed_now: float | None) -> None:
        """Send one row on ``lane`` and record the outcome (runs in a pool greenlet)."""
        started = time.monotonic()
        try:
            try:
                request = row.crm_request()
            except (ValueError, KeyError, TypeError) as exc:  # corrupt row: never sendable
                self._on_dead(row, _Outcome("error", f"unreadable request: {exc}",
                                            transient=False), self._now(fixed_now))
                return
            try:
                response = self.client.send(request, lane)
            except Exception as exc:  # classified below; nothing escapes a lane
                outcome = self._classify(exc)
                seconds = time.monotonic() - started
                self._notify_observer("failed", row.kind, outcome.reason, outcome.status,
                                      seconds)
                self._on_failure(row, outcome, self._now(fixed_now))
            else:
                self._on_delivered(row, response, time.monotonic() - started,
                                   self._now(fixed_now))
        except OutboxError as exc:
            # The outcome could not be recorded; the lease expires and the row is sent
            # again (at-least-once), so this is loud but not fatal.
            log.error("delivery.record_failed id=%s call=%s kind=%s error=%s",
                      row.id, row.call_key, row.kind, exc)
        finally:
            self._sending.pop(row.call_key, None)
            self._free_lanes.append(lane)
            self._wake.set()

    def _now(self, fixed_now: float | None) -> float:
        return self._clock() if fixed_now is None else fixed_now

    @staticmethod
    def _classify(exc: Exception) -> _Outcome:
        if isinstance(exc, CrmRejected) and exc.status not in TRANSIENT_STATUSES:
            return _Outcome("rejected", str(exc), exc.status, transient=False)
        if isinstance(exc, CrmTimeout):
            return _Outcome("timeout", str(exc), exc.status, exc.retry_after)
        if isinstance(exc, CrmAuthError):
            return _Outcome("auth", str(exc), exc.status, exc.retry_after)
        if isinstance(exc, CrmUnavailable | CrmError):
            return _Outcome("unavailable", str(exc), exc.status, exc.retry_after)
        # A bug or a surprise, not an outage: counted like a rejection, so one poisoned
        # row goes dead (and can be requeued) instead of blocking its call forever.
        log.error("delivery.unexpected error=%r", exc, exc_info=exc)
        return _Outcome("error", f"{type(exc).__name__}: {exc}", transient=False)

    # -- outcomes ---------------------------------------------------------------------

    def _on_delivered(self, row: Row, response: Any, seconds: float, now: float) -> None:
        status = getattr(response, "status", None)
        self.outbox.mark_delivered(row.id, status, now)
        self.counts.delivered += 1
        self.counts.last_latency = seconds
        self._crm_answered()
        log.debug("outbox.delivered id=%s call=%s kind=%s status=%s elapsed=%.3fs",
                  row.id, row.call_key, row.kind, status, seconds)
        self._notify_observer("delivered", row.kind, status, seconds)

    def _on_failure(self, row: Row, outcome: _Outcome, now: float) -> None:
        if outcome.transient:
            self._trip(outcome, now)
            delay = self.backoff.delay(row.attempts, self._rng, outcome.retry_after)
            self._on_retry(row, outcome, now, delay)
            return
        if outcome.reason == "rejected":
            self._crm_answered()
        if row.rejections + 1 >= self.max_rejections:
            self._on_dead(row, outcome, now)
        else:
            delay = self.rejection_backoff.delay(row.rejections, self._rng)
            self._on_retry(row, outcome, now, delay)

    def _on_retry(self, row: Row, outcome: _Outcome, now: float, delay: float) -> None:
        self.outbox.mark_retry(row.id, now + delay, outcome.error, outcome.status,
                               rejected=not outcome.transient, now=now)
        self.counts.retried += 1
        log.info("outbox.retry id=%s call=%s kind=%s attempt=%d delay=%.1fs reason=%s "
                 "status=%s error=%s", row.id, row.call_key, row.kind, row.attempts + 1,
                 delay, outcome.reason, outcome.status, outcome.error)

    def _on_dead(self, row: Row, outcome: _Outcome, now: float) -> None:
        self.outbox.mark_dead(row.id, outcome.error, outcome.status, rejected=True, now=now)
        self.counts.dead += 1
        log.warning("outbox.dead id=%s call=%s kind=%s status=%s error=%s",
                    row.id, row.call_key, row.kind, outcome.status, outcome.error)
        self._notify_observer("failed", row.kind, "dead", outcome.status, None)

    def _on_expired(self, row: Row, now: float) -> None:
        happened = row.event_at if row.event_at is not None else row.created_at
        self.outbox.mark_expired(row.id, now)
        self.counts.expired += 1
        log.info("outbox.expired id=%s call=%s kind=%s age=%.0fs ttl=%.0fs",
                 row.id, row.call_key, row.kind, now - happened, self.realtime_ttl)
        self._notify_observer("failed", row.kind, "expired", None, None)

    # -- the circuit ------------------------------------------------------------------

    def _trip(self, outcome: _Outcome, now: float) -> None:
        """A transient failure: open the circuit (or keep it open) and push the next
        probe out by the global backoff."""
        delay = self.backoff.delay(self._failures, self._rng, outcome.retry_after)
        self._failures += 1
        self._probe_at = max(self._probe_at, now + delay)
        if not self._down:
            self._down = True
            log.warning("crm.down reason=%s status=%s error=%s: sending one probe at a time "
                        "until it answers", outcome.reason, outcome.status, outcome.error)

    def _crm_answered(self) -> None:
        if self._down:
            log.warning("crm.up after=%d failures: draining the backlog", self._failures)
        self._down = False
        self._failures = 0
        self._probe_at = 0.0

    def _notify_observer(self, method: str, *args: Any) -> None:
        if self.observer is None:
            return
        try:
            if method == "delivered":
                self.observer.delivered(*args)
            else:
                kind, reason, status, seconds = args
                self.observer.failed(kind, reason, status=status, seconds=seconds)
        except Exception:
            log.warning("delivery.observer_failed method=%s", method, exc_info=True)

    # -- the loop ---------------------------------------------------------------------

    def run(self, stop: gevent.event.Event, *, burst: bool = False) -> None:
        """Deliver until ``stop`` is set (or, with ``burst``, until nothing is due).

        At start-up (not in burst mode, which may run beside the service) every
        in-flight row is given back: no send of ours can still be running. On stop:
        claim nothing more, wait up to ``stop_timeout`` for requests in flight, then
        cancel the rest and release their leases (they are sent again next time).
        """
        if not burst:
            released = self.outbox.release_leases()
            if released:
                log.info("delivery.recovered inflight=%d", released)
        log.info("delivery.started concurrency=%d burst=%s", self.concurrency, burst)
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    handled = self.run_once(wait=False)
                except OutboxError as exc:
                    log.error("delivery.outbox_error error=%s", exc)
                    stop.wait(self.idle_poll)
                    continue
                if handled:
                    gevent.sleep(0)  # let the new lanes start before claiming again
                    continue
                if burst and not self._sending:
                    break
                try:
                    timeout = self._idle_timeout(self._clock())
                except OutboxError as exc:
                    log.error("delivery.outbox_error error=%s", exc)
                    timeout = self.idle_poll
                gevent.wait([self._wake, stop], timeout=timeout, count=1)
        finally:
            self._shutdown()
        log.info("delivery.stopped delivered=%d retried=%d dead=%d expired=%d",
                 self.counts.delivered, self.counts.retried, self.counts.dead,
                 self.counts.expired)

    def _idle_timeout(self, now: float) -> float:
        """How long to sleep when a step claimed nothing (a notify cuts it short)."""
        if self._down and now < self._probe_at:
            return max(0.0, min(self.idle_poll, self._probe_at - now))
        if not self._free_lanes or (self._down and self._sending):
            return self.idle_poll  # a finishing request wakes us
        next_due = self.outbox.next_due_at()
        if next_due is None or next_due <= now:
            # nothing due, or due but held back (its key is still being sent by us)
            return self.idle_poll
        return min(self.idle_poll, next_due - now)

    def _shutdown(self) -> None:
        if not self._pool.join(timeout=self.stop_timeout):
            ids = [row.id for row in self._sending.values()]
            log.warning("delivery.stop_timeout inflight=%d: cancelled, released for later",
                        len(ids))
            self._pool.kill(timeout=5)
            try:
                self.outbox.release_leases(ids)
            except OutboxError as exc:  # the leases expire by themselves
                log.error("delivery.release_failed ids=%s error=%s", ids, exc)

