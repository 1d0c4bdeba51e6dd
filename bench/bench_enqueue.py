"""Durable enqueue: CC360 events/s committed by ``OutboxWriter.enqueue_nowait`` (group
commit, ``synchronous=FULL``) vs a raw batched ``sqlite3`` insert loop.

Both start from the same ``NewItem`` objects (:func:`bench.harness.make_items`: real
CC360 events the tracker made from the captures, each copied under fresh call ids,
recording links included: ~200-byte JSON requests) and write the same rows into the same
schema (a fresh file created by ``Outbox``, every index included), with the same pragmas
(WAL, ``synchronous=FULL``), in the same temporary directory (same disk).

* writer: a producer greenlet calls ``enqueue_nowait`` for every item, yielding to the hub
  every ``--burst`` items (events arrive in bursts, as from the ESL reader); the writer
  thread commits whatever queued up meanwhile (at most ``max_batch``=1000 per
  transaction), checks each call's head and serialises the request;
* raw: ``BEGIN IMMEDIATE; executemany(INSERT ...) ; COMMIT`` per 1000 rows on a plain
  ``sqlite3`` connection, JSON serialised in the loop, ``is_head`` computed in Python (no
  head lookup: the baseline is the best case for raw SQLite).

Each side runs ``--repeat`` times on a fresh file; the best run of each is compared.
Last line: writer / raw (goal >= 0.5x).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import sqlite3  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gevent  # noqa: E402

from bench.harness import machine, make_items, report  # noqa: E402
from fs_cc360.outbox import _INSERT_SQL, NewItem, Outbox, OutboxWriter  # noqa: E402

BATCH = 1000


def run_writer(path: Path, items: list[NewItem], burst: int) -> tuple[float, int]:
    writer = OutboxWriter(str(path), synchronous="FULL")
    try:
        gc.collect()
        started = time.perf_counter()
        results = []
        for i, item in enumerate(items, 1):
            results.append(writer.enqueue_nowait(item))
            if i % burst == 0:
                gevent.sleep(0)
        writer.flush()
        for result in results:
            result.get()  # raises if a commit failed
        elapsed = time.perf_counter() - started
        commits = writer.commits
    finally:
        writer.close()
    return elapsed, commits


def run_raw(path: Path, items: list[NewItem]) -> float:
    Outbox(str(path), synchronous="FULL").close()  # the same schema and indexes
    db = sqlite3.connect(str(path), isolation_level=None)
    try:
        for pragma in ("journal_mode = wal", "synchronous = FULL", "busy_timeout = 5000",
                       "foreign_keys = 1"):
            db.execute(f"PRAGMA {pragma}")
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        gc.collect()
        started = time.perf_counter()
        seen: set[str] = set()
        for start in range(0, len(items), BATCH):
            now = time.time()
            rows = []
            for item in items[start:start + BATCH]:
                head = item.call_key not in seen
                seen.add(item.call_key)
                rows.append((item.call_key, item.kind, item.user, item.callerid,
                             item.request.to_json(), int(head), now, now, now, item.event_at))
            db.execute("BEGIN IMMEDIATE")
            db.executemany(_INSERT_SQL, rows)
            db.execute("COMMIT")
        elapsed = time.perf_counter() - started
        (count,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        assert count == len(items)
    finally:
        db.close()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="CC360 events per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side")
    parser.add_argument("--burst", type=int, default=100,
                        help="items the producer enqueues before yielding to the hub")
    args = parser.parse_args()
    print(f"bench_enqueue on {machine()}")
    items = make_items(args.events)
    size = sum(len(item.request.to_json()) for item in items) / len(items)
    print(f"{len(items)} CC360 events, {len({i.call_key for i in items})} calls, "
          f"average request JSON {size:.0f} bytes, sqlite {sqlite3.sqlite_version}")
    writer_best = raw_best = float("inf")
    commits_best = 0
    with tempfile.TemporaryDirectory(prefix="bench-enqueue-") as tmp_name:
        tmp = Path(tmp_name)
        print(f"files in {tmp} (same disk for both)")
        for n in range(args.repeat):
            elapsed = run_raw(tmp / f"raw{n}.sqlite3", items)
            raw_best = min(raw_best, elapsed)
            print(f"  raw    run {n + 1}: {elapsed:6.2f} s  {len(items) / elapsed:8.0f} events/s")
            elapsed, commits = run_writer(tmp / f"writer{n}.sqlite3", items, args.burst)
            if elapsed < writer_best:
                writer_best, commits_best = elapsed, commits
            print(f"  writer run {n + 1}: {elapsed:6.2f} s  {len(items) / elapsed:8.0f} "
                  f"events/s  ({commits} commits, {len(items) / commits:.0f} events each)")
    writer_rate = len(items) / writer_best
    raw_rate = len(items) / raw_best
    print(f"RESULT enqueue writer={writer_rate:.0f}/s raw={raw_rate:.0f}/s "
          f"commits={commits_best} (each an fsync, synchronous=FULL)")
    print(report("enqueue_writer_vs_raw_sqlite", writer_rate / raw_rate, "goal >= 0.5x"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
