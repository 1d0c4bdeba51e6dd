"""A CC360 request as data: what the outbox stores and the CC360 client sends.

The request keeps the *endpoint name* (``RingingEventHandler`` / ``PushHistoryData``),
never a full URL: the base URL, the token and the auth mode (which changes the path)
are applied by :class:`fs_cc360.cc360.Cc360Client` at send time, so a row queued while
the CRM was misconfigured is sent correctly once the operator fixes the config.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

RINGING_ENDPOINT = "RingingEventHandler"
HISTORY_ENDPOINT = "PushHistoryData"


@dataclass(frozen=True)
class CrmRequest:
    """One HTTP request to CC360, minus base URL, token and auth."""

    method: str  #: ``GET`` (RingingEventHandler) or ``POST`` (PushHistoryData)
    endpoint: str  #: ``RingingEventHandler`` or ``PushHistoryData``
    params: dict[str, str] = field(default_factory=dict)  #: query string, in order
    body: dict[str, Any] | None = None  #: JSON body (PushHistoryData only)

    def to_json(self) -> str:
        return json.dumps(
            {"method": self.method, "endpoint": self.endpoint, "params": self.params,
             "body": self.body},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> CrmRequest:
        data = json.loads(text)
        return cls(data["method"], data["endpoint"], dict(data.get("params") or {}),
                   data.get("body"))


def request_for(event: Any, link: Callable[[str], str] | None = None) -> CrmRequest:
    """Build the CC360 request for a :class:`fs_cc360.calls.CrmEvent`.

    ``link`` turns a recording file path into the URL put in ``FILES``; without it the
    summary carries no links.
    """
    if event.kind == "summary":
        params = {
            "id": event.call_id,
            "callerid": event.callerid,
            "user": event.user,
            "event": event.direction,
            "duration": str(event.duration),
        }
        files = [link(path) for path in event.files] if link else []
        return CrmRequest("POST", HISTORY_ENDPOINT, params, {"FILES": files})
    params = {
        "id": event.call_id,
        "eventName": event.kind,
        "callerid": event.callerid,
        "user": event.user,
    }
    return CrmRequest("GET", RINGING_ENDPOINT, params)
