"""The operator CLI, in-process (``fs_cc360.cli.main``), against real outbox files.

Rows are put in every status through the Outbox API; the CRM is the fake CC360 on
127.0.0.1. ``scripts/replay`` runs as a subprocess against a temporary config.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest

from fs_cc360 import outbox as outbox_module
from fs_cc360.cc360 import Cc360Client
from fs_cc360.cli import main
from fs_cc360.cli.outbox_cmds import STALL_AFTER, health
from fs_cc360.delivery import BackoffPolicy, Deliverer
from fs_cc360.outbox import Outbox, OutboxStats, OutboxStatus, OutboxWriter
from tests.fakes.crm import FakeCrm
from tests.fixtures import item

REPO = Path(__file__).resolve().parent.parent
JSON_CDR = REPO / "tests" / "captures" / "json_cdr"
TOKEN = "tok123"
PASSWORD = "s3cret-pw"
DAY = 86400.0


# --------------------------------------------------------------------------- fixtures


def write_config(path: Path, db: Path, crm: FakeCrm | None = None, *,
                 auth: str = "forms", password: str = PASSWORD) -> Path:
    crm_section = ""
    if crm is not None:
        crm_section = (f"[crm]\nurl = {crm.url}\nauth = {auth}\nlogin = admin\n"
                       f"password = {password}\ntoken = {TOKEN}\ntimeout = 5\n\n")
    path.write_text(
        crm_section
        + f"[outbox]\ndatabase = {db}\nsynchronous = NORMAL\n\n"
        "[delivery]\nconcurrency = 4\nbackoff_initial = 0.01\nbackoff_max = 0.05\n"
        "max_rejections = 1\nlease_seconds = 30\n\n"
        "[webapi]\nenabled = false\n")
    return path


@pytest.fixture
def crm() -> Iterator[FakeCrm]:
    with FakeCrm(mode="forms", token=TOKEN, login="admin", password=PASSWORD) as fake:
        yield fake


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "outbox.sqlite3"


@pytest.fixture
def config(tmp_path: Path, db: Path, crm: FakeCrm) -> Path:
    return write_config(tmp_path / "fs-cc360.ini", db, crm)


@pytest.fixture
def box(db: Path) -> Iterator[Outbox]:
    outbox = Outbox(str(db), synchronous="NORMAL")
    yield outbox
    outbox.close()


def populate(box: Outbox) -> dict[str, int]:
    """One row in each status (and a few more), made through the Outbox API."""
    now = time.time()
    ids: dict[str, int] = {}
    (ids["old_delivered"], ids["recent_delivered"]) = box.enqueue(
        [item("call-a", "ringing", now - 40 * DAY), item("call-a", "summary")],
        now=now - 40 * DAY)
    box.mark_delivered(ids["old_delivered"], 200, now=now - 30 * DAY)
    box.mark_delivered(ids["recent_delivered"], 200, now=now - 60)
    (ids["expired"], ids["dead"]) = box.enqueue(
        [item("call-b", "ringing", now - 3600), item("call-b", "summary")], now=now - 3600)
    box.mark_expired(ids["expired"], now=now - 3500)
    box.mark_dead(ids["dead"], "CC360 rejected POST http://crm/***/PushHistoryData: HTTP 400",
                  400, rejected=True, now=now - 3400)
    (ids["inflight"],) = box.enqueue([item("call-c", "summary")], now=now - 10)
    (claimed,) = box.claim_due(now, 10, 600)
    assert claimed.id == ids["inflight"]
    (ids["pending"],) = box.enqueue([item("call-d", "summary")], now=now)
    return ids


def cli(capsys: pytest.CaptureFixture[str], config: Path | None, *args: str
        ) -> tuple[int, str, str]:
    argv = (["--config", str(config)] if config else []) + list(args)
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, Any]:
    code, out, _ = cli(capsys, config, *args, "--json")
    return code, json.loads(out)


def statuses(box: Outbox) -> dict[int, str]:
    return {row.id: row.status.value for row in box.list_rows(limit=None)}


# --------------------------------------------------------------------------- stats


def test_stats_table_and_json(capsys: pytest.CaptureFixture[str], config: Path,
                              box: Outbox) -> None:
    populate(box)
    code, out, _ = cli(capsys, config, "outbox", "stats")
    assert code == 1  # a dead row needs attention
    assert "STATUS" in out and "SUMMARY" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert lines["pending"][1] == "1" and lines["inflight"][1] == "1"
    assert lines["delivered"][1] == "2" and lines["dead"][1] == "1"
    assert lines["expired"][1] == "1"
    assert "last error:" in out and "HTTP 400" in out
    assert "1 dead row needs attention" in out

    code, data = cli_json(capsys, config, "outbox", "stats")
    assert code == 1
    assert data["counts"] == {"pending": 1, "inflight": 1, "delivered": 2, "dead": 1,
                              "expired": 1}
    assert {"status": "dead", "kind": "summary", "count": 1} in data["by_kind"]
    assert data["health"]["state"] == "dead_rows" and not data["health"]["ok"]
    assert data["oldest_pending_age"] >= 0 and data["last_delivered_at"] is not None


def test_stats_of_an_empty_outbox_is_healthy(capsys: pytest.CaptureFixture[str],
                                             config: Path, box: Outbox) -> None:
    code, out, _ = cli(capsys, config, "outbox", "stats")
    assert code == 0 and "healthy: nothing waiting" in out


def test_a_missing_outbox_is_a_config_error_and_not_created(
        capsys: pytest.CaptureFixture[str], config: Path, db: Path) -> None:
    code, out, err = cli(capsys, config, "outbox", "stats")
    assert code == 2 and "does not exist" in err and "[outbox] database" in err
    assert not db.exists()


def _stats(**kw: Any) -> OutboxStats:
    counts = {status: 0 for status in OutboxStatus}
    counts.update(kw.pop("counts", {}))
    return OutboxStats(counts=counts, **kw)


@pytest.mark.parametrize("stats,state", [
    (_stats(), "healthy"),
    (_stats(counts={OutboxStatus.pending: 3}, oldest_pending_at=990.0), "healthy"),
    (_stats(counts={OutboxStatus.pending: 3}, oldest_pending_at=1000.0 - STALL_AFTER - 1,
            last_delivered_at=1000.0 - STALL_AFTER - 1), "stalled"),
    (_stats(counts={OutboxStatus.pending: 3}, oldest_pending_at=100.0,
            last_delivered_at=500.0, last_error="HTTP 503", last_error_at=990.0),
     "crm_failing"),
    (_stats(counts={OutboxStatus.dead: 1, OutboxStatus.delivered: 9},
            last_error="HTTP 400", last_error_at=990.0, last_delivered_at=995.0),
     "dead_rows"),
    # an old error followed by deliveries: the CRM works again
    (_stats(counts={OutboxStatus.pending: 1}, oldest_pending_at=999.0,
            last_error="x", last_error_at=900.0, last_delivered_at=950.0), "healthy"),
])
def test_health_verdict(stats: OutboxStats, state: str) -> None:
    verdict = health(stats, now=1000.0)
    assert verdict.state == state
    assert verdict.ok == (state == "healthy")


# --------------------------------------------------------------------------- list


def test_list_newest_first_with_filters(capsys: pytest.CaptureFixture[str], config: Path,
                                        box: Outbox) -> None:
    ids = populate(box)
    code, out, _ = cli(capsys, config, "outbox", "list")
    assert code == 0
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [int(r[0]) for r in rows] == sorted(ids.values(), reverse=True)
    assert out.splitlines()[0].split() == ["ID", "TIME", "KIND", "USER", "CALLERID",
                                           "STATUS", "ATT", "LAST"]
    dead_line = next(r for r in rows if int(r[0]) == ids["dead"])
    assert dead_line[6:9] == ["dead", "1", "400"]  # the time has a space

    def listed(*args: str) -> list[int]:
        code, data = cli_json(capsys, config, "outbox", "list", *args)
        assert code == 0
        return [row["id"] for row in data]

    assert listed("--status", "dead") == [ids["dead"]]
    assert listed("--kind", "ringing") == [ids["expired"], ids["old_delivered"]]
    assert listed("--call", "call-b") == [ids["dead"], ids["expired"]]
    assert listed("--since", "2h", "--until", "5s") == [ids["inflight"], ids["dead"],
                                                       ids["expired"]]
    assert listed("--limit", "2") == [ids["pending"], ids["inflight"]]
    assert listed("--status", "delivered", "--kind", "answer") == []
    code, out, _ = cli(capsys, config, "outbox", "list", "--call", "nope")
    assert code == 0 and "(no matching rows)" in out


def test_list_streams_5000_rows_page_by_page(capsys: pytest.CaptureFixture[str],
                                             config: Path, box: Outbox,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    box.enqueue([item(f"call-{i}", "summary") for i in range(5000)])
    pages: list[int] = []
    real_page = Outbox.list_page

    def counting_page(self: Outbox, **kwargs: Any) -> list[Any]:
        page = real_page(self, **kwargs)
        pages.append(len(page))
        return page

    monkeypatch.setattr(Outbox, "list_page", counting_page)
    code, out, _ = cli(capsys, config, "outbox", "list", "--limit", "0")
    assert code == 0
    assert len(out.splitlines()) == 5001  # header + every row
    # keyset pages of PAGE_SIZE, never one query for the whole table
    assert len(pages) >= 5000 // outbox_module.PAGE_SIZE
    assert max(pages) <= outbox_module.PAGE_SIZE and sum(pages) == 5000

    pages.clear()
    code, out, _ = cli(capsys, config, "outbox", "list", "--limit", "0", "--json")
    assert len(json.loads(out)) == 5000 and max(pages) <= outbox_module.PAGE_SIZE


# --------------------------------------------------------------------------- show


def test_show_prints_the_exact_request_with_the_token_masked(
        capsys: pytest.CaptureFixture[str], config: Path, box: Outbox, crm: FakeCrm) -> None:
    ids = populate(box)
    code, out, _ = cli(capsys, config, "outbox", "show", str(ids["dead"]))
    assert code == 0
    url = (f"{crm.url}/0/rest/OmniWhoCallsService/***/PushHistoryData?id=call-b"
           f"&callerid=79991234567&user=101&event=incoming&duration=7")
    assert f"request: POST {url}" in out
    assert "BPMCSRF: ***" in out and 'body: {"FILES": []}' in out
    assert "status:" in out and "dead" in out and "HTTP 400" in out
    assert TOKEN not in out and PASSWORD not in out

    code, data = cli_json(capsys, config, "outbox", "show", str(ids["dead"]))
    assert code == 0
    assert data["request"]["url"] == url and data["request"]["body"] == {"FILES": []}
    assert data["status"] == "dead" and data["attempts"] == 1
    assert TOKEN not in json.dumps(data)


def test_show_without_a_configured_crm(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                       db: Path, box: Outbox) -> None:
    ids = populate(box)
    config = write_config(tmp_path / "draft.ini", db)
    code, out, _ = cli(capsys, config, "outbox", "show", str(ids["expired"]))
    assert code == 0
    assert "request: GET RingingEventHandler (CRM not configured" in out
    assert "eventName = ringing" in out
    code, out, err = cli(capsys, config, "outbox", "show", "999999")
    assert code == 1 and "no outbox row 999999" in err


# --------------------------------------------------------------------------- retry


def test_retry_by_status_keeps_per_call_order(capsys: pytest.CaptureFixture[str],
                                              config: Path, box: Outbox) -> None:
    now = time.time()
    ringing, answer, summary = box.enqueue(
        [item("k", "ringing", now), item("k", "answer", now), item("k", "summary")], now=now)
    box.mark_dead(ringing, "HTTP 400", 400, rejected=True)
    box.mark_dead(answer, "HTTP 400", 400, rejected=True)
    # the summary is now the head and pending; retrying puts the popups back in front
    code, out, _ = cli(capsys, config, "outbox", "retry", "--status", "dead")
    assert code == 0 and "Requeued 2 rows (dead: 2)" in out
    order = []
    for step in range(3):
        (row,) = box.claim_due(time.time() + 1, 10, 60)
        order.append(row.kind)
        assert row.attempts == 0
        box.mark_delivered(row.id, 200)
        assert step < 3
    assert order == ["ringing", "answer", "summary"]


def test_retry_dry_run_changes_nothing(capsys: pytest.CaptureFixture[str], config: Path,
                                       box: Outbox) -> None:
    ids = populate(box)
    before = [row.to_dict() for row in box.list_rows(limit=None)]
    code, out, _ = cli(capsys, config, "outbox", "retry", "--status", "dead", "--dry-run")
    assert code == 0 and "Would requeue 1 row (dead: 1)" in out and str(ids["dead"]) in out
    code, data = cli_json(capsys, config, "outbox", "retry", "--status", "expired",
                          "--dry-run")
    assert code == 0 and data["dry_run"] and [r["id"] for r in data["rows"]] == [ids["expired"]]
    assert data["stale_realtime"] == [ids["expired"]]  # a popup an hour late
    assert [row.to_dict() for row in box.list_rows(limit=None)] == before


def test_retry_ids_and_filters(capsys: pytest.CaptureFixture[str], config: Path,
                               box: Outbox) -> None:
    ids = populate(box)
    code, data = cli_json(capsys, config, "outbox", "retry", str(ids["dead"]),
                          str(ids["pending"]), "424242")
    assert code == 1  # two of the named rows could not be retried
    assert [r["id"] for r in data["rows"]] == [ids["dead"]]
    assert {s["id"]: s["reason"][:10] for s in data["skipped"]} == {
        ids["pending"]: "is pending", 424242: "no such ro"}
    row = box.get(ids["dead"])
    assert row is not None and row.status is OutboxStatus.pending and row.attempts == 0
    # --kind filters: the expired row is a ringing, so a summary-only retry has nothing
    code, out, _ = cli(capsys, config, "outbox", "retry", "--status", "expired",
                       "--kind", "summary")
    assert code == 0 and out.strip() == "Nothing to do"
    code, out, _ = cli(capsys, config, "outbox", "retry", "--status", "expired",
                       "--since", "10m")
    assert code == 0 and out.strip() == "Nothing to do"  # created an hour ago
    code, out, _ = cli(capsys, config, "outbox", "retry", "--status", "expired")
    assert code == 0 and "Requeued 1 row (expired: 1)" in out
    assert "realtime_ttl" in out  # it will expire again: said so


def test_retry_needs_ids_or_a_status(capsys: pytest.CaptureFixture[str], config: Path,
                                     box: Outbox) -> None:
    code, _, err = cli(capsys, config, "outbox", "retry")
    assert code == 2 and "give row IDs or --status" in err


# --------------------------------------------------------------------------- purge


def test_purge_deletes_only_old_delivered_rows(capsys: pytest.CaptureFixture[str],
                                               config: Path, box: Outbox) -> None:
    ids = populate(box)
    before = statuses(box)
    code, out, _ = cli(capsys, config, "outbox", "purge", "--delivered-older-than", "7",
                       "--dry-run")
    assert code == 0 and "Would delete 1 row" in out
    assert statuses(box) == before
    code, data = cli_json(capsys, config, "outbox", "purge", "--delivered-older-than", "7")
    assert code == 0 and data["count"] == 1 and not data["dry_run"]
    after = statuses(box)
    assert ids["old_delivered"] not in after
    del before[ids["old_delivered"]]
    assert after == before  # pending, inflight, dead, expired, recent delivered: untouched
    # even "older than 0 days" never touches a row that is not delivered
    code, out, _ = cli(capsys, config, "outbox", "purge", "--delivered-older-than", "0")
    assert code == 0 and "Deleted 1 row" in out
    assert sorted(statuses(box).values()) == ["dead", "expired", "inflight", "pending"]
    code, out, _ = cli(capsys, config, "outbox", "purge")  # default: retention_days
    assert code == 0 and out.startswith("Nothing to do")


# --------------------------------------------------------------------------- deliver


def test_deliver_burst_drains_and_reports(capsys: pytest.CaptureFixture[str], config: Path,
                                          box: Outbox, crm: FakeCrm) -> None:
    box.enqueue([item("call-x", "ringing", time.time()), item("call-x", "summary"),
                 item("call-y", "summary")])
    code, out, _ = cli(capsys, config, "deliver", "--burst")
    assert code == 0, out
    assert "delivered 3, retried 0, dead 0" in out
    assert [(e.endpoint, e.params["id"]) for e in crm.events()
            if e.params["id"] == "call-x"] == [("RingingEventHandler", "call-x"),
                                               ("PushHistoryData", "call-x")]
    assert statuses(box) and set(statuses(box).values()) == {"delivered"}


def test_deliver_burst_exit_1_when_rows_die_or_the_crm_is_down(
        capsys: pytest.CaptureFixture[str], config: Path, box: Outbox, crm: FakeCrm) -> None:
    box.enqueue([item("call-x", "summary")])
    crm.reject_all(400)
    code, data = cli_json(capsys, config, "deliver", "--burst")
    assert code == 1 and data["dead"] == 1 and data["dead_in_outbox"] == 1
    crm.reject_all(None)
    box.enqueue([item("call-y", "summary")])
    crm.set_down()
    try:
        code, data = cli_json(capsys, config, "deliver", "--burst")  # returns: no hang
    finally:
        crm.set_down(False)
    assert code == 1 and data["retried"] == 1 and data["pending_with_errors"] == 1
    assert data["crm_down"] and "cannot reach the CRM" in data["last_error"]


# --------------------------------------------------------------------------- while delivering


def test_retry_purge_replay_while_the_service_delivers(capsys: pytest.CaptureFixture[str],
                                                       config: Path, db: Path, crm: FakeCrm,
                                                       tmp_path: Path) -> None:
    """The service's OutboxWriter + Deliverer run in greenlets while the CLI retries and
    purges and scripts/replay (another process, another Deliverer) requeues and delivers:
    no lock error, every event arrives exactly once, in order per call."""
    seed = Outbox(str(db), synchronous="NORMAL")
    now = time.time()
    old = seed.enqueue([item(f"old-{i}", "summary") for i in range(50)], now=now - 30 * DAY)
    for row_id in old:
        seed.mark_delivered(row_id, 200, now=now - 30 * DAY)
    dead = seed.enqueue([item(f"dead-{i}", "summary") for i in range(20)], now=now - 60)
    for row_id in dead:
        seed.mark_dead(row_id, "HTTP 400", 400, rejected=True)
    expired = seed.enqueue([item(f"expired-{i}", "summary") for i in range(20)], now=now - 60)
    for row_id in expired:  # left for scripts/replay (a summary expires only by hand)
        seed.mark_expired(row_id)
    seed.close()

    crm.latency = 0.01  # keeps the service busy while the CLI and replay run
    writer = OutboxWriter(str(db), synchronous="NORMAL")
    client = Cc360Client(crm.url, TOKEN, login="admin", password=PASSWORD, lanes=4)
    deliverer = Deliverer(writer, client, concurrency=4, lease_seconds=30,
                          backoff=BackoffPolicy(initial=0.01, maximum=0.05))
    writer.on_commit = lambda ids: deliverer.notify()
    stop = gevent.event.Event()
    loop = gevent.spawn(deliverer.run, stop)
    try:
        live_calls = [f"live-{i}" for i in range(60)]
        for call in live_calls:
            writer.enqueue([item(call, "ringing", time.time()), item(call, "answer",
                                                                     time.time()),
                            item(call, "summary")])
        assert crm.wait_for(10, timeout=30)  # delivery is under way
        code, out, err = cli(capsys, config, "outbox", "retry", "--status", "dead")
        assert code == 0 and "Requeued 20 rows" in out, err
        code, out, err = cli(capsys, config, "outbox", "purge", "--delivered-older-than", "7")
        assert code == 0 and "Deleted 50 rows" in out, err
        if shutil.which("flock") and (REPO / ".venv" / "bin" / "fs-cc360").exists():
            # another process requeues and delivers at the same time (its own Deliverer)
            done = replay(config, tmp_path / "replay.lock")
            assert done.returncode == 0, done.stdout + done.stderr
            assert "requeued=20 summaries (dead=0 expired=20)" in done.stdout
        else:  # pragma: no cover
            assert cli(capsys, config, "outbox", "retry", "--status", "expired")[0] == 0
        expected = len(live_calls) * 3 + len(dead) + len(expired)
        assert crm.wait_for(expected, timeout=30)
    finally:
        stop.set()
        loop.join(timeout=15)
        writer.close()
        client.close()
    events = crm.events()
    assert len(events) == expected  # nothing lost, nothing sent twice
    for call in live_calls:
        kinds = [e.params.get("eventName", "summary") for e in events if e.params["id"] == call]
        assert kinds == ["ringing", "answer", "summary"]
    box = Outbox(str(db), synchronous="NORMAL")
    try:
        assert set(statuses(box).values()) == {"delivered"}
        assert len(statuses(box)) == expected
    finally:
        box.close()


# --------------------------------------------------------------------------- test-crm


def test_test_crm_forms(capsys: pytest.CaptureFixture[str], config: Path,
                        crm: FakeCrm) -> None:
    code, out, _ = cli(capsys, config, "test-crm", "--user", "102")
    assert code == 0, out
    assert "login: POST" in out and "-> OK logged in" in out
    assert out.count("-> OK HTTP 200") == 4
    assert "/0/rest/OmniWhoCallsService/***/RingingEventHandler?id=fs-cc360-test-" in out
    assert TOKEN not in out and PASSWORD not in out
    events = crm.events()
    assert [e.params.get("eventName", e.endpoint) for e in events] == [
        "ringing", "answer", "hangup", "PushHistoryData"]
    call_ids = {e.params["id"] for e in events}
    assert len(call_ids) == 1 and call_ids.pop().startswith("fs-cc360-test-")
    summary = events[-1]
    assert summary.params["user"] == "102" and summary.params["callerid"] == "79991234567"
    assert summary.params["event"] == "incoming" and int(summary.params["duration"]) > 0
    assert summary.body == {"FILES": []}


def test_test_crm_applies_the_extension_mapping(capsys: pytest.CaptureFixture[str],
                                                config: Path, crm: FakeCrm) -> None:
    with config.open("a") as f:
        f.write("\n[extensions]\nalice = 105\n")
    code, out, _ = cli(capsys, config, "test-crm", "--user", "alice")
    assert code == 0 and "user 'alice' is extension 105 ([extensions])" in out
    assert {e.params["user"] for e in crm.events()} == {"105"}
    crm.clear()
    code, out, _ = cli(capsys, config, "test-crm", "--user", "bob")
    assert code == 0 and "warning: 'bob' is not an agent extension" in out
    assert {e.params["user"] for e in crm.events()} == {"bob"}


def test_test_crm_anonymous(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                            db: Path) -> None:
    with FakeCrm(mode="anonymous", token=TOKEN) as anon:
        config = write_config(tmp_path / "anon.ini", db, anon, auth="anonymous")
        code, data = cli_json(capsys, config, "test-crm", "--callerid", "+7 999 123-45-67")
        assert code == 0 and data["ok"] and data["auth"] == "anonymous"
        assert [s["step"] for s in data["steps"]] == list(("ringing", "answer", "hangup",
                                                           "summary"))
        assert all(s["status"] == 200 for s in data["steps"])
        assert data["callerid"] == "79991234567"  # normalised like the service does
        assert anon.login_attempts == 0 and len(anon.events()) == 4
        assert all("/0/ServiceModel/OmniWhoCallsService.svc/***/" in s["url"]
                   for s in data["steps"])


def test_test_crm_wrong_password(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                 db: Path, crm: FakeCrm) -> None:
    config = write_config(tmp_path / "bad.ini", db, crm, password="wrong-pass-42")
    code, out, err = cli(capsys, config, "test-crm")
    assert code == 1
    assert "-> FAILED CrmAuthError" in out and "login rejected for user 'admin'" in out
    assert "check crm.login and crm.password" in out
    assert out.count("skipped (an earlier step failed)") == 4
    assert "wrong-pass-42" not in out + err and TOKEN not in out + err
    assert crm.events(accepted_only=False) == []


def test_test_crm_dry_run_sends_nothing(capsys: pytest.CaptureFixture[str], config: Path,
                                        crm: FakeCrm) -> None:
    code, out, _ = cli(capsys, config, "test-crm", "--dry-run")
    assert code == 0 and "dry run: nothing is sent" in out
    assert "PushHistoryData?id=fs-cc360-test-" in out and '"UserPassword": "***"' in out
    assert crm.received == []


def test_test_crm_unreachable(capsys: pytest.CaptureFixture[str], config: Path,
                              crm: FakeCrm) -> None:
    crm.set_down()
    code, data = cli_json(capsys, config, "test-crm")
    crm.set_down(False)
    assert code == 1 and data["ok"] is False
    login = data["steps"][0]
    assert login["error_class"] == "CrmAuthError" and "cannot reach the CRM" in login["error"]


# --------------------------------------------------------------------------- backfill


def test_backfill_command(capsys: pytest.CaptureFixture[str], config: Path, db: Path,
                          tmp_path: Path) -> None:
    cdr = tmp_path / "json_cdr"
    cdr.mkdir()
    for scenario in ("a_inbound_answered_caller_hangup", "m_attended_transfer"):
        for path in (JSON_CDR / scenario).glob("*.json"):
            shutil.copy(path, cdr / path.name)
    ages = ("--min-age", "0", "--max-age", "36500")  # the captures' calls are old
    code, data = cli_json(capsys, config, "backfill", str(cdr), *ages, "--dry-run")
    assert code == 0 and data["summaries_found"] == 3 and data["enqueued"] == 3
    assert all(s["status"] == "would enqueue" for s in data["summaries"])
    assert not db.exists()  # a dry run creates nothing
    code, out, _ = cli(capsys, config, "backfill", str(cdr), *ages)
    assert code == 0
    assert "5 files, 5 read" in out and "3 summaries enqueued, 0 duplicates" in out
    (cdr / "broken.cdr.json").write_text("{oops")
    code, out, _ = cli(capsys, config, "backfill", str(cdr), *ages)
    assert code == 1
    assert "bad file skipped: broken.cdr.json: not valid JSON" in out
    assert "5 done before" in out and "0 summaries enqueued" in out
    box = Outbox(str(db))
    try:
        assert [row.kind for row in box.list_rows(limit=None)] == ["summary"] * 3
    finally:
        box.close()


def test_backfill_skips_calls_older_than_the_outbox_retention(
        capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path) -> None:
    """The outbox forgets delivered rows after retention_days: older calls could have
    been sent already, so they are not sent (again)."""
    cdr = tmp_path / "json_cdr"
    cdr.mkdir()
    for path in (JSON_CDR / "j_outgoing_from_101").glob("*.json"):
        shutil.copy(path, cdr / path.name)
    long_ago = time.time() - 30 * DAY
    for path in cdr.iterdir():
        os.utime(path, (long_ago, long_ago))
    code, data = cli_json(capsys, config, "backfill", str(cdr), "--min-age", "0")
    assert code == 0 and data["too_old"] == 2 and data["enqueued"] == 0


# --------------------------------------------------------------------------- scripts/replay


def replay(config: Path, lock: Path, *args: str, path_env: str | None = None
           ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FS_CC360_")}
    env["PATH"] = path_env or "/usr/bin:/bin"  # no fs-cc360 on PATH: the .venv fallback
    return subprocess.run(
        [str(REPO / "scripts" / "replay"), "--config", str(config), "--lock", str(lock),
         *args], capture_output=True, text=True, env=env, timeout=120, check=False)


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "fs-cc360").exists() or
                    shutil.which("flock") is None, reason="needs .venv/bin/fs-cc360, flock")
def test_replay_script(config: Path, box: Outbox, crm: FakeCrm, tmp_path: Path) -> None:
    now = time.time()
    summary, ringing = box.enqueue([item("call-r", "summary"),
                                    item("call-s", "ringing", now - 3600)], now=now - 3600)
    old = box.enqueue([item("call-t", "summary")], now=now - 3 * DAY)[0]
    for row_id in (summary, ringing, old):
        box.mark_dead(row_id, "HTTP 400", 400, rejected=True)
    lock = tmp_path / "replay.lock"

    done = replay(config, lock, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "would_requeue=1 summaries" in done.stdout
    assert statuses(box)[summary] == "dead"

    done = replay(config, lock)  # default window 24h: the 3-day-old summary stays
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = done.stdout.splitlines()
    assert "requeued=1 summaries (dead=1 expired=0) delivered=1" in line
    assert "still_dead=0" in line and line.endswith(": ok")
    assert [e.params["id"] for e in crm.events()] == ["call-r"]
    assert statuses(box) == {summary: "delivered", ringing: "dead", old: "dead"}

    crm.reject_all(400)  # the CRM still refuses: rows stay dead -> non-zero
    done = replay(config, lock, "--since", "7d", "--include-realtime")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "requeued=2 rows (realtime included)" in done.stdout
    assert "rows stay dead" in done.stdout


@pytest.mark.skipif(shutil.which("flock") is None, reason="needs flock")
def test_replay_lock_makes_a_second_run_exit(config: Path, box: Outbox,
                                             tmp_path: Path) -> None:
    lock = tmp_path / "replay.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a first run holds it
        done = replay(config, lock, path_env=f"{REPO / '.venv' / 'bin'}:/usr/bin:/bin")
    assert done.returncode == 75
    assert "another replay is running" in done.stderr and done.stdout == ""


def test_replay_usage_error() -> None:
    done = subprocess.run([str(REPO / "scripts" / "replay"), "--bogus"], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 2 and "unknown argument: --bogus" in done.stderr
    assert "Usage:" in done.stderr

