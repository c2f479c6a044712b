"""The exemption pages in a real headless browser: request, approve, limit applied."""

from __future__ import annotations

import base64
import datetime
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThread

from policyd.servers.policy import PolicyServer
from tests.harness.browser import chromium, press
from tests.unit.web.test_admin import base, send, start_http_server, token

reactor: Any = _reactor


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Path) -> AsyncIterator[PolicyServer]:
    """A policy server (limit 3) with its HTTP listener."""
    running = await start_http_server(tmp_path, "carol@example.org")
    yield running
    await running.stop()


def local(moment: datetime.datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%dT%H:%M")


def submit_request(url: str) -> str:
    """Fill the form as a user would and return the confirmation text."""
    from selenium.webdriver.common.by import By

    now = datetime.datetime.now(datetime.UTC)
    with chromium() as browser:
        browser.get(f"{url}/exemption")
        assert browser.find_element(By.TAG_NAME, "h1").text == "Request a bulk-send exemption"
        browser.find_element(By.ID, "account").send_keys("carol@example.org")
        browser.find_element(By.ID, "organisation").send_keys("Alumni office")
        for field, moment in (("start", now - datetime.timedelta(minutes=5)), ("end", now + datetime.timedelta(hours=2))):
            browser.execute_script("document.getElementById(arguments[0]).value = arguments[1]", field, local(moment))
        browser.find_element(By.ID, "limit").send_keys("6")
        browser.find_element(By.ID, "reason").send_keys("Reunion invitations to former students")
        press(browser, browser.find_element(By.CSS_SELECTOR, "button[type=submit]"))
        return str(browser.find_element(By.CSS_SELECTOR, "[role=status]").text)


def approve_as_admin(url: str, secret: str) -> tuple[str, str]:
    """Open the admin page with the token, check the request is pending, approve it."""
    from selenium.webdriver.common.by import By

    credentials = base64.b64encode(f"jane:{secret}".encode()).decode()
    with chromium(headers={"Authorization": f"Basic {credentials}"}) as browser:
        browser.get(f"{url}/admin")
        listed = str(browser.find_element(By.TAG_NAME, "table").text)
        press(browser, "approve-1")
        return listed, str(browser.find_element(By.CSS_SELECTOR, "[role=status]").text)


@pytest_twisted.ensureDeferred
async def test_request_approve_and_limit_applied(server: PolicyServer) -> None:
    """A user asks in the browser; the admin sees it pending and approves; the account gets the higher limit."""
    url = base(server)
    confirmation = await deferToThread(submit_request, url)
    assert "Your request for carol@example.org (6 messages an hour" in confirmation
    listed, status = await deferToThread(approve_as_admin, url, token(server))
    assert "carol@example.org" in listed and "Reunion invitations" in listed
    assert status == "Request 1 for carol@example.org: approved."
    assert await send(server, "carol@example.org", 7) == ["DUNNO"] * 6 + ["REJECT"]
