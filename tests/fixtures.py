"""Helpers shared by several test modules (like rq's tests/fixtures.py)."""

from __future__ import annotations

from fs_cc360.calls import CrmEvent
from fs_cc360.crm_request import CrmRequest, request_for
from fs_cc360.outbox import NewItem

CALLERID = "79991234567"


def request(call: str, kind: str) -> CrmRequest:
    """The CC360 request the service would build for one event of call ``call``."""
    return request_for(_event(call, kind))


def item(call: str, kind: str, event_at: float | None = None) -> NewItem:
    """An outbox row for one event of call ``call`` (user 101, a 7 s incoming summary)."""
    return NewItem(call, kind, request(call, kind), user="101", callerid=CALLERID,
                   event_at=event_at)


def _event(call: str, kind: str) -> CrmEvent:
    if kind == "summary":
        return CrmEvent("summary", call, "101", CALLERID, 0.0, direction="incoming",
                        duration=7)
    return CrmEvent(kind, call, "101", CALLERID, 0.0)
