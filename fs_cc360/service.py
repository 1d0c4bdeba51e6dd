"""Wiring: builds every piece from :class:`~fs_cc360.config.Settings` and runs them.

The flow, each arrow a greenlet boundary::

    FreeSWITCH --ESL--> EslClient reader --feed--> CallTracker (pure, in the reader)
        --CrmEvent--> spool (memory) --committer--> Outbox (SQLite, in its own thread)
        --notify--> Deliverer lanes --HTTP--> CC360

Nothing on the ESL reader's path blocks: the tracker is pure code and an event only
lands in the in-memory spool; the committer writes the spool to SQLite in batches from
the outbox's native thread (group commit), and only committed rows are ever delivered.
If the outbox cannot be written (read-only file, disk full) the spool keeps the events in
order, healthz and metrics say so, and the committer retries until the disk is back.

This is the only module with process-level state (signal handlers, the running service).
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import gevent
import gevent.event
import gevent.lock

from fs_cc360.backfill import recent_cdrs, summaries_from_legs
from fs_cc360.calls import TRACKED_EVENTS, CallTracker, CrmEvent, TrackerConfig
from fs_cc360.cc360 import Cc360Client
from fs_cc360.clock import ClockOffset
from fs_cc360.config import DEFAULT_ORIGINATE, TENANT_ORIGINATE, Settings
from fs_cc360.crm_request import request_for
from fs_cc360.delivery import BackoffPolicy, Deliverer
from fs_cc360.errors import EslCommandError, EslError, FsCc360Error, OutboxError
from fs_cc360.esl import EslClient
from fs_cc360.events import ChannelEvent
from fs_cc360.makecall import MakeCall
from fs_cc360.metrics import Metrics
from fs_cc360.outbox import NewItem, OutboxWriter, is_postgresql
from fs_cc360.position import Position
from fs_cc360.recordings import Mp3Converter, RecordingLinks
from fs_cc360.resync import ResyncError, channel_uuids, dump_headers, plan_gap

if TYPE_CHECKING:
    from fs_cc360.console import Console

log = logging.getLogger(__name__)

#: Events the service subscribes to: what the tracker reads, plus click-to-call results.
#: The one list: freeswitch_conf/README.md and switch.conf.xml.snippet copy it, and
#: tests/test_freeswitch_conf.py fails until they equal the output of
#: ``python -c 'from fs_cc360.service import SUBSCRIBED_EVENTS; print(*SUBSCRIBED_EVENTS)'``.
SUBSCRIBED_EVENTS: tuple[str, ...] = (*TRACKED_EVENTS, "BACKGROUND_JOB")
#: Events kept in memory while the outbox cannot be written, before the oldest are
#: dropped (loudly): about 60 MB, hours of a busy PBX.
SPOOL_LIMIT = 200_000
#: How often the tracker's waits are checked and the outbox health is probed.
TICK_SECONDS = 1.0
HEALTH_SECONDS = 5.0
#: Channels a resync asks ``uuid_dump`` for, at most (the rest get their popups from
#: their next event): bounds the work after a reconnect on a very busy switch.
MAX_RESYNC_CHANNELS = 20_000
#: Longest stretch of gap handling (scan, CDR parsing, feeding a call) between two
#: yields to the hub, in seconds: live events never wait much longer than this.
GAP_SLICE = 0.002


def tracker_config(settings: Settings) -> TrackerConfig:
    """The call tracker's rules from ``[calls]`` and ``[extensions]``."""
    calls = settings.calls
    return TrackerConfig(
        extension_pattern=calls.extension_pattern.pattern,
        extensions=dict(settings.extensions),
        missed_calls=calls.missed_calls,
        outgoing_realtime=calls.outgoing_realtime,
        internal_calls=calls.internal_calls,
        numbers=settings.number_rules(),
        recording_variable=calls.recording_variable,
        summary_wait=calls.summary_wait,
        domains=calls.domains,
    )


def recording_links(settings: Settings) -> RecordingLinks | None:
    """Links for ``FILES``; None when ``[webapi] public_url`` is not set (no links)."""
    web = settings.webapi
    if not web.public_url:
        return None
    return RecordingLinks(
        web.public_url, str(web.recordings_dir), mode=web.recording_auth,
        secret=web.recording_key(), shared_token=web.token, mp3=web.convert_to_mp3,
        domains=settings.calls.domains,
    )


def new_item(event: CrmEvent, links: RecordingLinks | None,
             read_at: float | None = None) -> NewItem:
    """The outbox row for one CC360 event.

    ``read_at``: when the connector read the FreeSWITCH event that produced it (its own
    clock). A popup's age (``realtime_ttl``) counts from then, never from FreeSWITCH's
    timestamp: the two clocks need not agree.
    """
    link = None
    if links is not None:
        def link(path: str) -> str:
            url = links.url_for(path)
            if url is None:
                log.warning("recording.outside_dir call=%s path=%s: not linked "
                            "(check [webapi] recordings_dir)", event.call_id, path)
                return ""
            return url
    request = request_for(event, link)
    if request.body and "FILES" in request.body:
        request.body["FILES"] = [url for url in request.body["FILES"] if url]
    event_at = read_at if read_at is not None and event.realtime else event.at
    return NewItem(call_key=event.call_id, kind=event.kind, request=request, user=event.user,
                   callerid=event.callerid, event_at=event_at)


def crm_client(settings: Settings, lanes: int | None = None) -> Cc360Client:
    crm = settings.crm
    return Cc360Client(
        crm.url, crm.token, auth=crm.auth, login=crm.login, password=crm.password,
        timeout=crm.timeout, verify=crm.requests_verify,
        lanes=lanes or settings.delivery.concurrency,
    )


class _Pauser:
    """Yields to the hub once more than :data:`GAP_SLICE` of work went by since the last
    yield. ``gevent.idle()``, not ``sleep(0)``: the latter runs the queued callbacks and
    comes back before the hub polls its sockets, so the ESL reader would still wait."""

    def __init__(self) -> None:
        self._since = time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self._since >= GAP_SLICE:
            gevent.idle()
            self._since = time.monotonic()


@dataclass
class _Spool:
    """CC360 events produced but not yet committed to the outbox, in order."""

    items: collections.deque[NewItem] = field(default_factory=collections.deque)
    wake: gevent.event.Event = field(default_factory=gevent.event.Event)
    dropped: int = 0


class Service:
    """The running connector. ``start()``, then ``stop()`` (or :func:`run` for both)."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = Metrics()
        self.tracker = CallTracker(tracker_config(settings))
        self.clock_offset = ClockOffset()
        self.links = recording_links(settings)
        #: the outbox is PostgreSQL shared by several nodes, with a local journal for
        #: when it is unreachable (fs_cc360/outbox_journal.py)
        self.shared = is_postgresql(settings.outbox.database)
        self.outbox = OutboxWriter(settings.outbox.database,
                                   synchronous=settings.outbox.synchronous,
                                   node=settings.outbox.node or None,
                                   password=settings.outbox.password or None,
                                   journal=settings.outbox.journal if self.shared else None)
        self.outbox_ok = True
        #: a shared outbox: PostgreSQL answered the last probe (see health())
        self.postgresql_ok = True
        #: FreeSWITCH time of the last event read, kept across restarts (the catch-up
        #: after a start reads the CDR files of legs that ended since then).
        self.position = Position.next_to(
            settings.outbox.journal if self.shared
            else self.outbox.path)  # a shared outbox: the position is this node's, local
        #: The position when the connection was last lost (or when the service started).
        self._gap_from = self.position.last_event_at
        self._gap_lock = gevent.lock.Semaphore()
        self._spool = _Spool()
        delivery = settings.delivery
        self.client = crm_client(settings)
        self.deliverer = Deliverer(
            self.outbox, self.client, concurrency=delivery.concurrency,
            realtime_ttl=delivery.realtime_ttl, max_rejections=delivery.max_rejections,
            lease_seconds=delivery.lease_seconds,
            backoff=BackoffPolicy(initial=delivery.backoff_initial, maximum=delivery.backoff_max),
            observer=self.metrics, clock=clock,
        )
        fs = settings.freeswitch
        self.esl = EslClient(
            fs.host, fs.port, fs.password, events=SUBSCRIBED_EVENTS,
            on_event=self._on_event, on_state=self._on_esl_state, on_job=self._on_job,
            on_connect=self._on_esl_connect,
            connect_timeout=fs.connect_timeout, backoff_max=fs.reconnect_max,
        )
        domains = settings.calls.domains
        template = settings.webapi.originate
        if domains and template == DEFAULT_ORIGINATE:
            template = TENANT_ORIGINATE  # a tenant's agents are dialled in its domain
        self.makecall = MakeCall(
            self.esl.bgapi, template=template, domain=domains[0] if domains else None,
            is_extension=lambda user: settings.extension_for(user) is not None,
            rules=settings.number_rules(),
            per_agent_seconds=settings.webapi.makecall_per_agent_seconds,
            metrics=self.metrics,
        )
        self.metrics.set_outbox_source(self._outbox_figures)
        self.metrics.watch_crm(lambda: not self.deliverer.crm_down)
        self.web_server = None
        #: the operator console (``[webapi] admin_token``), built by start()
        self.console: Console | None = None
        self._stop = gevent.event.Event()
        self._greenlets: list[gevent.Greenlet] = []

    # -- ESL side (runs in the ESL reader greenlet: nothing here may block) -------------

    def _on_event(self, event: ChannelEvent) -> None:
        self.metrics.esl_event()
        read_at = self.clock()
        self.position.heard(event.timestamp)
        changed = self.clock_offset.observe(event.timestamp, read_at)
        if changed is not None:
            self.metrics.clock(self.clock_offset.offset, changed)
        self._accept(self.tracker.feed(event, now=read_at), read_at)

    def _on_job(self, job_uuid: str, body: str) -> None:
        self.makecall.on_job_result(job_uuid, body)

    def _on_esl_state(self, connected: bool) -> None:
        self.metrics.esl_state(connected)
        if not connected:
            self._gap_from = self.position.last_event_at

    # -- after a gap (own greenlet: ESL reading and delivery go on meanwhile) -------------

    def _on_esl_connect(self, reconnect: bool) -> None:
        """After every (re)connect: the calls up get their popups, the legs that ended
        while nobody listened close theirs, and calls wholly over reach the CRM's history
        from the CDR files. One at a time (a reconnect during a catch-up waits)."""
        with self._gap_lock:
            try:
                self._after_gap("reconnect" if reconnect else "start", self._gap_from)
            except Exception:  # a bug here must not cost the live stream anything
                log.exception("gap.failed")

    def _after_gap(self, reason: str, before: float | None) -> None:
        started = time.monotonic()
        settings = self.settings.backfill
        since = (before or self.clock()) - settings.margin  # FreeSWITCH's clock
        pause = _Pauser()
        open_before = self.tracker.open_legs()
        dumps = self._live_channels()
        legs: list = []
        bad: list[tuple[str, str]] = []
        if settings.cdr_dir is not None:
            offset = self.clock_offset.offset or 0.0
            try:
                legs, bad = recent_cdrs(
                    settings.cdr_dir, ended_after_us=int(since * 1_000_000),
                    modified_after=since + offset - settings.margin,
                    pause=pause)
            except FsCc360Error as exc:
                log.error("catchup.failed dir=%s error=%s: calls that ended while fs-cc360 "
                          "was not listening are not reported; check [backfill] cdr_dir "
                          "and that fs-cc360 may read it", settings.cdr_dir, exc)
            for name, why in bad:
                log.warning("catchup.bad_file file=%s error=%s", name, why)
        read_at = self.clock()
        plan = plan_gap(
            dumps or [], legs,
            open_legs=(open_before & self.tracker.open_legs()) if dumps is not None else set(),
            knows=self.tracker.knows,
            now_us=int((read_at - (self.clock_offset.offset or 0.0)) * 1_000_000))
        for call in plan.live:  # one call at a time, the hub free to read ESL between
            read_at = self.clock()
            found: list[CrmEvent] = []
            for event in call.history(plan.now_us):  # the past: never a new popup
                found += [e for e in self.tracker.feed(event, now=read_at)
                          if e.kind in ("hangup", "summary")]
                pause()
            for event in call.present(self.tracker.knows):
                # live events may have come meanwhile (pause): what they told stands
                if self.tracker.completed(event.uuid) or (
                        event.name == "CHANNEL_DATA" and self.tracker.knows(event.uuid)):
                    continue
                found += self.tracker.feed(event, now=read_at)
                pause()
            # A restarted connector does not remember the popups it sent: the outbox does.
            self._accept([e for e in found if not self._held(e)], read_at)
        enqueued = duplicates = 0
        for call in plan.catch_up:
            pause()
            for summary in summaries_from_legs(call, self.tracker.config):
                if self._held(summary):
                    duplicates += 1
                    continue
                enqueued += 1
                self._accept([summary])
        seconds = time.monotonic() - started
        self.metrics.gap(reason, seconds, seeded=plan.seeded, closed=len(plan.closed_blind),
                         enqueued=enqueued, duplicates=duplicates)
        log.info("gap.caught_up reason=%s since=%.0f channels=%s seeded=%d ended_in_gap=%d "
                 "closed_without_cdr=%d calls_over=%d summaries=%d duplicates=%d "
                 "bad_files=%d seconds=%.2f", reason, since,
                 len(dumps) if dumps is not None else "unknown", plan.seeded,
                 len(legs), len(plan.closed_blind), len(plan.catch_up), enqueued, duplicates,
                 len(bad), seconds)

    def _held(self, event: CrmEvent) -> bool:
        """Whether the outbox already holds this call's event of that kind."""
        try:
            return self.outbox.has_request(event.call_id, event.kind)
        except OutboxError:
            return False  # the outbox keeps one summary per call anyway

    def _live_channels(self) -> list[dict[str, str]] | None:
        """``uuid_dump`` of every channel up now; None when FreeSWITCH could not say."""
        try:
            uuids = channel_uuids(self.esl.api("show channels as json"))
        except (EslError, ResyncError) as exc:
            log.warning("resync.failed error=%s: calls up now get their popups from their "
                        "next event only", exc)
            return None
        if len(uuids) > MAX_RESYNC_CHANNELS:
            log.warning("resync.truncated channels=%d: only the newest %d are resynchronised",
                        len(uuids), MAX_RESYNC_CHANNELS)
            uuids = uuids[-MAX_RESYNC_CHANNELS:]
        dumps: list[dict[str, str]] = []
        for uuid in uuids:
            try:
                headers = dump_headers(self.esl.api(f"uuid_dump {uuid} json"))
            except EslCommandError:
                continue  # hung up meanwhile: its events tell the rest
            except ResyncError as exc:
                log.warning("resync.bad_dump uuid=%s error=%s", uuid, exc)
                continue
            except EslError as exc:
                log.warning("resync.failed error=%s: calls up now get their popups from "
                            "their next event only", exc)
                return None
            if headers:
                dumps.append(headers)
        return dumps

    def _accept(self, events: list[CrmEvent], read_at: float | None = None) -> None:
        if not events:
            return
        spool = self._spool
        for event in events:
            self.metrics.crm_event(event.kind)
            log.info("crm.event call=%s kind=%s user=%s callerid=%s%s", event.call_id,
                     event.kind, event.user, event.callerid,
                     f" direction={event.direction} duration={event.duration}"
                     f" files={len(event.files)}" if event.kind == "summary" else "")
            spool.items.append(new_item(event, self.links, read_at))
        while len(spool.items) > SPOOL_LIMIT:
            lost = spool.items.popleft()
            spool.dropped += 1
            log.error("outbox.spool_overflow dropped call=%s kind=%s: the outbox has been "
                      "unwritable too long", lost.call_key, lost.kind)
        spool.wake.set()

    # -- background greenlets ------------------------------------------------------------

    def _commit_loop(self) -> None:
        """Write the spool to the outbox in batches; retry (never drop) while it fails.

        Everything spooled while one commit runs goes into the next: under load one fsync
        covers many events. After ``stop()`` a failing outbox gets a few quick tries more,
        then what is left is reported as lost (there is nowhere else to keep it).
        """
        spool = self._spool
        delay = 0.5
        tries_after_stop = 0
        while True:
            if not spool.items:
                if self._stop.is_set():
                    return
                spool.wake.clear()
                spool.wake.wait(TICK_SECONDS)
                continue
            batch = list(itertools.islice(spool.items, self.outbox.max_batch))
            try:
                self.outbox.enqueue(batch)
            except OutboxError as exc:
                if self.outbox_ok:
                    log.error("outbox.unwritable pending=%d error=%s: events are held in "
                              "memory and retried", len(spool.items), exc)
                self._set_outbox_ok(False)
                if self._stop.is_set():
                    tries_after_stop += 1
                    if tries_after_stop > 5:
                        return
                    gevent.sleep(0.1)
                else:
                    self._stop.wait(delay)
                    delay = min(delay * 2, 10.0)
                continue
            for _ in batch:
                spool.items.popleft()
            if not self.outbox_ok:
                log.warning("outbox.writable_again committed=%d", len(batch))
            self._set_outbox_ok(True)
            self.metrics.outbox_journal.set(self.outbox.journaled)
            delay = 0.5
            self.deliverer.notify()

    def _outbox_figures(self) -> object:
        """For each /metrics scrape: the journal gauge (no database needed), then the
        outbox's counts (raises while PostgreSQL is down: the last values stay)."""
        self.metrics.outbox_journal.set(self.outbox.journaled)
        return self.outbox.stats(self.clock())

    def _set_outbox_ok(self, ok: bool) -> None:
        self.outbox_ok = ok
        self.metrics.outbox_writable.set(1 if ok else 0)

    def _tick_loop(self) -> None:
        last_health = 0.0
        last_purge = 0.0
        while not self._stop.wait(TICK_SECONDS):
            now = self.clock()
            self.metrics.clock(self.clock_offset.offset, self.clock_offset.skewed)
            try:
                self._accept(self.tracker.tick(now), now)
            except Exception:  # a rule bug must not stop the service
                log.exception("calls.tick_failed")
            if now - last_health >= HEALTH_SECONDS:
                last_health = now
                self._probe_outbox()
                if self.position.dirty:
                    gevent.get_hub().threadpool.spawn(self.position.save)
            if now - last_purge >= 3600:
                last_purge = now
                self._purge(now)

    def _probe_outbox(self) -> None:
        try:
            self.outbox.check_writable()  # a shared outbox: also moves the journal
        except OutboxError as exc:
            self.metrics.outbox_journal.set(self.outbox.journaled)
            if self.shared:
                # rows still commit to the journal: only PostgreSQL is unhealthy
                if self.postgresql_ok:
                    log.error("outbox.postgresql_unhealthy journaled=%d error=%s",
                              self.outbox.journaled, exc)
                self.postgresql_ok = False
                return
            if self.outbox_ok:
                log.error("outbox.unwritable error=%s", exc)
            self._set_outbox_ok(False)
            return
        self.metrics.outbox_journal.set(self.outbox.journaled)
        if self.shared and not self.postgresql_ok:
            log.warning("outbox.postgresql_healthy again")
        self.postgresql_ok = True
        if not self._spool.items:
            self._set_outbox_ok(True)

    def _purge(self, now: float) -> None:
        older_than = now - self.settings.outbox.retention_days * 86400
        try:
            purged = self.outbox.purge_delivered(older_than)
        except OutboxError as exc:
            log.warning("outbox.purge_failed error=%s", exc)
            return
        if purged:
            log.info("outbox.purged delivered=%d", purged)

    @property
    def spooled(self) -> int:
        """CC360 events produced but not yet committed to the outbox."""
        return len(self._spool.items)

    def health(self) -> dict[str, bool]:
        """``outbox``: every event is committed somewhere (outbox or journal);
        ``postgresql`` (a shared outbox only): reachable and nothing left in the journal,
        i.e. this node's rows are where every node can deliver them."""
        state = {"esl": bool(self.esl.connected), "outbox": self.outbox_ok}
        if self.shared:
            state["postgresql"] = self.postgresql_ok and not self.outbox.journaled
        return state

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        web = self.settings.webapi
        if web.enabled:
            from fs_cc360.webapi import make_app, serve

            converter = Mp3Converter() if web.convert_to_mp3 else None
            # Serving needs the link rules even when summaries carry no links; without a
            # key nothing can verify (a random one), never a guessable placeholder.
            links = self.links or RecordingLinks(
                web.public_url or "http://localhost", str(web.recordings_dir),
                mode=web.recording_auth, secret=web.recording_key() or os.urandom(32),
                shared_token=web.token or secrets.token_urlsafe(32),
                domains=self.settings.calls.domains)
            if web.admin_token:
                from fs_cc360.console import build_console

                self.console = build_console(self)
            app = make_app(token=web.token, makecall=self.makecall, links=links,
                           health=self.health, metrics=self.metrics,
                           metrics_token=web.metrics_token, cors_origins=web.cors_origins,
                           converter=converter, console=self.console)
            self.web_server = serve(
                app, web.address, max_connections=web.max_connections,
                certfile=web.tls_cert, keyfile=web.tls_key)
        self._greenlets = [
            gevent.spawn(self._commit_loop),
            gevent.spawn(self._tick_loop),
            gevent.spawn(self.deliverer.run, self._stop),
        ]
        self.esl.start()
        log.info("service.started freeswitch=%s:%s crm=%s auth=%s outbox=%s",
                 self.settings.freeswitch.host, self.settings.freeswitch.port,
                 self.settings.crm.url or "-", self.settings.crm.auth, self.outbox.path)

    def stop(self, timeout: float = 20.0) -> None:
        """Graceful stop: stop reading ESL, save what is in flight, finish or release
        deliveries, close the database."""
        log.info("service.stopping")
        self.esl.stop()
        if self.web_server is not None:
            self.web_server.stop(timeout=2)
        if self.console is not None:
            self.console.close()
        # Summaries still waiting for a partner leg go out now rather than never.
        self._accept(self.tracker.flush(), self.clock())
        self._stop.set()
        self._spool.wake.set()
        gevent.joinall(self._greenlets, timeout=timeout)
        for greenlet in self._greenlets:
            if not greenlet.dead:
                log.warning("service.stop_timeout greenlet=%s: killed", greenlet)
                greenlet.kill(block=True, timeout=2)
        if self._spool.items:
            log.error("service.unsaved events=%d: the outbox was unwritable at shutdown",
                      len(self._spool.items))
        self.outbox.close()
        self.client.close()
        self.position.save()
        log.info("service.stopped")


def run(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT, then stop gracefully (``fs-cc360 run``)."""
    service = Service(settings)
    stopping = gevent.event.Event()

    def on_signal(*_: object) -> None:
        if not stopping.is_set():
            log.info("service.signal: stopping")
            stopping.set()

    gevent.signal_handler(signal.SIGTERM, on_signal)
    gevent.signal_handler(signal.SIGINT, on_signal)
    service.start()
    stopping.wait()
    service.stop()
    return 0
