"""Backlog: N pending CC360 events (default 1,000,000) drained after a simulated CRM outage.

1. Build: ``--rows`` rows through the Outbox API (``Outbox.enqueue`` in transactions of
   10,000 rows: the real head-of-call bookkeeping, every index), from real CC360 events
   under fresh call ids (~3.6 rows per call), ``event_at`` = build time.
2. Outage: the real ``Service`` (in this process; the fake FreeSWITCH connected but quiet)
   starts with the fake CRM down (connections refused) for ``--outage`` seconds: the
   circuit opens and only probes go out.
3. Drain: the CRM (a separate process, latency 0) comes back; the service delivers until
   the outbox is empty or ``--drain-seconds`` pass. Every row is a real HTTP request
   (``realtime_ttl`` is raised so no popup expires: the worst case for the drain rate).

Reports the build rate, the drain rate (overall and per sampling window, to show it does
not degrade), and this process's RSS: sampled during the drain (``VmRSS``) and its peak
(``VmHWM``, which also covers the build). Last line: peak RSS vs the 150 MB goal.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import itertools  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gevent  # noqa: E402

from bench.harness import (  # noqa: E402
    RemoteCrm,
    iter_items,
    machine,
    new_fs,
    proc_status_mb,
    write_config,
)
from fs_cc360.cli.common import setup_logging  # noqa: E402
from fs_cc360.config import load_settings  # noqa: E402
from fs_cc360.outbox import Outbox, OutboxStatus  # noqa: E402
from fs_cc360.service import Service  # noqa: E402

GOAL_MB = 150.0
BUILD_BATCH = 10_000


def build(path: Path, rows: int) -> float:
    outbox = Outbox(str(path))
    started = time.perf_counter()
    items = iter_items(rows, seed=5)
    done = 0
    try:
        while True:
            batch = list(itertools.islice(items, BUILD_BATCH))
            if not batch:
                break
            outbox.enqueue(batch)
            done += len(batch)
            if done % 200_000 == 0:
                print(f"  built {done} rows ({time.perf_counter() - started:.0f} s)", flush=True)
        pending = outbox.stats().count(OutboxStatus.pending)
    finally:
        outbox.close()
    elapsed = time.perf_counter() - started
    assert pending == rows, f"{pending} pending rows, expected {rows}"
    print(f"built {rows} pending rows in {elapsed:.1f} s ({rows / elapsed:.0f} rows/s) via "
          f"Outbox.enqueue, {BUILD_BATCH} rows per transaction; file "
          f"{path.stat().st_size / 1e6:.0f} MB (+ WAL)")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="pending rows to drain")
    parser.add_argument("--outage", type=float, default=3.0, help="seconds the CRM is down")
    parser.add_argument("--drain-seconds", type=float, default=240.0,
                        help="stop draining after this long (the rest is extrapolated)")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--concurrency", type=int, default=8, help="[delivery] concurrency")
    args = parser.parse_args()
    setup_logging("ERROR")
    print(f"bench_backlog on {machine()}: {args.rows} rows, outage {args.outage:g} s, "
          f"drain up to {args.drain_seconds:g} s, concurrency {args.concurrency}")
    with tempfile.TemporaryDirectory(prefix="bench-backlog-") as tmp_name:
        tmp = Path(tmp_name)
        db = tmp / "outbox.sqlite3"
        build(db, args.rows)
        gc.collect()
        after_build = proc_status_mb()
        crm = RemoteCrm(latency=0.0, keep=False)
        crm.set_down(True)
        fs = new_fs()
        config = write_config(tmp / "service.ini", fs_port=fs.port, crm_url=crm.url,
                              database=db, overrides={"delivery": {
                                  "concurrency": args.concurrency, "realtime_ttl": 10**8,
                                  "backoff_initial": 0.2, "backoff_max": 2}})
        service = Service(load_settings(config, env={}))
        service.start()
        samples: list[tuple[float, int, float]] = []
        try:
            assert fs.wait_connected(10)
            gevent.sleep(args.outage)
            probes = service.deliverer.counts.retried
            delivered_in_outage = crm.count()
            print(f"outage: {args.outage:g} s with the CRM down: {probes} attempts "
                  f"(one probe at a time), {delivered_in_outage} delivered")
            crm.set_down(False)
            started = time.perf_counter()
            counts = service.deliverer.counts
            while True:
                gevent.sleep(args.sample)
                elapsed = time.perf_counter() - started
                rss = proc_status_mb()["VmRSS"]
                samples.append((elapsed, counts.delivered, rss))
                rate = (samples[-1][1] - (samples[-2][1] if len(samples) > 1 else 0)) / (
                    elapsed - (samples[-2][0] if len(samples) > 1 else 0))
                print(f"  t={elapsed:6.1f} s delivered={counts.delivered:8d} "
                      f"window={rate:6.0f}/s RSS={rss:6.1f} MB", flush=True)
                if counts.delivered >= args.rows or elapsed >= args.drain_seconds:
                    break
            drain_s = time.perf_counter() - started
            delivered = counts.delivered
            accepted = crm.count()
        finally:
            service.stop()
            fs.close()
            crm.stop()
    final = proc_status_mb()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rate = delivered / drain_s
    rss_values = [rss for _, _, rss in samples]
    windows = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(samples, samples[1:], strict=False)]
    left = args.rows - delivered
    print(f"drained {delivered} of {args.rows} rows in {drain_s:.1f} s = {rate:.0f}/s "
          f"(CRM accepted {accepted}); "
          + ("all delivered" if not left else
             f"{left} left: the whole backlog would take ~{args.rows / rate / 60:.0f} min"))
    if windows:
        print(f"drain rate per {args.sample:g} s window: first {windows[0]:.0f}/s, last "
              f"{windows[-1]:.0f}/s, min {min(windows):.0f}/s, max {max(windows):.0f}/s")
    print(f"RSS: after build {after_build.get('VmRSS', 0):.1f} MB; during the drain "
          f"{min(rss_values):.1f}..{max(rss_values):.1f} MB (first sample {rss_values[0]:.1f}, "
          f"last {rss_values[-1]:.1f}); peak VmHWM {final.get('VmHWM', 0):.1f} MB "
          f"(getrusage maxrss {maxrss:.1f} MB)")
    drift = rss_values[-1] - rss_values[0]
    print(f"RESULT backlog rows={args.rows} delivered={delivered} drain_rate={rate:.0f}/s "
          f"peak_rss={final.get('VmHWM', 0):.1f}MB rss_drift={drift:+.1f}MB")
    peak = final.get("VmHWM", maxrss)
    print(f"RATIO backlog_rss_goal_over_peak={GOAL_MB / peak:.2f}x (goal >= 1x: peak RSS "
          f"{peak:.1f} MB vs < {GOAL_MB:g} MB; drain {rate:.0f}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
