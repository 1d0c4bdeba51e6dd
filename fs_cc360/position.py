"""Where the connector stopped listening: FreeSWITCH's time of the last event it read.

After a restart the automatic catch-up reads the CDR files of legs that ended since then
(less ``[backfill] margin``), so the position must outlive the process: it is kept in a
small JSON file next to the outbox (``<outbox file>.position``), written atomically (temp
file + rename) every few seconds while it moves and once more at shutdown. A crash loses
at most those few seconds, which the margin covers; a lost or unreadable file only means
the first catch-up starts ``margin`` seconds before the start-up.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".position"


class Position:
    """``last_event_at`` (epoch seconds, FreeSWITCH's clock) and its file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.last_event_at: float | None = None
        self._saved: float | None = None
        if path is not None:
            self.last_event_at = self._saved = self._load(path)

    @classmethod
    def next_to(cls, outbox_path: str) -> Position:
        """The position of the outbox at ``outbox_path`` (none for an in-memory one)."""
        if not outbox_path or outbox_path == ":memory:" or outbox_path.startswith("file::"):
            return cls(None)
        return cls(Path(outbox_path + SUFFIX))

    @staticmethod
    def _load(path: Path) -> float | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            value = float(data["last_event_at"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("position.unreadable file=%s error=%s: the first catch-up starts "
                        "[backfill] margin seconds before now", path, exc)
            return None
        return value if value > 0 else None

    def heard(self, event_at: float) -> None:
        """An event stamped ``event_at`` was read (0: no timestamp)."""
        if event_at > (self.last_event_at or 0.0):
            self.last_event_at = event_at

    @property
    def dirty(self) -> bool:
        return self.path is not None and self.last_event_at != self._saved

    def save(self) -> None:
        """Write the file if the position moved (blocking: call it off the hub)."""
        if not self.dirty or self.path is None or self.last_event_at is None:
            return
        value = self.last_event_at
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"last_event_at": value}), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("position.unwritable file=%s error=%s", self.path, exc)
            return
        self._saved = value
