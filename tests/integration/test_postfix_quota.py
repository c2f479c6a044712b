"""End to end: a real Postfix asks a real ``policyd serve`` about every recipient.

Each test runs its own private Postfix (tests/postfix.py), a recording SMTP
sink behind it, and ``policyd serve`` with a SQLite store, and speaks SMTP
to Postfix like a mail client does.
"""

from __future__ import annotations

import json
import smtplib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.postfix import (
    PostfixInstance,
    SmtpSink,
    Transaction,
)
from tests.harness.servers import PolicydServer, free_port, policyd

pytestmark = pytest.mark.integration

#: A small limit keeps the scenarios fast; one test runs the real default.
LIMIT = 20
ALICE = "alice@example.org"
ALICE_PASSWORD = "alice-secret"
BOB = "bob@example.org"
BOB_PASSWORD = "bob-secret"
#: How long Postfix may take to hand accepted mail to the sink.
DELIVERY_TIMEOUT = 60.0


@dataclass
class Site:
    """A mail site under test: Postfix, its sink and the policy server."""

    mta: PostfixInstance
    sink: SmtpSink
    server: PolicydServer

    def debug(self) -> str:
        """Both logs' ends, for assertion messages."""
        tail = "\n".join(self.server.output().splitlines()[-40:])
        return f"{self.mta.log_tail()}\n--- policyd log ---\n{tail}"

    def submit(self, login: str, password: str, recipients: list[str]) -> Transaction:
        """One message from an authenticated user on the submission port."""
        return self.mta.send(self.mta.submission_port, login, recipients, login=(login, password))

    def cli(self, *args: str) -> str:
        """Run ``policyd ARGS -c CONFIG`` and return its stdout (it must succeed)."""
        result = policyd(*args, "-c", str(self.server.config))
        assert result.returncode == 0, f"policyd {' '.join(args)}: {result.stderr}\n{self.debug()}"
        return result.stdout

    def status(self, account: str) -> dict[str, Any]:
        """``policyd status ACCOUNT --json``."""
        return dict(json.loads(self.cli("status", account, "--json")))

    def delivered(
        self, sender: str, expected: int, timeout: float = DELIVERY_TIMEOUT
    ) -> Counter[str]:
        """Recipients of ``sender``'s mail in the sink once ``expected`` have arrived and the queue is empty."""

        def ours(delivery: Any) -> bool:
            return bool(delivery.sender == sender)

        self.sink.wait_for(
            lambda _: sum(self.sink.recipients(ours).values()) >= expected, timeout=timeout
        )
        self.mta.wait_queue_empty(timeout=timeout)
        return self.sink.recipients(ours)

    def decisions(self) -> list[dict[str, Any]]:
        """policyd's decision log records (the config asks for JSON logs)."""
        records = []
        for line in self.server.output().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("logger") == "policyd.decision":
                records.append(record)
        return records


def external(count: int, start: int = 0, tag: str = "x") -> list[str]:
    """``count`` distinct recipients outside our domains."""
    return [f"{tag}{i}@example.net" for i in range(start, start + count)]


def local(count: int, tag: str = "user") -> list[str]:
    """``count`` distinct recipients in our domain example.org."""
    return [f"{tag}{i}@example.org" for i in range(count)]


def assert_blocked_refusal(reply: tuple[int, str], context: str) -> None:
    """A 5xx refusal carrying 5.7.1 and the word 'blocked'."""
    code, text = reply
    assert 500 <= code < 600, f"expected a 5xx refusal, got {code} {text}\n{context}"
    assert "5.7.1" in text and "blocked" in text, (
        f"refusal without 5.7.1/blocked: {text}\n{context}"
    )


@pytest.fixture
def policyd_factory(tmp_path: Path) -> Iterator[Callable[..., PolicydServer]]:
    """Start ``policyd serve`` processes on SQLite; SIGTERM each at teardown and require exit 0."""
    servers: list[PolicydServer] = []

    def start(limit: int = LIMIT, outbound: str = "") -> PolicydServer:
        port = free_port()
        directory = tmp_path / f"policyd{len(servers)}"
        directory.mkdir()
        config = directory / "policyd.yaml"
        config.write_text(
            f'listen:\n  policy: "tcp:{port}:interface=127.0.0.1"\n'
            f'store:\n  url: "sqlite:///{directory}/state.db"\n'
            "local_domains: [example.org]\n"
            f"outbound:\n  limit: {limit}\n{outbound}"
            "log:\n  format: json\n",
            encoding="utf-8",
        )
        server = PolicydServer(config, port)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        code = server.stop()
        assert code == 0, f"policyd exited {code} after SIGTERM:\n{server.output()[-4000:]}"


@pytest.fixture
def site_factory(
    policyd_factory: Callable[..., PolicydServer],
    smtp_sink: SmtpSink,
    postfix_factory: Callable[..., PostfixInstance],
) -> Callable[..., Site]:
    """Build a site: policyd first, then a Postfix that asks it (stopped before policyd)."""

    def build(limit: int = LIMIT, give_back: bool = False) -> Site:
        server = policyd_factory(limit, "  give_back: true\n" if give_back else "")
        mta = postfix_factory(
            policy_port=server.port,
            users={ALICE: ALICE_PASSWORD, BOB: BOB_PASSWORD},
            end_of_data_policy=give_back,
        )
        return Site(mta, smtp_sink, server)

    return build


@pytest.fixture
def site(site_factory: Callable[..., Site]) -> Site:
    """A site with outbound.limit = LIMIT."""
    return site_factory()


def test_refused_at_recipient_limit_plus_one_and_earlier_ones_delivered(site: Site) -> None:
    """In one message, RCPT number limit+1 gets 5.7.1 'blocked'; the first limit recipients are delivered."""
    recipients = external(LIMIT + 3)
    sent = site.submit(ALICE, ALICE_PASSWORD, recipients)
    assert sent.accepted == recipients[:LIMIT], site.debug()
    assert list(sent.refused) == recipients[LIMIT:], site.debug()
    for reply in sent.refused.values():
        assert_blocked_refusal(reply, site.debug())
    assert sent.data_reply is not None and sent.data_reply[0] == 250, site.debug()
    assert site.delivered(ALICE, LIMIT) == Counter(recipients[:LIMIT]), site.debug()
    status = site.status(ALICE)
    assert status["count"] == LIMIT and status["blocked"] is True, status
    blocks = [json.loads(line) for line in site.cli("blocks", "--json").splitlines()]
    assert [b["account"] for b in blocks] == [ALICE]
    assert blocks[0]["clients"] == ["127.0.0.1"]


def test_blocked_account_is_refused_as_an_smtp_error(site: Site) -> None:
    """Once blocked, every later message (local recipients too) fails in the client with 5.7.1 'blocked'."""
    site.submit(ALICE, ALICE_PASSWORD, external(LIMIT + 1))
    with site.mta.connect(site.mta.submission_port, (ALICE, ALICE_PASSWORD)) as client:
        for recipients in (external(1, start=100), local(1)):
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                client.sendmail(ALICE, recipients, b"Subject: again\r\n\r\nHello.\r\n")
            ((code, text),) = refused.value.recipients.values()
            assert_blocked_refusal((code, text.decode()), site.debug())
    assert site.delivered(ALICE, LIMIT) == Counter(external(LIMIT)), site.debug()
    assert sum(site.sink.recipients().values()) == LIMIT, site.debug()


def test_local_recipients_never_count(site: Site) -> None:
    """Many @example.org recipients first, then still exactly limit external recipients pass."""
    locals_ = local(3 * LIMIT)
    first = site.submit(ALICE, ALICE_PASSWORD, locals_)
    assert first.accepted == locals_ and not first.refused, site.debug()
    assert site.status(ALICE)["count"] == 0
    mixed = [
        r for pair in zip(local(LIMIT, tag="more"), external(LIMIT), strict=True) for r in pair
    ]
    second = site.submit(ALICE, ALICE_PASSWORD, mixed)
    assert second.accepted == mixed and not second.refused, site.debug()
    assert site.status(ALICE) | {"block": None} == {
        "account": ALICE,
        "count": LIMIT,
        "limit": LIMIT,
        "window": "1h",
        "blocked": False,
        "block": None,
    }
    third = site.submit(ALICE, ALICE_PASSWORD, external(1, start=LIMIT))
    assert not third.accepted, site.debug()
    assert_blocked_refusal(third.refused[external(1, start=LIMIT)[0]], site.debug())
    delivered = site.delivered(ALICE, 3 * LIMIT + 2 * LIMIT)
    assert delivered == Counter(locals_ + mixed), site.debug()


def test_unblock_lets_mail_flow_on_the_next_message(site: Site) -> None:
    """policyd unblock, run while the SMTP session stays open, lets its next message through."""
    with site.mta.connect(site.mta.submission_port, (ALICE, ALICE_PASSWORD)) as client:
        burst = site.mta.transaction(client, ALICE, external(LIMIT + 1))
        assert len(burst.accepted) == LIMIT and len(burst.refused) == 1, site.debug()
        still = site.mta.transaction(client, ALICE, external(1, start=500))
        assert not still.accepted, site.debug()
        out = site.cli("unblock", ALICE, "--reason", "password changed with IT", "--by", "jane")
        assert f"{ALICE} unblocked" in out
        again = site.mta.transaction(client, ALICE, external(LIMIT, start=1000))
        assert len(again.accepted) == LIMIT and not again.refused, site.debug()
        assert again.data_reply is not None and again.data_reply[0] == 250
    assert site.delivered(ALICE, 2 * LIMIT) == Counter(burst.accepted + again.accepted), (
        site.debug()
    )
    status = site.status(ALICE)
    assert status["count"] == LIMIT and status["blocked"] is False, status
    audit = [json.loads(line) for line in site.cli("audit", "--json").splitlines()]
    assert ("unblock", ALICE, "jane", "password changed with IT") in [
        (a["action"], a["subject"], a["who"], a["reason"]) for a in audit
    ]


def test_accounts_are_counted_separately(site: Site) -> None:
    """One account's block does not touch another's quota."""
    site.submit(ALICE, ALICE_PASSWORD, external(LIMIT + 1))
    sent = site.submit(BOB, BOB_PASSWORD, external(LIMIT, tag="b"))
    assert len(sent.accepted) == LIMIT and not sent.refused, site.debug()
    assert site.status(BOB)["count"] == LIMIT and site.status(ALICE)["blocked"] is True


def test_unauthenticated_inbound_client_is_not_counted(site: Site) -> None:
    """Mail from an unauthenticated client on the inbound port is accepted, delivered, and counted against no account."""
    recipients = local(2 * LIMIT)
    for sender in (ALICE, "someone@example.net"):
        sent = site.mta.send(site.mta.inbound_port, sender, recipients)
        assert sent.accepted == recipients and not sent.refused, site.debug()
        assert sent.data_reply is not None and sent.data_reply[0] == 250
    assert site.delivered(ALICE, len(recipients)) == Counter(recipients)
    assert site.delivered("someone@example.net", len(recipients)) == Counter(recipients)
    # Postfix asked policyd about every one of those recipients, never as outbound.
    rcpts = [d for d in site.decisions() if d.get("state") == "RCPT"]
    assert len(rcpts) == 2 * len(recipients), site.debug()
    assert all(d.get("check") != "quota" for d in rcpts), rcpts[:3]
    assert site.cli("status", "--json").strip() == ""
    assert site.status(ALICE)["count"] == 0
    sent = site.submit(ALICE, ALICE_PASSWORD, external(LIMIT + 1))
    assert len(sent.accepted) == LIMIT, site.debug()


def test_default_limit_5000_refuses_the_5001st_external_recipient(
    site_factory: Callable[..., Site],
) -> None:
    """At outbound.limit 5000, five messages of 1,000 external recipients pass and the 5,001st is refused."""
    site = site_factory(limit=5000)
    started = time.monotonic()
    accepted: list[str] = []
    with site.mta.connect(site.mta.submission_port, (ALICE, ALICE_PASSWORD)) as client:
        for batch in range(5):
            sent = site.mta.transaction(client, ALICE, external(1000, start=batch * 1000))
            assert len(sent.accepted) == 1000 and not sent.refused, site.debug()
            assert sent.data_reply is not None and sent.data_reply[0] == 250
            accepted += sent.accepted
        over = site.mta.transaction(client, ALICE, external(2, start=5000))
    assert not over.accepted, site.debug()
    assert_blocked_refusal(over.refused["x5000@example.net"], site.debug())
    status = site.status(ALICE)
    assert status["count"] == 5000 and status["blocked"] is True, status
    assert site.delivered(ALICE, 5000, timeout=120) == Counter(accepted), site.debug()
    assert time.monotonic() - started < 300


def test_block_survives_policyd_restart_under_running_postfix(site: Site) -> None:
    """SIGTERM policyd while Postfix holds its connection (exit 0); after a restart the block still applies."""
    with site.mta.connect(site.mta.submission_port, (ALICE, ALICE_PASSWORD)) as client:
        burst = site.mta.transaction(client, ALICE, external(LIMIT + 1))
        assert len(burst.accepted) == LIMIT, site.debug()
        code = site.server.stop()
        assert code == 0, site.debug()
        site.server.start()
        # The same smtpd process: its cached policy connection died with the
        # old server, and Postfix reconnects on its own.
        after = site.mta.transaction(client, ALICE, external(1, start=700))
        assert not after.accepted, site.debug()
        assert_blocked_refusal(after.refused["x700@example.net"], site.debug())
    sent = site.submit(BOB, BOB_PASSWORD, external(2, tag="b"))
    assert len(sent.accepted) == 2 and not sent.refused, site.debug()
    assert site.status(ALICE)["count"] == LIMIT


def test_give_back_returns_recipients_of_an_aborted_transaction(
    site_factory: Callable[..., Site],
) -> None:
    """With outbound.give_back and the policy at END-OF-MESSAGE, recipients of a transaction aborted by RSET do not count."""
    site = site_factory(give_back=True)
    with site.mta.connect(site.mta.submission_port, (ALICE, ALICE_PASSWORD)) as client:
        assert client.mail(ALICE)[0] == 250
        for recipient in external(LIMIT, start=300):
            assert client.rcpt(recipient)[0] == 250, site.debug()
        assert client.rset()[0] == 250
        sent = site.mta.transaction(client, ALICE, external(LIMIT + 1))
    assert sent.accepted == external(LIMIT), site.debug()
    assert list(sent.refused) == external(1, start=LIMIT), site.debug()
    assert site.delivered(ALICE, LIMIT) == Counter(external(LIMIT)), site.debug()
    status = site.status(ALICE)
    assert status["count"] == LIMIT and status["blocked"] is True, status
