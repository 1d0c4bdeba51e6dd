"""The delivery loop: drains the outbox to CC360, one call's events strictly in order.

Shaped like rq's ``work()`` and sized like huey's ``loop()``: :meth:`Deliverer.run_once`
is one step (now and then reclaim stale leases; record the outcomes gathered since the
last step and claim due heads for the free lanes, in one outbox call; expire stale
realtime rows; send the rest on free lanes, each outcome decided in ``_on_delivered`` /
``_on_retry`` / ``_on_dead``); :meth:`Deliverer.run` only repeats it until stopped,
sleeping while there is nothing to do and waking at once when a lane frees or on
:meth:`Deliverer.notify`.

Outcomes are group-committed: a lane that gets its answer queues the outcome (a
:class:`~fs_cc360.outbox.Mark`) and is free at once; the next step writes every queued
mark in one transaction and, in the same call, claims rows for the free lanes
(:meth:`~fs_cc360.outbox.Outbox.mark_and_claim`). While that call runs in the outbox
thread, more lanes finish and their marks go into the next one, so under load one
transaction covers many rows. :meth:`Deliverer.run` also claims up to ``prefetch`` rows
ahead (heads of other calls, leased like any claim): a lane that frees takes the next
one at once, without waiting for the outbox thread, so a backlog drains at the speed of
the CRM and of the HTTP client, not of SQLite round trips.

Per-call order comes from the outbox: only the head of a key (its oldest non-final row)
is ever claimed, and the next row becomes the head only when this one is final
(delivered, dead or expired). So a dead ringing never blocks its call's summary.

When the CRM is down the loop does not hammer it: after a transient failure (connection
refused, timeout, 5xx/408/429, lost session) a global circuit opens, and only ONE probe
at a time is sent, no sooner than a global backoff allows (which honours
``Retry-After``). The first success closes the circuit and the backlog drains with full
concurrency. The database is never touched while a request is in flight: a row is
claimed (a short transaction), sent, then its outcome is written (another one).

Per-call order does not depend on when a mark is written: until its mark commits, a row
stays ``inflight`` in the outbox, so its call's next row is not a head and cannot be
claimed. Durability of batched marks is argued in :mod:`fs_cc360.outbox`; in short a
crash (or power failure) before a mark commits only sends that row again, like a crash
during the request itself, and never sends a call's later row first.
"""

from __future__ import annotations

import heapq
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
from fs_cc360.outbox import Mark, Row

log = logging.getLogger(__name__)

#: Kinds that are popups: pointless when late, so they expire after ``realtime_ttl``.
REALTIME_KINDS = ("ringing", "answer", "hangup")
#: HTTP statuses that are transient even if a client reports them as a rejection.
TRANSIENT_STATUSES = (408, 429)
#: Longest time between two looks for expired leases (rows of a dead deliverer).
RECLAIM_MAX_INTERVAL = 5.0


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
        prefetch: int | None = None,
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
        #: rows :meth:`run` claims ahead of free lanes (default: ``concurrency``); never
        #: while the CRM is down (they are released then, and at stop)
        self.prefetch = concurrency if prefetch is None else max(0, prefetch)
        self.observer = observer
        self.counts = DeliveryCounts()
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        #: seconds between looks for expired leases: a crashed deliverer's rows are sent
        #: again at most this long after their lease ends (a look costs an outbox call,
        #: so not one per step)
        self.reclaim_interval = max(0.0, min(lease_seconds / 4, RECLAIM_MAX_INTERVAL))
        self._pool = gevent.pool.Pool(concurrency)
        self._free_lanes = list(range(concurrency - 1, -1, -1))  # pop() gives lane 0 first
        # call_key -> our row of that call, from its claim until its outcome is committed
        # (being sent, or answered and its mark queued)
        self._sending: dict[str, Row] = {}
        # outcomes decided but not committed yet, in the order they happened
        self._marks: list[tuple[Mark, Row]] = []
        # claimed, waiting for a lane: (next_attempt_at, id, row), earliest due first
        self._ready: list[tuple[float, int, Row]] = []
        self._stopping = False  # run() is stopping: lanes take no more ready rows
        self._reclaim_at: float | None = None  # next look for expired leases
        self._next_due: float | None = None  # from the last claim (see _idle_timeout)
        self._next_due_known = False
        self._wake = gevent.event.Event()
        self._down = False  # the circuit: True after a transient failure, until a success
        self._failures = 0  # consecutive transient failures (drives the global backoff)
        #: Bumped whenever the circuit changes; a failure escalates the global backoff only
        #: if no failure was counted since its request started (one failed wave = one).
        self._epoch = 0
        self._probe_at = 0.0  # while down: no request before this time
        #: when the circuit last changed (``clock``); None: no change since start
        self.crm_since: float | None = None
        #: the last transient failure (the error that opened or kept the circuit open)
        self.crm_last_error: str | None = None
        self.crm_last_error_at: float | None = None
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
        """Rows claimed by us whose outcome is not committed yet."""
        return len(self._sending)

    def notify(self) -> None:
        """New rows were committed: claim now instead of at the next poll."""
        self._wake.set()

    # -- one step ---------------------------------------------------------------------

    def run_once(self, now: float | None = None, *, wait: bool = True) -> int:
        """One step: record queued outcomes and claim due heads (one outbox call), then
        expire or send each claimed row; every ``reclaim_interval`` look for stale leases.

        Returns how many rows were claimed (sent or expired). With ``wait`` (the default:
        burst, cron, tests) it returns once the requests it started are answered and
        their outcomes committed; :meth:`run` passes ``wait=False`` so lanes refill as
        soon as one frees. With an explicit ``now`` the outcomes are recorded at that
        time too.
        """
        fixed = now is not None
        now = self._clock() if now is None else now
        self._next_due_known = False
        self._maybe_reclaim(now)
        if self._down and self._ready:
            self._release_ready()
        limit = self._claim_limit(now)
        if not wait and not self._down:
            limit += max(0, self.prefetch - len(self._ready))
        rows = self._settle(now, limit)
        for row in rows:
            self._sending[row.call_key] = row
            heapq.heappush(self._ready, (row.next_attempt_at, row.id, row))
        started: list[gevent.Greenlet] = []
        while self._free_lanes and self._ready:
            row = heapq.heappop(self._ready)[-1]
            if self._is_stale(row, now):
                self._on_expired(row, now)
            else:
                lane = self._free_lanes.pop()
                started.append(self._pool.spawn(self._lane, row, lane,
                                                now if fixed else None))
        if wait:
            if started:
                gevent.joinall(started)
            self._settle(now, 0)
        return len(rows)

    def _maybe_reclaim(self, now: float) -> None:
        """Give back rows whose lease ended (their deliverer died), at most once per
        ``reclaim_interval`` (and again at once if the clock went back)."""
        due = self._reclaim_at
        if due is not None and due - self.reclaim_interval <= now < due:
            return
        self._reclaim_at = now + self.reclaim_interval
        self.outbox.reclaim_expired_leases(now)

    def _settle(self, now: float, limit: int) -> list[Row]:
        """Commit the queued marks and claim up to ``limit`` rows, in one outbox call.

        If the outbox fails, the marks stay queued (in order) for the next step and the
        error propagates; their rows stay ours (``_sending``), so nothing is claimed
        for those calls meanwhile.
        """
        batch = self._marks
        if not batch and limit <= 0:
            return []
        self._marks = []
        settled = {id(row) for _, row in batch}
        # Keys we are still sending (or whose marks queued after this batch) are left
        # out; keys settled by this batch may yield their next row right away.
        exclude = [key for key, row in self._sending.items() if id(row) not in settled]
        try:
            claimed = self.outbox.mark_and_claim([mark for mark, _ in batch], now, limit,
                                                 self.lease_seconds, exclude_keys=exclude)
        except BaseException:
            self._marks[:0] = batch
            raise
        for _, row in batch:
            if self._sending.get(row.call_key) is row:
                del self._sending[row.call_key]
        if limit > 0:
            self._next_due, self._next_due_known = claimed.next_due_at, True
        return claimed.rows

    def _record(self, mark: Mark, row: Row) -> None:
        """Queue ``row``'s outcome for the next step's group commit."""
        self._marks.append((mark, row))
        self._wake.set()

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

    def _release_ready(self) -> None:
        """Give the rows claimed ahead back to the outbox (the CRM is down, or we stop):
        they were never sent, and must not sit leased in memory meanwhile."""
        rows = [entry[-1] for entry in self._ready]
        self._ready = []
        for row in rows:
            if self._sending.get(row.call_key) is row:
                del self._sending[row.call_key]
        try:
            self.outbox.release_leases([row.id for row in rows])
        except OutboxError as exc:  # the leases expire by themselves
            log.error("delivery.release_failed ids=%s error=%s", [r.id for r in rows], exc)

    def _next_ready(self, fixed_now: float | None) -> Row | None:
        """The next row claimed ahead for a lane that just freed (None: the lane rests)."""
        while self._ready and not self._down and not self._stopping:
            row = heapq.heappop(self._ready)[-1]
            now = self._now(fixed_now)
            if not self._is_stale(row, now):
                return row
            self._on_expired(row, now)
        return None

    def _lane(self, row: Row | None, lane: int, fixed_now: float | None) -> None:
        """Send ``row`` on ``lane``, then rows claimed ahead while there are any (runs in
        a pool greenlet); the lane is free again when there is nothing ready."""
        try:
            while row is not None:
                self._deliver(row, lane, fixed_now)
                gevent.sleep(0)
                row = self._next_ready(fixed_now)
        finally:
            self._free_lanes.append(lane)
            self._wake.set()

    def _deliver(self, row: Row, lane: int, fixed_now: float | None) -> None:
        """Send one row on ``lane`` and queue its outcome.

        The lane is free as soon as the answer is in; the outcome is committed by the
        next step, in the same outbox call that claims more rows.
        """
        started = time.monotonic()
        epoch = self._epoch
        decided = False
        try:
            try:
                request = row.crm_request()
            except (ValueError, KeyError, TypeError) as exc:  # corrupt row: never sendable
                self._on_dead(row, _Outcome("error", f"unreadable request: {exc}",
                                            transient=False), self._now(fixed_now))
                decided = True
                return
            try:
                response = self.client.send(request, lane)
            except Exception as exc:  # classified below; nothing escapes a lane
                outcome = self._classify(exc)
                seconds = time.monotonic() - started
                self._notify_observer("failed", row.kind, outcome.reason, outcome.status,
                                      seconds)
                self._on_failure(row, outcome, self._now(fixed_now), epoch)
            else:
                self._on_delivered(row, response, time.monotonic() - started,
                                   self._now(fixed_now))
            decided = True
        finally:
            if not decided and self._sending.get(row.call_key) is row:
                # cut off (stop, kill) before an outcome: the lease covers the row
                del self._sending[row.call_key]

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
        self._record(Mark.delivered(row.id, status, now), row)
        self.counts.delivered += 1
        self.counts.last_latency = seconds
        self._crm_answered()
        log.debug("outbox.delivered id=%s call=%s kind=%s status=%s elapsed=%.3fs",
                  row.id, row.call_key, row.kind, status, seconds)
        self._notify_observer("delivered", row.kind, status, seconds)

    def _on_failure(self, row: Row, outcome: _Outcome, now: float, epoch: int = -1) -> None:
        if outcome.transient:
            self._trip(outcome, now, epoch)
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
        self._record(Mark.retry(row.id, now + delay, outcome.error, outcome.status,
                                rejected=not outcome.transient, now=now), row)
        self.counts.retried += 1
        log.info("outbox.retry id=%s call=%s kind=%s attempt=%d delay=%.1fs reason=%s "
                 "status=%s error=%s", row.id, row.call_key, row.kind, row.attempts + 1,
                 delay, outcome.reason, outcome.status, outcome.error)

    def _on_dead(self, row: Row, outcome: _Outcome, now: float) -> None:
        self._record(Mark.dead(row.id, outcome.error, outcome.status, rejected=True, now=now),
                     row)
        self.counts.dead += 1
        log.warning("outbox.dead id=%s call=%s kind=%s status=%s error=%s",
                    row.id, row.call_key, row.kind, outcome.status, outcome.error)
        self._notify_observer("failed", row.kind, "dead", outcome.status, None)

    def _on_expired(self, row: Row, now: float) -> None:
        happened = row.event_at if row.event_at is not None else row.created_at
        self._sending[row.call_key] = row  # ours until the mark commits
        self._record(Mark.expired(row.id, now), row)
        self.counts.expired += 1
        log.info("outbox.expired id=%s call=%s kind=%s age=%.0fs ttl=%.0fs",
                 row.id, row.call_key, row.kind, now - happened, self.realtime_ttl)
        self._notify_observer("failed", row.kind, "expired", None, None)

    # -- the circuit ------------------------------------------------------------------

    def _trip(self, outcome: _Outcome, now: float, epoch: int = -1) -> None:
        """A transient failure: open the circuit (or keep it open) and push the next
        probe out by the global backoff.

        Requests already in flight when the circuit opened fail together: they are one
        failure of the CRM, not one each (``epoch`` is the circuit's epoch when the
        request started), so a one-second blip under full load costs one backoff step.
        """
        self.crm_last_error, self.crm_last_error_at = outcome.error, now
        if self._down and epoch != self._epoch:
            return  # started before the failure that opened (or re-armed) the circuit
        delay = self.backoff.delay(self._failures, self._rng, outcome.retry_after)
        self._failures += 1
        self._epoch += 1
        self._probe_at = max(self._probe_at, now + delay)
        if not self._down:
            self._down = True
            self.crm_since = now
            log.warning("crm.down reason=%s status=%s error=%s: sending one probe at a time "
                        "until it answers", outcome.reason, outcome.status, outcome.error)

    def _crm_answered(self) -> None:
        if self._down:
            log.warning("crm.up after=%d failures: draining the backlog", self._failures)
            self.crm_since = self._clock()
        self._down = False
        self._epoch += 1
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
        claim nothing more, wait up to ``stop_timeout`` for requests in flight, commit
        every outcome known, then cancel the rest and release their leases (they are
        sent again next time).
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
                    log.error("delivery.outbox_error error=%s (outcomes kept: %d)", exc,
                              len(self._marks))
                    stop.wait(self.idle_poll)
                    continue
                if burst and not handled and not self._sending:
                    break
                # A lane freeing, a queued outcome or notify() sets _wake: the next step
                # then commits and refills at once. Else sleep until something is due.
                try:
                    timeout = self._idle_timeout(self._clock())
                except OutboxError as exc:
                    log.error("delivery.outbox_error error=%s", exc)
                    timeout = self.idle_poll
                gevent.wait([self._wake, stop], timeout=timeout, count=1)
        finally:
            self._stopping = True
            try:
                self._shutdown()
            finally:
                self._stopping = False
        log.info("delivery.stopped delivered=%d retried=%d dead=%d expired=%d",
                 self.counts.delivered, self.counts.retried, self.counts.dead,
                 self.counts.expired)

    def _idle_timeout(self, now: float) -> float:
        """How long to sleep after a step (a lane freeing or notify cuts it short)."""
        if self._marks:
            return 0.0  # outcomes queued during the step: commit them now
        if self._down and now < self._probe_at:
            return max(0.0, min(self.idle_poll, self._probe_at - now))
        if not self._free_lanes or (self._down and self._sending):
            return self.idle_poll  # a finishing request wakes us
        # the step's claim told when the next head is due; else ask
        next_due = self._next_due if self._next_due_known else self.outbox.next_due_at()
        if next_due is None or next_due <= now:
            # nothing due, or due but held back (its key is still being sent by us)
            return self.idle_poll
        return min(self.idle_poll, next_due - now)

    def _shutdown(self) -> None:
        if self._ready:  # never sent: back to the outbox first (lanes take no more now)
            self._release_ready()
        cut: list[Row] = []
        if not self._pool.join(timeout=self.stop_timeout):
            running = list(self._sending.values())
            self._pool.kill(timeout=5)
            answered = {id(row) for _, row in self._marks}
            cut = [row for row in running if id(row) not in answered]
            log.warning("delivery.stop_timeout inflight=%d: cancelled, released for later",
                        len(cut))
        if self._marks:
            try:
                self._settle(self._clock(), 0)
            except OutboxError as exc:  # the leases expire; those rows are sent again
                log.error("delivery.record_failed count=%d error=%s", len(self._marks), exc)
        if cut:
            ids = [row.id for row in cut]
            try:
                self.outbox.release_leases(ids)
            except OutboxError as exc:  # the leases expire by themselves
                log.error("delivery.release_failed ids=%s error=%s", ids, exc)
