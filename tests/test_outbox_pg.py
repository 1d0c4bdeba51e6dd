"""What only the shared PostgreSQL outbox does (the common contract is in test_outbox.py):
several nodes on one database, claims that never overlap, leases taken over from a dead
node, one summary per call across nodes, node filters, URL/password handling and a
clear error when the server is unreachable. A real server: tests/pg_server.py."""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from gevent.threadpool import ThreadPool

from fs_cc360.config import mask_database_url
from fs_cc360.errors import OutboxError
from fs_cc360.outbox import Mark, OutboxStatus, OutboxWriter, open_outbox
from fs_cc360.outbox_pg import PgOutbox, connect_params
from fs_cc360.simulators import wait_until
from tests.fixtures import item

T0 = 1_000_000.0


@pytest.fixture
def two(pg_url: str) -> Iterator[tuple[PgOutbox, PgOutbox]]:
    a = PgOutbox(pg_url, node="node-a")
    b = PgOutbox(pg_url, node="node-b")
    yield a, b
    a.close()
    b.close()


def test_the_factory_picks_the_backend_by_url(pg_url: str, tmp_path: Any) -> None:
    box = open_outbox(pg_url, node="n1")
    assert isinstance(box, PgOutbox) and box.node == "n1"
    box.close()
    sqlite = open_outbox(str(tmp_path / "o.sqlite3"))
    assert not isinstance(sqlite, PgOutbox) and sqlite.node == ""
    sqlite.close()


def test_every_row_records_its_node_and_stats_and_lists_filter_by_it(
        two: tuple[PgOutbox, PgOutbox]) -> None:
    a, b = two
    a.enqueue([item("a1", "ringing"), item("a1", "summary")], now=T0)
    b.enqueue([item("b1", "ringing")], now=T0)
    assert {row.call_key: row.node for row in a.list_rows(limit=None)} == {
        "a1": "node-a", "b1": "node-b"}
    assert [row.call_key for row in a.list_rows(node="node-b", limit=None)] == ["b1"]
    stats = b.stats()
    assert stats.total == 3
    assert stats.by_node["node-a"][OutboxStatus.pending] == 2
    assert stats.by_node["node-b"][OutboxStatus.pending] == 1
    only_b = b.stats(node="node-b")
    assert only_b.total == 1 and set(only_b.by_node) == {"node-b"}
    assert stats.to_dict()["by_node"]["node-a"]["pending"] == 2


def test_a_row_claimed_by_one_node_is_not_claimed_by_another(
        two: tuple[PgOutbox, PgOutbox]) -> None:
    a, b = two
    a.enqueue([item("x", "ringing"), item("x", "answer"), item("y", "ringing")], now=T0)
    got_a = a.claim_due(T0, 1, 60)
    got_b = b.claim_due(T0, 10, 60)
    assert [r.call_key for r in got_a] == ["x"] and [r.call_key for r in got_b] == ["y"]
    assert b.claim_due(T0, 10, 60) == []  # x's next row waits for x's head
    b.mark_delivered(got_b[0].id, 200, now=T0)
    a.mark_delivered(got_a[0].id, 200, now=T0)
    (answer,) = b.claim_due(T0, 10, 60)
    assert (answer.call_key, answer.kind) == ("x", "answer")


def test_concurrent_deliverers_never_send_a_row_twice_and_keep_per_call_order(
        pg_url: str) -> None:
    """Four deliverers (native threads, one connection each) drain 150 calls of 4 rows."""
    calls, kinds = 150, ("ringing", "answer", "hangup", "summary")
    writer = PgOutbox(pg_url, node="writer")
    writer.enqueue([item(f"c{n}", kind) for n in range(calls) for kind in kinds], now=T0)
    writer.close()
    sent: list[tuple[str, str, int]] = []  # (call, kind, id) in the order delivered
    sent_lock = threading.Lock()

    def deliver(node: str) -> int:
        box = PgOutbox(pg_url, node=node)
        count = 0
        try:
            marks: list[Mark] = []
            for _ in range(calls * len(kinds)):  # bounded: at most one row per turn
                claimed = box.mark_and_claim(marks, T0, 7, 60)
                marks = []
                if not claimed.rows and claimed.next_due_at is None:
                    if box.stats().count("inflight") == 0:
                        break
                for row in claimed.rows:
                    with sent_lock:
                        sent.append((row.call_key, row.kind, row.id))
                    marks.append(Mark.delivered(row.id, 200, now=T0))
                    count += 1
            box.mark_many(marks)
        finally:
            box.close()
        return count

    pool = ThreadPool(4)
    try:
        results = [pool.spawn(deliver, f"node-{n}") for n in range(4)]
        counts = [result.get(timeout=120) for result in results]
    finally:
        pool.kill()
    assert sum(counts) == calls * len(kinds)
    ids = [row_id for _, _, row_id in sent]
    assert len(ids) == len(set(ids))  # nobody sent a row another had claimed
    per_call: dict[str, list[str]] = collections.defaultdict(list)
    for call, kind, _ in sent:
        per_call[call].append(kind)
    assert all(order == list(kinds) for order in per_call.values())


def test_a_dead_nodes_leases_are_taken_over_and_start_up_releases_only_its_own(
        two: tuple[PgOutbox, PgOutbox]) -> None:
    a, b = two
    a.enqueue([item("x", "ringing"), item("y", "ringing")], now=T0)
    (x,) = a.claim_due(T0, 1, lease_seconds=30)
    (y,) = b.claim_due(T0, 1, lease_seconds=30)
    assert b.release_leases() == 1  # b restarted: only b's row goes back
    assert a.get(x.id).status is OutboxStatus.inflight  # type: ignore[union-attr]
    assert a.get(y.id).status is OutboxStatus.pending  # type: ignore[union-attr]
    assert b.reclaim_expired_leases(T0 + 10) == 0  # a's lease still runs
    assert b.reclaim_expired_leases(T0 + 31) == 1  # a died: its row comes back
    claimed = b.claim_due(T0 + 31, 10, 30)
    assert {row.call_key for row in claimed} == {"x", "y"}
    _, attempts = b.call_history("x")
    assert [attempt.outcome for attempt in attempts] == ["reclaimed"]


def test_one_summary_per_call_across_nodes_even_racing(pg_url: str) -> None:
    boxes = [PgOutbox(pg_url, node=f"n{n}") for n in range(4)]
    barrier = threading.Barrier(4)

    def add(box: PgOutbox) -> list[int]:
        barrier.wait(timeout=30)
        return box.enqueue([item(f"call-{n}", "summary") for n in range(50)], now=T0)

    pool = ThreadPool(4)
    try:
        results = [pool.spawn(add, box) for box in boxes]
        ids = [result.get(timeout=120) for result in results]
    finally:
        pool.kill()
    assert ids[0] == ids[1] == ids[2] == ids[3]  # every node got the one row's id
    assert boxes[0].stats().total == 50
    assert sum(box.summaries_skipped for box in boxes) == 150
    for box in boxes:
        box.close()


def test_password_comes_from_the_url_or_the_setting_and_is_never_shown() -> None:
    url = "postgresql://fs:s%40cret@db.example:6432/cc360?sslmode=require"
    params = connect_params(url)
    assert params["password"] == "s@cret" and params["host"] == "db.example"
    assert params["port"] == 6432 and params["dbname"] == "cc360"
    assert params["sslmode"] == "require" and params["connect_timeout"] == 5
    assert connect_params(url, "other")["password"] == "other"
    assert mask_database_url(url) == "postgresql://fs:***@db.example:6432/cc360?sslmode=require"
    assert mask_database_url("postgresql://fs@db/cc360") == "postgresql://fs@db/cc360"


def test_an_unreachable_server_is_a_clear_error_without_the_password(tmp_path: Any) -> None:
    url = f"postgresql://fs:hunter2hunter2@/cc360?host={tmp_path}"  # no server there
    with pytest.raises(OutboxError) as caught:
        PgOutbox(url, node="n")
    message = str(caught.value)
    assert "PostgreSQL unreachable" in message and "hunter2" not in message
    assert "postgresql://fs:***@/cc360" in message


def test_a_missing_database_says_how_to_create_it(pg_server: Any) -> None:
    with pytest.raises(OutboxError, match="createdb"):
        PgOutbox(pg_server.url("no_such_db"), node="n")


def test_the_connection_comes_back_after_a_server_restart(pg_url: str, pg_server: Any) -> None:
    box = PgOutbox(pg_url, node="n")
    box.enqueue([item("a", "ringing")], now=T0)
    pg_server.stop("immediate")
    try:
        with pytest.raises(OutboxError, match="PostgreSQL unreachable"):
            box.enqueue([item("b", "ringing")], now=T0)
    finally:
        pg_server.start()
    box.enqueue([item("c", "ringing")], now=T0)  # a new connection, no restart of ours
    assert [row.call_key for row in box.list_rows(limit=None)] == ["c", "a"]
    box.close()


def test_the_cli_shows_and_filters_by_node(pg_url: str, tmp_path: Any,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from fs_cc360.cli import main

    a = PgOutbox(pg_url, node="fs1")
    b = PgOutbox(pg_url, node="fs2")
    a.enqueue([item("a1", "ringing")], now=T0)
    b.enqueue([item("b1", "ringing"), item("b1", "summary")], now=T0)
    a.close()
    b.close()
    config = tmp_path / "fs-cc360.ini"
    config.write_text(f"[outbox]\ndatabase = {pg_url}\nnode = fs1\n\n[webapi]\nenabled = false\n")
    capsys.readouterr()
    main(["--config", str(config), "outbox", "stats"])
    out = capsys.readouterr().out
    assert "NODE" in out and "fs1" in out and "fs2" in out
    main(["--config", str(config), "outbox", "stats", "--node", "fs2", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["total"] == 2 and list(data["by_node"]) == ["fs2"]
    main(["--config", str(config), "outbox", "list", "--node", "fs1", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [(row["call_key"], row["node"]) for row in rows] == [("a1", "fs1")]
    main(["--config", str(config), "outbox", "list"])
    out = capsys.readouterr().out
    assert "NODE" in out.splitlines()[0] and "fs2" in out


def test_a_held_summary_in_a_batch_does_not_block_its_calls_next_row(
        two: tuple[PgOutbox, PgOutbox]) -> None:
    a, _ = two
    (summary,) = a.enqueue([item("x", "summary")], now=T0)
    a.claim_due(T0, 1, 60)
    a.mark_delivered(summary, 200, now=T0)
    again, late = a.enqueue([item("x", "summary"), item("x", "hangup")], now=T0 + 1)
    assert again == summary and late > summary
    (claimed,) = a.claim_due(T0 + 1, 10, 60)
    assert claimed.id == late  # the late row is its call's head


def test_backfill_on_two_nodes_never_doubles_a_summary(
        pg_url: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """The same CDR files backfilled on fs1, then on fs2 (a replay on another node): the
    second finds every summary already in the shared outbox."""
    import shutil
    from pathlib import Path

    from fs_cc360.cli import main

    cdr = tmp_path / "json_cdr"
    cdr.mkdir()
    captures = Path(__file__).parent / "captures" / "json_cdr"
    for scenario in ("a_inbound_answered_caller_hangup", "m_attended_transfer"):
        for path in (captures / scenario).glob("*.json"):
            shutil.copy(path, cdr / path.name)
    ages = ("--min-age", "0", "--max-age", "36500")  # the captures' calls are old
    outputs = []
    for node in ("fs1", "fs2"):
        config = tmp_path / f"{node}.ini"
        config.write_text(f"[outbox]\ndatabase = {pg_url}\nnode = {node}\n\n"
                          "[webapi]\nenabled = false\n")
        capsys.readouterr()
        assert main(["--config", str(config), "backfill", str(cdr), *ages]) == 0
        outputs.append(capsys.readouterr().out)
    assert "3 summaries enqueued, 0 duplicates" in outputs[0]
    assert "0 summaries enqueued, 3 duplicates" in outputs[1]
    box = PgOutbox(pg_url, node="check")
    assert [(row.kind, row.node) for row in box.list_rows(limit=None)] == [("summary", "fs1")] * 3
    box.close()


def test_a_slow_postgresql_never_blocks_the_hub(pg_url: str) -> None:
    """An enqueue waiting on a lock held by another session (lock_timeout 5 s) waits in
    the writer's native thread: greenlets keep running meanwhile; it completes once the
    lock is released."""
    import gevent
    import psycopg

    writer = OutboxWriter(pg_url, node="fs1")
    ticks = [0]

    def ticker() -> None:
        while True:
            ticks[0] += 1
            gevent.sleep(0.01)

    params = connect_params(pg_url)
    blocker = psycopg.connect(**params)
    try:
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
        running = gevent.spawn(ticker)
        job = gevent.spawn(writer.enqueue, [item("a", "ringing")])
        # the ticker goes round and round while the enqueue is stuck on the lock
        # (lock_timeout 5 s: the wait is bounded below that)
        assert wait_until(lambda: ticks[0] >= 20, 4, interval=0.01)
        assert not job.ready()
        blocker.execute("ROLLBACK")
        (row_id,) = job.get(timeout=10)
        assert row_id > 0
        running.kill()
    finally:
        blocker.close()
        writer.close()


def test_missing_postgresql_binaries_fail_saying_how_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import pg_server

    monkeypatch.setattr(pg_server, "BIN_DIRS", ("/nonexistent/bin",))
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError, match="apt-get install -y postgresql"):
        pg_server.find_bin_dir()
