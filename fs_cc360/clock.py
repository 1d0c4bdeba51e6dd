"""How far FreeSWITCH's clock is from this host's, measured from the events themselves.

Every event carries ``Event-Date-Timestamp`` (FreeSWITCH's clock, µs). The connector
notes when it read each one (its own clock): ``read - stamped`` is the clock offset plus
the time the event spent on its way (socket, a busy hub), which is never negative. The
smallest such lag over a sliding window is therefore the best estimate of the offset
alone. Popups are timed on the connector's clock (when the event was read), so a skew no
longer expires them; the estimate is kept to tell the admin, once, that the clocks
disagree (FreeSWITCH on another host, NTP broken) and once more when they agree again,
and for the ``fs_cc360_freeswitch_clock_offset_seconds`` gauge.
"""

from __future__ import annotations

import logging
from collections import deque

log = logging.getLogger(__name__)

#: Offsets larger than this (seconds, either way) are reported.
SKEW_WARN_SECONDS = 5.0
#: The estimate is the smallest lag seen over this many seconds of reading.
WINDOW_SECONDS = 30.0


class ClockOffset:
    """Sliding-window minimum of ``read_at - event_at``; see the module docstring.

    ``observe()`` is O(1) amortised (a monotonic deque), fit for the ESL hot path.
    ``offset`` is positive when FreeSWITCH's clock is behind this host's.
    """

    def __init__(self, warn_above: float = SKEW_WARN_SECONDS,
                 window: float = WINDOW_SECONDS) -> None:
        self.warn_above = warn_above
        self.window = window
        self._lags: deque[tuple[float, float]] = deque()  # (read_at, lag), lags increasing
        #: True while the clocks are reported as disagreeing.
        self.skewed = False

    @property
    def offset(self) -> float | None:
        """Seconds FreeSWITCH's clock is behind ours (negative: ahead); None before any
        event."""
        return self._lags[0][1] if self._lags else None

    def observe(self, event_at: float, read_at: float) -> bool | None:
        """Note one event; returns the new ``skewed`` state when it changed, else None."""
        if event_at <= 0:
            return None  # no timestamp: nothing to learn
        lag = read_at - event_at
        lags = self._lags
        while lags and lags[-1][1] >= lag:
            lags.pop()
        lags.append((read_at, lag))
        while lags[0][0] < read_at - self.window:
            lags.popleft()
        offset = lags[0][1]
        # Hysteresis: agree again only well inside the limit, so a border case cannot flap.
        if not self.skewed and abs(offset) > self.warn_above:
            self.skewed = True
            log.warning(
                "clock.skew offset=%.1fs: FreeSWITCH's clock is %.1f s %s this host's. Popups "
                "are timed by this host's clock, so they are still delivered, but check NTP "
                "on both hosts (timedatectl)", offset, abs(offset),
                "behind" if offset > 0 else "ahead of")
            return True
        if self.skewed and abs(offset) <= self.warn_above / 2:
            self.skewed = False
            log.warning("clock.agree offset=%.1fs: FreeSWITCH's clock agrees with this host's "
                        "again", offset)
            return False
        return None
