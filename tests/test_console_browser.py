"""The operator console in a real headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium), against the whole service on loopback: fake FreeSWITCH, fake CC360.

A person logs in, reads the overview (its numbers are those of ``outbox stats --json``),
finds a call by the caller's number and reads its timeline, and sends a dead row again
and sees the CRM get it. Without the browser packages these tests fail, saying how to
install them (``scripts/test`` does it when run as root): never a silent skip.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from selenium.webdriver.common.by import By

from fs_cc360 import console as console_module
from fs_cc360.cli import main
from fs_cc360.outbox import OutboxStatus
from fs_cc360.simulators import wait_until
from tests.console_stack import (
    ADMIN_TOKEN,
    ConsoleStack,
    chromium,
    chromium_paths,
    console_stack,
    log_in,
    secrets_of_the_stack,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleStack]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(console_module, "FAILED_LOGIN_DELAY", 0.0)
        with console_stack(tmp_path_factory.mktemp("console")) as running:
            yield running


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    chromium_paths()  # a failure naming the missing packages, before anything else
    browser = chromium(1280, 900)
    try:
        yield browser
    finally:
        browser.quit()


def new_call_ids(stack: ConsoleStack, play: Any, events: int) -> set[str]:
    """Run ``play()``, wait for ``events`` more CRM requests; the call ids that appeared."""
    before = {e.params["id"] for e in stack.crm.events(accepted_only=False)}
    count = len(stack.crm.events(accepted_only=False))
    play()
    stack.settle(count + events)
    return {e.params["id"] for e in stack.crm.events(accepted_only=False)} - before


def page_counts(driver: Any) -> dict[str, int]:
    return {cell.get_attribute("data-count"): int(cell.text)
            for cell in driver.find_elements(By.CSS_SELECTOR, "#counts td[data-count]")}


def test_log_in_with_the_form(stack: ConsoleStack, driver: Any) -> None:
    driver.delete_all_cookies()
    driver.get(stack.ui)
    assert driver.current_url.endswith("/ui/login")
    field = driver.find_element(By.ID, "token")
    field.send_keys("not-the-admin-token")
    driver.find_element(By.ID, "login").click()
    wait_for(lambda: driver.find_element(By.ID, "login-error").text == "Wrong token.")
    assert driver.get_cookie("fs_cc360_console") is None

    log_in(driver, stack)
    assert driver.current_url == stack.ui
    assert driver.find_element(By.TAG_NAME, "h1").text == "Overview"
    cookie = driver.get_cookie("fs_cc360_console")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/ui/" and ADMIN_TOKEN not in cookie["value"]
    assert driver.execute_script("return document.cookie") == ""  # out of scripts' reach
    assert ADMIN_TOKEN not in driver.current_url


def test_overview_numbers_are_those_of_outbox_stats(
        stack: ConsoleStack, driver: Any, capsys: pytest.CaptureFixture[str]) -> None:
    new_call_ids(stack, lambda: stack.play("h_ring_group_102_answers", 41), 6)
    stack.crm.reject_all(404)
    new_call_ids(stack, lambda: stack.play("j_outgoing_from_101", 42), 1)
    stack.crm.reject_all(None)

    code = main(["--config", str(stack.cli_config), "outbox", "stats", "--json"])
    stats = json.loads(capsys.readouterr().out)
    assert code == 1 and stats["health"]["state"] == "dead_rows"

    log_in(driver, stack)
    driver.get(stack.ui)
    shown = page_counts(driver)
    assert shown["total"] == stats["total"]
    for status, count in stats["counts"].items():
        assert shown[status] == count, status
    for entry in stats["by_kind"]:
        assert shown[f"{entry['status']}/{entry['kind']}"] == entry["count"], entry
    assert shown["dead"] >= 1
    verdict = driver.find_element(By.ID, "verdict")
    assert verdict.get_attribute("data-health") == "dead_rows"
    assert verdict.text == stats["health"]["message"]
    assert driver.find_element(By.CSS_SELECTOR, "#esl .big").text == "connected"
    assert driver.find_element(By.CSS_SELECTOR, "#crm .big").text == "up"
    delivered = int(driver.find_element(By.ID, "delivered-hour").text)
    assert delivered == stats["counts"]["delivered"]  # every row was delivered just now
    bars = driver.find_elements(By.CSS_SELECTOR, "#chart rect.bar")
    assert len(bars) == 60 and sum(int(b.get_attribute("data-count")) for b in bars) \
        == delivered

    # it refreshes by itself: new traffic shows without reloading the page
    marker = driver.execute_script("document.body.dataset.marker = 'same page'; "
                                   "return document.body.dataset.marker")
    new_call_ids(stack, lambda: stack.play("a_inbound_answered_caller_hangup", 43), 4)
    # what the timer does every 10 s, done now (a tab coming back to the front)
    driver.execute_script("document.dispatchEvent(new Event('visibilitychange'))")
    wait_for(lambda: page_counts(driver)["total"] == stats["total"] + 4)
    assert driver.execute_script("return document.body.dataset.marker") == marker


def test_find_a_call_by_number_and_read_its_timeline(stack: ConsoleStack,
                                                      driver: Any) -> None:
    (call,) = new_call_ids(stack, lambda: stack.play("a_inbound_answered_caller_hangup", 44),
                           4)
    log_in(driver, stack)
    driver.get(stack.ui)
    driver.find_element(By.LINK_TEXT, "Calls").click()
    wait_for(lambda: driver.find_element(By.ID, "q"))
    driver.find_element(By.ID, "q").send_keys("+7 (999) 123-45-67")
    driver.find_element(By.CSS_SELECTOR, "#by option[value=number]").click()
    driver.find_element(By.ID, "search").click()
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#calls tbody tr"))
    first = driver.find_element(By.CSS_SELECTOR, "#calls tbody tr")
    assert "79991234567" in first.text and "101" in first.text  # newest call first
    first.find_element(By.CSS_SELECTOR, f"a[href='/ui/calls/{call}']").click()
    wait_for(lambda: driver.find_element(By.ID, "timeline"))

    events = driver.find_elements(By.CSS_SELECTOR, "#timeline li.event")
    assert [e.get_attribute("data-kind") for e in events] == ["ringing", "answer", "hangup",
                                                              "summary"]
    assert {e.get_attribute("data-status") for e in events} == {"delivered"}
    for event in events:
        attempts = event.find_elements(By.CSS_SELECTOR, "li.attempt")
        assert [a.get_attribute("data-outcome") for a in attempts] == ["delivered"]
        assert "HTTP 200" in attempts[0].text
        assert "/OmniWhoCallsService/***/" in event.find_element(By.CSS_SELECTOR, ".url").text
    assert driver.find_element(By.ID, "call-agent").text == "101"
    assert driver.find_element(By.ID, "call-caller").text == "79991234567"
    assert driver.find_element(By.ID, "call-summary").text.startswith("incoming, ")
    links = events[-1].find_elements(By.CSS_SELECTOR, ".files li")
    assert links and all("/***/recording/" in link.text for link in links)
    for secret in secrets_of_the_stack():
        assert secret not in driver.page_source


def test_send_a_dead_row_again_and_see_it_delivered(stack: ConsoleStack, driver: Any) -> None:
    stack.crm.reject_all(404)
    (call,) = new_call_ids(stack, lambda: stack.play("a_inbound_answered_caller_hangup", 45),
                           4)
    stack.crm.reject_all(None)  # the cause is fixed
    rows = {row.kind: row for row in stack.service.outbox.list_rows(call_key=call)}
    assert {row.status for row in rows.values()} == {OutboxStatus.dead}

    log_in(driver, stack)
    driver.get(stack.base + "/ui/dead")
    summary = rows["summary"]
    driver.find_element(By.CSS_SELECTOR, f"#dead-{summary.id} button.again").click()
    wait_for(lambda: driver.find_element(By.ID, "flash").text.startswith("Sent again: 1 row"))
    assert wait_until(lambda: any(e.params["id"] == call and "event" in e.params
                                  for e in stack.crm.events()), 10)
    assert not driver.find_elements(By.ID, f"dead-{summary.id}")  # no longer dead

    # the rest of the call: a selection
    for kind in ("ringing", "answer", "hangup"):
        driver.find_element(By.CSS_SELECTOR,
                            f"#dead-{rows[kind].id} input.pick").click()
    driver.find_element(By.ID, "send-selected").click()
    wait_for(lambda: driver.find_element(By.ID, "flash").text.startswith("Sent again: 3 rows"))
    assert wait_until(lambda: [e.params.get("eventName") for e in stack.crm.events()
                               if e.params["id"] == call and "eventName" in e.params]
                      == ["ringing", "answer", "hangup"], 10)

    driver.get(stack.base + f"/ui/calls/{call}")
    wait_for(lambda: driver.find_element(By.ID, "timeline"))
    event = driver.find_element(By.ID, f"row-{summary.id}")
    assert event.get_attribute("data-status") == "delivered"
    outcomes = [a.get_attribute("data-outcome")
                for a in event.find_elements(By.CSS_SELECTOR, "li.attempt")]
    assert outcomes == ["dead", "requeued", "delivered"]
    assert "HTTP 404" in event.text and "HTTP 200" in event.text


def test_readable_on_a_phone(stack: ConsoleStack, driver: Any) -> None:
    log_in(driver, stack)
    driver.set_window_size(390, 844)
    try:
        for path in ("/ui/", "/ui/calls?q=79991234567", "/ui/dead"):
            driver.get(stack.base + path)
            wait_for(lambda: driver.find_element(By.TAG_NAME, "h1"))
            width = driver.execute_script("return document.documentElement.clientWidth")
            scroll = driver.execute_script("return document.documentElement.scrollWidth")
            assert scroll <= width, (path, scroll, width)  # nothing wider than the screen
            font = driver.execute_script(
                "return parseFloat(getComputedStyle(document.body).fontSize)")
            assert font >= 14, path
    finally:
        driver.set_window_size(1280, 900)
