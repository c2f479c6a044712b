"""The HTTP listener's wire limits, in memory: body size, request time, idle time, connection cap, rate."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Request

from policyd.web import limits as httplimits
from policyd.web.limits import (
    LINGER_BYTES,
    LINGER_TIME,
    ClientRate,
    LimitedChannel,
    LimitedSite,
    client_key,
    connection_cap,
)

PEER = IPv4Address("TCP", "192.0.2.9", 40000)


class Echo(Resource):
    """Answers every request with its body, and counts the requests it saw."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        body = request.content.read()
        self.seen.append(body)
        request.setHeader("content-type", "text/plain")
        return b"got " + str(len(body)).encode()


def connect(site: LimitedSite) -> tuple[LimitedChannel, StringTransport]:
    """A channel of ``site`` on an in-memory connection."""
    channel = site.buildProtocol(PEER)
    assert channel is not None
    transport = StringTransport(peerAddress=PEER)
    channel.makeConnection(transport)
    return channel, transport


def make_site(**kwargs: Any) -> tuple[LimitedSite, Echo, Clock]:
    clock = Clock()
    echo = Echo()
    return LimitedSite(echo, clock, **kwargs), echo, clock


def lost(site: LimitedSite, channel: LimitedChannel, transport: StringTransport) -> None:
    """Deliver the end of a connection the channel asked to close."""
    assert transport.disconnecting
    channel.connectionLost(Exception("closed"))  # type: ignore[arg-type]


def status(transport: StringTransport) -> int:
    return int(transport.value().split(b" ", 2)[1])


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read() -> None:
    """Content-Length over the limit: 413 at the end of the headers, the page never runs, the rest is dropped."""
    site, echo, _ = make_site(max_body=1000)
    channel, transport = connect(site)
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 300000000\r\n\r\n")
    assert status(transport) == 413 and b"larger than 1000 bytes" in transport.value()
    assert transport.disconnecting and echo.seen == []
    transport.clear()
    channel.dataReceived(b"a=&" * 10000)
    assert transport.value() == b"" and echo.seen == []


def test_expect_continue_over_the_limit_gets_413_not_100() -> None:
    """A client that waits for 100-continue is told 413 instead, and nothing else."""
    site, echo, _ = make_site(max_body=1000)
    channel, transport = connect(site)
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in transport.value()


def test_a_chunked_body_is_refused_once_past_the_limit() -> None:
    """A chunked body is counted as it arrives: 413 as soon as it passes the limit, the page never runs."""
    site, echo, _ = make_site(max_body=1000)
    channel, transport = connect(site)
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    channel.dataReceived(b"258\r\n" + b"a" * 600 + b"\r\n")
    assert transport.value() == b""
    # The terminating chunk in the same packet must not let the request through.
    channel.dataReceived(b"258\r\n" + b"a" * 600 + b"\r\n0\r\n\r\n")
    assert status(transport) == 413 and echo.seen == []
    assert transport.disconnecting


def test_a_body_within_the_limit_reaches_the_page_whole() -> None:
    """Declared or chunked, a body up to the limit is answered, byte for byte, and the connection stays."""
    site, echo, _ = make_site(max_body=1000)
    channel, transport = connect(site)
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n" + b"b" * 1000)
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3e8\r\n" + b"c" * 1000 + b"\r\n0\r\n\r\n")
    assert echo.seen == [b"b" * 1000, b"c" * 1000]
    assert transport.value().count(b"HTTP/1.1 200 OK") == 2 and not transport.disconnecting


def test_a_trickled_request_is_cut_at_its_deadline() -> None:
    """Bytes every second do not keep a request alive: 408 once request_time has passed since its first byte."""
    site, echo, clock = make_site(request_time=30.0, idle_time=60.0)
    channel, transport = connect(site)
    for byte in b"GET / HTTP/1.1\r\nX-A: " + b"a" * 28:
        channel.dataReceived(bytes([byte]))
        clock.advance(1)
        if transport.value():
            break
    assert status(transport) == 408 and transport.disconnecting and echo.seen == []
    assert clock.seconds() == 30


class HalfClosing(StringTransport):
    """A TCP-like transport: it can close for writing only, and records an abort."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True


def refused_on(transport: HalfClosing) -> tuple[LimitedChannel, Echo, Clock]:
    site, echo, clock = make_site(max_body=10)
    channel = site.buildProtocol(PEER)
    assert channel is not None
    channel.makeConnection(transport)
    channel.dataReceived(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5000000\r\n\r\n" + b"a" * 1000)
    assert status(transport) == 413 and transport.write_closed and not transport.disconnecting
    return channel, echo, clock


def test_a_refused_client_may_read_its_answer_while_its_body_is_dropped() -> None:
    """After a refusal the answer goes out and the write side closes; what still comes is dropped, up to a bound."""
    transport = HalfClosing(peerAddress=PEER)
    channel, echo, _ = refused_on(transport)
    for _ in range(LINGER_BYTES // 65536):
        channel.dataReceived(b"a" * 65536)
    assert not transport.aborted and echo.seen == []
    channel.dataReceived(b"a" * 65536)
    assert transport.aborted


def test_a_refused_client_that_does_not_close_is_cut() -> None:
    """A refused client that neither closes nor stops is cut LINGER_TIME after its answer."""
    transport = HalfClosing(peerAddress=PEER)
    _, _, clock = refused_on(transport)
    clock.advance(LINGER_TIME - 0.1)
    assert not transport.aborted
    clock.advance(0.1)
    assert transport.aborted


def test_the_deadline_covers_each_request_of_a_kept_connection() -> None:
    """A kept-alive connection's next request gets its own deadline; none runs while idle between them."""
    site, echo, clock = make_site(request_time=30.0, idle_time=60.0)
    channel, transport = connect(site)
    channel.dataReceived(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
    clock.advance(45)
    assert not transport.disconnecting and channel._deadline is None
    channel.dataReceived(b"GET /2 HTTP/1.1\r\n")
    clock.advance(29)
    assert transport.value().count(b"HTTP/1.1 ") == 1
    clock.advance(1)
    assert transport.value().count(b"HTTP/1.1 408 ") == 1 and len(echo.seen) == 1


def test_an_idle_connection_is_closed() -> None:
    """A connection that sends nothing is closed after idle_time."""
    site, _, clock = make_site(idle_time=60.0)
    _, transport = connect(site)
    clock.advance(59)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting


def test_headers_are_bounded_in_number_and_size() -> None:
    """More than MAX_HEADERS headers is 400; a long request line 414; a long header line 431."""
    site, _, _ = make_site()
    channel, transport = connect(site)
    channel.dataReceived(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n")
    assert status(transport) == 400
    channel, transport = connect(site)
    channel.dataReceived(b"GET /" + b"a" * httplimits.MAX_LINE + b" HTTP/1.1\r\n")
    assert status(transport) == 414
    channel, transport = connect(site)
    channel.dataReceived(b"GET / HTTP/1.1\r\nX-A: " + b"a" * httplimits.MAX_LINE + b"\r\n")
    assert status(transport) == 431


def test_connections_are_capped_and_the_refusals_logged_sparingly(caplog: pytest.LogCaptureFixture) -> None:
    """Beyond max_connections a connection is refused; one log line a minute; a closed one frees a place."""
    site, _, clock = make_site(max_connections=2)
    first, first_transport = connect(site)
    connect(site)
    with caplog.at_level(logging.WARNING, logger="policyd.http"):
        assert [site.buildProtocol(PEER) for _ in range(50)] == [None] * 50
        clock.advance(60)
        assert site.buildProtocol(PEER) is None
    assert [r.getMessage() for r in caplog.records] == [
        "HTTP client 192.0.2.9:40000 refused: already 2 connections (1 refused since the last such line)",
        "HTTP client 192.0.2.9:40000 refused: already 2 connections (50 refused since the last such line)",
    ]
    first_transport.loseConnection()
    lost(site, first, first_transport)
    assert site.buildProtocol(PEER) is not None and len(site.connections) == 2


def test_the_cap_leaves_most_descriptors_to_the_policy_service() -> None:
    """A quarter of the descriptor limit at most, 256 at most, at least one."""
    assert connection_cap(128) == 32
    assert connection_cap(1024) == 256
    assert connection_cap(65536) == 256
    assert connection_cap(2) == 1
    assert 1 <= connection_cap() <= 256


def test_every_answer_carries_the_site_headers() -> None:
    """The site's headers are on every answer; a page may set its own value instead."""

    class Framed(Resource):
        isLeaf = True

        def render_GET(self, request: Request) -> bytes:
            request.setHeader("x-frame-options", "SAMEORIGIN")
            return b"ok"

    root = Resource()
    root.putChild(b"plain", Echo())
    root.putChild(b"framed", Framed())
    site = LimitedSite(root, Clock(), headers={"x-frame-options": "DENY", "x-other": "1"})
    channel, transport = connect(site)
    channel.dataReceived(b"GET /plain HTTP/1.1\r\nHost: h\r\n\r\nGET /framed HTTP/1.1\r\nHost: h\r\n\r\n")
    plain, framed = transport.value().split(b"HTTP/1.1 200 OK")[1:]
    assert b"X-Frame-Options: DENY" in plain and b"X-Other: 1" in plain
    assert b"X-Frame-Options: SAMEORIGIN" in framed and b"X-Other: 1" in framed


def test_rate_per_client_refills_and_stays_bounded() -> None:
    """A burst, then one per period; clients apart; the oldest forgotten when the table is full."""
    clock = Clock()
    rate = ClientRate(clock, burst=3, every=60.0, clients=100)
    assert [rate.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rate.take("a") == 60.0
    assert rate.take("b") == 0.0
    clock.advance(30)
    assert rate.take("a") == 30.0
    clock.advance(30)
    assert rate.take("a") == 0.0 and rate.take("a") > 0
    for n in range(500):
        rate.take(f"x{n}")
    assert len(rate) == 100


def test_an_ipv6_client_counts_by_its_64() -> None:
    """Addresses of one /64 share a bucket; IPv4 (mapped or not) counts alone."""
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.1") == client_key("192.0.2.1") == "192.0.2.1"
    assert client_key("local") == "local"
