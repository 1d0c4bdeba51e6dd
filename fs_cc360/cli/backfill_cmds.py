"""``fs-cc360 backfill DIR``: enqueue the summaries of calls the connector missed.

See :mod:`fs_cc360.backfill` for how mod_json_cdr files become summaries, why nothing is
sent twice, and where processed files are remembered. A cron line, after the service
has been down::

    */15 * * * *  fs-cc360 --config /etc/fs-cc360/fs-cc360.ini backfill /var/log/freeswitch/json_cdr
"""

from __future__ import annotations

import argparse
from typing import Any

from fs_cc360 import backfill as bf
from fs_cc360.cli.common import EXIT_OK, EXIT_PROBLEM, format_time, print_json, print_table
from fs_cc360.cli.outbox_cmds import cli_settings, database_file, open_outbox
from fs_cc360.outbox import Outbox

#: Seconds kept off ``--max-age`` (see :func:`cmd_backfill`).
RETENTION_MARGIN = 3600.0


def register(sub: Any) -> None:
    cmd = sub.add_parser(
        "backfill", help="enqueue call summaries from FreeSWITCH JSON CDR files (mod_json_cdr)")
    cmd.add_argument("directory", metavar="DIR", help="mod_json_cdr's log directory")
    cmd.add_argument("--min-age", type=float, default=bf.DEFAULT_MIN_AGE, metavar="SECONDS",
                     help=f"leave files of calls that ended less than SECONDS ago for the "
                          f"next run (default {bf.DEFAULT_MIN_AGE:g})")
    cmd.add_argument("--max-age", type=float, default=None, metavar="DAYS",
                     help="skip calls that ended more than DAYS ago (default: [outbox] "
                          "retention_days, the age after which the outbox forgets a "
                          "delivered call and could no longer tell it was sent)")
    cmd.add_argument("--dry-run", action="store_true",
                     help="show what would be enqueued; change nothing")
    cmd.add_argument("--json", action="store_true", help="machine-readable output")
    cmd.set_defaults(func=cmd_backfill)


def cmd_backfill(args: argparse.Namespace) -> int:
    from fs_cc360.service import new_item, recording_links, tracker_config

    settings = cli_settings(args)
    links = recording_links(settings)
    days = settings.outbox.retention_days if args.max_age is None else args.max_age
    # an hour less than the retention: the service purges hourly, clocks drift
    max_age = max(0.0, days * 86400 - RETENTION_MARGIN)
    db_file = database_file(settings.outbox.database)
    if args.dry_run and db_file is not None and not db_file.exists():
        outbox = Outbox(":memory:")  # nothing enqueued yet: an empty stand-in, no file made
    else:
        outbox = open_outbox(settings, create=True)  # the service may never have run
    state_path = bf.state_path_for(str(db_file)) if db_file is not None else None
    try:
        with bf.state_lock(None if args.dry_run else state_path):
            result = bf.backfill(
                args.directory, outbox, config=tracker_config(settings),
                new_item=lambda event: new_item(event, links),
                state=bf.ProcessedFiles(state_path), dry_run=args.dry_run,
                min_age=max(0.0, args.min_age), max_age=max_age)
    finally:
        outbox.close()
    code = EXIT_PROBLEM if result.bad else EXIT_OK
    if args.json:
        data = result.to_dict()
        data["state_file"] = str(state_path) if state_path else None
        print_json(data)
        return code
    print(f"CDR directory {result.directory}: {result.files_seen} files, "
          f"{result.files_read} read, {result.already_done} done before, "
          f"{result.too_recent} too recent, {result.waiting} waiting for their call's "
          f"other legs, {result.too_old} older than {days:g} days, {len(result.bad)} bad")
    for name, why in result.bad:
        print(f"  bad file skipped: {why if why.startswith(name) else name + ': ' + why}")
    if result.summaries:
        print_table(
            ([s.id or "-", format_time(s.event.at), s.event.call_id, s.event.user,
              s.event.callerid, s.event.direction, s.event.duration, len(s.event.files),
              s.status] for s in result.summaries),
            ["ID", "ENDED", "CALL", "USER", "CALLERID", "DIRECTION", "DURATION", "FILES",
             "STATUS"])
    verb = "would be enqueued" if args.dry_run else "enqueued"
    print(f"{result.enqueued} summaries {verb}, {result.duplicates} duplicates skipped "
          f"(already in the outbox)")
    return code
