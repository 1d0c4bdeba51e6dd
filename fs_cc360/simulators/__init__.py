"""Simulated FreeSWITCH and CC360 servers, for the demo, the tests and the benchmarks.

They are real servers on loopback (ephemeral ports) speaking the real protocols, shipped in
the package so that ``fs-cc360 demo`` needs nothing beyond the package itself. Never point
them at anything but 127.0.0.1.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0,
               interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; returns its last
    value. Sleeps with ``time.sleep``, which yields to other greenlets when gevent has
    patched the process (the suite, the CLI) and simply waits when it has not."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
