"""Feedback without an admin: single messages learned once, released mail learned as ham after the release."""

from __future__ import annotations

import logging
import stat
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from policyd.config import Config
from policyd.content import features as content
from policyd.content import training
from policyd.content.classifier import Model
from policyd.content.feedback import (
    Feedback,
    Learned,
    NewMessages,
    Outcome,
    learn_message,
    message_key,
    untagged,
)
from policyd.content.models import ModelFiles
from policyd.quarantine.held import Quarantine
from policyd.reactor import inline
from policyd.store import Quarantined
from policyd.store.memory import MemoryStore
from tests.conftest import make_config
from tests.unit.content.test_classifier import HAM_WORDS, SPAM_WORDS, mail
from tests.unit.content.test_classifier import corpus as messages

T0 = 1_700_000_000.0
SPAM = b"Subject: *{spam}* GAGNEZ\r\nMessage-ID: <win.1@example.net>\r\nTo: bob@example.org\r\n\r\n" + " ".join(
    SPAM_WORDS[:8]
).encode() + b"\r\n"


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model (2**16 weights) trained on the test corpus, standing for the shipped one."""
    found = messages(seed=3, each=30)
    model = training.train([(content.extract(raw), spam) for raw, spam in found], bits=16)
    path = tmp_path_factory.mktemp("shipped") / "small.model"
    model.save(path)
    return path


def files_in(tmp_path: Path, shipped: Path) -> ModelFiles:
    """The model files of a configuration whose store is in ``tmp_path``."""
    return ModelFiles(tmp_path / "content.model", shipped)


def config_in(tmp_path: Path, extra: str = "") -> Config:
    """A configuration whose store (and so model) is in ``tmp_path``."""
    return make_config(f"store:\n  url: sqlite:///{tmp_path}/state.db\n{extra}")


def test_message_key_is_the_message_id_else_the_body() -> None:
    """Copies that differ in their top headers share a key; without a Message-ID the body decides."""
    first = b"Delivered-To: bob@example.org\r\nMessage-ID:  <A@x>\r\n\r\nbody\r\n"
    second = b"Delivered-To: eve@example.org\r\nSubject: *{spam}* hi\r\nmessage-id: <a@x>\r\n\r\nother\r\n"
    assert message_key(first) == message_key(second)
    assert message_key(b"To: a@b\r\n\r\nbody\r\n") == message_key(b"To: c@d\n\nbody\n")
    assert message_key(b"To: a@b\r\n\r\nbody\r\n") != message_key(b"To: a@b\r\n\r\nanother\r\n")


def test_our_tag_is_taken_off_the_subject() -> None:
    """A held or reported copy is learned as the mail was, without our Subject tag."""
    assert untagged([("Subject", "*{spam}* Lunch"), ("To", "*{spam}* x")], "*{spam}*") == [
        ("Subject", "Lunch"), ("To", "*{spam}* x")
    ]
    assert untagged([("Subject", "Lunch")], "*{spam}*") == [("Subject", "Lunch")]


def test_a_message_is_learned_once_per_label(tmp_path: Path, small: Path) -> None:
    """Learning moves the model towards the label and keeps the old one; the same message again does nothing."""
    config = config_in(tmp_path)
    files = files_in(tmp_path, small)
    features = content.message_features(*content.split_message(SPAM))
    before = Model.load(small).points(features)
    first = learn_message(config, SPAM, False, files)
    assert first.learned and not first.spam and first.message_id == "<win.1@example.net>"
    learned = Model.load(files.path)
    assert learned.points(features) < before and learned.info["made"] == "learn"
    assert [k.made for k in files.kept()] == ["shipped"]
    # The same message forwarded again (another recipient's copy): once.
    again = learn_message(config, b"Delivered-To: eve@example.org\r\n" + SPAM, False, files)
    assert not again.learned and len(files.kept()) == 1
    # The other label is a correction: learned.
    assert learn_message(config, SPAM, True, files).learned and len(files.kept()) == 2
    memory = files.path.with_name("content.model.learned")
    assert Learned(memory).read() == {first.key: "spam"}
    assert stat.S_IMODE(memory.stat().st_mode) == 0o600


def test_the_memory_of_learned_messages_is_bounded(tmp_path: Path) -> None:
    """Only the latest keys are remembered; a key learned again moves to the end."""
    memory = Learned(tmp_path / "learned", remembered=3)
    memory.write({"a": "ham", "b": "spam", "c": "ham", "d": "ham"})
    assert list(memory.read()) == ["b", "c", "d"]
    found = memory.read()
    found.pop("b")
    found["b"] = "ham"
    memory.write(found)
    assert memory.read() == {"c": "ham", "d": "ham", "b": "ham"}


def test_a_learn_run_is_remembered_whole_and_what_it_gives_again_stays_newest(tmp_path: Path) -> None:
    """A run with more messages than the bound keeps them all; a message skipped as learned
    moves to the newest end, so the bound forgets what is no longer given, not what is given every time."""
    memory = Learned(tmp_path / "learned", remembered=3)
    memory.write({"a": "ham", "b": "spam", "c": "ham", "d": "ham"}, at_least=4)
    assert list(memory.read()) == ["a", "b", "c", "d"]
    raws = [f"Message-ID: <{n}@example.org>\n\nbody {n}\n".encode() for n in range(3)]
    first = NewMessages({})
    assert [first(raw, True) for raw in raws] == [True, True, True]
    again = NewMessages(first.remembered())
    # The oldest is given again (skipped); the newest twice (once learned, the repeat skipped) as ham.
    assert again(raws[0], True) is False
    assert again(raws[2], False) is True and again(raws[2], False) is False
    assert (again.learning, again.skipped) == (1, 2)
    order = list(again.remembered())
    assert order[-2:] == [message_key(raws[0]), message_key(raws[2])]
    assert again.remembered()[message_key(raws[2])] == "ham"


class Relay:
    """A deliver() that takes every message, or fails them all."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.sent: list[tuple[str, bytes]] = []

    def __call__(self, smtp: str, sender: str, recipient: str, message: bytes) -> Deferred[Any]:
        if self.error is not None:
            raise self.error
        self.sent.append((recipient, message))
        return succeed(None)


def held(config: Config, count: int, clock: Clock, relay: Relay, feedback: Feedback) -> tuple[Quarantine, MemoryStore]:
    """A quarantine holding ``count`` copies of SPAM (one per recipient) released through ``relay``."""
    store = MemoryStore()
    feedback.store = store
    for n in range(count):
        entry = Quarantined(0, f"user{n}@example.org", "x@example.net", "GAGNEZ", 9.0, T0, T0 + 3600, len(SPAM))
        store.quarantine(entry, SPAM)
    return Quarantine(config, store, clock, b"s" * 32, relay, feedback=feedback), store


@pytest_twisted.ensureDeferred
async def test_release_learns_ham_once(tmp_path: Path, small: Path) -> None:
    """Released copies are learned as ham after delivery, audited as model-learn by the releaser, once per message."""
    clock = Clock()
    clock.advance(T0)
    config = config_in(tmp_path)
    files = files_in(tmp_path, small)
    feedback = Feedback(MemoryStore(), inline, clock, lambda c, raw, spam: learn_message(c, raw, spam, files))
    relay = Relay()
    quarantine, store = held(config, 2, clock, relay, feedback)
    await quarantine.release(1, "admin", "false positive")
    await quarantine.release(2, "self-service")
    await quarantine.settled()
    assert len(relay.sent) == 2
    actions = [(e.who, e.action) for e in store.entries]
    assert actions == [("admin", "release"), ("admin", "model-learn"), ("self-service", "release")]
    learn_entry = store.entries[1]
    assert learn_entry.subject == str(files.path) and learn_entry.at == T0
    assert learn_entry.reason == "learned 1 ham: quarantine #1 released (Message-ID <win.1@example.net>)"
    assert Model.load(files.path).info["ham"] == 1


@pytest_twisted.ensureDeferred
async def test_learning_never_fails_or_delays_a_release(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A learner that fails leaves the release done, with one error line; a slow one is not waited for."""
    clock = Clock()

    def broken(config: Config, raw: bytes, spam: bool) -> Outcome:
        raise OSError("disk full")

    relay = Relay()
    quarantine, store = held(config_in(tmp_path), 2, clock, relay, Feedback(MemoryStore(), inline, clock, broken))
    with caplog.at_level(logging.ERROR, "policyd.content"):
        await quarantine.release(1, "admin")
    assert [e.action for e in store.entries] == ["release"] and len(relay.sent) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "content model: quarantine #1 released not learned as ham: disk full"
    ]
    waiting: Deferred[Outcome] = Deferred()
    slow = Feedback(store, lambda work, *args: waiting, clock)
    quarantine.feedback = slow
    entry = await quarantine.release(2, "admin")  # fires although learning has not finished
    assert entry.id == 2 and store.held == {}
    waiting.callback(Outcome(True, False, "k", ""))
    await quarantine.settled()
    assert [e.action for e in store.entries] == ["release", "release", "model-learn"]


@pytest_twisted.ensureDeferred
async def test_release_learns_nothing_when_switched_off(tmp_path: Path) -> None:
    """content.learn_from_release: false releases without learning."""
    calls: list[bytes] = []

    def learner(config: Config, raw: bytes, spam: bool) -> Outcome:
        calls.append(raw)
        return Outcome(True, spam, "k", "")

    clock = Clock()
    config = config_in(tmp_path, "content:\n  learn_from_release: false\n")
    quarantine, store = held(config, 1, clock, Relay(), Feedback(MemoryStore(), inline, clock, learner))
    await quarantine.release(1, "admin")
    assert calls == [] and [e.action for e in store.entries] == ["release"]


@pytest_twisted.ensureDeferred
async def test_a_failed_release_learns_nothing(tmp_path: Path) -> None:
    """When the MTA does not take the message, it stays held and is not learned."""
    calls: list[bytes] = []

    def learner(config: Config, raw: bytes, spam: bool) -> Outcome:
        calls.append(raw)
        return Outcome(True, spam, "k", "")

    clock = Clock()
    quarantine, store = held(config_in(tmp_path), 1, clock, Relay(OSError("refused")),
                             Feedback(MemoryStore(), inline, clock, learner))
    with pytest.raises(OSError):
        await quarantine.release(1, "admin")
    assert calls == [] and list(store.held) == [1]


def test_learned_ham_words_score_lower(tmp_path: Path, small: Path) -> None:
    """A hammy message learned as spam scores higher afterwards (the label is what the caller says)."""
    raw = mail(HAM_WORDS[:8], "Réunion")
    files = files_in(tmp_path, small)
    features = content.extract(raw)
    before = Model.load(small).points(features)
    assert learn_message(config_in(tmp_path), raw, True, files).learned
    assert Model.load(files.path).points(features) > before


# --- report addresses -----------------------------------------------------------------

REPORTS = "content:\n  report_spam: spam-report@example.org\n  report_ham: [Ham-Report@example.org]\n"


def report_of(*attached: bytes, eml: bool = False) -> tuple[list[tuple[str, str]], bytes]:
    """Headers and body of a report forwarding ``attached`` as message/rfc822 parts (or .eml files)."""
    parts = [b"--b\r\nContent-Type: text/plain\r\n\r\nThis one is spam.\r\n"]
    for raw in attached:
        if eml:
            parts.append(b"--b\r\nContent-Type: application/octet-stream; name=\"x.eml\"\r\n"
                         b"Content-Disposition: attachment; filename=\"x.eml\"\r\n\r\n" + raw + b"\r\n")
        else:
            parts.append(b"--b\r\nContent-Type: message/rfc822\r\n\r\n" + raw + b"\r\n")
    body = b"".join(parts) + b"--b--\r\n"
    headers = [("From", "alice@example.org"), ("Subject", "Fwd: spam"), ("MIME-Version", "1.0"),
               ("Content-Type", 'multipart/mixed; boundary="b"')]
    return headers, body


class ReportSite:
    """A spam filter with report addresses whose learner records what it is given."""

    def __init__(self, tmp_path: Path, config_text: str = REPORTS) -> None:
        from policyd.content.scorer import ContentScorer
        from policyd.content.spamfilter import SpamFilter

        self.store = MemoryStore()
        self.clock = Clock()
        self.clock.advance(T0)
        self.config = config_in(tmp_path, config_text)
        self.filter = SpamFilter(self.config, self.store, self.clock, ContentScorer(Model.load(small_path(tmp_path)), None))
        self.learned: list[tuple[bytes, bool]] = []
        self.keys: set[tuple[str, bool]] = set()
        self.filter.reports.feedback.learn_message = self.learn  # a recording learner

    def learn(self, config: Config, raw: bytes, spam: bool) -> Outcome:
        key = message_key(raw)
        if (key, spam) in self.keys:
            return Outcome(False, spam, key, "")
        self.keys.add((key, spam))
        self.learned.append((raw, spam))
        return Outcome(True, spam, key, "")

    def send(self, recipients: list[str], headers: list[tuple[str, str]], body: bytes, user: str = "alice") -> list[bytes]:
        """One message from ``user`` (unauthenticated when empty); the kinds of end-of-message replies."""
        from policyd.protocols.milter_session import MilterProtocol
        from policyd.testing import FakeMTA

        mta = FakeMTA(MilterProtocol(self.filter, self.clock))
        mta.negotiate()
        mta.connect(address="192.0.2.7")
        if user:
            mta.macros(b"M", auth_authen=user)
        replies = mta.message("alice@example.org", recipients, headers, body)
        return [r.command for r in replies]


def small_path(tmp_path: Path) -> Path:
    """A tiny model file for the scorer (the reports never reach it)."""
    path = tmp_path / "scorer.model"
    if not path.exists():
        training.train([(content.extract(raw), spam) for raw, spam in messages(seed=5, each=10)], bits=12).save(path)
    return path


def test_a_report_is_learned_and_discarded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An authenticated user's report is discarded; each attached message is learned by the address, once."""
    site = ReportSite(tmp_path)
    headers, body = report_of(SPAM, mail(HAM_WORDS[:5], "Other"))
    with caplog.at_level(logging.INFO, "policyd"):
        assert site.send(["Spam-Report@example.org"], headers, body) == [b"d"]
    assert [spam for _, spam in site.learned] == [True, True]
    assert message_key(site.learned[0][0]) == message_key(SPAM)
    assert [(e.who, e.action, e.reason) for e in site.store.entries] == [
        ("alice", "model-learn", "learned 1 spam: reported to spam-report@example.org (Message-ID (none))"),
        ("alice", "model-learn", "learned 1 spam: reported to spam-report@example.org (Message-ID (none))"),
    ]
    # Reported again (by anyone): counted once.  As ham, to the other address: a correction.
    with caplog.at_level(logging.INFO, "policyd"):
        assert site.send(["spam-report@example.org"], *report_of(SPAM), user="bob") == [b"d"]
        assert site.send(["ham-report@example.org"], *report_of(SPAM, eml=True)) == [b"d"]
    assert [spam for _, spam in site.learned] == [True, True, False]
    assert any("already learned as spam" in r.getMessage() for r in caplog.records)


def test_reports_that_do_not_count_are_discarded_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Outside senders' reports, reports without a message and to both addresses are discarded, learned from never."""
    site = ReportSite(tmp_path)
    with caplog.at_level(logging.INFO, "policyd"):
        assert site.send(["spam-report@example.org"], *report_of(SPAM), user="") == [b"d"]
        assert site.send(["spam-report@example.org"], [("Subject", "spam!")], b"see above\r\n") == [b"d"]
        assert site.send(["spam-report@example.org", "ham-report@example.org"], *report_of(SPAM)) == [b"d"]
    assert site.learned == [] and site.store.entries == []
    lines = [r.getMessage() for r in caplog.records if r.name == "policyd.milter" and "report" in r.getMessage()]
    assert [line.split(": ", 1)[1] for line in lines] == [
        "report from an unauthenticated sender ignored (discarded)",
        "report with no attached message ignored (discarded)",
        "report to both spam and ham addresses ignored (discarded)",
    ]


def test_mail_to_a_report_address_and_a_person_is_not_a_report(tmp_path: Path) -> None:
    """Only a message whose every recipient is a report address is a report; without report addresses nothing is."""
    site = ReportSite(tmp_path)
    assert b"d" not in site.send(["spam-report@example.org", "bob@example.org"], *report_of(SPAM))
    plain = ReportSite(tmp_path, "")
    assert b"d" not in plain.send(["spam-report@example.org"], *report_of(SPAM))
    assert site.learned == plain.learned == []


def test_a_report_learns_onto_the_model_in_use(tmp_path: Path, small: Path) -> None:
    """With the real learner, a report changes the model file the milter reads and audits it."""
    site = ReportSite(tmp_path)
    files = files_in(tmp_path, small)
    site.filter.reports.feedback.learn_message = lambda c, raw, spam: learn_message(c, raw, spam, files)
    assert site.send(["spam-report@example.org"], *report_of(SPAM)) == [b"d"]
    assert Model.load(files.path).info["spam"] == 1
    assert [e.action for e in site.store.entries] == ["model-learn"]
