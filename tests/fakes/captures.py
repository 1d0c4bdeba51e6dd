"""The test suite's view of the real captures in tests/captures/ (no ../shared needed)."""

from __future__ import annotations

import pathlib

from fs_cc360.simulators.captures import (  # noqa: F401
    event_frame,
    frames_of,
    interleave,
    remap,
    shift_to_now,
)

CAPTURES = pathlib.Path(__file__).resolve().parent.parent / "captures"
SCENARIOS = sorted(p.stem for p in CAPTURES.glob("*.esl"))


def capture_path(name: str) -> pathlib.Path:
    return CAPTURES / f"{name}.esl"


def capture_bytes(name: str) -> bytes:
    return capture_path(name).read_bytes()


def capture_frames(name: str) -> list[bytes]:
    """The bodies of the capture's ``text/event-plain`` frames, in arrival order."""
    return frames_of(capture_bytes(name))
