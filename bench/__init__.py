"""Benchmarks and long fault runs (see bench/README.md); ``bench.harness`` is shared with
``tests/test_faults.py``."""
