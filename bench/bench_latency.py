"""Latency: ESL event written by the fake FreeSWITCH -> request received by the fake CRM.

Three processes, as in production: the real service (``fs-cc360 --config X run``, a
child process), the fake CRM (``bench/crm_process.py``, latency 0) and this one, where
the fake FreeSWITCH plays calls at ``--rate`` calls/s for ``--seconds`` seconds. Each call
is a real capture (round-robin over all nine) with fresh UUIDs, played with its own
timing (real time: calls last 0.5-10 s, so ~1,000 are in progress at 200 calls/s).

For each CC360 event the CRM accepts, the latency is the CRM's arrival time minus the time
the frame of the ESL event that produced it was written (which event produced which is
computed offline by the same tracker rules). Summaries released by the summary timer
rather than by an event are left out and counted. Last line: p99 vs the 20 ms goal.
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

from bench.harness import (  # noqa: E402
    CallPlayer,
    RemoteCrm,
    ServiceProcess,
    expected_events,
    machine,
    new_fs,
    percentile,
    write_config,
)
from fs_cc360.config import load_settings  # noqa: E402
from fs_cc360.service import tracker_config  # noqa: E402

GOAL_MS = 20.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="new calls per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long calls start")
    parser.add_argument("--concurrency", type=int, default=8, help="[delivery] concurrency")
    args = parser.parse_args()
    print(f"bench_latency on {machine()}: {args.rate:g} calls/s for {args.seconds:g} s, "
          f"delivery concurrency {args.concurrency}")
    calls = int(args.rate * args.seconds)
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp_name:
        tmp = Path(tmp_name)
        crm = RemoteCrm(latency=0.0)
        fs = new_fs()
        config = write_config(tmp / "service.ini", fs_port=fs.port, crm_url=crm.url,
                              database=tmp / "outbox.sqlite3", overrides={
                                  "delivery": {"concurrency": args.concurrency},
                                  "calls": {"summary_wait": 10}})
        service = ServiceProcess(config, tmp / "service.log").start()
        try:
            assert fs.wait_connected(20), "the service did not connect:\n" + service.log_text()
            cpu_before = service.cpu_seconds()
            player = CallPlayer(fs, rate=args.rate, calls=calls, seed=42).start()
            started = time.monotonic()
            assert player.join(args.seconds + 120), "the player did not finish"
            played = time.monotonic() - started
            cpu = service.cpu_seconds() - cpu_before
            expected = expected_events(player.calls, tracker_config(load_settings(config,
                                                                                env={})))
            drained = crm.wait_for(expected.total, timeout=120, interval=0.1)
            got = crm.events()
            memory = service.status_mb()
        finally:
            service.stop()
            fs.close()
            crm.stop()
        log_tail = service.log_text()[-2000:]
    latencies: dict[str, list[float]] = {"popup": [], "summary": []}
    timer_released = unknown = 0
    seen: set[tuple[str, str]] = set()
    duplicates = 0
    for call_id, kind, at in got:
        key = (call_id, kind)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        producer = expected.producer.get(key)
        if producer is None:
            unknown += 1
            continue
        call, frame = producer
        if frame is None:
            timer_released += 1
            continue
        pushed = player.pushed.get((call, frame))
        if pushed is None:
            unknown += 1
            continue
        latencies["summary" if kind == "summary" else "popup"].append((at - pushed) * 1000)
    everything = latencies["popup"] + latencies["summary"]
    esl_events = player.frames_pushed
    print(f"played {len(player.calls)} calls, {esl_events} ESL events in {played:.1f} s "
          f"({esl_events / played:.0f} events/s; pusher lag max {player.max_lag * 1000:.1f} "
          f"ms, frames lost {player.lost}); CC360 events expected {expected.total}, "
          f"accepted {len(got)} (duplicates {duplicates}, missing "
          f"{expected.total - len(seen & expected.keys())}, timer-released {timer_released}, "
          f"unmatched {unknown}); drained={drained}; service: {cpu / played:.0%} of a core "
          f"while the calls played, peak RSS {memory.get('VmHWM', 0):.0f} MB")
    for name, values in (("popups", latencies["popup"]), ("summaries", latencies["summary"]),
                         ("all", everything)):
        print(f"  {name:10} n={len(values):6d} p50={percentile(values, 50):7.2f} ms "
              f"p90={percentile(values, 90):7.2f} ms p99={percentile(values, 99):7.2f} ms "
              f"max={max(values, default=float('nan')):8.2f} ms")
    if not drained or not everything:
        print("service log tail:\n" + log_tail)
    p50, p99 = percentile(everything, 50), percentile(everything, 99)
    print(f"RESULT latency rate={args.rate:g}calls/s p50={p50:.2f}ms p99={p99:.2f}ms "
          f"max={max(everything, default=float('nan')):.2f}ms n={len(everything)}")
    print(f"RATIO latency_p99_goal_over_measured={GOAL_MS / p99:.2f}x (goal >= 1x: "
          f"p99 {p99:.2f} ms vs goal <= {GOAL_MS:g} ms; p50 {p50:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
