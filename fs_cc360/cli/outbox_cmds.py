"""``fs-cc360 outbox stats|list|show|retry|purge``: look at the outbox and fix it, no SQL.

Every command opens the outbox file itself (WAL lets it work beside the running service)
and goes through :class:`fs_cc360.outbox.Outbox` only; each call there is one short
transaction, so the service is never blocked for long. Long listings stream page by page
(keyset pagination in :meth:`Outbox.list_rows`), never loading the table.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fs_cc360.calls import REALTIME_KINDS
from fs_cc360.cli.common import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_PROBLEM,
    format_age,
    format_time,
    load,
    parse_time,
    print_json,
    print_table,
)
from fs_cc360.config import Settings
from fs_cc360.crm_request import CrmRequest
from fs_cc360.errors import ConfigError, OutboxError
from fs_cc360.outbox import Outbox, OutboxStats, OutboxStatus, Row, is_postgresql
from fs_cc360.outbox import open_outbox as open_storage

#: Pending rows older than this while nothing was delivered for as long: "stalled".
STALL_AFTER = 300.0
#: An error newer than this, with rows still waiting: "CRM failing".
RECENT_ERROR = 900.0
#: Characters of ``last_error`` shown in a listing.
SHORT_ERROR = 40

KINDS = ("ringing", "answer", "hangup", "summary")
RETRY_STATUSES = (OutboxStatus.dead.value, OutboxStatus.expired.value)


# --------------------------------------------------------------------------- registration


def register(sub: Any) -> None:
    outbox = sub.add_parser("outbox", help="inspect and repair the outbox (stats, list, ...)")
    osub = outbox.add_subparsers(dest="outbox_command", metavar="ACTION")
    osub.required = True

    stats = osub.add_parser("stats", help="counts, ages and a health verdict (exit 1: unhealthy)")
    _node_flag(stats)
    _json_flag(stats)
    stats.set_defaults(func=cmd_stats)

    lst = osub.add_parser("list", help="rows, newest first (streams)")
    lst.add_argument("--status", choices=[s.value for s in OutboxStatus])
    lst.add_argument("--kind", choices=KINDS)
    lst.add_argument("--call", metavar="ID", help="one call's rows (the CC360 id)")
    _time_flags(lst)
    lst.add_argument("--limit", type=_non_negative_int, default=50, metavar="N",
                     help="at most N rows (default 50; 0 = all)")
    _node_flag(lst)
    _json_flag(lst)
    lst.set_defaults(func=cmd_list)

    show = osub.add_parser("show", help="one row in full, with the exact request")
    show.add_argument("id", type=int, metavar="ID")
    _json_flag(show)
    show.set_defaults(func=cmd_show)

    retry = osub.add_parser(
        "retry", help="send dead/expired rows again (attempts reset, per-call order kept)")
    retry.add_argument("ids", nargs="*", type=int, metavar="ID")
    retry.add_argument("--status", choices=RETRY_STATUSES,
                       help="every row in this status (with the filters below)")
    retry.add_argument("--kind", choices=KINDS)
    _time_flags(retry)
    retry.add_argument("--dry-run", action="store_true", help="show what would change")
    _json_flag(retry)
    retry.set_defaults(func=cmd_retry)

    purge = osub.add_parser("purge", help="delete delivered rows (never pending or dead)")
    purge.add_argument("--delivered-older-than", type=_non_negative_float, metavar="DAYS",
                       help="delivered more than DAYS ago (default: [outbox] retention_days)")
    purge.add_argument("--dry-run", action="store_true", help="count without deleting")
    _json_flag(purge)
    purge.set_defaults(func=cmd_purge)


def _node_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", metavar="NAME",
                        help="only the rows this connector enqueued ([outbox] node; a "
                             "postgresql:// outbox shared by several FreeSWITCH nodes)")


def node_filter(settings: Settings, node: str | None) -> dict[str, str]:
    """``{"node": node}`` for a shared PostgreSQL outbox; a SQLite one has no nodes."""
    if node is None:
        return {}
    if not is_postgresql(settings.outbox.database):
        raise ConfigError("--node needs a shared outbox ([outbox] database = postgresql://"
                          "...): a SQLite outbox belongs to one node", key="outbox.database")
    return {"node": node}


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _time_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", type=parse_time, metavar="T",
                        help="created at or after T (2026-11-27, '2026-11-27 10:00', 2h, 7d)")
    parser.add_argument("--until", type=parse_time, metavar="T", help="created before T")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0: {text!r}")
    return value


# --------------------------------------------------------------------------- helpers


def database_file(database: str) -> Path | None:
    """The file behind ``[outbox] database`` (a path or ``sqlite:///`` URL); None for memory."""
    if is_postgresql(database):
        return None
    if "://" in database:
        path = urlsplit(database).path
        path = path[1:] if path.startswith("/") else path  # sqlite:///rel, sqlite:////abs
        return None if path in ("", ":memory:") else Path(path)
    return None if database == ":memory:" else Path(database)


def cli_settings(args: argparse.Namespace, *, require_crm: bool = False) -> Settings:
    """:func:`~fs_cc360.cli.common.load` for a short command (``main()`` has already sent
    log records to stderr at WARNING unless ``--log-level``, so stdout holds only the table
    or the JSON a script parses; ``[logging] level`` is meant for the service)."""
    return load(args, require_crm=require_crm)


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def journal_rows(settings: Settings) -> int | None:
    """Rows in this node's local journal (a shared PostgreSQL outbox; None otherwise or
    when there is no journal file): read only, the service owns the file."""
    if not is_postgresql(settings.outbox.database):
        return None
    path = Path(settings.outbox.journal)
    if not path.exists():
        return None
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return int(db.execute("SELECT COUNT(*) FROM journal").fetchone()[0])
    except sqlite3.Error as exc:
        raise OutboxError(f"outbox journal {path} cannot be read ({exc}): check its "
                          "permissions") from exc


def open_outbox(settings: Settings, *, create: bool = False) -> Outbox:
    """The outbox of ``settings``; refuses to create a missing file unless ``create``.

    A command run from the wrong directory (a relative ``database``) would otherwise
    make an empty outbox there and report "nothing to do".
    """
    database = settings.outbox.database
    if is_postgresql(database):
        return open_storage(database, synchronous=settings.outbox.synchronous,
                            node=settings.outbox.node or None,
                            password=settings.outbox.password or None)
    path = database_file(database)
    if path is not None and not create and not path.exists():
        raise ConfigError(
            f"outbox {path} does not exist: check [outbox] database (a relative path is "
            f"relative to the working directory, now {Path.cwd()})", key="outbox.database")
    return Outbox(database, synchronous=settings.outbox.synchronous)


def short(text: str | None, limit: int = SHORT_ERROR) -> str:
    if not text:
        return ""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def last_result(row: Row) -> str:
    """``200``, ``503 CC360 answered...`` or the error alone, shortened."""
    parts = [str(row.last_status)] if row.last_status is not None else []
    if row.last_error and row.status is not OutboxStatus.delivered:
        parts.append(short(row.last_error))
    return " ".join(parts)


def stream_json_array(items: Iterable[Any]) -> int:
    """Print a JSON array one element at a time (a listing is never held in memory)."""
    count = 0
    sys.stdout.write("[")
    for item in items:
        sys.stdout.write(("," if count else "") + "\n  " + json.dumps(item, default=str))
        count += 1
    sys.stdout.write("\n]\n" if count else "]\n")
    return count


# --------------------------------------------------------------------------- stats


@dataclass(frozen=True)
class Health:
    """The one-line verdict of ``outbox stats``."""

    state: str  #: healthy | crm_failing | stalled | dead_rows
    message: str
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.state == "healthy"


def health(stats: OutboxStats, now: float) -> Health:
    """Judge delivery from the stats alone (pure: the thresholds are module constants).

    Most urgent first: the CRM failing (recent errors, rows waiting to be retried), then
    stalled (old pending rows, nothing delivered lately: is the service running?), then
    dead rows waiting for an operator.
    """
    waiting = stats.count(OutboxStatus.pending) + stats.count(OutboxStatus.inflight)
    dead = stats.count(OutboxStatus.dead)
    problems: list[tuple[str, str]] = []
    error_at = stats.last_error_at
    delivered_at = stats.last_delivered_at
    if (waiting and error_at is not None and now - error_at <= RECENT_ERROR
            and (delivered_at is None or error_at >= delivered_at)):
        problems.append(("crm_failing",
                         f"CRM failing: last error {format_age(now - error_at)} ago, "
                         f"{plural(waiting, 'row')} waiting to be retried "
                         f"({short(stats.last_error, 80)})"))
    oldest = stats.oldest_pending_at
    if (waiting and oldest is not None and now - oldest > STALL_AFTER
            and (delivered_at is None or now - delivered_at > STALL_AFTER)
            and not problems):
        last = f"last delivery {format_age(now - delivered_at)} ago" if delivered_at \
            else "nothing delivered yet"
        problems.append(("stalled",
                         f"stalled: {plural(waiting, 'row')} waiting, the oldest for "
                         f"{format_age(now - oldest)}, {last}: is the service running?"))
    if dead:
        problems.append(("dead_rows",
                         f"{plural(dead, 'dead row')} {'needs' if dead == 1 else 'need'} "
                         f"attention: see 'fs-cc360 outbox list --status dead', then "
                         f"'fs-cc360 outbox retry --status dead'"))
    if not problems:
        detail = f"{plural(waiting, 'row')} waiting" if waiting else "nothing waiting"
        return Health("healthy", f"healthy: {detail}")
    message = problems[0][1]
    if len(problems) > 1:
        message += "; also " + "; ".join(text for _, text in problems[1:])
    return Health(problems[0][0], message, tuple(state for state, _ in problems))


def cmd_stats(args: argparse.Namespace) -> int:
    settings = cli_settings(args)
    by_node = node_filter(settings, args.node)
    journaled = journal_rows(settings)
    try:
        outbox = open_outbox(settings)
    except OutboxError as exc:
        if journaled is None:
            raise
        # PostgreSQL down: what this node holds locally is still worth saying
        raise OutboxError(f"{exc}; this node's journal {settings.outbox.journal} holds "
                          f"{plural(journaled, 'row')} waiting for PostgreSQL") from exc
    try:
        stats = outbox.stats(**by_node)
    finally:
        outbox.close()
    now = time.time()
    verdict = health(stats, now)
    if args.json:
        data = stats.to_dict()
        data["database"] = outbox.path
        if journaled is not None:
            data["journal_rows"] = journaled
        data["oldest_pending_age"] = None if stats.oldest_pending_at is None \
            else max(0.0, now - stats.oldest_pending_at)
        data["health"] = {"state": verdict.state, "ok": verdict.ok,
                          "message": verdict.message, "problems": list(verdict.problems)}
        print_json(data)
        return EXIT_OK if verdict.ok else EXIT_PROBLEM
    kinds = sorted({kind for _, kind in stats.by_kind} | set(KINDS),
                   key=lambda k: (KINDS.index(k) if k in KINDS else len(KINDS), k))
    shown = f" (node {args.node})" if args.node else ""
    print(f"outbox {outbox.path}{shown}: {plural(stats.total, 'row')}")
    print_table(
        ([status.value, stats.count(status),
          *(stats.by_kind.get((status, kind), 0) for kind in kinds)]
         for status in OutboxStatus),
        ["STATUS", "TOTAL", *(kind.upper() for kind in kinds)],
    )
    print()
    print(f"oldest waiting:  {_ago(stats.oldest_pending_at, now)}")
    if stats.next_due_at is not None:
        due = stats.next_due_at - now
        print(f"next attempt:    {'now' if due <= 0 else 'in ' + format_age(due)}")
    print(f"last delivery:   {_ago(stats.last_delivered_at, now)}")
    error = f": {stats.last_error}" if stats.last_error else ""
    print(f"last error:      {_ago(stats.last_error_at, now)}{error}")
    if journaled:
        print(f"journal:         {plural(journaled, 'row')} in {settings.outbox.journal} "
              "waiting for PostgreSQL (moved by the running service)")
    if stats.by_node:
        print()
        print_table(([node, sum(counts.values()),
                      *(counts.get(status, 0) for status in OutboxStatus)]
                     for node, counts in sorted(stats.by_node.items())),
                    ["NODE", "TOTAL", *(status.value.upper() for status in OutboxStatus)])
    print()
    print(verdict.message)
    return EXIT_OK if verdict.ok else EXIT_PROBLEM


def _ago(at: float | None, now: float) -> str:
    if at is None:
        return "-"
    return f"{format_age(now - at)} ago ({format_time(at)})"


# --------------------------------------------------------------------------- list


def list_columns(row: Row) -> list[Any]:
    return [row.id, format_time(row.created_at), row.kind, row.user, row.callerid,
            row.status.value, row.attempts, last_result(row)]


LIST_HEADERS = ["ID", "TIME", "KIND", "USER", "CALLERID", "STATUS", "ATT", "LAST"]


def row_summary(row: Row) -> dict[str, Any]:
    """A listing entry for scripts: the row without its request text."""
    data = row.to_dict()
    data.pop("request", None)
    return data


def cmd_list(args: argparse.Namespace) -> int:
    settings = cli_settings(args)
    by_node = node_filter(settings, args.node)
    outbox = open_outbox(settings)
    try:
        rows: Iterator[Row] = outbox.list_rows(
            status=args.status, kind=args.kind, call_key=args.call, since=args.since,
            until=args.until, limit=args.limit or None, **by_node)
        if args.json:
            stream_json_array(row_summary(row) for row in rows)
            return EXIT_OK
        if is_postgresql(settings.outbox.database):  # a shared outbox: whose row it is
            count = print_table(([*list_columns(row), row.node] for row in rows),
                                [*LIST_HEADERS, "NODE"])
        else:
            count = print_table((list_columns(row) for row in rows), LIST_HEADERS)
    finally:
        outbox.close()
    if count == 0:
        print("(no matching rows)")
    elif args.limit and count >= args.limit:
        print(f"({count} newest shown; --limit 0 for all)")
    return EXIT_OK


# --------------------------------------------------------------------------- show


def describe_request(settings: Settings, request: CrmRequest) -> dict[str, Any]:
    """The request as it will be sent: the full URL (token masked) when the CRM is
    configured, else its parts; the headers that carry secrets, masked."""
    data: dict[str, Any] = {"method": request.method, "endpoint": request.endpoint,
                            "params": request.params, "body": request.body, "url": None}
    crm = settings.crm
    if crm.url and crm.token:
        try:
            from fs_cc360.cc360 import Cc360Client

            # Only for url_for: a draft config without a login still shows the URL.
            client = Cc360Client(crm.url, crm.token, auth=crm.auth, login=crm.login or "-",
                                 timeout=crm.timeout)
        except ConfigError:
            client = None
        if client is not None:
            data["url"] = client.url_for(request, masked=True)
            if crm.auth == "forms":
                data["headers"] = {"Cookie": "*** (forms login session)", "BPMCSRF": "***"}
            data["auth"] = crm.auth
    return data


def cmd_show(args: argparse.Namespace) -> int:
    settings = cli_settings(args)
    outbox = open_outbox(settings)
    try:
        row = outbox.get(args.id)
    finally:
        outbox.close()
    if row is None:
        print(f"fs-cc360: no outbox row {args.id}", file=sys.stderr)
        return EXIT_PROBLEM
    try:
        request: dict[str, Any] | None = describe_request(settings, row.crm_request())
        request_error = None
    except (ValueError, KeyError, TypeError) as exc:  # a row written by a broken version
        request, request_error = None, f"unreadable request JSON: {exc}"
    if args.json:
        data = row.to_dict()
        data["request"] = request if request is not None else {"raw": row.request,
                                                               "error": request_error}
        print_json(data)
        return EXIT_OK
    fields = [
        ("id", row.id), ("call", row.call_key), ("kind", row.kind), ("user", row.user),
        ("callerid", row.callerid), ("status", row.status.value),
        ("attempts", f"{row.attempts} (of which {row.rejections} rejected by the CRM)"),
        ("created", format_time(row.created_at)),
        ("event time", format_time(row.event_at)),
        ("updated", format_time(row.updated_at)),
        ("next attempt", format_time(row.next_attempt_at)
         if not row.status.final else "-"),
        ("lease until", format_time(row.lease_until)),
        ("delivered", format_time(row.delivered_at)),
        ("last status", row.last_status if row.last_status is not None else "-"),
        ("last error", row.last_error or "-"),
    ]
    width = max(len(name) for name, _ in fields) + 1
    for name, value in fields:
        print(f"{name + ':':<{width}} {value}")
    print()
    if request is None:
        print(f"request: {request_error}\n{row.request}")
        return EXIT_OK
    if request["url"]:
        print(f"request: {request['method']} {request['url']}")
        for name, value in request.get("headers", {}).items():
            print(f"  {name}: {value}")
    else:
        print(f"request: {request['method']} {request['endpoint']} (CRM not configured: "
              f"no URL)")
        for name, value in request["params"].items():
            print(f"  {name} = {value}")
    if request["body"] is not None:
        print("body: " + json.dumps(request["body"], ensure_ascii=False))
    return EXIT_OK


# --------------------------------------------------------------------------- retry


def cmd_retry(args: argparse.Namespace) -> int:
    if not args.ids and not args.status:
        print("fs-cc360 outbox retry: give row IDs or --status dead|expired",
              file=sys.stderr)
        return EXIT_CONFIG
    settings = cli_settings(args)
    outbox = open_outbox(settings)
    statuses = [args.status] if args.status else list(RETRY_STATUSES)
    try:
        matched = outbox.requeue(
            ids=args.ids or None, statuses=statuses,
            kinds=[args.kind] if args.kind else None, since=args.since, until=args.until,
            dry_run=args.dry_run)
        skipped = _not_retried(outbox, args.ids, {row.id for row in matched})
    finally:
        outbox.close()
    now = time.time()
    ttl = settings.delivery.realtime_ttl
    stale = [row for row in matched if row.kind in REALTIME_KINDS
             and now - (row.event_at or row.created_at) > ttl]
    if args.json:
        print_json({"dry_run": args.dry_run, "count": len(matched),
                    "rows": [row_summary(row) for row in matched],
                    "skipped": [{"id": i, "reason": why} for i, why in skipped],
                    "stale_realtime": [row.id for row in stale]})
        return EXIT_PROBLEM if skipped else EXIT_OK
    for row_id, why in skipped:
        print(f"#{row_id}: {why}", file=sys.stderr)
    if not matched:
        print("Nothing to do")
        return EXIT_PROBLEM if skipped else EXIT_OK
    print_table(([row.id, format_time(row.created_at), row.kind, row.call_key, row.user,
                  row.status.value, row.attempts, short(row.last_error)] for row in matched),
                ["ID", "TIME", "KIND", "CALL", "USER", "WAS", "ATT", "LAST ERROR"])
    counts = {status: sum(1 for row in matched if row.status.value == status)
              for status in RETRY_STATUSES}
    detail = ", ".join(f"{status}: {n}" for status, n in counts.items() if n)
    verb = "Would requeue" if args.dry_run else "Requeued"
    print(f"{verb} {plural(len(matched), 'row')} ({detail})")
    if stale:
        print(f"note: {len(stale)} ringing/answer/hangup rows are older than [delivery] "
              f"realtime_ttl ({ttl:g}s): the deliverer will expire them again instead of "
              f"sending a late popup")
    return EXIT_PROBLEM if skipped else EXIT_OK


def _not_retried(outbox: Outbox, ids: list[int], matched: set[int]) -> list[tuple[int, str]]:
    """Why each explicitly named row was not requeued."""
    out: list[tuple[int, str]] = []
    for row_id in dict.fromkeys(ids):
        if row_id in matched:
            continue
        row = outbox.get(row_id)
        if row is None:
            out.append((row_id, "no such row"))
        else:
            out.append((row_id, f"is {row.status.value}, kind {row.kind}: only dead or "
                                f"expired rows matching the filters are retried"))
    return out


# --------------------------------------------------------------------------- purge


def cmd_purge(args: argparse.Namespace) -> int:
    settings = cli_settings(args)
    days = args.delivered_older_than
    if days is None:
        days = settings.outbox.retention_days
    older_than = time.time() - days * 86400
    outbox = open_outbox(settings)
    try:
        if args.dry_run:
            count = count_purgeable(outbox, older_than)
        else:
            count = outbox.purge_delivered(older_than)
    finally:
        outbox.close()
    if args.json:
        print_json({"dry_run": args.dry_run, "days": days, "older_than": older_than,
                    "count": count})
        return EXIT_OK
    verb = "Would delete" if args.dry_run else "Deleted"
    if count == 0:
        print(f"Nothing to do: no row delivered before {format_time(older_than)}")
    else:
        print(f"{verb} {plural(count, 'row')} delivered before {format_time(older_than)} "
              f"({days:g} days)")
    return EXIT_OK


def count_purgeable(outbox: Outbox, older_than: float) -> int:
    """Delivered rows with ``delivered_at < older_than``, counted page by page.

    A row is created before it is delivered, so only rows created before ``older_than``
    are read.
    """
    return sum(1 for row in outbox.list_rows(status=OutboxStatus.delivered, until=older_than,
                                             limit=None)
               if row.delivered_at is not None and row.delivered_at < older_than)

