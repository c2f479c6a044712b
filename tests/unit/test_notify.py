"""Block notifications: one mail per block to the help desk and the organisation's contact."""

from __future__ import annotations

import email
import email.message
import email.policy
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock, deferLater

from policyd.notify import Notifier, retry_delay, split_hostport
from policyd.policy import PolicyService
from policyd.store.memory import MemoryStore
from policyd.testing import PolicyClient, rcpt, request
from tests.conftest import make_config
from tests.harness.servers import PolicydServer, free_port
from tests.harness.smtp_sink import SmtpSink

reactor: Any = _reactor

NOTIFY = """
local_domains: [example.org]
outbound:
  limit: 3
notify:
  smtp: "127.0.0.1:2525"
  from: "policyd@example.org"
  helpdesk: ["helpdesk@example.org"]
  contacts:
    example.org: "it@example.org"
    default: "it-general@example.org"
"""


class Outgoing:
    """A send() that records mails and can be told to fail."""

    def __init__(self) -> None:
        self.mails: list[tuple[str, str, bytes]] = []
        self.failing = False

    def __call__(self, sender: str, recipient: str, message: bytes) -> Deferred[Any]:
        if self.failing:
            return fail(ConnectionRefusedError("relay down"))
        self.mails.append((sender, recipient, message))
        return succeed(None)


def setup(extra: str = "") -> tuple[PolicyService, Notifier, MemoryStore, Clock, Outgoing]:
    config = make_config(NOTIFY + extra)
    clock = Clock()
    clock.advance(1_700_000_000)
    store = MemoryStore()
    outgoing = Outgoing()
    notifier = Notifier(config, store, clock, send=outgoing)
    service = PolicyService(config, store, clock, on_block=lambda _: notifier.kick())
    return service, notifier, store, clock, outgoing


def attempt(service: PolicyService, account: str = "alice@example.org", times: int = 1) -> None:
    for _ in range(times):
        maybeDeferred(service.decide, request(rcpt(sasl_username=account, recipient="x@gmail.com")))


def test_recipients_by_domain_with_default() -> None:
    """The help desk, plus the contact of the account's domain, else the default contact."""
    notify = make_config(NOTIFY + "  notify_user: true\n").notify
    assert notify.recipients("alice@example.org") == (
        "helpdesk@example.org", "it@example.org", "alice@example.org",
    )
    assert notify.recipients("bob@other.net") == (
        "helpdesk@example.org", "it-general@example.org", "bob@other.net",
    )
    assert notify.recipients("carol") == ("helpdesk@example.org", "it-general@example.org")


def test_one_block_one_mail_each_however_many_refusals() -> None:
    """A block sends exactly one mail to the help desk and one to the contact."""
    service, _, _, clock, outgoing = setup()
    attempt(service, times=50)
    clock.advance(0)
    assert sorted(to for _, to, _ in outgoing.mails) == ["helpdesk@example.org", "it@example.org"]
    clock.advance(3600)
    attempt(service, times=20)
    clock.advance(0)
    assert len(outgoing.mails) == 2


def test_mail_text_names_account_count_clients_and_command() -> None:
    """The notice says who, when, how many, from where, and how to unblock."""
    service, _, _, clock, outgoing = setup()
    attempt(service, times=4)
    clock.advance(0)
    sender, _, raw = outgoing.mails[0]
    text = raw.decode()
    assert sender == "policyd@example.org"
    assert "Subject: [policyd] account alice@example.org blocked from sending" in text
    assert "Recipients counted in the window: 3" in text
    assert "192.0.2.10" in text
    assert 'policyd unblock alice@example.org --reason "..."' in text
    assert "Auto-Submitted: auto-generated" in text


def test_unblock_command_is_quoted_for_the_shell(tmp_path: Path) -> None:
    """The notice's unblock line, pasted into sh, passes a hostile account name as one argument and runs nothing."""
    account = "o'neil`touch one`$(touch two); touch three"
    service, _, _, clock, outgoing = setup()
    attempt(service, account=account, times=4)
    clock.advance(0)
    body = email.message_from_bytes(outgoing.mails[0][2], policy=email.policy.default)
    assert isinstance(body, email.message.EmailMessage)
    (line,) = [x.strip() for x in body.get_content().splitlines() if x.strip().startswith("policyd unblock")]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "policyd"
    fake.write_text('#!/bin/sh\nprintf "%s\\0" "$@" > "$0.args"\n', encoding="utf-8")
    fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(["sh", "-c", line], cwd=tmp_path, env=env, check=True, timeout=10)
    assert (bin_dir / "policyd.args").read_bytes().split(b"\0")[:-1] == [
        b"unblock", account.encode(), b"--reason", b"...",
    ]
    assert not [p.name for p in tmp_path.iterdir() if p.name in ("one", "two", "three")]


def test_french_notice() -> None:
    """language: fr writes the notices in French."""
    service, _, _, clock, outgoing = setup("language: fr\n")
    attempt(service, times=4)
    clock.advance(0)
    assert "bloqu" in outgoing.mails[0][2].decode("utf-8", "replace") or b"=C3=A9" in outgoing.mails[0][2]


def test_user_explanation_when_configured() -> None:
    """notify_user also tells the blocked user, with the user's own text."""
    service, _, _, clock, outgoing = setup("  notify_user: true\n")
    attempt(service, times=4)
    clock.advance(0)
    (mail,) = [m for _, to, m in outgoing.mails if to == "alice@example.org"]
    assert b"Your account alice@example.org can no longer send mail" in mail


def test_failed_sends_are_retried_with_growing_delays() -> None:
    """A relay that refuses: the notice stays queued and is retried later, then sent once."""
    service, notifier, store, clock, outgoing = setup()
    outgoing.failing = True
    attempt(service, times=4)
    clock.advance(0)
    assert outgoing.mails == []
    assert store.pending_notices().result == 2  # type: ignore[attr-defined]
    outgoing.failing = False
    clock.advance(retry_delay(1) - 1)
    notifier.drain()
    assert outgoing.mails == []
    clock.advance(1)
    notifier.drain()
    assert len(outgoing.mails) == 2
    clock.advance(10_000)
    notifier.drain()
    assert len(outgoing.mails) == 2
    assert [retry_delay(n) for n in (1, 2, 3, 10, 20)] == [30, 60, 120, 3600, 3600]


def subjects(outgoing: Outgoing) -> dict[str, str]:
    """The Subject of each mail sent, by recipient."""
    found = {}
    for _, to, raw in outgoing.mails:
        message = email.message_from_bytes(raw, policy=email.policy.default)
        found[to] = str(message["Subject"])
    return found


def notices_after_an_unblock(extra: str) -> Outgoing:
    """The relay refuses while alice is blocked and then unblocked; the mail it then takes."""
    service, notifier, store, clock, outgoing = setup(extra)
    outgoing.failing = True
    attempt(service, times=4)
    clock.advance(0)
    store.unblock("alice@example.org", now=clock.seconds())
    outgoing.failing = False
    clock.advance(retry_delay(1))
    notifier.drain()
    return outgoing


def test_notice_sent_after_an_unblock_says_blocked_then_unblocked() -> None:
    """A notice that waited in the outbox while the account was unblocked says so in Subject and text, never "is blocked"."""
    outgoing = notices_after_an_unblock("  notify_user: true\n")
    assert subjects(outgoing) == {
        "helpdesk@example.org": "[policyd] account alice@example.org blocked, then unblocked",
        "it@example.org": "[policyd] account alice@example.org blocked, then unblocked",
        "alice@example.org": "Your account alice@example.org was blocked, then unblocked",
    }
    for _, _, raw in outgoing.mails:
        text = email.message_from_bytes(raw, policy=email.policy.default).get_body().get_content()
        assert "unblocked it before this notice could be sent" in text
        assert "has been blocked" not in text and "policyd unblock" not in text and "can no longer" not in text


def test_notice_of_a_block_still_in_force_is_unchanged_and_of_an_expired_one_says_it_ended() -> None:
    """A live block's late notice still says blocked; one sent after the block ran out says it ended on its own."""
    service, notifier, store, clock, outgoing = setup()
    outgoing.failing = True
    attempt(service, times=4)
    clock.advance(0)
    outgoing.failing = False
    clock.advance(retry_delay(1))
    notifier.drain()
    assert set(subjects(outgoing).values()) == {"[policyd] account alice@example.org blocked from sending"}
    outgoing.mails.clear()
    outgoing.failing = True
    attempt(service, "bob@example.org", times=4)
    clock.advance(0)
    clock.advance(3 * 86400)
    outgoing.failing = False
    notifier.drain()
    (subject,) = set(subjects(outgoing).values())
    assert subject == "[policyd] account bob@example.org blocked, then unblocked"
    assert b"the block ended on its own at" in outgoing.mails[0][2]


def test_french_notice_after_an_unblock() -> None:
    """language: fr: the late notice of a lifted block says "bloqué, puis débloqué"."""
    outgoing = notices_after_an_unblock("language: fr\n")
    assert set(subjects(outgoing).values()) == {"[policyd] compte alice@example.org bloqué, puis débloqué"}


def test_split_hostport() -> None:
    """notify.smtp reads host:port, [v6]:port, or a host with the default port."""
    assert split_hostport("127.0.0.1:2525") == ("127.0.0.1", 2525)
    assert split_hostport("[::1]:25") == ("::1", 25)
    assert split_hostport("relay") == ("relay", 25)


def config_file(tmp_path: Path, port: int, smtp_port: int) -> Path:
    path = tmp_path / "policyd.yaml"
    path.write_text(
        NOTIFY.replace("2525", str(smtp_port))
        + "  retry_first: 1s\n"
        + f'listen:\n  policy: "tcp:{port}:interface=127.0.0.1"\n'
        f'store:\n  url: "sqlite:///{tmp_path}/state.db"\n',
        encoding="utf-8",
    )
    return path


async def flood(port: int, account: str, times: int) -> list[str]:
    conn = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), PolicyClient())
    replies = [await conn.ask(rcpt(sasl_username=account, recipient="x@gmail.com")) for _ in range(times)]
    conn.transport.loseConnection()
    return replies


async def wait_for(condition: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        await deferLater(reactor, 0.05, lambda: None)
    return bool(condition())


def delivered_to(sink: SmtpSink) -> list[str]:
    return sorted(r for d in sink.snapshot() for r in d.recipients)


@pytest_twisted.ensureDeferred
async def test_real_smtp_one_mail_each_within_seconds(tmp_path: Path) -> None:
    """Through a real SMTP sink: a block gives one mail to the help desk and one to the contact, fast."""
    sink = SmtpSink().start()
    port = free_port()
    server = PolicydServer(config_file(tmp_path, port, sink.port), port).start()
    try:
        started = time.monotonic()
        replies = await flood(port, "alice@example.org", 30)
        assert [r.split()[0] for r in replies] == ["DUNNO"] * 3 + ["REJECT"] * 27
        assert await wait_for(lambda: len(sink.snapshot()) >= 2, 10), server.output()
        assert time.monotonic() - started < 5
        await deferLater(reactor, 1.0, lambda: None)
        assert delivered_to(sink) == ["helpdesk@example.org", "it@example.org"]
        (mail,) = [d for d in sink.snapshot() if d.recipients == ("it@example.org",)]
        assert mail.sender == "policyd@example.org"
        assert mail.header("Subject") == "[policyd] account alice@example.org blocked from sending"
    finally:
        assert server.stop() == 0
        sink.stop()


@pytest_twisted.ensureDeferred
async def test_mail_waits_for_the_relay_across_a_restart(tmp_path: Path) -> None:
    """With the relay down the notice waits; after a policyd restart and the relay back, it arrives once."""
    sink = SmtpSink()
    sink_port = free_port()
    port = free_port()
    server = PolicydServer(config_file(tmp_path, port, sink_port), port).start()
    try:
        await flood(port, "bob@example.org", 5)
        assert await wait_for(lambda: "not sent" in server.output(), 10), server.output()
        assert server.stop() == 0
        sink.start(sink_port)
        server.start()
        assert await wait_for(lambda: len(sink.snapshot()) >= 2, 10), server.output()
        await deferLater(reactor, 1.5, lambda: None)
        assert delivered_to(sink) == ["helpdesk@example.org", "it@example.org"]
        assert server.stop() == 0
        # A later start finds nothing left to send.
        server.start()
        await deferLater(reactor, 1.5, lambda: None)
        assert len(sink.snapshot()) == 2
    finally:
        assert server.stop() == 0
        sink.stop()


@pytest.mark.parametrize("text", ["notify:\n  smtp: relay\n", "notify:\n  smtp: 'host:99999'\n"])
def test_bad_relay_address_is_a_config_error(text: str) -> None:
    """notify.smtp must be host:port."""
    from policyd.errors import ConfigError

    with pytest.raises(ConfigError, match="notify.smtp: must be host:port"):
        make_config(text)
