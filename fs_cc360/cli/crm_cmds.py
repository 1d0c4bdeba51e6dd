"""``fs-cc360 test-crm`` and ``fs-cc360 deliver --burst``: the commands that talk to CC360.

``test-crm`` goes straight through :class:`~fs_cc360.cc360.Cc360Client` (never the
outbox), so an admin sees in a minute whether URL, auth mode, token and extension work.
``deliver --burst`` drains what is due now through the real
:class:`~fs_cc360.delivery.Deliverer` and exits (rq's burst mode), for cron and tests.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fs_cc360.calls import CrmEvent
from fs_cc360.cc360 import Cc360Client
from fs_cc360.cli.common import (
    EXIT_OK,
    EXIT_PROBLEM,
    print_json,
)
from fs_cc360.cli.outbox_cmds import cli_settings, open_outbox
from fs_cc360.config import Settings
from fs_cc360.crm_request import request_for
from fs_cc360.errors import CrmError
from fs_cc360.outbox import OutboxStatus

#: Prefix of the synthetic call's id: easy to find (and delete) in the CRM.
TEST_CALL_PREFIX = "fs-cc360-test-"
TEST_STEPS = ("ringing", "answer", "hangup", "summary")


def register(sub: Any) -> None:
    test = sub.add_parser(
        "test-crm", help="send a synthetic call to the CRM step by step (not via the outbox)")
    test.add_argument("--user", default="101",
                      help="the agent: an extension, or a SIP user mapped in [extensions] "
                           "(default 101)")
    test.add_argument("--callerid", default="79991234567",
                      help="the caller's number (default 79991234567)")
    test.add_argument("--duration", type=int, default=5, metavar="SECONDS",
                      help="talk time reported in the summary (default 5)")
    test.add_argument("--dry-run", action="store_true", help="print the requests, send nothing")
    test.add_argument("--json", action="store_true", help="machine-readable output")
    test.set_defaults(func=cmd_test_crm)

    deliver = sub.add_parser(
        "deliver", help="deliver what is due now, then exit (for cron and tests)")
    deliver.add_argument("--burst", action="store_true", required=True,
                         help="drain the due rows and exit (the only mode: the service "
                              "itself delivers continuously)")
    deliver.add_argument("--json", action="store_true", help="machine-readable output")
    deliver.set_defaults(func=cmd_deliver)


# --------------------------------------------------------------------------- test-crm


@dataclass
class Step:
    """One request of the synthetic call and how it went."""

    name: str
    method: str
    url: str
    body: Any = None
    sent: bool = False
    ok: bool | None = None  #: None: not sent (dry run or skipped)
    status: int | None = None
    elapsed: float | None = None
    error_class: str | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.name, "method": self.method, "url": self.url, "body": self.body,
                "sent": self.sent, "ok": self.ok, "status": self.status,
                "elapsed": self.elapsed, "error_class": self.error_class, "error": self.error}


def build_client(settings: Settings) -> Cc360Client:
    """The CC360 client exactly as the service configures it, with one lane."""
    from fs_cc360.service import crm_client

    return crm_client(settings, lanes=1)


def synthetic_call(user: str, callerid: str, duration: int, call_id: str | None = None,
                   now: float | None = None) -> list[CrmEvent]:
    """ringing → answer → hangup → summary of one incoming call, no recordings."""
    call_id = call_id or f"{TEST_CALL_PREFIX}{uuid.uuid4()}"
    at = time.time() if now is None else now
    events = [CrmEvent(kind, call_id, user, callerid, at) for kind in TEST_STEPS[:3]]
    events.append(CrmEvent("summary", call_id, user, callerid, at, direction="incoming",
                           duration=duration))
    return events


def cmd_test_crm(args: argparse.Namespace) -> int:
    settings = cli_settings(args, require_crm=True)
    client = build_client(settings)
    callerid = settings.number_rules().normalize(args.callerid)
    # The extension the service would report for this FreeSWITCH user ([extensions] map,
    # [calls] extension_pattern); an unmatched user is sent as given, with a warning.
    extension = settings.extension_for(args.user)
    user = extension or args.user
    mapping_note = None
    if extension is None:
        mapping_note = (f"warning: {args.user!r} is not an agent extension for the service "
                        f"([extensions] / [calls] extension_pattern): it would never report "
                        f"calls of this user; sending it as given")
    elif extension != args.user:
        mapping_note = f"user {args.user!r} is extension {extension} ([extensions])"
    events = synthetic_call(user, callerid, max(0, args.duration))
    call_id = events[0].call_id
    plan: list[tuple[Step, CrmEvent | None]] = []  # None: the login
    if client.auth == "forms":
        plan.append((Step("login", "POST", client.login_url,
                          {"UserName": settings.crm.login, "UserPassword": "***"}), None))
    for event in events:
        request = request_for(event)
        plan.append((Step(event.kind, request.method, client.url_for(request, masked=True),
                          request.body), event))
    steps = [step for step, _ in plan]
    if not args.json:
        print(f"CRM {client.base_url} auth={client.auth} "
              f"{'user ' + repr(settings.crm.login) if client.auth == 'forms' else ''}".rstrip())
        print(f"synthetic call id={call_id} user={user} callerid={callerid}"
              + (f" (normalised from {args.callerid})" if callerid != args.callerid else ""))
        if mapping_note:
            print(mapping_note)
        if args.dry_run:
            print("dry run: nothing is sent")
    failed = False
    try:
        for step, event in plan:
            if args.dry_run or failed:
                _print_step(step, args, skipped=failed)
                continue
            _run_step(client, step, event)
            failed = not step.ok
            _print_step(step, args)
    finally:
        client.close()
    ok = not failed
    if args.json:
        print_json({"ok": ok if not args.dry_run else None, "dry_run": args.dry_run,
                    "crm": client.base_url, "auth": client.auth, "call_id": call_id,
                    "user": user, "callerid": callerid, "note": mapping_note,
                    "steps": [step.to_dict() for step in steps]})
    elif not args.dry_run:
        print("OK: the CRM accepted every step; look for the call in CC360 under extension "
              f"{user}" if ok else "FAILED: see the step above")
    return EXIT_OK if ok else EXIT_PROBLEM


def _run_step(client: Cc360Client, step: Step, event: CrmEvent | None) -> None:
    step.sent = True
    start = time.monotonic()
    try:
        if event is None:
            client.login()
        else:
            response = client.send(request_for(event))
            step.status = response.status
    except CrmError as exc:
        step.ok = False
        step.status = exc.status
        step.error_class = type(exc).__name__
        step.error = str(exc)
    else:
        step.ok = True
    finally:
        step.elapsed = round(time.monotonic() - start, 3)


def _print_step(step: Step, args: argparse.Namespace, *, skipped: bool = False) -> None:
    if args.json:
        return
    print(f"\n{step.name}: {step.method} {step.url}")
    if step.body is not None:
        print(f"  body: {json.dumps(step.body, ensure_ascii=False)}")
    if skipped:
        print("  -> skipped (an earlier step failed)")
    elif not step.sent:
        return
    elif step.ok:
        what = "logged in" if step.name == "login" else f"HTTP {step.status}"
        print(f"  -> OK {what} ({step.elapsed:.3f}s)")
    else:
        status = f" (HTTP {step.status})" if step.status is not None else ""
        print(f"  -> FAILED {step.error_class}{status}: {step.error}")


# --------------------------------------------------------------------------- deliver


def cmd_deliver(args: argparse.Namespace) -> int:
    """Drain the due rows once through the real :class:`Deliverer`, then report.

    Beside a running service this is safe: rows are claimed with a lease, so the two
    never send the same row. In burst mode the deliverer stops at the first moment
    nothing is due, e.g. right after the CRM failed (the rows wait for their backoff),
    so a cron run never hangs on an outage.
    """
    import gevent.event

    from fs_cc360.delivery import BackoffPolicy, Deliverer
    from fs_cc360.service import crm_client

    settings = cli_settings(args, require_crm=True)
    delivery = settings.delivery
    outbox = open_outbox(settings)
    client = crm_client(settings)
    try:
        deliverer = Deliverer(
            outbox, client, concurrency=delivery.concurrency,
            realtime_ttl=delivery.realtime_ttl, max_rejections=delivery.max_rejections,
            lease_seconds=delivery.lease_seconds,
            backoff=BackoffPolicy(initial=delivery.backoff_initial,
                                  maximum=delivery.backoff_max))
        deliverer.run(gevent.event.Event(), burst=True)
        stats = outbox.stats()
        with_errors = sum(1 for row in outbox.list_rows(status=OutboxStatus.pending,
                                                        limit=None) if row.attempts)
    finally:
        client.close()
        outbox.close()
    counts = deliverer.counts
    dead_total = stats.count(OutboxStatus.dead)
    pending = stats.count(OutboxStatus.pending) + stats.count(OutboxStatus.inflight)
    code = EXIT_PROBLEM if dead_total or with_errors else EXIT_OK
    if args.json:
        print_json({"delivered": counts.delivered, "retried": counts.retried,
                    "dead": counts.dead, "expired": counts.expired, "pending": pending,
                    "pending_with_errors": with_errors, "dead_in_outbox": dead_total,
                    "crm_down": deliverer.crm_down, "last_error": stats.last_error,
                    "ok": code == EXIT_OK})
        return code
    print(f"delivered {counts.delivered}, retried {counts.retried}, dead {counts.dead}, "
          f"expired {counts.expired}")
    print(f"left: {pending} waiting ({with_errors} after errors), {dead_total} dead")
    if deliverer.crm_down or with_errors:
        print(f"the CRM is failing: {stats.last_error or '?'}")
    if dead_total:
        print("dead rows: see 'fs-cc360 outbox list --status dead', then "
              "'fs-cc360 outbox retry'")
    return code
