"""Helpers shared by the command modules: settings, output, logging set-up."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from fs_cc360.config import Settings, load_settings

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_CONFIG = 2


def load(args: argparse.Namespace, *, require_crm: bool = True) -> Settings:
    """The settings for a command: ``--config`` file, env, ``--log-level``."""
    overrides = {"logging": {"level": getattr(args, "log_level", None)}}
    return load_settings(args.config, overrides=overrides, require_crm=require_crm)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def setup_logging(level: str, fmt: str = "text", stream: Any = None) -> None:
    """One handler on the root logger. The service logs to stdout (journald reads it);
    the one-shot commands to stderr, so stdout holds only what a script parses."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False, default=str))


def print_table(rows: Iterable[Sequence[Any]], headers: Sequence[str]) -> int:
    """Print rows as aligned columns; returns how many rows were printed.

    Rows are buffered in chunks so a long listing streams instead of loading everything.
    """
    count = 0
    chunk: list[list[str]] = []
    widths = [len(h) for h in headers]

    def flush(first: bool) -> None:
        for row in chunk:
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], min(len(cell), 60))
        if first:
            print("  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip())
        for row in chunk:
            print("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip())
        chunk.clear()

    first = True
    for row in rows:
        chunk.append(["" if c is None else str(c) for c in row])
        count += 1
        if len(chunk) >= 200:
            flush(first)
            first = False
    if chunk or first:
        flush(first)
    return count


def format_time(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def parse_time(value: str) -> float:
    """``2026-11-27``, ``2026-11-27 10:00``, an epoch, or a relative age ``30m``/``2h``/``7d``."""
    value = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value and value[-1] in units and value[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(value[:-1]) * units[value[-1]]
    try:
        return float(value)
    except ValueError:
        pass
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
        try:
            return time.mktime(time.strptime(value, fmt))
        except ValueError:
            continue
    raise argparse.ArgumentTypeError(
        f"not a time: {value!r} (use 2026-11-27, '2026-11-27 10:00', an epoch, or 30m/2h/7d)")
