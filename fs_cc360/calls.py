"""Call mapping rules: FreeSWITCH channel events in, CC360 events out. Pure code, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

REALTIME_KINDS = ("ringing", "answer", "hangup")


@dataclass(frozen=True)
class CrmEvent:
    """One CC360 event for one agent's part in one call.

    ``kind`` is ``ringing``/``answer``/``hangup`` (RingingEventHandler) or ``summary``
    (PushHistoryData). ``call_id`` is the CC360 ``id``: the same for every event of one
    agent's part in one call. ``files`` are recording paths as FreeSWITCH wrote them.
    """

    kind: str
    call_id: str
    user: str
    callerid: str
    at: float  #: FreeSWITCH event time, epoch seconds
    direction: str | None = None  #: ``incoming`` / ``outgoing`` (summary only)
    duration: int | None = None  #: seconds (summary only)
    files: tuple[str, ...] = ()

    @property
    def realtime(self) -> bool:
        return self.kind in REALTIME_KINDS
