"""ESL parsing: our ``parse_event`` vs greenswitch's ``ESLEvent``, then the whole consume path.

1. Parse only, on the largest real verbose events of ``tests/captures`` (~12-13 KB) and on a
   16 KB event made from the largest one by adding realistic ``variable_*`` headers. Ours
   takes the frame body as bytes (it decodes what it needs); greenswitch is timed on a
   ``str`` it did not have to decode (its reader decodes before parsing: that cost is
   left out, which favours greenswitch; the bytes->str variant is printed too).
2. Parse + everything the tracker reads (``CallTracker.feed`` over every subscribed event
   of every capture, call by call) vs greenswitch parse-only of the same events.
3. The consume path of the real :class:`~fs_cc360.service.Service`: the fake FreeSWITCH
   writes remapped calls at full speed over a real socket -> ``EslClient`` -> tracker ->
   spool -> ``OutboxWriter`` commit (``synchronous=FULL``). The CRM is down with a long
   backoff, so delivery stays idle. events/s = ESL events / (first byte written -> last
   CC360 event committed).

Micro-benchmarks report the best of ``--repeat`` runs (the least disturbed by the other
tenants of this 2-core machine). The last line is the parse-only ratio (goal >= 10x).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import timeit  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from greenswitch.esl import ESLEvent  # noqa: E402

from bench.harness import (  # noqa: E402
    SCENARIOS,
    machine,
    make_call,
    new_crm,
    new_fs,
    report,
    subscribed_frames,
    wait_until,
    write_config,
)
from fs_cc360.calls import CallTracker  # noqa: E402
from fs_cc360.cli.common import setup_logging  # noqa: E402
from fs_cc360.config import load_settings  # noqa: E402
from fs_cc360.events import parse_event  # noqa: E402
from fs_cc360.service import Service, tracker_config  # noqa: E402
from fs_cc360.simulators.captures import event_frame  # noqa: E402
from fs_cc360.simulators.freeswitch import event_name, url_encode  # noqa: E402

TARGET = 16 * 1024

# Real FreeSWITCH channel variables a production dialplan adds to a verbose event
# (mod_callcenter, SIP custom headers, NAT/ACL, codec negotiation, CRM tags).
EXTRA_VARIABLES = [
    ("cc_queue", "support@default"),
    ("cc_queue_name", "support"),
    ("cc_member_uuid", "8c1b7ae0-4d6f-4bb3-9a7c-1f0e6f8d2a11"),
    ("cc_member_session_uuid", "2b8f0b84-55e7-4c1e-9d5d-0c3a7e9f4b21"),
    ("cc_agent", "101@default"),
    ("cc_agent_type", "callback"),
    ("cc_side", "agent"),
    ("cc_queue_joined_epoch", "1732745915"),
    ("cc_queue_answered_epoch", "1732745921"),
    ("cc_cause", "answered"),
    ("sip_h_X-Account-ID", "ACC-000129884"),
    ("sip_h_X-Tenant", "acme-ru-msk"),
    ("sip_h_X-Call-Reason", "inbound sales line, campaign Black Friday 2024"),
    ("sip_h_X-Correlation-ID", "0f4a1c9e-b2d3-4e5f-8a7b-6c5d4e3f2a1b"),
    ("sip_P-Asserted-Identity", '"Ivan Petrov" <sip:+79991234567@carrier.example.net>'),
    ("sip_Privacy", "none"),
    ("sip_via_protocol", "udp"),
    ("sip_authorized", "true"),
    ("sip_acl_authed_by", "domains"),
    ("sip_nat_detected", "true"),
    ("sip_invite_record_route", "<sip:10.0.0.1;lr;ftag=as5a1b2c3d>"),
    ("sip_invite_contact_params", "transport=udp;registering_acc=pbx_example_com"),
    ("sip_invite_failure_status", ""),
    ("rtp_local_sdp_str", "v=0\no=FreeSWITCH 1732730000 1732730001 IN IP4 10.0.0.5\n"
     "s=FreeSWITCH\nc=IN IP4 10.0.0.5\nt=0 0\nm=audio 24580 RTP/AVP 8 0 101\n"
     "a=rtpmap:8 PCMA/8000\na=rtpmap:0 PCMU/8000\na=rtpmap:101 telephone-event/8000\n"
     "a=fmtp:101 0-16\na=ptime:20\na=sendrecv\n"),
    ("cc360_client", "79991234567"),
    ("crm_contact_id", "c5e1b2a4-9f3d-4a7e-8b6c-2d1f0e9a8b7c"),
    ("crm_account_name", "ООО Ромашка / Romashka LLC"),
    ("hangup_complete_with_xml", "false"),
    ("execute_on_answer", "record_session $${recordings_dir}/${uuid}.wav"),
    ("api_hangup_hook", "lua cdr_push.lua ${uuid}"),
]


def largest_events(count: int) -> list[tuple[str, bytes]]:
    """The ``count`` largest subscribed events over every capture, with their names."""
    events = [(f"{scenario}:{event_name(body)}", body)
              for scenario in SCENARIOS for body in subscribed_frames(scenario)]
    events.sort(key=lambda item: len(item[1]), reverse=True)
    return events[:count]


def synthesize_16k(body: bytes) -> bytes:
    """``body`` grown to 16 KB by inserting extra variables in the middle of its variable
    block (where FreeSWITCH puts them), URL-encoded like FreeSWITCH does."""
    marker = b"\nvariable_DP_MATCH: "
    at = body.find(marker)
    if at < 0:
        at = body.find(b"\nvariable_")
    extra = bytearray()
    round_no = 0
    while len(body) + len(extra) < TARGET:
        for name, value in EXTRA_VARIABLES:
            suffix = f"_{round_no}" if round_no else ""
            line = f"\nvariable_{name}{suffix}: {url_encode(value)}".encode()
            if len(body) + len(extra) + len(line) > TARGET:
                break
            extra += line
        else:
            round_no += 1
            continue
        break
    out = body[:at] + bytes(extra) + body[at:]
    event = parse_event(out)  # still a valid event, same identity
    assert event.uuid and event.name == parse_event(body).name
    return out


def best(fn: object, number: int, repeat: int) -> float:
    """Seconds per call: the best of ``repeat`` runs of ``number`` calls."""
    gc.collect()
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number  # type: ignore[arg-type]


def bench_parse_only(repeat: int, number: int) -> float:
    events = largest_events(10)
    events.append(("synthetic 16 KB (largest + variable_*)", synthesize_16k(events[0][1])))
    print(f"1. parse only: {len(events)} events, best of {repeat} x {number} parses each")
    print(f"   {'event':58} {'bytes':>6} {'ours us':>8} {'gs(str) us':>10} "
          f"{'gs(bytes) us':>12} {'ratio':>6}")
    ours_total = gs_total = gs_bytes_total = 0.0
    for label, body in events:
        text = body.decode("utf-8")
        ours = best(lambda body=body: parse_event(body), number, repeat)
        gs = best(lambda text=text: ESLEvent(text), number, repeat)
        gs_bytes = best(lambda body=body: ESLEvent(body.decode("utf-8")), number, repeat)
        ours_total += ours
        gs_total += gs
        gs_bytes_total += gs_bytes
        print(f"   {label[:58]:58} {len(body):6d} {ours * 1e6:8.1f} {gs * 1e6:10.1f} "
              f"{gs_bytes * 1e6:12.1f} {gs / ours:5.1f}x")
    sizes = [len(body) for _, body in events]
    print(f"   sizes: {min(sizes)}..{max(sizes)} bytes; totals: ours {ours_total * 1e6:.1f} us, "
          f"greenswitch {gs_total * 1e6:.1f} us (str) / {gs_bytes_total * 1e6:.1f} us (bytes)")
    ratio = gs_total / ours_total
    print(f"RESULT parse_only ours={ours_total / len(events) * 1e6:.1f}us/event "
          f"greenswitch={gs_total / len(events) * 1e6:.1f}us/event ratio={ratio:.1f}x "
          f"(with greenswitch's decode: {gs_bytes_total / ours_total:.1f}x)")
    return ratio


def bench_with_tracker(repeat: int, number: int) -> float:
    calls = [list(subscribed_frames(s)) for s in SCENARIOS]
    bodies = [body for frames in calls for body in frames]
    texts = [body.decode("utf-8") for body in bodies]
    config = tracker_config(load_settings(None, env={}, require_crm=False))

    def ours() -> None:
        for frames in calls:
            tracker = CallTracker(config)
            last = 0.0
            for body in frames:
                event = parse_event(body)
                tracker.feed(event)
                last = float(event.get("Event-Date-Timestamp") or 0) / 1e6
            tracker.tick(last + 3600)

    def greenswitch() -> None:
        for text in texts:
            ESLEvent(text)

    ours_s = best(ours, number, repeat)
    gs_s = best(greenswitch, number, repeat)
    ratio = gs_s / ours_s
    print(f"\n2. parse + tracker.feed (every lookup the rules make) over {len(bodies)} events "
          f"of {len(calls)} real calls (avg {sum(map(len, bodies)) // len(bodies)} bytes)")
    print(f"RESULT parse_plus_tracker ours={ours_s / len(bodies) * 1e6:.1f}us/event "
          f"greenswitch_parse_only={gs_s / len(bodies) * 1e6:.1f}us/event ratio={ratio:.1f}x")
    return ratio


def bench_consume(calls: int) -> float:
    setup_logging("ERROR")  # the refused CRM login is expected here
    with tempfile.TemporaryDirectory(prefix="bench-parse-") as tmp_name:
        tmp = Path(tmp_name)
        crm = new_crm()
        crm.set_down(True)  # delivery idle: one refused probe, then a 300 s backoff
        fs = new_fs()
        config = write_config(tmp / "bench.ini", fs_port=fs.port, crm_url=crm.url,
                              database=tmp / "outbox.sqlite3", overrides={
                                  "delivery": {"backoff_initial": 300, "backoff_max": 300}})
        service = Service(load_settings(config, env={}))
        service.start()
        try:
            assert fs.wait_connected(10), "the service did not connect"
            built = time.monotonic()
            frames = [body for i in range(calls) for body in make_call(i, seed=7).frames]
            stream = b"".join(event_frame(body) for body in frames)
            print(f"\n3. consume path: {calls} calls, {len(frames)} ESL events, "
                  f"{len(stream) / 1e6:.1f} MB on the wire (built in "
                  f"{time.monotonic() - built:.1f} s)")
            gc.collect()
            before = service.esl.events_read
            started = time.perf_counter()
            fs.push_raw(stream, chunk=1 << 20)
            done = wait_until(lambda: service.esl.events_read - before >= len(frames)
                              and service.spooled == 0, timeout=300, interval=0.002)
            elapsed = time.perf_counter() - started
            assert done, "the service did not consume everything in 300 s"
            rows = service.outbox.stats().total
        finally:
            service.stop()
            fs.close()
            crm.stop()
    rate = len(frames) / elapsed
    print(f"RESULT consume_path events={len(frames)} seconds={elapsed:.2f} "
          f"events_per_s={rate:.0f} cc360_rows_committed={rows} "
          f"rows_per_s={rows / elapsed:.0f} (committed by the service's spool -> "
          f"OutboxWriter.enqueue batches)")
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per micro-benchmark")
    parser.add_argument("--number", type=int, default=300, help="parses per run")
    parser.add_argument("--calls", type=int, default=2500,
                        help="calls pushed through the consume path")
    args = parser.parse_args()
    print(f"bench_parse on {machine()}")
    ratio = bench_parse_only(args.repeat, args.number)
    tracker_ratio = bench_with_tracker(args.repeat, max(1, args.number // 30))
    bench_consume(args.calls)
    print(report("parse_plus_tracker_vs_greenswitch_parse", tracker_ratio,
                 "no goal: ours also runs every tracker rule and lookup, greenswitch only parses"))
    print(report("parse_vs_greenswitch", ratio, "goal >= 10x",
                 "(largest real events + a 16 KB one; greenswitch not charged its decode)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
