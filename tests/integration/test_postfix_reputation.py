"""End to end: network reputation through a real Postfix, a real DNS zone and ``policyd serve``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThread

from tests.harness.dns_zone import DnsZoneServer, TestZone
from tests.harness.postfix import (
    PostfixInstance,
    SmtpSink,
)
from tests.harness.servers import PolicydServer, free_port

pytestmark = pytest.mark.integration
reactor: Any = _reactor

#: Postfix's inbound smtpd sees the test client as 127.0.0.1.
CLIENT = "127.0.0.1"


@pytest_twisted.async_yield_fixture
async def zone() -> AsyncIterator[tuple[TestZone, DnsZoneServer]]:
    """A DNSBL zone ``bl.test`` served by twisted.names on a loopback port."""
    authority = TestZone()
    served = DnsZoneServer(authority, reactor).start()
    yield authority, served
    await served.stop()


def start_policyd(tmp_path: Path, nameserver: str) -> PolicydServer:
    port = free_port()
    config = tmp_path / "policyd.yaml"
    config.write_text(
        f'listen:\n  policy: "tcp:{port}:interface=127.0.0.1"\n'
        f'store:\n  url: "sqlite:///{tmp_path}/state.db"\n'
        "local_domains: [example.org]\n"
        "inbound:\n  tag_at: 5\n  reject_at: 10\n  dnsbl:\n"
        '    - zone: bl.test\n      weight: 10\n      codes: "127.0.0.2"\n'
        '    - zone: bl.test\n      weight: 6\n      codes: "127.0.0.3"\n'
        f'dns:\n  nameservers: ["{nameserver}"]\n  timeout: 2s\n  deadline: 4s\n',
        encoding="utf-8",
    )
    return PolicydServer(config, port).start()


async def scenario(
    tmp_path: Path, zone: tuple[TestZone, DnsZoneServer], code: str,
    postfix_factory: Callable[..., PostfixInstance], smtp_sink: SmtpSink,
) -> tuple[Any, PostfixInstance, PolicydServer]:
    authority, served = zone
    authority.listed(CLIENT, "bl.test", code)
    server = start_policyd(tmp_path, served.nameserver)
    mta = postfix_factory(policy_port=server.port)
    recipients = ["ann@example.org", "ben@example.org", "cat@example.org"]
    sent = await deferToThread(mta.send, mta.inbound_port, "sender@example.net", recipients)
    return sent, mta, server


@pytest_twisted.ensureDeferred
async def test_level_two_client_is_refused_during_the_dialogue(
    tmp_path: Path, zone: tuple[TestZone, DnsZoneServer],
    postfix_factory: Callable[..., PostfixInstance], smtp_sink: SmtpSink,
) -> None:
    """A client listed at level 2 gets 5.7.1 naming the list at RCPT; nothing is accepted or delivered."""
    sent, mta, server = await scenario(tmp_path, zone, "127.0.0.2", postfix_factory, smtp_sink)
    try:
        assert sent.accepted == [], mta.log_tail()
        for code, text in sent.refused.values():
            assert 500 <= code < 600 and "5.7.1" in text and "bl.test" in text, text
        assert sent.data_reply is None
        assert smtp_sink.snapshot() == []
    finally:
        assert server.stop() == 0


@pytest_twisted.ensureDeferred
async def test_level_one_message_arrives_with_one_header(
    tmp_path: Path, zone: tuple[TestZone, DnsZoneServer],
    postfix_factory: Callable[..., PostfixInstance], smtp_sink: SmtpSink,
) -> None:
    """A level-1 client's message to three recipients is delivered with exactly one X-Policyd-Network header."""
    sent, mta, server = await scenario(tmp_path, zone, "127.0.0.3", postfix_factory, smtp_sink)
    try:
        assert len(sent.accepted) == 3, mta.log_tail()
        deliveries = await deferToThread(smtp_sink.wait_for, lambda d: len(d) >= 1, 60.0)
        assert deliveries, mta.log_tail()
        raw = deliveries[0].data
        assert raw.count(b"X-Policyd-Network:") == 1, raw[:2000]
        assert b"score=6" in raw and b"reasons=bl.test" in raw and b"token=" in raw
        assert sorted(r for d in deliveries for r in d.recipients) == [
            "ann@example.org", "ben@example.org", "cat@example.org",
        ]
    finally:
        assert server.stop() == 0
