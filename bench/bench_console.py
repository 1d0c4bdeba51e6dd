"""Operator console on a big outbox: each query and each page, on 1,000 and 1,000,000 rows.

1. Build: ``--rows`` rows through the Outbox API only (``Outbox.enqueue`` 10,000 rows per
   transaction, then ``Outbox.mark_many``): real CC360 requests of the captures under
   fresh call ids, created over the last 24 hours; each call gets a caller number from a
   pool of 50,000 and an agent from 200, and 5% of calls are ``anonymous`` (the worst
   number to search: tens of thousands of calls). Outcomes: the newest 2% stay pending
   (a CRM outage); of the others 2% dead, 2% expired, the rest delivered, their
   outcomes spread evenly over the day (so the last hour's chart reads ~2% of them).
   Every outcome is in the delivery history (``outbox_attempt``), as in production.
2. Measure, ``--repeat`` times each, on a warm cache: every console query through
   :class:`~fs_cc360.outbox.Outbox`, the same through an
   :class:`~fs_cc360.outbox.OutboxReader` (the thread the service uses), and each page
   of the real :class:`~fs_cc360.console.Console` WSGI app end to end (query + HTML).
3. The same on a ``--small`` outbox built the same way.

Prints the median and worst time of each, the query plans, how the slowest pages grow
from the small outbox to the big one (flat = indexed), and last the goal over the slowest
page: every page under 250 ms on a million rows.
The build goes through the real write path, so its rate is also the enqueue cost of the
console's indexes (compare bench_backlog's build line, measured before them).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import iter_items, machine  # noqa: E402
from fs_cc360.console import Console, ServiceState  # noqa: E402
from fs_cc360.crm_request import CrmRequest  # noqa: E402
from fs_cc360.outbox import Mark, NewItem, Outbox, OutboxReader, OutboxStatus  # noqa: E402

BATCH = 10_000
DAY = 86_400.0
ADMIN = "bench-admin-token-0123456789"
#: A console page should answer within this (ms) on the big outbox.
GOAL_MS = 250.0


def build(path: Path, rows: int, now: float, seed: int = 7) -> dict[str, Any]:
    """The outbox described in the module docstring; returns a few keys to search for."""
    rng = random.Random(seed)
    box = Outbox(str(path), synchronous="NORMAL")
    numbers = [f"7{rng.randrange(10**10):010d}" for _ in range(50_000)]
    agents = [str(100 + n) for n in range(200)]
    started = time.perf_counter()
    who: dict[str, tuple[str, str]] = {}
    sample: dict[str, Any] = {"number": numbers[0], "agent": agents[3]}

    def person(key: str) -> tuple[str, str]:
        if key not in who:
            caller = "anonymous" if rng.random() < 0.05 else rng.choice(numbers)
            who[key] = (caller, rng.choice(agents))
            if len(who) > 64:  # calls are consecutive: keep the dict small
                who.pop(next(iter(who)))
        return who[key]

    items = iter_items(rows, seed=seed)
    done = 0
    pending_from = int(rows * 0.98)
    while True:
        batch: list[NewItem] = []
        for item in itertools.islice(items, BATCH):
            caller, agent = person(item.call_key)
            if item.call_key == "":
                continue
            batch.append(dataclasses.replace(item, callerid=caller, user=agent))
        if not batch:
            break
        at = now - DAY + DAY * done / rows
        ids = box.enqueue(batch, now=at)
        marks = []
        for offset, (row_id, item) in enumerate(zip(ids, batch, strict=True)):
            index = done + offset
            if index >= pending_from:
                continue
            at = now - DAY + DAY * index / rows  # outcomes spread evenly over the day
            roll = rng.random()
            if roll < 0.02:
                marks.append(Mark.dead(row_id, "CC360 rejected GET https://crm/***/"
                                       "RingingEventHandler: HTTP 404", 404, rejected=True,
                                       now=at + 1))
            elif roll < 0.04 and item.kind != "summary":
                marks.append(Mark.expired(row_id, now=at + 130))
            else:
                marks.append(Mark.delivered(row_id, 200, now=at + 0.1))
        box.mark_many(marks)
        done += len(batch)
        middle = batch[len(batch) // 2]
        sample["call"] = middle.call_key
        if middle.callerid != "anonymous":
            sample["number"] = middle.callerid  # a real caller: a few calls in the outbox
        if done % 200_000 == 0:
            print(f"  built {done} rows ({time.perf_counter() - started:.0f} s)", flush=True)
    elapsed = time.perf_counter() - started
    stats = box.stats()
    box.close()
    print(f"built {rows} rows in {elapsed:.1f} s ({rows / elapsed:.0f} rows/s: enqueue + "
          f"mark_many with the history, every index); "
          f"{', '.join(f'{s.value} {n}' for s, n in stats.counts.items())}; file "
          f"{path.stat().st_size / 1e6:.0f} MB")
    return sample


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    fn()  # warm up (page cache, statement cache)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times)


def console_for(reader: OutboxReader, now: float) -> tuple[Console, str]:
    state = ServiceState(True, now - 3600, True, None, None, None, 0.2, False, True, 0)
    console = Console(admin_token=ADMIN, reader=reader, requeue=lambda ids: [],
                      state=lambda: state,
                      request_url=lambda r: f"https://crm/***/{CrmRequest.__name__}",
                      clock=lambda: now)
    return console, console.sessions.new()


def page(console: Console, cookie: str, path: str, query: str = "") -> Callable[[], bytes]:
    def get() -> bytes:
        status: list[str] = []
        environ = {"REQUEST_METHOD": "GET", "RAW_URI": path, "QUERY_STRING": query,
                   "HTTP_COOKIE": f"fs_cc360_console={cookie}", "wsgi.input": None}
        body = b"".join(console(environ, lambda s, h: status.append(s)))
        assert status[0].startswith("200"), (path, status)
        return body
    return get


def measure(path: Path, sample: dict[str, Any], now: float, repeat: int,
            label: str) -> dict[str, float]:
    box = Outbox(str(path), synchronous="NORMAL")
    reader = OutboxReader(str(path))
    console, cookie = console_for(reader, now)
    agent_page = box.search_calls(users=[sample["agent"]], limit=50)
    cases: dict[str, Callable[[], Any]] = {
        "stats()": box.stats,
        "final_counts_since(24h)": lambda: box.final_counts_since(now - DAY),
        "delivered_per_minute(1h)": lambda: box.delivered_per_minute(now - 3540, now),
        "search number (few calls)": lambda: box.search_calls(callerids=[sample["number"]]),
        "search 'anonymous' (5% of calls)": lambda: box.search_calls(callerids=["anonymous"]),
        "search agent, page 1": lambda: box.search_calls(users=[sample["agent"]]),
        "search agent, page 2": lambda: box.search_calls(users=[sample["agent"]],
                                                         before_id=agent_page.next_before),
        "search call id": lambda: box.search_calls(call_keys=[sample["call"]]),
        "search all fields, no match": lambda: box.search_calls(
            callerids=["70000000000"], users=["70000000000"], call_keys=["70000000000"]),
        "call_history": lambda: box.call_history(sample["call"]),
        "dead rows page": lambda: box.list_page(status=OutboxStatus.dead, limit=51),
        "reader: search agent (thread hop)": lambda: reader.run(
            lambda outbox: outbox.search_calls(users=[sample["agent"]])),
        "PAGE overview": page(console, cookie, "/ui/"),
        "PAGE overview refresh (fragment)": page(console, cookie, "/ui/", "fragment=live"),
        "PAGE calls: search number": page(console, cookie, "/ui/calls",
                                          f"q={sample['number']}&by=number"),
        "PAGE calls: search agent": page(console, cookie, "/ui/calls",
                                         f"q={sample['agent']}&by=agent"),
        "PAGE call timeline": page(console, cookie, f"/ui/calls/{sample['call']}"),
        "PAGE dead rows": page(console, cookie, "/ui/dead"),
    }
    results = {}
    print(f"\n{label}: median / worst of {repeat} (ms)")
    for name, fn in cases.items():
        median, worst = timed(fn, repeat)
        results[name] = median
        print(f"RESULT {label} {name:<38} {median:8.2f} / {worst:8.2f}")
    plans = box.explain_console()
    reader.close()
    box.close()
    if label == "big":
        print("\nquery plans:")
        for name, lines in plans.items():
            print(f"  {name}: {' | '.join(lines)}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--db", type=Path, help="keep the big outbox here (reused if present, "
                        "with its sample keys in DB.keys)")
    args = parser.parse_args()
    print(f"bench_console on {machine()}: {args.rows} rows (and {args.small}), "
          f"{args.repeat} runs each")
    now = time.time()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        small_sample = build(tmp / "small.sqlite3", args.small, now)
        small = measure(tmp / "small.sqlite3", small_sample, now, args.repeat, "small")
        big_path = args.db or tmp / "big.sqlite3"
        keys = big_path.with_suffix(".keys")
        if args.db and big_path.exists() and keys.exists():
            import json

            big_sample = json.loads(keys.read_text())
            print(f"reusing {big_path}")
        else:
            big_sample = build(big_path, args.rows, now)
            if args.db:
                import json

                keys.write_text(json.dumps(big_sample))
        big = measure(big_path, big_sample, now, args.repeat, "big")
    pages = [name for name in big if name.startswith("PAGE")]
    slowest = max(pages, key=lambda name: big[name])
    print(f"\nslowest page on {args.rows} rows: {slowest} {big[slowest]:.1f} ms "
          f"({small[slowest]:.1f} ms on {args.small} rows)")
    worst_query = max((n for n in big if not n.startswith("PAGE")), key=lambda n: big[n])
    print(f"slowest query: {worst_query} {big[worst_query]:.1f} ms")
    others = max((n for n in pages if "overview" not in n), key=lambda n: big[n])
    print(f"RESULT console growth {args.small}->{args.rows} rows: {slowest} "
          f"{big[slowest] / small[slowest]:.1f}x (counts every row, as outbox stats does); "
          f"slowest other page {others} {big[others] / small[others]:.1f}x "
          f"({small[others]:.1f} -> {big[others]:.1f} ms)")
    print(f"RATIO console_page_goal_over_slowest={GOAL_MS / big[slowest]:.2f}x (goal >= 1x: "
          f"every page under {GOAL_MS:.0f} ms on {args.rows} rows; slowest {slowest} "
          f"{big[slowest]:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
