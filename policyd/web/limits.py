"""What one HTTP client may cost the process: connections, bytes and time.

The HTTP listener runs in the process and on the reactor that answer
Postfix's policy requests, so nothing an HTTP client sends may slow or
starve them (SPEC 10).  twisted.web on its own reads a whole request body
(to a temporary file past 100 kB, then parsed whole) before any resource
sees it, accepts connections until the process runs out of descriptors,
and keeps a trickling client for hours.  :class:`LimitedSite` is a
:class:`~twisted.web.server.Site` that bounds each of these on the wire,
before any page runs:

- a body over :data:`MAX_BODY` is refused with 413 when its declared
  ``Content-Length`` says so, before one byte of it is read; a chunked body
  is refused as soon as what arrived passes the limit (what the client
  still sends while it reads the answer is dropped, within
  :data:`LINGER_TIME` and :data:`LINGER_BYTES`);
- a request (request line, headers and body) must arrive within
  :data:`REQUEST_TIME` of its first byte, however slowly it trickles (408);
- a connection with nothing to do is closed after :data:`IDLE_TIME`;
- at most :func:`connection_cap` connections are open at once; further ones
  are closed as soon as they are accepted, so the policy listener always
  has descriptors left;
- headers are bounded in number (:data:`MAX_HEADERS`) and size
  (:data:`HEADERS_SIZE`), the request line in length (:data:`MAX_LINE`).

:class:`ClientRate` is the small per-client token bucket the public form
uses.
"""

from __future__ import annotations

import ipaddress
import logging
import resource
from collections import OrderedDict
from collections.abc import Mapping
from io import BytesIO
from typing import Any, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from policyd.protocols.connections import ConnectionTracking, describe_peer

log = logging.getLogger("policyd.http")

#: Largest request body (JSON or form) in bytes: admin calls and forms are
#: small, and a body is held in memory.
MAX_BODY = 64 * 1024

#: Seconds from a request's first byte to its last (headers and body).
#: 64 KiB arrive in well under a second even on a poor mobile link; a client
#: that trickles bytes to hold a connection open is cut.
REQUEST_TIME = 30.0

#: Seconds a connection may stay open without a request in progress (before
#: its first request, between keep-alive requests, or while its client does
#: not read the answer).  Browsers reconnect without a word when it is closed.
IDLE_TIME = 60.0

#: Most header lines in one request; browsers send about 15.
MAX_HEADERS = 100

#: Most bytes of request line and headers together.
HEADERS_SIZE = 16 * 1024

#: Longest request line or header line; no page of policyd has a longer URL.
MAX_LINE = 8 * 1024

#: Most HTTP connections whatever the descriptor limit: a few admins, a
#: Prometheus scraper, and users of the form and self-service pages.
CONNECTIONS_AT_MOST = 256

#: After a refusal, seconds and bytes the client may still send (dropped
#: unread, unparsed) while it reads its answer: a client that is sending a
#: body when the answer comes would otherwise get a connection reset instead
#: of the answer.  Past either, the connection is cut.
LINGER_TIME = 2.0
LINGER_BYTES = 1024 * 1024

#: Seconds between two log lines about refused connections (a flood of
#: connections must not become a flood of log lines).
REFUSAL_LOG_EVERY = 60.0

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


def descriptor_limit() -> int:
    """The process's soft ``RLIMIT_NOFILE`` (a large number when unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(nofile: int | None = None) -> int:
    """How many HTTP connections may be open at once.

    A quarter of the descriptor limit at most (the rest stays for the policy
    connections, the store, logs and threads), and never more than
    :data:`CONNECTIONS_AT_MOST`.

    :param nofile: the descriptor limit; None: the process's soft limit.
    """
    limit = descriptor_limit() if nofile is None else nofile
    return max(1, min(CONNECTIONS_AT_MOST, limit // 4))


class LimitedRequest(Request):
    """A request whose body is counted as it arrives, held in memory.

    The channel has already refused a declared length over the limit; a
    chunked body is counted here and refused once it passes the limit.
    Every answer carries the site's :attr:`LimitedSite.headers`.
    """

    channel: LimitedChannel
    _received = 0

    def gotLength(self, length: int | None) -> None:
        """Keep the body in memory: it is bounded, and a temporary file would cost a descriptor."""
        self.content = BytesIO()  # type: ignore[assignment]  # twisted declares it None

    def handleContentChunk(self, data: bytes) -> None:
        """Keep a piece of the body, or refuse the request once the body passes the limit."""
        channel = self.channel
        if channel is None or channel.refused:
            return
        self._received += len(data)
        if self._received > channel.site.max_body:
            channel.refuse(413, f"request body larger than {channel.site.max_body} bytes")
            return
        assert self.content is not None
        self.content.write(data)

    def process(self) -> None:
        """Answer the request, with the site's headers set first (a page may override them)."""
        for name, value in self.channel.site.headers.items():
            self.setHeader(name, value)
        super().process()


class LimitedChannel(HTTPChannel):
    """An HTTP/1.1 connection held to the limits of its :class:`LimitedSite`."""

    site: LimitedSite
    maxHeaders = MAX_HEADERS
    totalHeadersSize = HEADERS_SIZE
    MAX_LENGTH = MAX_LINE

    #: The connection answered an error and is closing: what it still sends is dropped.
    refused = False
    _deadline: IDelayedCall | None = None
    _abort: IDelayedCall | None = None
    _dropped = 0

    @property
    def busy(self) -> bool:
        """Whether a request is being received or answered."""
        return bool(self.requests) or self._deadline is not None

    def dataReceived(self, data: bytes) -> None:
        """Start the request's clock at its first byte, then parse."""
        if self.refused:
            self._dropped += len(data)
            if self._dropped > LINGER_BYTES:
                self._cut()
            return
        if self._deadline is None and not self._handlingRequest:
            self._deadline = self.callLater(self.site.request_time, self._too_slow)
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        """Body bytes (or the next request, buffered): dropped once refused."""
        if not self.refused:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        """Refuse a declared body over the limit before reading any of it."""
        length = self.length
        if length is not None and length > self.site.max_body:
            self.refuse(413, f"request body larger than {self.site.max_body} bytes")
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        """The whole request is here: stop its clock and answer it."""
        if self.refused:
            return
        self._stop_clock()
        super().allContentReceived()

    def lineLengthExceeded(self, line: bytes) -> None:
        """A request line (414) or header line (431) over :data:`MAX_LINE`."""
        if hasattr(self, "_command"):
            self.refuse(431, f"header line longer than {self.MAX_LENGTH} bytes")
        else:
            self.refuse(414, f"request line longer than {self.MAX_LENGTH} bytes")

    def _too_slow(self) -> None:
        self._deadline = None
        peer = describe_peer(self.transport.getPeer()) if self.transport is not None else "?"
        log.info("HTTP client %s did not send its request within %ss: closing", peer, self.site.request_time)
        self.refuse(408, f"request not received within {self.site.request_time:g} seconds")

    def refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with ``message`` as plain text and close, whatever else arrives.

        The answer is written straight to the connection: the request has
        not been (and will never be) handed to a page.  The connection is
        closed for writing once the answer is out, and cut when its client
        closes too, or after :data:`LINGER_TIME` or :data:`LINGER_BYTES`.
        """
        if self.refused or self.transport is None:
            return
        self.refused = True
        self._stop_clock()
        body = message.encode() + b"\n"
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Connection: close\r\nCache-Control: no-store\r\n\r\n%s"
            % (status, _REASONS.get(status, b"Error"), len(body), body)
        )
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:
            self.loseConnection()
        else:
            self._networkProducer.unregisterProducer()
            half_close()
        self._abort = self.callLater(LINGER_TIME, self._cut)

    def _cut(self) -> None:
        self._abort = None
        if self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()

    def _stop_clock(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Stop the clocks and tell the site the connection is gone."""
        self._stop_clock()
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self._abort = None
        super().connectionLost(reason)
        self.site.closed(self)


class LimitedSite(ConnectionTracking, Site):
    """A twisted.web site held to the limits of this module.

    :param resource: the root resource.
    :param reactor: the reactor (clock of the timeouts); None: the global one.
    :param max_connections: connections open at once; None: :func:`connection_cap`.
    :param max_body: largest request body, in bytes; None: :data:`MAX_BODY`.
    :param request_time: seconds for a request to arrive, from its first byte;
        None: :data:`REQUEST_TIME`.
    :param idle_time: seconds a connection may wait with no request in
        progress; None: :data:`IDLE_TIME`.
    :param headers: headers every answer carries unless its page sets them
        otherwise (framing and content-type rules, for instance).
    """

    protocol = LimitedChannel  # type: ignore[assignment]
    noisy = False
    displayTracebacks = False

    def __init__(
        self,
        resource: Resource,
        reactor: IReactorTime | None = None,
        max_connections: int | None = None,
        max_body: int | None = None,
        request_time: float | None = None,
        idle_time: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            resource, requestFactory=LimitedRequest, reactor=reactor,
            timeout=IDLE_TIME if idle_time is None else idle_time,
        )
        self.max_connections = connection_cap() if max_connections is None else max_connections
        self.max_body = MAX_BODY if max_body is None else max_body
        self.request_time = REQUEST_TIME if request_time is None else request_time
        self.headers = dict(headers or {})
        self._refused = 0
        self._refusal_logged: float | None = None
        self._start_tracking()

    def buildProtocol(self, addr: Any) -> LimitedChannel | None:  # type: ignore[override]
        """A channel, or None (the connection is closed at once) when the cap is reached."""
        if len(self.connections) >= self.max_connections:
            self._refused += 1
            now = self.reactor.seconds()
            if self._refusal_logged is None or now - self._refusal_logged >= REFUSAL_LOG_EVERY:
                log.warning(
                    "HTTP client %s refused: already %d connections (%d refused since the last such line)",
                    describe_peer(addr), len(self.connections), self._refused,
                )
                self._refusal_logged = now
                self._refused = 0
            return None
        channel = cast(LimitedChannel, super().buildProtocol(addr))
        self.connections.add(channel)
        return channel


class ClientRate:
    """A token bucket per client, in memory, holding at most ``clients`` of them.

    Each client may do ``burst`` things at once, and one more every ``every``
    seconds.  When the table is full the client seen longest ago is
    forgotten (a fresh bucket is the most it gains).

    :param clock: time source.
    :param burst: size of a bucket.
    :param every: seconds to earn one more.
    :param clients: most clients remembered.
    """

    def __init__(self, clock: IReactorTime, burst: int = 5, every: float = 60.0, clients: int = 4096) -> None:
        self.clock = clock
        self.burst = burst
        self.every = every
        self.clients = clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str) -> float:
        """Spend one token of ``client``: 0 when allowed, else the seconds until the next one."""
        now = self.clock.seconds()
        tokens, at = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) / self.every)
        if tokens >= 1:
            self._buckets[client] = (tokens - 1, now)
            wait = 0.0
        else:
            self._buckets[client] = (tokens, now)
            wait = (1 - tokens) * self.every
        while len(self._buckets) > self.clients:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)


def client_key(host: str) -> str:
    """The key of a client address for :class:`ClientRate`: an IPv6 address counts by its /64.

    One IPv6 host usually holds a whole /64 and can change address within it
    at will; IPv4 addresses and anything else count as they are.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
