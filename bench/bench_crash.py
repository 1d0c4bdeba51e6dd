"""``kill -9`` of the real service at random moments under a steady call load, N times.

The service runs as ``fs-cc360 --config X run`` (a child process); this process plays
calls (real captures, fresh UUIDs, 10x faster than real time) into the fake FreeSWITCH
and runs the fake CRM (20 ms per request, so kills often land while requests are in
flight). After each kill the outbox file is read (what was committed, what was in flight)
and the service is started again. At the end it drains, and every row is checked:
delivered exactly once, or more than once only if it was in flight at a kill
(:func:`bench.harness.crash_cycles`). Reports the duplicate count; the last line is the
share of committed rows delivered exactly once.
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

from bench.harness import crash_cycles, machine  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--rate", type=float, default=20.0, help="new calls per second")
    parser.add_argument("--seed", type=int, default=20241127)
    args = parser.parse_args()
    print(f"bench_crash on {machine()}: {args.kills} kills, {args.rate:g} calls/s")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-crash-") as tmp_name:
        report = crash_cycles(Path(tmp_name), kills=args.kills, seed=args.seed,
                              rate=args.rate, say=lambda text: print("  " + text, flush=True))
        if report.problems:
            print((Path(tmp_name) / "service.log").read_text()[-3000:])
    print(report.summary())
    for problem in report.problems[:20]:
        print("PROBLEM " + problem)
    print(f"RESULT crash kills={report.kills} rows={report.rows} "
          f"duplicates={report.duplicates} duplicate_rows={report.duplicate_rows} "
          f"inflight_at_kills={report.inflight_at_kills} problems={len(report.problems)} "
          f"seconds={time.monotonic() - started:.0f}")
    share = report.delivered_once / report.rows if report.rows else 0.0
    print(f"RATIO crash_exactly_once_share={share:.4f}x (goal: every row delivered, duplicates "
          f"only of rows in flight at a kill: {'met' if not report.problems else 'MISSED'}; "
          f"{report.duplicates} duplicates)")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
