"""The outbox reads behind the operator console: search, a call's history, counts of the
last 24 h, deliveries per minute, and the reader that runs them off the gevent hub."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fs_cc360.errors import OutboxError
from fs_cc360.outbox import (
    SEARCH_SCAN_ROWS,
    Mark,
    NewItem,
    Outbox,
    OutboxReader,
    OutboxStatus,
    OutboxWriter,
    is_postgresql,
    open_outbox,
)
from tests.fixtures import request

T0 = 1_800_000_000.0  # a whole minute (divisible by 60)


def new(call: str, kind: str, user: str = "101", callerid: str = "79991234567") -> NewItem:
    return NewItem(call, kind, request(call, kind), user=user, callerid=callerid)


@pytest.fixture(params=["sqlite", "postgresql"])
def box(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outbox]:
    """Every query test runs on both backends (PostgreSQL: a real server, tests/pg_server.py)."""
    if request.param == "postgresql":
        outbox: Outbox = open_outbox(request.getfixturevalue("pg_url"), node="node-a")
    else:
        outbox = Outbox(str(tmp_path / "outbox.sqlite3"), synchronous="NORMAL")
    yield outbox
    outbox.close()


def add_call(box: Outbox, call: str, *, user: str = "101", callerid: str = "79991234567",
             at: float = T0) -> list[int]:
    return box.enqueue([new(call, kind, user, callerid)
                        for kind in ("ringing", "answer", "hangup", "summary")], now=at)


# --------------------------------------------------------------------------- search


def test_search_by_number_agent_and_call_id_newest_first(box: Outbox) -> None:
    add_call(box, "call-a", user="101", callerid="111")
    add_call(box, "call-b", user="102", callerid="222")
    add_call(box, "call-c", user="101", callerid="222")
    page = box.search_calls(callerids=["222"])
    assert [c.call_key for c in page.calls] == ["call-c", "call-b"]
    assert page.next_before is None
    assert [row.kind for row in page.calls[0].rows] == ["ringing", "answer", "hangup",
                                                        "summary"]
    assert [c.call_key for c in box.search_calls(users=["101"]).calls] == ["call-c", "call-a"]
    assert [c.call_key for c in box.search_calls(call_keys=["call-b"]).calls] == ["call-b"]
    # several fields at once: each call once
    both = box.search_calls(callerids=["222"], users=["101"], call_keys=["call-c"])
    assert [c.call_key for c in both.calls] == ["call-c", "call-b", "call-a"]
    assert box.search_calls(callerids=["999"]).calls == []
    assert box.search_calls().calls == []


def test_search_pages_never_repeat_or_skip_a_call(box: Outbox) -> None:
    # interleave two numbers' rows so a call's rows straddle page boundaries
    for n in range(23):
        box.enqueue([new(f"x{n}", "ringing", callerid="555")])
        box.enqueue([new(f"y{n}", "ringing", callerid="666")])
        box.enqueue([new(f"x{n}", "summary", callerid="555")])
    seen: list[str] = []
    before = None
    for _ in range(10):
        page = box.search_calls(callerids=["555"], before_id=before, limit=5)
        seen += [c.call_key for c in page.calls]
        if page.next_before is None:
            break
        before = page.next_before
    assert seen == [f"x{n}" for n in range(22, -1, -1)]


def test_search_reads_a_bounded_number_of_rows(box: Outbox,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """One busy call (many rows) cannot make a page read the whole index."""
    monkeypatch.setattr("fs_cc360.outbox.SEARCH_SCAN_ROWS", 30)
    assert SEARCH_SCAN_ROWS > 30
    box.enqueue([new("old", "summary", callerid="777")])
    box.enqueue([new("busy", "ringing", callerid="777") for _ in range(100)])
    page = box.search_calls(callerids=["777"], limit=5)
    assert [c.call_key for c in page.calls] == ["busy"]
    assert page.next_before is not None  # more to read
    rest = box.search_calls(callerids=["777"], before_id=page.next_before, limit=5)
    assert [c.call_key for c in rest.calls] in (["old"], [])


def test_console_queries_use_their_indexes(box: Outbox) -> None:
    add_call(box, "call-a")
    plans = box.explain_console()
    assert set(plans) == {"search callerid", "search user", "search call_key", "history",
                          "final", "per_minute"}
    if box.node:  # PostgreSQL: on a few rows its planner rightly prefers a scan
        return
    for name, lines in plans.items():
        text = " ".join(lines)
        assert "USING" in text and "INDEX" in text, (name, lines)
        if name.startswith("search"):  # read in index order, stopped early: never sorted
            assert "TEMP B-TREE" not in text, (name, lines)
        assert not any(line.startswith("SCAN outbox") and "INDEX" not in line
                       for line in lines), (name, lines)


# --------------------------------------------------------------------------- history


def test_call_history_records_every_outcome(box: Outbox) -> None:
    ring, _answer, _hangup, summary = add_call(box, "call-a")
    box.mark_many([Mark.retry(ring, T0 + 5, "CC360 unavailable: connection refused",
                              now=T0 + 1)])
    box.mark_delivered(ring, 200, now=T0 + 6)
    box.mark_dead(summary, "CC360 rejected POST: HTTP 404", 404, rejected=True, now=T0 + 7)
    box.requeue(ids=[summary], now=T0 + 8)
    box.mark_expired(summary, now=T0 + 9)
    rows, attempts = box.call_history("call-a")
    assert [row.kind for row in rows] == ["ringing", "answer", "hangup", "summary"]
    assert [(a.row_id, a.outcome, a.status) for a in attempts] == [
        (ring, "retry", None), (ring, "delivered", 200), (summary, "dead", 404),
        (summary, "requeued", None), (summary, "expired", None)]
    assert attempts[0].error == "CC360 unavailable: connection refused"
    assert attempts[3].error == "was dead: sent again"
    assert box.call_history("nope") == ([], [])


def test_a_reclaimed_lease_is_in_the_history(box: Outbox) -> None:
    (row_id,) = box.enqueue([new("call-a", "summary")], now=T0)
    box.claim_due(T0, 1, lease_seconds=10)
    assert box.reclaim_expired_leases(T0 + 20) == 1
    _, attempts = box.call_history("call-a")
    assert [(a.row_id, a.outcome) for a in attempts] == [(row_id, "reclaimed")]


def test_purge_takes_the_history_with_the_rows(box: Outbox) -> None:
    old = add_call(box, "old", at=T0)
    new_ids = add_call(box, "new", at=T0)
    box.mark_many([Mark.delivered(i, 200, now=T0) for i in old]
                  + [Mark.delivered(i, 200, now=T0 + 1000) for i in new_ids])
    assert box.purge_delivered(T0 + 500) == 4
    assert box.call_history("old") == ([], [])
    assert len(box.call_history("new")[1]) == 4
    with box._read():  # no orphan left behind
        assert box._db.execute_sql("SELECT COUNT(*) FROM outbox_attempt").fetchone()[0] == 4


# --------------------------------------------------------------------------- overview


def test_final_counts_since_and_deliveries_per_minute(box: Outbox) -> None:
    a = add_call(box, "a", at=T0)
    b = add_call(box, "b", at=T0)
    box.mark_dead(a[0], "x", 404, now=T0 - 90_000)  # more than a day before T0
    box.mark_dead(a[3], "x", 404, now=T0 + 10)
    box.mark_expired(a[1], now=T0 + 20)
    box.mark_many([Mark.delivered(b[0], 200, now=T0 + 5),
                   Mark.delivered(b[1], 200, now=T0 + 59),
                   Mark.delivered(b[2], 200, now=T0 + 61),
                   Mark.delivered(b[3], 200, now=T0 + 185)])
    assert box.final_counts_since(T0 - 86_400) == {
        (OutboxStatus.dead, "summary"): 1, (OutboxStatus.expired, "answer"): 1}
    assert box.delivered_per_minute(T0, T0 + 200) == [
        (T0, 2), (T0 + 60, 1), (T0 + 120, 0), (T0 + 180, 1)]
    assert box.delivered_per_minute(T0 + 30, T0 + 30) == [(T0, 2)]


def test_stats_know_the_oldest_waiting_summary(box: Outbox) -> None:
    box.enqueue([new("a", "ringing")], now=T0)
    box.enqueue([new("b", "summary")], now=T0 + 5)
    box.enqueue([new("c", "summary")], now=T0 + 9)
    stats = box.stats()
    assert stats.oldest_pending_at == T0 and stats.oldest_summary_at == T0 + 5
    assert stats.to_dict()["oldest_summary_at"] == T0 + 5


# --------------------------------------------------------------------------- reader


def test_the_reader_runs_in_its_own_thread_and_cannot_write(tmp_path: Path) -> None:
    path = str(tmp_path / "outbox.sqlite3")
    writer = OutboxWriter(path, synchronous="NORMAL")
    reader = OutboxReader(path)
    try:
        writer.enqueue([new("call-a", "summary")])
        page = reader.run(lambda outbox: outbox.search_calls(call_keys=["call-a"]))
        assert [c.call_key for c in page.calls] == ["call-a"]
        ident = reader.run(lambda _: threading.get_native_id())
        assert ident != threading.get_native_id()
        with pytest.raises(OutboxError, match="readonly|read-only"):
            reader.run(lambda outbox: outbox.requeue(statuses=["delivered"]))
        with pytest.raises(ZeroDivisionError):
            reader.run(lambda _: 1 / 0)
    finally:
        reader.close()
        writer.close()
    with pytest.raises(OutboxError, match="closed"):
        reader.run(lambda outbox: outbox.stats())


def test_the_postgresql_reader_cannot_write(pg_url: str) -> None:
    assert is_postgresql(pg_url)
    writer = OutboxWriter(pg_url, node="node-a")
    reader = OutboxReader(pg_url)
    try:
        writer.enqueue([new("call-a", "summary")])
        page = reader.run(lambda outbox: outbox.search_calls(call_keys=["call-a"]))
        assert [c.call_key for c in page.calls] == ["call-a"]
        with pytest.raises(OutboxError, match="read-only transaction"):
            reader.run(lambda outbox: outbox.enqueue([new("call-b", "ringing")]))
        assert reader.run(lambda outbox: outbox.stats()).total == 1
    finally:
        reader.close()
        writer.close()
