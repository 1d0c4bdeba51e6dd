"""The shared PostgreSQL outbox against SQLite, from the same run, and node failover.

A PostgreSQL 15 server is started for the run like the tests do (tests/pg_server.py:
initdb in a temporary directory, Unix socket, no TCP) but with ``fsync`` ON, so both
sides pay a real flush per commit (SQLite: WAL, ``synchronous=FULL``).

A. Enqueue: ``OutboxWriter.enqueue_nowait`` (group commit, at most 1000 rows per
   transaction) of the same ``--rows`` items (real CC360 events, fresh call ids), rows/s.
B. Delivery: a ``Deliverer`` (+ ``OutboxWriter`` + ``Cc360Client``) draining a pre-filled
   outbox to the fake CRM in its own process, rows/s: with the CRM answering after
   50 ms (concurrency 8: ideal 160/s) and at once (concurrency 16: the outbox's own cost).
C. Failover: two connector processes (``fs-cc360 run``) on the PostgreSQL outbox, each
   with its own fake FreeSWITCH; node A gets ``--calls`` calls while the CRM is slow
   (0.3 s), then is killed with SIGKILL. Both nodes deliver every row of the shared
   outbox all along, so A's *pending* rows keep flowing through B without a pause; what
   a kill strands is the rows A held in flight (leased). Measured from the kill: when
   the first and the last of those reach the CRM through B. Bounded by configuration:
   ``lease_seconds`` (``--lease``) + the reclaim interval (lease/4) + B's poll (1 s).

Last line: PostgreSQL / SQLite enqueue rate (informational: a PostgreSQL transaction
costs a few round trips to a server process that SQLite, a library, does not pay).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gevent  # noqa: E402
import gevent.event  # noqa: E402

from bench.harness import (  # noqa: E402
    CRM_LOGIN,
    CRM_PASSWORD,
    CRM_TOKEN,
    RemoteCrm,
    ServiceProcess,
    expected_events,
    machine,
    make_call,
    make_items,
    new_fs,
    report,
    wait_until,
    write_config,
)
from fs_cc360.cc360 import Cc360Client  # noqa: E402
from fs_cc360.config import load_settings  # noqa: E402
from fs_cc360.delivery import Deliverer  # noqa: E402
from fs_cc360.outbox import NewItem, OutboxWriter, open_outbox  # noqa: E402
from fs_cc360.outbox_pg import PgOutbox  # noqa: E402
from fs_cc360.service import tracker_config  # noqa: E402
from tests.pg_server import PgServer  # noqa: E402


def enqueue_rate(database: str, items: list[NewItem], burst: int = 50) -> float:
    """A: rows/s of group-committed enqueues."""
    writer = OutboxWriter(database, synchronous="FULL", node="bench")
    try:
        started = time.perf_counter()
        results = []
        for i, item in enumerate(items, 1):
            results.append(writer.enqueue_nowait(item))
            if i % burst == 0:
                gevent.sleep(0)
        writer.flush()
        for result in results:
            result.get()
        elapsed = time.perf_counter() - started
    finally:
        writer.close()
    return len(items) / elapsed


def bytes_per_row(database: str) -> float:
    """On-disk size of the outbox (table, TOAST and every index) per row."""
    box = PgOutbox(database, node="bench")
    try:
        with box._read():
            size, rows = box._sql("SELECT pg_total_relation_size('outbox'), "
                                  "(SELECT COUNT(*) FROM outbox)").fetchone()
    finally:
        box.close()
    return size / max(rows, 1)


def delivery_rate(database: str, rows: int, concurrency: int, latency: float) -> float:
    """B: rows/s of a Deliverer draining ``rows`` pre-filled rows."""
    box = open_outbox(database, node="bench")
    box.enqueue(make_items(rows, seed=concurrency))
    box.close()
    crm = RemoteCrm(latency=latency, keep=False)
    writer = OutboxWriter(database, node="bench")
    client = Cc360Client(crm.url, CRM_TOKEN, auth="forms", login=CRM_LOGIN,
                         password=CRM_PASSWORD, timeout=5, lanes=concurrency)
    deliverer = Deliverer(writer, client, concurrency=concurrency, realtime_ttl=3600)
    stop = gevent.event.Event()
    try:
        started = time.perf_counter()
        runner = gevent.spawn(deliverer.run, stop)
        done = wait_until(lambda: deliverer.counts.delivered >= rows, timeout=rows / 5 + 60,
                          interval=0.01)
        elapsed = time.perf_counter() - started
        stop.set()
        runner.join(10)
        assert done, f"delivered {deliverer.counts.delivered} of {rows}"
        assert crm.count() == rows, "the CRM must have accepted each row once"
    finally:
        writer.close()
        client.close()
        crm.stop()
    return rows / elapsed


def held_by(reader: PgOutbox, node: str) -> set[int]:
    """Ids of the rows ``node`` holds in flight (its lease)."""
    with reader._read():
        return {found[0] for found in reader._sql(
            "SELECT id FROM outbox WHERE status = 'inflight' AND lease_node = %s",
            (node,)).fetchall()}


def failover(tmp: Path, server: PgServer, calls: int, lease: float) -> tuple[float, float, int]:
    """C: (first and last of the rows the dead node held in flight delivered by the
    other, seconds after the SIGKILL; how many it held)."""
    url = server.create_database("failover")
    crm = RemoteCrm(latency=0.3)
    fs_a, fs_b = new_fs(), new_fs()
    nodes = []
    for name, fs in (("A", fs_a), ("B", fs_b)):
        (tmp / name).mkdir()
        config = write_config(tmp / name / "fs-cc360.ini", fs_port=fs.port, crm_url=crm.url,
                              database=url, overrides={
                                  "outbox": {"node": name,
                                             "journal": tmp / name / "journal.sqlite3"},
                                  "delivery": {"lease_seconds": lease, "concurrency": 4,
                                               "realtime_ttl": 3600}})
        nodes.append(ServiceProcess(config, tmp / name / "service.log").start())
    reader = PgOutbox(url, node="bench")
    try:
        assert fs_a.wait_connected(30) and fs_b.wait_connected(30)
        made = [make_call(i, seed=77) for i in range(calls)]
        expected = expected_events(
            made, tracker_config(load_settings(None, env={}, require_crm=False))).total
        fs_a.push_events([body for call in made for body in call.frames])
        assert wait_until(lambda: reader.stats(node="A").total >= expected, 60)
        assert wait_until(lambda: len(held_by(reader, "A")) >= 2, 30)
        nodes[0].kill9()
        killed_at = time.time()
        in_flight = held_by(reader, "A")
        waiting = in_flight
        crm.set_latency(0.0)
        first = last = None
        deadline = time.time() + lease * 3 + 60
        while time.time() < deadline and (first is None or last is None):
            delivered = {r.id: r.delivered_at for r in reader.list_rows(
                status="delivered", limit=None)}
            moved = [delivered[i] for i in waiting if i in delivered]
            if first is None and moved:
                first = min(moved) - killed_at
            if in_flight and all(i in delivered for i in in_flight):
                last = max(delivered[i] for i in in_flight) - killed_at
            time.sleep(0.05)
        assert first is not None and last is not None, "node B did not take over"
        assert wait_until(lambda: reader.stats().count("delivered") >= expected, 60)
        return first, last, len(in_flight)
    finally:
        reader.close()
        for node in nodes:
            node.stop()
        fs_a.close()
        fs_b.close()
        crm.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000, help="rows enqueued (A)")
    parser.add_argument("--deliver", type=int, default=2000, help="rows delivered (B)")
    parser.add_argument("--calls", type=int, default=40, help="calls on the killed node (C)")
    parser.add_argument("--lease", type=float, default=10.0, help="lease_seconds (C)")
    args = parser.parse_args()
    print(f"bench_pg: {machine()}")
    server = PgServer(durable=True)
    server.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-pg-") as tmp_name:
            tmp = Path(tmp_name)
            items = make_items(args.rows)
            sqlite_enq = enqueue_rate(str(tmp / "enqueue.sqlite3"), items)
            pg_url = server.create_database("enqueue")
            pg_enq = enqueue_rate(pg_url, items)
            print(f"A. enqueue, {args.rows} rows, group commit: SQLite {sqlite_enq:.0f}/s, "
                  f"PostgreSQL {pg_enq:.0f}/s ({pg_enq / sqlite_enq:.2f}x); PostgreSQL "
                  f"outbox on disk {bytes_per_row(pg_url):.0f} bytes/row with its indexes")
            for concurrency, latency in ((8, 0.05), (16, 0.0)):
                rows = args.deliver if latency == 0 else min(args.deliver, 800)
                sqlite_del = delivery_rate(str(tmp / f"deliver-{concurrency}.sqlite3"), rows,
                                           concurrency, latency)
                pg_del = delivery_rate(server.create_database(f"deliver{concurrency}"), rows,
                                       concurrency, latency)
                print(f"B. delivery, {rows} rows, concurrency {concurrency}, CRM latency "
                      f"{latency * 1000:.0f} ms: SQLite {sqlite_del:.0f}/s, PostgreSQL "
                      f"{pg_del:.0f}/s ({pg_del / sqlite_del:.2f}x)")
            first, last, in_flight = failover(tmp, server, args.calls, args.lease)
            print(f"C. failover, lease_seconds {args.lease:g}: node A killed (SIGKILL) "
                  f"holding {in_flight} rows in flight; node B delivered the first of them "
                  f"{first:.2f} s after the kill, the last {last:.2f} s after (bound: lease "
                  f"+ lease/4 + 1 s poll = {args.lease * 1.25 + 1:.1f} s); A's pending rows "
                  "never stopped flowing (B delivers every node's rows)")
            print(f"RESULT pg enqueue_sqlite={sqlite_enq:.0f} enqueue_pg={pg_enq:.0f} "
                  f"failover_first_s={first:.2f} failover_inflight_s={last:.2f}")
            print(report("pg_over_sqlite_enqueue", pg_enq / sqlite_enq,
                         "informational: PostgreSQL is a server, SQLite a library"))
    finally:
        server.close()


if __name__ == "__main__":
    main()
