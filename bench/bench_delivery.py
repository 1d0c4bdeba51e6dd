"""Delivery against a CRM that answers after 50 ms.

The fake CRM runs in a process of its own (``bench/crm_process.py``): a real CRM does not
share the connector's CPU.

A. The ``Deliverer`` (+ ``OutboxWriter`` + ``Cc360Client``, forms login) draining a
   pre-filled outbox (real CC360 events under fresh call ids; per-call order holds, so
   only the head of each call is claimable) to the fake CRM with ``latency=0.05``:
   deliveries/s vs the ideal ``concurrency / latency`` (goal >= 0.9x).
B. The whole service (``Service``: ESL -> tracker -> outbox -> Deliverer) fed by the fake
   FreeSWITCH at full speed: CC360 events accepted by the CRM per second, from the first
   ESL byte written to the last request received.
C. A naive connector doing the same job: an ``EslClient`` whose event handler feeds the
   tracker and then calls ``requests`` synchronously, once per CC360 event (one
   ``requests.Session``, logged in once, cookies and BPMCSRF like ours). Measured like B.

B / C is the speed-up over the naive design (goal >= 10x). Both are capped by
arithmetic: C at 1/latency = 20/s, B at concurrency/latency, so with the default 8 lanes
the ratio cannot exceed 8x; the bench runs concurrency 8 (the default) and 16.
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

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import requests  # noqa: E402

from bench.harness import (  # noqa: E402
    CRM_LOGIN,
    CRM_PASSWORD,
    CRM_TOKEN,
    ESL_PASSWORD,
    RemoteCrm,
    expected_events,
    machine,
    make_call,
    make_items,
    new_fs,
    report,
    wait_until,
    write_config,
)
from fs_cc360.calls import CallTracker  # noqa: E402
from fs_cc360.cc360 import Cc360Client  # noqa: E402
from fs_cc360.cli.common import setup_logging  # noqa: E402
from fs_cc360.config import load_settings  # noqa: E402
from fs_cc360.crm_request import request_for  # noqa: E402
from fs_cc360.delivery import Deliverer  # noqa: E402
from fs_cc360.esl import EslClient  # noqa: E402
from fs_cc360.events import ChannelEvent  # noqa: E402
from fs_cc360.outbox import Outbox, OutboxWriter  # noqa: E402
from fs_cc360.service import SUBSCRIBED_EVENTS, Service, tracker_config  # noqa: E402

LATENCY = 0.05


def deliver_backlog(tmp: Path, concurrency: int, seconds: float) -> float:
    """A: deliveries/s of the Deliverer over a pre-filled outbox."""
    rows = int(concurrency / LATENCY * seconds)
    db = tmp / f"backlog-{concurrency}.sqlite3"
    outbox = Outbox(str(db))
    outbox.enqueue(make_items(rows, seed=concurrency))
    outbox.close()
    crm = RemoteCrm(latency=LATENCY, keep=False)
    writer = OutboxWriter(str(db))
    client = Cc360Client(crm.url, CRM_TOKEN, auth="forms", login=CRM_LOGIN,
                         password=CRM_PASSWORD, timeout=5, lanes=concurrency)
    deliverer = Deliverer(writer, client, concurrency=concurrency, realtime_ttl=3600)
    stop = gevent.event.Event()
    try:
        started = time.perf_counter()
        runner = gevent.spawn(deliverer.run, stop)
        done = wait_until(lambda: deliverer.counts.delivered >= rows, timeout=seconds * 10 + 30,
                          interval=0.01)
        elapsed = time.perf_counter() - started
        stop.set()
        runner.join(10)
        assert done, f"delivered {deliverer.counts.delivered} of {rows}"
        assert crm.count() == rows, "the CRM must have accepted each row once"
    finally:
        writer.close()
        client.close()
        crm.stop()
    rate = rows / elapsed
    ideal = concurrency / LATENCY
    print(f"A. Deliverer, concurrency {concurrency}: {rows} rows in {elapsed:.2f} s = "
          f"{rate:.1f}/s, ideal {ideal:.0f}/s ({rate / ideal:.2f}x; includes the login)")
    return rate


def push_calls(calls: int, seed: int) -> tuple[list[bytes], int]:
    """Frames of ``calls`` remapped calls (timestamps now) and how many CC360 events the
    tracker makes of them."""
    made = [make_call(i, seed=seed) for i in range(calls)]
    config = tracker_config(load_settings(None, env={}, require_crm=False))
    expected = expected_events(made, config).total
    return [body for call in made for body in call.frames], expected


def service_end_to_end(tmp: Path, concurrency: int, calls: int) -> float:
    """B: the real Service, ESL in, CRM out; CC360 events accepted per second."""
    frames, expected = push_calls(calls, seed=100 + concurrency)
    crm = RemoteCrm(latency=LATENCY, keep=False)
    fs = new_fs()
    config = write_config(tmp / f"service-{concurrency}.ini", fs_port=fs.port, crm_url=crm.url,
                          database=tmp / f"service-{concurrency}.sqlite3", overrides={
                              "delivery": {"concurrency": concurrency,
                                           "realtime_ttl": 3600}})
    service = Service(load_settings(config, env={}))
    service.start()
    try:
        assert fs.wait_connected(10)
        started = time.perf_counter()
        fs.push_events(frames)
        done = crm.wait_for(expected, timeout=expected / (concurrency / LATENCY) * 5 + 30,
                            interval=0.01)
        elapsed = time.perf_counter() - started
        got = crm.count()
    finally:
        service.stop()
        fs.close()
        crm.stop()
    assert done and got == expected, f"the CRM accepted {got} of {expected}"
    rate = expected / elapsed
    print(f"B. Service end to end, concurrency {concurrency}: {calls} calls, {len(frames)} "
          f"ESL events -> {expected} CC360 events in {elapsed:.2f} s = {rate:.1f}/s")
    return rate


class NaiveConnector:
    """What a first attempt looks like: HTTP in the ESL event handler, one request per
    CC360 event, nothing stored, nothing retried, the ESL reader blocked meanwhile."""

    def __init__(self, fs_port: int, crm_url: str) -> None:
        self.base = crm_url
        self.session = requests.Session()
        self.tracker = CallTracker(tracker_config(load_settings(None, env={},
                                                                require_crm=False)))
        self.sent = 0
        self.errors = 0
        self.esl = EslClient("127.0.0.1", fs_port, ESL_PASSWORD, events=SUBSCRIBED_EVENTS,
                             on_event=self.on_event)

    def login(self) -> None:
        response = self.session.post(
            f"{self.base}/ServiceModel/AuthService.svc/Login",
            json={"UserName": CRM_LOGIN, "UserPassword": CRM_PASSWORD}, timeout=10)
        response.raise_for_status()
        self.session.headers["BPMCSRF"] = self.session.cookies["BPMCSRF"]

    def on_event(self, event: ChannelEvent) -> None:
        for crm_event in self.tracker.feed(event):
            request = request_for(crm_event)
            url = f"{self.base}/0/rest/OmniWhoCallsService/{CRM_TOKEN}/{request.endpoint}"
            response = self.session.request(request.method, url, params=request.params,
                                            json=request.body, timeout=10)
            if response.ok:
                self.sent += 1
            else:
                self.errors += 1


def naive_end_to_end(calls: int, limit: float) -> float:
    """C: the naive connector, measured like B (or over ``limit`` seconds at most)."""
    frames, expected = push_calls(calls, seed=999)
    crm = RemoteCrm(latency=LATENCY, keep=False)
    fs = new_fs()
    naive = NaiveConnector(fs.port, crm.url)
    naive.login()
    naive.esl.start()
    try:
        assert fs.wait_connected(10)
        started = time.perf_counter()
        pusher = gevent.spawn(fs.push_events, frames)  # blocks while the reader is busy
        crm.wait_for(expected, timeout=limit, interval=0.01)
        elapsed = time.perf_counter() - started
        got = crm.count()
    finally:
        naive.esl.stop()
        pusher.kill()
        fs.close()
        crm.stop()
    rate = got / elapsed
    print(f"C. naive connector (requests in the ESL handler): {got} of {expected} CC360 "
          f"events in {elapsed:.2f} s = {rate:.1f}/s (errors {naive.errors})")
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="ideal duration of each backlog drain (A)")
    parser.add_argument("--calls", type=int, default=250,
                        help="calls pushed through the service at concurrency 8 (B)")
    parser.add_argument("--naive-calls", type=int, default=40, help="calls for C")
    parser.add_argument("--naive-seconds", type=float, default=20.0,
                        help="stop measuring C after this long")
    args = parser.parse_args()
    setup_logging("ERROR")
    print(f"bench_delivery on {machine()}; fake CRM latency {LATENCY * 1000:.0f} ms")
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp_name:
        tmp = Path(tmp_name)
        a8 = deliver_backlog(tmp, 8, args.seconds)
        a16 = deliver_backlog(tmp, 16, args.seconds)
        b8 = service_end_to_end(tmp, 8, args.calls)
        b16 = service_end_to_end(tmp, 16, args.calls * 2)
        c = naive_end_to_end(args.naive_calls, args.naive_seconds)
    print(f"RESULT delivery deliverer_c8={a8:.1f}/s deliverer_c16={a16:.1f}/s "
          f"service_c8={b8:.1f}/s service_c16={b16:.1f}/s naive={c:.1f}/s")
    print(report("deliverer_vs_ideal_c16", a16 / (16 / LATENCY), "goal >= 0.9x"))
    print(report("service_vs_naive_c16", b16 / c, "goal >= 10x"))
    print(report("service_vs_naive_c8", b8 / c, "goal >= 10x",
                 "(default 8 lanes: at most 8x by arithmetic)"))
    print(report("deliverer_vs_ideal_c8", a8 / (8 / LATENCY), "goal >= 0.9x",
                 "(default concurrency 8)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
