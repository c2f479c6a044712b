"""The pages as templates: both languages, fields tied to their errors, buttons that name their request, identity."""

from __future__ import annotations

import re
import string
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from policyd.servers.policy import PolicyServer
from policyd.web.pages import asserted_user
from policyd.web.render import Texts, render
from policyd.web.texts import CATALOGUES
from tests.conftest import make_config
from tests.unit.web.test_admin import (
    alice_form,
    api,
    base,
    basic,
    form_fields,
    get,
    request_with,
    token,
)

reactor: Any = _reactor


async def start(tmp_path: Path, http: str = "") -> PolicyServer:
    """A started server (limit 3, alice and bob valid) with its HTTP listener; ``http`` adds to the http: section."""
    listed = tmp_path / "accounts"
    listed.write_text("alice@example.org\nbob@example.org\n", encoding="utf-8")
    config = make_config(
        'listen:\n  policy: "tcp:0:interface=127.0.0.1"\n  http: "tcp:0:interface=127.0.0.1"\n'
        f'store:\n  url: "sqlite:///{tmp_path}/state.db"\n'
        f"accounts: {listed}\nlocal_domains: [example.org]\noutbound:\n  limit: 3\n"
        + (f"http:\n  {http}\n" if http else "")
    )
    running = PolicyServer(reactor, config)
    await running.start()
    return running


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Path) -> AsyncIterator[PolicyServer]:
    """A server whose deployment authenticates no one."""
    running = await start(tmp_path)
    yield running
    await running.stop()


@pytest_twisted.async_yield_fixture
async def proxied(tmp_path: Path) -> AsyncIterator[PolicyServer]:
    """A server behind a reverse proxy that names the user in X-Remote-User."""
    running = await start(tmp_path, "user_header: X-Remote-User")
    yield running
    await running.stop()


def placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def test_catalogues_say_the_same_things() -> None:
    """French and English have the same keys, each text with the same placeholders."""
    english, french = CATALOGUES["en"], CATALOGUES["fr"]
    assert set(english) == set(french)
    for key, text in english.items():
        assert placeholders(text) == placeholders(french[key]), key


def test_templates_escape_what_came_from_outside() -> None:
    """Autoescaping is on: a reason or account with markup is shown as text, never as markup."""
    page = render("received.html", "en", account="<script>x</script>@example.org", limit=9, start=0.0, end=60.0)
    assert b"<script>" not in page and b"&lt;script&gt;x&lt;/script&gt;@example.org" in page


@pytest.mark.parametrize(("accept", "lang", "title"), [
    ("fr-FR,fr;q=0.9", "fr", "Demander une dérogation pour un envoi en nombre"),
    ("en-GB", "en", "Request a bulk-send exemption"),
    ("de", "en", "Request a bulk-send exemption"),
])
@pytest_twisted.ensureDeferred
async def test_the_form_speaks_the_browsers_language(server: PolicyServer, accept: str, lang: str, title: str) -> None:
    """The form is in French or English by Accept-Language (the configured language otherwise), and says so."""
    status, _, page = await get(f"{base(server)}/exemption", headers={"Accept-Language": accept})
    text = page.decode()
    assert status == 200 and f'<html lang="{lang}">' in text and f"<h1>{title}</h1>" in text
    assert Texts(lang)("field.limit") in text and Texts(lang)("exemption.claimed").replace("'", "&#39;") in text
    assert "recipients" in Texts("en")("exemption.intro") and "message" not in Texts("en")("field.limit")


@pytest_twisted.ensureDeferred
async def test_every_page_has_both_languages(server: PolicyServer) -> None:
    """The index, the form, the admin page, its log-in refusal and errors exist in French, declared as such."""
    auth = basic("jane", token(server))
    for path, headers, words in (
        ("/", {}, "Demander une dérogation"),
        ("/exemption", {}, "Destinataires extérieurs par heure"),
        ("/admin", auth, "Aucune demande en attente."),
        ("/admin", {}, "Le jeton d'administration est nécessaire"),
        ("/self-service/release/x", {}, "Ce lien n'est pas valide"),
        ("/self-service/nothing", {}, "Ce lien n'est pas valide"),
    ):
        _, kind, page = await get(f"{base(server)}{path}", headers={**headers, "Accept-Language": "fr"})
        text = page.decode()
        assert kind.startswith("text/html") and '<html lang="fr">' in text, path
        assert words in text.replace("&#39;", "'"), path


@pytest_twisted.ensureDeferred
async def test_wrong_fields_are_named_beside_them(server: PolicyServer) -> None:
    """Each wrong field gets aria-invalid and an error it points to with aria-describedby; the rest are kept."""
    _, _, page = await get(f"{base(server)}/exemption")
    csrf = form_fields(page.decode())["csrf"]
    form = urllib.parse.urlencode({
        "account": "alice@example.org", "organisation": "", "start": "2030-01-10T18:00",
        "end": "2030-01-10T08:00", "limit": "2", "reason": "gala <b>invitations</b>", "csrf": csrf,
    }).encode()
    status, _, page = await get(f"{base(server)}/exemption", data=form, headers={"Accept-Language": "fr"})
    text = page.decode()
    assert status == 400 and "La demande n&#39;a pas été envoyée" in text
    errors = dict(re.findall(r'<p class="field-error" id="([a-z]+)-error">([^<]+)</p>', text))
    assert errors == {
        "organisation": "Merci de remplir ce champ.",
        "end": "La fin doit être après le début.",
        "limit": "Les comptes peuvent déjà écrire à 3 destinataires extérieurs par heure : demandez davantage.",
    }
    for name in errors:
        (tag,) = re.findall(rf'<input id="{name}"[^>]*>', text)
        assert 'aria-invalid="true"' in tag and f'aria-describedby="{name}-error' in tag, tag
    (account,) = re.findall(r'<input id="account"[^>]*>', text)
    assert "aria-invalid" not in account and 'value="alice@example.org"' in account
    assert "gala &lt;b&gt;invitations&lt;/b&gt;</textarea>" in text
    _, listed = await api(server, "GET", "exemptions")
    assert listed == []


@pytest_twisted.ensureDeferred
async def test_each_button_names_its_request(server: PolicyServer) -> None:
    """Approve and Deny carry the request's number and account in their accessible name, in both languages."""
    _, _, page = await get(f"{base(server)}/exemption")
    csrf = form_fields(page.decode())["csrf"]
    for account in ("alice@example.org", "bob@example.org"):
        status, _, _ = await get(f"{base(server)}/exemption", data=alice_form(csrf, account))
        assert status == 201
    auth = basic("jane", token(server))
    _, _, page = await get(f"{base(server)}/admin", headers=auth)
    labels = re.findall(r'id="((?:approve|deny)-\d)" aria-label="([^"]+)"', page.decode())
    assert labels == [
        ("approve-1", "Approve request #1 (alice@example.org)"), ("deny-1", "Deny request #1 (alice@example.org)"),
        ("approve-2", "Approve request #2 (bob@example.org)"), ("deny-2", "Deny request #2 (bob@example.org)"),
    ]
    _, _, page = await get(f"{base(server)}/admin", headers={**auth, "Accept-Language": "fr"})
    assert 'aria-label="Refuser la demande n° 2 (bob@example.org)"' in page.decode()


@pytest_twisted.ensureDeferred
async def test_without_authentication_identities_are_claims(server: PolicyServer) -> None:
    """The form says it does not check who asks; its requests and the admin's decisions are audited as claims."""
    _, _, page = await get(f"{base(server)}/exemption", headers={"X-Remote-User": "mallory"})
    assert b"This page does not check who you are" in page and b"mallory" not in page
    status, _, _ = await get(f"{base(server)}/exemption", data=alice_form(form_fields(page.decode())["csrf"]))
    assert status == 201
    auth = basic("jane", token(server))
    _, _, page = await get(f"{base(server)}/admin", headers=auth)
    text = page.decode()
    assert "under the name “jane”: that name is not checked" in text and "“web admin, claiming jane”" in text
    assert "<td>web, claiming alice@example.org</td>" in text
    decision = urllib.parse.urlencode({"id": "1", "action": "approve", "csrf": form_fields(text)["csrf"]}).encode()
    status, _, page = await get(f"{base(server)}/admin", data=decision, headers=auth)
    assert status == 200 and b"Request 1 for alice@example.org: approved." in page
    _, audit = await api(server, "GET", "audit")
    assert [(a["action"], a["who"]) for a in audit] == [
        ("exemption-request", "web, claiming alice@example.org"), ("exemption-approve", "web admin, claiming jane")]


@pytest_twisted.ensureDeferred
async def test_a_user_named_by_the_local_proxy_is_recorded(proxied: PolicyServer) -> None:
    """With http.user_header, the proxy's user is shown, fills the account, and is who the audit log names."""
    here = {"X-Remote-User": "alice@example.org"}
    _, _, page = await get(f"{base(proxied)}/exemption", headers=here)
    text = page.decode()
    assert "You are signed in as alice@example.org" in text
    assert re.search(r'<input id="account"[^>]*value="alice@example.org"', text)
    status, _, _ = await get(f"{base(proxied)}/exemption", data=alice_form(form_fields(text)["csrf"]), headers=here)
    assert status == 201
    admin = {**basic("", token(proxied)), "X-Remote-User": "jane"}
    _, _, page = await get(f"{base(proxied)}/admin", headers=admin)
    text = page.decode()
    assert "You are signed in as jane" in text and "<td>web user alice@example.org</td>" in text
    decision = urllib.parse.urlencode({"id": "1", "action": "deny", "reason": "no", "csrf": form_fields(text)["csrf"]})
    # The page's token was given to jane: another name cannot use it.
    status, _, _ = await get(f"{base(proxied)}/admin", data=decision.encode(), headers={**admin, "X-Remote-User": "bob"})
    assert status == 403
    status, _, page = await get(f"{base(proxied)}/admin", data=decision.encode(), headers=admin)
    assert status == 200 and b"Request 1 for alice@example.org: denied." in page
    _, audit = await api(proxied, "GET", "audit")
    assert [(a["action"], a["who"]) for a in audit] == [
        ("exemption-request", "web user alice@example.org"), ("exemption-deny", "web user jane")]


def test_the_user_header_counts_only_from_this_host() -> None:
    """The header is believed from loopback or a local socket, never from elsewhere, and never when not configured."""
    named = {b"x-remote-user": b"jane\x1b[2J"}
    assert asserted_user(request_with(named, IPv4Address("TCP", "127.0.0.1", 1)), "X-Remote-User") == "jane?[2J"
    assert asserted_user(request_with(named, IPv6Address("TCP", "::1", 1)), "x-remote-user") == "jane?[2J"
    assert asserted_user(request_with(named, UNIXAddress(None)), "X-Remote-User") == "jane?[2J"
    assert asserted_user(request_with(named, IPv4Address("TCP", "192.0.2.1", 1)), "X-Remote-User") is None
    assert asserted_user(request_with(named, IPv4Address("TCP", "127.0.0.1", 1)), None) is None
    assert asserted_user(request_with({}, IPv4Address("TCP", "127.0.0.1", 1)), "X-Remote-User") is None
    assert asserted_user(request_with({b"x-remote-user": b"  "}, UNIXAddress(None)), "X-Remote-User") is None
