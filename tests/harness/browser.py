"""A real headless Chromium (Debian's chromium and chromium-driver) for page tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@contextmanager
def chromium(headers: dict[str, str] | None = None) -> Iterator[Any]:
    """A headless Chromium driven by WebDriver; fails loudly when it is not installed.

    :param headers: sent with every request (``Accept-Language``, ``Authorization``).
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            raise AssertionError(f"{path} is missing: `make test` installs chromium and chromium-driver")
    profile = tempfile.mkdtemp(prefix="policyd-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=420,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        if headers:
            driver.execute_cdp_cmd("Network.enable", {})
            driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": headers})
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def press(browser: Any, button: Any = "submit") -> None:
    """Click a button (an element, or its id) and wait until the page it leads to has replaced this one."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    if isinstance(button, str):
        button = browser.find_element(By.ID, button)
    button.click()

    def replaced(_: Any) -> bool:
        # Chromium reports a node of the page just replaced either as stale or,
        # while the new page is being attached, as "not in the document".
        try:
            button.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as error:
            if "does not belong to the document" in str(error):
                return True
            raise
        return False

    WebDriverWait(browser, 15).until(replaced)
    WebDriverWait(browser, 15).until(lambda b: b.execute_script("return document.readyState") == "complete")


#: Where screenshots go: the docs/ folder when POLICYD_UPDATE_DOCS is set (to
#: refresh the pictures the documentation shows), else a scratch directory,
#: so a test run leaves the tracked pictures alone.
DOCS = (
    Path(__file__).resolve().parents[2] / "docs"
    if os.environ.get("POLICYD_UPDATE_DOCS")
    else Path(tempfile.mkdtemp(prefix="policyd-screenshots-"))
)


def shoot(browser: Any, path: Path, width: int = 420) -> None:
    """A screenshot of the whole page, ``width`` pixels wide (phone width by default), as tall as the page."""
    metrics = {"width": width, "height": 100, "deviceScaleFactor": 1, "mobile": False}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    height = int(browser.execute_script("return document.documentElement.scrollHeight"))
    metrics["height"] = min(max(height, 400), 2400)
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(path)), path
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
