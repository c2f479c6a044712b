"""forwarding.spam: level-1 mail for a forwarding recipient held (hold) or forwarded tagged (tag), through the milter."""

from __future__ import annotations

from pathlib import Path

from policyd.content.scorer import ContentScorer
from policyd.content.spamfilter import SpamFilter
from policyd.forwarding.aliases import Aliases
from policyd.testing import MilterReply
from tests.unit.quarantine.test_held import HAMMY, SECRET, Site, WordModel, added, kinds

ALIASES = (
    "fwd@example.org  someone@example.net\n"
    "both@example.org  someone@example.net, box@example.org\n"
    "team@example.org  bob@example.org, carol@example.org\n"
)


def site_with_aliases(tmp_path: Path, spam: str) -> Site:
    """A milter site on a memory store whose filter knows the aliases above."""
    path = tmp_path / "virtual"
    path.write_text(ALIASES)
    site = Site(f"local_domains: [example.org]\nquarantine:\n  default: inbox\nforwarding:\n  spam: {spam}\n"
                f"  aliases: {path}\n")
    aliases = Aliases(str(path), frozenset({"example.org"}), site.clock)
    site.filter = SpamFilter(site.config, site.store, site.clock, ContentScorer(WordModel(), SECRET), aliases=aliases)
    return site


def removed(replies: list[MilterReply]) -> list[str]:
    """The recipients removed from delivery."""
    return [r.strings()[0] for r in replies if r.command == b"-"]


def test_hold_removes_the_forwarding_recipient_and_holds_its_copy(tmp_path: Path) -> None:
    """Spam to an alias that forwards is removed from delivery and held under the alias; the local recipient gets it tagged."""
    site = site_with_aliases(tmp_path, "hold")
    replies = site.send(["bob@example.org", "Fwd@Example.org", "team@example.org"])
    assert removed(replies) == ["<Fwd@Example.org>"]
    assert added(replies)["X-Spam-Flag"] == "YES"
    assert kinds(replies)[-1] == b"a"
    ((entry, copy),) = site.held()
    assert entry.recipient == "fwd@example.org"
    assert b"*{spam}* Buy now" in copy


def test_hold_for_an_alias_with_local_and_outside_targets(tmp_path: Path) -> None:
    """An alias with one outside target is a forwarding recipient: held whole, its local target included."""
    site = site_with_aliases(tmp_path, "hold")
    replies = site.send(["both@example.org", "bob@example.org"])
    assert removed(replies) == ["<both@example.org>"]
    assert [e.recipient for e, _ in site.held()] == ["both@example.org"]


def test_hold_for_every_recipient_discards(tmp_path: Path) -> None:
    """Spam whose only recipient forwards is held and discarded: nothing leaves."""
    site = site_with_aliases(tmp_path, "hold")
    replies = site.send(["fwd@example.org"])
    assert kinds(replies) == [b"d"]
    assert [e.recipient for e, _ in site.held()] == ["fwd@example.org"]


def test_tag_forwards_tagged(tmp_path: Path) -> None:
    """With spam: tag (the default) the forwarding recipient gets the tagged message and nothing is held."""
    site = site_with_aliases(tmp_path, "tag")
    replies = site.send(["fwd@example.org", "bob@example.org"])
    assert removed(replies) == []
    assert added(replies)["X-Spam-Flag"] == "YES"
    assert site.held() == []


def test_ham_to_a_forwarding_recipient_is_untouched(tmp_path: Path) -> None:
    """Mail below the tag for a forwarding recipient is neither held nor changed: its DKIM signature still verifies."""
    site = site_with_aliases(tmp_path, "hold")
    replies = site.send(["fwd@example.org"], body=HAMMY)
    assert kinds(replies) == [b"a"]
    assert site.held() == []


def test_own_choices_apply_beside_forwarding(tmp_path: Path) -> None:
    """The quarantine recipient's own choice still holds local recipients; an inbox alias that stays local is tagged."""
    site = site_with_aliases(tmp_path, "hold")
    site.store.set_preference("bob@example.org", "quarantine")
    replies = site.send(["bob@example.org", "team@example.org", "fwd@example.org"])
    assert sorted(removed(replies)) == ["<bob@example.org>", "<fwd@example.org>"]
    assert sorted(e.recipient for e, _ in site.held()) == ["bob@example.org", "fwd@example.org"]
