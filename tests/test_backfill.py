"""CDR backfill: real mod_json_cdr files in, the same summaries the live tracker sent out.

The ground truth is the live path: :class:`CallTracker` fed the ESL capture of the same
call (tests/captures/<scenario>.esl). The CDR files are the real ones FreeSWITCH wrote for
those calls (tests/captures/json_cdr/<scenario>/); for the captures without CDR files,
one is generated from each leg's CHANNEL_HANGUP_COMPLETE, as mod_json_cdr would write it.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from fs_cc360 import backfill as bf
from fs_cc360.calls import CallTracker, CrmEvent, TrackerConfig
from fs_cc360.crm_request import CrmRequest, request_for
from fs_cc360.events import parse_event
from fs_cc360.outbox import NewItem, Outbox, OutboxStatus
from fs_cc360.simulators.switch import cdr_from_hangup
from tests.fakes.captures import CAPTURES, SCENARIOS, capture_frames

JSON_CDR = CAPTURES / "json_cdr"
CDR_SCENARIOS = sorted(p.name for p in JSON_CDR.iterdir() if p.is_dir())
#: Calls the live tracker reports as nothing with the default rules (internal calls).
NOTHING_LIVE = {"stock_internal_1001_to_1000"}
#: Calls with legs that end in the same microsecond (FreeSWITCH stamps events in 20 ms
#: ticks here).
TIED = {
    "a_inbound_answered_caller_hangup", "h_ring_group_102_answers", "j_outgoing_from_101",
    "l_blind_transfer_101_to_102", "q1_queue_first_agent_no_answer",
    "r1_loopback_ring_group_102_answers", "stock_inbound_answered",
    "stock_inbound_not_answered", "stock_internal_1001_to_1000", "stock_outgoing_from_1000",
}
CONFIGS = {
    "default": TrackerConfig(),
    "report-all": TrackerConfig(missed_calls="all", internal_calls="report",
                                outgoing_realtime=True),
    "no-missed-no-wait": TrackerConfig(missed_calls="none", summary_wait=0),
}


# --------------------------------------------------------------------------- helpers


def live_summaries(scenario: str, config: TrackerConfig | None = None) -> list[CrmEvent]:
    """What the service's tracker sent for the capture (ticked like the service does)."""
    tracker = CallTracker(config)
    out: list[CrmEvent] = []
    last = 0.0
    for body in capture_frames(scenario):
        event = parse_event(body)
        at = int(event.get("Event-Date-Timestamp") or 0) / 1e6
        out += tracker.tick(at)
        out += tracker.feed(event)
        last = max(last, at)
    out += tracker.tick(last + 3600)
    return [e for e in out if e.kind == "summary"]


def requests(events: list[CrmEvent]) -> list[str]:
    """The CC360 requests, sorted: what the CRM sees (``at`` is only the row's event time)."""
    return sorted(request_for(e).to_json() for e in events)


def legs_of(directory: Path) -> list[bf.CdrLeg]:
    return [bf.read_cdr(p) for p in sorted(directory.glob("*.json"))]


def generate_cdr_dir(scenario: str, directory: Path, encoded: bool = True) -> Path:
    """One CDR file per leg of a capture, written like mod_json_cdr (``<uuid>.cdr.json``)."""
    directory.mkdir(parents=True, exist_ok=True)
    recordings: dict[str, list[tuple[int, str]]] = {}
    for body in capture_frames(scenario):
        event = parse_event(body)
        if event.name == "RECORD_START":
            recordings.setdefault(event.uuid, []).append(
                (int(event["Event-Date-Timestamp"]), event["Record-File-Path"]))
        if event.name == "CHANNEL_HANGUP_COMPLETE":
            cdr = cdr_from_hangup(event, recordings.get(event.uuid, []), encoded)
            (directory / f"{event.uuid}.cdr.json").write_text(json.dumps(cdr))
    return directory


def copy_cdrs(scenarios: list[str], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for scenario in scenarios:
        for path in (JSON_CDR / scenario).glob("*.json"):
            shutil.copy(path, directory / path.name)
    return directory


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(str(tmp_path / "outbox.sqlite3"))
    yield box
    box.close()


# --------------------------------------------------------------------------- the mapping


@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("scenario", CDR_SCENARIOS)
def test_real_cdr_files_give_the_live_summaries(scenario: str, config: str) -> None:
    got = bf.summaries_from_legs(legs_of(JSON_CDR / scenario), CONFIGS[config])
    live = live_summaries(scenario, CONFIGS[config])
    if config == "report-all":  # missed and internal calls included
        assert live, "every CDR scenario has at least one summary"
    else:
        assert live or scenario in NOTHING_LIVE or config == "no-missed-no-wait"
    assert requests(got) == requests(live)
    assert sorted(e.call_id for e in got) == sorted(e.call_id for e in live)


def tie_orders(legs: list[bf.CdrLeg]) -> Iterator[list[bf.CdrLeg]]:
    """Every order of ``legs`` that differs in how legs ending in the same microsecond
    are ordered: the outcomes of every permutation of the CDR files (the run orders the
    legs by their end, keeping the given order among ties)."""
    groups: dict[int, list[bf.CdrLeg]] = {}
    for leg in legs:
        groups.setdefault(leg.end_us, []).append(leg)
    ends = sorted(groups)
    for choice in itertools.product(*(itertools.permutations(groups[t]) for t in ends)):
        yield [leg for tie in choice for leg in tie]


@pytest.mark.parametrize("scenario", CDR_SCENARIOS)
def test_backfill_is_the_live_answer_whatever_order_legs_ending_together_are_read(
        scenario: str, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 13: legs of one call often end in the same clock tick (stock internal call,
    r1's four legs); whichever is read first, backfill gives the live summaries (calls
    live reports as nothing stay nothing) and never a "forgotten" leg."""
    legs = legs_of(JSON_CDR / scenario)
    orders = list(tie_orders(legs))
    assert (len(orders) > 1) == (scenario in TIED), "which calls have legs ending together"
    for name, config in CONFIGS.items():
        live = requests(live_summaries(scenario, config))
        for order in orders:
            assert requests(bf.summaries_from_legs(order, config)) == live, (
                name, [leg.uuid[:8] for leg in order])
    assert "calls.forgotten" not in caplog.text


def test_attended_transfer_needs_the_rebuilt_bridge() -> None:
    """m: 102's consultation leg (originated by 101) ends up talking to the caller; only
    the bridge rebuilt from ``bridge_uuid`` lets the tracker see the transfer."""
    legs = legs_of(JSON_CDR / "m_attended_transfer")
    got = {e.call_id[:8]: e for e in bf.summaries_from_legs(legs)}
    assert set(got) == {"639babb0", "0b140142"}
    assert (got["0b140142"].user, got["0b140142"].callerid) == ("102", "79991234567")
    assert got["0b140142"].duration == 4
    assert got["0b140142"].files == (
        "/var/lib/freeswitch/recordings/dc6bd1ac-5037-4426-b77f-988b124e50c5.wav",)


def test_all_calls_in_one_directory(tmp_path: Path) -> None:
    """mod_json_cdr's directory holds every call; each gets its live summary."""
    legs = legs_of(copy_cdrs(CDR_SCENARIOS, tmp_path / "cdr"))
    expected = [e for scenario in CDR_SCENARIOS for e in live_summaries(scenario)]
    assert requests(bf.summaries_from_legs(legs)) == requests(expected)


@pytest.mark.parametrize("encoded", [True, False], ids=["encode-values", "raw-values"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_generated_cdrs_of_every_capture(scenario: str, encoded: bool, tmp_path: Path) -> None:
    """Every capture (missed calls, busy, click-to-call, internal included), with values
    URL-encoded (mod_json_cdr's default) or raw (encode-values = false)."""
    directory = generate_cdr_dir(scenario, tmp_path / scenario, encoded)
    legs = legs_of(directory)
    for config in CONFIGS.values():
        assert requests(bf.summaries_from_legs(legs, config)) == \
            requests(live_summaries(scenario, config)), config


def test_rebuilt_hangup_event_carries_what_rule_10_reads() -> None:
    leg = bf.read_cdr(JSON_CDR / "a_inbound_answered_caller_hangup" /
                      "0ed29c14-a5ce-4ae8-95ae-42f598957ff0.cdr.json")
    event = bf.hangup_event(leg)
    assert event.name == "CHANNEL_HANGUP_COMPLETE"
    assert event.uuid == "0ed29c14-a5ce-4ae8-95ae-42f598957ff0"
    assert event.get("Event-Date-Timestamp") == "1795761790741092"
    assert event.get("Call-Direction") == "outbound"
    assert event.get("Channel-Name") == "sofia/internal/101@127.0.0.1:5071"
    assert event.get("Caller-Caller-ID-Number") == "79991234567"
    assert event.get("Caller-Destination-Number") == "101"
    assert event.get("Caller-Context") == "public"
    assert event.var("dialed_user") == "101"
    assert event.var("billsec") == "3"
    assert event.var("originator") == "dda67ca4-c376-4313-a8e5-351bf5902013"
    # decoded once: the CDR's %40 is an @ for the tracker, as in the ESL event
    assert event.var("channel_name") == "sofia/internal/101@127.0.0.1:5071"


def test_recording_path_comes_from_app_log() -> None:
    leg = bf.read_cdr(JSON_CDR / "a_inbound_answered_caller_hangup" /
                      "dda67ca4-c376-4313-a8e5-351bf5902013.cdr.json")
    assert [path for _, path in leg.recordings] == [
        "/var/lib/freeswitch/recordings/dda67ca4-c376-4313-a8e5-351bf5902013.wav"]
    names = [event.name for _, _, event in bf.leg_events(leg)]
    assert names == ["RECORD_START", "RECORD_STOP", "CHANNEL_BRIDGE", "CHANNEL_HANGUP_COMPLETE"]


def test_recording_variable_is_used_when_app_log_has_none(tmp_path: Path) -> None:
    """A recording started outside the dialplan (uuid_record): the shipped dialplan's
    ``cc360_recording`` variable + ``[calls] recording_variable`` still link it."""
    directory = copy_cdrs(["j_outgoing_from_101"], tmp_path / "cdr")
    path = directory / "b4979ba4-8810-4b0f-8850-70008ca63e24.cdr.json"
    data = json.loads(path.read_text())
    del data["app_log"]
    data["variables"]["cc360_recording"] = quote("/var/lib/freeswitch/recordings/x.wav",
                                                 safe="")
    path.write_text(json.dumps(data))
    (summary,) = bf.summaries_from_legs(legs_of(directory),
                                        TrackerConfig(recording_variable="cc360_recording"))
    assert summary.files == ("/var/lib/freeswitch/recordings/x.wav",)
    (bare,) = bf.summaries_from_legs(legs_of(directory))
    assert bare.files == ()


@pytest.mark.parametrize("content,reason", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"callflow": []}', "no 'variables'"),
    (b'{"variables": {"uuid": "u1", "direction": "inbound"}}', "no end time"),
    (b'{"variables": {"end_uepoch": "1795761790741092", "direction": "inbound"}}',
     "no leg uuid"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_bad_files_are_explained(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.cdr.json"
    path.write_bytes(content)
    with pytest.raises(bf.CdrError, match=reason) as info:
        bf.read_cdr(path)
    assert "bad.cdr.json" in str(info.value)


def test_values_encoded_detection() -> None:
    assert bf.values_encoded({"a": "sofia/internal/101%40127.0.0.1", "b": "3"})
    assert not bf.values_encoded({"a": "sofia/internal/101@127.0.0.1"})
    assert not bf.values_encoded({"a": "100%"})


# --------------------------------------------------------------------------- the run


def test_backfill_enqueues_each_summary_once(tmp_path: Path, outbox: Outbox) -> None:
    directory = copy_cdrs(CDR_SCENARIOS, tmp_path / "cdr")
    state = bf.ProcessedFiles(bf.state_path_for(outbox.path))
    result = bf.backfill(directory, outbox, state=state, min_age=0)
    expected = [e for scenario in CDR_SCENARIOS for e in live_summaries(scenario)]
    files = len(list(directory.glob("*.json")))
    assert result.files_seen == result.files_read == files and not result.bad
    assert result.enqueued == len(expected) > 0 and result.duplicates == 0
    rows = list(outbox.list_rows(limit=None))
    assert {row.kind for row in rows} == {"summary"}
    assert all(row.status is OutboxStatus.pending for row in rows)
    assert sorted(row.request for row in rows) == requests(expected)
    assert sorted(r.id for r in rows) == sorted(s.id for s in result.summaries)

    # a second run: every file is remembered, nothing is read or enqueued
    again = bf.backfill(directory, outbox, state=bf.ProcessedFiles(state.path), min_age=0)
    assert (again.files_read, again.already_done, again.enqueued) == (0, files, 0)
    # even without the state file, the outbox itself prevents a second send
    fresh = bf.backfill(directory, outbox, state=None, min_age=0)
    assert fresh.files_read == files and fresh.enqueued == 0
    assert fresh.duplicates == len(expected)
    assert len(list(outbox.list_rows(limit=None))) == len(expected)


def test_a_call_the_live_service_reported_is_not_sent_again(tmp_path: Path,
                                                             outbox: Outbox) -> None:
    """The service saw the start of l (101's summary went out live) and stopped: the
    backfill sends only 102's summary."""
    live = {e.call_id[:8]: e for e in live_summaries("l_blind_transfer_101_to_102")}
    first = live["98bb708a"]
    (row_id,) = outbox.enqueue([NewItem(first.call_id, "summary", request_for(first))])
    outbox.mark_delivered(row_id, 200)
    directory = copy_cdrs(["l_blind_transfer_101_to_102"], tmp_path / "cdr")
    result = bf.backfill(directory, outbox, min_age=0)
    assert [(s.event.call_id[:8], s.status) for s in result.summaries] == [
        ("98bb708a", "duplicate"), ("d3c26172", "enqueued")]
    rows = list(outbox.list_rows(limit=None))
    assert [(r.call_key[:8], r.status.value) for r in rows] == [
        ("d3c26172", "pending"), ("98bb708a", "delivered")]


def test_dry_run_changes_nothing(tmp_path: Path, outbox: Outbox) -> None:
    directory = copy_cdrs(["a_inbound_answered_caller_hangup"], tmp_path / "cdr")
    state = bf.ProcessedFiles(bf.state_path_for(outbox.path))
    result = bf.backfill(directory, outbox, state=state, dry_run=True, min_age=0)
    assert [s.status for s in result.summaries] == ["would enqueue"]
    assert list(outbox.list_rows(limit=None)) == []
    assert not state.path.exists()
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        p.name for p in (JSON_CDR / "a_inbound_answered_caller_hangup").iterdir())


def test_a_bad_file_is_reported_once_and_skipped(tmp_path: Path, outbox: Outbox) -> None:
    directory = copy_cdrs(["a_inbound_answered_caller_hangup"], tmp_path / "cdr")
    (directory / "broken.cdr.json").write_text('{"variables": {"uuid": "x"')
    (directory / "notes.txt").write_text("not a CDR")  # not *.json: ignored
    state_path = bf.state_path_for(outbox.path)
    result = bf.backfill(directory, outbox, state=bf.ProcessedFiles(state_path), min_age=0)
    assert [name for name, _ in result.bad] == ["broken.cdr.json"]
    assert "not valid JSON" in result.bad[0][1]
    assert result.enqueued == 1  # the good files of the directory still count
    again = bf.backfill(directory, outbox, state=bf.ProcessedFiles(state_path), min_age=0)
    assert again.bad == [] and again.already_done == 3
    # fixed (the file changes): read again
    (directory / "broken.cdr.json").write_text("[]")
    third = bf.backfill(directory, outbox, state=bf.ProcessedFiles(state_path), min_age=0)
    assert [name for name, _ in third.bad] == ["broken.cdr.json"]


def test_recent_files_wait_for_the_next_run(tmp_path: Path, outbox: Outbox) -> None:
    directory = copy_cdrs(["a_inbound_answered_caller_hangup"], tmp_path / "cdr")
    ended = 1795761790.741092  # the call's end (end_uepoch)
    for path in directory.iterdir():
        os.utime(path, (ended, ended))
    state = bf.ProcessedFiles(bf.state_path_for(outbox.path))
    early = bf.backfill(directory, outbox, state=state, now=ended + 60, min_age=300)
    assert (early.too_recent, early.files_read, early.enqueued) == (2, 0, 0)
    later = bf.backfill(directory, outbox, state=bf.ProcessedFiles(state.path),
                        now=ended + 301, min_age=300)
    assert (later.too_recent, later.files_read, later.enqueued) == (0, 2, 1)


def test_state_forgets_files_that_are_gone(tmp_path: Path, outbox: Outbox) -> None:
    directory = copy_cdrs(["a_inbound_answered_caller_hangup", "j_outgoing_from_101"],
                          tmp_path / "cdr")
    state_path = bf.state_path_for(outbox.path)
    bf.backfill(directory, outbox, state=bf.ProcessedFiles(state_path), min_age=0)
    for path in (JSON_CDR / "j_outgoing_from_101").iterdir():
        (directory / path.name).unlink()  # rotated away by the admin
    bf.backfill(directory, outbox, state=bf.ProcessedFiles(state_path), min_age=0)
    saved = json.loads(state_path.read_text())
    (files,) = saved["dirs"].values()
    assert sorted(files) == sorted(p.name for p in directory.iterdir())


def test_two_backfills_never_run_at_once(tmp_path: Path) -> None:
    state = tmp_path / "o.sqlite3.backfill.json"
    with bf.state_lock(state):
        with pytest.raises(bf.BackfillBusy, match="another backfill is running"):
            with bf.state_lock(state):
                pass
    with bf.state_lock(state):  # released
        pass


def test_missing_directory_is_an_error(tmp_path: Path, outbox: Outbox) -> None:
    with pytest.raises(bf.FsCc360Error, match="does not exist"):
        bf.backfill(tmp_path / "nope", outbox)


def test_rows_are_built_like_the_service_builds_them(tmp_path: Path, outbox: Outbox) -> None:
    """With ``new_item`` (the service's, with recording links) the FILES carry URLs."""
    directory = copy_cdrs(["a_inbound_answered_caller_hangup"], tmp_path / "cdr")

    def new_item(event: CrmEvent) -> NewItem:
        request = request_for(event, lambda path: "https://pbx/rec/" + Path(path).name)
        return NewItem(event.call_id, event.kind, request, user=event.user,
                       callerid=event.callerid, event_at=event.at)

    result = bf.backfill(directory, outbox, new_item=new_item, min_age=0)
    (outcome,) = result.summaries
    row = outbox.get(outcome.id)
    assert row is not None and row.event_at == pytest.approx(1795761790.741092)
    assert CrmRequest.from_json(row.request).body == {
        "FILES": ["https://pbx/rec/dda67ca4-c376-4313-a8e5-351bf5902013.wav"]}
    assert time.time() > row.created_at  # enqueued now, due now


def test_a_leg_waits_for_its_partners_cdr(tmp_path: Path, outbox: Outbox) -> None:
    """l: 101's leg ended, the caller still talks to 102 (no caller CDR yet). Sent alone,
    101's summary would lack the recording (it is on the caller's leg): it waits."""
    scenario = JSON_CDR / "l_blind_transfer_101_to_102"
    directory = tmp_path / "cdr"
    directory.mkdir()
    first = "98bb708a-2788-4008-9fd8-2137cc7606e4.cdr.json"
    shutil.copy(scenario / first, directory / first)
    ended = bf.read_cdr(scenario / first).end_us / 1e6
    os.utime(directory / first, (ended, ended))  # written when the leg ended
    state = bf.ProcessedFiles(bf.state_path_for(outbox.path))
    early = bf.backfill(directory, outbox, state=state, min_age=0, now=ended + 600)
    assert (early.waiting, early.files_read, early.enqueued) == (1, 0, 0)
    assert not state.seen(directory, first, (directory / first).stat())  # read again later
    for path in scenario.iterdir():
        shutil.copy(path, directory / path.name)
        os.utime(directory / path.name, (ended + 10, ended + 10))
    later = bf.backfill(directory, outbox, state=bf.ProcessedFiles(state.path), min_age=0,
                        now=ended + 900)
    assert later.waiting == 0 and later.enqueued == 2
    summary = next(s.event for s in later.summaries if s.event.call_id.startswith("98bb"))
    assert summary.files == (
        "/var/lib/freeswitch/recordings/4ddb0120-5714-41ff-a0d6-a70b86ea9bc5.wav",)


def test_a_leg_whose_partner_never_comes_is_sent_alone_after_a_while(
        tmp_path: Path, outbox: Outbox) -> None:
    directory = tmp_path / "cdr"
    directory.mkdir()
    name = "98bb708a-2788-4008-9fd8-2137cc7606e4.cdr.json"
    shutil.copy(JSON_CDR / "l_blind_transfer_101_to_102" / name, directory / name)
    ended = bf.read_cdr(directory / name).end_us / 1e6
    os.utime(directory / name, (ended, ended))
    result = bf.backfill(directory, outbox, min_age=0, now=ended + bf.PARTNER_WAIT + 1)
    (outcome,) = result.summaries
    assert (outcome.event.user, outcome.event.duration, outcome.event.files) == ("101", 2, ())


def test_hold_back_follows_chains() -> None:
    leg = bf.read_cdr(JSON_CDR / "l_blind_transfer_101_to_102" /
                      "d3c26172-8ca5-449f-8098-c4faf41b751d.cdr.json")
    caller = bf.read_cdr(JSON_CDR / "l_blind_transfer_101_to_102" /
                         "4ddb0120-5714-41ff-a0d6-a70b86ea9bc5.cdr.json")
    # the caller's own partner (d3c26172) is there; d3c26172's originator is the caller
    ready, held = bf.hold_back([leg, caller], set(), wait_until=0)
    assert {x.uuid[:8] for x in ready} == {"d3c26172", "4ddb0120"} and held == []
    # without the caller, d3c26172 waits; a leg handled by an earlier run counts as there
    ready, held = bf.hold_back([leg], set(), wait_until=0)
    assert ready == [] and [x.uuid[:8] for x in held] == ["d3c26172"]
    ready, held = bf.hold_back([leg], {caller.uuid}, wait_until=0)
    assert [x.uuid[:8] for x in ready] == ["d3c26172"]


def test_calls_older_than_max_age_are_skipped(tmp_path: Path, outbox: Outbox) -> None:
    directory = copy_cdrs(["a_inbound_answered_caller_hangup"], tmp_path / "cdr")
    ended = 1795761790.741092
    result = bf.backfill(directory, outbox, min_age=0, max_age=7 * 86400,
                         now=ended + 8 * 86400)
    assert (result.too_old, result.files_read, result.enqueued) == (2, 0, 0)


def test_a_file_gone_before_its_turn_is_reported(tmp_path: Path) -> None:
    """Headers are read again when a leg's turn comes (memory holds only the calls in
    progress at one moment); a file deleted meanwhile is reported, not fatal."""
    directory = copy_cdrs(["a_inbound_answered_caller_hangup"], tmp_path / "cdr")
    legs = [leg.light() for leg in legs_of(directory)]
    assert all(leg.headers == "" for leg in legs)
    assert requests(bf.summaries_from_legs(legs)) == requests(
        live_summaries("a_inbound_answered_caller_hangup"))
    (directory / "dda67ca4-c376-4313-a8e5-351bf5902013.cdr.json").unlink()
    errors: list[str] = []
    bf.summaries_from_legs(legs, on_error=lambda leg, exc: errors.append(str(exc)))
    assert len(errors) == 1 and "dda67ca4" in errors[0]
