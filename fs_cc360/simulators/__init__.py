"""Simulated FreeSWITCH and CC360 servers, for the demo, the tests and the benchmarks.

They are real servers on loopback (ephemeral ports) speaking the real protocols, shipped in
the package so that ``fs-cc360 demo`` needs nothing beyond the package itself. Never point
them at anything but 127.0.0.1.
"""
