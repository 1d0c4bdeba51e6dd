"""The fake CC360 in a process of its own, driven over stdin/stdout (one JSON line each way).

A real CRM does not share the connector's CPU; in the delivery, latency and backlog
benches the fake runs here so that its HTTP parsing is not charged to the service.
Started by :class:`bench.harness.RemoteCrm`; plain threads (no gevent), stdlib only.

Commands (one per line): ``{"op": "count"}`` -> ``{"accepted": n, "received": n}``;
``{"op": "events"}`` -> ``{"events": [[id, kind, at], ...]}`` (accepted event requests, in
arrival order); ``{"op": "down"}`` / ``{"op": "up"}``; ``{"op": "latency", "value": s}``;
``{"op": "forget"}`` (drop what was received so far: long runs keep memory flat);
``{"op": "quit"}``. The first line written is ``{"url": ..., "pid": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fs_cc360.simulators.crm import FakeCrm, Received  # noqa: E402


class Counting:
    """Keeps only what the benches need from each request (the fake's own list is
    emptied as it goes, so a million requests do not fill the memory)."""

    def __init__(self, crm: FakeCrm, keep: bool) -> None:
        self.crm = crm
        self.keep = keep
        self.accepted = 0
        self.received = 0
        self.events: list[tuple[str, str, float]] = []

    def __call__(self, rec: Received) -> None:
        if not rec.is_event:
            return
        self.received += 1
        if rec.accepted:
            self.accepted += 1
            if self.keep:
                self.events.append((rec.params.get("id", ""),
                                    rec.params.get("eventName") or "summary", rec.at))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--token", required=True)
    parser.add_argument("--login", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--no-keep", action="store_true",
                        help="count requests only (the backlog bench)")
    args = parser.parse_args()
    crm = FakeCrm(mode="forms", token=args.token, login=args.login, password=args.password)
    crm.latency = args.latency
    counting = Counting(crm, keep=not args.no_keep)

    def on_request(rec: Received) -> None:
        counting(rec)
        with crm._lock:  # the fake would keep every request otherwise
            crm.received.clear()

    crm.on_request = on_request
    crm.start()
    out = sys.stdout
    out.write(json.dumps({"url": crm.url, "pid": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        command = json.loads(line)
        op = command.get("op")
        reply: dict[str, object] = {"ok": True}
        if op == "count":
            reply = {"accepted": counting.accepted, "received": counting.received}
        elif op == "events":
            reply = {"events": counting.events}
        elif op == "down":
            crm.set_down(True)
        elif op == "up":
            crm.set_down(False)
        elif op == "latency":
            crm.latency = float(command["value"])
        elif op == "forget":
            counting.events = []
        elif op == "quit":
            break
        out.write(json.dumps(reply) + "\n")
        out.flush()
    crm.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
