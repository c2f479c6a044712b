"""The web pages in a real headless browser: request, approve, limit applied; every page in both languages.

With ``POLICYD_UPDATE_DOCS=1`` the screenshots of every page, in English
and in French, are written to ``docs/`` (``docs/web.md`` shows them);
otherwise to a scratch directory.
"""

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
from policyd.store import Quarantined
from tests.conftest import make_config
from tests.harness.browser import DOCS, chromium, press, shoot
from tests.harness.smtp_sink import SmtpSink
from tests.unit.web.test_admin import base, send, start_http_server, token
from tests.unit.web.test_selfservice import SPAM

reactor: Any = _reactor

#: Wide enough for the admin page's table.
DESKTOP = 1100


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Path) -> AsyncIterator[PolicyServer]:
    """A policy server (limit 3) with its HTTP listener."""
    running = await start_http_server(tmp_path, "carol@example.org")
    yield running
    await running.stop()


def local(moment: datetime.datetime) -> str:
    return moment.astimezone().strftime("%Y-%m-%dT%H:%M")


def fill(browser: Any, start: datetime.datetime, end: datetime.datetime, limit: str) -> None:
    """Fill the exemption form as carol would."""
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "account").send_keys("carol@example.org")
    browser.find_element(By.ID, "organisation").send_keys("Alumni office")
    for field, moment in (("start", start), ("end", end)):
        browser.execute_script("document.getElementById(arguments[0]).value = arguments[1]", field, local(moment))
    browser.find_element(By.ID, "limit").send_keys(limit)
    browser.find_element(By.ID, "reason").send_keys("Reunion invitations to former students")


def submit_request(url: str) -> str:
    """Fill the form as a user would and return the confirmation text."""
    from selenium.webdriver.common.by import By

    now = datetime.datetime.now(datetime.UTC)
    with chromium(headers={"Accept-Language": "en"}) as browser:
        browser.get(f"{url}/exemption")
        assert browser.find_element(By.TAG_NAME, "h1").text == "Request a bulk-send exemption"
        fill(browser, now - datetime.timedelta(minutes=5), now + datetime.timedelta(hours=2), "6")
        press(browser, browser.find_element(By.CSS_SELECTOR, "button[type=submit]"))
        return str(browser.find_element(By.CSS_SELECTOR, "[role=status]").text)


def approve_as_admin(url: str, secret: str) -> tuple[str, str, str]:
    """Open the admin page with the token, check the request is pending, approve it by the button's name."""
    from selenium.webdriver.common.by import By

    credentials = base64.b64encode(f"jane:{secret}".encode()).decode()
    with chromium(headers={"Authorization": f"Basic {credentials}", "Accept-Language": "en"}) as browser:
        browser.get(f"{url}/admin")
        listed = str(browser.find_element(By.TAG_NAME, "table").text)
        button = browser.find_element(By.CSS_SELECTOR, "button[aria-label='Approve request #1 (carol@example.org)']")
        name = str(button.accessible_name)
        press(browser, button)
        return listed, name, str(browser.find_element(By.CSS_SELECTOR, "[role=status]").text)


@pytest_twisted.ensureDeferred
async def test_request_approve_and_limit_applied(server: PolicyServer) -> None:
    """A user asks in the browser; the admin sees it pending and approves; the account gets the higher limit."""
    url = base(server)
    confirmation = await deferToThread(submit_request, url)
    assert "Your request for carol@example.org (6 external recipients per hour" in confirmation
    listed, name, status = await deferToThread(approve_as_admin, url, token(server))
    assert "carol@example.org" in listed and "Reunion invitations" in listed and "web, claiming carol" in listed
    assert name == "Approve request #1 (carol@example.org)"
    assert status == "Request 1 for carol@example.org: approved."
    assert await send(server, "carol@example.org", 7) == ["DUNNO"] * 6 + ["REJECT"]


# --- every page, in English and in French ---------------------------------------------


@pytest_twisted.async_yield_fixture
async def site(tmp_path: Path) -> AsyncIterator[tuple[PolicyServer, SmtpSink]]:
    """A server with accounts, the self-service pages, and releases going to a recording SMTP sink."""
    sink = SmtpSink().start()
    (tmp_path / "accounts").write_text("carol@example.org\n", encoding="utf-8")
    config = make_config(
        'listen:\n  policy: "tcp:0:interface=127.0.0.1"\n  http: "tcp:0:interface=127.0.0.1"\n'
        f'store:\n  url: "sqlite:///{tmp_path}/state.db"\n'
        f"accounts: {tmp_path}/accounts\nlocal_domains: [example.org]\noutbound:\n  limit: 500\n"
        f"quarantine:\n  default: quarantine\n  smtp: '127.0.0.1:{sink.port}'\n"
    )
    running = PolicyServer(reactor, config)
    await running.start()
    try:
        yield running, sink
    finally:
        await running.stop()
        sink.stop()


def tour(url: str, secret: str, language: str, release: str, preference: str) -> dict[str, str]:
    """Every page in ``language``, each shot into DOCS as ``NAME-LANGUAGE.png``; returns each page's heading."""
    from selenium.webdriver.common.by import By

    seen: dict[str, str] = {}
    credentials = base64.b64encode(f"jane:{secret}".encode()).decode()
    now = datetime.datetime.now(datetime.UTC)

    def look(browser: Any, name: str, width: int = 420) -> None:
        assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == language, name
        seen[name] = str(browser.find_element(By.TAG_NAME, "h1").text)
        shoot(browser, DOCS / f"{name}-{language}.png", width)

    headers = {"Accept-Language": language, "Authorization": f"Basic {credentials}"}
    with chromium(headers=headers) as browser:
        browser.get(f"{url}/")
        look(browser, "index", DESKTOP)
        browser.get(f"{url}/exemption")
        look(browser, "exemption")
        # The browser checks what it can; these pass it and are refused by the server.
        fill(browser, now + datetime.timedelta(hours=3), now + datetime.timedelta(hours=1), "2000")
        press(browser, browser.find_element(By.CSS_SELECTOR, "button[type=submit]"))
        seen["errors"] = str(browser.find_element(By.ID, "end-error").text)
        look(browser, "exemption-errors")
        browser.get(f"{url}/exemption")
        fill(browser, now + datetime.timedelta(hours=1), now + datetime.timedelta(hours=9), "2000")
        press(browser, browser.find_element(By.CSS_SELECTOR, "button[type=submit]"))
        look(browser, "exemption-received")
        browser.get(f"{url}/admin")
        look(browser, "admin", DESKTOP)
        browser.get(release)
        look(browser, "release")
        press(browser)
        look(browser, "release-done")
        browser.get(preference)
        look(browser, "preference")
        browser.get(release[:-4] + "AAAA")
        look(browser, "link-invalid")
    return seen


@pytest_twisted.ensureDeferred
async def test_every_page_in_both_languages(site: tuple[PolicyServer, SmtpSink]) -> None:
    """Index, form (empty, refused, received), admin page and self-service pages render in English and French."""
    server, sink = site
    headings: dict[str, dict[str, str]] = {}
    for language in ("en", "fr"):
        now = reactor.seconds()
        held = await server.store.quarantine(
            Quarantined(0, "carol@example.org", "winner@example.net", "Gagnez un <iPhone>", 9.5, now - 60,
                        now + 86400, len(SPAM), "192.0.2.7", "4XyZ1"), SPAM)
        signer = server.self_service.signer
        pages = f"{base(server)}/self-service"
        headings[language] = await deferToThread(
            tour, base(server), token(server), language, f"{pages}/release/{signer.release(held)}",
            f"{pages}/preference/{signer.preference('carol@example.org')}")
    assert headings["en"] == {
        "index": "policyd", "exemption": "Request a bulk-send exemption", "exemption-errors":
        "Request a bulk-send exemption", "errors": "The end must be after the start.", "exemption-received": "Request received", "admin": "Pending exemption requests",
        "release": "A message held for you", "release-done": "Message released",
        "preference": "Spam: inbox or quarantine", "link-invalid": "This link is not valid",
    }
    assert headings["fr"]["exemption"] == "Demander une dérogation pour un envoi en nombre"
    assert headings["fr"]["admin"] == "Demandes de dérogation en attente"
    assert headings["fr"]["release-done"] == "Message libéré"
    assert headings["fr"]["link-invalid"] == "Ce lien n'est pas valide"
    assert len(sink.wait_for(lambda found: len(found) >= 2, timeout=10)) == 2
    for name in headings["en"]:
        if name != "errors":
            for language in ("en", "fr"):
                assert (DOCS / f"{name}-{language}.png").stat().st_size > 3000, (name, language)
