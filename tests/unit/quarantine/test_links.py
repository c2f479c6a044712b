"""Signed digest links: genuine ones work, any change, another recipient or age refuses them."""

from __future__ import annotations

import stat
import string
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from policyd.quarantine.links import (
    FORM_TTL,
    PREFERENCE,
    RELEASE,
    LinkError,
    LinkSigner,
    held_ms,
    link_secret,
)
from policyd.store import Quarantined
from tests.conftest import make_config

SECRET = b"0123456789abcdef" * 4
T0 = 1_700_000_000.0
TTL = 7 * 86400.0
ALPHABET = string.ascii_letters + string.digits + "-_."


def clock_at(when: float = T0) -> Clock:
    clock = Clock()
    clock.advance(when)
    return clock


def held(entry_id: int = 12, recipient: str = "carol@example.org", at: float = T0 - 3600.123) -> Quarantined:
    return Quarantined(entry_id, recipient, "spammer@example.net", "Gagnez", 9.5, at, at + 30 * 86400, 100)


def refused(signer: LinkSigner, token: str, kind: str = RELEASE) -> str:
    """The reason a link is refused (fails the test when it is accepted)."""
    with pytest.raises(LinkError) as caught:
        signer.verify(token, kind)
    return caught.value.reason


def test_a_genuine_release_link_names_its_recipient_and_message() -> None:
    """A release link verifies, says who and which message, and matches only that entry."""
    signer = LinkSigner(SECRET, clock_at(), TTL)
    entry = held()
    link = signer.verify(signer.release(entry), RELEASE)
    assert (link.kind, link.recipient, link.entry, link.held) == (RELEASE, "carol@example.org", 12, held_ms(entry.at))
    assert link.expires == int(T0 + TTL)
    assert link.names(entry)
    # Same id, later message (an id handed out again): not this link's message.
    assert not link.names(held(at=T0 - 60))
    assert not link.names(held(entry_id=13))
    assert not link.names(held(recipient="dave@example.org"))


def test_every_one_character_change_is_refused() -> None:
    """Changing any single character of a link (payload, dot or MAC) makes it invalid."""
    signer = LinkSigner(SECRET, clock_at(), TTL)
    token = signer.release(held())
    tried = 0
    for position, original in enumerate(token):
        for replacement in {ALPHABET[(ALPHABET.index(original) + step) % len(ALPHABET)] for step in (1, 2, 33)}:
            altered = token[:position] + replacement + token[position + 1 :]
            assert refused(signer, altered) == "invalid", (position, replacement)
            tried += 1
    assert tried >= 3 * len(token) - 3
    for cut in (token[:-1], token[1:], token + "A", token.replace(".", ""), "", "é" + token):
        assert refused(signer, cut) == "invalid"


def test_a_link_for_another_recipient_is_refused() -> None:
    """Swapping the recipient in a link breaks its signature; a link made for dave never names carol's message."""
    import base64
    import json

    signer = LinkSigner(SECRET, clock_at(), TTL)
    token = signer.release(held())
    payload, mac = token.split(".")
    fields = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    fields[1] = "dave@example.org"
    forged = base64.urlsafe_b64encode(json.dumps(fields, separators=(",", ":")).encode()).rstrip(b"=").decode()
    assert refused(signer, f"{forged}.{mac}") == "invalid"
    dave = signer.verify(signer.release(held(recipient="dave@example.org")), RELEASE)
    assert not dave.names(held())
    # Signed with another install's secret: invalid too.
    other = LinkSigner(b"another install's secret........", clock_at(), TTL)
    assert refused(signer, other.release(held())) == "invalid"


def test_links_expire_after_link_ttl() -> None:
    """A link works until link_ttl has passed on the (fake) clock, then is refused as expired."""
    clock = clock_at()
    signer = LinkSigner(SECRET, clock, TTL)
    release, preference = signer.release(held()), signer.preference("carol@example.org")
    clock.advance(TTL - 1)
    assert signer.verify(release, RELEASE).recipient == "carol@example.org"
    assert signer.verify(preference, PREFERENCE).recipient == "carol@example.org"
    clock.advance(1)
    assert refused(signer, release) == "expired"
    assert refused(signer, preference, PREFERENCE) == "expired"
    # An altered expired link is invalid, not merely expired.
    assert refused(signer, release[:-1] + ("A" if release[-1] != "A" else "B")) == "invalid"


def test_a_link_only_opens_its_own_page() -> None:
    """A preference link is not a release link, and the reverse."""
    signer = LinkSigner(SECRET, clock_at(), TTL)
    assert refused(signer, signer.preference("carol@example.org"), RELEASE) == "invalid"
    assert refused(signer, signer.release(held()), PREFERENCE) == "invalid"


def test_form_tokens_are_bound_to_the_link_and_expire() -> None:
    """A page's form token works for its link for FORM_TTL, not for another link, not altered."""
    clock = clock_at()
    signer = LinkSigner(SECRET, clock, TTL)
    link, other = signer.release(held()), signer.release(held(entry_id=13))
    form = signer.form_token(link)
    assert signer.form_ok(form, link)
    assert not signer.form_ok(form, other)
    assert not signer.form_ok(form[:-1] + ("A" if form[-1] != "A" else "B"), link)
    assert not signer.form_ok("", link) and not signer.form_ok("123.abc", link)
    clock.advance(FORM_TTL)
    assert signer.form_ok(form, link)
    clock.advance(1)
    assert not signer.form_ok(form, link)


def test_link_secret_is_created_once_beside_the_store(tmp_path: Path) -> None:
    """link.secret is made beside the SQLite store, mode 0600, and read back the same; memory stores get one per process."""
    config = make_config(f"store:\n  url: 'sqlite:///{tmp_path}/state.db'\n")
    first = link_secret(config)
    path = tmp_path / "link.secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert link_secret(config) == first and len(first) >= 32
    configured = make_config(f"quarantine:\n  link_secret: {tmp_path}/elsewhere\n")
    assert link_secret(configured) != first and (tmp_path / "elsewhere").exists()
    memory = make_config("store:\n  url: 'memory://'\n")
    assert link_secret(memory) != link_secret(memory)
