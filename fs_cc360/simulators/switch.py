"""What a FreeSWITCH knows of its channels, rebuilt from the events it sends.

:class:`SwitchState` follows every event the simulated FreeSWITCH plays, whether or not a
client is connected (a real switch keeps its calls when the connector goes away), and
answers what the connector asks after a (re)connect:

* ``show channels as json``: ``{"row_count": N, "rows": [...]}`` with the columns of
  FreeSWITCH 1.10's ``channels`` table the connector uses (``{"row_count": 0}`` when
  there is none, as FreeSWITCH prints it);
* ``uuid_dump <uuid> json``: the channel's headers and variables as one JSON object
  (``switch_event_serialize_json`` of a CHANNEL_DATA event), or ``-ERR No such channel!``.

With a ``cdr_dir`` it also writes each leg's mod_json_cdr file (``<uuid>.cdr.json``) when
the leg ends, as the shipped ``json_cdr.conf.xml`` makes FreeSWITCH do.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fs_cc360.events import ChannelEvent, parse_event

#: Headers that describe the state of a channel, carried by every channel event.
_STATE_HEADERS = ("Channel-State", "Channel-State-Number", "Channel-Call-State",
                  "Answer-State", "Channel-Call-UUID")


def cdr_from_hangup(event: ChannelEvent, recordings: list[tuple[int, str]],
                    encoded: bool = True) -> dict[str, Any]:
    """A mod_json_cdr document for one leg, from its CHANNEL_HANGUP_COMPLETE.

    ``recordings`` are ``(start µs, path)`` of its ``record_session`` runs (mod_json_cdr
    keeps them in ``app_log``). ``encoded``: variable values URL-encoded, mod_json_cdr's
    default (``encode-values``).
    """
    headers = event.headers()
    variables = {k[len("variable_"):]: (quote(v, safe="") if encoded else v)
                 for k, v in headers.items() if k.startswith("variable_")}
    profile: dict[str, Any] = {
        "username": headers.get("Caller-Username", ""),
        "caller_id_name": headers.get("Caller-Caller-ID-Name", ""),
        "caller_id_number": headers.get("Caller-Caller-ID-Number", ""),
        "ani": headers.get("Caller-ANI", ""),
        "destination_number": headers.get("Caller-Destination-Number", ""),
        "uuid": headers["Unique-ID"],
        "context": headers.get("Caller-Context", ""),
        "chan_name": headers.get("Channel-Name", ""),
    }
    other_type = headers.get("Other-Type")
    if other_type in ("originator", "originatee") and headers.get("Other-Leg-Unique-ID"):
        profile[other_type] = {f"{other_type}_caller_profiles": [
            {"uuid": headers["Other-Leg-Unique-ID"]}]}
    apps = [{"app_name": "record_session", "app_data": path, "app_stamp": str(at)}
            for at, path in recordings]
    return {
        "core-uuid": headers.get("Core-UUID", ""),
        "channel_data": {"direction": headers.get("Call-Direction", "")},
        "variables": variables,
        "app_log": {"applications": apps},
        "callflow": [{"profile_index": "1", "caller_profile": profile,
                      "times": {"hangup_time": headers["Event-Date-Timestamp"]}}],
    }


class _Channel:
    def __init__(self, uuid: str) -> None:
        self.uuid = uuid
        self.headers: dict[str, str] = {}
        self.recordings: list[tuple[int, str]] = []


class SwitchState:
    """See the module docstring. Thread-safe: the simulator serves clients from threads."""

    def __init__(self, cdr_dir: str | os.PathLike[str] | None = None) -> None:
        self.cdr_dir = Path(cdr_dir) if cdr_dir is not None else None
        self._channels: dict[str, _Channel] = {}
        self._ended: set[str] = set()  # a hung-up channel's last events recreate nothing
        self._lock = threading.Lock()
        #: CDR files written so far.
        self.cdr_files: list[Path] = []

    def apply(self, body: bytes) -> None:
        """Follow one event (the body of a ``text/event-plain`` frame)."""
        event = parse_event(body)
        uuid = event.uuid
        if not uuid or not event.name.startswith(("CHANNEL_", "RECORD_")):
            return
        with self._lock:
            if uuid in self._ended:
                return
            if event.name == "CHANNEL_HANGUP_COMPLETE":
                channel = self._channels.pop(uuid, None)
                self._ended.add(uuid)
                self._write_cdr(event, channel.recordings if channel else [])
                return
            channel = self._channels.get(uuid)
            if channel is None:
                channel = self._channels[uuid] = _Channel(uuid)
            headers = event.headers()
            if any(k.startswith("variable_") for k in headers):
                channel.headers = headers  # a full event: the whole channel as it is now
            else:
                channel.headers.update({k: v for k, v in headers.items()
                                        if k in _STATE_HEADERS or k not in channel.headers})
            if event.name == "RECORD_START" and event.get("Record-File-Path"):
                stamp = int(event.get("Event-Date-Timestamp") or 0)
                channel.recordings.append((stamp, event["Record-File-Path"]))

    def _write_cdr(self, event: ChannelEvent, recordings: list[tuple[int, str]]) -> None:
        if self.cdr_dir is None:
            return
        path = self.cdr_dir / f"{event.uuid}.cdr.json"
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(json.dumps(cdr_from_hangup(event, recordings)), encoding="utf-8")
        os.replace(tmp, path)
        self.cdr_files.append(path)

    @property
    def channel_count(self) -> int:
        with self._lock:
            return len(self._channels)

    def show_channels_json(self) -> str:
        """``show channels as json``."""
        with self._lock:
            rows = [self._row(c.headers) for c in self._channels.values()]
        if not rows:
            return '{"row_count":0}\n'
        return json.dumps({"row_count": len(rows), "rows": rows}) + "\n"

    @staticmethod
    def _row(h: dict[str, str]) -> dict[str, str]:
        created = h.get("Caller-Channel-Created-Time") or "0"
        return {
            "uuid": h.get("Unique-ID", ""),
            "direction": h.get("Call-Direction", ""),
            "created_epoch": str(int(created) // 1_000_000) if created.isdigit() else "0",
            "name": h.get("Channel-Name", ""),
            "state": h.get("Channel-State", ""),
            "cid_name": h.get("Caller-Caller-ID-Name", ""),
            "cid_num": h.get("Caller-Caller-ID-Number", ""),
            "dest": h.get("Caller-Destination-Number", ""),
            "context": h.get("Caller-Context", ""),
            "callstate": h.get("Channel-Call-State", ""),
            "call_uuid": h.get("Channel-Call-UUID", ""),
        }

    def uuid_dump_json(self, uuid: str) -> str:
        """``uuid_dump <uuid> json``."""
        with self._lock:
            channel = self._channels.get(uuid)
            if channel is None:
                return "-ERR No such channel!\n"
            headers = dict(channel.headers)
        headers["Event-Name"] = "CHANNEL_DATA"
        return json.dumps(headers)

    def api(self, command: str) -> str | None:
        """The answer to an ``api`` command this state knows, or None."""
        words = command.split()
        if words[:3] == ["show", "channels", "as"] and words[3:] == ["json"]:
            return self.show_channels_json()
        if len(words) == 3 and words[0] == "uuid_dump" and words[2] == "json":
            return self.uuid_dump_json(words[1])
        return None
