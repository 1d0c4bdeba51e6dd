"""ESL wire format: byte stream -> frames -> :class:`ChannelEvent`.

Why not greenswitch's ``ESLEvent``: it URL-decodes the whole payload *before* splitting
it into lines, so an encoded newline in a caller name can inject or overwrite headers,
and the body of a BACKGROUND_JOB ends up glued to ``Content-Length``. It is also slow,
and FreeSWITCH drops a listener whose event queue overflows.

Here the stream is split first (frame headers, then ``Content-Length`` bytes of body),
an event's header block is kept as one string, and a header value is found and
percent-decoded (``unquote``, never ``unquote_plus``: FreeSWITCH encodes spaces as
``%20`` and a literal ``+`` must stay a ``+``) only when someone asks for it. A
tracker reads a dozen of the ~300 headers of a verbose event, so most are never
decoded at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import quote, unquote

from fs_cc360.errors import FrameError

log = logging.getLogger(__name__)

#: A frame header block larger than this is junk, not ESL.
MAX_HEADER_BYTES = 64 * 1024
#: A frame body larger than this is refused (a verbose event is ~16 KB).
MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    """One ESL frame: its envelope headers (plain text) and its raw body."""

    headers: dict[str, str]
    body: bytes = b""

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")


def _parse_envelope(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition(": ")
        if sep:
            headers[key.strip()] = value.strip()
        elif line.strip():
            raise FrameError(f"envelope line without ': ': {line[:80]!r}")
    return headers


class FrameReader:
    """Incremental splitter of an ESL byte stream into :class:`Frame` objects.

    ``feed(data)`` returns every frame completed by ``data``. A malformed frame (bad or
    oversized ``Content-Length``, an envelope line that is not a header) is reported to
    ``on_error`` and skipped; the reader resynchronises at the next blank line, so the
    good frames around it still come through.
    """

    def __init__(
        self,
        on_error: Callable[[FrameError], None] | None = None,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._buf = bytearray()
        self._scan_from = 0
        self._pending: dict[str, str] | None = None
        self._need = 0
        self._on_error = on_error or _log_frame_error
        self._max_header = max_header_bytes
        self._max_body = max_body_bytes

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        return list(self._drain())

    def _drain(self) -> Iterator[Frame]:
        buf = self._buf
        while True:
            if self._pending is not None:
                if len(buf) < self._need:
                    return
                body = bytes(buf[: self._need])
                del buf[: self._need]
                headers, self._pending = self._pending, None
                yield Frame(headers, body)
                continue
            end = buf.find(b"\n\n", self._scan_from)
            if end < 0:
                if len(buf) > self._max_header:
                    # Keep the last partial line: it may be the start of a good frame.
                    cut = buf.rfind(b"\n") + 1 or len(buf)
                    self._on_error(FrameError(f"no frame boundary in {cut} bytes; dropped"))
                    del buf[:cut]
                self._scan_from = max(0, len(buf) - 1)
                return
            block = bytes(buf[:end])
            self._scan_from = 0
            cut = _junk_end(block)
            if cut:
                # Lines that are not "Key: value" cannot belong to an envelope (the tail of a
                # body after a bad Content-Length): drop them and look again, so a good
                # envelope right after them is not lost with them.
                self._on_error(FrameError(f"junk before frame: {block[:80]!r}"))
                del buf[:cut]
                continue
            del buf[: end + 2]
            if not block.strip(b"\r\n"):
                continue  # stray blank lines between frames
            try:
                headers = _parse_envelope(block)
                length = _content_length(headers, self._max_body)
            except FrameError as exc:
                self._on_error(exc)
                continue
            if "Content-Type" not in headers:
                self._on_error(FrameError(f"frame without Content-Type: {block[:80]!r}"))
                continue
            if length:
                self._pending, self._need = headers, length
            else:
                yield Frame(headers)


def _content_length(headers: dict[str, str], max_body: int) -> int:
    raw = headers.get("Content-Length")
    if raw is None:
        return 0
    if not _is_length(raw):
        raise FrameError(f"bad Content-Length {raw[:20]!r}")
    length = int(raw)
    if length > max_body:
        raise FrameError(f"Content-Length {length} over the {max_body}-byte limit")
    return length


def _is_length(raw: str) -> bool:
    """ASCII digits only, at most 15 of them (``"²".isdigit()`` is true but ``int("²")``
    fails, and ``int()`` refuses strings over 4300 digits)."""
    return 0 < len(raw) <= 15 and raw.isascii() and raw.isdigit()


def _junk_end(block: bytes) -> int:
    """Offset just past the last line of ``block`` that is not a ``Key: value`` header, 0
    when every line is one."""
    if b"\n" not in block:
        return 0 if b": " in block or not block.strip() else len(block)
    cut = pos = 0
    for line in block.split(b"\n"):
        pos += len(line) + 1
        if b": " not in line and line.strip():
            cut = pos
    return min(cut, len(block))


def _log_frame_error(exc: FrameError) -> None:
    log.warning("esl.frame_skipped reason=%s", exc)


class ChannelEvent:
    """A parsed ``text/event-plain`` event. Immutable; values are decoded on first access.

    ``event.get("Unique-ID")``, ``event["Event-Name"]``, ``event.var("dialed_user")``
    (``variable_dialed_user``). Missing headers give ``None`` (or the default).
    """

    __slots__ = ("_head", "_cache", "body", "name")

    def __init__(self, head: str, body: str = "") -> None:
        # A leading newline lets every lookup search for "\n<Key>: ", first line included.
        self._head = head if head.startswith("\n") else "\n" + head
        self._cache: dict[str, str | None] = {}
        #: The event's own body (BACKGROUND_JOB result), kept apart from the headers.
        self.body = body
        #: ``Event-Name`` (``CUSTOM`` events keep their ``Event-Subclass`` separately).
        self.name = self.get("Event-Name") or ""

    def get(self, key: str, default: str | None = None) -> str | None:
        try:
            value = self._cache[key]
        except KeyError:
            value = self._cache[key] = self._lookup(key)
        return default if value is None else value

    def _lookup(self, key: str) -> str | None:
        head = self._head
        needle = "\n" + key + ": "
        start = head.find(needle)
        if start < 0:
            return None
        start += len(needle)
        end = head.find("\n", start)
        raw = head[start:] if end < 0 else head[start:end]
        return unquote(raw) if "%" in raw else raw

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def var(self, name: str, default: str | None = None) -> str | None:
        """A channel variable: ``var("dialed_user")`` reads ``variable_dialed_user``."""
        return self.get("variable_" + name, default)

    def headers(self) -> dict[str, str]:
        """Every header, decoded (for logs, debugging and the CDR backfill; not the hot path)."""
        out: dict[str, str] = {}
        for line in self._head.split("\n"):
            key, sep, value = line.partition(": ")
            if sep:
                out[key] = unquote(value) if "%" in value else value
        return out

    @property
    def uuid(self) -> str:
        return self.get("Unique-ID") or ""

    @property
    def timestamp(self) -> float:
        """``Event-Date-Timestamp`` in epoch seconds (FreeSWITCH's clock), 0.0 if absent."""
        raw = self.get("Event-Date-Timestamp")
        if raw and raw.isascii() and raw.isdigit():
            return int(raw) / 1_000_000
        return 0.0

    def __repr__(self) -> str:
        return f"<ChannelEvent {self.name} {self.uuid}>"


def header_value(text: str) -> str:
    """``text`` as a header value :class:`ChannelEvent` reads back unchanged.

    A value is only percent-decoded when it holds a ``%``, and a line ends at LF, so only
    values with ``%``, CR or LF need encoding; the others go as they are (events built by
    the connector itself from CDR files and ``uuid_dump``: encoding every one of their
    ~300 values would cost more than everything else).
    """
    if "%" in text or "\n" in text or "\r" in text:
        return quote(text, safe="/@:+,=-_.~ ")
    return text


def parse_event(data: bytes | str) -> ChannelEvent:
    """Parse the body of a ``text/event-plain`` frame.

    Raises :class:`FrameError` when it is not an event (no ``Event-Name``).

    Only an event with a body of its own (BACKGROUND_JOB) has a ``Content-Length`` header,
    so the blank line that ends the headers is searched for only after it: searching a
    13 KB channel event for ``\\n\\n`` would cost more than the rest of the parse.
    """
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    data = bytes(data)
    marker = data.find(b"\nContent-Length: ")
    if marker < 0 and not data.startswith(b"Content-Length: "):
        head, rest = data, b""
    else:
        head, _, rest = data.partition(b"\n\n")
    event = ChannelEvent(head.decode("utf-8", "replace"))
    if not event.name:
        raise FrameError(f"event without Event-Name: {head[:80]!r}")
    if rest:
        event.body = _event_body(event, rest)
    return event


def _event_body(event: ChannelEvent, rest: bytes) -> str:
    """The event's own body: ``Content-Length`` bytes (not characters) after its headers."""
    raw_len = event.get("Content-Length")
    if raw_len and _is_length(raw_len):
        rest = rest[: int(raw_len)]
    return rest.decode("utf-8", "replace")


def iter_events(frames: list[Frame]) -> Iterator[ChannelEvent]:
    """The channel events among ``frames``; bad event bodies are logged and skipped."""
    for frame in frames:
        if frame.content_type != "text/event-plain":
            continue
        try:
            yield parse_event(frame.body)
        except FrameError as exc:
            _log_frame_error(exc)
