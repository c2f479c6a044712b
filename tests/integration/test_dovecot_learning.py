"""Users teach the filter with their Junk folder: a real Dovecot runs the shipped IMAPSieve recipe.

A private Dovecot (tests/harness/dovecot.py) includes
``etc/dovecot/90-policyd-imapsieve.conf``, compiles the two shipped Sieve
scripts and pipes through the shipped ``policyd-learn`` (only its paths
set), which runs ``policyd learn -c CONFIG --spam|--ham -``.  The test is an
IMAP client (imaplib): it APPENDs to INBOX, MOVEs into Junk and out of it,
and looks at what policyd did: ``policyd model list``, the audit log, and
the message's score.  The pipe runs inside the MOVE, so its effect is there
when MOVE has answered.
"""

from __future__ import annotations

import imaplib
import json
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest

from tests.harness.dovecot import RECIPE, DovecotInstance, dovecot_factory, ensure_dovecot  # noqa: F401  (fixture)
from tests.harness.servers import policyd

pytestmark = pytest.mark.integration

USER, PASSWORD = "alice@example.org", "imap-secret"


@pytest.fixture
def policyd_dir(tmp_path: Path) -> Path:
    """A policyd configuration (SQLite store, the model beside it), the files of the test's own user."""
    (tmp_path / "policyd.yaml").write_text(
        f"store:\n  url: 'sqlite:///{tmp_path}/state.db'\nlocal_domains: [example.org]\n", encoding="utf-8"
    )
    return tmp_path


@pytest.fixture
def dovecot(dovecot_factory: Callable[..., DovecotInstance], policyd_dir: Path) -> DovecotInstance:  # noqa: F811
    """The private Dovecot with user alice and the recipe, learning into ``policyd_dir``'s configuration."""
    return dovecot_factory(users={USER: PASSWORD}, policyd_config=policyd_dir / "policyd.yaml")


def message(subject: str, body: str) -> bytes:
    """A message from outside to alice."""
    mail = EmailMessage()
    mail["From"] = "promo@example.biz"
    mail["To"] = USER
    mail["Subject"] = subject
    mail["Message-ID"] = make_msgid(domain="example.biz")
    mail.set_content(body)
    return mail.as_bytes()


def score(config: Path, raw: bytes, where: Path) -> float:
    """The message's score by ``policyd score --json``."""
    path = where / "probe.eml"
    path.write_bytes(raw)
    done = policyd("score", "-c", str(config), "--json", str(path))
    assert done.returncode == 0, done.stderr
    return float(json.loads(done.stdout)["score"])


def models(config: Path) -> list[dict[str, object]]:
    """``policyd model list --json``: newest first."""
    done = policyd("model", "list", "-c", str(config), "--json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def audit(state: Path) -> list[tuple[str, str, str]]:
    """(who, action, reason) of the audit log."""
    if not (state / "state.db").exists():
        return []
    with sqlite3.connect(state / "state.db") as db:
        return list(db.execute("SELECT who, action, reason FROM audit ORDER BY id"))


def ok(answer: tuple[str, Sequence[Any]], what: str, server: DovecotInstance) -> list[Any]:
    """The data of an IMAP answer that must be OK."""
    kind, data = answer
    assert kind == "OK", f"{what}: {kind} {data}\n{server.log_tail()}"
    return list(data)


def uid_of(client: imaplib.IMAP4, raw: bytes, server: DovecotInstance) -> str:
    """The UID of the message (by Message-ID) in the selected mailbox."""
    message_id = next(line for line in raw.splitlines() if line.lower().startswith(b"message-id:"))
    found = ok(client.uid("SEARCH", "HEADER", "Message-ID", message_id.split(b":", 1)[1].strip().decode()),
               "SEARCH", server)
    (uid,) = found[0].split()
    return str(uid.decode("ascii"))


def move(client: imaplib.IMAP4, source: str, raw: bytes, target: str, server: DovecotInstance) -> None:
    """SELECT ``source`` and MOVE the message into ``target`` (what a mail client does)."""
    ok(client.select(source), f"SELECT {source}", server)
    ok(client.uid("MOVE", uid_of(client, raw, server), target), f"MOVE to {target}", server)


def test_the_recipe_dovecot_runs_is_the_shipped_one(dovecot: DovecotInstance) -> None:
    """The private Dovecot reads the shipped snippet (Junk and the pipe), keeps its own sockets and port,
    and the pipe script differs from the shipped one only by its two settings."""
    assert dovecot.doveconf("plugin/imapsieve_mailbox1_name", "plugin/imapsieve_mailbox2_from").split() == [
        "Junk", "Junk"]
    assert dovecot.doveconf("service/policyd-learn/executable") == f"script {dovecot.sieve_dir}/policyd-learn"
    assert dovecot.doveconf("base_dir") == str(dovecot.base_dir) and dovecot.port not in (143, 993)
    shipped = (RECIPE / "policyd-learn").read_text(encoding="utf-8").splitlines()
    used = (dovecot.sieve_dir / "policyd-learn").read_text(encoding="utf-8").splitlines()
    differ = [(a, b) for a, b in zip(shipped, used, strict=True) if a != b]
    assert [a.split("=")[0] for a, _ in differ] == ["POLICYD", "CONFIG"]
    for name in ("report-spam.sieve", "report-ham.sieve"):
        assert (dovecot.sieve_dir / name).read_bytes() == (RECIPE / name).read_bytes()


def test_the_snippet_fits_debians_configuration(tmp_path: Path) -> None:
    """Dropped into a copy of Debian's /etc/dovecot/conf.d, the shipped snippet is read with the package's own
    settings (doveconf -n), and the documentation shows every shipped file as it is."""
    ensure_dovecot()
    debian = tmp_path / "dovecot"
    shutil.copytree("/etc/dovecot", debian)
    shutil.copy(RECIPE / "90-policyd-imapsieve.conf", debian / "conf.d")
    done = subprocess.run(["doveconf", "-c", str(debian / "dovecot.conf"), "-h", "plugin/sieve_plugins",
                           "plugin/imapsieve_mailbox1_before", "service/policyd-learn/user"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["sieve_imapsieve", "sieve_extprograms",
                                   "file:/etc/dovecot/sieve/report-spam.sieve", "policyd"]
    docs = (Path(__file__).resolve().parents[2] / "docs" / "classifier.md").read_text(encoding="utf-8")
    for shipped in sorted(RECIPE.iterdir()):
        assert f"\n{shipped.read_text(encoding='utf-8')}```\n" in docs, f"docs/classifier.md lacks {shipped.name}"


def test_moving_into_junk_learns_spam_and_out_of_it_learns_ham(
    dovecot: DovecotInstance, policyd_dir: Path,
) -> None:
    """MOVE INBOX -> Junk learns the message as spam (a new model in use, audited by the IMAP user, its
    score up); APPEND into Junk learns nothing; MOVE Junk -> INBOX learns ham (its score down)."""
    config = policyd_dir / "policyd.yaml"
    spam = message("zorglub offre speciale", "zorglub wibblefrotz zorglub offre speciale gratuit\n")
    ham = message("wibblefrotz minutes", "wibblefrotz grommet minutes of the grommet meeting\n")
    spam_before, ham_before = score(config, spam, policyd_dir), score(config, ham, policyd_dir)
    assert [m["made"] for m in models(config)] == ["shipped"]

    with dovecot.login(USER) as client:
        ok(client.append("INBOX", "", imaplib.Time2Internaldate(0), spam), "APPEND INBOX", dovecot)
        move(client, "INBOX", spam, "Junk", dovecot)
        after_spam = models(config)
        assert [(m["made"], m["in_use"]) for m in after_spam] == [("learn", True), ("shipped", False)], \
            dovecot.log_tail()
        assert (after_spam[0]["ham"], after_spam[0]["spam"]) == (0, 1)
        [(who, action, reason)] = audit(policyd_dir)
        assert (who, action) == (USER, "model-learn") and reason.startswith("learned 1 spam: reported (Message-ID <")
        assert score(config, spam, policyd_dir) > spam_before

        # The same message reported again (a second copy moved into Junk) counts once; the move happens.
        ok(client.append("INBOX", "", imaplib.Time2Internaldate(0), spam), "APPEND INBOX", dovecot)
        move(client, "INBOX", spam, "Junk", dovecot)
        assert len(models(config)) == 2 and len(audit(policyd_dir)) == 1, dovecot.log_tail()

        ok(client.append("Junk", "", imaplib.Time2Internaldate(0), ham), "APPEND Junk", dovecot)
        assert len(models(config)) == 2  # saving into Junk is no report
        move(client, "Junk", ham, "INBOX", dovecot)
        after_ham = models(config)
        assert [(m["made"], m["in_use"]) for m in after_ham] == [
            ("learn", True), ("learn", False), ("shipped", False)], dovecot.log_tail()
        assert (after_ham[0]["ham"], after_ham[0]["spam"]) == (1, 0)
        assert [entry[:2] for entry in audit(policyd_dir)] == [(USER, "model-learn")] * 2
        assert score(config, ham, policyd_dir) < ham_before
        ok(client.select("INBOX"), "SELECT INBOX", dovecot)
        assert uid_of(client, ham, dovecot)  # the move itself happened
        client.logout()


def test_moving_out_of_junk_to_trash_learns_nothing(dovecot: DovecotInstance, policyd_dir: Path) -> None:
    """A message thrown away from Junk (MOVE Junk -> Trash) is not learned as ham."""
    config = policyd_dir / "policyd.yaml"
    spam = message("zorglub offre", "zorglub offre speciale\n")
    with dovecot.login(USER) as client:
        ok(client.append("Junk", "", imaplib.Time2Internaldate(0), spam), "APPEND Junk", dovecot)
        move(client, "Junk", spam, "Trash", dovecot)
        ok(client.select("Trash"), "SELECT Trash", dovecot)
        assert uid_of(client, spam, dovecot)
        client.logout()
    assert [m["made"] for m in models(config)] == ["shipped"]
    assert audit(policyd_dir) == []


def test_the_pipe_script_refuses_a_wrong_kind(tmp_path: Path) -> None:
    """policyd-learn with neither spam nor ham says how to call it (exit 64) and learns nothing."""
    done = subprocess.run(["sh", str(RECIPE / "policyd-learn"), "junk", USER], capture_output=True, text=True,
                          timeout=60, input="")
    assert done.returncode == 64 and done.stderr.strip() == "usage: policyd-learn spam|ham USER"
