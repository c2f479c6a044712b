"""The milter's ARC seal: mail still going to a forwarding recipient leaves sealed, verifiable by dkimpy."""

from __future__ import annotations

from pathlib import Path

import dkim  # type: ignore[import-untyped]
import pytest

from policyd.config.sections import Arc
from policyd.content.scorer import ContentScorer
from policyd.content.spamfilter import SpamFilter, apply_changes
from policyd.forwarding.aliases import Aliases
from policyd.forwarding.arc import (
    generate_key,
    key_record,
    message_bytes,
    public_key_of,
    zone_lookup,
)
from policyd.forwarding.sealing import ArcSealer
from policyd.protocols.milter import Modification
from policyd.reactor import inline
from policyd.testing import MilterReply
from tests.unit.quarantine.test_held import HAMMY, SECRET, SPAMMY, Site, WordModel

HEADERS = [("From", "Ann <ann@example.net>"), ("To", "fwd@example.org"), ("Subject", "Minutes"),
           ("Message-ID", "<m1@example.net>")]


@pytest.fixture(scope="module")
def key() -> bytes:
    """The forwarder's ARC key."""
    return generate_key()[0]


def sealed_site(tmp_path: Path, key: bytes, spam: str = "tag") -> Site:
    """A milter site with aliases (fwd forwards outside, team stays local) and an ARC sealer."""
    path = tmp_path / "virtual"
    path.write_text("fwd@example.org  someone@example.net\nteam@example.org  bob@example.org\n")
    site = Site(f"local_domains: [example.org]\nforwarding:\n  spam: {spam}\n  aliases: {path}\n")
    aliases = Aliases(str(path), frozenset({"example.org"}), site.clock)
    zone = zone_lookup({"arc1._domainkey.example.org": key_record(public_key_of(key))})
    sealer = ArcSealer(Arc("example.org", "arc1", "-"), key, aliases, zone, inline, site.clock)
    site.filter = SpamFilter(site.config, site.store, site.clock, ContentScorer(WordModel(), SECRET),
                             aliases=aliases, sealer=sealer)
    return site


def delivered(replies: list[MilterReply], body: bytes) -> bytes:
    """The message as the MTA delivers it after the milter's changes."""
    changes = [Modification(r.command, *r.strings(), r.index if r.command in (b"m", b"i") else 0)
               for r in replies if r.command in (b"h", b"m", b"i")]
    return message_bytes(apply_changes(HEADERS, changes), body)


def arc_result(message: bytes, key: bytes) -> bytes | None:
    """dkimpy's arc_verify of the message against the zone publishing ``key``."""
    zone = zone_lookup({"arc1._domainkey.example.org": key_record(public_key_of(key))})
    return dkim.arc_verify(message, dnsfunc=zone)[0]  # type: ignore[no-any-return]


def test_ham_to_a_forwarding_recipient_leaves_sealed_and_otherwise_untouched(tmp_path: Path, key: bytes) -> None:
    """Only the three ARC headers are added to forwarded ham, and the seal verifies."""
    site = sealed_site(tmp_path, key)
    replies = site.mta().message("ann@example.net", ["fwd@example.org"], HEADERS, HAMMY)
    assert sorted(r.strings()[0] for r in replies if r.command == b"i") == [
        "ARC-Authentication-Results", "ARC-Message-Signature", "ARC-Seal"]
    assert [r.command for r in replies if r.command != b"i"] == [b"a"]
    assert arc_result(delivered(replies, HAMMY), key) == b"pass"


def test_tagged_spam_is_sealed_after_the_tag(tmp_path: Path, key: bytes) -> None:
    """With spam: tag the forwarded copy carries the tag, and the seal covers the tagged message."""
    site = sealed_site(tmp_path, key)
    replies = site.mta().message("ann@example.net", ["fwd@example.org"], HEADERS, SPAMMY)
    message = delivered(replies, SPAMMY)
    assert b"Subject: *{spam}* Minutes" in message
    assert arc_result(message, key) == b"pass"


def test_no_seal_without_a_forwarding_recipient_left(tmp_path: Path, key: bytes) -> None:
    """Mail for local recipients only, or whose forwarding recipient was held, is not sealed."""
    site = sealed_site(tmp_path, key, spam="hold")
    local = site.mta().message("ann@example.net", ["team@example.org"], HEADERS, HAMMY)
    assert [r.command for r in local] == [b"a"]
    held = site.mta().message("ann@example.net", ["fwd@example.org", "bob@example.org"], HEADERS, SPAMMY)
    assert [r.strings()[0] for r in held if r.command == b"-"] == ["<fwd@example.org>"]
    assert not [r for r in held if r.command == b"i"]
