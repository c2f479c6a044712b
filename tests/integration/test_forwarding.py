"""Forwarding through the real tools: aliases read with postmap -q, policyd arc keygen, spam held through real Postfix."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from policyd.forwarding.aliases import Aliases, Targets
from tests.harness.postfix import PostfixInstance, SmtpSink
from tests.harness.servers import policyd
from tests.integration.test_postfix_milter import (
    HAM_BODY,
    HAM_SUBJECT,
    SPAM_BODY,
    SPAM_SUBJECT,
    Milter,
    arrived,
    headers,
)
from tests.unit.content.test_classifier import training_mail


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


def test_arc_keygen_writes_a_private_key_and_prints_its_record(tmp_path: Path) -> None:
    """arc keygen writes a 0600 RSA key once and prints the TXT record; arc record and config check use it."""
    key = tmp_path / "arc.key"
    made = policyd("arc", "keygen", "--domain", "Example.org", "--selector", "arc1", "--key", str(key))
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith('arc1._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=')
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY")
    again = policyd("arc", "keygen", "--domain", "example.org", "--selector", "arc1", "--key", str(key))
    assert again.returncode == 2 and "exists; not replaced" in again.stderr
    config = tmp_path / "policyd.yaml"
    config.write_text(
        "store:\n  url: memory://\nlocal_domains: [example.org]\n"
        f"forwarding:\n  arc: {{domain: example.org, selector: arc1, key: {key}}}\n"
    )
    shown = policyd("arc", "record", "-c", str(config), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["record"] == made.stdout.strip()
    assert policyd("config", "check", "-c", str(config)).returncode == 0
    key.unlink()
    missing = policyd("config", "check", "-c", str(config))
    assert missing.returncode == 2 and f"forwarding.arc.key: cannot read {key}" in missing.stderr


class ForwardingMilter(Milter):
    """The end-to-end milter, its configuration with a forwarding section (aliases as Postfix's own map)."""

    def write_config(self, smtp: str) -> None:
        """The milter's configuration plus ``forwarding: {aliases, spam: hold}``."""
        super().write_config(smtp)
        aliases = self.root / "virtual"
        aliases.write_text("fwd@example.org  outside@example.net\n", encoding="utf-8")
        with self.config.open("a", encoding="utf-8") as handle:
            handle.write(f"forwarding:\n  aliases: '{aliases}'\n  spam: hold\n")


def spam_is_held_for_the_alias(milter: ForwardingMilter, mta: PostfixInstance, sink: SmtpSink) -> None:
    """Spam to the alias and to bob: bob gets it tagged, the alias's copy never leaves and is held under it."""
    sent = mta.send(mta.inbound_port, "spammer@example.net", ["fwd@example.org", "bob@example.org"],
                    subject=SPAM_SUBJECT, body=SPAM_BODY)
    assert sent.accepted == ["fwd@example.org", "bob@example.org"], mta.log_tail()
    (bob,) = arrived(sink, "bob@example.org")
    mta.wait_queue_empty()
    assert bob.recipients == ("bob@example.org",)
    assert headers(bob, "Subject") == [f"*{{spam}}* {SPAM_SUBJECT}"]
    assert not [d for d in sink.snapshot() if "outside@example.net" in d.recipients]
    (held,) = [json.loads(line) for line in milter.cli("quarantine", "list", "--json").splitlines()]
    assert held["recipient"] == "fwd@example.org" and held["subject"] == SPAM_SUBJECT


def test_held_spam_never_leaves_for_the_forwarding_alias(
    tmp_path: Path, postfix_factory: Callable[..., PostfixInstance], smtp_sink: SmtpSink
) -> None:
    """Through real Postfix (virtual alias to an outside address): spam for the alias never reaches the
    sink and is held under the alias; the local recipient gets it tagged; ham is forwarded untouched."""
    milter = ForwardingMilter(tmp_path)
    ham, spam = training_mail(tmp_path)
    milter.cli("train", "--ham", str(ham), "--spam", str(spam))
    milter.start()
    try:
        mta = postfix_factory(
            milters=f"inet:127.0.0.1:{milter.port}",
            main_cf={"virtual_alias_maps": "inline:{ fwd@example.org=outside@example.net }"},
        )
        spam_is_held_for_the_alias(milter, mta, smtp_sink)

        sent = mta.send(mta.inbound_port, "friend@example.net", ["fwd@example.org"],
                        subject=HAM_SUBJECT, body=HAM_BODY)
        assert sent.accepted == ["fwd@example.org"], mta.log_tail()
        (forwarded,) = arrived(smtp_sink, "outside@example.net")
        assert headers(forwarded, "Subject") == [HAM_SUBJECT] and headers(forwarded, "X-Spam-Flag") == []
    finally:
        assert milter.stop() == 0, milter.output()
