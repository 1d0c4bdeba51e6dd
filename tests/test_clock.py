"""FreeSWITCH's clock offset, measured from event timestamps (fs_cc360.clock)."""

from __future__ import annotations

import logging

import pytest

from fs_cc360.clock import ClockOffset

T0 = 1_800_000_000.0


def test_offset_is_the_smallest_lag_in_the_window() -> None:
    clock = ClockOffset(window=10)
    assert clock.offset is None
    clock.observe(T0 - 2.5, T0)  # 2.5 s late (busy hub) on top of the offset
    clock.observe(T0 + 1 - 2.0, T0 + 1)
    clock.observe(T0 + 2 - 2.2, T0 + 2)
    assert clock.offset == pytest.approx(2.0)
    # the 2.0 s lag leaves the window: the smallest of the rest counts
    clock.observe(T0 + 11.5 - 2.4, T0 + 11.5)
    assert clock.offset == pytest.approx(2.2)
    clock.observe(T0 + 30 - 2.4, T0 + 30)
    assert clock.offset == pytest.approx(2.4)


def test_events_without_a_timestamp_teach_nothing() -> None:
    clock = ClockOffset()
    assert clock.observe(0.0, T0) is None
    assert clock.offset is None


@pytest.mark.parametrize("offset,word", [(900.0, "behind"), (-900.0, "ahead of")])
def test_warns_once_when_the_clocks_disagree_and_once_when_they_agree(
        offset: float, word: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    clock = ClockOffset(warn_above=5, window=10)
    changes = [clock.observe(T0 + n - offset, T0 + n) for n in range(20)]
    assert changes[0] is True and changes[1:] == [None] * 19
    assert clock.skewed
    skew = [r.getMessage() for r in caplog.records if "clock.skew" in r.getMessage()]
    assert len(skew) == 1 and f"900.0 s {word}" in skew[0] and "NTP" in skew[0]
    # NTP fixed: within the window the old lags still count (the minimum is kept)...
    later = T0 + 100
    assert clock.observe(later - 0.01, later) in (None, False)
    changes = [clock.observe(later + n - 0.01, later + n) for n in range(1, 15)]
    assert False in changes or not clock.skewed
    assert not clock.skewed
    assert sum("clock.agree" in r.getMessage() for r in caplog.records) == 1


def test_a_border_offset_does_not_flap() -> None:
    clock = ClockOffset(warn_above=5, window=0.5)
    states = [clock.observe(T0 + n - (5.5 if n % 2 else 4.0), T0 + n) for n in range(10)]
    assert states.count(True) == 1 and states.count(False) == 0
