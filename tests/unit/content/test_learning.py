"""Learning onto a model, the held-back check, the labelled mail's order and the kept models."""

from __future__ import annotations

import io
import mailbox
import os
import random
import stat
from pathlib import Path

import pytest

from policyd.content import corpus, training
from policyd.content import features as content
from policyd.content.classifier import Model
from policyd.content.models import ModelFiles, Refused
from policyd.content.training import Check
from tests.unit.content.test_classifier import HAM_WORDS, SPAM_WORDS, mail
from tests.unit.content.test_classifier import corpus as messages


def examples(seed: int, each: int, flip: bool = False) -> list[tuple[content.Features, bool]]:
    """Features and labels of the small corpus in a shuffled order.

    :param flip: swap the labels of all but the held-back messages (every tenth): mail
        that contradicts itself, which no model learns well.
    """
    found = messages(seed=seed, each=each)
    random.Random(seed).shuffle(found)
    return [(content.extract(raw), spam != (flip and n % 10 != 9)) for n, (raw, spam) in enumerate(found)]


@pytest.fixture(scope="module")
def base() -> Model:
    """A model trained on the small corpus (2**16 weights)."""
    return training.train(examples(7, 40), bits=16)


def test_learn_moves_a_message_towards_its_label(base: Model) -> None:
    """Learning a message as ham lowers its points; the model learned from is left as it was."""
    raw = mail(SPAM_WORDS[:6] + HAM_WORDS[:6], "GAGNEZ")
    features = content.extract(raw)
    before = base.points(features)
    weights = base.weights.copy()
    learned = training.learn(base, [(features, False)] * 3)
    assert learned.points(features) < before - 1
    assert (base.weights == weights).all()
    assert learned.info["ham"] == 3 and learned.info["spam"] == 0
    assert (learned.scale, learned.offset) == (base.scale, base.offset)


def test_learn_needs_a_message(base: Model) -> None:
    """Learning nothing is an error, not a new model."""
    with pytest.raises(ValueError, match="nothing to learn"):
        training.learn(base, [])


def test_learn_checks_held_back_mail_before_the_final_model(base: Model) -> None:
    """Every tenth message is held back and scored by both models; the checker sees both."""
    seen: list[Check] = []
    training.learn(base, examples(21, 10), check=seen.append)
    assert len(seen) == 1 and seen[0].held == 2 and seen[0].held_spam == 1
    assert seen[0].worse() is None


def test_contradictory_mail_gives_a_clearly_worse_model(base: Model) -> None:
    """Mail whose labels contradict the held-back messages' does worse on them: the check says why."""
    seen: list[Check] = []
    training.learn(base, examples(22, 50, flip=True), check=seen.append)
    assert seen[0].held == 10
    reason = seen[0].worse()
    assert reason is not None and "held-back" in reason


def test_check_tolerates_noise_but_not_a_clear_loss() -> None:
    """One more error is noise; several more, or a much worse ranking, is clearly worse."""
    assert Check(20, 10, 2, 3, 0.99, 0.99).worse() is None
    assert "errors" in str(Check(20, 10, 2, 5, 0.99, 0.99).worse())
    assert "ROC area" in str(Check(20, 10, 2, 2, 0.99, 0.90).worse())
    assert Check(6, 1, 0, 0, 0.99, 0.5).worse() is None  # too few spam to judge a ranking


def test_train_refuses_through_its_checker(base: Model) -> None:
    """train gives its held-back comparison with the model in use to the checker, which may refuse."""

    def refuse(check: Check) -> None:
        raise Refused(check.summary())

    with pytest.raises(Refused, match="held back [0-9]+: errors"):
        training.train(examples(7, 40), bits=16, current=base, check=refuse)


def test_labelled_mail_is_one_sequence_by_file_name(tmp_path: Path) -> None:
    """Ham and spam files of every PATH come in one file-name order; an mbox keeps its order; - is stdin."""
    ham, spam = tmp_path / "ham", tmp_path / "spam"
    ham.mkdir()
    spam.mkdir()
    for name in ("0001", "0004"):
        (ham / name).write_bytes(b"Subject: ham\n\nhello\n")
    for name in ("0002", "0003"):
        (spam / name).write_bytes(b"From x@example.net Tue Aug  6 11:51:02 2002\nSubject: spam\n\nwin\n")
    box = mailbox.mbox(tmp_path / "0000.mbox")
    box.add(b"Subject: first\n\n1\n")
    box.add(b"Subject: second\n\n2\n")
    box.close()
    stdin = io.BytesIO(b"Subject: piped\n\nreported\n")
    found = corpus.labelled_mail([str(ham), str(tmp_path / "0000.mbox")], [str(spam), "-"], stdin)
    assert [(Path(m.where).name, m.spam) for m in found] == [
        ("-", True), ("0000.mbox#1", False), ("0000.mbox#2", False),
        ("0001", False), ("0002", True), ("0003", True), ("0004", False),
    ]
    assert found[0].read() == b"Subject: piped\n\nreported\n"
    assert found[4].read() == b"Subject: spam\n\nwin\n"  # the mbox From line is not the message's


def test_labelled_mail_errors(tmp_path: Path) -> None:
    """A missing PATH and a second - are errors naming the option."""
    with pytest.raises(corpus.MailError, match="--spam .*nope: no such file"):
        corpus.labelled_mail([], [str(tmp_path / "nope")])
    with pytest.raises(corpus.MailError, match="once"):
        corpus.labelled_mail(["-"], ["-"], io.BytesIO(b""))


def test_swap_keeps_the_previous_models_and_rollback_returns_to_them(base: Model, tmp_path: Path) -> None:
    """Each swap keeps the model it replaces (the shipped one first), at most KEEP; rollback walks back."""
    shipped = tmp_path / "shipped.model"
    base.save(shipped)
    files = ModelFiles(tmp_path / "state" / "content.model", shipped)
    assert [k.made for k in files.listing()] == ["train"] and files.listing()[0].path == shipped
    for number in range(7):
        model = Model(base.weights + number, info={"ham": number, "spam": 1})
        with files.locked():
            files.swap(model, "learn")
    listing = files.listing()
    assert [k.ham for k in listing] == [6, 5, 4, 3, 2, 1] and listing[0].in_use
    assert stat.S_IMODE(os.stat(files.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(files.kept_dir).st_mode) == 0o700
    assert all(stat.S_IMODE(os.stat(k.path).st_mode) == 0o600 for k in listing)
    with files.locked():
        restored = files.rollback()
    assert restored.ham == 5 and restored.made == "learn"
    now = files.listing()
    assert now[0].made == "rollback" and [k.ham for k in now] == [5, 4, 3, 2, 1]
    assert float(Model.load(files.path).weights[0]) == pytest.approx(float(base.weights[0]) + 5, abs=0.01)
    for _ in range(4):
        with files.locked():
            files.rollback()
    with files.locked(), pytest.raises(Refused, match="no previous model"):
        files.rollback()


def test_the_shipped_model_is_kept_on_the_first_swap(base: Model, tmp_path: Path) -> None:
    """The first learn on a fresh install keeps the shipped model, so a rollback goes back to it."""
    shipped = tmp_path / "shipped.model"
    Model(base.weights, info={"ham": 9, "spam": 9, "corpus": "public"}).save(shipped)
    files = ModelFiles(tmp_path / "content.model", shipped)
    with files.locked():
        files.swap(Model(base.weights, info={"ham": 1, "spam": 0}), "learn")
    assert [(k.made, k.ham) for k in files.listing()] == [("learn", 1), ("shipped", 9)]
    with files.locked():
        assert files.rollback().made == "shipped"
