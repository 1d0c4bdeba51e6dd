"""The durable outbox: one contract, run against ``Outbox`` and ``OutboxWriter`` (huey's
``StorageTests`` idea), plus what only one of them does. Real SQLite files in tmp_path."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import peewee
import pytest
from gevent.monkey import get_original
from gevent.threadpool import ThreadPool

from fs_cc360 import outbox as outbox_module
from fs_cc360.errors import OutboxError
from fs_cc360.outbox import Mark, Outbox, OutboxStatus, OutboxWriter, Row
from tests.fixtures import item, request

T0 = 1_000_000.0  # a pinned clock: every call passes ``now``


def keys(rows: list[Row]) -> list[tuple[str, str]]:
    return [(row.call_key, row.kind) for row in rows]


class OutboxContract:
    """Behaviour every outbox backend must have. Subclasses provide the ``box`` fixture."""

    box: Any

    # -- enqueue and claim --------------------------------------------------------------

    def test_enqueue_returns_monotonic_ids_and_stores_everything(self, box: Any) -> None:
        ids = box.enqueue([item("a", "ringing", event_at=T0 - 1), item("a", "summary")], now=T0)
        more = box.enqueue([item("b", "ringing")], now=T0)
        assert ids[0] < ids[1] < more[0]
        row = box.get(ids[1])
        assert row.call_key == "a" and row.kind == "summary" and row.user == "101"
        assert row.callerid == "79991234567" and row.status is OutboxStatus.pending
        assert row.attempts == 0 and row.next_attempt_at == T0 and row.created_at == T0
        assert row.crm_request() == request("a", "summary")
        assert box.get(ids[0]).event_at == T0 - 1
        assert box.get(999_999) is None
        assert box.enqueue([], now=T0) == []

    def test_a_call_holds_one_summary_ever(self, box: Any) -> None:
        """Live tracker, CDR catch-up and backfill may find the same call: its summary is
        written once (also within one batch, and after the first was delivered); other
        kinds are not affected."""
        first = box.enqueue([item("a", "ringing"), item("a", "summary")], now=T0)
        again = box.enqueue([item("a", "summary"), item("b", "summary"),
                             item("b", "summary"), item("a", "hangup")], now=T0)
        assert again[0] == first[1] and again[1] == again[2]
        assert sorted(keys(box.list_rows(limit=None))) == [
            ("a", "hangup"), ("a", "ringing"), ("a", "summary"), ("b", "summary")]
        box.mark_delivered(first[1], 200, now=T0 + 1)
        assert box.enqueue([item("a", "summary")], now=T0 + 2) == [first[1]]
        assert sum(1 for r in box.list_rows(limit=None) if r.kind == "summary") == 2

    def test_claim_returns_only_the_head_of_each_key(self, box: Any) -> None:
        box.enqueue([item("a", "ringing"), item("b", "ringing"), item("a", "answer"),
                     item("a", "hangup"), item("b", "summary")], now=T0)
        first = box.claim_due(T0, 10, 60)
        assert keys(first) == [("a", "ringing"), ("b", "ringing")]
        assert all(r.status is OutboxStatus.inflight and r.lease_until == T0 + 60 for r in first)
        assert box.claim_due(T0, 10, 60) == []  # heads are in flight: followers wait
        box.mark_delivered(first[0].id, 200, now=T0 + 1)
        assert keys(box.claim_due(T0 + 1, 10, 60)) == [("a", "answer")]
        box.mark_delivered(first[1].id, 200, now=T0 + 1)
        assert keys(box.claim_due(T0 + 1, 10, 60)) == [("b", "summary")]

    def test_a_batch_of_one_key_keeps_its_order(self, box: Any) -> None:
        kinds = ["ringing", "answer", "hangup", "summary"]
        box.enqueue([item("k", kind) for kind in kinds], now=T0)
        seen = []
        for step in range(len(kinds)):
            (row,) = box.claim_due(T0 + step, 10, 60)
            seen.append(row.kind)
            box.mark_delivered(row.id, 200, now=T0 + step)
        assert seen == kinds
        assert box.claim_due(T0 + 10, 10, 60) == []

    def test_claim_takes_the_earliest_due_first_and_respects_limit(self, box: Any) -> None:
        box.enqueue([item("late", "ringing")], now=T0 + 5)
        box.enqueue([item("early", "ringing")], now=T0)
        box.enqueue([item("middle", "ringing")], now=T0 + 2)
        assert keys(box.claim_due(T0 + 10, 2, 60)) == [("early", "ringing"),
                                                       ("middle", "ringing")]
        assert keys(box.claim_due(T0 + 10, 2, 60)) == [("late", "ringing")]
        assert box.claim_due(T0 + 10, 0, 60) == []

    def test_claim_skips_rows_not_due_and_excluded_keys(self, box: Any) -> None:
        box.enqueue([item("a", "ringing")], now=T0 + 30)  # due at T0+30
        box.enqueue([item("b", "ringing"), item("c", "ringing")], now=T0)
        assert keys(box.claim_due(T0, 10, 60, exclude_keys={"b"})) == [("c", "ringing")]
        assert keys(box.claim_due(T0 + 30, 10, 60)) == [("b", "ringing"), ("a", "ringing")]

    # -- outcomes -----------------------------------------------------------------------

    def test_retry_keeps_the_head_and_delays_it(self, box: Any) -> None:
        box.enqueue([item("a", "ringing"), item("a", "summary")], now=T0)
        (row,) = box.claim_due(T0, 10, 60)
        box.mark_retry(row.id, T0 + 8, "HTTP 503", 503, now=T0)
        again = box.get(row.id)
        assert again.status is OutboxStatus.pending and again.attempts == 1
        assert again.rejections == 0 and again.last_status == 503
        assert again.last_error == "HTTP 503" and again.lease_until is None
        assert box.claim_due(T0 + 7, 10, 60) == []  # the summary must not overtake it
        assert keys(box.claim_due(T0 + 8, 10, 60)) == [("a", "ringing")]
        box.mark_retry(row.id, T0 + 9, "HTTP 400", 400, rejected=True, now=T0 + 8)
        assert box.get(row.id).attempts == 2 and box.get(row.id).rejections == 1
        stats = box.stats()
        assert stats.last_error == "HTTP 400" and stats.last_error_at == T0 + 8

    def test_dead_and_expired_are_final_and_unblock_the_next_row(self, box: Any) -> None:
        box.enqueue([item("a", "ringing"), item("a", "answer"), item("a", "summary")], now=T0)
        (ringing,) = box.claim_due(T0, 10, 60)
        box.mark_dead(ringing.id, "HTTP 400 bad", 400, rejected=True, now=T0)
        dead = box.get(ringing.id)
        assert dead.status is OutboxStatus.dead and dead.attempts == 1 and dead.last_status == 400
        (answer,) = box.claim_due(T0, 10, 60)
        assert answer.kind == "answer"
        box.mark_expired(answer.id, now=T0)
        assert box.get(answer.id).status is OutboxStatus.expired
        (summary,) = box.claim_due(T0, 10, 60)
        assert summary.kind == "summary"
        box.mark_delivered(summary.id, 200, now=T0 + 3)
        done = box.get(summary.id)
        assert done.status is OutboxStatus.delivered and done.delivered_at == T0 + 3
        assert done.last_status == 200
        assert box.claim_due(T0 + 3, 10, 60) == []

    def test_new_rows_of_a_finished_key_start_a_new_head(self, box: Any) -> None:
        (first,) = box.enqueue([item("a", "ringing")], now=T0)
        box.claim_due(T0, 10, 60)
        box.mark_delivered(first, 200, now=T0)
        box.enqueue([item("a", "summary")], now=T0 + 1)
        assert keys(box.claim_due(T0 + 1, 10, 60)) == [("a", "summary")]

    # -- batched outcomes ---------------------------------------------------------------

    def test_mark_many_records_every_kind_of_outcome_in_one_call(self, box: Any) -> None:
        calls = ["d", "r", "x", "e"]
        box.enqueue([item(c, "ringing") for c in calls] + [item(c, "summary") for c in calls],
                    now=T0)
        heads = {row.call_key: row for row in box.claim_due(T0, 10, 60)}
        assert sorted(heads) == sorted(calls)
        box.mark_many([
            Mark.delivered(heads["d"].id, 200, now=T0 + 1),
            Mark.retry(heads["r"].id, T0 + 50, "HTTP 503", 503, now=T0 + 1),
            Mark.dead(heads["x"].id, "HTTP 400", 400, rejected=True, now=T0 + 2),
            Mark.expired(heads["e"].id),
        ], now=T0 + 3)
        delivered, retried, dead, expired = (box.get(heads[c].id) for c in calls)
        assert delivered.status is OutboxStatus.delivered and delivered.delivered_at == T0 + 1
        assert delivered.last_status == 200 and delivered.lease_until is None
        assert retried.status is OutboxStatus.pending and retried.attempts == 1
        assert retried.next_attempt_at == T0 + 50 and retried.rejections == 0
        assert dead.status is OutboxStatus.dead and dead.attempts == 1 and dead.rejections == 1
        assert expired.status is OutboxStatus.expired and expired.updated_at == T0 + 3
        stats = box.stats()
        assert stats.last_error == "HTTP 400" and stats.last_error_at == T0 + 2
        # the three final rows unblocked their calls; the retried head still blocks its own
        assert keys(box.claim_due(T0 + 10, 10, 60)) == [("d", "summary"), ("x", "summary"),
                                                        ("e", "summary")]
        box.mark_many([])  # nothing to do, no error

    def test_mark_and_claim_claims_the_next_row_of_a_marked_call_at_once(
            self, box: Any) -> None:
        box.enqueue([item("a", "ringing"), item("a", "answer"), item("a", "summary"),
                     item("b", "ringing")], now=T0)
        first = box.claim_due(T0, 10, 60)
        assert keys(first) == [("a", "ringing"), ("b", "ringing")]
        claimed = box.mark_and_claim([Mark.delivered(first[0].id, 200, now=T0 + 1)],
                                     T0 + 1, 10, 60)
        assert keys(claimed.rows) == [("a", "answer")]  # b's head is still in flight
        (answer,) = claimed.rows
        assert answer.status is OutboxStatus.inflight and answer.lease_until == T0 + 61
        assert box.get(answer.id).status is OutboxStatus.inflight
        assert claimed.next_due_at is None  # every open call's head is in flight
        # a retry keeps its call blocked until it is due; the claim reports when that is
        claimed = box.mark_and_claim([Mark.retry(answer.id, T0 + 30, "timeout", now=T0 + 2)],
                                     T0 + 2, 10, 60)
        assert claimed.rows == [] and claimed.next_due_at == T0 + 30
        # excluded keys yield nothing, even when the batch unblocks them
        box.mark_delivered(first[1].id, 200, now=T0 + 3)
        box.enqueue([item("b", "summary")], now=T0 + 3)
        claimed = box.mark_and_claim([], T0 + 30, 10, 60, exclude_keys=["b"])
        assert keys(claimed.rows) == [("a", "answer")]
        # limit 0: only the marks are written
        claimed = box.mark_and_claim([Mark.delivered(claimed.rows[0].id, 200, now=T0 + 31)],
                                     T0 + 31, 0, 60)
        assert claimed.rows == []
        assert keys(box.claim_due(T0 + 31, 10, 60)) == [("a", "summary"), ("b", "summary")]

    def test_a_batch_of_marks_keeps_each_calls_order(self, box: Any) -> None:
        kinds = ["ringing", "answer", "hangup", "summary"]
        calls = [f"c{n}" for n in range(5)]
        box.enqueue([item(c, k) for k in kinds for c in calls], now=T0)
        seen: dict[str, list[str]] = {c: [] for c in calls}
        claimed = box.claim_due(T0, 100, 60)
        for step in range(1, 10):
            assert len({row.call_key for row in claimed}) == len(claimed)  # one head each
            for row in claimed:
                seen[row.call_key].append(row.kind)
            marks = [Mark.delivered(row.id, 200, now=T0 + step) for row in claimed]
            claimed = box.mark_and_claim(marks, T0 + step, 100, 60).rows
            if not claimed:
                break
        assert seen == {c: kinds for c in calls}
        assert box.stats().count("delivered") == 20

    def test_a_retry_mark_needs_its_due_time(self, box: Any) -> None:
        (row_id,) = box.enqueue([item("a", "ringing")], now=T0)
        with pytest.raises(ValueError, match="next_attempt_at"):
            box.mark_many([Mark(row_id, OutboxStatus.pending, T0)])
        with pytest.raises(ValueError, match="inflight"):
            box.mark_many([Mark(row_id, OutboxStatus.inflight, T0)])
        assert box.get(row_id).status is OutboxStatus.pending  # rolled back, unchanged

    # -- leases -------------------------------------------------------------------------

    def test_expired_leases_are_reclaimed(self, box: Any) -> None:
        box.enqueue([item("a", "ringing"), item("a", "answer"), item("b", "ringing")], now=T0)
        claimed = box.claim_due(T0, 10, 10)
        assert len(claimed) == 2
        assert box.reclaim_expired_leases(T0 + 5) == 0
        assert box.reclaim_expired_leases(T0 + 11) == 2
        row = box.get(claimed[0].id)
        assert row.status is OutboxStatus.pending and row.attempts == 0 and row.lease_until is None
        # the same heads come back, the follower still waits
        assert keys(box.claim_due(T0 + 11, 10, 60)) == [("a", "ringing"), ("b", "ringing")]

    def test_release_leases_all_or_some(self, box: Any) -> None:
        box.enqueue([item("a", "ringing"), item("b", "ringing"), item("c", "ringing")], now=T0)
        a, b, c = box.claim_due(T0, 10, 600)
        assert box.release_leases([a.id], now=T0) == 1
        assert box.release_leases([], now=T0) == 0
        assert box.get(a.id).status is OutboxStatus.pending
        assert box.get(b.id).status is OutboxStatus.inflight
        assert box.release_leases(now=T0) == 2  # start-up: every lease is stale
        assert box.stats().count("inflight") == 0

    # -- requeue ------------------------------------------------------------------------

    def test_requeue_dead_rows_keeps_per_call_order(self, box: Any) -> None:
        ids = box.enqueue([item("a", "ringing"), item("a", "answer"), item("a", "summary")],
                          now=T0)
        (ringing,) = box.claim_due(T0, 10, 60)
        box.mark_dead(ringing.id, "HTTP 400", 400, now=T0)
        (answer,) = box.claim_due(T0, 10, 60)
        box.mark_delivered(answer.id, 200, now=T0)
        # the summary is now the head, pending; requeue the dead ringing before it is sent
        preview = box.requeue(dry_run=True, now=T0 + 1)
        assert [r.id for r in preview] == [ids[0]]
        assert box.get(ids[0]).status is OutboxStatus.dead  # dry run changed nothing
        requeued = box.requeue(now=T0 + 1)
        assert [r.id for r in requeued] == [ids[0]] and requeued[0].status is OutboxStatus.dead
        row = box.get(ids[0])
        assert row.status is OutboxStatus.pending and row.attempts == 0
        assert row.next_attempt_at == T0 + 1
        # the older row is the head again: the summary waits for it
        assert keys(box.claim_due(T0 + 1, 10, 60)) == [("a", "ringing")]
        assert box.claim_due(T0 + 1, 10, 60) == []

    def test_requeue_filters(self, box: Any) -> None:
        box.enqueue([item("a", "ringing"), item("b", "summary")], now=T0)
        box.enqueue([item("c", "ringing")], now=T0 + 100)
        for row in box.claim_due(T0 + 100, 10, 60):
            box.mark_dead(row.id, "x", 400, now=T0 + 100)
        assert keys(box.requeue(kinds=["summary"], dry_run=True)) == [("b", "summary")]
        assert keys(box.requeue(since=T0 + 50, dry_run=True)) == [("c", "ringing")]
        assert keys(box.requeue(until=T0 + 50, kinds=["ringing"], dry_run=True)) == [
            ("a", "ringing")]
        c_id = box.requeue(since=T0 + 50, dry_run=True)[0].id
        assert keys(box.requeue(ids=[c_id], now=T0 + 200)) == [("c", "ringing")]
        assert box.requeue(statuses=["expired"], dry_run=True) == []
        with pytest.raises(ValueError):
            box.requeue(statuses=["pending"])

    # -- reads --------------------------------------------------------------------------

    def test_stats(self, box: Any) -> None:
        empty = box.stats()
        assert empty.total == 0 and empty.oldest_pending_at is None
        assert empty.counts == {status: 0 for status in OutboxStatus}
        box.enqueue([item("a", "ringing"), item("a", "summary")], now=T0)
        box.enqueue([item("b", "ringing")], now=T0 + 5)
        a, b = box.claim_due(T0 + 5, 10, 60)
        box.mark_delivered(a.id, 200, now=T0 + 6)
        stats = box.stats()
        assert stats.total == 3
        assert stats.count(OutboxStatus.pending) == 1 and stats.count("inflight") == 1
        assert stats.count("delivered") == 1 and stats.count("dead") == 0
        assert stats.by_kind == {(OutboxStatus.pending, "summary"): 1,
                                 (OutboxStatus.inflight, "ringing"): 1,
                                 (OutboxStatus.delivered, "ringing"): 1}
        assert stats.oldest_pending_at == T0  # the summary, still waiting
        assert stats.last_delivered_at == T0 + 6
        assert stats.next_due_at == T0  # a's summary became the head
        as_dict = stats.to_dict()
        assert as_dict["counts"]["pending"] == 1 and as_dict["total"] == 3

    def test_list_rows_newest_first_with_filters_and_keyset_pages(
            self, box: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(outbox_module, "PAGE_SIZE", 4)  # several pages from few rows
        ids = []
        for n in range(11):
            ids += box.enqueue([item(f"call-{n}", "ringing"), item(f"call-{n}", "summary")],
                               now=T0 + n)
        all_rows = list(box.list_rows(limit=None))
        assert [r.id for r in all_rows] == sorted(ids, reverse=True)
        assert len(list(box.list_rows())) == 22  # default limit 100
        first = list(box.list_rows(limit=5))
        rest = list(box.list_rows(limit=5, before_id=first[-1].id))
        assert [r.id for r in first + rest] == sorted(ids, reverse=True)[:10]
        assert {r.kind for r in box.list_rows(kind="summary", limit=None)} == {"summary"}
        assert len(list(box.list_rows(kind="summary", limit=None))) == 11
        assert keys(list(box.list_rows(call_key="call-3"))) == [("call-3", "summary"),
                                                              ("call-3", "ringing")]
        assert [r.created_at for r in box.list_rows(since=T0 + 9, limit=None)] == [
            T0 + 10, T0 + 10, T0 + 9, T0 + 9]
        assert len(list(box.list_rows(until=T0 + 2, limit=None))) == 4
        box.claim_due(T0 + 20, 3, 60)
        assert len(list(box.list_rows(status="inflight"))) == 3
        assert list(box.list_rows(status=OutboxStatus.dead)) == []
        assert all(isinstance(r, Row) for r in box.list_rows(limit=3))

    def test_has_call_key_and_has_request(self, box: Any) -> None:
        box.enqueue([item("a", "ringing")], now=T0)
        assert box.has_call_key("a") and not box.has_call_key("b")
        assert box.has_request("a", "ringing") and not box.has_request("a", "summary")

    # -- retention ----------------------------------------------------------------------

    def test_purge_removes_only_old_delivered_rows(
            self, box: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(outbox_module, "PURGE_BATCH", 3)  # several batches
        for n in range(8):
            box.enqueue([item(f"d{n}", "ringing")], now=T0)
        for row in box.claim_due(T0, 100, 60):
            box.mark_delivered(row.id, 200, now=T0 + 10)
        box.enqueue([item("new", "ringing")], now=T0 + 50)
        (new,) = box.claim_due(T0 + 50, 1, 60)
        box.mark_delivered(new.id, 200, now=T0 + 50)
        box.enqueue([item("dead", "ringing")], now=T0)
        (dead,) = box.claim_due(T0 + 60, 1, 60)
        box.mark_dead(dead.id, "x", 400, now=T0)
        box.enqueue([item("waiting", "summary")], now=T0 - 10_000)  # old but pending
        assert box.purge_delivered(older_than=T0 + 20) == 8
        left = {r.call_key: r.status for r in box.list_rows(limit=None)}
        assert left == {"new": OutboxStatus.delivered, "dead": OutboxStatus.dead,
                        "waiting": OutboxStatus.pending}
        assert box.purge_delivered(older_than=T0 + 20) == 0

    def test_ids_never_reused_after_purging_the_newest(self, box: Any) -> None:
        (first,) = box.enqueue([item("a", "ringing")], now=T0)
        box.claim_due(T0, 1, 60)
        box.mark_delivered(first, 200, now=T0)
        assert box.purge_delivered(older_than=T0 + 1) == 1
        (second,) = box.enqueue([item("b", "ringing")], now=T0 + 2)
        assert second > first

    # -- SQLite setup -------------------------------------------------------------------

    def test_pragmas_are_set(self, box: Any) -> None:
        assert box.pragma("journal_mode") == "wal"
        assert box.pragma("synchronous") == 2  # FULL
        assert box.pragma("busy_timeout") == 5000
        assert box.pragma("foreign_keys") == 1

    def test_check_writable_passes_on_a_good_file(self, box: Any) -> None:
        box.check_writable()
        box.check_writable()
        assert box.stats().total == 0  # the probe write was rolled back


class TestOutbox(OutboxContract):
    @pytest.fixture
    def box(self, tmp_path: Path) -> Iterator[Outbox]:
        outbox = Outbox(str(tmp_path / "outbox.sqlite3"))
        yield outbox
        outbox.close()


class TestOutboxWriter(OutboxContract):
    @pytest.fixture
    def box(self, tmp_path: Path) -> Iterator[OutboxWriter]:
        writer = OutboxWriter(str(tmp_path / "outbox.sqlite3"))
        yield writer
        writer.close()


# -- Outbox only ---------------------------------------------------------------------------


def test_rows_survive_reopening(tmp_path: Path) -> None:
    path = str(tmp_path / "o.sqlite3")
    box = Outbox(path)
    box.enqueue([item("a", "ringing"), item("a", "summary")], now=T0)
    box.close()
    again = Outbox(path)
    assert keys(list(again.list_rows())) == [("a", "summary"), ("a", "ringing")]
    assert keys(again.claim_due(T0, 10, 60)) == [("a", "ringing")]
    again.close()


def test_synchronous_is_configurable(tmp_path: Path) -> None:
    box = Outbox(str(tmp_path / "o.sqlite3"), synchronous="normal", busy_timeout_ms=1234)
    assert box.pragma("synchronous") == 1
    assert box.pragma("busy_timeout") == 1234
    box.close()
    with pytest.raises(OutboxError, match="synchronous"):
        Outbox(str(tmp_path / "o.sqlite3"), synchronous="sometimes")


def test_outcomes_commit_at_normal_and_claims_and_enqueues_at_full(tmp_path: Path) -> None:
    """The durability rule (module docstring): only transactions that record outcomes
    are relaxed to synchronous=NORMAL; enqueues and every claim commit at FULL, so their
    fsync hardens the outcomes before a claimed row can be sent."""
    box = Outbox(str(tmp_path / "o.sqlite3"))
    assert box.mark_synchronous == "NORMAL"
    level = ["FULL"]
    seen: list[tuple[str, str]] = []

    def trace(sql: str) -> None:
        text = " ".join(sql.split())
        if text.upper().startswith("PRAGMA SYNCHRONOUS ="):
            level[0] = text.split("=")[1].strip().upper()
        elif text.startswith("INSERT INTO outbox "):
            seen.append(("enqueue", level[0]))
        elif "SET status = 'inflight'" in text:
            seen.append(("claim", level[0]))
        elif text.startswith("UPDATE outbox SET status = 'delivered'"):
            seen.append(("mark", level[0]))

    box._db.connection().set_trace_callback(trace)
    box.enqueue([item("a", "ringing"), item("a", "summary")], now=T0)
    (ringing,) = box.claim_due(T0, 10, 60)
    claimed = box.mark_and_claim([Mark.delivered(ringing.id, 200, now=T0)], T0, 10, 60)
    box.mark_delivered(claimed.rows[0].id, 200, now=T0)
    box._db.connection().set_trace_callback(None)
    assert seen == [("enqueue", "FULL"), ("enqueue", "FULL"),
                    ("claim", "FULL"), ("mark", "NORMAL"), ("claim", "FULL"), ("mark", "NORMAL")]
    assert box.pragma("synchronous") == 2  # FULL again after every relaxed commit
    box.close()
    # the configured level is never raised, and NORMAL is only used in WAL mode
    normal = Outbox(str(tmp_path / "n.sqlite3"), synchronous="OFF")
    assert normal.mark_synchronous == "OFF"
    normal.close()
    memory = Outbox(":memory:")
    assert memory.mark_synchronous == "FULL"
    memory.close()


def test_a_claim_failing_after_the_marks_committed_does_not_ask_for_them_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    box = Outbox(str(tmp_path / "o.sqlite3"))
    box.enqueue([item("a", "ringing"), item("a", "summary"), item("b", "ringing")], now=T0)
    a, b = box.claim_due(T0, 10, 60)

    def broken() -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(box, "_next_due", broken)  # fails inside the claim transaction
    with caplog.at_level("WARNING", logger="fs_cc360.outbox"):
        claimed = box.mark_and_claim([Mark.delivered(a.id, 200, now=T0)], T0, 10, 60)
    assert claimed.rows == [] and claimed.next_due_at is None
    assert any("outbox.claim_failed" in r.getMessage() for r in caplog.records)
    assert box.get(a.id).status is OutboxStatus.delivered  # the marks are in...
    assert box.stats().count("inflight") == 1  # ...the claim was rolled back
    with pytest.raises(OutboxError, match="I/O error"):  # without marks: the error
        box.mark_and_claim([], T0, 10, 60)
    monkeypatch.undo()
    assert keys(box.claim_due(T0, 10, 60)) == [("a", "summary")]
    box.mark_delivered(b.id, 200, now=T0)
    box.close()


def test_sqlite_url(tmp_path: Path) -> None:
    path = tmp_path / "url.sqlite3"
    box = Outbox(f"sqlite:///{path}")  # sqlite:/// + an absolute path = four slashes
    assert box.path == str(path)
    box.enqueue([item("a", "ringing")], now=T0)
    box.close()
    assert path.exists()


def test_other_url_schemes_are_refused_by_name() -> None:
    with pytest.raises(OutboxError, match="'postgresql'"):
        Outbox("postgresql://db.example/outbox")


def test_missing_directory_is_explained(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "o.sqlite3"
    with pytest.raises(OutboxError) as info:
        Outbox(str(missing))
    assert str(missing) in str(info.value) and "directory" in str(info.value)
    assert isinstance(info.value.orig, peewee.OperationalError | sqlite3.OperationalError)


def test_read_only_database_raises_a_clear_outbox_error(tmp_path: Path) -> None:
    """SQLITE_READONLY from any cause (here ``query_only``, which works even as root)."""
    path = str(tmp_path / "o.sqlite3")
    box = Outbox(path)
    box._db.execute_sql("PRAGMA query_only = 1")
    with pytest.raises(OutboxError) as info:
        box.enqueue([item("a", "ringing")], now=T0)
    message = str(info.value)
    assert path in message and "read-only" in message and "permissions" in message
    assert isinstance(info.value.orig, peewee.OperationalError | sqlite3.OperationalError)
    with pytest.raises(OutboxError, match="read-only"):
        box.check_writable()
    box._db.execute_sql("PRAGMA query_only = 0")
    box.check_writable()
    box.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_file_raises_a_clear_outbox_error(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite3"
    Outbox(str(path)).close()
    for name in ("o.sqlite3", "o.sqlite3-wal", "o.sqlite3-shm"):
        if (tmp_path / name).exists():
            (tmp_path / name).chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(OutboxError) as info:
            box = Outbox(str(path))
            box.enqueue([item("a", "ringing")], now=T0)
        assert str(path) in str(info.value)
    finally:
        tmp_path.chmod(0o755)


def test_claim_on_100k_rows_is_index_driven(tmp_path: Path) -> None:
    """The claim reads the partial ``outbox_due`` index: no table scan, no sort, however
    many followers wait behind their heads (asserted on the plan, not on time)."""
    box = Outbox(str(tmp_path / "big.sqlite3"), synchronous="OFF")
    kinds = ("ringing", "answer", "hangup", "summary")
    box.enqueue([item(f"call-{n // 4}", kinds[n % 4]) for n in range(100_000)], now=T0)
    box._db.execute_sql("ANALYZE")  # let the planner see the real sizes
    for excluded in (0, 8):
        plan = " | ".join(box.explain_claim(exclude=excluded))
        assert "USING INDEX outbox_due" in plan, plan
        assert "SCAN" not in plan and "TEMP B-TREE" not in plan, plan
    claimed = box.claim_due(T0, 100, 60)
    assert len(claimed) == 100 and {r.kind for r in claimed} == {"ringing"}
    assert len({r.call_key for r in claimed}) == 100
    assert claimed[0].call_key == "call-0" and claimed[-1].call_key == "call-99"
    box.close()


# -- OutboxWriter only ---------------------------------------------------------------------


def test_writer_runs_sqlite_in_its_own_native_thread(tmp_path: Path) -> None:
    writer = OutboxWriter(str(tmp_path / "o.sqlite3"))
    main_ident = get_original("threading", "get_ident")()
    assert writer.thread_ident() != main_ident
    writer.close()


def test_writer_does_not_block_the_hub_and_group_commits(tmp_path: Path) -> None:
    """While the writer thread waits on a lock held by another connection (as if the
    CLI were writing), other greenlets keep running; what queues up meanwhile is committed
    in one transaction."""
    path = str(tmp_path / "o.sqlite3")
    writer = OutboxWriter(path, busy_timeout_ms=20_000)
    committed: list[list[int]] = []
    writer.on_commit = committed.append

    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock
    try:
        first = writer.enqueue_nowait(item("call-0", "ringing"))
        ticks = 0

        def ticker() -> None:
            nonlocal ticks
            for _ in range(20):
                gevent.sleep(0.005)
                ticks += 1

        gevent.spawn(ticker).join()  # the hub ran 20 timer turns...
        assert ticks == 20
        assert not first.ready()  # ...while the first commit was stuck on the lock
        rest = [writer.enqueue_nowait(item(f"call-{n}", "ringing")) for n in range(1, 50)]
    finally:
        other.execute("COMMIT")
        other.close()
    ids = [first.get(timeout=10)] + [r.get(timeout=10) for r in rest]
    assert ids == sorted(ids) and len(set(ids)) == 50
    assert writer.commits == 2  # [the first] + [the 49 queued while it waited]
    assert [len(batch) for batch in committed] == [1, 49]
    assert writer.stats().count("pending") == 50
    writer.close()


def test_writer_enqueue_nowait_reports_failures_to_every_waiter(tmp_path: Path) -> None:
    writer = OutboxWriter(str(tmp_path / "o.sqlite3"))
    writer._call(writer._outbox._db.execute_sql, "PRAGMA query_only = 1")
    results = [writer.enqueue_nowait(item(f"c{n}", "ringing")) for n in range(3)]
    for result in results:
        with pytest.raises(OutboxError, match="read-only"):
            result.get(timeout=10)
    writer._call(writer._outbox._db.execute_sql, "PRAGMA query_only = 0")
    assert writer.enqueue_nowait(item("ok", "ringing")).get(timeout=10) > 0
    writer.close()


def test_writer_close_commits_what_is_queued(tmp_path: Path) -> None:
    path = str(tmp_path / "o.sqlite3")
    writer = OutboxWriter(path)
    for n in range(5):
        writer.enqueue_nowait(item(f"c{n}", "ringing"))
    writer.close()
    with pytest.raises(OutboxError, match="closed"):
        writer.enqueue_nowait(item("late", "ringing"))
    box = Outbox(path)
    assert box.stats().count("pending") == 5
    box.close()


def test_outbox_is_usable_from_two_native_threads(tmp_path: Path) -> None:
    """The native lock serialises calls, so a stray thread cannot corrupt peewee's state."""
    box = Outbox(str(tmp_path / "o.sqlite3"))
    pool = ThreadPool(2)

    def work(prefix: str) -> int:
        for n in range(50):
            box.enqueue([item(f"{prefix}{n}", "ringing")], now=T0)
        return get_original("threading", "get_ident")()

    results = [pool.spawn(work, prefix) for prefix in "xy"]
    idents = {result.get(timeout=30) for result in results}
    pool.kill()
    assert len(idents) == 2 and get_original("threading", "get_ident")() not in idents
    assert box.stats().count("pending") == 100
    box.close()


# -- the same contract on PostgreSQL (a real server: tests/pg_server.py) ------------------


class TestPgOutbox(OutboxContract):
    @pytest.fixture
    def box(self, pg_url: str) -> Iterator[Any]:
        from fs_cc360.outbox_pg import PgOutbox

        outbox = PgOutbox(pg_url, node="node-a")
        yield outbox
        outbox.close()

    def test_pragmas_are_set(self, box: Any) -> None:
        assert box.pragma("server_encoding") == "UTF8"  # PostgreSQL has settings, not pragmas


class TestPgOutboxWriter(OutboxContract):
    @pytest.fixture
    def box(self, pg_url: str) -> Iterator[OutboxWriter]:
        writer = OutboxWriter(pg_url, node="node-a")
        yield writer
        writer.close()

    def test_pragmas_are_set(self, box: Any) -> None:
        assert box.pragma("server_encoding") == "UTF8"
