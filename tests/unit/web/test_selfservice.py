"""The self-service pages on a running server: release once, switch choice, refuse bad links."""

from __future__ import annotations

import html
import re
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from policyd.errors import PolicydError, UsageError
from policyd.quarantine.held import RELEASE_HEADER, Quarantine, released_for
from policyd.quarantine.links import LinkSigner
from policyd.servers.policy import PolicyServer
from policyd.store import Quarantined
from policyd.store.memory import MemoryStore
from policyd.web.selfservice import WHO, choose_language
from tests.conftest import make_config
from tests.harness.smtp_sink import SmtpSink
from tests.unit.web.test_admin import base, get

reactor: Any = _reactor

SPAM = (
    b"From: =?utf-8?q?Le_Gagnant?= <winner@example.net>\r\n"
    b"To: carol@example.org\r\n"
    b"Subject: *{spam}* Gagnez un <iPhone>\r\n"
    b"Date: Tue, 24 Nov 2026 03:30:00 +0100\r\n"
    b"Message-ID: <1@example.net>\r\n"
    b"X-Spam-Flag: YES\r\n"
    b"\r\n"
    b"Buy now\r\n"
)


class Running:
    """A server with its HTTP listener, a recording MTA for releases, and a provisioning file."""

    def __init__(self, server: PolicyServer, sink: SmtpSink) -> None:
        self.server = server
        self.sink = sink
        self.store = server.store
        self.signer = server.self_service.signer
        self.base = base(server)

    async def hold(self, recipient: str = "carol@example.org") -> Quarantined:
        """A held message for ``recipient``, as the milter keeps it."""
        now = reactor.seconds()
        entry = Quarantined(0, recipient, "winner@example.net", "Gagnez un <iPhone>", 9.5, now - 60, now + 86400,
                            len(SPAM), "192.0.2.7", "4XyZ1")
        return await self.store.quarantine(entry, SPAM)

    def release_url(self, token: str) -> str:
        return f"{self.base}/self-service/release/{token}"

    def preference_url(self, token: str) -> str:
        return f"{self.base}/self-service/preference/{token}"

    async def audit(self) -> list[tuple[str, str, str]]:
        return [(e.who, e.action, e.subject) for e in await self.store.audit(limit=100)]


@pytest_twisted.async_yield_fixture
async def site(tmp_path: Path) -> AsyncIterator[Running]:
    """A policy server (SQLite, HTTP on a free port) whose releases go to a recording SMTP sink."""
    sink = SmtpSink().start()
    provisioning = tmp_path / "spam"
    provisioning.write_text("carol@example.org quarantine\n", encoding="utf-8")
    config = make_config(
        'listen:\n  policy: "tcp:0:interface=127.0.0.1"\n  http: "tcp:0:interface=127.0.0.1"\n'
        f'store:\n  url: "sqlite:///{tmp_path}/state.db"\n'
        "local_domains: [example.org]\n"
        f"quarantine:\n  default: inbox\n  smtp: '127.0.0.1:{sink.port}'\n  preferences: {provisioning}\n"
    )
    server = PolicyServer(reactor, config)
    await server.start()
    try:
        yield Running(server, sink)
    finally:
        await server.stop()
        sink.stop()


def csrf_of(page: bytes) -> str:
    (value,) = re.findall(r'name="csrf" value="([^"]+)"', page.decode())
    return html.unescape(value)


async def post(url: str, fields: dict[str, str], language: str = "en") -> tuple[int, str]:
    status, _, page = await get(url, data=urllib.parse.urlencode(fields).encode(), headers={"Accept-Language": language})
    return status, page.decode()


@pytest_twisted.ensureDeferred
async def test_release_page_shows_headers_and_releases_once(site: Running) -> None:
    """The page shows the held message's headers; pressing releases it to its recipient only; pressing again does nothing."""
    entry = await site.hold()
    url = site.release_url(site.signer.release(entry))
    status, kind, page = await get(url)
    text = page.decode()
    assert status == 200 and kind.startswith("text/html")
    assert "<h1>A message held for you</h1>" in text and '<html lang="en">' in text
    assert "Le Gagnant &lt;winner@example.net&gt;" in text and "*{spam}* Gagnez un &lt;iPhone&gt;" in text
    assert "<iPhone>" not in text and '<button type="submit" id="submit">Deliver it to my inbox</button>' in text
    csrf = csrf_of(page)
    status, text = await post(url, {"csrf": csrf})
    assert status == 200 and "Message released" in text and "*{spam}*" in text
    (delivery,) = site.sink.wait_for(lambda found: len(found) >= 1, timeout=10)
    assert delivery.recipients == ("carol@example.org",) and delivery.sender == "winner@example.net"
    assert released_for(delivery.header(RELEASE_HEADER) or "", site.server.self_service.quarantine.secret or b"") == (
        "carol@example.org"
    )
    status, text = await post(url, {"csrf": csrf})
    assert status == 410 and "no longer in quarantine" in text
    status, _, page = await get(url)
    assert status == 410 and b"<button" not in page
    assert len(site.sink.snapshot()) == 1
    assert await site.audit() == [("self-service", "release", f"quarantine #{entry.id} for carol@example.org")]


@pytest_twisted.ensureDeferred
async def test_bad_links_get_a_clear_page_and_change_nothing(site: Running) -> None:
    """One character changed, a link for another recipient, an expired link, no form token: refused, nothing released."""
    entry = await site.hold()
    good = site.signer.release(entry)
    status, _, page = await get(site.release_url(good))
    csrf = csrf_of(page)
    altered = good[:10] + ("A" if good[10] != "A" else "B") + good[11:]
    daves = await site.hold("dave@example.org")
    dave = site.signer.release(daves)
    other_recipient = dave.split(".")[0] + "." + good.split(".")[1]
    past = Clock()
    past.advance(reactor.seconds() - 8 * 86400)
    expired = LinkSigner(site.signer.secret, past, 7 * 86400).release(entry)
    for token, code, title in (
        (altered, 403, "This link is not valid"),
        (other_recipient, 403, "This link is not valid"),
        (expired, 410, "This link has expired"),
    ):
        status, _, page = await get(site.release_url(token))
        assert status == code and f"<h1>{title}</h1>" in page.decode() and b"<button" not in page
        status, text = await post(site.release_url(token), {"csrf": csrf})
        assert status == code and title in text
    status, text = await post(site.release_url(good), {})
    assert status == 403 and "The page had expired; nothing was changed" in text
    status, text = await post(site.release_url(good), {"csrf": csrf[:-1]})
    assert status == 403
    status, _, _ = await get(f"{site.base}/self-service/release/")
    assert status == 404
    # A link signed for dave that names carol's message (only a bug could make one) is refused too.
    import attrs

    crossed = site.signer.release(attrs.evolve(entry, recipient="dave@example.org"))
    status, text = await post(site.release_url(crossed), {"csrf": site.signer.form_token(crossed)})
    assert status == 410 and "no longer in quarantine" in text
    status, _, page = await get(site.release_url(good), headers={"Accept-Language": "fr-CH, fr;q=0.9"})
    assert status == 200 and "Un message retenu pour vous" in page.decode()
    assert site.sink.snapshot() == []
    assert {e.id for e in await site.store.quarantine_list(now=reactor.seconds())} == {entry.id, daves.id}
    assert await site.audit() == []


@pytest_twisted.ensureDeferred
async def test_preference_page_switches_the_choice(site: Running) -> None:
    """The page shows the provisioned choice; saving 'inbox' records it (it wins), audited as self-service."""
    url = site.preference_url(site.signer.preference("carol@example.org"))
    status, _, page = await get(url)
    text = page.decode()
    assert status == 200 and "kept in quarantine (set for your account by your organisation)" in text
    assert 'id="spam-quarantine" name="spam" value="quarantine" checked' in text
    status, text = await post(url, {"csrf": csrf_of(page), "spam": "trash"})
    assert status == 400 and "choose one of the two options" in text
    status, text = await post(url, {"csrf": csrf_of(page), "spam": "inbox"}, language="fr")
    assert status == 200 and "Enregistré : pour carol@example.org, le spam est désormais distribué" in text
    assert 'value="inbox" checked' in text and "(votre choix)" in text
    assert await site.server.self_service.preferences.spam(["carol@example.org"]) == {"carol@example.org": "inbox"}
    assert await site.audit() == [("self-service", "prefs", "carol@example.org")]
    # A forged or expired preference link changes nothing.
    forged = url[:-2] + ("AA" if not url.endswith("AA") else "BB")
    status, text = await post(forged, {"csrf": csrf_of(page), "spam": "quarantine"})
    assert status == 403 and "not valid" in text
    past = Clock()
    past.advance(reactor.seconds() - 8 * 86400)
    expired = site.preference_url(LinkSigner(site.signer.secret, past, 7 * 86400).preference("carol@example.org"))
    status, text = await post(expired, {"csrf": csrf_of(page), "spam": "quarantine"})
    assert status == 410
    assert await site.server.self_service.preferences.spam(["carol@example.org"]) == {"carol@example.org": "inbox"}
    assert len(await site.audit()) == 1


@pytest_twisted.ensureDeferred
async def test_pages_protect_the_link(site: Running) -> None:
    """Pages never send the link on (no referrer), cannot be framed, and are not cached."""
    url = site.preference_url(site.signer.preference("carol@example.org"))
    import urllib.request

    def headers() -> dict[str, str]:
        with urllib.request.urlopen(url, timeout=10) as response:
            return {k.lower(): v for k, v in response.headers.items()}

    from twisted.internet.threads import deferToThread

    found = await deferToThread(headers)
    assert found["referrer-policy"] == "no-referrer" and found["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in found["content-security-policy"] and found["cache-control"] == "no-store"


def test_language_from_accept_language() -> None:
    """French or English by the browser's preference and weights; the configured language otherwise."""
    assert choose_language("fr-FR,fr;q=0.9,en;q=0.8") == "fr"
    assert choose_language("de-DE, en;q=0.5, fr;q=0.7") == "fr"
    assert choose_language("en-GB, fr") == "en"
    assert choose_language("de, es", default="fr") == "fr"
    assert choose_language("fr;q=0, en;q=0.1") == "en"
    assert choose_language(None) == "en" and choose_language("garbage;;q=x") == "en"


class Relay:
    """An injected deliver(): records, fails when told, or holds the answer until told."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, bytes]] = []
        self.failing = False
        self.pending: list[Deferred[None]] = []
        self.hold = False

    def __call__(self, smtp: str, sender: str, recipient: str, message: bytes) -> Deferred[None]:
        if self.failing:
            return fail(PolicydError(f"{smtp} refused {recipient}: 451 try later"))
        self.sent.append((sender, recipient, message))
        if self.hold:
            waiting: Deferred[None] = Deferred()
            self.pending.append(waiting)
            return waiting
        return succeed(None)


def test_release_is_claimed_so_two_presses_deliver_once() -> None:
    """While one release is on its way a second is refused; a failed one leaves the message held and releasable."""
    clock = Clock()
    clock.advance(1_700_000_000)
    store = MemoryStore()
    relay = Relay()
    quarantine = Quarantine(make_config(), store, clock, b"s" * 32, deliver=relay)
    entry = store.quarantine(
        Quarantined(0, "carol@example.org", "x@example.net", "spam", 9.0, clock.seconds(), clock.seconds() + 3600, 3),
        b"x\r\n",
    ).result  # type: ignore[attr-defined]
    relay.failing = True
    failed = Deferred.fromCoroutine(quarantine.release(entry.id, WHO))
    assert isinstance(failed.result.value, PolicydError)  # type: ignore[attr-defined]
    failed.addErrback(lambda _: None)
    assert list(store.held) == [entry.id] and store.entries == []
    relay.failing, relay.hold = False, True
    first = Deferred.fromCoroutine(quarantine.release(entry.id, WHO))
    second = Deferred.fromCoroutine(quarantine.release(entry.id, WHO))
    assert isinstance(second.result.value, UsageError)  # type: ignore[attr-defined]
    second.addErrback(lambda _: None)
    assert list(store.held) == [entry.id]  # still held while the MTA has not taken it
    relay.pending[0].callback(None)
    assert first.result == entry  # type: ignore[attr-defined]
    assert len(relay.sent) == 1 and relay.sent[0][1] == "carol@example.org" and store.held == {}
    assert [(e.who, e.action) for e in store.entries] == [(WHO, "release")]
