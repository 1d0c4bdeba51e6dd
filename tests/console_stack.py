"""A running service with the operator console, and a real headless Chromium to drive it.

Shared by tests/test_console.py, tests/test_console_browser.py and
scripts/console-screenshots.py. Everything listens on 127.0.0.1 (ephemeral ports): the
fake FreeSWITCH, the fake CC360 and the service's web API; Chromium is told to resolve
no other host, so a page can never reach beyond loopback.

The browser is Debian's ``chromium`` + ``chromium-driver`` driven by Selenium, both paths
given explicitly so Selenium never tries to download a driver. Missing packages are a
test *failure* naming the fix, never a skip: ``scripts/test`` installs them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fs_cc360.calls import CrmEvent
from fs_cc360.crm_request import request_for
from fs_cc360.outbox import NewItem, Outbox
from fs_cc360.service import Service
from fs_cc360.simulators import wait_until
from fs_cc360.simulators.crm import FakeCrm
from tests.fakes.captures import capture_frames, remap, shift_to_now
from tests.fakes.esl import FakeFreeSwitch
from tests.test_pipeline import CRM_TOKEN, WEB_TOKEN, drained, pipeline

ADMIN_TOKEN = "console-admin-token-0123456789"
CRM_PASSWORD = "secret"  # tests.test_pipeline's [crm] password
INSTALL_HINT = ("the browser tests need Debian's chromium and chromium-driver packages: "
                "apt-get update && apt-get install -y chromium chromium-driver "
                "(scripts/test does it when run as root)")


@dataclass
class ConsoleStack:
    service: Service
    fs: FakeFreeSwitch
    crm: FakeCrm
    base: str  #: http://127.0.0.1:PORT
    cli_config: Path  #: an INI for ``fs-cc360 outbox ...`` on the same outbox

    @property
    def ui(self) -> str:
        return self.base + "/ui/"

    def play(self, scenario: str, seed: int) -> None:
        """Replay one capture under fresh call ids (``seed``), its last event stamped now
        (so FreeSWITCH's clock looks in step with ours, as on a healthy PBX)."""
        frames = remap(capture_frames(scenario), seed)
        now = time.time()
        stamps = [int(m) for body in shift_to_now(frames, now)
                  for m in re.findall(rb"Event-Date-Timestamp: (\d+)", body)]
        span = (max(stamps) / 1e6 - now) if stamps else 0.0
        self.fs.push_events(shift_to_now(frames, now - span))

    def settle(self, events: int, timeout: float = 15.0) -> None:
        """Wait until the CRM has ``events`` requests and nothing is left to send."""
        assert wait_until(lambda: len(self.crm.events(accepted_only=False)) >= events
                          and drained(self.service), timeout), "the pipeline did not settle"


@contextlib.contextmanager
def console_stack(tmp: Path, **extra: dict) -> Iterator[ConsoleStack]:
    """The full service (fake FreeSWITCH and CRM) with ``[webapi] admin_token`` set."""
    sections = {"webapi": {"admin_token": ADMIN_TOKEN},
                "delivery": {"max_rejections": "1"}}
    for section, keys in extra.items():
        sections.setdefault(section, {}).update(keys)
    with pipeline(tmp, **sections) as (service, fs, crm):
        assert service.web_server is not None
        cli_config = tmp / "cli.ini"
        cli_config.write_text(f"[outbox]\ndatabase = {service.outbox.path}\n\n"
                              "[webapi]\nenabled = false\n")
        yield ConsoleStack(service, fs, crm, f"http://127.0.0.1:{service.web_server.server_port}",
                           cli_config)


def secrets_of_the_stack() -> list[str]:
    """Values that must never appear in a page."""
    return [ADMIN_TOKEN, CRM_TOKEN, WEB_TOKEN, CRM_PASSWORD + "@", "recording-secret-for-tests"]


def seed_history(database: str, now: float, *, minutes: int = 60, seed: int = 1) -> None:
    """An hour of past traffic through the Outbox API (no SQL): calls delivered at
    varying rates, a few rows expired and one dead, so the overview has something to
    show. Row contents are the real requests of the fixture calls."""
    import random

    rng = random.Random(seed)
    box = Outbox(database)
    try:
        for minute in range(minutes, 0, -1):
            calls = max(0, int(6 + 5 * rng.random() + 4 * (minute % 17 == 0)
                               - (minute % 23 == 0) * 6))
            for n in range(calls):
                at = now - minute * 60 + n * (55 / max(1, calls))
                key = f"hist-{minute:03d}-{n}"
                user = str(101 + rng.randrange(4))
                caller = f"7999{rng.randrange(10**7):07d}"
                talk = rng.randrange(5, 400)
                items = [NewItem(key, kind, request_for(CrmEvent(
                    kind, key, user, caller, at, direction="incoming", duration=talk)),
                    user=user, callerid=caller, event_at=at)
                    for kind in ("ringing", "answer", "hangup", "summary")]
                ids = box.enqueue(items, now=at)
                for row_id in ids[:-1]:
                    if rng.random() < 0.01:
                        box.mark_expired(row_id, now=at + 130)
                    else:
                        box.mark_delivered(row_id, 200, now=at + 0.05)
                box.mark_delivered(ids[-1], 200, now=at + 8)
    finally:
        box.close()


# --------------------------------------------------------------------------- browser


def chromium_paths() -> tuple[str, str]:
    """Debian's chromium and chromedriver, or a test failure saying how to install them."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.fail(f"chromium={browser} chromedriver={driver}: {INSTALL_HINT}", pytrace=False)
    return browser, driver


def chromium(width: int = 1280, height: int = 900):  # -> selenium.webdriver.Chrome
    """A headless Chromium (Selenium), confined to loopback."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    browser, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new", f"--window-size={width},{height}", "--no-sandbox",
        "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--no-default-browser-check", "--disable-extensions", "--disable-sync",
        "--disable-background-networking", "--disable-component-update",
        "--disable-default-apps", "--disable-features=Translate,OptimizationHints,MediaRouter",
        "--metrics-recording-only", "--password-store=basic", "--hide-scrollbars",
        # nothing but loopback, whatever a page or the browser itself asks for
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--proxy-server=direct://", "--proxy-bypass-list=*",
    ):
        options.add_argument(argument)
    os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager: no telemetry
    log_path = os.devnull
    return webdriver.Chrome(options=options,
                            service=DriverService(executable_path=driver, log_output=log_path))


def log_in(driver, stack: ConsoleStack, token: str = ADMIN_TOKEN) -> None:
    """Submit the login form like a person (never a token in a URL)."""
    from selenium.webdriver.common.by import By

    driver.get(stack.ui)
    if "/ui/login" not in driver.current_url:
        return  # still logged in
    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "login").click()
    wait_for(lambda: "/ui/login" not in driver.current_url or
             driver.find_elements(By.ID, "login-error"))


def wait_for(predicate, timeout: float = 10.0) -> None:
    """Poll a page condition (bounded); fails the test when it never holds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except Exception:  # an element replaced under us by the refresh: look again
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the page never got there")
        time.sleep(0.05)
