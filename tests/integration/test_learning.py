"""policyd learn, model list and model rollback through the real command, on a fresh install's shipped model."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

from tests.harness.servers import policyd
from tests.integration.test_classifier_cli import write_config
from tests.unit.content.test_classifier import corpus

#: A message the shipped model knows nothing about: the words of the small corpus's spam, in French.
PROBE = "GAGNEZ 1"


def score(config: Path, message: Path) -> float:
    """The score of one message by ``policyd score --json``."""
    done = policyd("score", "-c", str(config), "--json", str(message))
    assert done.returncode == 0, done.stderr
    return float(json.loads(done.stdout)["score"])


def write_mail(folder: Path, numbered: list[tuple[int, bytes]]) -> Path:
    """Message files named by their number (the learning order)."""
    folder.mkdir()
    for number, raw in numbered:
        (folder / f"{number:05d}.eml").write_bytes(raw)
    return folder


def reports(root: Path, contradict: bool = False, seed: int = 31) -> tuple[Path, Path]:
    """Ham and spam folders whose files, numbered across both, interleave the two kinds.

    :param contradict: label all but every tenth message (the held-back ones) wrongly.
    :param seed: which messages (another seed: other messages).
    """
    found = corpus(seed=seed, each=30)
    random.Random(seed).shuffle(found)
    ham, spam = [], []
    for number, (raw, is_spam) in enumerate(found):
        (spam if is_spam != (contradict and number % 10 != 9) else ham).append((number, raw))
    root.mkdir(exist_ok=True)
    return write_mail(root / "ham", ham), write_mail(root / "spam", spam)


def audit(tmp_path: Path) -> list[tuple[str, str]]:
    """(action, reason) of the audit log of the SQLite store."""
    with sqlite3.connect(tmp_path / "state.db") as db:
        return list(db.execute("SELECT action, reason FROM audit ORDER BY id"))


def test_learn_changes_the_score_and_rollback_undoes_it(tmp_path: Path) -> None:
    """learn puts a new model in use at once (score sees it); model list shows both; rollback returns."""
    config = write_config(tmp_path)
    probe = tmp_path / "probe.eml"
    probe.write_bytes(next(raw for raw, spam in corpus(seed=32, each=1) if spam))
    before = score(config, probe)
    ham, spam = reports(tmp_path)

    learned = policyd("learn", "-c", str(config), "--ham", str(ham), "--spam", str(spam), "--json")
    assert learned.returncode == 0, learned.stderr
    result = json.loads(learned.stdout)
    assert (result["ham"], result["spam"]) == (30, 30) and result["check"]["held"] == 6
    after = score(config, probe)
    assert after > before + 3

    listed = policyd("model", "list", "-c", str(config), "--json")
    assert listed.returncode == 0, listed.stderr
    models = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [(m["made"], m["in_use"]) for m in models] == [("learn", True), ("shipped", False)]
    assert (models[0]["ham"], models[0]["spam"]) == (30, 30)
    table = policyd("model", "list", "-c", str(config))
    assert table.returncode == 0 and "learn" in table.stdout and "shipped" in table.stdout

    back = policyd("model", "rollback", "-c", str(config))
    assert back.returncode == 0, back.stderr
    assert score(config, probe) == before
    again = policyd("model", "rollback", "-c", str(config))
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "no previous model" in again.stderr
    actions = [action for action, _ in audit(tmp_path)]
    assert actions == ["model-learn", "model-rollback"]
    assert "learned 30 ham and 30 spam" in audit(tmp_path)[0][1]


def test_learn_reads_one_message_from_stdin(tmp_path: Path) -> None:
    """--spam - learns the one message piped in (a Dovecot IMAPSieve pipe), and it scores higher after."""
    config = write_config(tmp_path)
    raw = b"From: promo@example.biz\nSubject: zorglub offre\n\nzorglub wibblefrotz zorglub offre speciale\n"
    probe = tmp_path / "probe.eml"
    probe.write_bytes(raw)
    before = score(config, probe)
    learned = policyd("learn", "-c", str(config), "--spam", "-", "--json", input=raw.decode())
    assert learned.returncode == 0, learned.stderr
    result = json.loads(learned.stdout)
    assert result["spam"] == 1 and Path(result["previous"]).is_file()  # the shipped model, kept
    after = score(config, probe)
    assert after > before

    again = policyd("learn", "-c", str(config), "--spam", "-", input=raw.decode())
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "already learned as spam" in again.stderr
    assert score(config, probe) == after
    corrected = policyd("learn", "-c", str(config), "--ham", "-", input=raw.decode())
    assert corrected.returncode == 0, corrected.stderr
    assert score(config, probe) < after
    assert [reason for action, reason in audit(tmp_path)] == [
        "learned 1 spam: reported (Message-ID (none))",
        "learned 1 ham: reported (Message-ID (none))",
    ]
    empty = policyd("learn", "-c", str(config), "--ham", "-", input="")
    assert empty.returncode == 2 and "standard input is empty" in empty.stderr


def test_a_clearly_worse_model_is_refused_unless_forced(tmp_path: Path) -> None:
    """Reports that contradict their own held-back messages are refused (exit 1, one line); --force learns them."""
    config = write_config(tmp_path)
    first_ham, first_spam = reports(tmp_path / "good")
    assert policyd("learn", "-c", str(config), "--ham", str(first_ham), "--spam", str(first_spam)).returncode == 0
    ham, spam = reports(tmp_path / "bad", contradict=True, seed=33)

    refused = policyd("learn", "-c", str(config), "--ham", str(ham), "--spam", str(spam))
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "refused" in refused.stderr and "--force" in refused.stderr
    listed = policyd("model", "list", "-c", str(config), "--json")
    assert len(listed.stdout.splitlines()) == 2  # nothing changed

    forced = policyd("learn", "-c", str(config), "--ham", str(ham), "--spam", str(spam), "--force")
    assert forced.returncode == 0, forced.stderr
    assert audit(tmp_path)[-1][1].endswith("forced")


def test_learn_usage_errors(tmp_path: Path) -> None:
    """No PATH, a missing PATH (2) and an empty folder (1: nothing to learn) are one line each."""
    config = write_config(tmp_path)
    none = policyd("learn", "-c", str(config))
    assert none.returncode == 2 and none.stderr.count("\n") == 1
    missing = policyd("learn", "-c", str(config), "--ham", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = policyd("learn", "-c", str(config), "--spam", str(tmp_path / "empty"))
    assert empty.returncode == 1 and "nothing to learn" in empty.stderr


def test_mail_learned_before_is_left_out(tmp_path: Path) -> None:
    """Learning the same folders again (a nightly job over users' Junk) learns only what is new or relabelled."""
    config = write_config(tmp_path)
    ham, spam = reports(tmp_path)
    assert policyd("learn", "-c", str(config), "--ham", str(ham), "--spam", str(spam)).returncode == 0

    again = policyd("learn", "-c", str(config), "--ham", str(ham), "--spam", str(spam))
    assert again.returncode == 1 and again.stderr.count("\n") == 1, again.stderr
    assert "nothing new to learn: the 60 messages given were learned before" in again.stderr
    listed = policyd("model", "list", "-c", str(config), "--json")
    assert len(listed.stdout.splitlines()) == 2  # nothing changed

    # One ham the user now calls spam, and two new spam (one of them twice, in two users' folders).
    moved = sorted(ham.iterdir())[0]
    moved.rename(spam / moved.name)
    new = [raw for raw, is_spam in corpus(seed=34, each=2) if is_spam]
    (spam / "90000.eml").write_bytes(new[0])
    (spam / "90001.eml").write_bytes(new[1])
    (spam / "90002.eml").write_bytes(new[1])
    learned = policyd("learn", "-c", str(config), "--ham", str(ham), "--spam", str(spam), "--json")
    assert learned.returncode == 0, learned.stderr
    result = json.loads(learned.stdout)
    assert (result["ham"], result["spam"], result["skipped"]) == (0, 3, 60)
    assert audit(tmp_path)[-1][1].startswith("learned 0 ham and 3 spam (60 learned before, left out)")

    # One message piped in that a folder taught already is not learned twice either.
    piped = policyd("learn", "-c", str(config), "--spam", "-", input=new[0].decode())
    assert piped.returncode == 1 and "already learned as spam" in piped.stderr


def test_train_starts_the_memory_of_learned_mail_afresh(tmp_path: Path) -> None:
    """After train, what it trained on counts as learned; what the replaced model learned does not."""
    config = write_config(tmp_path)
    ham, spam = reports(tmp_path / "first")
    assert policyd("learn", "-c", str(config), "--ham", str(ham), "--spam", str(spam)).returncode == 0
    other_ham, other_spam = reports(tmp_path / "second", seed=35)
    trained = policyd("train", "-c", str(config), "--ham", str(other_ham), "--spam", str(other_spam), "--force")
    assert trained.returncode == 0, trained.stderr

    same = policyd("learn", "-c", str(config), "--ham", str(other_ham), "--spam", str(other_spam))
    assert same.returncode == 1 and "nothing new to learn" in same.stderr
    earlier = policyd("learn", "-c", str(config), "--ham", str(ham), "--spam", str(spam), "--json")
    assert earlier.returncode == 0, earlier.stderr
    assert json.loads(earlier.stdout)["skipped"] == 0


def test_a_rollback_forgets_what_the_forgotten_model_learned(tmp_path: Path) -> None:
    """After a rollback the mail the dropped model learned can be learned again onto the restored one."""
    config = write_config(tmp_path)
    ham, spam = reports(tmp_path)
    assert policyd("learn", "-c", str(config), "--ham", str(ham), "--spam", str(spam)).returncode == 0
    assert policyd("model", "rollback", "-c", str(config)).returncode == 0
    again = policyd("learn", "-c", str(config), "--ham", str(ham), "--spam", str(spam), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["skipped"] == 0
