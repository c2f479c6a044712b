"""The policy-protocol load generator of ``make bench``.

It speaks the policy protocol over many loopback connections from one
asyncio loop, with plain ``asyncio.Protocol`` callbacks (no task per
request), and checks every reply: a reply is *malformed* unless it is
``action=WORD...`` in printable ASCII, *refused* when its action refuses
mail (REJECT, DEFER, DEFER_IF_PERMIT, a 4xx/5xx code), and a request
without a reply when the run ends (after a drain) is *lost*.

Two shapes of load:

- **closed loop** (:func:`throughput`): every connection keeps ``depth``
  requests outstanding and sends the next one as soon as a reply comes.
  ``depth=1`` is what Postfix does (one ``smtpd`` process, one request at a
  time on its connection); ``depth>1`` pipelines.
- **open loop** (:func:`paced`): requests are due at a fixed offered rate,
  spread round-robin over the connections, one outstanding per connection.
  A request due while its connection still waits for a reply queues in the
  client, and its latency counts from the moment it was due, so a server
  that stalls is charged for the wait it causes (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from policyd.testing import encode, rcpt

#: Accounts the requests cycle over.
ACCOUNTS = 1000
#: Action words that refuse mail (access(5)); a numeric code refuses too.
REFUSING = frozenset({"REJECT", "DEFER", "DEFER_IF_PERMIT", "DEFER_IF_REJECT"})
#: How long the end of a run waits for replies still outstanding.
DRAIN_SECONDS = 3.0


def requests(accounts: int = ACCOUNTS) -> list[bytes]:
    """Postfix's full RCPT request (about 30 attributes), one per account, external recipients."""
    return [
        encode(rcpt(recipient=f"friend{n}@example.net", sasl_username=f"user{n}@example.org",
                    client_address=f"198.51.100.{n % 250}", instance=f"{n:x}.{n:08x}.0",
                    policy_context="submission"))
        for n in range(accounts)
    ]


#: The DNSBL and DNSWL zones of the reputation run (served from tests/dns_zone.py).
BLOCK_ZONE = "bl.bench.test"
ALLOW_ZONE = "wl.bench.test"


def inbound_client(n: int) -> str:
    """The address of the ``n``-th SMTP client of the reputation run."""
    return f"172.16.{n // 250}.{n % 250 + 1}"


def inbound_listing(n: int) -> str | None:
    """The zone client ``n`` is listed in: one in ten in the DNSBL, one in twenty in the DNSWL."""
    return BLOCK_ZONE if n % 10 == 0 else ALLOW_ZONE if n % 20 == 5 else None


def inbound_requests(clients: int = ACCOUNTS) -> list[bytes]:
    """Postfix's full RCPT request from an unauthenticated client (port 25), one per client."""
    return [
        encode(rcpt(recipient=f"user{n % 50}@example.org", client_address=inbound_client(n),
                    client_name=f"mx{n}.bench.test", reverse_client_name=f"mx{n}.bench.test",
                    helo_name=f"mx{n}.bench.test", sender=f"news{n}@bench.test",
                    instance=f"{n:x}.{n:08x}.1", server_port="25", policy_context="inbound"))
        for n in range(clients)
    ]


class Tally:
    """What one run saw: latencies and the verdict on every reply."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.sent = 0
        self.replies = 0
        self.malformed = 0
        self.refused = 0
        self.actions: dict[str, int] = {}
        self.errors: list[str] = []
        self.examples: dict[str, str] = {}

    def reply(self, reply: bytes, latency: float) -> None:
        """Judge one reply (without its ending empty line)."""
        self.replies += 1
        self.latencies.append(latency)
        if not reply.startswith(b"action=") or b"\n" in reply or not reply.isascii() \
                or not reply[7:].strip():
            self.malformed += 1
            self.examples.setdefault("malformed", reply[:200].decode("ascii", "replace"))
            return
        word = reply[7:].split(b" ", 1)[0].decode("ascii").upper()
        self.actions[word] = self.actions.get(word, 0) + 1
        if word in REFUSING or word[:1] in ("4", "5"):
            self.refused += 1
            self.examples.setdefault("refused", reply[:200].decode("ascii", "replace"))

    def figures(self, elapsed: float) -> dict[str, Any]:
        """The run's figures: rate, latency percentiles (ms), and reply verdicts."""
        ordered = sorted(self.latencies)

        def percentile(p: float) -> float:
            if not ordered:
                return 0.0
            return round(ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000, 3)

        return {
            "requests": self.replies,
            "seconds": round(elapsed, 3),
            "rps": round(self.replies / elapsed) if elapsed > 0 else 0,
            "p50_ms": percentile(0.50),
            "p95_ms": percentile(0.95),
            "p99_ms": percentile(0.99),
            "max_ms": percentile(1.0),
            "sent": self.sent,
            "lost": self.sent - self.replies,
            "refused": self.refused,
            "malformed": self.malformed,
            "actions": dict(sorted(self.actions.items())),
            "errors": self.errors[:5],
            "examples": self.examples,
        }


class PolicyConnection(asyncio.Protocol):
    """One client connection: writes requests, matches replies in order."""

    def __init__(self, run: _Run, index: int) -> None:
        self.run = run
        self.index = index
        self.next_request = index
        self.transport: asyncio.Transport | None = None
        #: When each outstanding request's latency clock started.
        self.started: deque[float] = deque()
        #: Open loop only: requests due while this connection was busy.
        self.queued: deque[float] = deque()
        self.buffer = b""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.started:
            self.run.tally.errors.append(
                f"connection {self.index} closed with {len(self.started)} replies outstanding"
                + (f": {exc}" if exc else ""))
        self.run.check_done()

    def send(self, clock_start: float | None = None) -> None:
        """Write the next request; its latency counts from ``clock_start`` (default: now)."""
        assert self.transport is not None
        run = self.run
        self.transport.write(run.requests[self.next_request % len(run.requests)])
        self.next_request += run.connections
        self.started.append(time.perf_counter() if clock_start is None else clock_start)
        run.tally.sent += 1

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buffer = self.buffer + data
        if b"\n\n" not in buffer:
            self.buffer = buffer
            return
        *replies, self.buffer = buffer.split(b"\n\n")
        tally = self.run.tally
        for reply in replies:
            if not self.started:
                tally.malformed += 1
                tally.examples.setdefault("unsolicited", reply[:200].decode("ascii", "replace"))
                continue
            tally.reply(reply, now - self.started.popleft())
        self.run.replied(self, len(replies))


class _Run:
    """Shared state of one run over all its connections."""

    def __init__(self, port: int, connections: int, depth: int, seconds: float, limit: int,
                 payloads: Sequence[bytes]) -> None:
        self.port = port
        self.connections = connections
        self.depth = depth
        self.seconds = seconds
        self.limit = limit
        self.requests = list(payloads)
        self.tally = Tally()
        self.open_loop = False
        self.stopping = False
        self.peers: list[PolicyConnection] = []
        self.done: asyncio.Future[None] | None = None

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        for index in range(self.connections):
            _, protocol = await loop.create_connection(
                functools.partial(PolicyConnection, self, index), "127.0.0.1", self.port)
            self.peers.append(protocol)

    def may_send(self) -> bool:
        return not self.stopping and self.tally.sent < self.limit

    def replied(self, peer: PolicyConnection, count: int) -> None:
        if self.open_loop:
            while peer.queued and not peer.started and not self.stopping:
                peer.send(clock_start=peer.queued.popleft())
        else:
            while len(peer.started) < self.depth and self.may_send():
                peer.send()
        self.check_done()

    def check_done(self) -> None:
        if self.stopping and self.done is not None and not self.done.done() and all(
                not p.started or p.closed for p in self.peers):
            self.done.set_result(None)

    async def finish(self) -> None:
        """Stop sending, wait for the replies still due (bounded), close."""
        self.stopping = True
        self.check_done()
        assert self.done is not None
        try:
            await asyncio.wait_for(asyncio.shield(self.done), DRAIN_SECONDS)
        except TimeoutError:
            pass
        for peer in self.peers:
            if peer.transport is not None:
                peer.transport.close()


async def _throughput(port: int, connections: int, depth: int, seconds: float, limit: int,
                      payloads: Sequence[bytes]) -> dict[str, Any]:
    run = _Run(port, connections, depth, seconds, limit, payloads)
    await run.connect()
    started = time.perf_counter()
    for peer in run.peers:
        for _ in range(depth):
            if run.may_send():
                peer.send()
    while time.perf_counter() - started < seconds and run.may_send():
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    await run.finish()
    return run.tally.figures(elapsed)


async def _paced(port: int, connections: int, rate: float, seconds: float, limit: int,
                 payloads: Sequence[bytes]) -> dict[str, Any]:
    run = _Run(port, connections, 1, seconds, limit, payloads)
    run.open_loop = True
    await run.connect()
    started = time.perf_counter()
    interval = 1.0 / rate
    due = started
    turn = 0
    late = 0
    while True:
        now = time.perf_counter()
        if now - started >= seconds or not run.may_send():
            break
        while due <= now and run.may_send():
            peer = run.peers[turn % connections]
            turn += 1
            if peer.started or peer.queued:
                peer.queued.append(due)
                late += 1
            else:
                peer.send()
            due += interval
        await asyncio.sleep(max(0.0, min(0.001, due - time.perf_counter())))
    elapsed = time.perf_counter() - started
    await run.finish()
    figures = run.tally.figures(elapsed)
    figures["offered_rps"] = rate
    figures["queued_in_client"] = late
    figures["unsent"] = sum(len(p.queued) for p in run.peers)
    return figures


def throughput(port: int, connections: int = 50, depth: int = 1, seconds: float = 5.0,
               limit: int = 400_000, payloads: Sequence[bytes] | None = None) -> dict[str, Any]:
    """Closed loop: as many requests as the server answers, ``depth`` outstanding per connection."""
    return asyncio.run(_throughput(port, connections, depth, seconds, limit,
                                   payloads or requests()))


def paced(port: int, rate: float, connections: int = 50, seconds: float = 5.0,
          limit: int = 400_000, payloads: Sequence[bytes] | None = None) -> dict[str, Any]:
    """Open loop at ``rate`` requests per second offered; latency counts from when each was due."""
    return asyncio.run(_paced(port, connections, rate, seconds, limit, payloads or requests()))


def pipelining(port: int, count: int = 4, timeout: float = 2.0,
               payloads: Sequence[bytes] | None = None) -> dict[str, Any]:
    """Send ``count`` requests in one write on one connection; how many replies come back?"""

    async def probe() -> dict[str, Any]:
        run = _Run(port, 1, count, timeout, count, list(payloads or requests())[:count])
        await run.connect()
        peer = run.peers[0]
        assert peer.transport is not None
        peer.transport.write(b"".join(run.requests))
        peer.started.extend([time.perf_counter()] * count)
        run.tally.sent = count
        run.stopping = True
        run.check_done()
        assert run.done is not None
        try:
            await asyncio.wait_for(asyncio.shield(run.done), timeout)
        except TimeoutError:
            pass
        peer.transport.close()
        return {"sent": count, "replies": run.tally.replies, "ok": run.tally.replies == count
                and run.tally.malformed == 0}

    return asyncio.run(probe())
