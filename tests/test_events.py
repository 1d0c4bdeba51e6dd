"""The ESL frame reader and event parser, on the real captures and on hostile bytes."""

from __future__ import annotations

import collections
import io
import random
import re
from urllib.parse import unquote

import pytest
from greenswitch.esl import ESLEvent, InboundESL

from fs_cc360.errors import FrameError
from fs_cc360.events import Frame, FrameReader, parse_event
from tests.fakes.captures import SCENARIOS, capture_bytes, capture_frames, event_frame

BGJOB_UUID = "792032a3-ce01-4f01-8d28-8022a1629fda"


def _collecting_reader(**kwargs: int) -> tuple[FrameReader, list[FrameError]]:
    errors: list[FrameError] = []
    return FrameReader(on_error=errors.append, **kwargs), errors


def _independent_counts(data: bytes) -> collections.Counter[str]:
    """Content types counted by regex: no event body carries a ``Content-Type`` line, so
    every such line is an envelope's."""
    return collections.Counter(
        m.decode() for m in re.findall(rb"(?:^|\n)Content-Type: ([a-z/-]+)\n", data)
    )


def _reference_headers(head: str) -> dict[str, str]:
    out = {}
    for line in head.split("\n"):
        if line:
            key, value = line.split(": ", 1)
            out[key] = unquote(value)
    return out


@pytest.mark.parametrize("name", SCENARIOS)
def test_frame_counts_match_an_independent_count(name: str) -> None:
    data = capture_bytes(name)
    reader, errors = _collecting_reader()
    frames = reader.feed(data)
    assert errors == []
    assert reader.buffered == 0
    counts = collections.Counter(f.content_type for f in frames)
    assert counts == _independent_counts(data)
    assert counts["auth/request"] == 1
    assert counts["text/disconnect-notice"] == 1
    events = [parse_event(f.body) for f in frames if f.content_type == "text/event-plain"]
    names = re.findall(rb"\nEvent-Name: ([A-Z_]+)\n", b"\n" + data)
    assert [e.name for e in events] == [n.decode() for n in names]
    for event in events:
        assert event.name.isupper()
        if event.name != "BACKGROUND_JOB":
            assert re.fullmatch(r"[0-9a-f-]{36}", event.uuid)


@pytest.mark.parametrize("name", SCENARIOS)
def test_headers_decode_like_a_reference_decoder(name: str) -> None:
    for body in capture_frames(name):
        event = parse_event(body)
        head = body.decode().split("\n\n", 1)[0]
        reference = _reference_headers(head)
        assert event.headers() == reference
        for key in ("Event-Name", "Unique-ID", "Channel-Name", "Caller-Caller-ID-Name",
                    "variable_sip_from_uri", "Event-Date-GMT"):
            assert event.get(key) == reference.get(key)


@pytest.mark.parametrize("name", SCENARIOS)
def test_random_chunks_give_identical_frames(name: str) -> None:
    data = capture_bytes(name)
    whole = FrameReader().feed(data)
    for seed in range(3):
        rng = random.Random(seed)
        reader, errors = _collecting_reader()
        frames: list[Frame] = []
        i = 0
        while i < len(data):
            step = rng.randint(1, 4096)
            frames += reader.feed(data[i:i + step])
            i += step
        assert errors == []
        assert frames == whole


def test_one_byte_at_a_time() -> None:
    data = capture_bytes("c_click_to_call_101_to_external")
    reader = FrameReader()
    frames = [f for i in range(len(data)) for f in reader.feed(data[i:i + 1])]
    assert frames == FrameReader().feed(data)


def _bgjob_body() -> bytes:
    bodies = capture_frames("c_click_to_call_101_to_external")
    (body,) = [b for b in bodies if b"Event-Name: BACKGROUND_JOB" in b]
    return body


def test_background_job_body_is_kept_apart_from_headers() -> None:
    event = parse_event(_bgjob_body())
    assert event.name == "BACKGROUND_JOB"
    assert event.get("Job-UUID") == BGJOB_UUID
    assert event.get("Content-Length") == "41"
    assert event.body == "+OK 48154cd9-361e-4787-a2ac-f22bc528d3c7\n"
    assert event.get("Job-Command-Arg", "").startswith("{origination_uuid=48154cd9")
    # greenswitch, for the record: the body is glued into Content-Length.
    glued = ESLEvent(_bgjob_body().decode()).headers["Content-Length"]
    assert glued.startswith("41") and "+OK 48154cd9" in glued


def test_event_body_is_content_length_bytes_not_characters() -> None:
    body = "Event-Name: BACKGROUND_JOB\nJob-UUID: j\nContent-Length: 8\n\n-ERR é\nXX".encode()
    assert parse_event(body).body == "-ERR é\n"  # "é" is 2 bytes
    assert parse_event(body.decode()).body == "-ERR é\n"


INJECTED = (
    b"Event-Name: CHANNEL_CREATE\n"
    b"Unique-ID: 11111111-2222-3333-4444-555555555555\n"
    b"Caller-Caller-ID-Name: Evil%0AUnique-ID%3A%20x\n"
    b"Caller-Caller-ID-Number: %2B79991234567\n"
    b"variable_note: a+b%20c\n"
    b"\n"
)


def test_encoded_newline_does_not_inject_a_header() -> None:
    event = parse_event(INJECTED)
    assert event.uuid == "11111111-2222-3333-4444-555555555555"
    assert event.get("Caller-Caller-ID-Name") == "Evil\nUnique-ID: x"
    assert set(event.headers()) == {"Event-Name", "Unique-ID", "Caller-Caller-ID-Name",
                                    "Caller-Caller-ID-Number", "variable_note"}
    # greenswitch decodes before splitting: the caller name overwrites the Unique-ID.
    assert ESLEvent(INJECTED.decode()).headers["Unique-ID"] == "x"


def test_plus_stays_plus() -> None:
    event = parse_event(INJECTED)
    assert event.var("note") == "a+b c"
    assert event.get("Caller-Caller-ID-Number") == "+79991234567"


@pytest.mark.parametrize("raw", [b"%ZZ", b"%E2%28%A1", b"%", b"%%", b"100%", b"%C3%28",
                                 b"%FF%FE", b"%u2028", b"\xff\xfe\xc3(", b"%0"])
def test_bad_percent_encoding_and_bytes_do_not_crash(raw: bytes) -> None:
    body = b"Event-Name: CHANNEL_ANSWER\nUnique-ID: u\nCaller-Caller-ID-Name: " + raw + b"\n\n"
    event = parse_event(body)
    assert event.uuid == "u"
    assert isinstance(event.get("Caller-Caller-ID-Name"), str)
    assert set(event.headers()) == {"Event-Name", "Unique-ID", "Caller-Caller-ID-Name"}


def test_non_utf8_envelope_and_body_do_not_crash() -> None:
    good = event_frame(b"Event-Name: CHANNEL_ANSWER\nUnique-ID: good\n\n")
    data = (b"Content-Type: text/event-pl\xffain\nContent-Length: 3\n\n\xff\xfe\xfd"
            + event_frame(b"Event-Name: CHANNEL_\xffANSWER\nUnique-ID: \xc3\x28\n\n")
            + good)
    reader, errors = _collecting_reader()
    frames = reader.feed(data)
    assert len(frames) == 3
    assert frames[0].content_type.startswith("text/event-pl")
    assert parse_event(frames[1].body).uuid == "\ufffd("
    assert parse_event(frames[2].body).uuid == "good"


def test_event_without_event_name_is_a_frame_error() -> None:
    with pytest.raises(FrameError):
        parse_event(b"Unique-ID: u\n\n")
    with pytest.raises(FrameError):
        parse_event(b"")


GOOD = b"Event-Name: CHANNEL_ANSWER\nUnique-ID: good-1\n\n"


@pytest.mark.parametrize("length", [b"abc", b"-5", b"12a", b"", b"1e3", b"\xc2\xb2", b"\xd9\xa3",
                                    b"99999999999", b"9" * 5000, b" 12 3", b"0x10"])
@pytest.mark.parametrize("victim", ["channel", "bgjob"])
def test_bad_content_length_is_skipped_and_the_reader_resyncs(length: bytes, victim: str) -> None:
    channel = capture_frames("a_inbound_answered_caller_hangup")[3]
    body = _bgjob_body() if victim == "bgjob" else channel
    bad = b"Content-Length: " + length + b"\nContent-Type: text/event-plain\n\n" + body
    reader, errors = _collecting_reader()
    frames = reader.feed(bad + event_frame(GOOD) + event_frame(GOOD.replace(b"-1", b"-2")))
    assert errors
    assert [parse_event(f.body).uuid for f in frames] == ["good-1", "good-2"]
    assert reader.buffered == 0


def test_bad_content_length_resyncs_when_fed_in_chunks() -> None:
    bad = b"Content-Length: x\nContent-Type: text/event-plain\n\n" + _bgjob_body()
    data = bad + event_frame(GOOD)
    for step in (1, 7, 64):
        reader, errors = _collecting_reader()
        frames = [f for i in range(0, len(data), step) for f in reader.feed(data[i:i + step])]
        assert [parse_event(f.body).uuid for f in frames] == ["good-1"]


def test_oversized_content_length_is_refused() -> None:
    reader, errors = _collecting_reader(max_body_bytes=100)
    frames = reader.feed(b"Content-Length: 101\nContent-Type: text/event-plain\n\n"
                         + b"x" * 101 + b"\n\n" + event_frame(GOOD))
    assert errors and "limit" in str(errors[0])
    assert [parse_event(f.body).uuid for f in frames] == ["good-1"]


def test_missing_content_type_is_skipped() -> None:
    reader, errors = _collecting_reader()
    frames = reader.feed(b"Content-Length: %d\n\n%s" % (len(GOOD), GOOD) + event_frame(GOOD))
    assert errors
    assert [f.content_type for f in frames] == ["text/event-plain"]


def test_garbage_lines_before_a_frame_are_dropped_not_the_frame() -> None:
    reader, errors = _collecting_reader()
    frames = reader.feed(b"\x00\xff garbage\nmore garbage\n" + event_frame(GOOD))
    assert errors
    assert [parse_event(f.body).uuid for f in frames] == ["good-1"]


def test_no_boundary_for_too_long_keeps_the_last_partial_line() -> None:
    reader, errors = _collecting_reader(max_header_bytes=1000)
    frame = event_frame(GOOD)
    assert reader.feed(b"Z" * 600 + b"\n" + b"Y" * 600 + b"\n" + frame[:10]) == []
    assert errors and reader.buffered == 10
    frames = reader.feed(frame[10:])
    assert [parse_event(f.body).uuid for f in frames] == ["good-1"]


def test_huge_line_without_newline_is_dropped() -> None:
    reader, errors = _collecting_reader(max_header_bytes=1000)
    assert reader.feed(b"Z" * 5000) == []
    assert errors and reader.buffered == 0
    frames = reader.feed(b"ZZZ\n" + event_frame(GOOD))
    assert [parse_event(f.body).uuid for f in frames] == ["good-1"]


def test_stray_blank_lines_and_crlf_are_tolerated() -> None:
    reader, errors = _collecting_reader()
    frames = reader.feed(b"\n\n\n" + event_frame(GOOD) + b"\n"
                         + b"Content-Type: command/reply\r\nReply-Text: +OK\r\n\n")
    assert errors == []
    assert [f.content_type for f in frames] == ["text/event-plain", "command/reply"]
    assert frames[1].headers["Reply-Text"] == "+OK"


def test_greenswitch_receive_loop_dies_on_non_utf8() -> None:
    """Documentation of why the receive loop is replaced: one bad byte ends greenswitch's."""

    class _Sock:
        def close(self) -> None:
            pass

    esl = InboundESL("127.0.0.1", 1, "x")
    esl.sock = _Sock()
    esl.sock_file = io.BytesIO(b"Content-Type: text/event-plain\nX: \xff\n\n")
    esl.connected = True
    esl.receive_events()
    assert esl._run is False and esl.connected is False
