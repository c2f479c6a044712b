"""Feedback without an admin through the real commands: a released message is learned as ham, once."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.harness.servers import policyd
from tests.harness.smtp_sink import SmtpSink

#: A spam held for two recipients: two quarantine entries, one message.
HELD = (
    b"Subject: *{spam}* Lottery winner\r\nFrom: <x@example.net>\r\nMessage-ID: <lottery.7@example.net>\r\n\r\n"
    b"You won the lottery, claim your cash prize now, click here\r\n"
)


def hold_twice(path: Path) -> None:
    """Hold HELD for bob and for carol in the SQLite store at ``path``."""
    from policyd.store import Quarantined
    from policyd.store.sqlite import SQLiteStore

    store = SQLiteStore(str(path))
    now = time.time()
    for recipient in ("bob@example.org", "carol@example.org"):
        store.quarantine(Quarantined(0, recipient, "x@example.net", "Lottery winner", 9.0, now, now + 3600,
                                     len(HELD)), HELD)
    store.close()


def test_release_learns_the_message_as_ham_once(tmp_path: Path) -> None:
    """policyd quarantine release delivers, then learns the message as ham (audited, by the releaser); a second copy counts once."""
    sink = SmtpSink().start()
    try:
        config = tmp_path / "policyd.yaml"
        config.write_text(
            f'store:\n  url: "sqlite:///{tmp_path}/state.db"\nlocal_domains: [example.org]\n'
            f"outbound:\n  limit: 10\nquarantine:\n  smtp: '127.0.0.1:{sink.port}'\n",
            encoding="utf-8",
        )
        hold_twice(tmp_path / "state.db")
        for entry, who in (("1", "alice"), ("2", "bob")):
            result = policyd("quarantine", "release", entry, "--by", who, "-c", str(config))
            assert result.returncode == 0, result.stderr
        assert len(sink.deliveries) == 2
        models = [json.loads(line) for line in policyd("model", "list", "--json", "-c", str(config)).stdout.splitlines()]
        assert [(m["made"], m["in_use"]) for m in models] == [("learn", True), ("shipped", False)]
        assert (models[0]["ham"], models[0]["spam"]) == (1, 0)
        audit = [json.loads(line) for line in policyd("audit", "--json", "-c", str(config)).stdout.splitlines()]
        learned = [(a["who"], a["reason"]) for a in audit if a["action"] == "model-learn"]
        assert learned == [("alice", "learned 1 ham: quarantine #1 released (Message-ID <lottery.7@example.net>)")]
        assert [a["action"] for a in audit].count("release") == 2
    finally:
        sink.stop()
