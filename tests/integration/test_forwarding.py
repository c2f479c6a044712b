"""Forwarding through Postfix's own tools: aliases read from a Postfix table with postmap -q."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from policyd.forwarding.aliases import Aliases, Targets


@pytest.fixture(autouse=True)
def _postfix_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """postmap reads a main.cf: give it one (the system's may not exist)."""
    conf = tmp_path / "postfix-conf"
    conf.mkdir()
    (conf / "main.cf").write_text("compatibility_level = 3.6\n", encoding="utf-8")
    monkeypatch.setenv("MAIL_CONFIG", str(conf))


def test_hash_table_read_with_postmap(tmp_path: Path) -> None:
    """A hash: table built by postmap is resolved through nested aliases, one postmap call per level."""
    source = tmp_path / "virtual"
    source.write_text(
        "fwd@example.org  team@example.org\n"
        "team@example.org  Someone@Example.NET, box@example.org\n"
        "@lists.example.org  @example.net\n"
    )
    subprocess.run([shutil.which("postmap") or "/usr/sbin/postmap", f"hash:{source}"], check=True)
    aliases = Aliases(f"hash:{source}", frozenset({"example.org", "lists.example.org"}), Clock())
    found: dict[str, Targets] = {}
    aliases.forwarding_targets(["<fwd@example.org>", "jo@lists.example.org", "box@example.org"]).addCallback(
        found.update
    )
    assert found == {
        "<fwd@example.org>": Targets(outside=("someone@example.net",), local=("box@example.org",)),
        "jo@lists.example.org": Targets(outside=("jo@example.net",)),
    }


def test_missing_table_means_no_forwarding(tmp_path: Path) -> None:
    """A table whose .db is missing gives no forwarding recipient and does not fail."""
    aliases = Aliases(f"hash:{tmp_path}/none", frozenset({"example.org"}), Clock())
    found: list[dict[str, Targets]] = []
    aliases.forwarding_targets(["fwd@example.org"]).addCallback(found.append)
    assert found == [{}]
