"""Prometheus metrics of one fs-cc360 process, kept in one registry object.

No collector is registered in prometheus-client's global ``REGISTRY``: every
:class:`Metrics` owns its ``CollectorRegistry``, so tests (and two services in one
process) never see each other's numbers. The other modules get the object injected
and call its small verbs (``esl_state``, ``crm_event``, ``delivered``...); only
``render()`` produces the text the ``/metrics`` route serves.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from fs_cc360.crm_request import HISTORY_ENDPOINT, RINGING_ENDPOINT

log = logging.getLogger(__name__)

#: Delivery latency buckets (seconds): a CC360 request takes tens of ms when healthy,
#: seconds when the CRM struggles; the top buckets catch timeouts.
DELIVERY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: ``set_outbox`` keys that are not a row count per status.
_OLDEST_KEYS = ("oldest_pending_seconds", "oldest_pending_age", "oldest_age", "oldest")
_WRITABLE_KEYS = ("writable", "outbox_writable")
_NESTED_KEYS = ("counts", "by_status", "rows")
_NOT_STATUS = {"total", *_OLDEST_KEYS, *_WRITABLE_KEYS, *_NESTED_KEYS}
_NOT_SUFFIX = ("_at", "_seconds", "_age")

#: ``fs_cc360_makecall_total`` results: request outcomes, then originate job outcomes.
MAKECALL_RESULTS = (
    "accepted", "invalid", "forbidden", "limited", "unavailable", "error", "originated", "failed",
)
CRM_KINDS = ("ringing", "answer", "hangup", "summary")

_LABEL_SAFE = re.compile(r"[^A-Za-z0-9_.:-]+")


def _label(value: object, *, default: str = "none", limit: int = 48) -> str:
    """A label value that cannot explode cardinality with free text or be empty."""
    text = "" if value is None else str(value)
    text = _LABEL_SAFE.sub("_", text)[:limit]
    return text or default


class Metrics:
    """The process's collectors; see the module docstring.

    The verbs never raise: a metrics mistake must not break call handling.
    """

    def __init__(
        self,
        *,
        delivery_buckets: tuple[float, ...] = DELIVERY_BUCKETS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock  #: wall clock, to turn ``oldest_pending_at`` into an age
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.esl_connected = Gauge(
            "fs_cc360_esl_connected", "1 when the ESL connection to FreeSWITCH is up", registry=r
        )
        self.esl_events = Counter(
            "fs_cc360_esl_events_total", "Events read from FreeSWITCH", registry=r
        )
        self.crm_events = Counter(
            "fs_cc360_crm_events_total", "CC360 events produced by the call tracker", ["kind"],
            registry=r,
        )
        self.outbox_rows = Gauge(
            "fs_cc360_outbox_rows", "Outbox rows per status", ["status"], registry=r
        )
        self.outbox_oldest = Gauge(
            "fs_cc360_outbox_oldest_pending_seconds",
            "Age of the oldest pending outbox row (0 when none)", registry=r,
        )
        self.outbox_oldest_summary = Gauge(
            "fs_cc360_outbox_oldest_pending_summary_seconds",
            "Age of the oldest call summary not delivered yet (0 when none): popups expire, "
            "summaries wait for the CRM", registry=r,
        )
        self.outbox_writable = Gauge(
            "fs_cc360_outbox_writable", "1 when the outbox accepted its last write", registry=r
        )
        self.outbox_journal = Gauge(
            "fs_cc360_outbox_journal_rows",
            "Rows committed to the local journal while the shared PostgreSQL outbox was "
            "unreachable, not moved to it yet (0 with a SQLite outbox)", registry=r,
        )
        self.deliveries = Counter(
            "fs_cc360_deliveries_total",
            "CC360 delivery attempts by result and HTTP status ('none': no response)",
            ["result", "status"], registry=r,
        )
        self.crm_requests = Counter(
            "fs_cc360_crm_requests_total",
            "CC360 requests sent, by endpoint and HTTP status ('none': no response)",
            ["endpoint", "status"], registry=r,
        )
        self.crm_up = Gauge(
            "fs_cc360_crm_up",
            "0 while the delivery circuit is open (the last CC360 attempt failed: CRM down, "
            "timing out or refusing the login), else 1", registry=r,
        )
        self.delivery_seconds = Histogram(
            "fs_cc360_delivery_seconds", "Time of one CC360 request", buckets=delivery_buckets,
            registry=r,
        )
        self.makecalls = Counter(
            "fs_cc360_makecall_total",
            "Click-to-call requests and outcomes (accepted, invalid, forbidden, limited, "
            "unavailable, error, originated, failed)",
            ["result"], registry=r,
        )
        self.makecall_failures = Counter(
            "fs_cc360_makecall_failures_total",
            "Originate jobs FreeSWITCH answered with -ERR, by reason", ["reason"], registry=r,
        )
        self.gaps = Counter(
            "fs_cc360_gaps_total",
            "Connections to FreeSWITCH after which the calls up were resynchronised and the "
            "CDR files caught up, by reason (start, reconnect)", ["reason"], registry=r,
        )
        self.catchup_summaries = Counter(
            "fs_cc360_catchup_summaries_total",
            "Summaries of calls over during a gap, found in the CDR files, by result "
            "(enqueued, duplicate: the outbox already held it)", ["result"], registry=r,
        )
        self.resync_seeded = Counter(
            "fs_cc360_resync_channels_total",
            "Channels up at a (re)connect that the tracker had not heard of", registry=r,
        )
        self.resync_closed = Counter(
            "fs_cc360_resync_closed_legs_total",
            "Legs followed before a gap that ended during it without a CDR file", registry=r,
        )
        self.gap_seconds = Gauge(
            "fs_cc360_gap_catchup_seconds", "How long the last resync and catch-up took",
            registry=r,
        )
        self.clock_offset = Gauge(
            "fs_cc360_freeswitch_clock_offset_seconds",
            "How far FreeSWITCH's event clock is behind this host's (negative: ahead), "
            "smallest lag of its recent events", registry=r,
        )
        self.clock_skewed = Gauge(
            "fs_cc360_freeswitch_clock_skewed",
            "1 while FreeSWITCH's clock and this host's disagree by more than a few seconds",
            registry=r,
        )
        self.outbox_writable.set(1)
        self.crm_up.set(1)
        # Known label values start at 0 so rate() and absence alerts work from the start.
        for result in MAKECALL_RESULTS:
            self.makecalls.labels(result=result)
        for kind in CRM_KINDS:
            self.crm_events.labels(kind=kind)
        for result in ("enqueued", "duplicate"):
            self.catchup_summaries.labels(result=result)
        self._outbox_statuses: set[str] = set()
        self._outbox_source: Callable[[], Any] | None = None

    # -- ESL and tracker -------------------------------------------------------------

    def esl_state(self, connected: bool) -> None:
        self.esl_connected.set(1 if connected else 0)

    def gap(self, reason: str, seconds: float, *, seeded: int, closed: int, enqueued: int,
            duplicates: int) -> None:
        """One resync and catch-up after a (re)connect (:meth:`Service._after_gap`)."""
        self.gaps.labels(reason=_label(reason)).inc()
        self.gap_seconds.set(max(0.0, seconds))
        self.resync_seeded.inc(seeded)
        self.resync_closed.inc(closed)
        self.catchup_summaries.labels(result="enqueued").inc(enqueued)
        self.catchup_summaries.labels(result="duplicate").inc(duplicates)

    def esl_event(self, count: int = 1) -> None:
        self.esl_events.inc(count)

    def crm_event(self, kind: str) -> None:
        self.crm_events.labels(kind=_label(kind)).inc()

    def clock(self, offset: float | None, skewed: bool) -> None:
        """FreeSWITCH's clock offset (:class:`fs_cc360.clock.ClockOffset`)."""
        if offset is not None:
            self.clock_offset.set(offset)
        self.clock_skewed.set(1 if skewed else 0)

    # -- delivery --------------------------------------------------------------------

    def delivered(self, kind: str, status: int | None, seconds: float) -> None:
        """A CC360 request succeeded. ``kind`` is accepted for symmetry; the label set
        stays ``{result,status}`` as documented."""
        self.deliveries.labels(result="delivered", status=_label(status)).inc()
        self.crm_requests.labels(endpoint=_endpoint(kind), status=_label(status)).inc()
        self.delivery_seconds.observe(max(0.0, float(seconds)))

    def failed(
        self, kind: str, reason: str, status: int | None = None, seconds: float | None = None
    ) -> None:
        """A CC360 request failed; ``reason`` is a short word chosen by the caller
        (``retry``, ``dead``, ``auth``, ``timeout``...), never free text."""
        self.deliveries.labels(result=_label(reason, default="failed"), status=_label(status)).inc()
        if seconds is not None:  # a request was sent (not a row declared dead or expired)
            self.crm_requests.labels(endpoint=_endpoint(kind), status=_label(status)).inc()
            self.delivery_seconds.observe(max(0.0, float(seconds)))

    def watch_crm(self, is_up: Callable[[], bool]) -> None:
        """Read ``fs_cc360_crm_up`` from ``is_up()`` at every scrape (the Deliverer's
        circuit: ``lambda: not deliverer.crm_down``)."""
        self.crm_up.set_function(lambda: 1.0 if is_up() else 0.0)

    # -- makecall --------------------------------------------------------------------

    def makecall(self, result: str, reason: str | None = None) -> None:
        self.makecalls.labels(result=_label(result)).inc()
        if reason is not None:
            self.makecall_failures.labels(reason=_label(reason, default="unknown")).inc()

    # -- outbox ----------------------------------------------------------------------

    def set_outbox(self, stats: Mapping[str, Any] | Any) -> None:
        """Update the outbox gauges from ``Outbox.stats()`` (an ``OutboxStats``) or a mapping.

        Row counts come from a nested ``counts`` mapping (status -> rows, ``str`` enum
        keys fine) or, without one, from the top-level integers (``{"pending": 3}``).
        The oldest pending row's age is ``oldest_pending_seconds`` when given, else
        derived from ``oldest_pending_at`` (epoch seconds) and the clock; ``writable``
        is read when present. A status seen before and missing now is reported as 0.
        """
        data = _as_mapping(stats)
        nested = next((data[k] for k in _NESTED_KEYS if isinstance(data.get(k), Mapping)), None)
        source = nested if nested is not None else data
        counts: dict[str, float] = {}
        for key, value in source.items():
            name = _status(key)
            if _is_number(value) and name not in _NOT_STATUS and not name.endswith(_NOT_SUFFIX):
                counts[name] = float(value)
        age = next((data[k] for k in _OLDEST_KEYS if k in data), None)
        if age is None and "oldest_pending_at" in data:
            at = data["oldest_pending_at"]
            age = max(0.0, self._clock() - float(at)) if at else 0.0
        if age is not None or "oldest_pending_at" in data:
            self.outbox_oldest.set(max(0.0, float(age or 0)))
        if "oldest_summary_at" in data:
            at = data["oldest_summary_at"]
            self.outbox_oldest_summary.set(max(0.0, self._clock() - float(at)) if at else 0.0)
        for key in _WRITABLE_KEYS:
            if key in data:
                self.outbox_writable.set(1 if data[key] else 0)
        for status in self._outbox_statuses - counts.keys():
            self.outbox_rows.labels(status=status).set(0)
        for status, value in counts.items():
            self._outbox_statuses.add(status)
            self.outbox_rows.labels(status=status).set(value)

    def set_outbox_writable(self, writable: bool) -> None:
        self.outbox_writable.set(1 if writable else 0)

    def set_outbox_source(self, source: Callable[[], Any] | None) -> None:
        """Call ``source()`` at every ``render()`` and feed its result to ``set_outbox``.

        Keeps the outbox gauges fresh without a polling greenlet. An exception from
        ``source`` is logged and the previous values stay.
        """
        self._outbox_source = source

    def refresh(self) -> None:
        source = self._outbox_source
        if source is None:
            return
        try:
            self.set_outbox(source())
        except Exception:
            log.warning("metrics.outbox_source_failed", exc_info=True)

    # -- exposition ------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its Content-Type."""
        self.refresh()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _endpoint(kind: str) -> str:
    """The CC360 endpoint a row of ``kind`` is sent to (summaries: history; popups)."""
    return HISTORY_ENDPOINT if kind == "summary" else RINGING_ENDPOINT


def _status(key: object) -> str:
    """A status label from a plain string or a ``str`` enum member."""
    return _label(getattr(key, "value", key))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_mapping(stats: Mapping[str, Any] | Any) -> Mapping[str, Any]:
    if isinstance(stats, Mapping):
        return stats
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return dataclasses.asdict(stats)
    if hasattr(stats, "_asdict"):
        return stats._asdict()
    return dict(vars(stats))
