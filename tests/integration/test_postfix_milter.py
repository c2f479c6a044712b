"""End to end: a real Postfix asks a real ``policyd milter`` about every message.

A private Postfix (tests/postfix.py) with ``smtpd_milters`` pointing at
``policyd milter`` (a child process, SQLite store, a model trained here by
``policyd train``) delivers to a recording SMTP sink; the test speaks SMTP
to Postfix's inbound port like any Internet client.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.postfix import (
    PostfixInstance,
    SmtpSink,
)
from tests.harness.servers import POLICYD, free_port, policyd, wait_for_port
from tests.harness.smtp_sink import Delivery
from tests.unit.content.test_classifier import HAM_WORDS, SPAM_WORDS, training_mail

pytestmark = pytest.mark.integration

SPAM_SUBJECT = "GAGNEZ un cadeau gratuit"
SPAM_BODY = " ".join(SPAM_WORDS * 3) + "\n"
HAM_SUBJECT = "Notes de la réunion"
HAM_BODY = " ".join(HAM_WORDS * 3) + "\n"


class Milter:
    """``policyd milter -c CONFIG`` as a child process, and its configuration."""

    def __init__(self, root: Path, network_weight: float | None = None, content: str = "") -> None:
        """:param content: more lines of the ``content`` section (indented)."""
        self.root = root
        self.port = free_port()
        self.policy_port = free_port()
        self.network_weight = network_weight
        self.content = content
        self.config = root / "policyd.yaml"
        self.log = root / "milter.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.write_config(smtp="127.0.0.1:25")

    def write_config(self, smtp: str) -> None:
        """The configuration (quarantine.smtp is only read by ``policyd quarantine release``)."""
        inbound = ""
        if self.network_weight is not None:
            # The test client comes from loopback: a network list puts it at level 1 or 2.
            (self.root / "listed.cidr").write_text("127.0.0.0/8  # the test client\n", encoding="utf-8")
            inbound = (
                "inbound:\n  tag_at: 5\n  reject_at: 10\n  networks:\n"
                f"    - file: '{self.root}/listed.cidr'\n      weight: {self.network_weight}\n"
            )
        self.config.write_text(
            f"listen:\n  policy: 'tcp:{self.policy_port}:interface=127.0.0.1'\n"
            f"  milter: 'tcp:{self.port}:interface=127.0.0.1'\n"
            f"store:\n  url: 'sqlite:///{self.root}/state.db'\n"
            "local_domains: [example.org]\noutbound:\n  limit: 5000\n"
            # The model below is trained on 120 messages: cautious, so spam starts at 0 points.
            "content:\n  tag_at: 0\n" + self.content +
            f"quarantine:\n  default: inbox\n  smtp: '{smtp}'\n" + inbound,
            encoding="utf-8",
        )

    def cli(self, *args: str) -> str:
        """Run ``policyd ARGS -c CONFIG``; it must succeed."""
        result = policyd(*args, "-c", str(self.config))
        assert result.returncode == 0, f"policyd {' '.join(args)}: {result.stderr}\n{self.output()}"
        return result.stdout

    def start(self) -> None:
        """Start and wait until it listens (the contract: within 10 seconds)."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [POLICYD, "milter", "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for_port(self.port, timeout=10.0, process=self.process)

    def stop(self) -> int:
        """SIGTERM; the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("policyd milter did not exit after SIGTERM") from None

    def output(self) -> str:
        """What the milter logged."""
        return self.log.read_text(encoding="utf-8", errors="replace")


@pytest.fixture
def site(
    tmp_path: Path, postfix_factory: Callable[..., PostfixInstance], smtp_sink: SmtpSink
) -> Iterator[tuple[Milter, PostfixInstance, SmtpSink]]:
    """A trained milter behind a real Postfix; the milter must exit 0 on SIGTERM at the end."""
    milter = Milter(tmp_path)
    ham, spam = training_mail(tmp_path)
    milter.cli("train", "--ham", str(ham), "--spam", str(spam))
    milter.start()
    mta = postfix_factory(
        milters=f"inet:127.0.0.1:{milter.port}",
        main_cf={"virtual_alias_maps": "inline:{ fwd@example.org=outside@example.net }"},
    )
    milter.write_config(smtp=f"127.0.0.1:{mta.inbound_port}")
    try:
        yield milter, mta, smtp_sink
    finally:
        assert milter.stop() == 0, milter.output()


def to(recipient: str) -> Callable[[Delivery], bool]:
    """Deliveries that include ``recipient``."""
    return lambda delivery: recipient in delivery.recipients


def arrived(sink: SmtpSink, recipient: str, count: int = 1) -> list[Delivery]:
    """The deliveries to ``recipient`` once ``count`` have arrived."""
    sink.wait_for(lambda found: len([d for d in found if recipient in d.recipients]) >= count, timeout=60)
    return [d for d in sink.snapshot() if recipient in d.recipients]


def headers(delivery: Delivery, name: str) -> list[str]:
    """Every value of header ``name`` in a delivered message."""
    from email import message_from_bytes, policy

    return [str(v) for v in message_from_bytes(delivery.data, policy=policy.default).get_all(name, [])]


def test_spam_is_tagged_for_inbox_and_held_for_quarantine_then_released(
    site: tuple[Milter, PostfixInstance, SmtpSink],
) -> None:
    """Two recipients: the inbox one gets '*{spam}* ...' once, the other nothing until released."""
    milter, mta, sink = site
    milter.cli("prefs", "set", "bob@example.org", "--spam", "inbox")
    milter.cli("prefs", "set", "carol@example.org", "--spam", "quarantine")
    sent = mta.send(mta.inbound_port, "spammer@example.net", ["bob@example.org", "carol@example.org"],
                    subject=SPAM_SUBJECT, body=SPAM_BODY)
    assert sent.accepted == ["bob@example.org", "carol@example.org"], mta.log_tail()
    assert sent.data_reply is not None and sent.data_reply[0] == 250, sent.data_reply
    (bob,) = arrived(sink, "bob@example.org")
    mta.wait_queue_empty()
    assert bob.recipients == ("bob@example.org",), mta.log_tail()
    assert headers(bob, "Subject") == [f"*{{spam}}* {SPAM_SUBJECT}"]
    assert headers(bob, "X-Spam-Flag") == ["YES"]
    assert len(headers(bob, "X-Spam-Status")) == 1 and headers(bob, "X-Spam-Status")[0].startswith("Yes")
    assert not [d for d in sink.snapshot() if "carol@example.org" in d.recipients]

    (held,) = [json.loads(line) for line in milter.cli("quarantine", "list", "--json").splitlines()]
    assert held["recipient"] == "carol@example.org" and held["sender"] == "spammer@example.net"
    assert held["subject"] == SPAM_SUBJECT and held["queue_id"]

    milter.cli("quarantine", "release", str(held["id"]))
    (carol,) = arrived(sink, "carol@example.org")
    mta.wait_queue_empty()
    assert carol.recipients == ("carol@example.org",)
    assert headers(carol, "Subject") == [f"*{{spam}}* {SPAM_SUBJECT}"]
    assert headers(carol, "X-Spam-Flag") == ["YES"]
    assert headers(carol, "X-Policyd-Release") == []
    assert milter.cli("quarantine", "list", "--json") == ""
    assert len([d for d in sink.snapshot() if "bob@example.org" in d.recipients]) == 1


def test_ham_arrives_untouched(site: tuple[Milter, PostfixInstance, SmtpSink]) -> None:
    """A ham message reaches both recipients with its Subject and no X-Spam header, nothing held."""
    milter, mta, sink = site
    milter.cli("prefs", "set", "carol@example.org", "--spam", "quarantine")
    sent = mta.send(mta.inbound_port, "friend@example.net", ["bob@example.org", "carol@example.org"],
                    subject=HAM_SUBJECT, body=HAM_BODY)
    assert sent.accepted == ["bob@example.org", "carol@example.org"], mta.log_tail()
    sink.wait_for(lambda found: sum(len(d.recipients) for d in found) >= 2, timeout=60)
    mta.wait_queue_empty()
    deliveries = sink.snapshot()
    assert sorted(r for d in deliveries for r in d.recipients) == ["bob@example.org", "carol@example.org"]
    for delivery in deliveries:
        assert headers(delivery, "Subject") == [HAM_SUBJECT]
        assert headers(delivery, "X-Spam-Flag") == [] and headers(delivery, "X-Spam-Status") == []
    assert milter.cli("quarantine", "list", "--json") == ""


def test_spam_to_a_forwarding_alias_is_tagged_then_forwarded(
    site: tuple[Milter, PostfixInstance, SmtpSink],
) -> None:
    """Postfix's virtual alias forwards outside; the forwarded copy carries the tag."""
    milter, mta, sink = site
    sent = mta.send(mta.inbound_port, "spammer@example.net", ["fwd@example.org"],
                    subject=SPAM_SUBJECT, body=SPAM_BODY)
    assert sent.accepted == ["fwd@example.org"], mta.log_tail()
    (forwarded,) = arrived(sink, "outside@example.net")
    assert headers(forwarded, "Subject") == [f"*{{spam}}* {SPAM_SUBJECT}"]
    assert headers(forwarded, "X-Spam-Flag") == ["YES"]


@pytest.mark.parametrize("weight", [6.0, 12.0], ids=["level-1", "level-2"])
def test_network_reputation_and_content_together(
    weight: float,
    tmp_path: Path,
    postfix_factory: Callable[..., PostfixInstance],
    smtp_sink: SmtpSink,
) -> None:
    """Level 1: the header Postfix prepends adds its points, so ham content from that client is tagged;
    level 2: the message to a forwarding alias is refused at RCPT and never forwarded."""
    from tests.harness.servers import PolicydServer

    milter = Milter(tmp_path, network_weight=weight)
    milter.start()
    server = PolicydServer(milter.config, milter.policy_port).start()
    try:
        mta = postfix_factory(
            policy_port=milter.policy_port,
            milters=f"inet:127.0.0.1:{milter.port}",
            main_cf={"virtual_alias_maps": "inline:{ fwd@example.org=outside@example.net }"},
        )
        sent = mta.send(mta.inbound_port, "friend@example.net", ["fwd@example.org"],
                        subject=HAM_SUBJECT, body=HAM_BODY)
        if weight >= 10:
            assert sent.accepted == [], mta.log_tail()
            code, text = sent.refused["fwd@example.org"]
            assert code == 554 and "5.7.1" in text and "listed.cidr" in text
            mta.wait_queue_empty()
            assert smtp_sink.snapshot() == []
            return
        assert sent.accepted == ["fwd@example.org"], mta.log_tail()
        (forwarded,) = arrived(smtp_sink, "outside@example.net")
        assert len(headers(forwarded, "X-Policyd-Network")) == 1
        (status,) = headers(forwarded, "X-Spam-Status")
        assert f"network={weight:g}" in status, (status, milter.output())
        assert headers(forwarded, "Subject") == [f"*{{spam}}* {HAM_SUBJECT}"]
    finally:
        assert server.stop() == 0, server.output()
        assert milter.stop() == 0, milter.output()


# --- the header block is judged whole (SPEC 6, last bullet) ------------------------------

#: Forged copies of policyd's headers, in the case variants a sender may write.
FORGED = [("X-Spam-Flag", "NO"), ("x-spam-flag", "NO"), ("X-SPAM-STATUS", "No, score=-100"),
          ("x-Spam-Score", "-100.0")]


def filler(count: int, size: int = 1) -> list[tuple[str, str]]:
    """``count`` harmless headers with values of ``size`` bytes."""
    return [(f"X-Filler-{n}", "f" * size) for n in range(count)]


def send_headers(
    mta: PostfixInstance, recipients: list[str], headers: list[tuple[str, str]], body: str = SPAM_BODY
) -> tuple[int, str]:
    """Send a message with exactly these headers (and From, To, Message-ID, Date); DATA's final (code, text)."""
    import smtplib
    from email.utils import formatdate, make_msgid

    lines = [f"{name}: {value}" for name, value in headers]
    lines += ["From: spammer@example.net", "To: undisclosed-recipients:;",
              f"Message-ID: {make_msgid(domain='client.example.net')}", f"Date: {formatdate()}"]
    data = ("\r\n".join(lines) + "\r\n\r\n" + body.replace("\n", "\r\n")).encode()
    with mta.connect(mta.inbound_port) as client:
        assert client.mail("spammer@example.net")[0] == 250
        for recipient in recipients:
            assert client.rcpt(recipient)[0] == 250, mta.log_tail()
        try:
            code, text = client.data(data)
        except smtplib.SMTPDataError as refused:
            code, text = refused.smtp_code, refused.smtp_error
        return code, text.decode("utf-8", "replace")


def headers_named(delivery: Delivery) -> list[tuple[str, str]]:
    """Every header of a delivered message, (name, value) in order, values as they came."""
    from email import message_from_bytes, policy

    return list(message_from_bytes(delivery.data, policy=policy.compat32).items())


def judged_whole(delivery: Delivery, sent: list[tuple[str, str]]) -> None:
    """As many Subjects as sent, each tagged; only policyd's X-Spam-*; every filler header sent, in order."""
    found = headers_named(delivery)
    subjects = [v for n, v in found if n.lower() == "subject"]
    assert len(subjects) == len([n for n, _ in sent if n.lower() == "subject"]), subjects
    assert all(v.startswith("*{spam}* ") for v in subjects), subjects
    spam = [(n, v) for n, v in found if n.lower().startswith("x-spam-")]
    assert sorted(n for n, _ in spam) == ["X-Spam-Flag", "X-Spam-Score", "X-Spam-Status"], spam
    assert dict(spam)["X-Spam-Flag"] == "YES" and dict(spam)["X-Spam-Status"].startswith("Yes")
    assert [h for h in found if h[0].startswith("X-Filler-")] == [h for h in sent if h[0].startswith("X-Filler-")]


def test_a_thousand_headers_before_the_subject_through_postfix(
    site: tuple[Milter, PostfixInstance, SmtpSink],
) -> None:
    """1,000 headers, a forged X-Spam-Flag: NO, then Subject: the recipient sees only the tagged Subject and ours."""
    _, mta, sink = site
    sent = [*filler(1000), ("X-Spam-Flag", "NO"), ("Subject", SPAM_SUBJECT)]
    assert send_headers(mta, ["bob@example.org"], sent)[0] == 250
    (bob,) = arrived(sink, "bob@example.org")
    judged_whole(bob, sent)
    assert headers(bob, "Subject") == [f"*{{spam}}* {SPAM_SUBJECT}"]
    assert headers(bob, "X-Spam-Flag") == ["YES"]


def test_two_subjects_through_postfix(site: tuple[Milter, PostfixInstance, SmtpSink]) -> None:
    """Two Subject headers: the recipient gets both tagged, not only the first."""
    _, mta, sink = site
    sent = [("Subject", SPAM_SUBJECT), *FORGED, ("Subject", "Second subject")]
    assert send_headers(mta, ["bob@example.org"], sent)[0] == 250
    (bob,) = arrived(sink, "bob@example.org")
    judged_whole(bob, sent)
    assert headers(bob, "Subject") == [f"*{{spam}}* {SPAM_SUBJECT}", "*{spam}* Second subject"]


def test_more_than_512_kib_of_headers_through_postfix(site: tuple[Milter, PostfixInstance, SmtpSink]) -> None:
    """630 KiB of headers (lines under the 998 bytes SMTP allows), forged copies in four cases, two Subjects last."""
    _, mta, sink = site
    sent = [*filler(700, 900), *FORGED, ("Subject", SPAM_SUBJECT), ("subject", "again")]
    assert sum(len(n) + len(v) + 4 for n, v in sent) > 512 * 1024
    assert send_headers(mta, ["bob@example.org"], sent)[0] == 250
    (bob,) = arrived(sink, "bob@example.org")
    judged_whole(bob, sent)
    assert len([n for n, _ in headers_named(bob) if n.startswith("X-Filler-")]) == 700


def test_a_header_block_beyond_the_bound_is_refused_through_postfix(
    site: tuple[Milter, PostfixInstance, SmtpSink],
) -> None:
    """Over 1 MiB of headers: the client is told 552 5.6.0 at end of DATA and nothing is delivered or held."""
    milter, mta, sink = site
    milter.cli("prefs", "set", "carol@example.org", "--spam", "quarantine")
    sent = [*filler(1200, 900), ("X-Spam-Flag", "NO"), ("Subject", SPAM_SUBJECT)]
    code, text = send_headers(mta, ["bob@example.org", "carol@example.org"], sent)
    assert code == 552 and text.startswith("5.6.0 Message header too large"), (code, text)
    mta.wait_queue_empty()
    assert sink.snapshot() == []
    assert milter.cli("quarantine", "list", "--json") == ""
    assert "refused (header block of 1206 fields" in milter.output()


def test_a_held_copy_keeps_every_header_through_postfix(site: tuple[Milter, PostfixInstance, SmtpSink]) -> None:
    """Held for a quarantine recipient, then released: the copy has all 1,000 headers, both Subjects tagged."""
    milter, mta, sink = site
    milter.cli("prefs", "set", "carol@example.org", "--spam", "quarantine")
    sent = [("Subject", SPAM_SUBJECT), *filler(1000), ("x-spam-flag", "NO"), ("Subject", "Second subject")]
    assert send_headers(mta, ["bob@example.org", "carol@example.org"], sent)[0] == 250
    (bob,) = arrived(sink, "bob@example.org")
    judged_whole(bob, sent)
    (held,) = [json.loads(line) for line in milter.cli("quarantine", "list", "--json").splitlines()]
    assert held["recipient"] == "carol@example.org"
    milter.cli("quarantine", "release", str(held["id"]))
    (carol,) = arrived(sink, "carol@example.org")
    judged_whole(carol, sent)
    assert headers(carol, "Subject") == [f"*{{spam}}* {SPAM_SUBJECT}", "*{spam}* Second subject"]
    assert [n for n, _ in headers_named(carol) if n.startswith("X-Filler-")] == [f"X-Filler-{n}" for n in range(1000)]


def test_spam_needing_too_many_header_changes_is_refused_through_postfix(
    site: tuple[Milter, PostfixInstance, SmtpSink],
) -> None:
    """101 Subject headers on spam: refused with 554 5.6.0 at end of DATA rather than delivered half-tagged."""
    _, mta, sink = site
    sent = [("Subject", f"{SPAM_SUBJECT} {n}") for n in range(101)]
    code, text = send_headers(mta, ["bob@example.org"], sent)
    assert code == 554 and text.startswith("5.6.0 Too many Subject"), (code, text)
    mta.wait_queue_empty()
    assert sink.snapshot() == []
