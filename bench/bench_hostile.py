"""Hostile ESL input: ``--frames`` mutated frames (default 100,000) through the real Service.

In rounds of ``--per-round`` hostile pieces: each round takes 30 fresh real calls (the
good frames) and mutates frames of other calls (``mutated_frames``: bad or huge
Content-Length, truncated bodies, bad percent-encoding, non-UTF-8 bytes, missing headers,
70-200 KB values, garbage lines, blank lines), spreads the junk between the good frames
(``hostile_stream``) and writes the stream to the service's ESL socket in pieces of random
size (1 byte .. 1 MB). After each round every CC360 event of the round's good calls must
be in the outbox, in order; the connection must still be the first one (never dropped).

Last line: the share of the good calls' CC360 events that reached the outbox (goal 1).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (  # noqa: E402
    RemoteCrm,
    expected_events,
    machine,
    make_call,
    new_fs,
    proc_status_mb,
    wait_until,
    write_config,
)
from fs_cc360.cli.common import setup_logging  # noqa: E402
from fs_cc360.config import load_settings  # noqa: E402
from fs_cc360.service import Service, tracker_config  # noqa: E402
from fs_cc360.simulators.freeswitch import hostile_stream, mutated_frames  # noqa: E402

GOOD_CALLS = 30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=100_000, help="hostile pieces in all")
    parser.add_argument("--per-round", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    setup_logging("ERROR")  # the skipped frames are logged as warnings (rate-limited)
    print(f"bench_hostile on {machine()}: {args.frames} hostile pieces, "
          f"{args.per_round} per round, {GOOD_CALLS} good calls per round")
    rounds = max(1, args.frames // args.per_round)
    expected_total = found_total = hostile_total = good_frames = 0
    hostile_bytes = 0
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp_name:
        tmp = Path(tmp_name)
        crm = RemoteCrm(keep=False)
        fs = new_fs()
        config = write_config(tmp / "service.ini", fs_port=fs.port, crm_url=crm.url,
                              database=tmp / "outbox.sqlite3")
        service = Service(load_settings(config, env={}))
        tracker = tracker_config(service.settings)
        service.start()
        started = time.monotonic()
        try:
            assert fs.wait_connected(10)
            for n in range(rounds):
                rng = random.Random(args.seed * 1000 + n)
                calls = [make_call(i, seed=args.seed * 1000 + n) for i in
                         range(n * GOOD_CALLS, (n + 1) * GOOD_CALLS)]
                donors = [b for i in range(9) for b in
                          make_call(10**6 + n * 9 + i, seed=args.seed).frames]
                hostile = mutated_frames(donors, args.per_round, seed=rng.randrange(10**9))
                good = [body for call in calls for body in call.frames]
                stream = hostile_stream(good, hostile, seed=rng.randrange(10**9))
                pos = 0
                while pos < len(stream):
                    size = rng.choice((1, 7, 100, 4096, 65536, 1 << 20))
                    fs.push_raw(stream[pos:pos + size])
                    pos += size
                expected = expected_events(calls, tracker)
                keys = sorted(expected.keys())

                def missing(keys: list[tuple[str, str]] = keys) -> list[tuple[str, str]]:
                    return [k for k in keys if not service.outbox.has_request(*k)]
                wait_until(lambda: not missing(), timeout=60, interval=0.2)
                lost = missing()
                for call_id, kinds in expected.by_call.items():
                    rows = sorted(service.outbox.list_rows(call_key=call_id, limit=None),
                                  key=lambda row: row.id)
                    if [row.kind for row in rows] != kinds:
                        problems.append(f"round {n}: {call_id} has "
                                        f"{[row.kind for row in rows]}, expected {kinds}")
                expected_total += expected.total
                found_total += expected.total - len(lost)
                hostile_total += len(hostile)
                hostile_bytes += sum(map(len, hostile))
                good_frames += len(good)
                esl = service.esl
                print(f"  round {n + 1:2d}/{rounds}: {len(stream) / 1e6:6.1f} MB, skipped "
                      f"{esl.frames_skipped:7d}, events read {esl.events_read:7d}, good CC360 "
                      f"events in the outbox {expected.total - len(lost)}/{expected.total}, "
                      f"reconnects {esl.reconnects}, RSS {proc_status_mb()['VmRSS']:.0f} MB",
                      flush=True)
            elapsed = time.monotonic() - started
            esl = service.esl
            connected = esl.connected
        finally:
            service.stop()
            fs.close()
            crm.stop()
    if esl.reconnects or not connected:
        problems.append(f"the ESL connection dropped ({esl.reconnects} reconnects)")
    if esl.callback_errors:
        problems.append(f"{esl.callback_errors} callback errors")
    share = found_total / expected_total if expected_total else 0.0
    print(f"{hostile_total} hostile pieces ({hostile_bytes / 1e6:.0f} MB) among {good_frames} "
          f"good frames in {elapsed:.0f} s: {esl.frames_skipped} frames skipped, "
          f"{esl.events_read} events read, {esl.reconnects} reconnects, "
          f"{esl.callback_errors} callback errors, peak RSS "
          f"{proc_status_mb()['VmHWM']:.0f} MB; good CC360 events in the outbox "
          f"{found_total}/{expected_total}")
    for problem in problems[:20]:
        print("PROBLEM " + problem)
    print(f"RESULT hostile pieces={hostile_total} skipped={esl.frames_skipped} "
          f"good_events={found_total}/{expected_total} reconnects={esl.reconnects} "
          f"problems={len(problems)} seconds={elapsed:.0f}")
    print(f"RATIO hostile_good_events_kept={share:.4f}x (goal = 1x, no crash, no hang, no "
          f"reconnect: {'met' if share == 1 and not problems else 'MISSED'})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
