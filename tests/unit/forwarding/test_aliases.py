"""Forwarding recipients: virtual(5) files and tables resolved through nested aliases into outside and local targets."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock

from policyd.forwarding.aliases import MAX_DEPTH, Aliases, Targets, expand, parse_virtual
from policyd.tables import TableError

LOCAL = frozenset({"example.org", "lists.example.org"})


def resolve(aliases: Aliases, *recipients: str) -> dict[str, Targets]:
    """The targets the aliases give, at once (run_blocking is inline)."""
    found: dict[str, Targets] = {}
    aliases.forwarding_targets(list(recipients)).addCallback(found.update)
    return found


def test_parse_virtual_format() -> None:
    """Comments, commas or spaces between targets, continuation lines and case are read as postmap reads them."""
    entries = parse_virtual(
        "# forwards\n"
        "Fwd@Example.org  Someone@Example.NET, other@example.net\n"
        "team@example.org a@example.org\n"
        "   b@example.org,c@example.org\n"
        "  # a comment line inside an entry\n"
        "\n"
        "empty@example.org\n"
    )
    assert entries["fwd@example.org"] == ("someone@example.net", "other@example.net")
    assert entries["team@example.org"] == ("a@example.org", "b@example.org", "c@example.org")
    assert "empty@example.org" not in entries


def test_file_forwarding_and_local_targets(tmp_path: Path) -> None:
    """An alias with outside and local targets forwards the outside ones; a plain local alias does not forward."""
    path = tmp_path / "virtual"
    path.write_text(
        "mixed@example.org  out@example.net, box@example.org\n"
        "local@example.org  box@example.org\n"
    )
    aliases = Aliases(str(path), LOCAL, Clock())
    found = resolve(aliases, "<Mixed@Example.org>", "local@example.org", "nobody@example.org")
    assert found["<Mixed@Example.org>"] == Targets(outside=("out@example.net",), local=("box@example.org",))
    assert found["<Mixed@Example.org>"].forwards
    assert not found["local@example.org"].forwards
    assert "nobody@example.org" not in found


def test_nested_aliases_loops_and_self_reference() -> None:
    """Targets are followed through other aliases; a loop or a self-reference ends as a final address."""
    table = {
        "a@example.org": ("b@example.org",),
        "b@example.org": ("c@example.org", "far@example.net"),
        "c@example.org": ("a@example.org",),  # a loop back to the start
        "keep@example.org": ("keep@example.org", "copy@example.net"),
    }
    lookup = lambda keys: {k: table[k] for k in keys if k in table}  # noqa: E731
    assert expand("a@example.org", lookup, LOCAL) == Targets(outside=("far@example.net",), local=("a@example.org",))
    assert expand("keep@example.org", lookup, LOCAL) == Targets(("copy@example.net",), ("keep@example.org",))
    assert expand("other@example.org", lookup, LOCAL) == Targets()


def test_catch_all_and_domain_rewrite() -> None:
    """@domain matches addresses without their own entry; a target @other keeps the user in the other domain."""
    table = {
        "@example.org": ("@example.net",),
        "boss@example.org": ("boss@lists.example.org",),
    }
    lookup = lambda keys: {k: table[k] for k in keys if k in table}  # noqa: E731
    assert expand("jo@example.org", lookup, LOCAL) == Targets(outside=("jo@example.net",))
    assert expand("boss@example.org", lookup, LOCAL) == Targets(local=("boss@lists.example.org",))


def test_depth_is_bounded() -> None:
    """A chain deeper than MAX_DEPTH stops there instead of running on."""
    lookup = lambda keys: {k: (f"x{int(k[1:].split('@')[0]) + 1}@example.org",) for k in keys if k.startswith("x")}  # noqa: E731
    targets = expand("x0@example.org", lookup, LOCAL)
    assert targets.local == (f"x{MAX_DEPTH}@example.org",)


def test_file_change_is_seen_and_reload_reads_again(tmp_path: Path) -> None:
    """A changed file is read again after a second; reload() reads it at the next look-up."""
    path = tmp_path / "virtual"
    path.write_text("fwd@example.org out@example.net\n")
    clock = Clock()
    aliases = Aliases(str(path), LOCAL, clock)
    assert resolve(aliases, "fwd@example.org")["fwd@example.org"].forwards
    path.write_text("fwd@example.org box@example.org\n# longer, so the size changes\n")
    assert resolve(aliases, "fwd@example.org")["fwd@example.org"].forwards  # within the second: as read
    clock.advance(1.5)
    assert not resolve(aliases, "fwd@example.org")["fwd@example.org"].forwards
    path.write_text("fwd@example.org out@example.com\n# the same size as the first\n")
    aliases.reload()
    assert resolve(aliases, "fwd@example.org")["fwd@example.org"].outside == ("out@example.com",)


def test_missing_file_means_no_forwarding(tmp_path: Path) -> None:
    """An aliases file that disappeared makes no recipient forwarding, without failing."""
    aliases = Aliases(str(tmp_path / "none"), LOCAL, Clock())
    assert resolve(aliases, "fwd@example.org") == {}


def test_table_is_asked_per_level_and_cached() -> None:
    """A table is asked once per nesting level for all keys of that level, and its answers reused."""
    asked: list[list[str]] = []
    table = {"fwd@example.org": "team@example.org", "team@example.org": "a@example.net, b@example.org"}

    def query(source: str, keys: list[str]) -> dict[str, str]:
        assert source == "hash:/etc/postfix/virtual"
        asked.append(keys)
        return {k: table[k] for k in keys if k in table}

    clock = Clock()
    aliases = Aliases("hash:/etc/postfix/virtual", LOCAL, clock, query=query)
    found = resolve(aliases, "fwd@example.org")
    assert found["fwd@example.org"] == Targets(("a@example.net",), ("b@example.org",))
    assert asked[0] == ["fwd@example.org", "@example.org"]
    count = len(asked)
    resolve(aliases, "fwd@example.org")
    assert len(asked) == count


def test_failing_table_counts_as_empty_and_rests() -> None:
    """A table postmap cannot read gives no forwarding recipient and is not asked again for a while."""
    calls = []

    def query(source: str, keys: list[str]) -> dict[str, str]:
        calls.append(keys)
        raise TableError("postmap -q failed: fatal: open database /etc/postfix/virtual.db")

    clock = Clock()
    aliases = Aliases("hash:/etc/postfix/virtual", LOCAL, clock, query=query)
    assert resolve(aliases, "fwd@example.org") == {}
    clock.advance(2)
    assert resolve(aliases, "fwd@example.org") == {}
    assert len(calls) == 1
