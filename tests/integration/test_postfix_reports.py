"""Report addresses end to end: a user forwards spam as an attachment through a real Postfix.

A private Postfix with SASL users on its submission port and ``policyd
milter`` as its milter (``content.report_spam`` and ``report_ham`` set);
the test speaks SMTP like a mail client.  A report from an authenticated
user teaches the model in use; the same report from outside (port 25, no
AUTH) teaches nothing.  Neither is ever delivered.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import pytest

from tests.harness.postfix import PostfixInstance, SmtpSink
from tests.integration.test_postfix_milter import Milter
from tests.unit.content.test_classifier import training_mail

pytestmark = pytest.mark.integration

REPORTS = "  report_spam: spam-report@example.org\n  report_ham: [ham-report@example.org]\n"
ALICE = ("alice@example.org", "alice-secret")

#: The reported spam: words the model has never seen, so learning them moves its score.
REPORTED = (
    b"From: Promo <promo@offers.example.biz>\r\nTo: alice@example.org\r\n"
    b"Subject: zorglub offre wibblefrotz\r\nMessage-ID: <zorglub-1@offers.example.biz>\r\n"
    b"\r\nzorglub wibblefrotz quaxel zorglub offre speciale quaxel wibblefrotz\r\n"
)


@pytest.fixture
def site(
    tmp_path: Path, postfix_factory: Callable[..., PostfixInstance], smtp_sink: SmtpSink
) -> Iterator[tuple[Milter, PostfixInstance, SmtpSink]]:
    """A trained milter with report addresses behind a Postfix with the SASL user alice."""
    milter = Milter(tmp_path, content=REPORTS)
    ham, spam = training_mail(tmp_path)
    milter.cli("train", "--ham", str(ham), "--spam", str(spam))
    milter.start()
    mta = postfix_factory(milters=f"inet:127.0.0.1:{milter.port}", users=dict([ALICE]))
    try:
        yield milter, mta, smtp_sink
    finally:
        assert milter.stop() == 0, milter.output()


def report(sender: str, to: str, attached: bytes) -> bytes:
    """A report as a mail client's "Forward as attachment" makes it."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = "Fwd: spam"
    message["Message-ID"] = make_msgid(domain="client.example.net")
    message.set_content("This got through.\n")
    message.add_attachment(attached, maintype="message", subtype="rfc822", filename="spam.eml")
    return message.as_bytes()


def score(milter: Milter, tmp_path: Path) -> float:
    probe = tmp_path / "probe.eml"
    probe.write_bytes(REPORTED)
    return float(json.loads(milter.cli("score", "--json", str(probe)))["score"])


def models(milter: Milter) -> list[str]:
    """How each model file, newest first, was made."""
    return [json.loads(line)["made"] for line in milter.cli("model", "list", "--json").splitlines()]


def wait_for_log(milter: Milter, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in milter.output():
        assert time.monotonic() < deadline, f"no {text!r} in the milter's log:\n{milter.output()}"
        time.sleep(0.1)


def test_an_authenticated_report_teaches_the_model_and_is_not_delivered(
    site: tuple[Milter, PostfixInstance, SmtpSink], tmp_path: Path
) -> None:
    milter, mta, sink = site
    before = score(milter, tmp_path)
    assert models(milter) == ["train", "shipped"]
    with mta.connect(mta.submission_port, login=ALICE) as client:
        refused = client.sendmail(ALICE[0], ["spam-report@example.org"],
                                  report(ALICE[0], "spam-report@example.org", REPORTED))
    assert refused == {}
    wait_for_log(milter, "learned")
    deadline = time.monotonic() + 30
    while models(milter)[0] != "learn":
        assert time.monotonic() < deadline, milter.output()
        time.sleep(0.2)
    assert score(milter, tmp_path) > before
    entries = [json.loads(line) for line in milter.cli("audit", "--json").splitlines()]
    learned = [e for e in entries if e["action"] == "model-learn"]
    assert len(learned) == 1 and learned[0]["who"] == ALICE[0], entries
    assert "reported to spam-report@example.org" in learned[0]["reason"]
    # Never delivered, no bounce: the sink gets nothing, for the report address or for alice.
    time.sleep(1.0)
    assert sink.snapshot() == []


def test_a_report_from_outside_teaches_nothing(
    site: tuple[Milter, PostfixInstance, SmtpSink], tmp_path: Path
) -> None:
    milter, mta, sink = site
    before = score(milter, tmp_path)
    with mta.connect(mta.inbound_port) as client:
        refused = client.sendmail("someone@example.net", ["spam-report@example.org"],
                                  report("someone@example.net", "spam-report@example.org", REPORTED))
    assert refused == {}
    wait_for_log(milter, "report from an unauthenticated sender ignored")
    assert models(milter) == ["train", "shipped"]
    assert score(milter, tmp_path) == before
    time.sleep(1.0)
    assert sink.snapshot() == []
    # A report sent with AUTH but to both kinds of address is ignored too.
    with mta.connect(mta.submission_port, login=ALICE) as client:
        client.sendmail(ALICE[0], ["spam-report@example.org", "ham-report@example.org"],
                        report(ALICE[0], "spam-report@example.org", REPORTED))
    wait_for_log(milter, "report to both spam and ham addresses ignored")
    assert models(milter) == ["train", "shipped"]
    assert sink.snapshot() == []
