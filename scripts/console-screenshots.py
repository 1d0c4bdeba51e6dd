#!/usr/bin/env python3
"""Screenshots of the operator console for docs/ (README "Watching it").

Starts the whole service on loopback (fake FreeSWITCH, fake CC360, an hour of past
traffic made through the Outbox API), plays a few real captures, makes one call's rows
dead (the fake CRM refuses them), then photographs the three views in a real headless
Chromium (Debian's chromium + chromium-driver, as the browser tests use):

    docs/console-overview.png   docs/console-call.png   docs/console-dead.png
    docs/console-phone.png      (the overview 390 px wide)

Usage: .venv/bin/python scripts/console-screenshots.py [--out docs]
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import base64  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from selenium.webdriver.common.by import By  # noqa: E402

from tests.console_stack import (  # noqa: E402
    chromium,
    console_stack,
    log_in,
    seed_history,
    wait_for,
)
from tests.test_calls import CALLER  # noqa: E402


def full_page(driver, path: Path) -> None:
    """The whole page, beyond the window (Chromium's own capture, through CDP)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 4000),
                 "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        seed_history(str(tmp / "outbox.sqlite3"), time.time())
        with console_stack(tmp) as stack:
            expected = 0
            for seed, scenario in enumerate(("a_inbound_answered_caller_hangup",
                                             "h_ring_group_102_answers",
                                             "j_outgoing_from_101")):
                stack.play(scenario, seed + 1)
            expected = 4 + 6 + 1
            stack.settle(expected)
            stack.crm.reject_all(404)  # an agent the CRM does not know: rows die
            stack.play("a_inbound_answered_caller_hangup", 9)
            stack.settle(expected + 4)
            stack.crm.reject_all(None)

            driver = chromium(1280, 900)
            try:
                log_in(driver, stack)
                wait_for(lambda: driver.find_element(By.ID, "counts"))
                full_page(driver, args.out / "console-overview.png")

                driver.get(stack.base + "/ui/dead")
                wait_for(lambda: driver.find_element(By.ID, "dead"))
                for pick in driver.find_elements(By.CSS_SELECTOR, "input.pick")[:2]:
                    pick.click()
                full_page(driver, args.out / "console-dead.png")

                # find the dead call by its number, send its summary again from its
                # timeline, and photograph the story: refused, sent again, delivered
                driver.get(stack.base + "/ui/calls?q=%2B7+999+123-45-67&by=number")
                driver.find_element(By.CSS_SELECTOR, "#calls tbody tr a").click()
                wait_for(lambda: driver.find_element(By.ID, "timeline"))
                summary = driver.find_element(By.CSS_SELECTOR, "li.event[data-kind=summary]")
                summary.find_element(By.CSS_SELECTOR, "button.again").click()
                wait_for(lambda: driver.find_element(By.ID, "flash"))
                stack.settle(expected + 5)
                driver.refresh()
                wait_for(lambda: driver.find_element(
                    By.CSS_SELECTOR, "li.event[data-kind=summary][data-status=delivered]"))
                full_page(driver, args.out / "console-call.png")

                driver.set_window_size(390, 844)
                driver.get(stack.ui)
                wait_for(lambda: driver.find_element(By.ID, "counts"))
                full_page(driver, args.out / "console-phone.png")
            finally:
                driver.quit()
    print(f"caller number searched: {CALLER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
