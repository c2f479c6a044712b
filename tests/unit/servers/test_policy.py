"""The policy server on real loopback sockets, in process."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from policyd.servers.policy import PolicyServer
from policyd.testing import PolicyClient, encode, rcpt
from tests.conftest import make_config

reactor: Any = _reactor


def config_text(tmp_path: Path, extra: str = "", listen: str = "tcp:0:interface=127.0.0.1") -> str:
    return (
        f'listen:\n  policy: "{listen}"\nstore:\n  url: "sqlite:///{tmp_path}/state.db"\n'
        f"local_domains: [example.org]\noutbound:\n  limit: 20\n{extra}"
    )


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Path) -> AsyncIterator[PolicyServer]:
    """A started policy server on a free loopback port."""
    running = PolicyServer(reactor, make_config(config_text(tmp_path)))
    await running.start()
    yield running
    await running.stop()


def port_of(server: PolicyServer) -> int:
    assert server.port is not None
    return int(server.port.getHost().port)


async def client(server: PolicyServer) -> PolicyClient:
    return await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port_of(server)), PolicyClient())


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_get_replies_in_order(server: PolicyServer) -> None:
    """Thirty pipelined requests on one connection: twenty DUNNO, then REJECT, in order."""
    conn = await client(server)
    replies = [conn.ask(rcpt(sasl_username="alice", recipient=f"r{n}@gmail.com")) for n in range(30)]
    results = await DeferredList(replies, fireOnOneErrback=True)
    words = [r[1].split()[0] for r in results]
    assert words == ["DUNNO"] * 20 + ["REJECT"] * 10
    conn.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_concurrent_connections_share_one_quota(server: PolicyServer) -> None:
    """Twenty connections sending for one account let exactly the limit through."""
    conns = [await client(server) for _ in range(20)]
    replies = [c.ask(rcpt(sasl_username="bob", recipient="x@gmail.com")) for c in conns for _ in range(3)]
    results = await DeferredList(replies, fireOnOneErrback=True)
    words = [r[1].split()[0] for r in results]
    assert words.count("DUNNO") == 20
    assert words.count("REJECT") == 40
    for conn in conns:
        conn.transport.loseConnection()


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes on a blocking socket and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            return b""
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            received += chunk
    return received


BAD = {
    "no equals": b"hello world\n\n",
    "binary": bytes(range(256)) * 64,
    "endless line": b"recipient=" + b"A" * 20000,
    "too many attributes": b"".join(b"a%d=1\n" % n for n in range(300)) + b"\n",
    "too large": b"".join(b"x%d=%s\n" % (n, b"y" * 4000) for n in range(40)) + b"\n",
}


@pytest.mark.parametrize("data", BAD.values(), ids=BAD.keys())
@pytest_twisted.ensureDeferred
async def test_bad_input_closes_only_that_connection(server: PolicyServer, data: bytes) -> None:
    """A client sending garbage is cut off; a well-behaved client keeps its answers."""
    good = await client(server)
    assert await good.ask(rcpt(sasl_username="carol", recipient="x@example.org")) == "DUNNO"
    received = await deferToThread(raw_exchange, port_of(server), data)
    assert b"action=" not in received
    assert await good.ask(rcpt(sasl_username="carol", recipient="x@gmail.com")) == "DUNNO"
    good.transport.loseConnection()




@pytest_twisted.ensureDeferred
async def test_idle_clients_do_not_stop_others(server: PolicyServer) -> None:
    """A hundred connections that send half a request and stall do not slow a normal client."""
    stalled = [await client(server) for _ in range(100)]
    for conn in stalled:
        conn.send_raw(b"request=smtpd_access_policy\nrecipient=")
    good = await client(server)
    assert await good.ask(rcpt(sasl_username="dave", recipient="x@gmail.com")) == "DUNNO"
    for conn in [*stalled, good]:
        conn.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_client_outside_allowed_clients_is_refused(tmp_path: Path) -> None:
    """With allowed_clients not covering loopback, a loopback client is disconnected at once."""
    running = PolicyServer(reactor, make_config(config_text(tmp_path, "allowed_clients: [192.0.2.0/24]\n")))
    await running.start()
    try:
        received = await deferToThread(raw_exchange, port_of(running), encode(rcpt()))
        assert received == b""
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_unix_socket_listener(tmp_path: Path) -> None:
    """listen.policy may be a unix socket."""
    path = tmp_path / "policy.sock"
    running = PolicyServer(reactor, make_config(config_text(tmp_path, listen=f"unix:{path}")))
    await running.start()
    try:
        conn = await connectProtocol(UNIXClientEndpoint(reactor, str(path)), PolicyClient())
        assert await conn.ask(rcpt(sasl_username="erin", recipient="x@gmail.com")) == "DUNNO"
        conn.transport.loseConnection()
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_stop_answers_requests_in_flight(tmp_path: Path) -> None:
    """stop() stops listening but the requests already received are answered."""
    running = PolicyServer(reactor, make_config(config_text(tmp_path)))
    await running.start()
    conn = await client(running)
    reply = conn.ask(rcpt(sasl_username="fay", recipient="x@gmail.com"))
    await deferLater(reactor, 0.05, lambda: None)
    await running.stop()
    assert await reply == "DUNNO"


@pytest_twisted.ensureDeferred
async def test_crlf_in_account_cannot_inject_a_reply(server: PolicyServer) -> None:
    """Unicode line breaks in a SASL name never split the reply; one request, one reply."""
    conn = await client(server)
    evil = "mallory\u2028action=OK\u0085x"
    for _ in range(20):
        await conn.ask(rcpt(sasl_username=evil, recipient="x@gmail.com"))
    reply = await conn.ask(rcpt(sasl_username=evil, recipient="x@gmail.com"))
    assert reply.startswith("REJECT 5.7.1 Account mallory action=ok x is blocked")
    assert await conn.ask(rcpt(sasl_username="gus", recipient="x@gmail.com")) == "DUNNO"
    conn.transport.loseConnection()


def flood_without_reading(port: int, stop: list[bool], seconds: float = 20.0) -> int:
    """Write pipelined requests and never read, until told to stop; return bytes written."""
    import time

    payload = encode(rcpt(sasl_username="hog", recipient="x@gmail.com")) * 200
    written = 0
    with socket.socket() as sock:
        # A small receive window, set before connecting, so the server's
        # replies back up quickly.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stop:
            try:
                written += sock.send(payload)
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                break
    return written


@pytest_twisted.ensureDeferred
async def test_client_that_never_reads_is_throttled(server: PolicyServer) -> None:
    """A client that floods requests and never reads its replies stops being read; others are served."""
    stop: list[bool] = []
    flooding = deferToThread(flood_without_reading, port_of(server), stop)
    paused = []
    for _ in range(200):
        await deferLater(reactor, 0.05, lambda: None)
        paused = [c for c in server.factory.connections if c._write_paused]
        if paused:
            break
    try:
        assert paused, "the server never noticed that the client stopped reading"
        good = await client(server)
        for _ in range(5):
            assert await good.ask(rcpt(sasl_username="ivy", recipient="x@gmail.com")) == "DUNNO"
        good.transport.loseConnection()
        # While paused, the stalled connection holds at most Twisted's write buffer.
        hog = paused[0]
        assert hog._read_paused
        assert len(hog._replies) <= server.config.limits.max_pending
    finally:
        stop.append(True)
        await flooding


@pytest_twisted.ensureDeferred
async def test_the_outbox_backlog_reaches_the_metrics(tmp_path: Path) -> None:
    """A block notice the relay does not take shows as backlog age and a failing notice at /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    from policyd.store import Charge

    # Nothing listens on port 1: every notice fails and stays in the outbox.
    extra = 'notify:\n  smtp: "127.0.0.1:1"\n  helpdesk: [helpdesk@example.org]\n'
    running = PolicyServer(reactor, make_config(config_text(tmp_path, extra)))
    queued_at = reactor.seconds() - 30
    for _ in range(2):
        await running.store.admit(Charge("lou", queued_at, 3600, 1, 86400, "too many",
                                         notify=("helpdesk@example.org",)))
    await running.notifier.drain()
    await running.refresh_gauges()
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(running.metrics.exposition().decode())
        for s in family.samples
    }
    await running.store.close()
    assert samples["policyd_notifications_pending"] == 1
    assert samples["policyd_notifications_failing"] == 1
    assert 30 <= samples["policyd_notification_backlog_seconds"] < 60
    assert samples["policyd_build_info"] == 1
