"""The milter's decisions (tag, X-Spam-*, each recipient's choice) and the quarantine's admin side."""

from __future__ import annotations

import email
import email.policy
from typing import Any

import numpy as np
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from policyd.checks.network_header import sign_header
from policyd.content import features as content
from policyd.content.classifier import Model, Reason
from policyd.content.scorer import ContentScorer
from policyd.content.spamfilter import SpamFilter, apply_changes, tagged_subject
from policyd.errors import PolicydError, UsageError
from policyd.protocols.milter import ACCEPT_UNCHANGED, change_header
from policyd.protocols.milter_message import MilterMessage
from policyd.protocols.milter_session import MilterProtocol
from policyd.quarantine.held import RELEASE_HEADER, Quarantine, release_header, released_for
from policyd.store import Quarantined
from policyd.store.memory import MemoryStore
from policyd.testing import FakeMTA, MilterReply
from tests.conftest import make_config
from tests.harness.smtp_sink import SmtpSink

SECRET = b"0123456789abcdef" * 4
T0 = 1_700_000_000.0
SPAMMY = b"Buy viagra now, cheap pills\r\n"
HAMMY = b"See you at the meeting tomorrow.\r\n"


class WordModel(Model):
    """Content points: +10 when the text says 'viagra', else -5."""

    def __init__(self) -> None:
        super().__init__(np.zeros(16, dtype=np.float32))

    def points(self, features: content.Features) -> float:
        return 10.0 if "viagra" in features.text else -5.0

    def explain(self, features: content.Features, top: int = 10) -> list[Reason]:
        return [Reason("viagra", 10.0)] if "viagra" in features.text else [Reason("meeting", -5.0)]

    def assess(
        self, features: content.Features, top: int = 10, explain_at: float | None = None
    ) -> tuple[float, list[Reason]]:
        return self.points(features), self.explain(features, top)


class Site:
    """A milter filter on a memory store, driven by a fake MTA."""

    def __init__(self, config_text: str = "", store: Any = None) -> None:
        self.config = make_config(config_text)
        self.store = store or MemoryStore()
        self.clock = Clock()
        self.clock.advance(T0)
        self.filter = SpamFilter(self.config, self.store, self.clock, ContentScorer(WordModel(), SECRET))

    def mta(self, **options: Any) -> FakeMTA:
        """A negotiated, connected fake MTA from client 192.0.2.7."""
        mta = FakeMTA(MilterProtocol(self.filter, self.clock, **options))
        mta.negotiate()
        mta.connect(address="192.0.2.7")
        return mta

    def send(
        self, recipients: list[str], headers: list[tuple[str, str]] | None = None, body: bytes = SPAMMY
    ) -> list[MilterReply]:
        """One message; the end-of-message replies."""
        if headers is None:
            headers = [("From", "x@example.net"), ("Subject", "Buy now")]
        return self.mta().message("spammer@example.net", recipients, headers, body)

    def held(self) -> list[tuple[Quarantined, bytes]]:
        """Everything in the quarantine."""
        return sorted(self.store.held.values(), key=lambda h: h[0].id)


def kinds(replies: list[MilterReply]) -> list[bytes]:
    """The command bytes of replies."""
    return [r.command for r in replies]


def changed(replies: list[MilterReply], name: str) -> list[tuple[int, str]]:
    """(index, value) of every change-header reply for ``name``."""
    return [(r.index, r.strings()[1]) for r in replies if r.command == b"m" and r.strings()[0] == name]


def added(replies: list[MilterReply]) -> dict[str, str]:
    """The headers added."""
    return {r.strings()[0]: r.strings()[1] for r in replies if r.command == b"h"}


def test_spam_to_an_inbox_and_a_quarantine_recipient() -> None:
    """Tagged once for the inbox recipient; the quarantine recipient is removed and one copy is held."""
    site = Site("quarantine:\n  default: inbox\n")
    site.store.set_preference("carol@example.org", "quarantine")
    replies = site.send(["bob@example.org", "Carol@Example.org"])
    assert kinds(replies) == [b"m", b"h", b"h", b"h", b"-", b"a"]
    assert changed(replies, "Subject") == [(1, "*{spam}* Buy now")]
    headers = added(replies)
    assert headers["X-Spam-Flag"] == "YES" and headers["X-Spam-Score"] == "10.0"
    assert headers["X-Spam-Status"].startswith("Yes, score=10.0 tag_at=5")
    assert replies[4].strings() == ["<Carol@Example.org>"]
    ((entry, message),) = site.held()
    assert entry.recipient == "carol@example.org" and entry.sender == "spammer@example.net"
    assert entry.score == 10.0 and entry.client == "192.0.2.7" and entry.queue_id == "4XyZ1"
    assert entry.until == T0 + 30 * 86400 and entry.reasons == ("viagra",)
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    assert parsed["Subject"] == "*{spam}* Buy now" and parsed["X-Spam-Flag"] == "YES"
    assert parsed.get_content().strip() == SPAMMY.decode().strip()
    assert entry.size == len(message)


def test_small_messages_are_scored_at_once_large_ones_in_the_thread_pool() -> None:
    """Up to inline_bytes a message is scored on the calling thread; a larger one goes through run_cpu."""
    sent: list[int] = []

    def run_cpu(work: Any, *args: Any) -> Deferred[Any]:
        sent.append(len(args[1]))
        return succeed(work(*args))

    site = Site()
    site.filter.run_cpu = run_cpu
    site.filter.inline_bytes = 10_000
    assert kinds(site.send(["bob@example.org"], body=HAMMY * 100)) == [b"a"]
    assert sent == []
    assert kinds(site.send(["bob@example.org"], body=HAMMY * 500)) == [b"a"]
    assert sent == [len(HAMMY) * 500]
    site.filter.inline_bytes = 0
    assert kinds(site.send(["bob@example.org"], body=SPAMMY))[-1] == b"a"
    assert sent[-1] == len(SPAMMY)


def test_ham_has_its_verdict_on_return() -> None:
    """A small ham message is decided at once: the Deferred has fired when the filter returns."""
    site = Site()
    message = MilterMessage(1 << 20, 1 << 20)
    message.recipients = ["<bob@example.org>"]
    message.add_header("Subject", "notes")
    message.add_body(HAMMY)
    decided = site.filter(message)
    assert decided.called
    assert decided.result == ACCEPT_UNCHANGED


def test_default_choice_applies_to_recipients_without_one() -> None:
    """quarantine.default: quarantine holds mail of recipients who chose nothing; inbox choices still win."""
    site = Site("quarantine:\n  default: quarantine\n")
    site.store.set_preference("bob@example.org", "inbox")
    replies = site.send(["bob@example.org", "dave@example.org"])
    assert [r.strings() for r in replies if r.command == b"-"] == [["<dave@example.org>"]]
    assert [e.recipient for e, _ in site.held()] == ["dave@example.org"]


def test_spam_held_for_every_recipient_is_discarded_from_delivery() -> None:
    """When every recipient chose the quarantine, the message is discarded after one copy each is held."""
    site = Site("quarantine:\n  default: quarantine\n")
    replies = site.send(["a@example.org", "b@example.org"])
    assert kinds(replies) == [b"d"]
    assert [e.recipient for e, _ in site.held()] == ["a@example.org", "b@example.org"]


def test_ham_is_untouched() -> None:
    """A message below tag_at is accepted without any change."""
    site = Site("quarantine:\n  default: quarantine\n")
    assert kinds(site.send(["bob@example.org"], body=HAMMY)) == [b"a"]
    assert site.held() == []


def test_forged_spam_headers_are_removed_even_from_ham() -> None:
    """Incoming X-Spam-* copies are removed, last first, so every index stays right."""
    site = Site()
    headers = [
        ("X-Spam-Status", "No, score=-50"),
        ("Subject", "hi"),
        ("X-Spam-Flag", "NO"),
        ("X-Spam-Status", "No"),
    ]
    replies = site.send(["bob@example.org"], headers, body=HAMMY)
    assert changed(replies, "X-Spam-Status") == [(2, ""), (1, "")]
    assert changed(replies, "X-Spam-Flag") == [(1, "")]
    assert kinds(replies)[-1] == b"a" and not added(replies)


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Buy now", "*{spam}* Buy now"),
        ("*{spam}* Buy now", None),
        ("=?UTF-8?B?KntzcGFtfSogQWNoZXRleg==?=", None),  # "*{spam}* Achetez", encoded
        ("=?UTF-8?Q?F=C3=A9licitations?=", "*{spam}* =?UTF-8?Q?F=C3=A9licitations?="),
        ("", "*{spam}*"),
        (None, "*{spam}*"),
    ],
)
def test_subject_is_tagged_exactly_once(subject: str | None, expected: str | None) -> None:
    """The tag goes in front once; encoded subjects stay valid encoded words; an empty one becomes the tag."""
    assert tagged_subject(subject, "*{spam}*") == expected
    if expected is not None and "=?" in expected:
        assert content.decode_header(expected) == "*{spam}* Félicitations"


def test_missing_subject_is_added() -> None:
    """A spam without Subject gets one holding the tag."""
    replies = Site().send(["bob@example.org"], [("From", "x@example.net")])
    assert added(replies)["Subject"] == "*{spam}*"
    assert not changed(replies, "Subject")


def network_header(score: float, client: str = "192.0.2.7", secret: bytes = SECRET) -> tuple[str, str]:
    """An X-Policyd-Network header as the policy server PREPENDs it."""
    return "X-Policyd-Network", sign_header(score, ["zen.example"], client, T0, secret)


def test_trusted_network_points_add_to_content_points() -> None:
    """The genuine header above Received adds its points: -5 content + 12 network = 7, spam."""
    site = Site()
    headers = [network_header(12), ("Received", "from x by mx"), ("Subject", "Lunch")]
    replies = site.send(["bob@example.org"], headers, body=HAMMY)
    status = added(replies)["X-Spam-Status"]
    assert "score=7.0" in status and "network=12" in status


@pytest.mark.parametrize(
    "headers",
    [
        [network_header(12, secret=b"not the secret" * 4), ("Subject", "Lunch")],
        [("Received", "from x by mx"), network_header(12), ("Subject", "Lunch")],
        [network_header(12, client="198.51.100.1"), ("Subject", "Lunch")],
        [("X-Policyd-Network", "score=50; reasons=forged; client=192.0.2.7; time=1; token=00"), ("Subject", "x")],
    ],
    ids=["wrong-secret", "below-received", "other-client", "bad-token"],
)
def test_forged_network_headers_change_nothing(headers: list[tuple[str, str]]) -> None:
    """A header the sender wrote, or one made for another client, adds no point."""
    assert kinds(Site().send(["bob@example.org"], headers, body=HAMMY)) == [b"a"]


def test_released_message_goes_to_the_inbox_once() -> None:
    """A genuine release header makes its recipient an inbox one for this message; the header is removed."""
    site = Site("quarantine:\n  default: quarantine\n")
    headers = [
        (RELEASE_HEADER, release_header(SECRET, 7, "carol@example.org")),
        ("Subject", "*{spam}* Buy now"),
        ("X-Spam-Flag", "YES"),
    ]
    replies = site.send(["carol@example.org"], headers)
    assert changed(replies, RELEASE_HEADER) == [(1, "")]
    assert changed(replies, "X-Spam-Flag") == [(1, "")]
    assert not changed(replies, "Subject")
    assert added(replies)["X-Spam-Flag"] == "YES"
    assert b"-" not in kinds(replies) and kinds(replies)[-1] == b"a"
    assert site.held() == []


def test_a_forged_release_header_does_not_free_the_message() -> None:
    """A release header without the right token is ignored (and removed)."""
    site = Site("quarantine:\n  default: quarantine\n")
    forged = release_header(b"wrong secret" * 4, 7, "carol@example.org")
    assert kinds(site.send(["carol@example.org"], [(RELEASE_HEADER, forged), ("Subject", "x")])) == [b"d"]
    assert released_for(forged, SECRET) is None
    assert released_for(release_header(SECRET, 7, "<Carol@example.org>"), SECRET) == "carol@example.org"


class BrokenQuarantine(MemoryStore):
    """A store that cannot hold mail."""

    def quarantine(self, entry: Quarantined, message: bytes) -> Deferred[Quarantined]:
        return fail(PolicydError("disk full"))


def test_when_the_quarantine_fails_mail_is_delivered_tagged(caplog: pytest.LogCaptureFixture) -> None:
    """A store error while holding never loses the message: that recipient gets it tagged."""
    site = Site("quarantine:\n  default: quarantine\n", store=BrokenQuarantine())
    replies = site.send(["bob@example.org"])
    assert b"-" not in kinds(replies) and b"d" not in kinds(replies)
    assert changed(replies, "Subject") == [(1, "*{spam}* Buy now")]
    assert "disk full" in caplog.text


def test_a_message_too_large_to_keep_is_delivered_tagged() -> None:
    """Past quarantine.max_size the message cannot be held whole, so it is delivered tagged."""
    site = Site("quarantine:\n  default: quarantine\n")
    mta = FakeMTA(MilterProtocol(site.filter, site.clock, memory_limit=1024, keep_limit=2048))
    mta.negotiate()
    mta.connect()
    replies = mta.message("s@example.net", ["bob@example.org"], [("Subject", "big")], SPAMMY + b"x" * 5000)
    assert kinds(replies)[-1] == b"a" and b"-" not in kinds(replies)
    assert site.held() == []


def test_apply_changes_as_the_mta_does() -> None:
    """Change, delete (by occurrence) and add give the headers the MTA delivers."""
    headers = [("Subject", "a"), ("X-Spam-Flag", "NO"), ("x-spam-flag", "NO2")]
    result = apply_changes(
        headers,
        [change_header("X-Spam-Flag", "", 2), change_header("Subject", "*{spam}* a", 1),
         change_header("X-New", "v", 1)],
    )
    assert result == [("Subject", "*{spam}* a"), ("X-Spam-Flag", "NO"), ("X-New", "v")]


# --- the admin side -------------------------------------------------------------------


def quarantine_with(
    entries: int = 1, smtp: str = "127.0.0.1:1", clock: Any = None
) -> tuple[Quarantine, MemoryStore]:
    """A Quarantine on a memory store holding ``entries`` messages for bob (a fake clock unless given)."""
    store = MemoryStore()
    config = make_config(f"quarantine:\n  smtp: '{smtp}'\n")
    if clock is None:
        clock = Clock()
        clock.advance(T0 + 10)
    start = clock.seconds() - 10
    for n in range(entries):
        entry = Quarantined(
            0, "bob@example.org", "spammer@example.net", f"spam {n}", 9.0, start + n, start + 3600, 10,
            queue_id=f"4XyZ{n + 1}",
        )
        message_id = f"Message-ID:\r\n <spam.{n + 1}@example.net>\r\n".encode()
        store.quarantine(entry, b"Subject: *{spam}* spam\r\n" + message_id + b"\r\nbody\r\n")
    return Quarantine(config, store, clock, SECRET), store


@pytest_twisted.ensureDeferred
async def test_release_reinjects_to_that_recipient_only() -> None:
    """Release sends the held copy to its recipient by SMTP with a valid release header, then forgets it."""
    sink = SmtpSink().start()
    try:
        # The real reactor: the SMTP client runs in its thread pool.
        quarantine, store = quarantine_with(smtp=f"127.0.0.1:{sink.port}", clock=reactor)
        entry = await quarantine.release(1, "admin", "false positive")
    finally:
        sink.stop()
    (delivery,) = sink.deliveries
    assert delivery.recipients == ("bob@example.org",) and delivery.sender == "spammer@example.net"
    assert released_for(delivery.header(RELEASE_HEADER) or "", SECRET) == "bob@example.org"
    assert entry.id == 1 and store.held == {}
    assert [(e.who, e.action, e.subject, e.reason) for e in store.entries] == [
        ("admin", "release", "quarantine #1 for bob@example.org",
         "false positive (Message-ID <spam.1@example.net>, queue id 4XyZ1)")
    ]


@pytest_twisted.ensureDeferred
async def test_release_through_a_dead_relay_keeps_the_message() -> None:
    """When quarantine.smtp is down, release fails with one line and the message stays held."""
    quarantine, store = quarantine_with(smtp="127.0.0.1:1", clock=reactor)
    with pytest.raises(PolicydError, match="cannot re-inject through 127.0.0.1:1"):
        await quarantine.release(1, "admin")
    assert list(store.held) == [1]


@pytest_twisted.ensureDeferred
async def test_list_show_delete_and_expiry() -> None:
    """Entries list newest first, show gives the bytes, delete is audited, expiry removes old ones."""
    quarantine, store = quarantine_with(entries=3)
    assert [e.id for e in await quarantine.entries()] == [3, 2, 1]
    assert [e.id for e in await quarantine.entries("BOB@example.org", limit=1)] == [3]
    entry, message = await quarantine.entry(2)
    assert entry.subject == "spam 1" and message.startswith(b"Subject:")
    await quarantine.delete(2, "admin")
    with pytest.raises(UsageError, match="no quarantined message #2"):
        await quarantine.entry(2)
    assert store.entries[-1].action == "quarantine-delete"
    assert store.entries[-1].reason == "deleted (Message-ID <spam.2@example.net>, queue id 4XyZ2)"
    quarantine.clock.advance(3600)  # type: ignore[attr-defined]
    assert await quarantine.expire() == 2
    assert await quarantine.entries() == []


@pytest_twisted.ensureDeferred
async def test_choices() -> None:
    """Choices are recorded by normalised address, audited, shown with the default, and validated."""
    quarantine, store = quarantine_with(entries=0)
    assert await quarantine.set_choice("<Bob@Example.org>", "quarantine", "admin") == "bob@example.org"
    assert await quarantine.choices(["bob@example.org", "eve@example.org"]) == {
        "bob@example.org": "quarantine",
        "eve@example.org": "inbox",
    }
    assert await quarantine.choices() == {"bob@example.org": "quarantine"}
    await quarantine.set_choice("bob@example.org", None, "admin")
    assert await quarantine.choices() == {}
    assert [e.reason for e in store.entries] == ["spam: quarantine", "spam: default"]
    with pytest.raises(UsageError, match="not a mail address"):
        await quarantine.set_choice("not an address", "inbox", "admin")
    with pytest.raises(UsageError, match="--spam"):
        await quarantine.set_choice("bob@example.org", "trash", "admin")


def test_message_id_is_read_unfolded_and_bounded() -> None:
    """The Message-ID of held bytes or of the milter's headers, folded or not, at most MAX_MESSAGE_ID long."""
    from policyd.quarantine.held import MAX_MESSAGE_ID, message_id

    assert message_id(b"Subject: x\r\nmessage-id:\r\n\t<a@b>\r\n\r\nMessage-ID: <body@x>\r\n") == "<a@b>"
    assert message_id(b"Subject: x\r\n\r\nMessage-ID: <in-body@x>\r\n") == ""
    assert message_id([("Subject", "x"), ("Message-Id", " <c@d>")]) == "<c@d>"
    assert len(message_id([("Message-ID", "<" + "x" * 5000 + ">")])) == MAX_MESSAGE_ID
