"""The ``forwarding:`` section: defaults, checks that name the key and line, files checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyd.config.files import check_files
from policyd.errors import ConfigError
from tests.conftest import make_config


def test_defaults_forward_tagged_without_seal() -> None:
    """Without a forwarding section no recipient forwards, spam is tagged and nothing is sealed."""
    forwarding = make_config("").forwarding
    assert (forwarding.aliases, forwarding.spam, forwarding.arc) == (None, "tag", None)


def test_contract_form_loads(tmp_path: Path) -> None:
    """aliases, spam: hold and arc {domain, selector, key} load as written."""
    config = make_config(
        "forwarding:\n  aliases: hash:/etc/postfix/virtual\n  spam: hold\n"
        "  arc: {domain: example.org, selector: arc1, key: /etc/policyd/arc.key}\n"
    )
    assert config.forwarding.aliases == "hash:/etc/postfix/virtual"
    assert config.forwarding.spam == "hold"
    assert config.forwarding.arc is not None
    assert (config.forwarding.arc.domain, config.forwarding.arc.selector) == ("example.org", "arc1")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("forwarding:\n  spam: drop\n", "test.yaml:2: forwarding.spam: must be one of tag, hold"),
        ("forwarding:\n  arc: {domain: example.org}\n", "forwarding.arc: needs domain, selector and key"),
        ("forwarding:\n  arc: {domain: example.org, selector: s, key: k, bits: 4}\n",
         "test.yaml:2: forwarding.arc.bits: unknown key"),
        ("forwarding:\n  alias: /etc/aliases\n", "test.yaml:2: forwarding.alias: unknown key"),
    ],
)
def test_errors_name_the_key(text: str, message: str) -> None:
    """A wrong value, an incomplete arc or an unknown key is refused, naming the key."""
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        make_config(text)


def test_aliases_and_key_files_are_checked(tmp_path: Path) -> None:
    """config check names forwarding.aliases (a file, or a table's .db) and forwarding.arc.key when missing."""
    aliases = tmp_path / "virtual"
    key = tmp_path / "arc.key"
    text = (f"forwarding:\n  aliases: {aliases}\n"
            f"  arc: {{domain: example.org, selector: s, key: {key}}}\n")
    with pytest.raises(ConfigError, match=r"forwarding\.aliases: cannot read .*virtual: No such file"):
        check_files(make_config(text))
    aliases.write_text("fwd@example.org someone@example.net\n")
    with pytest.raises(ConfigError, match=r"forwarding\.arc\.key: cannot read .*arc\.key: No such file"):
        check_files(make_config(text))
    key.write_text("key\n")
    check_files(make_config(text))
    with pytest.raises(ConfigError, match=r"forwarding\.aliases: cannot read .*virtual\.db"):
        check_files(make_config(f"forwarding:\n  aliases: hash:{aliases}\n"))
