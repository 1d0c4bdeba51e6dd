"""Real FreeSWITCH captures, and new calls derived from them.

A capture is every byte an inbound ESL client received during one real call on FreeSWITCH
1.10 (see tests/captures/README.md). The tests read them from ``tests/captures/``; the demo
reads the few it replays from the package (``fs_cc360/demo_data/*.esl.gz``).

``capture_frames(name)`` gives the raw ``text/event-plain`` bodies of a capture, in order.
``remap(frames, seed)`` turns one real call into another call of the same kind: every
UUID is replaced consistently and timestamps are shifted, so tests can check that the
rules generalise (different UUIDs, several calls interleaved on one connection).
"""

from __future__ import annotations

import gzip
import pathlib
import random
import re
import time
import uuid

from fs_cc360.events import FrameReader

#: The demo's captures, shipped in the package.
DEMO_DATA = pathlib.Path(__file__).resolve().parent.parent / "demo_data"

_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TIMESTAMP = re.compile(rb"\nEvent-Date-Timestamp: (\d+)")


def read_capture(path: pathlib.Path) -> bytes:
    """The bytes of a ``.esl`` capture (``.esl.gz`` too)."""
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def frames_of(data: bytes) -> list[bytes]:
    """The bodies of a capture's ``text/event-plain`` frames, in arrival order."""
    frames = FrameReader().feed(data)
    return [f.body for f in frames if f.content_type == "text/event-plain"]


def demo_scenarios() -> list[str]:
    return sorted(p.name.removesuffix(".esl.gz") for p in DEMO_DATA.glob("*.esl.gz"))


def demo_frames(name: str) -> list[bytes]:
    return frames_of(read_capture(DEMO_DATA / f"{name}.esl.gz"))


#: Every header that holds a time: the event's own, the caller profile's times (µs) and
#: the channel's ``*_uepoch`` (µs) / ``*_epoch`` (s) variables. Zero means "never".
_TIME_FIELD = re.compile(
    rb"^(Event-Date-Timestamp|(?:Caller|Other-Leg)-[A-Za-z-]+-Time|variable_\w+?_u?epoch)"
    rb": (\d+)$", re.M)


def shift_to_now(frames: list[bytes], now: float | None = None) -> list[bytes]:
    """Move every time of a capture (event timestamps, caller-profile times, the
    ``*_epoch`` / ``*_uepoch`` variables, as a later call would carry them) so that its
    first event is ``now``: a replayed call looks live (popups are not past their TTL)
    and its CDR files (:mod:`fs_cc360.simulators.switch`) agree with its events."""
    stamps = [int(m.group(1)) for body in frames for m in [_TIMESTAMP.search(b"\n" + body)] if m]
    if not stamps:
        return list(frames)
    offset = int((time.time() if now is None else now) * 1_000_000) - min(stamps)

    def sub(m: re.Match[bytes]) -> bytes:
        key, value = m.group(1), int(m.group(2))
        if value == 0:
            return m.group(0)
        if key.endswith(b"_epoch"):
            value += round(offset / 1_000_000)
        else:
            value += offset
        return key + b": %d" % value

    return [_TIME_FIELD.sub(sub, body) for body in frames]


def remap(frames: list[bytes], seed: int, *, keep_core: bool = True,
          replace: dict[bytes, bytes] | None = None) -> list[bytes]:
    """A copy of ``frames`` with fresh UUIDs (consistent across frames) and extra byte
    replacements (e.g. ``{b"79991234567": b"78120000001"}``).

    The FreeSWITCH ``Core-UUID`` is kept when ``keep_core`` so the copy looks like it
    came from the same switch. Content-Length headers inside bodies stay valid because
    a UUID keeps its length; replacements must keep lengths too.
    """
    rng = random.Random(seed)
    mapping: dict[bytes, bytes] = {}
    core = set()
    if keep_core:
        for body in frames:
            m = re.search(rb"\nCore-UUID: (\S+)", b"\n" + body)
            if m:
                core.add(m.group(1))

    def sub(m: re.Match[bytes]) -> bytes:
        old = m.group(0)
        if old in core:
            return old
        if old not in mapping:
            mapping[old] = str(uuid.UUID(int=rng.getrandbits(128), version=4)).encode()
        return mapping[old]

    out = []
    for body in frames:
        body = _UUID.sub(sub, body)
        for old, new in (replace or {}).items():
            if len(old) != len(new):
                raise ValueError("replacements must keep the length")
            body = body.replace(old, new)
        out.append(body)
    return out


def interleave(calls: list[list[bytes]], seed: int) -> list[bytes]:
    """Merge several calls' frame lists into one stream, each call's order kept."""
    rng = random.Random(seed)
    queues = [list(c) for c in calls if c]
    out: list[bytes] = []
    while queues:
        q = rng.choice(queues)
        out.append(q.pop(0))
        if not q:
            queues.remove(q)
    return out


def event_frame(body: bytes) -> bytes:
    """Wrap an event body as FreeSWITCH sends it on the wire."""
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n%s" % (len(body), body)
