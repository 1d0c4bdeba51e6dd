"""The durable outbox: every CC360 request is committed here before any delivery attempt.

One row per CC360 request, ordered per call by ``call_key`` (the CC360 ``id``) and the
monotonic row ``id``. The delivery loop claims only the *head* of each key (its
lowest-id row that is not final yet), so ringing → answer → hangup → summary of one
call never overtake each other, while different calls go in parallel.

Row life cycle::

    enqueue ──> pending ──claim_due──> inflight ──mark_delivered──> delivered ──purge──> (gone)
                  ^  ^                    │  │
                  │  └──mark_retry────────┘  ├──mark_dead──> dead ─┐
                  │  (reclaim / release)     └──mark_expired──> expired
                  └──────────────requeue──────────────────────────┘

How claiming stays cheap with a million pending rows: each row carries ``is_head``,
kept true for exactly one non-final row per key (the lowest id) by every write that
changes which row that is (enqueue, a row becoming final, requeue). A *partial* index
on ``(next_attempt_at, id) WHERE status = 'pending' AND is_head = 1`` then holds only
claimable heads in due order, so ``claim_due`` reads ``limit`` index entries and stops;
the followers of a call (which are pending and "due" too) are never visited. The
partial-index conditions are written as SQL literals on purpose: SQLite only uses a
partial index when the query repeats its condition with the same constants, never with
bound parameters.

Outcomes are recorded in batches: :meth:`Outbox.mark_many` writes any number of
:class:`Mark` s in one transaction and :meth:`Outbox.mark_and_claim` then claims the next
heads in the same call, so a busy delivery loop pays one round trip (and at most one
fsync) per refill instead of one transaction + fsync per delivered row.

Durability (``synchronous``), which write pays an fsync and why that is enough:

* ``enqueue`` commits at the configured level (``FULL`` by default): a committed row is
  never lost, and the service acknowledges nothing before that commit.
* Every transaction that *claims* rows (``claim_due``, the claim of ``mark_and_claim``)
  also commits at the configured level, before any claimed row is sent.
* Transactions that only *record outcomes* (``mark_*``, ``mark_many``) commit with
  ``synchronous=NORMAL`` when the database is in WAL mode and the configured level is
  higher. In WAL mode NORMAL keeps every commit atomic and consistent (a process crash
  or ``kill -9`` loses nothing: the frames are in the OS's page cache); only a power
  failure or OS crash may roll back the last such commits. The WAL is one append-only
  file, so the fsync of any later FULL commit (an enqueue or a claim, of this process or
  another) makes every earlier frame durable too. Hence: a call's next row becomes
  claimable only when its previous row's final mark commits, it is claimed by a FULL
  commit, and that commit hardens the mark before the next row is sent. A mark lost to
  a power failure therefore only puts its row back in flight (released at start-up and
  sent again: at-least-once, the same as a crash between send and mark), never loses a
  row and never lets a call's later row reach the CRM before an earlier one is sent.
  Outside WAL mode every write uses the configured level.

:class:`Outbox` is plain synchronous code (the CLI uses it directly while the service
runs, WAL lets both work at once). :class:`OutboxWriter` puts one behind a single
native thread for the gevent service; see its docstring.
"""

from __future__ import annotations

import enum
import heapq
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

import gevent
import peewee
from gevent.event import AsyncResult
from gevent.monkey import get_original
from gevent.threadpool import ThreadPool

from fs_cc360.crm_request import CrmRequest
from fs_cc360.errors import OutboxError

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA_VERSION = 1
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
#: Rows fetched per query by :meth:`Outbox.list_rows` and deleted per transaction by purge.
PAGE_SIZE = 500
PURGE_BATCH = 1000


class OutboxStatus(str, enum.Enum):  # noqa: UP042 (StrEnum is 3.11+, we support 3.10)
    """Where a row is in its life cycle (``str`` so it prints and serialises as its value)."""

    pending = "pending"  #: waiting for its turn (its key's head) and its next_attempt_at
    inflight = "inflight"  #: claimed by a deliverer, protected by ``lease_until``
    delivered = "delivered"  #: the CRM accepted it (final)
    dead = "dead"  #: the CRM rejected it for good (final, kept for ``requeue``)
    expired = "expired"  #: a realtime event whose turn came too late (final)

    def __str__(self) -> str:
        return self.value

    @property
    def final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({OutboxStatus.delivered, OutboxStatus.dead, OutboxStatus.expired})
_OPEN = "('pending', 'inflight')"  # SQL literal: the non-final statuses


@dataclass(frozen=True)
class NewItem:
    """One request to enqueue."""

    call_key: str  #: the CC360 ``id``; rows of one key are delivered in enqueue order
    kind: str  #: ``ringing`` / ``answer`` / ``hangup`` / ``summary``
    request: CrmRequest
    user: str = ""  #: denormalised for listing
    callerid: str = ""  #: denormalised for listing
    event_at: float | None = None  #: FreeSWITCH time of the event (realtime TTL counts from it)


@dataclass(frozen=True)
class Row:
    """A snapshot of one outbox row (never the live peewee model)."""

    id: int
    call_key: str
    kind: str
    user: str
    callerid: str
    request: str  #: JSON text of :meth:`CrmRequest.to_json`
    status: OutboxStatus
    attempts: int  #: failed attempts so far (reset by requeue)
    rejections: int  #: of which permanent 4xx rejections
    next_attempt_at: float
    lease_until: float | None
    last_status: int | None  #: last HTTP status seen
    last_error: str | None
    created_at: float
    updated_at: float
    delivered_at: float | None
    event_at: float | None
    #: the connector (``[outbox] node``) that enqueued it; "" in a SQLite outbox (one node)
    node: str = ""

    def crm_request(self) -> CrmRequest:
        return CrmRequest.from_json(self.request)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (``status`` as its string value)."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["status"] = self.status.value
        return data


@dataclass(frozen=True)
class OutboxStats:
    """Counts and times an operator (``outbox stats``) or a metrics scrape needs."""

    counts: dict[OutboxStatus, int] = field(default_factory=dict)  #: every status, 0 if none
    by_kind: dict[tuple[OutboxStatus, str], int] = field(default_factory=dict)
    total: int = 0
    oldest_pending_at: float | None = None  #: created_at of the oldest pending/inflight row
    next_due_at: float | None = None  #: earliest next_attempt_at of a claimable head
    last_delivered_at: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    #: created_at of the oldest pending/inflight summary (popups expire; summaries wait)
    oldest_summary_at: float | None = None
    #: node -> status -> rows (a shared PostgreSQL outbox only; empty for SQLite)
    by_node: dict[str, dict[OutboxStatus, int]] = field(default_factory=dict)

    def count(self, status: OutboxStatus | str) -> int:
        return self.counts.get(OutboxStatus(status), 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": {status.value: n for status, n in self.counts.items()},
            "by_kind": [
                {"status": status.value, "kind": kind, "count": n}
                for (status, kind), n in sorted(self.by_kind.items())
            ],
            "total": self.total,
            "oldest_pending_at": self.oldest_pending_at,
            "next_due_at": self.next_due_at,
            "last_delivered_at": self.last_delivered_at,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "oldest_summary_at": self.oldest_summary_at,
            **({"by_node": {node: {status.value: n for status, n in counts.items()}
                            for node, counts in sorted(self.by_node.items())}}
               if self.by_node else {}),
        }


@dataclass(frozen=True)
class Attempt:
    """One recorded outcome of a row: its delivery history (table ``outbox_attempt``).

    ``outcome`` is ``delivered``, ``retry``, ``dead``, ``expired`` (never sent: too
    late), ``reclaimed`` (its deliverer stopped mid-send: sent again) or ``requeued``
    (an operator's retry). ``status`` is the CRM's HTTP status, None without an answer.
    """

    row_id: int
    at: float
    outcome: str
    status: int | None
    error: str | None


@dataclass(frozen=True)
class CallLine:
    """One call (one ``call_key``: an agent's part of a call) found by a search."""

    call_key: str
    rows: tuple[Row, ...]  #: every row of the call, oldest first

    @property
    def last_id(self) -> int:
        return self.rows[-1].id


@dataclass(frozen=True)
class CallPage:
    """A page of :meth:`Outbox.search_calls`, newest call first."""

    calls: list[CallLine]
    #: pass as ``before_id`` for the next page; None: this was the last one
    next_before: int | None


class _AutoIncrementField(peewee.AutoField):
    """``INTEGER PRIMARY KEY AUTOINCREMENT``: SQLite never reuses an id, even after the
    newest rows are purged, so ids stay monotonic (``playhouse.sqlite_ext`` has the same)."""

    def ddl(self, ctx: Any) -> Any:
        return peewee.NodeList((super().ddl(ctx), peewee.SQL("AUTOINCREMENT")))


class OutboxEntry(peewee.Model):
    """Table ``outbox``: the unbound template; each :class:`Outbox` binds a subclass."""

    id = _AutoIncrementField()
    call_key = peewee.TextField()
    kind = peewee.TextField()
    user = peewee.TextField(default="")
    callerid = peewee.TextField(default="")
    request = peewee.TextField()
    status = peewee.TextField(default=OutboxStatus.pending.value)
    is_head = peewee.BooleanField(default=False)
    attempts = peewee.IntegerField(default=0)
    rejections = peewee.IntegerField(default=0)
    next_attempt_at = peewee.DoubleField()
    lease_until = peewee.DoubleField(null=True)
    last_status = peewee.IntegerField(null=True)
    last_error = peewee.TextField(null=True)
    created_at = peewee.DoubleField()
    updated_at = peewee.DoubleField()
    delivered_at = peewee.DoubleField(null=True)
    event_at = peewee.DoubleField(null=True)

    class Meta:
        table_name = "outbox"


class OutboxMeta(peewee.Model):
    """Table ``outbox_meta``: a few key/value facts (last error) kept O(1) to read."""

    key = peewee.TextField(primary_key=True)
    value = peewee.TextField(null=True)

    class Meta:
        table_name = "outbox_meta"


#: The columns of a SQLite outbox (``node`` only exists in a shared PostgreSQL one).
_ROW_FIELDS = tuple(name for name in Row.__dataclass_fields__ if name != "node")
_ROW_COLUMNS = ", ".join(f'"{name}"' for name in _ROW_FIELDS)
_STATUS_INDEX = _ROW_FIELDS.index("status")
_LEASE_INDEX = _ROW_FIELDS.index("lease_until")
_UPDATED_INDEX = _ROW_FIELDS.index("updated_at")


@dataclass(frozen=True)
class Mark:
    """One outcome to record for a claimed row (:meth:`Outbox.mark_many`).

    Build it with :meth:`delivered`, :meth:`retry`, :meth:`dead` or :meth:`expired`;
    they take the same arguments as the matching ``Outbox.mark_*`` method.
    """

    id: int
    status: OutboxStatus  #: delivered / dead / expired (final), or pending (a retry)
    at: float | None = None  #: when it happened (None: the outbox clock at commit)
    status_code: int | None = None
    error: str | None = None
    next_attempt_at: float | None = None  #: retries only
    rejected: bool = False  #: a 4xx rejection (``rejections + 1``)

    @classmethod
    def delivered(cls, id: int, status_code: int | None, now: float | None = None) -> Mark:
        return cls(id, OutboxStatus.delivered, now, status_code)

    @classmethod
    def retry(cls, id: int, next_attempt_at: float, error: str,
              status_code: int | None = None, *, rejected: bool = False,
              now: float | None = None) -> Mark:
        return cls(id, OutboxStatus.pending, now, status_code, error, next_attempt_at,
                   rejected)

    @classmethod
    def dead(cls, id: int, error: str, status_code: int | None = None, *,
             rejected: bool = False, now: float | None = None) -> Mark:
        return cls(id, OutboxStatus.dead, now, status_code, error, None, rejected)

    @classmethod
    def expired(cls, id: int, now: float | None = None) -> Mark:
        return cls(id, OutboxStatus.expired, now)


def mark_params(mark: Mark, at: float) -> tuple[Any, ...]:
    """The parameters of the UPDATE that records ``mark`` at ``at`` (both backends write
    the same columns in the same order)."""
    rejected = 1 if mark.rejected else 0
    status = mark.status
    if status is OutboxStatus.delivered:
        return (mark.status_code, at, at, mark.id)
    if status is OutboxStatus.pending:
        if mark.next_attempt_at is None:
            raise ValueError(f"a retry mark needs next_attempt_at: {mark}")
        return (rejected, mark.next_attempt_at, mark.error, mark.status_code, at, mark.id)
    if status is OutboxStatus.dead:
        return (rejected, mark.error, mark.status_code, at, mark.id)
    if status is OutboxStatus.expired:
        return (at, mark.id)
    raise ValueError(f"cannot mark a row {status}: {mark}")


@dataclass(frozen=True)
class Claimed:
    """What :meth:`Outbox.mark_and_claim` returns."""

    rows: list[Row]  #: the claimed rows, as claimed (``inflight``), earliest due first
    #: earliest ``next_attempt_at`` of a claimable head left after the claim (None: none)
    next_due_at: float | None


_MARK_SQL = {
    OutboxStatus.delivered: (
        "UPDATE outbox SET status = 'delivered', is_head = 0, lease_until = NULL, "
        "last_status = ?, delivered_at = ?, updated_at = ? WHERE id = ?"),
    OutboxStatus.pending: (
        "UPDATE outbox SET status = 'pending', lease_until = NULL, attempts = attempts + 1, "
        "rejections = rejections + ?, next_attempt_at = ?, last_error = ?, last_status = ?, "
        "updated_at = ? WHERE id = ?"),
    OutboxStatus.dead: (
        "UPDATE outbox SET status = 'dead', is_head = 0, lease_until = NULL, "
        "attempts = attempts + 1, rejections = rejections + ?, last_error = ?, "
        "last_status = ?, updated_at = ? WHERE id = ?"),
    OutboxStatus.expired: (
        "UPDATE outbox SET status = 'expired', is_head = 0, lease_until = NULL, "
        "updated_at = ? WHERE id = ?"),
}
_NEXT_DUE_SQL = ("SELECT MIN(next_attempt_at) FROM outbox INDEXED BY outbox_due "
                 "WHERE status = 'pending' AND is_head = 1")

# Index names are part of the schema; tests assert the claim uses ``outbox_due``.
_INDEXES = (
    # claimable heads in due order (see the module docstring)
    "CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at, id) "
    "WHERE status = 'pending' AND is_head = 1",
    # per-call lookups: head refresh, has_request, list by call
    "CREATE INDEX IF NOT EXISTS outbox_key ON outbox (call_key, id)",
    # listing by status newest first, oldest pending
    "CREATE INDEX IF NOT EXISTS outbox_status ON outbox (status, id)",
    # stats: GROUP BY status, kind reads only this index
    "CREATE INDEX IF NOT EXISTS outbox_status_kind ON outbox (status, kind)",
    # lease reclaim: only the few in-flight rows
    "CREATE INDEX IF NOT EXISTS outbox_lease ON outbox (lease_until) WHERE status = 'inflight'",
    # retention purge and last_delivered_at
    "CREATE INDEX IF NOT EXISTS outbox_delivered ON outbox (delivered_at) "
    "WHERE status = 'delivered'",
    # console search by caller number and by agent, newest first (search_calls)
    "CREATE INDEX IF NOT EXISTS outbox_callerid ON outbox (callerid, id)",
    "CREATE INDEX IF NOT EXISTS outbox_user ON outbox (user, id)",
    # dead / expired rows by when they became so (final_counts_since): only those rows
    "CREATE INDEX IF NOT EXISTS outbox_final ON outbox (updated_at, status, kind) "
    "WHERE status IN ('dead', 'expired')",
    # a row's delivery history (call timeline) and its purge
    "CREATE INDEX IF NOT EXISTS outbox_attempt_row ON outbox_attempt (row_id, id)",
)
#: The delivery history: one row per recorded outcome (see :class:`Attempt`). Plain DDL
#: (no model): it is only ever inserted in bulk and read by row id.
_TABLES = (
    "CREATE TABLE IF NOT EXISTS outbox_attempt (id INTEGER PRIMARY KEY, "
    "row_id INTEGER NOT NULL, at REAL NOT NULL, outcome TEXT NOT NULL, status INTEGER, "
    "error TEXT)",
)
_ATTEMPT_SQL = ("INSERT INTO outbox_attempt (row_id, at, outcome, status, error) "
                "VALUES (?, ?, ?, ?, ?)")
_OUTCOMES = {OutboxStatus.delivered: "delivered", OutboxStatus.pending: "retry",
             OutboxStatus.dead: "dead", OutboxStatus.expired: "expired"}
#: Rows a search reads at most for one page (a page may then hold fewer calls).
SEARCH_SCAN_ROWS = 20_000
# The console's reads. INDEXED BY: SQLite fails loudly rather than ever scan the table.
_SEARCH_SQL = {column: f"SELECT id, call_key FROM outbox INDEXED BY {index} "
                       f'WHERE "{column}" = ? AND id < ? ORDER BY id DESC LIMIT ?'
               for column, index in (("callerid", "outbox_callerid"), ("user", "outbox_user"),
                                     ("call_key", "outbox_key"))}
_HISTORY_SQL = ("SELECT row_id, at, outcome, status, error FROM outbox_attempt "
                "INDEXED BY outbox_attempt_row WHERE row_id IN ({marks}) ORDER BY at, id")
_FINAL_SQL = ("SELECT status, kind, COUNT(*) FROM outbox INDEXED BY outbox_final "
              "WHERE status IN ('dead', 'expired') AND updated_at >= ? GROUP BY status, kind")
_PER_MINUTE_SQL = ("SELECT CAST(delivered_at / 60 AS INTEGER) AS minute, COUNT(*) "
                   "FROM outbox INDEXED BY outbox_delivered WHERE status = 'delivered' "
                   "AND delivered_at >= ? AND delivered_at < ? GROUP BY minute")


_INSERT_SQL = (
    "INSERT INTO outbox (call_key, kind, user, callerid, request, status, is_head, attempts, "
    "rejections, next_attempt_at, created_at, updated_at, event_at) "
    "VALUES (?, ?, ?, ?, ?, 'pending', ?, 0, 0, ?, ?, ?, ?)"
)


def _bind_models(db: peewee.Database) -> tuple[type[OutboxEntry], type[OutboxMeta]]:
    """Subclasses of the templates bound to ``db``: two outboxes never share a model."""

    class Entry(OutboxEntry):
        class Meta:
            database = db
            table_name = "outbox"

    class Meta_(OutboxMeta):
        class Meta:
            database = db
            table_name = "outbox_meta"

    return Entry, Meta_


def _unmask_rollback(exc: BaseException) -> BaseException:
    """The error a failed rollback hides.

    On SQLITE_FULL or an I/O error SQLite rolls the transaction back by itself; peewee's
    own rollback then fails with "cannot rollback - no transaction is active", and that is
    what propagates, with the real cause (disk full, read-only) in ``__context__``.
    """
    for _ in range(5):
        if "no transaction is active" in str(exc) and exc.__context__ is not None:
            exc = exc.__context__
        else:
            break
    return exc


def _sqlite_error_of(exc: BaseException) -> BaseException:
    """The driver error peewee wrapped (first in ``args``, or up the context chain)."""
    seen: BaseException | None = _unmask_rollback(exc)
    for _ in range(5):
        if seen is None or isinstance(seen, sqlite3.Error):
            break
        first = seen.args[0] if seen.args else None
        seen = first if isinstance(first, BaseException) else (seen.__cause__ or seen.__context__)
    return seen if isinstance(seen, sqlite3.Error) else exc


def _explain(path: str, exc: BaseException) -> str:
    """An operator-facing message: which file, what is wrong, what to do."""
    orig = _sqlite_error_of(exc)
    code = getattr(orig, "sqlite_errorname", "") or ""
    text = str(orig)
    lowered = text.lower()
    if code.startswith("SQLITE_READONLY") or "readonly" in lowered or "read-only" in lowered:
        return (f"outbox {path} is read-only ({text}): check the permissions of the file, "
                "its -wal/-shm files and its directory")
    if code == "SQLITE_FULL" or "disk is full" in lowered:
        return f"outbox {path}: disk full ({text}): free space on that volume"
    if code.startswith("SQLITE_BUSY") or "locked" in lowered:
        return (f"outbox {path} is locked by another process ({text}): "
                "a long-running command may hold it; retry, or raise busy_timeout")
    if code.startswith("SQLITE_CANTOPEN") or "unable to open" in lowered:
        return (f"outbox {path} cannot be opened ({text}): check that the directory exists "
                "and is writable by this user")
    if code in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or "malformed" in lowered \
            or "not a database" in lowered:
        return (f"outbox {path} is corrupt or not an outbox database ({text}): "
                "move it aside and restore it from a backup")
    if code.startswith("SQLITE_IOERR") or "i/o error" in lowered:
        return f"outbox {path}: I/O error ({text}): check the disk and the kernel log"
    return f"outbox {path}: {type(orig).__name__}: {text}"


class Outbox:
    """The outbox in one SQLite database (file path or ``sqlite:///path`` URL).

    Every method is one short transaction (writes take ``BEGIN IMMEDIATE``, so a writer
    waits for the lock up front instead of failing at commit); nothing slow ever runs
    inside one. Errors from peewee or the driver come out as :class:`OutboxError` whose
    message names the file and what to do, with the caught error in ``.orig``.

    Threading: one SQLite connection per instance. Any number of greenlets of one
    thread may share it (no method yields to the hub); calls from several native threads
    are serialised by a native lock. For the gevent service use :class:`OutboxWriter`.
    """

    #: The console's search queries, by column (a backend names its own).
    _search_sql: dict[str, str] = _SEARCH_SQL

    def __init__(
        self,
        database: str,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 5000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        sync = str(synchronous).upper()
        if sync not in _SYNCHRONOUS:
            raise OutboxError(f"outbox synchronous={synchronous!r} is invalid: "
                              f"use one of {', '.join(_SYNCHRONOUS)}")
        self.synchronous = sync
        #: the level of outcome-only transactions (see the module docstring); set to
        #: NORMAL below once WAL mode is confirmed
        self.mark_synchronous = sync
        self._sync_now = sync  # the connection's current level
        self.busy_timeout_ms = int(busy_timeout_ms)
        self._clock = clock
        #: Summaries :meth:`enqueue` left out because their call already had one.
        self.summaries_skipped = 0
        #: The connector's name on its rows: "" here (a SQLite outbox has one node).
        self.node = ""
        pragmas = [
            ("journal_mode", "wal"),
            ("synchronous", sync),
            ("busy_timeout", self.busy_timeout_ms),
            ("foreign_keys", 1),
        ]
        options: dict[str, Any] = {
            "pragmas": pragmas,
            "timeout": self.busy_timeout_ms / 1000.0,
            "thread_safe": False,  # one connection per Outbox; see the class docstring
            "check_same_thread": False,  # OutboxWriter opens it in its own thread
        }
        self._db = self._open(database, options)
        self.path: str = self._db.database
        # A native lock even under monkey-patching: it is never held across a yield.
        self._lock = get_original("_thread", "RLock")()
        self._Entry, self._Meta = _bind_models(self._db)
        try:
            with self._errors():
                self._db.connect(reuse_if_open=True)
                self._create_schema()
                self._check_pragmas()
        except BaseException:
            self._db.close()
            raise

    @staticmethod
    def _open(database: str, options: dict[str, Any]) -> peewee.SqliteDatabase:
        if "://" not in database:
            return peewee.SqliteDatabase(database, **options)
        scheme = database.split("://", 1)[0].lower()
        if scheme != "sqlite":
            raise OutboxError(
                f"outbox database URL scheme {scheme!r} is not supported: "
                "use a file path or sqlite:///relative/path or sqlite:////absolute/path")
        from playhouse import db_url  # the edge: only URLs need playhouse

        try:
            db = db_url.connect(database, **options)
        except (RuntimeError, ValueError) as exc:
            raise OutboxError(f"outbox database URL {database!r} is invalid: {exc}",
                              orig=exc) from exc
        assert isinstance(db, peewee.SqliteDatabase)
        return db

    # -- plumbing ---------------------------------------------------------------------

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except OutboxError:
            raise
        except (peewee.PeeweeException, sqlite3.Error) as exc:
            cause = _unmask_rollback(exc)
            raise OutboxError(_explain(self.path, cause), orig=cause) from exc

    @contextmanager
    def _read(self) -> Iterator[None]:
        with self._lock, self._errors():
            yield

    @contextmanager
    def _write(self, synchronous: str | None = None) -> Iterator[None]:
        """A write transaction, committed at ``synchronous`` (default: the configured
        level). The level can only change outside a transaction, so it is set before
        ``BEGIN`` and put back after ``COMMIT``."""
        level = synchronous or self.synchronous
        with self._lock, self._errors():
            self._set_synchronous(level)
            try:
                with self._db.atomic("IMMEDIATE"):
                    yield
            finally:
                if level != self.synchronous:
                    # best effort: the next write sets its own level first anyway
                    with suppress(peewee.PeeweeException, sqlite3.Error):
                        self._set_synchronous(self.synchronous)

    def _set_synchronous(self, level: str) -> None:
        if level != self._sync_now:
            self._db.execute_sql(f"PRAGMA synchronous = {level}")
            self._sync_now = level

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    def _create_schema(self) -> None:
        version = self._db.execute_sql("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise OutboxError(
                f"outbox {self.path} has schema version {version}, newer than this "
                f"fs-cc360 understands ({SCHEMA_VERSION}): upgrade fs-cc360")
        with self._db.atomic("IMMEDIATE"):
            self._db.create_tables([self._Entry, self._Meta], safe=True)
            # Additive (schema version unchanged): an outbox from before the console gets
            # the attempt table and the search indexes here, once (a few seconds on a
            # million rows); an older fs-cc360 still opens it.
            for ddl in (*_TABLES, *_INDEXES):
                self._db.execute_sql(ddl)
            if version < SCHEMA_VERSION:
                self._db.execute_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _check_pragmas(self) -> None:
        mode = self._db.execute_sql("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() == "wal":
            # NORMAL is only safe to relax to in WAL mode (see the module docstring)
            if _SYNCHRONOUS.index(self.synchronous) > _SYNCHRONOUS.index("NORMAL"):
                self.mark_synchronous = "NORMAL"
        elif self.path != ":memory:":
            log.warning("outbox.no_wal path=%s journal_mode=%s", self.path, mode)

    def make_read_only(self) -> None:
        """Refuse every write on this connection from now on (the console's reader)."""
        with self._read():
            self._db.execute_sql("PRAGMA query_only = 1")

    def pragma(self, name: str) -> Any:
        """The current value of a SQLite pragma (for tests and ``check-config``)."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a pragma name: {name!r}")
        with self._read():
            row = self._db.execute_sql(f"PRAGMA {name}").fetchone()
        return row[0] if row else None

    def _row(self, data: dict[str, Any]) -> Row:
        values = {name: data[name] for name in _ROW_FIELDS}
        values["status"] = OutboxStatus(values["status"])
        return Row(**values)

    def _select(self) -> peewee.ModelSelect:
        entry = self._Entry
        return entry.select(*(getattr(entry, name) for name in _ROW_FIELDS))

    def _refresh_heads(self, keys: Iterable[str]) -> None:
        """Make ``is_head`` true for exactly the lowest-id non-final row of each key."""
        for key in set(keys):
            self._db.execute_sql(
                "UPDATE outbox SET is_head = (id IS (SELECT MIN(id) FROM outbox "
                f"  WHERE call_key = ?1 AND status IN {_OPEN})) "
                f"WHERE call_key = ?1 AND (is_head = 1 OR status IN {_OPEN})",
                (key,),
            )

    def _lock_keys(self, keys: Iterable[str]) -> None:
        """Serialise writers of these calls until commit (no-op: SQLite has one writer)."""

    def _insert_attempts(self, history: Sequence[tuple[Any, ...]]) -> None:
        """Rows of ``outbox_attempt``: (row_id, at, outcome, status, error) each."""
        self._db.cursor().executemany(_ATTEMPT_SQL, history)

    def _set_meta(self, key: str, value: str | None) -> None:
        self._Meta.insert(key=key, value=value).on_conflict_replace().execute()

    def _record_error(self, error: str, now: float) -> None:
        self._set_meta("last_error", error)
        self._set_meta("last_error_at", repr(now))

    # -- writes -----------------------------------------------------------------------

    def enqueue(self, items: Sequence[NewItem], *, now: float | None = None) -> list[int]:
        """Commit ``items`` in one transaction; returns their ids, in order.

        A call holds one summary, ever: a ``summary`` whose ``call_key`` already has one
        (in any status) is not written again, and its place in the returned list holds
        the existing row's id. The live tracker, the automatic CDR catch-up and a manual
        backfill may all find the same call; checked inside the write transaction, so
        two writers (processes) cannot both add it.
        """
        if not items:
            return []
        now = self._now(now)
        ids: list[int] = []
        with self._write():
            # Plain cursor calls (sqlite3 caches the two statements): peewee's query
            # building would cost more than the insert itself on a large batch.
            cursor = self._db.cursor()
            open_keys: set[str] = set()
            for item in items:
                if item.kind == "summary":
                    held = cursor.execute(
                        "SELECT id FROM outbox WHERE call_key = ? AND kind = 'summary' LIMIT 1",
                        (item.call_key,),
                    ).fetchone()
                    if held is not None:
                        log.info("outbox.summary_held call=%s id=%d: this call's summary is "
                                 "already in the outbox, not added again", item.call_key,
                                 held[0])
                        self.summaries_skipped += 1
                        ids.append(held[0])
                        continue
                if item.call_key in open_keys:
                    head = False
                else:
                    head = cursor.execute(
                        f"SELECT 1 FROM outbox WHERE call_key = ? AND status IN {_OPEN} LIMIT 1",
                        (item.call_key,),
                    ).fetchone() is None
                    open_keys.add(item.call_key)
                cursor.execute(_INSERT_SQL, (
                    item.call_key, item.kind, item.user or "", item.callerid or "",
                    item.request.to_json(), int(head), now, now, now, item.event_at))
                ids.append(cursor.lastrowid)
        return ids

    def claim_due(
        self,
        now: float,
        limit: int,
        lease_seconds: float,
        exclude_keys: Collection[str] = (),
    ) -> list[Row]:
        """Claim up to ``limit`` due heads, at most one per key, earliest due first.

        Claimed rows become ``inflight`` with ``lease_until = now + lease_seconds``; the
        returned snapshots show them as they were claimed. A key whose head is in flight,
        not due, or listed in ``exclude_keys`` yields nothing.
        """
        if limit <= 0:
            return []
        return self.mark_and_claim((), now, limit, lease_seconds, exclude_keys).rows

    def mark_and_claim(
        self,
        marks: Iterable[Mark],
        now: float,
        limit: int,
        lease_seconds: float,
        exclude_keys: Collection[str] = (),
    ) -> Claimed:
        """Record ``marks`` (as :meth:`mark_many`), then claim up to ``limit`` due heads
        (as :meth:`claim_due`), in one call: the delivery loop's one round trip per refill.

        The claim sees the marks: a call whose head was just marked final yields its next
        row at once. Two transactions, because they are committed at different levels
        (see the module docstring): the marks at ``mark_synchronous``, then the claim at
        the configured level, whose fsync also hardens the marks before anything claimed
        can be sent. Also returns the earliest due time left (the loop's sleep), unless
        ``limit`` is 0 (then only the marks are written).
        """
        marks = list(marks)
        exclude = list(exclude_keys)
        claim_sql = _claim_sql(len(exclude), _ROW_COLUMNS)
        params = [now, *exclude, limit]
        if marks:
            with self._write(self.mark_synchronous):
                self._apply_marks(marks)
        elif limit > 0:
            with self._read():  # the idle poll: answer "nothing due" without the write lock
                if self._db.execute_sql(claim_sql, params).fetchone() is None:
                    return Claimed([], self._next_due())
        if limit <= 0:
            return Claimed([], None)  # nothing claimed, nothing asked
        lease_until = now + lease_seconds
        try:
            with self._write():
                found = self._db.execute_sql(claim_sql, params).fetchall()
                if found:
                    self._db.execute_sql(
                        "UPDATE outbox SET status = 'inflight', lease_until = ?, "
                        f"updated_at = ? WHERE id IN ({', '.join('?' * len(found))})",
                        (lease_until, now, *(values[0] for values in found)))
                next_due = self._next_due()
        except OutboxError as exc:
            if not marks:
                raise
            # The marks are committed: raising would make the caller write them again.
            # Claim nothing now; the next claim meets (and reports) the problem.
            log.warning("outbox.claim_failed after marks=%d error=%s", len(marks), exc)
            return Claimed([], None)
        rows = []
        for values in found:
            data = list(values)
            data[_STATUS_INDEX] = OutboxStatus.inflight
            data[_LEASE_INDEX] = lease_until
            data[_UPDATED_INDEX] = now
            rows.append(Row(*data))
        return Claimed(rows, next_due)

    def _next_due(self) -> float | None:
        row = self._db.execute_sql(_NEXT_DUE_SQL).fetchone()
        return row[0] if row else None

    def mark_many(self, marks: Iterable[Mark], *, now: float | None = None) -> None:
        """Record several outcomes in ONE transaction (at ``mark_synchronous``: see the
        module docstring), in order. ``now`` stands in for a mark's missing ``at``."""
        marks = list(marks)
        if not marks:
            return
        with self._write(self.mark_synchronous):
            self._apply_marks(marks, now)

    def _apply_marks(self, marks: Sequence[Mark], now: float | None = None) -> None:
        """The writes of :meth:`mark_many` (inside a write transaction)."""
        default_at = self._now(now)
        cursor = self._db.cursor()
        final_keys: set[str] = set()
        error: tuple[str, float] | None = None
        history: list[tuple[Any, ...]] = []
        for mark in marks:
            at = default_at if mark.at is None else mark.at
            status = mark.status
            params = mark_params(mark, at)  # first: it refuses a status no UPDATE records
            cursor.execute(_MARK_SQL[status], params)
            if cursor.rowcount:
                history.append((mark.id, at, _OUTCOMES[status], mark.status_code, mark.error))
            if status in (OutboxStatus.pending, OutboxStatus.dead):
                error = (mark.error or "", at)
            if status.final:
                # the row stops blocking its key: the key's next row becomes its head
                key = cursor.execute("SELECT call_key FROM outbox WHERE id = ?",
                                     (mark.id,)).fetchone()
                if key is not None:
                    final_keys.add(key[0])
        if history:
            cursor.executemany(_ATTEMPT_SQL, history)
        if error is not None:
            self._record_error(*error)
        self._refresh_heads(final_keys)

    def mark_delivered(self, id: int, status_code: int | None, now: float | None = None) -> None:
        self.mark_many([Mark.delivered(id, status_code, now)])

    def mark_retry(
        self,
        id: int,
        next_attempt_at: float,
        error: str,
        status_code: int | None = None,
        *,
        rejected: bool = False,
        now: float | None = None,
    ) -> None:
        """A failed attempt: ``attempts + 1`` (and ``rejections + 1`` when the CRM said 4xx),
        back to ``pending`` until ``next_attempt_at``; the row stays its key's head."""
        self.mark_many([Mark.retry(id, next_attempt_at, error, status_code,
                                   rejected=rejected, now=now)])

    def mark_dead(
        self,
        id: int,
        error: str,
        status_code: int | None = None,
        *,
        rejected: bool = False,
        now: float | None = None,
    ) -> None:
        """Final failure: kept (for ``requeue``), no longer blocks its key."""
        self.mark_many([Mark.dead(id, error, status_code, rejected=rejected, now=now)])

    def mark_expired(self, id: int, now: float | None = None) -> None:
        """A realtime event whose turn came too late: final, never sent."""
        self.mark_many([Mark.expired(id, now)])

    def reclaim_expired_leases(self, now: float) -> int:
        """In-flight rows whose lease ended before ``now`` (their deliverer died) → pending.

        The interrupted attempt is not counted: it may or may not have reached the CRM,
        so the row is sent again (at-least-once delivery).
        """
        with self._read():  # usually none: skip the write lock
            if self._db.execute_sql(
                    "SELECT 1 FROM outbox INDEXED BY outbox_lease "
                    "WHERE status = 'inflight' AND lease_until < ? LIMIT 1",
                    (now,)).fetchone() is None:
                return 0
        with self._write():
            self._db.execute_sql(
                "INSERT INTO outbox_attempt (row_id, at, outcome, error) "
                "SELECT id, ?, 'reclaimed', 'lease expired before an outcome was recorded: "
                "sent again' FROM outbox INDEXED BY outbox_lease "
                "WHERE status = 'inflight' AND lease_until < ?", (now, now))
            cursor = self._db.execute_sql(
                "UPDATE outbox SET status = 'pending', lease_until = NULL, updated_at = ? "
                "WHERE id IN (SELECT id FROM outbox INDEXED BY outbox_lease "
                "  WHERE status = 'inflight' AND lease_until < ?)",
                (now, now),
            )
            count = cursor.rowcount
        if count:
            log.info("outbox.reclaimed count=%d", count)
        return count

    def release_leases(self, ids: Iterable[int] | None = None, *, now: float | None = None) -> int:
        """Give in-flight rows back (``ids``, or all of them at start-up) without an attempt.

        At start-up no delivery of ours can still be running, so every lease is stale.
        """
        now = self._now(now)
        entry = self._Entry
        with self._write():
            query = entry.update(status=OutboxStatus.pending.value, lease_until=None,
                                 updated_at=now).where(
                entry.status == OutboxStatus.inflight.value)
            if ids is not None:
                id_list = list(ids)
                if not id_list:
                    return 0
                query = query.where(entry.id.in_(id_list))
            return query.execute()

    def requeue(
        self,
        ids: Iterable[int] | None = None,
        statuses: Iterable[OutboxStatus | str] = (OutboxStatus.dead, OutboxStatus.expired),
        kinds: Iterable[str] | None = None,
        since: float | None = None,
        until: float | None = None,
        dry_run: bool = False,
        *,
        now: float | None = None,
    ) -> list[Row]:
        """Send matching final rows again: back to ``pending``, attempts reset, due now.

        Only dead and expired rows by default (``statuses`` may add ``delivered`` for a
        replay). ``since``/``until`` bound ``created_at``. Returns the matched rows as they
        were before (what would be requeued, with ``dry_run``). Per-call order holds: a
        requeued row has a lower id than any later row of its call, so it is the head again.
        """
        now = self._now(now)
        status_values = [OutboxStatus(s).value for s in statuses]
        if OutboxStatus.pending.value in status_values or \
                OutboxStatus.inflight.value in status_values:
            raise ValueError("requeue only takes final statuses (delivered, dead, expired)")
        entry = self._Entry
        query = self._select().where(entry.status.in_(status_values))
        if ids is not None:
            query = query.where(entry.id.in_(list(ids)))
        if kinds is not None:
            query = query.where(entry.kind.in_(list(kinds)))
        if since is not None:
            query = query.where(entry.created_at >= since)
        if until is not None:
            query = query.where(entry.created_at < until)
        matched: list[Row] = []
        after = 0
        while True:  # in bounded batches: each its own short transaction
            with (self._read() if dry_run else self._write()):
                batch = [self._row(data) for data in
                         query.where(entry.id > after).order_by(entry.id).limit(PAGE_SIZE).dicts()]
                if batch and not dry_run:
                    self._lock_keys(row.call_key for row in batch)
                    (entry.update(status=OutboxStatus.pending.value, attempts=0, rejections=0,
                                  next_attempt_at=now, lease_until=None, updated_at=now)
                     .where(entry.id.in_([row.id for row in batch])).execute())
                    self._insert_attempts([
                        (row.id, now, "requeued", None, f"was {row.status.value}: sent again")
                        for row in batch])
                    self._refresh_heads(row.call_key for row in batch)
            matched.extend(batch)
            if len(batch) < PAGE_SIZE:
                break
            after = batch[-1].id
        if matched and not dry_run:
            log.info("outbox.requeued count=%d", len(matched))
        return matched

    def purge_delivered(self, older_than: float) -> int:
        """Delete delivered rows with ``delivered_at < older_than``; pending rows never go."""
        total = 0
        while True:
            count = self.purge_delivered_batch(older_than, PURGE_BATCH)
            total += count
            if count < PURGE_BATCH:
                return total

    def purge_delivered_batch(self, older_than: float, limit: int) -> int:
        """One bounded purge transaction (so a big purge never blocks writers for long)."""
        with self._write():
            ids = [found[0] for found in self._db.execute_sql(
                "SELECT id FROM outbox INDEXED BY outbox_delivered "
                "WHERE status = 'delivered' AND delivered_at < ? LIMIT ?",
                (older_than, limit))]
            if not ids:
                return 0
            marks = ", ".join("?" * len(ids))
            # the rows' history goes with them (outbox_attempt_row: by row id)
            self._db.execute_sql(f"DELETE FROM outbox_attempt WHERE row_id IN ({marks})", ids)
            cursor = self._db.execute_sql(f"DELETE FROM outbox WHERE id IN ({marks})", ids)
            return cursor.rowcount

    # -- reads ------------------------------------------------------------------------

    def get(self, id: int) -> Row | None:
        entry = self._Entry
        with self._read():
            found = list(self._select().where(entry.id == id).dicts())
        return self._row(found[0]) if found else None

    def has_call_key(self, key: str) -> bool:
        with self._read():
            return self._db.execute_sql(
                "SELECT 1 FROM outbox WHERE call_key = ? LIMIT 1", (key,)).fetchone() is not None

    def has_request(self, call_key: str, kind: str) -> bool:
        """Whether a ``kind`` row of this call exists in any status (CDR backfill dedupe)."""
        with self._read():
            return self._db.execute_sql(
                "SELECT 1 FROM outbox WHERE call_key = ? AND kind = ? LIMIT 1",
                (call_key, kind)).fetchone() is not None

    def next_due_at(self) -> float | None:
        """When the earliest claimable head is due (the loop sleeps until then)."""
        with self._read():
            return self._next_due()

    def stats(self, now: float | None = None) -> OutboxStats:
        """Counts per status and kind plus a few times; reads indexes only."""
        del now  # accepted for symmetry with the other calls; the figures are absolute
        with self._read():
            by_kind: dict[tuple[OutboxStatus, str], int] = {}
            counts = {status: 0 for status in OutboxStatus}
            for status, kind, n in self._db.execute_sql(
                    "SELECT status, kind, COUNT(*) FROM outbox GROUP BY status, kind"):
                status = OutboxStatus(status)
                by_kind[(status, kind)] = n
                counts[status] += n
            oldest = [self._db.execute_sql(
                f"SELECT created_at FROM outbox WHERE status = '{status}' ORDER BY id LIMIT 1"
            ).fetchone() for status in ("pending", "inflight")]
            # (status, kind) index entries are in rowid order: one probe per status
            oldest_summary = [self._db.execute_sql(
                f"SELECT created_at FROM outbox INDEXED BY outbox_status_kind "
                f"WHERE status = '{status}' AND kind = 'summary' ORDER BY id LIMIT 1"
            ).fetchone() for status in ("pending", "inflight")]
            last_delivered = self._db.execute_sql(
                "SELECT MAX(delivered_at) FROM outbox INDEXED BY outbox_delivered "
                "WHERE status = 'delivered'").fetchone()
            next_due = self._db.execute_sql(
                "SELECT MIN(next_attempt_at) FROM outbox INDEXED BY outbox_due "
                "WHERE status = 'pending' AND is_head = 1").fetchone()
            meta = dict(self._db.execute_sql(
                "SELECT key, value FROM outbox_meta WHERE key IN ('last_error', 'last_error_at')"))
        oldest_times = [row[0] for row in oldest if row]
        summary_times = [row[0] for row in oldest_summary if row]
        return OutboxStats(
            counts=counts,
            by_kind=by_kind,
            total=sum(counts.values()),
            oldest_pending_at=min(oldest_times) if oldest_times else None,
            next_due_at=next_due[0] if next_due else None,
            last_delivered_at=last_delivered[0] if last_delivered else None,
            last_error=meta.get("last_error"),
            last_error_at=float(meta["last_error_at"]) if meta.get("last_error_at") else None,
            oldest_summary_at=min(summary_times) if summary_times else None,
        )

    def list_page(
        self,
        *,
        status: OutboxStatus | str | None = None,
        kind: str | None = None,
        call_key: str | None = None,
        since: float | None = None,
        until: float | None = None,
        before_id: int | None = None,
        limit: int = PAGE_SIZE,
    ) -> list[Row]:
        """One page of :meth:`list_rows`: rows with ``id < before_id``, newest first."""
        entry = self._Entry
        query = self._select()
        if status is not None:
            query = query.where(entry.status == OutboxStatus(status).value)
        if kind is not None:
            query = query.where(entry.kind == kind)
        if call_key is not None:
            query = query.where(entry.call_key == call_key)
        if since is not None:
            query = query.where(entry.created_at >= since)
        if until is not None:
            query = query.where(entry.created_at < until)
        if before_id is not None:
            query = query.where(entry.id < before_id)
        with self._read():
            return [self._row(data) for data in
                    query.order_by(entry.id.desc()).limit(limit).dicts()]

    def list_rows(
        self,
        status: OutboxStatus | str | None = None,
        kind: str | None = None,
        call_key: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = 100,
        before_id: int | None = None,
    ) -> Iterator[Row]:
        """Matching rows newest first, at most ``limit`` (None: all), fetched page by page
        (keyset on ``id``, so the table is never loaded and no read transaction stays open)."""
        filters = {"status": status, "kind": kind, "call_key": call_key,
                   "since": since, "until": until}
        return _paginate(lambda before, size: self.list_page(
            **filters, before_id=before, limit=size), limit, before_id)

    # -- reads for the operator console (each an indexed, bounded query) ---------------

    def search_calls(
        self,
        *,
        callerids: Collection[str] = (),
        users: Collection[str] = (),
        call_keys: Collection[str] = (),
        before_id: int | None = None,
        limit: int = 50,
    ) -> CallPage:
        """Calls with a row matching any of the given caller numbers, agents or call ids
        (exact values), newest first, ``limit`` per page.

        Each value is one range of its index (``outbox_callerid``, ``outbox_user``,
        ``outbox_key``) read newest first; the ranges are merged, and reading stops at
        ``limit + 1`` distinct calls or :data:`SEARCH_SCAN_ROWS` rows, so a page costs
        the same on a thousand rows or a million. Pages are keyed on row ids: a call
        already listed on an earlier page (it has a row at or above ``before_id``) is
        not listed again.
        """
        streams = [self._search_stream(column, value, before_id)
                   for column, values in (("callerid", callerids), ("user", users),
                                          ("call_key", call_keys))
                   for value in dict.fromkeys(values)]
        keys: list[str] = []
        seen: set[str] = set()
        next_before: int | None = None
        last_id: int | None = None
        scanned = 0
        for row_id, key in heapq.merge(*streams, key=lambda found: -found[0]):
            if row_id == last_id:
                continue  # the same row matched two values
            last_id = row_id
            scanned += 1
            if key not in seen:
                seen.add(key)
                if before_id is None or not self._has_row_from(key, before_id):
                    if len(keys) == limit:
                        next_before = row_id + 1  # this call starts the next page
                        break
                    keys.append(key)
            if scanned >= SEARCH_SCAN_ROWS:
                next_before = row_id  # read on from here
                break
        return CallPage([CallLine(key, tuple(rows)) for key, rows in
                         zip(keys, self._rows_of(keys), strict=True)], next_before)

    def _sql(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        return self._db.execute_sql(sql, params)

    def _search_stream(self, column: str, value: str, before_id: int | None
                       ) -> Iterator[tuple[int, str]]:
        """``(id, call_key)`` of the rows whose ``column`` is ``value``, newest first."""
        sql = self._search_sql[column]
        before = before_id if before_id is not None else 2 ** 63 - 1
        while True:
            with self._read():
                page = self._sql(sql, (value, before, PAGE_SIZE)).fetchall()
            yield from page
            if len(page) < PAGE_SIZE:
                return
            before = page[-1][0]

    def _has_row_from(self, call_key: str, from_id: int) -> bool:
        with self._read():
            return self._db.execute_sql(
                "SELECT 1 FROM outbox INDEXED BY outbox_key WHERE call_key = ? AND id >= ? "
                "LIMIT 1", (call_key, from_id)).fetchone() is not None

    def _rows_of(self, keys: Sequence[str]) -> list[list[Row]]:
        """Every row of each call in ``keys``, oldest first, in one query."""
        if not keys:
            return []
        by_key: dict[str, list[Row]] = {key: [] for key in keys}
        with self._read():
            for data in self._db.execute_sql(
                    f"SELECT {_ROW_COLUMNS} FROM outbox INDEXED BY outbox_key "
                    f"WHERE call_key IN ({', '.join('?' * len(keys))}) ORDER BY call_key, id",
                    list(keys)):
                values = list(data)
                values[_STATUS_INDEX] = OutboxStatus(values[_STATUS_INDEX])
                by_key[values[1]].append(Row(*values))
        return [by_key[key] for key in keys]

    def call_history(self, call_key: str, limit: int = PAGE_SIZE
                     ) -> tuple[list[Row], list[Attempt]]:
        """A call's rows (oldest first, at most ``limit``) and every recorded outcome of
        them, oldest first: the console's timeline."""
        rows = self._rows_of([call_key])[0][:limit]
        if not rows:
            return [], []
        ids = [row.id for row in rows]
        with self._read():
            found = self._db.execute_sql(
                _HISTORY_SQL.format(marks=", ".join("?" * len(ids))), ids).fetchall()
        return rows, [Attempt(*values) for values in found]

    def count_status(self, status: OutboxStatus | str) -> int:
        """Rows in ``status``: reads that status's entries of ``outbox_status`` only
        (cheap for dead rows; :meth:`stats` counts the whole table)."""
        with self._read():
            return self._db.execute_sql(
                "SELECT COUNT(*) FROM outbox INDEXED BY outbox_status WHERE status = ?",
                (OutboxStatus(status).value,)).fetchone()[0]

    def final_counts_since(self, since: float) -> dict[tuple[OutboxStatus, str], int]:
        """Rows that became dead or expired at or after ``since`` (their ``updated_at``),
        by status and kind; reads only those rows' entries of ``outbox_final``."""
        with self._read():
            found = self._db.execute_sql(_FINAL_SQL, (since,)).fetchall()
        return {(OutboxStatus(status), kind): n for status, kind, n in found}

    def delivered_per_minute(self, since: float, until: float) -> list[tuple[float, int]]:
        """Rows delivered in each whole minute from ``since`` to ``until`` (epoch seconds of
        the minute's start, count), every minute listed, 0 when none; reads only the
        ``outbox_delivered`` entries of that span."""
        first = math.floor(since / 60)
        last = math.floor(until / 60)
        with self._read():
            found = dict(self._db.execute_sql(
                _PER_MINUTE_SQL, (first * 60.0, (last + 1) * 60.0)).fetchall())
        return [(minute * 60.0, found.get(minute, 0)) for minute in range(first, last + 1)]

    def explain_console(self) -> dict[str, list[str]]:
        """``EXPLAIN QUERY PLAN`` of each console query (tests and ``bench/`` check that
        none sorts or scans the table)."""
        queries = {
            **{f"search {column}": (sql, ("x", 1, 1)) for column, sql in _SEARCH_SQL.items()},
            "history": (_HISTORY_SQL.format(marks="?, ?"), (1, 2)),
            "final": (_FINAL_SQL, (0.0,)),
            "per_minute": (_PER_MINUTE_SQL, (0.0, 1.0)),
        }
        with self._read():
            return {name: [line[-1] for line in self._db.execute_sql(
                        "EXPLAIN QUERY PLAN " + sql, params).fetchall()]
                    for name, (sql, params) in queries.items()}

    def check_writable(self) -> None:
        """Raise :class:`OutboxError` unless a write transaction can start and write (healthz).

        The probe write is rolled back, so it costs no fsync.
        """

        class _Rollback(Exception):
            pass

        try:
            with self._write():
                self._db.execute_sql(
                    "INSERT OR REPLACE INTO outbox_meta (key, value) VALUES ('check_writable', ?)",
                    (repr(self._clock()),))
                raise _Rollback
        except _Rollback:
            pass

    def explain_claim(self, exclude: int = 0) -> list[str]:
        """``EXPLAIN QUERY PLAN`` of the claim query (tests and ``bench/`` check it)."""
        sql = _claim_sql(exclude, _ROW_COLUMNS)
        params = [0.0, *(f"k{i}" for i in range(exclude)), 10]
        with self._read():
            return [row[-1] for row in
                    self._db.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall()]

    def close(self) -> None:
        with self._lock:
            if not self._db.is_closed():
                self._db.close()


def _claim_sql(excluded: int, columns: str = "id") -> str:
    """The claim query. ``INDEXED BY`` makes SQLite fail loudly rather than ever fall
    back to a scan (without ANALYZE statistics the planner may prefer ``outbox_status``)."""
    sql = (f"SELECT {columns} FROM outbox INDEXED BY outbox_due "
           "WHERE status = 'pending' AND is_head = 1 AND next_attempt_at <= ?")
    if excluded:
        sql += f" AND call_key NOT IN ({', '.join('?' * excluded)})"
    return sql + " ORDER BY next_attempt_at, id LIMIT ?"


def _paginate(
    fetch: Callable[[int | None, int], list[Row]], limit: int | None, before_id: int | None
) -> Iterator[Row]:
    remaining = math.inf if limit is None else limit
    before = before_id
    while remaining > 0:
        size = int(min(PAGE_SIZE, remaining))
        page = fetch(before, size)
        yield from page
        remaining -= len(page)
        if len(page) < size:
            return
        before = page[-1].id


def _capture(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
             ) -> tuple[bool, Any]:
    try:
        return True, fn(*args, **kwargs)
    except Exception as exc:
        return False, exc


def is_postgresql(database: str) -> bool:
    """Whether ``[outbox] database`` names a PostgreSQL server (else a SQLite file)."""
    return database.split("://", 1)[0].lower() in ("postgresql", "postgres") \
        if "://" in database else False


def open_outbox(
    database: str,
    *,
    synchronous: str = "FULL",
    busy_timeout_ms: int = 5000,
    clock: Callable[[], float] = time.time,
    node: str | None = None,
    password: str | None = None,
    journal: str | None = None,
) -> Outbox:
    """The one place that picks the storage: :class:`Outbox` for a SQLite path or
    ``sqlite://`` URL, :class:`fs_cc360.outbox_pg.PgOutbox` for ``postgresql://``.

    ``node`` (the connector's name, recorded on every row), ``password`` and ``journal``
    only mean something to PostgreSQL; a SQLite outbox belongs to one node. With a
    ``journal`` path (the service), rows are committed there while PostgreSQL is
    unreachable (:class:`fs_cc360.outbox_journal.JournaledOutbox`).
    """
    if is_postgresql(database):
        options: dict[str, Any] = {"synchronous": synchronous,
                                   "busy_timeout_ms": busy_timeout_ms, "clock": clock,
                                   "node": node, "password": password}
        if journal:
            from fs_cc360.outbox_journal import JournaledOutbox

            return JournaledOutbox(database, journal, **options)  # type: ignore[return-value]
        from fs_cc360.outbox_pg import PgOutbox  # the edge: only PostgreSQL needs psycopg

        return PgOutbox(database, **options)
    return Outbox(database, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms,
                  clock=clock)


class OutboxWriter:
    """An :class:`Outbox` behind ONE native thread, for the gevent service.

    Why: sqlite3 calls are C code that never yields to the gevent hub; an fsync under
    ``synchronous=FULL`` or a busy wait on a lock held by the CLI would freeze every
    greenlet (the ESL reader first: FreeSWITCH drops a listener that falls behind). So
    every call runs in a dedicated thread (``ThreadPool(1)``) and the calling greenlet
    waits on it cooperatively. One thread also means one connection and no writer
    contention inside the service (the ``sqliteq`` idea).

    :meth:`enqueue_nowait` adds group commit: items queued while a commit is running go
    into the next transaction together, so under load one fsync covers many events
    instead of one each; a failed batch fails its waiters. The service does not use it:
    its events have no waiter to hand a failure to, so ``service.Service`` keeps its own
    ordered spool and retries :meth:`enqueue` of the whole backlog until the disk is back
    (same batching, nothing dropped). Outcomes are grouped by the caller instead: the
    Deliverer sends every outcome gathered since its last call in one
    :meth:`mark_and_claim`, which also refills its lanes (one round trip to this thread
    per refill, not two per row).
    """

    def __init__(
        self,
        database: str,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 5000,
        max_batch: int = 1000,
        clock: Callable[[], float] = time.time,
        node: str | None = None,
        password: str | None = None,
        journal: str | None = None,
    ) -> None:
        self._pool = ThreadPool(1)
        #: Called with the new ids after every group commit (e.g. ``Deliverer.notify``).
        self.on_commit: Callable[[list[int]], None] | None = None
        #: Number of transactions :meth:`enqueue_nowait` committed (metrics, tests).
        self.commits = 0
        self.max_batch = max_batch
        self._queue: list[tuple[NewItem, AsyncResult]] = []
        self._flusher: gevent.Greenlet | None = None
        self._closed = False
        try:
            self._outbox: Outbox = self._pool.apply(
                open_outbox, (database,),
                {"synchronous": synchronous, "busy_timeout_ms": busy_timeout_ms, "clock": clock,
                 "node": node, "password": password, "journal": journal})
        except BaseException:
            self._pool.kill()
            raise
        self.path = self._outbox.path

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._closed:
            raise OutboxError(f"outbox {self.path} is closed")
        return self._apply(fn, args, kwargs)

    def _apply(self, fn: Callable[..., T], args: tuple[Any, ...] = (),
               kwargs: dict[str, Any] | None = None) -> T:
        """Run ``fn`` in the writer thread; its exception is re-raised here.

        The exception travels back as a value: raised inside the pool it would also be
        printed with a traceback by gevent's thread pool, one per failed write while the
        disk is full, on top of the one structured log line the caller writes.
        """
        ok, value = self._pool.apply(_capture, (fn, args, kwargs or {}))
        if not ok:
            raise value
        return value

    # -- group commit -----------------------------------------------------------------

    def enqueue_nowait(self, item: NewItem) -> AsyncResult:
        """Queue ``item`` for the next group commit; the result resolves to its id (or
        raises the :class:`OutboxError`). Wait on it before acknowledging upstream."""
        if self._closed:
            raise OutboxError(f"outbox {self.path} is closed")
        result = AsyncResult()
        self._queue.append((item, result))
        if self._flusher is None:
            self._flusher = gevent.spawn(self._flush)
        return result

    def _flush(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self.max_batch]
                del self._queue[: len(batch)]
                try:
                    ids = self._apply(self._outbox.enqueue, ([item for item, _ in batch],))
                except Exception as exc:  # every waiter sees the failure
                    log.error("outbox.enqueue_failed count=%d error=%s", len(batch), exc)
                    for _, result in batch:
                        result.set_exception(exc)
                    continue
                self.commits += 1
                for (_, result), new_id in zip(batch, ids, strict=True):
                    result.set(new_id)
                if self.on_commit is not None:
                    try:
                        self.on_commit(ids)
                    except Exception:
                        log.exception("outbox.on_commit_failed")
        finally:
            self._flusher = None

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything queued by :meth:`enqueue_nowait` is committed."""
        flusher = self._flusher
        if flusher is not None:
            flusher.join(timeout)

    # -- the Outbox API, each call run in the writer thread ---------------------------

    def enqueue(self, items: Sequence[NewItem], *, now: float | None = None) -> list[int]:
        return self._call(self._outbox.enqueue, items, now=now)

    def claim_due(self, now: float, limit: int, lease_seconds: float,
                  exclude_keys: Collection[str] = ()) -> list[Row]:
        return self._call(self._outbox.claim_due, now, limit, lease_seconds, tuple(exclude_keys))

    def mark_and_claim(self, marks: Iterable[Mark], now: float, limit: int,
                       lease_seconds: float, exclude_keys: Collection[str] = ()) -> Claimed:
        return self._call(self._outbox.mark_and_claim, list(marks), now, limit, lease_seconds,
                          tuple(exclude_keys))

    def mark_many(self, marks: Iterable[Mark], *, now: float | None = None) -> None:
        self._call(self._outbox.mark_many, list(marks), now=now)

    def mark_delivered(self, id: int, status_code: int | None, now: float | None = None) -> None:
        self._call(self._outbox.mark_delivered, id, status_code, now)

    def mark_retry(self, id: int, next_attempt_at: float, error: str,
                   status_code: int | None = None, *, rejected: bool = False,
                   now: float | None = None) -> None:
        self._call(self._outbox.mark_retry, id, next_attempt_at, error, status_code,
                   rejected=rejected, now=now)

    def mark_dead(self, id: int, error: str, status_code: int | None = None, *,
                  rejected: bool = False, now: float | None = None) -> None:
        self._call(self._outbox.mark_dead, id, error, status_code, rejected=rejected, now=now)

    def mark_expired(self, id: int, now: float | None = None) -> None:
        self._call(self._outbox.mark_expired, id, now)

    def reclaim_expired_leases(self, now: float) -> int:
        return self._call(self._outbox.reclaim_expired_leases, now)

    def release_leases(self, ids: Iterable[int] | None = None, *,
                       now: float | None = None) -> int:
        return self._call(self._outbox.release_leases,
                          None if ids is None else list(ids), now=now)

    def requeue(self, ids: Iterable[int] | None = None,
                statuses: Iterable[OutboxStatus | str] = (OutboxStatus.dead,
                                                          OutboxStatus.expired),
                kinds: Iterable[str] | None = None, since: float | None = None,
                until: float | None = None, dry_run: bool = False, *,
                now: float | None = None) -> list[Row]:
        return self._call(self._outbox.requeue, None if ids is None else list(ids),
                          list(statuses), None if kinds is None else list(kinds),
                          since, until, dry_run, now=now)

    def purge_delivered(self, older_than: float) -> int:
        # batch by batch, so queued enqueues run between the purge transactions
        total = 0
        while True:
            count = self._call(self._outbox.purge_delivered_batch, older_than, PURGE_BATCH)
            total += count
            if count < PURGE_BATCH:
                return total

    def get(self, id: int) -> Row | None:
        return self._call(self._outbox.get, id)

    def has_call_key(self, key: str) -> bool:
        return self._call(self._outbox.has_call_key, key)

    def has_request(self, call_key: str, kind: str) -> bool:
        return self._call(self._outbox.has_request, call_key, kind)

    def next_due_at(self) -> float | None:
        return self._call(self._outbox.next_due_at)

    def stats(self, now: float | None = None) -> OutboxStats:
        return self._call(self._outbox.stats, now)

    @property
    def node(self) -> str:
        """This connector's node name ("" for a SQLite outbox)."""
        return self._outbox.node

    @property
    def journaled(self) -> int:
        """Rows in the local journal waiting for PostgreSQL (0 unless one is down)."""
        return int(getattr(self._outbox, "journaled", 0))

    def pragma(self, name: str) -> Any:
        return self._call(self._outbox.pragma, name)

    def list_rows(self, status: OutboxStatus | str | None = None, kind: str | None = None,
                  call_key: str | None = None, since: float | None = None,
                  until: float | None = None, limit: int | None = 100,
                  before_id: int | None = None) -> Iterator[Row]:
        filters = {"status": status, "kind": kind, "call_key": call_key,
                   "since": since, "until": until}
        return _paginate(lambda before, size: self._call(
            self._outbox.list_page, **filters, before_id=before, limit=size), limit, before_id)

    def check_writable(self) -> None:
        self._call(self._outbox.check_writable)

    def thread_ident(self) -> int:
        """The native id of the writer thread (tests check the work happens there)."""
        return self._call(get_original("threading", "get_ident"))

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued (bounded wait), close the database, stop the thread."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        try:
            self._pool.apply(self._outbox.close)
        finally:
            self._pool.kill()


class OutboxReader:
    """Reads for a page of the gevent service, on their own connection and native thread.

    The :class:`OutboxWriter` pattern (sqlite3 never yields to the hub, so the calling
    greenlet waits on a native thread cooperatively), with a connection of its own:
    WAL lets it read while the writer commits, so a page's search never waits for a
    group commit and never delays one (it would, queued in the writer's one thread).
    The connection is ``query_only``: nothing the console reads through here can write.
    """

    def __init__(self, database: str, *, busy_timeout_ms: int = 5000,
                 password: str | None = None) -> None:
        self._pool = ThreadPool(1)
        self._closed = False
        self._options: dict[str, Any] = {"busy_timeout_ms": busy_timeout_ms,
                                         "password": password}
        self._database = database
        self._outbox: Outbox | None = None
        from fs_cc360.config import mask_database_url

        self.path = mask_database_url(database)
        try:
            self._open()
        except OutboxError as exc:
            if not is_postgresql(database):
                self._pool.kill()
                raise
            # a shared outbox may be down while the service starts: opened on first use
            log.warning("outbox.reader_deferred error=%s", exc)
        except BaseException:
            self._pool.kill()
            raise

    def _open(self) -> Outbox:
        if self._outbox is None:
            outbox: Outbox = self._pool.apply(open_outbox, (self._database,), self._options)
            try:
                self._pool.apply(outbox.make_read_only)
            except BaseException:
                self._pool.apply(outbox.close)
                raise
            self._outbox = outbox
        self.path = self._outbox.path
        return self._outbox

    def run(self, fn: Callable[[Outbox], T]) -> T:
        """``fn(outbox)`` in the reader thread; its exception is re-raised here."""
        if self._closed:
            raise OutboxError(f"outbox {self.path} is closed")
        ok, value = self._pool.apply(_capture, (fn, (self._open(),), {}))
        if not ok:
            raise value
        return value

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._outbox is not None:
                self._pool.apply(self._outbox.close)
        finally:
            self._pool.kill()
