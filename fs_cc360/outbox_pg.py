"""The outbox in PostgreSQL: one outbox shared by the connectors of several FreeSWITCH nodes.

Same interface and semantics as :class:`fs_cc360.outbox.Outbox` (it subclasses it and
reuses its backend-neutral parts: pagination, the search merge, the ``mark_*`` wrappers,
requeue's batching); every statement is PostgreSQL's own. What sharing adds:

* **Claims by several deliverers at once** (processes, hosts): the claim is one
  ``UPDATE … FROM (SELECT … FOR UPDATE SKIP LOCKED)`` over the claimable heads, so two
  deliverers never claim the same row and never wait for each other. A claimed row
  records its deliverer (``lease_node``) and a lease; when a node dies its leases run
  out and any other node's :meth:`reclaim_expired_leases` gives the rows back (they are
  sent again: at-least-once, only rows in flight at the death). :meth:`release_leases`
  without ids (at start-up) releases only *this* node's leases, never another's.
* **Per-call order with concurrent writers**: every write that changes which row is a
  call's head (enqueue, a final mark, requeue) first takes a transaction-scoped advisory
  lock per call (``pg_advisory_xact_lock``, keys sorted, so two writers never deadlock);
  the ``is_head`` invariant of the SQLite outbox then holds across nodes.
* **One summary per call across nodes**: a partial unique index
  (``outbox_one_summary``) and ``INSERT … ON CONFLICT DO NOTHING``: backfill or replay on
  any node never doubles a summary, even racing.
* ``node`` on every row (``[outbox] node``, default the host name): ``outbox stats`` and
  ``outbox list --node`` show and filter by it.

Durability is PostgreSQL's (``synchronous_commit``); ``synchronous`` is accepted for the
same signature and ignored. The connection never blocks the gevent hub because every
call runs in :class:`~fs_cc360.outbox.OutboxWriter`'s native thread; the connect timeout
and TCP keepalives below bound how long a dead server can hold that thread.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import peewee

from fs_cc360.config import mask_database_url
from fs_cc360.errors import OutboxError
from fs_cc360.outbox import (
    _OPEN,
    _OUTCOMES,
    PAGE_SIZE,
    SCHEMA_VERSION,
    Attempt,
    Claimed,
    Mark,
    NewItem,
    Outbox,
    OutboxEntry,
    OutboxMeta,
    OutboxStats,
    OutboxStatus,
    Row,
    mark_params,
)

log = logging.getLogger(__name__)

#: Every column of :class:`Row`, in order (here ``node`` exists).
_FIELDS = tuple(Row.__dataclass_fields__)
_COLUMNS = ", ".join(f'"{name}"' for name in _FIELDS)
_O_COLUMNS = ", ".join(f'o."{name}"' for name in _FIELDS)
_STATUS = _FIELDS.index("status")
#: How long connecting may take, and when a silent server counts as gone (seconds).
CONNECT_TIMEOUT = 5
KEEPALIVE = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
             "keepalives_count": 3}
#: No statement of the outbox takes long; one that does is stuck behind something.
STATEMENT_TIMEOUT_MS = 30_000
#: The advisory lock that serialises schema creation of nodes starting together.
_SCHEMA_LOCK = 0x66732D6363333630  # "fs-cc360"

_TABLES = (
    "CREATE TABLE IF NOT EXISTS outbox ("
    "id BIGSERIAL PRIMARY KEY, call_key TEXT NOT NULL, kind TEXT NOT NULL, "
    "\"user\" TEXT NOT NULL DEFAULT '', callerid TEXT NOT NULL DEFAULT '', "
    "request TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'pending', "
    "is_head BOOLEAN NOT NULL DEFAULT false, attempts INTEGER NOT NULL DEFAULT 0, "
    "rejections INTEGER NOT NULL DEFAULT 0, next_attempt_at DOUBLE PRECISION NOT NULL, "
    "lease_until DOUBLE PRECISION, last_status INTEGER, last_error TEXT, "
    "created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL, "
    "delivered_at DOUBLE PRECISION, event_at DOUBLE PRECISION, "
    "node TEXT NOT NULL DEFAULT '', lease_node TEXT)",
    "CREATE TABLE IF NOT EXISTS outbox_meta (key TEXT PRIMARY KEY, value TEXT)",
    "CREATE TABLE IF NOT EXISTS outbox_attempt (id BIGSERIAL PRIMARY KEY, "
    "row_id BIGINT NOT NULL, at DOUBLE PRECISION NOT NULL, outcome TEXT NOT NULL, "
    "status INTEGER, error TEXT, node TEXT)",
)
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_attempt_at, id) "
    "WHERE status = 'pending' AND is_head",
    "CREATE INDEX IF NOT EXISTS outbox_key ON outbox (call_key, id)",
    "CREATE INDEX IF NOT EXISTS outbox_status ON outbox (status, id)",
    "CREATE INDEX IF NOT EXISTS outbox_status_kind ON outbox (status, kind)",
    "CREATE INDEX IF NOT EXISTS outbox_lease ON outbox (lease_until) "
    "WHERE status = 'inflight'",
    "CREATE INDEX IF NOT EXISTS outbox_delivered ON outbox (delivered_at) "
    "WHERE status = 'delivered'",
    "CREATE INDEX IF NOT EXISTS outbox_callerid ON outbox (callerid, id)",
    'CREATE INDEX IF NOT EXISTS outbox_user ON outbox ("user", id)',
    "CREATE INDEX IF NOT EXISTS outbox_final ON outbox (updated_at, status, kind) "
    "WHERE status IN ('dead', 'expired')",
    "CREATE INDEX IF NOT EXISTS outbox_node ON outbox (node, id)",
    # one summary per call, whichever node writes it (enqueue's ON CONFLICT)
    "CREATE UNIQUE INDEX IF NOT EXISTS outbox_one_summary ON outbox (call_key) "
    "WHERE kind = 'summary'",
    "CREATE INDEX IF NOT EXISTS outbox_attempt_row ON outbox_attempt (row_id, id)",
)
_INSERT_SQL = (
    'INSERT INTO outbox (call_key, kind, "user", callerid, request, status, is_head, '
    "attempts, rejections, next_attempt_at, created_at, updated_at, event_at, node) "
    "VALUES (%s, %s, %s, %s, %s, 'pending', %s, 0, 0, %s, %s, %s, %s, %s)"
)
_MARK_SQL = {
    OutboxStatus.delivered: (
        "UPDATE outbox SET status = 'delivered', is_head = false, lease_until = NULL, "
        "lease_node = NULL, last_status = %s, delivered_at = %s, updated_at = %s "
        "WHERE id = %s"),
    OutboxStatus.pending: (
        "UPDATE outbox SET status = 'pending', lease_until = NULL, lease_node = NULL, "
        "attempts = attempts + 1, rejections = rejections + %s, next_attempt_at = %s, "
        "last_error = %s, last_status = %s, updated_at = %s WHERE id = %s"),
    OutboxStatus.dead: (
        "UPDATE outbox SET status = 'dead', is_head = false, lease_until = NULL, "
        "lease_node = NULL, attempts = attempts + 1, rejections = rejections + %s, "
        "last_error = %s, last_status = %s, updated_at = %s WHERE id = %s"),
    OutboxStatus.expired: (
        "UPDATE outbox SET status = 'expired', is_head = false, lease_until = NULL, "
        "lease_node = NULL, updated_at = %s WHERE id = %s"),
}
_ATTEMPT_SQL = ("INSERT INTO outbox_attempt (row_id, at, outcome, status, error, node) "
                "VALUES (%s, %s, %s, %s, %s, %s)")
_NEXT_DUE_SQL = "SELECT MIN(next_attempt_at) FROM outbox WHERE status = 'pending' AND is_head"
_CLAIM_SQL = (
    "UPDATE outbox o SET status = 'inflight', lease_until = %s, lease_node = %s, "
    "updated_at = %s FROM (SELECT id FROM outbox WHERE status = 'pending' AND is_head "
    "AND next_attempt_at <= %s AND NOT (call_key = ANY(%s)) "
    "ORDER BY next_attempt_at, id LIMIT %s FOR UPDATE SKIP LOCKED) c "
    f"WHERE o.id = c.id RETURNING {_O_COLUMNS}"
)
_SEARCH_SQL = {column: f'SELECT id, call_key FROM outbox WHERE "{column}" = %s AND id < %s '
                       "ORDER BY id DESC LIMIT %s"
               for column in ("callerid", "user", "call_key")}
_HISTORY_SQL = ("SELECT row_id, at, outcome, status, error FROM outbox_attempt "
                "WHERE row_id = ANY(%s) ORDER BY at, id")
_FINAL_SQL = ("SELECT status, kind, COUNT(*) FROM outbox WHERE status IN ('dead', 'expired') "
              "AND updated_at >= %s GROUP BY status, kind")
_PER_MINUTE_SQL = ("SELECT CAST(floor(delivered_at / 60) AS BIGINT) AS minute, COUNT(*) "
                   "FROM outbox WHERE status = 'delivered' AND delivered_at >= %s "
                   "AND delivered_at < %s GROUP BY minute")


def connect_params(database: str, password: str | None = None) -> dict[str, Any]:
    """psycopg keyword arguments from a ``postgresql://user:pw@host:port/db?opt=v`` URL.

    Parsed here (not by libpq) so the password never sits in a conninfo string that an
    error could quote. Missing parts fall back to libpq's ``PG*`` environment
    (``PGHOST``, ``PGPASSWORD``, ``PGPASSFILE``…); ``?host=/run/postgresql`` reaches a
    Unix socket. ``password`` (``[outbox] password``) wins over the URL's.
    """
    parts = urlsplit(database)
    try:
        port = parts.port
    except ValueError as exc:
        raise OutboxError(f"outbox database URL {mask_database_url(database)}: invalid port",
                          orig=exc) from exc
    params: dict[str, Any] = {}
    if parts.hostname:
        params["host"] = unquote(parts.hostname)
    if port:
        params["port"] = port
    if parts.username:
        params["user"] = unquote(parts.username)
    if parts.password is not None:
        params["password"] = unquote(parts.password)
    if password:
        params["password"] = password
    dbname = unquote(parts.path.lstrip("/"))
    if dbname:
        params["dbname"] = dbname
    params.update(parse_qsl(parts.query))
    params.setdefault("connect_timeout", CONNECT_TIMEOUT)
    params.setdefault("application_name", "fs-cc360")
    for key, value in KEEPALIVE.items():
        params.setdefault(key, value)
    return params


class _Entry(OutboxEntry):
    """``outbox`` as PostgreSQL has it (peewee queries of the base class use it)."""

    id = peewee.BigAutoField()
    is_head = peewee.BooleanField(default=False)
    node = peewee.TextField(default="")
    lease_node = peewee.TextField(null=True)


class PgOutbox(Outbox):
    """The outbox in a PostgreSQL database (``postgresql://`` URL); see the module docstring.

    Threading as :class:`Outbox`: one connection, calls serialised by a native lock; the
    service wraps it in :class:`~fs_cc360.outbox.OutboxWriter` (a native thread). A lost
    connection (server restarted, network cut) is dropped on the error and opened again
    by the next call, so the caller only sees :class:`OutboxError` while it is down.
    """

    _search_sql = _SEARCH_SQL

    def __init__(
        self,
        database: str,
        *,
        synchronous: str = "FULL",
        busy_timeout_ms: int = 5000,
        clock: Any = None,
        node: str | None = None,
        password: str | None = None,
    ) -> None:
        import time

        try:
            import psycopg  # noqa: F401  (checked here for a clear message)
        except ImportError as exc:
            raise OutboxError("outbox: a postgresql:// database needs the psycopg package: "
                              "pip install 'psycopg[binary]'", orig=exc) from exc
        self.synchronous = str(synchronous).upper()
        self.mark_synchronous = self.synchronous
        self.busy_timeout_ms = int(busy_timeout_ms)
        self._clock = clock or time.time
        self.summaries_skipped = 0
        self.node = node or socket.gethostname()
        self.path = mask_database_url(database)
        self._secret = password or urlsplit(database).password or ""
        params = connect_params(database, password)
        # lock_timeout: a row or lock held elsewhere fails the call instead of hanging it
        params["options"] = (f"{params.get('options', '')} -c lock_timeout="
                             f"{self.busy_timeout_ms} -c statement_timeout="
                             f"{STATEMENT_TIMEOUT_MS}").strip()
        dbname = params.pop("dbname", "")
        self._db = peewee.PostgresqlDatabase(dbname, prefer_psycopg3=True, **params)
        from gevent.monkey import get_original

        self._lock = get_original("_thread", "RLock")()
        entry, meta = _bind(self._db)
        self._Entry, self._Meta = entry, meta
        try:
            with self._errors():
                self._db.connect(reuse_if_open=True)
                self._create_schema()
        except BaseException:
            self._drop_connection()
            raise

    # -- plumbing ---------------------------------------------------------------------

    def _drop_connection(self) -> None:
        """Forget the connection (broken or not); the next call opens a new one."""
        with suppress(Exception):
            self._db.close()
        with suppress(Exception):
            self._db._state.reset()

    def _explain_pg(self, exc: BaseException) -> str:
        orig: BaseException = exc
        for _ in range(5):
            first = orig.args[0] if orig.args else None
            if isinstance(first, BaseException):
                orig = first
            elif orig.__cause__ is not None:
                orig = orig.__cause__
            else:
                break
        text = " ".join(str(orig).split())
        if self._secret:
            text = text.replace(self._secret, "***")
        lowered = text.lower()
        where = f"outbox {self.path}"
        if "password authentication failed" in lowered or "no password supplied" in lowered:
            return (f"{where}: authentication failed ({text}): check the user and "
                    "[outbox] password (or PGPASSWORD / ~/.pgpass)")
        if "does not exist" in lowered and "database" in lowered:
            return (f"{where}: {text}: create it (createdb -O <user> <name>) or fix the "
                    "database name in [outbox] database")
        if "permission denied" in lowered:
            return (f"{where}: {text}: the user needs CREATE on the database (first start) "
                    "and SELECT/INSERT/UPDATE/DELETE on the outbox tables")
        if ("connection" in lowered or "server closed" in lowered or "timeout" in lowered
                or "could not" in lowered or "terminating" in lowered):
            return (f"{where}: PostgreSQL unreachable ({text}): check that the server is "
                    "running and reachable from this host (host, port, pg_hba.conf)")
        if "lock timeout" in lowered or "deadlock" in lowered:
            return f"{where}: busy ({text}): retried on the next call"
        return f"{where}: {type(orig).__name__}: {text}"

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except OutboxError:
            raise
        except Exception as exc:
            import psycopg

            if not isinstance(exc, (peewee.PeeweeException, psycopg.Error)):
                raise
            conn = self._db._state.conn
            if conn is None or getattr(conn, "closed", False) or getattr(conn, "broken", False) \
                    or isinstance(exc, (peewee.OperationalError, peewee.InterfaceError)):
                self._drop_connection()
            raise OutboxError(self._explain_pg(exc), orig=exc) from None

    @contextmanager
    def _write(self, synchronous: str | None = None) -> Iterator[None]:
        del synchronous  # PostgreSQL's synchronous_commit decides
        with self._lock, self._errors():
            with self._db.atomic():
                yield

    def _create_schema(self) -> None:
        with self._db.atomic():
            self._sql("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for ddl in _TABLES:
                self._sql(ddl)
            found = self._sql(
                "SELECT value FROM outbox_meta WHERE key = 'schema_version'").fetchone()
            version = int(found[0]) if found else 0
            if version > SCHEMA_VERSION:
                raise OutboxError(
                    f"outbox {self.path} has schema version {version}, newer than this "
                    f"fs-cc360 understands ({SCHEMA_VERSION}): upgrade fs-cc360")
            # additive upgrades of older PostgreSQL outboxes go here (ADD COLUMN IF NOT EXISTS)
            for ddl in _INDEXES:
                self._sql(ddl)
            if version < SCHEMA_VERSION:
                self._set_meta("schema_version", str(SCHEMA_VERSION))

    def make_read_only(self) -> None:
        with self._read():
            self._sql("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        # also on the connection a reconnect opens
        options = self._db.connect_params.get("options", "")
        self._db.connect_params["options"] = f"{options} -c default_transaction_read_only=on"

    def pragma(self, name: str) -> Any:
        """A server setting (``SHOW name``): the PostgreSQL side of SQLite's pragmas."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a setting name: {name!r}")
        with self._read():
            return self._sql(f"SHOW {name}").fetchone()[0]

    def _row(self, data: dict[str, Any]) -> Row:
        values = {name: data[name] for name in _FIELDS}
        values["status"] = OutboxStatus(values["status"])
        return Row(**values)

    def _select(self) -> peewee.ModelSelect:
        entry = self._Entry
        return entry.select(*(getattr(entry, name) for name in _FIELDS))

    @staticmethod
    def _tuple_row(values: Sequence[Any]) -> Row:
        data = list(values)
        data[_STATUS] = OutboxStatus(data[_STATUS])
        return Row(*data)

    def _lock_keys(self, keys: Iterable[str]) -> None:
        """Transaction-scoped advisory locks on these calls, taken in sorted order."""
        ordered = sorted(set(keys))
        if ordered:
            self._sql("SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) "
                      "FROM unnest(%s::text[]) AS k", (ordered,))

    def _refresh_heads(self, keys: Iterable[str]) -> None:
        """``is_head`` true for exactly the lowest-id non-final row of each key (under
        the keys' advisory locks, taken by the caller)."""
        key_list = sorted(set(keys))
        if not key_list:
            return
        self._sql(
            "UPDATE outbox o SET is_head = COALESCE(o.id = h.head, false) FROM ("
            f"  SELECT call_key, MIN(id) FILTER (WHERE status IN {_OPEN}) AS head "
            "  FROM outbox WHERE call_key = ANY(%s) GROUP BY call_key) h "
            f"WHERE o.call_key = h.call_key AND (o.is_head OR o.status IN {_OPEN}) "
            "AND o.is_head IS DISTINCT FROM COALESCE(o.id = h.head, false)",
            (key_list,))

    def _insert_attempts(self, history: Sequence[tuple[Any, ...]]) -> None:
        if history:
            self._db.cursor().executemany(
                _ATTEMPT_SQL, [(*entry, self.node) for entry in history])

    def _set_meta(self, key: str, value: str | None) -> None:
        self._sql("INSERT INTO outbox_meta (key, value) VALUES (%s, %s) "
                  "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (key, value))

    # -- writes -----------------------------------------------------------------------

    def enqueue(self, items: Sequence[NewItem], *, now: float | None = None,
                progress: tuple[str, str] | None = None) -> list[int]:
        """As :meth:`Outbox.enqueue`; the one-summary rule holds across nodes (a unique
        partial index: a racing node's summary makes ours resolve to its row).

        ``progress`` (key, value) is written to ``outbox_meta`` in the same transaction
        (the journal's "moved up to" mark: see fs_cc360/outbox_journal.py)."""
        if not items:
            return []
        now = self._now(now)
        keys = sorted({item.call_key for item in items})
        with self._write():
            self._lock_keys(keys)
            cursor = self._db.cursor()
            # Which calls already have an open row (their new rows are not heads): one
            # query for the batch, then every insert in one pipelined executemany.
            cursor.execute(f"SELECT DISTINCT call_key FROM outbox WHERE call_key = ANY(%s) "
                           f"AND status IN {_OPEN}", (keys,))
            open_keys = {found[0] for found in cursor.fetchall()}
            values = []
            for item in items:
                values.append((item.call_key, item.kind, item.user or "", item.callerid or "",
                               item.request.to_json(), item.call_key not in open_keys, now,
                               now, now, item.event_at, self.node))
                open_keys.add(item.call_key)
            cursor.executemany(_INSERT_SQL + " ON CONFLICT (call_key) WHERE kind = 'summary' "
                               "DO NOTHING RETURNING id", values, returning=True)
            ids: list[int | None] = []
            while True:
                found = cursor.fetchone()
                ids.append(found[0] if found else None)
                if not cursor.nextset():
                    break
            held_keys = set()
            for n, item in enumerate(items):
                if ids[n] is None:  # a summary this call already has (any node's)
                    cursor.execute("SELECT id FROM outbox WHERE call_key = %s AND "
                                   "kind = 'summary'", (item.call_key,))
                    ids[n] = cursor.fetchone()[0]
                    held_keys.add(item.call_key)
                    self.summaries_skipped += 1
                    log.info("outbox.summary_held call=%s id=%d: this call's summary is "
                             "already in the outbox, not added again", item.call_key, ids[n])
            # a skipped summary may have been counted as its call's head above
            self._refresh_heads(held_keys)
            if progress is not None:
                self._set_meta(*progress)
        return [int(row_id) for row_id in ids if row_id is not None]

    def meta(self, key: str) -> str | None:
        """A value of ``outbox_meta`` (None when unset)."""
        with self._read():
            found = self._sql("SELECT value FROM outbox_meta WHERE key = %s", (key,)).fetchone()
        return found[0] if found else None

    def mark_and_claim(
        self,
        marks: Iterable[Mark],
        now: float,
        limit: int,
        lease_seconds: float,
        exclude_keys: Collection[str] = (),
    ) -> Claimed:
        """As :meth:`Outbox.mark_and_claim`, in ONE transaction (PostgreSQL has no
        per-transaction fsync level to tell apart). The claim skips rows another
        deliverer holds locked (``SKIP LOCKED``) instead of waiting for it."""
        marks = list(marks)
        if not marks and limit <= 0:
            return Claimed([], None)
        lease_until = now + lease_seconds
        with self._write():
            if marks:
                self._apply_marks(marks)
            if limit <= 0:
                return Claimed([], None)
            found = self._sql(_CLAIM_SQL, (lease_until, self.node, now, now,
                                           list(exclude_keys), limit)).fetchall()
            next_due = self._next_due()
        rows = sorted((self._tuple_row(values) for values in found),
                      key=lambda row: (row.next_attempt_at, row.id))
        return Claimed(rows, next_due)

    def _next_due(self) -> float | None:
        row = self._sql(_NEXT_DUE_SQL).fetchone()
        return row[0] if row else None

    def _apply_marks(self, marks: Sequence[Mark], now: float | None = None) -> None:
        default_at = self._now(now)
        ids = sorted({mark.id for mark in marks})
        key_of = dict(self._sql("SELECT id, call_key FROM outbox WHERE id = ANY(%s)",
                                (ids,)).fetchall())
        self._lock_keys(key_of.values())
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
            if status.final and mark.id in key_of:
                final_keys.add(key_of[mark.id])
        self._insert_attempts(history)
        if error is not None:
            self._record_error(*error)
        self._refresh_heads(final_keys)

    def reclaim_expired_leases(self, now: float) -> int:
        """In-flight rows of ANY node whose lease ended before ``now`` → pending (a dead
        node's rows are taken over). Rows another transaction holds are skipped."""
        with self._read():
            if self._sql("SELECT 1 FROM outbox WHERE status = 'inflight' AND lease_until < %s "
                         "LIMIT 1", (now,)).fetchone() is None:
                return 0
        with self._write():
            found = self._sql(
                "UPDATE outbox o SET status = 'pending', lease_until = NULL, lease_node = NULL, "
                "updated_at = %s FROM (SELECT id FROM outbox WHERE status = 'inflight' "
                "AND lease_until < %s FOR UPDATE SKIP LOCKED) r WHERE o.id = r.id "
                "RETURNING o.id", (now, now)).fetchall()
            self._insert_attempts([
                (row_id, now, "reclaimed", None,
                 "lease expired before an outcome was recorded: sent again")
                for (row_id,) in found])
        if found:
            log.info("outbox.reclaimed count=%d", len(found))
        return len(found)

    def release_leases(self, ids: Iterable[int] | None = None, *, now: float | None = None) -> int:
        """Give in-flight rows back without an attempt: ``ids``, or (``None``, at start-up)
        every row THIS node holds; other nodes' leases are theirs until they expire."""
        now = self._now(now)
        with self._write():
            if ids is None:
                cursor = self._sql(
                    "UPDATE outbox SET status = 'pending', lease_until = NULL, "
                    "lease_node = NULL, updated_at = %s WHERE status = 'inflight' "
                    "AND lease_node = %s", (now, self.node))
            else:
                id_list = list(ids)
                if not id_list:
                    return 0
                cursor = self._sql(
                    "UPDATE outbox SET status = 'pending', lease_until = NULL, "
                    "lease_node = NULL, updated_at = %s WHERE status = 'inflight' "
                    "AND id = ANY(%s)", (now, id_list))
            return cursor.rowcount

    def purge_delivered_batch(self, older_than: float, limit: int) -> int:
        with self._write():
            ids = [found[0] for found in self._sql(
                "SELECT id FROM outbox WHERE status = 'delivered' AND delivered_at < %s "
                "LIMIT %s", (older_than, limit)).fetchall()]
            if not ids:
                return 0
            self._sql("DELETE FROM outbox_attempt WHERE row_id = ANY(%s)", (ids,))
            return self._sql("DELETE FROM outbox WHERE id = ANY(%s)", (ids,)).rowcount

    def check_writable(self) -> None:
        """Raise :class:`OutboxError` unless a write transaction can run (rolled back)."""

        class _Rollback(Exception):
            pass

        try:
            with self._write():
                self._set_meta("check_writable", repr(self._clock()))
                raise _Rollback
        except _Rollback:
            pass

    # -- reads ------------------------------------------------------------------------

    def has_call_key(self, key: str) -> bool:
        with self._read():
            return self._sql("SELECT 1 FROM outbox WHERE call_key = %s LIMIT 1",
                             (key,)).fetchone() is not None

    def has_request(self, call_key: str, kind: str) -> bool:
        with self._read():
            return self._sql("SELECT 1 FROM outbox WHERE call_key = %s AND kind = %s LIMIT 1",
                             (call_key, kind)).fetchone() is not None

    def stats(self, now: float | None = None, node: str | None = None) -> OutboxStats:
        """As :meth:`Outbox.stats`, plus counts per node; ``node`` counts only its rows."""
        del now
        where, params = ("WHERE node = %s", (node,)) if node is not None else ("", ())
        also = "AND node = %s" if node is not None else ""
        with self._read():
            by_kind: dict[tuple[OutboxStatus, str], int] = {}
            counts = {status: 0 for status in OutboxStatus}
            by_node: dict[str, dict[OutboxStatus, int]] = {}
            for row_node, status, kind, n in self._sql(
                    f"SELECT node, status, kind, COUNT(*) FROM outbox {where} "
                    "GROUP BY node, status, kind", params).fetchall():
                status = OutboxStatus(status)
                by_kind[(status, kind)] = by_kind.get((status, kind), 0) + n
                counts[status] += n
                per = by_node.setdefault(row_node, {s: 0 for s in OutboxStatus})
                per[status] += n
            oldest = self._sql(
                f"SELECT MIN(created_at) FROM outbox WHERE status IN {_OPEN} {also}",
                params).fetchone()[0]
            oldest_summary = self._sql(
                f"SELECT MIN(created_at) FROM outbox WHERE status IN {_OPEN} "
                f"AND kind = 'summary' {also}", params).fetchone()[0]
            last_delivered = self._sql(
                f"SELECT MAX(delivered_at) FROM outbox WHERE status = 'delivered' {also}",
                params).fetchone()[0]
            next_due = self._sql(_NEXT_DUE_SQL + f" {also}", params).fetchone()[0]
            meta = dict(self._sql("SELECT key, value FROM outbox_meta "
                                  "WHERE key IN ('last_error', 'last_error_at')").fetchall())
        return OutboxStats(
            counts=counts, by_kind=by_kind, total=sum(counts.values()),
            oldest_pending_at=oldest, next_due_at=next_due, last_delivered_at=last_delivered,
            last_error=meta.get("last_error"),
            last_error_at=float(meta["last_error_at"]) if meta.get("last_error_at") else None,
            oldest_summary_at=oldest_summary, by_node=by_node)

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
        node: str | None = None,
    ) -> list[Row]:
        """As :meth:`Outbox.list_page`, plus ``node``: only the rows that node enqueued."""
        entry = self._Entry
        conditions = [
            (status is not None, lambda: entry.status == OutboxStatus(status).value),
            (kind is not None, lambda: entry.kind == kind),
            (call_key is not None, lambda: entry.call_key == call_key),
            (since is not None, lambda: entry.created_at >= since),
            (until is not None, lambda: entry.created_at < until),
            (before_id is not None, lambda: entry.id < before_id),
            (node is not None, lambda: entry.node == node),
        ]
        query = self._select()
        for wanted, condition in conditions:
            if wanted:
                query = query.where(condition())
        with self._read():
            return [self._row(data) for data in
                    query.order_by(entry.id.desc()).limit(limit).dicts()]

    def list_rows(self, status: OutboxStatus | str | None = None, kind: str | None = None,
                  call_key: str | None = None, since: float | None = None,
                  until: float | None = None, limit: int | None = 100,
                  before_id: int | None = None, node: str | None = None) -> Iterator[Row]:
        from fs_cc360.outbox import _paginate

        filters = {"status": status, "kind": kind, "call_key": call_key,
                   "since": since, "until": until, "node": node}
        return _paginate(lambda before, size: self.list_page(
            **filters, before_id=before, limit=size), limit, before_id)

    # -- console reads ------------------------------------------------------------------

    def _has_row_from(self, call_key: str, from_id: int) -> bool:
        with self._read():
            return self._sql("SELECT 1 FROM outbox WHERE call_key = %s AND id >= %s LIMIT 1",
                             (call_key, from_id)).fetchone() is not None

    def _rows_of(self, keys: Sequence[str]) -> list[list[Row]]:
        if not keys:
            return []
        by_key: dict[str, list[Row]] = {key: [] for key in keys}
        with self._read():
            for values in self._sql(f"SELECT {_COLUMNS} FROM outbox WHERE call_key = ANY(%s) "
                                    "ORDER BY call_key, id", (list(keys),)).fetchall():
                row = self._tuple_row(values)
                by_key[row.call_key].append(row)
        return [by_key[key] for key in keys]

    def call_history(self, call_key: str, limit: int = PAGE_SIZE
                     ) -> tuple[list[Row], list[Attempt]]:
        rows = self._rows_of([call_key])[0][:limit]
        if not rows:
            return [], []
        with self._read():
            found = self._sql(_HISTORY_SQL, ([row.id for row in rows],)).fetchall()
        return rows, [Attempt(*values) for values in found]

    def count_status(self, status: OutboxStatus | str) -> int:
        with self._read():
            return self._sql("SELECT COUNT(*) FROM outbox WHERE status = %s",
                             (OutboxStatus(status).value,)).fetchone()[0]

    def final_counts_since(self, since: float) -> dict[tuple[OutboxStatus, str], int]:
        with self._read():
            found = self._sql(_FINAL_SQL, (since,)).fetchall()
        return {(OutboxStatus(status), kind): n for status, kind, n in found}

    def delivered_per_minute(self, since: float, until: float) -> list[tuple[float, int]]:
        first = math.floor(since / 60)
        last = math.floor(until / 60)
        with self._read():
            found = dict(self._sql(_PER_MINUTE_SQL,
                                   (first * 60.0, (last + 1) * 60.0)).fetchall())
        return [(minute * 60.0, found.get(minute, 0)) for minute in range(first, last + 1)]

    def explain_console(self) -> dict[str, list[str]]:
        """``EXPLAIN`` of each console query (plan lines)."""
        queries = {
            **{f"search {column}": (sql, ("x", 1, 1)) for column, sql in _SEARCH_SQL.items()},
            "history": (_HISTORY_SQL, ([1, 2],)),
            "final": (_FINAL_SQL, (0.0,)),
            "per_minute": (_PER_MINUTE_SQL, (0.0, 1.0)),
        }
        with self._read():
            return {name: [line[0] for line in self._sql("EXPLAIN " + sql, params).fetchall()]
                    for name, (sql, params) in queries.items()}

    def explain_claim(self, exclude: int = 0) -> list[str]:
        """``EXPLAIN`` of the claim (run in a rolled-back transaction: it is an UPDATE)."""
        with self._read():
            with self._db.atomic() as txn:
                plan = [line[0] for line in self._sql(
                    "EXPLAIN " + _CLAIM_SQL,
                    (1.0, self.node, 0.0, 0.0, [f"k{i}" for i in range(exclude)], 10)
                ).fetchall()]
                txn.rollback()
        return plan

    def drop_schema(self) -> None:
        """Drop the outbox tables (tests and benchmarks only: everything is lost)."""
        with self._write():
            self._sql("DROP TABLE IF EXISTS outbox, outbox_meta, outbox_attempt")


def _bind(db: peewee.Database) -> tuple[type[OutboxEntry], type[OutboxMeta]]:
    class Entry(_Entry):
        class Meta:
            database = db
            table_name = "outbox"

    class Meta_(OutboxMeta):
        class Meta:
            database = db
            table_name = "outbox_meta"

    return Entry, Meta_
