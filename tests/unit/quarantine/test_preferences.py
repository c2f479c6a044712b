"""Spam choices: own (CLI, web) over provisioning (file or Postfix table) over the default."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from policyd.quarantine.held import Quarantine
from policyd.quarantine.preferences import (
    DEFAULT,
    OWN,
    PROVISIONED,
    Choice,
    Preferences,
    ProvisionedChoices,
)
from policyd.store.memory import MemoryStore
from tests.conftest import make_config
from tests.unit.quarantine.test_held import Site, kinds

T0 = 1_700_000_000.0


def clock_at(when: float = T0) -> Clock:
    clock = Clock()
    clock.advance(when)
    return clock


def write(path: Path, text: str, when: float) -> None:
    """Write a file and give it a distinct modification time (same-second edits are seen too)."""
    path.write_text(text, encoding="utf-8")
    os.utime(path, (when, when))


@pytest.fixture
def postmap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The real postmap, with a main.cf of its own (the system's may not exist)."""
    (tmp_path / "main.cf").write_text("compatibility_level = 3.6\n", encoding="utf-8")
    monkeypatch.setenv("MAIL_CONFIG", str(tmp_path))
    found = shutil.which("postmap") or "/usr/sbin/postmap"
    assert Path(found).exists(), "postfix (postmap) is needed: `make test` installs it"
    return found


@pytest_twisted.ensureDeferred
async def test_own_choice_wins_over_provisioning_which_wins_over_the_default(tmp_path: Path) -> None:
    """A file entry applies to its address (and @domain to the rest of the domain); a recorded choice wins."""
    source = tmp_path / "spam"
    write(source, "# provisioning\ncarol@example.org  quarantine\n@example.net\tQuarantine # whole domain\n"
                  "bob@example.org inbox\nbroken line\nerin@example.org trash\n", T0)
    store = MemoryStore()
    config = make_config(f"quarantine:\n  default: inbox\n  preferences: {source}\n")
    preferences = Preferences(config, store, clock_at())
    await store.set_preference("bob@example.org", "quarantine")
    found = await preferences.choices(
        ["carol@example.org", "bob@example.org", "x@example.net", "erin@example.org", "eve@example.org"]
    )
    assert found == {
        "carol@example.org": Choice("quarantine", PROVISIONED),
        "bob@example.org": Choice("quarantine", OWN),
        "x@example.net": Choice("quarantine", PROVISIONED),
        "erin@example.org": Choice("inbox", DEFAULT),
        "eve@example.org": Choice("inbox", DEFAULT),
    }
    await store.set_preference("carol@example.org", "inbox")
    assert await preferences.spam(["carol@example.org"]) == {"carol@example.org": "inbox"}


@pytest_twisted.ensureDeferred
async def test_a_provisioning_file_is_read_again_when_it_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An edited file applies within RECHECK seconds; a vanished one counts as empty; SIGHUP re-reads at once."""
    source = tmp_path / "spam"
    write(source, "carol@example.org quarantine\n", T0)
    clock = clock_at()
    provisioned = ProvisionedChoices(str(source), clock)
    assert await provisioned.lookup(["carol@example.org"]) == {"carol@example.org": "quarantine"}
    write(source, "carol@example.org inbox\n", T0 + 1)
    assert await provisioned.lookup(["carol@example.org"]) == {"carol@example.org": "quarantine"}
    clock.advance(1)
    assert await provisioned.lookup(["carol@example.org"]) == {"carol@example.org": "inbox"}
    # The same size and time (an editor that restores both): only SIGHUP notices.
    write(source, "carol@example.org inbox\n".replace("inbox", "INBOX"), T0 + 1)
    provisioned.reload()
    assert await provisioned.lookup(["carol@example.org"]) == {"carol@example.org": "inbox"}
    source.unlink()
    clock.advance(1)
    assert await provisioned.lookup(["carol@example.org"]) == {}
    assert "does not exist" in caplog.text


@pytest_twisted.ensureDeferred
async def test_a_postfix_table_is_read_with_postmap(tmp_path: Path, postmap: str) -> None:
    """hash:FILE answers through postmap -q (address, then @domain); a rebuilt table applies within RECHECK."""
    source = tmp_path / "spam"
    source.write_text("carol@example.org quarantine\n@example.net quarantine\nbob@example.org inbox\n", encoding="utf-8")
    subprocess.run([postmap, f"hash:{source}"], check=True)
    clock = clock_at()
    config = make_config(f"quarantine:\n  default: inbox\n  preferences: hash:{source}\n")
    preferences = Preferences(config, MemoryStore(), clock)
    assert await preferences.choices(["Carol@example.org".lower(), "x@example.net", "bob@example.org", "eve@example.org"]) == {
        "carol@example.org": Choice("quarantine", PROVISIONED),
        "x@example.net": Choice("quarantine", PROVISIONED),
        "bob@example.org": Choice("inbox", PROVISIONED),
        "eve@example.org": Choice("inbox", DEFAULT),
    }
    source.write_text("carol@example.org inbox\n", encoding="utf-8")
    subprocess.run([postmap, f"hash:{source}"], check=True)
    os.utime(f"{source}.db", (T0 + 5, T0 + 5))
    clock.advance(1)
    assert await preferences.spam(["carol@example.org", "x@example.net"]) == {
        "carol@example.org": "inbox",
        "x@example.net": "inbox",
    }


@pytest_twisted.ensureDeferred
async def test_a_broken_table_is_logged_and_mail_gets_the_other_choices(
    tmp_path: Path, postmap: str, caplog: pytest.LogCaptureFixture
) -> None:
    """postmap failing (missing table) is one log line and is left alone a while; own choices and the default apply."""
    store = MemoryStore()
    config = make_config(f"quarantine:\n  default: quarantine\n  preferences: hash:{tmp_path}/missing\n")
    preferences = Preferences(config, store, clock_at())
    await store.set_preference("bob@example.org", "inbox")
    for _ in range(3):
        assert await preferences.spam(["bob@example.org", "carol@example.org"]) == {
            "bob@example.org": "inbox",
            "carol@example.org": "quarantine",
        }
    complaints = [r for r in caplog.records if "postmap -q failed" in r.getMessage()]
    assert len(complaints) == 1 and "missing" in complaints[0].getMessage()


def test_the_milter_applies_provisioned_choices(tmp_path: Path) -> None:
    """Spam to a recipient provisioned 'quarantine' is held; an own 'inbox' choice delivers it tagged instead."""
    source = tmp_path / "spam"
    write(source, "carol@example.org quarantine\n", T0)
    site = Site(f"quarantine:\n  default: inbox\n  preferences: {source}\n")
    replies = site.send(["bob@example.org", "carol@example.org"])
    assert [r.strings() for r in replies if r.command == b"-"] == [["<carol@example.org>"]]
    assert [e.recipient for e, _ in site.held()] == ["carol@example.org"]
    site.store.set_preference("carol@example.org", "inbox")
    replies = site.send(["carol@example.org"])
    assert b"-" not in kinds(replies) and len(site.held()) == 1


@pytest_twisted.ensureDeferred
async def test_prefs_show_tells_the_provisioned_choice(tmp_path: Path) -> None:
    """Quarantine.choices (policyd prefs show) gives own, else provisioned, else default."""
    source = tmp_path / "spam"
    write(source, "carol@example.org quarantine\n", T0)
    config = make_config(f"quarantine:\n  default: inbox\n  preferences: {source}\n")
    quarantine = Quarantine(config, MemoryStore(), clock_at())
    await quarantine.set_choice("dave@example.org", "quarantine", "admin")
    assert await quarantine.choices(["carol@example.org", "dave@example.org", "eve@example.org"]) == {
        "carol@example.org": "quarantine",
        "dave@example.org": "quarantine",
        "eve@example.org": "inbox",
    }


@pytest_twisted.ensureDeferred
async def test_reloading_the_configuration_reads_provisioning_again(tmp_path: Path) -> None:
    """configure() (SIGHUP) re-reads the same source at once, switches to a new one, or drops it."""
    first, second = tmp_path / "one", tmp_path / "two"
    write(first, "carol@example.org quarantine\n", T0)
    write(second, "carol@example.org inbox\n", T0)
    clock = clock_at()
    preferences = Preferences(make_config(f"quarantine:\n  preferences: {first}\n"), MemoryStore(), clock)
    assert await preferences.spam(["carol@example.org"]) == {"carol@example.org": "quarantine"}
    write(first, "carol@example.org INBOX\n", T0)  # the clock has not moved: only a reload looks now
    preferences.configure(make_config(f"quarantine:\n  preferences: {first}\n"))
    assert await preferences.spam(["carol@example.org"]) == {"carol@example.org": "inbox"}
    preferences.configure(make_config(f"quarantine:\n  default: quarantine\n  preferences: {second}\n"))
    assert (await preferences.choices(["carol@example.org"]))["carol@example.org"] == Choice("inbox", PROVISIONED)
    preferences.configure(make_config("quarantine:\n  default: quarantine\n"))
    assert (await preferences.choices(["carol@example.org"]))["carol@example.org"] == Choice("quarantine", DEFAULT)
