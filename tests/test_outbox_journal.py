"""The local journal in front of a shared PostgreSQL outbox (fs_cc360/outbox_journal.py):
rows committed locally while the server is down, moved in order, exactly once, when it
is back. The server is the suite's real PostgreSQL (tests/pg_server.py), stopped and
started again by these tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fs_cc360.errors import OutboxError
from fs_cc360.outbox import OutboxWriter
from fs_cc360.outbox_journal import JournaledOutbox
from fs_cc360.outbox_pg import PgOutbox
from tests.fixtures import item

T0 = 1_000_000.0


@pytest.fixture
def server_down(pg_server: Any) -> Iterator[Any]:
    """Stop the session's server for the test's first part; always started again."""
    yield pg_server
    if not pg_server.running:
        pg_server.start()


def shared_rows(url: str) -> list[tuple[str, str]]:
    box = PgOutbox(url, node="reader")
    try:
        return [(row.call_key, row.kind) for row in reversed(list(box.list_rows(limit=None)))]
    finally:
        box.close()


def test_rows_go_to_the_journal_while_postgresql_is_down_and_move_in_order(
        pg_url: str, server_down: Any, tmp_path: Path) -> None:
    box = JournaledOutbox(pg_url, str(tmp_path / "journal.sqlite3"), node="fs1")
    assert box.enqueue([item("a", "ringing")], now=T0)[0] > 0  # straight to PostgreSQL
    server_down.stop("immediate")
    ids = box.enqueue([item("a", "answer"), item("b", "ringing")], now=T0 + 1)
    assert all(i < 0 for i in ids) and box.journaled == 2  # journal ids: not outbox ids
    box.enqueue([item("a", "hangup")], now=T0 + 2)  # no wait on the dead server
    assert box.journaled == 3
    with pytest.raises(OutboxError, match="unreachable"):
        box.check_writable()
    server_down.start()
    box._down_until = 0.0  # skip the fail-fast pause
    box.enqueue([item("a", "summary")], now=T0 + 3)  # moves the journal first
    assert box.journaled == 0
    assert shared_rows(pg_url) == [("a", "ringing"), ("a", "answer"), ("b", "ringing"),
                                   ("a", "hangup"), ("a", "summary")]
    box.check_writable()
    assert {row.node for row in box.list_rows(limit=None)} == {"fs1"}
    box.close()


def test_a_service_starting_while_postgresql_is_down_keeps_its_rows(
        pg_url: str, server_down: Any, tmp_path: Path) -> None:
    server_down.stop("immediate")
    journal = str(tmp_path / "journal.sqlite3")
    box = JournaledOutbox(pg_url, journal, node="fs1")
    box.enqueue([item("a", "ringing"), item("a", "summary")], now=T0)
    assert box.release_leases() == 0  # start-up: this node's leases simply expire
    box.close()
    again = JournaledOutbox(pg_url, journal, node="fs1")  # restarted, still down
    assert again.journaled == 2
    again.close()
    server_down.start()
    box = JournaledOutbox(pg_url, journal, node="fs1")
    assert box.move_journal() == 2 and box.journaled == 0
    assert shared_rows(pg_url) == [("a", "ringing"), ("a", "summary")]
    box.close()


def test_moving_is_exactly_once_even_if_we_die_between_the_two_commits(
        pg_url: str, tmp_path: Path) -> None:
    journal = str(tmp_path / "journal.sqlite3")
    box = JournaledOutbox(pg_url, journal, node="fs1")
    box.journal.append([item("a", "ringing"), item("b", "ringing")], T0)
    box.journaled = 2
    # the crash: PostgreSQL committed the batch and its mark, the journal kept its rows
    deleted = box.journal.delete_through
    box.journal.delete_through = lambda last_id: None  # type: ignore[method-assign]
    box.move_journal()
    box.journal.delete_through = deleted  # type: ignore[method-assign]
    assert box.journal.count() == 2
    box.close()
    box = JournaledOutbox(pg_url, journal, node="fs1")  # the restart
    assert box.move_journal() == 0 and box.journaled == 0
    assert shared_rows(pg_url) == [("a", "ringing"), ("b", "ringing")]
    box.close()


def test_the_writer_reports_journaled_rows(pg_url: str, server_down: Any,
                                           tmp_path: Path) -> None:
    writer = OutboxWriter(pg_url, node="fs1", journal=str(tmp_path / "journal.sqlite3"))
    try:
        assert writer.journaled == 0 and writer.node == "fs1"
        server_down.stop("immediate")
        writer.enqueue([item("a", "ringing")])
        assert writer.journaled == 1
    finally:
        writer.close()


def test_outbox_stats_shows_the_journal_even_with_postgresql_down(
        pg_url: str, server_down: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from fs_cc360.cli import main

    journal = tmp_path / "journal.sqlite3"
    config = tmp_path / "fs-cc360.ini"
    config.write_text(f"[outbox]\ndatabase = {pg_url}\nnode = fs1\njournal = {journal}\n\n"
                      "[webapi]\nenabled = false\n")
    box = JournaledOutbox(pg_url, str(journal), node="fs1")
    box.journal.append([item("a", "ringing"), item("a", "answer")], T0)
    box.close()
    capsys.readouterr()
    main(["--config", str(config), "outbox", "stats", "--json"])
    assert json.loads(capsys.readouterr().out)["journal_rows"] == 2
    server_down.stop("immediate")
    assert main(["--config", str(config), "outbox", "stats"]) == 1
    err = capsys.readouterr().err
    assert "PostgreSQL unreachable" in err and "holds 2 rows waiting for PostgreSQL" in err


def test_after_a_lost_connection_calls_fail_at_once_for_a_while(
        pg_url: str, server_down: Any, tmp_path: Path) -> None:
    """A silent server could hold the writer thread for the connect timeout on every
    call; after one call lost the connection the others fail without trying."""
    box = JournaledOutbox(pg_url, str(tmp_path / "journal.sqlite3"), node="fs1")
    box.stats()
    server_down.stop("immediate")
    with pytest.raises(OutboxError, match="PostgreSQL unreachable \\(") as first:
        box.stats()
    assert "next try" not in str(first.value)  # that one tried
    with pytest.raises(OutboxError, match="next try in"):
        box.mark_and_claim([], T0, 10, 60)
    box.enqueue([item("a", "ringing")], now=T0)  # journaled at once
    assert box.journaled == 1
    server_down.start()
    box._down_until = 0.0  # the pause over
    assert box.move_journal() == 1 and box.stats().total == 1
    box.close()
