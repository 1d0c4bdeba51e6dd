"""Nothing lost while PostgreSQL is down: a local SQLite journal in front of a shared outbox.

:class:`JournaledOutbox` is what the service's :class:`~fs_cc360.outbox.OutboxWriter`
holds when ``[outbox] database`` is ``postgresql://``. While PostgreSQL answers, an
enqueue goes straight to it. When it does not (server stopped, network cut, failover),
the rows are committed to the journal instead, a SQLite file on this host
(``[outbox] journal``, ``synchronous=FULL``): the ESL reader never waits, nothing is
held only in memory. Once the journal holds anything, every later enqueue goes there
too, so a call's rows can never overtake each other; the journal is moved to PostgreSQL
in id order, batch by batch, by the next enqueue or health probe that finds the server
back, and then enqueues go straight to PostgreSQL again.

Moving is exactly-once: each batch is inserted into PostgreSQL in one transaction that
also records, in ``outbox_meta``, the last journal id moved (keyed by this journal's
random id, so a deleted and recreated journal never matches an old mark); the batch is
deleted from the journal afterwards. A crash between the two leaves rows in the journal
that the next move skips.

Everything else (claims, marks, reads) is the PostgreSQL outbox's: while the server is
down those raise :class:`OutboxError` (the deliverer waits and retries), and the rows in
the journal are delivered once they reach PostgreSQL. ``journaled`` (rows waiting here)
feeds ``/healthz``, ``/metrics`` and ``outbox stats``.
"""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fs_cc360.crm_request import CrmRequest
from fs_cc360.errors import OutboxError
from fs_cc360.outbox import NewItem
from fs_cc360.outbox_pg import PgOutbox

log = logging.getLogger(__name__)

#: Journal rows moved to PostgreSQL per transaction.
MOVE_BATCH = 500
#: Batches one move may do before giving the writer thread back to other calls.
MOVE_BATCHES = 20
#: After PostgreSQL was found unreachable, calls fail at once for this long (seconds)
#: before one tries to connect again.
RETRY_SECONDS = 2.0


class Journal:
    """The journal file: ``journal(id, item)`` rows, each a JSON :class:`NewItem`."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA busy_timeout = 5000")
            self._db.execute("CREATE TABLE IF NOT EXISTS journal (id INTEGER PRIMARY KEY "
                             "AUTOINCREMENT, item TEXT NOT NULL, created_at REAL NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS journal_meta (key TEXT PRIMARY KEY, "
                             "value TEXT NOT NULL)")
            self._db.execute("INSERT OR IGNORE INTO journal_meta VALUES ('id', ?)",
                             (uuid.uuid4().hex,))
            self.journal_id: str = self._db.execute(
                "SELECT value FROM journal_meta WHERE key = 'id'").fetchone()[0]
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"outbox journal {path} cannot be opened ({exc}): check that "
                              "its directory exists and is writable by this user",
                              orig=exc) from exc

    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM journal").fetchone()[0]

    def append(self, items: Sequence[NewItem], now: float) -> list[int]:
        """Commit ``items`` (one transaction, fsync'ed); returns their journal ids."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            ids = [self._db.execute("INSERT INTO journal (item, created_at) VALUES (?, ?)",
                                    (_dump(item), now)).lastrowid for item in items]
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise OutboxError(f"outbox journal {self.path}: {exc}: PostgreSQL is unreachable "
                              "and the local journal cannot be written either: free space "
                              "or fix the permissions of that file", orig=exc) from exc
        return [int(row_id) for row_id in ids if row_id is not None]

    def oldest(self, after: int, limit: int) -> list[tuple[int, NewItem, float]]:
        return [(row_id, _load(text), created_at) for row_id, text, created_at in
                self._db.execute("SELECT id, item, created_at FROM journal WHERE id > ? "
                                 "ORDER BY id LIMIT ?", (after, limit))]

    def delete_through(self, last_id: int) -> None:
        self._db.execute("DELETE FROM journal WHERE id <= ?", (last_id,))

    def close(self) -> None:
        self._db.close()


def _dump(item: NewItem) -> str:
    return json.dumps({"call_key": item.call_key, "kind": item.kind,
                       "request": item.request.to_json(), "user": item.user,
                       "callerid": item.callerid, "event_at": item.event_at})


def _load(text: str) -> NewItem:
    data = json.loads(text)
    return NewItem(data["call_key"], data["kind"], CrmRequest.from_json(data["request"]),
                   user=data["user"], callerid=data["callerid"], event_at=data["event_at"])


class JournaledOutbox:
    """A :class:`PgOutbox` with a local :class:`Journal` (see the module docstring).

    Same methods as the outbox; all but the ones below go to PostgreSQL as they are.
    Plain synchronous code for :class:`~fs_cc360.outbox.OutboxWriter`'s one thread.
    """

    def __init__(self, database: str, journal: str, *, clock: Callable[[], float] = time.time,
                 **pg_options: Any) -> None:
        self._database = database
        self._pg_options = {**pg_options, "clock": clock}
        self._clock = clock
        self.journal = Journal(journal)
        self.journaled = self.journal.count()
        self._pg: PgOutbox | None = None
        #: monotonic time before which PostgreSQL counts as down (calls fail at once)
        self._down_until = 0.0
        from fs_cc360.config import mask_database_url

        self.path = mask_database_url(database)
        self.node = pg_options.get("node") or socket.gethostname()
        self._pg_options["node"] = self.node
        self.summaries_skipped = 0
        try:
            self._server()
        except OutboxError as exc:  # start anyway: the journal keeps what comes
            log.error("outbox.postgresql_unreachable journal=%s journaled=%d error=%s",
                      journal, self.journaled, exc)
        if self.journaled:
            log.warning("outbox.journal_found rows=%d journal=%s: moved to PostgreSQL "
                        "when it answers", self.journaled, journal)

    # -- PostgreSQL, connected lazily ------------------------------------------------------

    def _server(self) -> PgOutbox:
        """The PostgreSQL outbox, connected if needed.

        After a call lost the connection, every call fails at once for RETRY_SECONDS:
        against a server that is gone (not refusing: silent) each try could hold the
        writer thread for the connect timeout, and the journal's commits wait behind it.
        """
        now = time.monotonic()
        if now < self._down_until:
            raise OutboxError(f"outbox {self.path}: PostgreSQL unreachable (next try in "
                              f"{self._down_until - now:.1f} s): rows go to the local "
                              f"journal {self.journal.path}")
        if self._pg is None:
            try:
                self._pg = PgOutbox(self._database, **self._pg_options)
            except OutboxError:
                self._down_until = now + RETRY_SECONDS
                raise
            log.info("outbox.postgresql_connected outbox=%s node=%s", self.path, self.node)
        return self._pg

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Around a call to PostgreSQL: a lost connection starts the fail-fast pause."""
        paused = time.monotonic() < self._down_until  # then the call fails at once
        try:
            yield
        except OutboxError:
            if not paused and self._pg is not None and self._pg._db.is_closed():
                self._down_until = time.monotonic() + RETRY_SECONDS
            raise

    def __getattr__(self, name: str) -> Any:
        # everything not defined here is PostgreSQL's (claims, marks, reads, ...)
        if name.startswith("_") or not hasattr(PgOutbox, name):
            return getattr(self._server(), name)  # an attribute (or AttributeError)
        if not callable(getattr(PgOutbox, name)):
            return getattr(self._server(), name)

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._guard():
                return getattr(self._server(), name)(*args, **kwargs)

        return call

    # -- what the journal changes ----------------------------------------------------------

    def enqueue(self, items: Sequence[NewItem], *, now: float | None = None) -> list[int]:
        """Into PostgreSQL when it answers and the journal is empty; else into the journal
        (ids returned negated: they are not outbox ids)."""
        if not items:
            return []
        now = self._clock() if now is None else now
        if self.journaled:
            self._try_move()
        if not self.journaled:
            try:
                with self._guard():
                    server = self._server()
                    ids = server.enqueue(items, now=now)
                self.summaries_skipped = server.summaries_skipped
                return ids
            except OutboxError as exc:
                log.error("outbox.postgresql_unreachable rows=%d error=%s: committing them "
                          "to the local journal %s", len(items), exc, self.journal.path)
        ids = self.journal.append(items, now)
        self.journaled += len(ids)
        return [-row_id for row_id in ids]

    def _try_move(self) -> None:
        try:
            self.move_journal()
        except OutboxError as exc:
            log.debug("outbox.journal_move_deferred error=%s", exc)

    def move_journal(self, batches: int = MOVE_BATCHES) -> int:
        """Move up to ``batches`` batches of journal rows to PostgreSQL, oldest first;
        returns how many moved. Raises :class:`OutboxError` while the server is down."""
        with self._guard():
            return self._move(self._server(), batches)

    def _move(self, server: PgOutbox, batches: int) -> int:
        mark_key = f"journal:{self.node}:{self.journal.journal_id}"
        moved = 0
        for _ in range(batches):
            done = server.meta(mark_key)
            after = int(done) if done else 0
            page = self.journal.oldest(after, MOVE_BATCH)
            if not page:
                self.journal.delete_through(after)
                break
            last_id = page[-1][0]
            server.enqueue([item for _, item, _ in page], now=page[0][2],
                           progress=(mark_key, str(last_id)))
            self.journal.delete_through(last_id)
            moved += len(page)
        self.journaled = self.journal.count()
        if moved:
            log.warning("outbox.journal_moved rows=%d left=%d", moved, self.journaled)
        return moved

    def check_writable(self) -> None:
        """PostgreSQL must answer and the journal must be empty (moved first if it can)."""
        with self._guard():
            self._server().check_writable()
        if self.journaled:
            self.move_journal()
        if self.journaled:
            raise OutboxError(f"outbox {self.path}: {self.journaled} rows in the local "
                              f"journal {self.journal.path} still to move to PostgreSQL")

    def release_leases(self, ids: Iterable[int] | None = None, *,
                       now: float | None = None) -> int:
        """As the outbox's; at start-up with PostgreSQL down this node's leases simply
        expire (any node reclaims them), so that is not an error."""
        try:
            with self._guard():
                return self._server().release_leases(ids, now=now)
        except OutboxError as exc:
            if ids is not None:
                raise
            log.warning("outbox.release_leases_deferred error=%s: this node's in-flight "
                        "rows come back when their leases expire", exc)
            return 0

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()
        self.journal.close()
