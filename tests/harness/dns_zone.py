"""A real DNS server for tests: ``twisted.names`` serving an in-code zone on loopback.

:class:`TestZone` is an authority written in code: A/AAAA/PTR records, names
that answer NXDOMAIN (anything not added), SERVFAIL, or nothing at all (the
query is never answered, so the client times out), and names whose answer
the test releases by hand.  It is an ``IResolver``, so unit tests use it
directly with a fake clock; :class:`DnsZoneServer` serves it over UDP and TCP
on 127.0.0.1 for tests that go through a real ``twisted.names`` client or a
``policyd serve`` process (``dns.nameservers: ["127.0.0.1:PORT"]``).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.names import common, dns, error, server
from twisted.python.failure import Failure

from policyd.checks.dnsbl import query_name


class ServerFailure(Exception):
    """Answered as SERVFAIL."""


class TestZone(common.ResolverBase):
    """An in-code authority for test zones; every name not added is NXDOMAIN.

    :ivar queries: every ``(name, type)`` asked, in order.
    """

    __test__ = False  # not a pytest test class

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, list[dns.RRHeader]] = {}
        self.silent: set[str] = set()
        self.failing: set[str] = set()
        self.held: dict[str, list[Deferred[Any]]] = {}
        self.queries: list[tuple[str, int]] = []

    # --- building the zone -----------------------------------------------

    def add(self, name: str, payload: Any, ttl: int = 300) -> None:
        """Add one record."""
        key = name.lower().rstrip(".")
        record = dns.RRHeader(key, payload.TYPE, dns.IN, ttl, payload, auth=True)
        self.records.setdefault(key, []).append(record)

    def listed(self, address: str, zone: str, *codes: str, ttl: int = 300) -> str:
        """List a client address in a DNSBL zone with return codes; returns the query name."""
        name = query_name(ipaddress.ip_address(address), zone)
        for code in codes or ("127.0.0.2",):
            self.add(name, dns.Record_A(code, ttl), ttl)
        return name

    def host(self, name: str, *addresses: str, ttl: int = 300) -> None:
        """A and AAAA records of a host name."""
        for text in addresses:
            address = ipaddress.ip_address(text)
            payload = dns.Record_A(text, ttl) if address.version == 4 else dns.Record_AAAA(text, ttl)
            self.add(name, payload, ttl)

    def pointer(self, address: str, name: str, ttl: int = 300) -> None:
        """A PTR record for an address."""
        self.add(ipaddress.ip_address(address).reverse_pointer, dns.Record_PTR(name, ttl), ttl)

    def silence(self, name: str) -> None:
        """Never answer queries for ``name`` (the client times out)."""
        self.silent.add(name.lower().rstrip("."))

    def servfail(self, name: str) -> None:
        """Answer SERVFAIL for ``name``."""
        self.failing.add(name.lower().rstrip("."))

    def hold(self, name: str) -> None:
        """Keep queries for ``name`` waiting until :meth:`release`."""
        self.held.setdefault(name.lower().rstrip("."), [])

    def release(self, name: str) -> None:
        """Answer the held queries for ``name`` with its records (or NXDOMAIN)."""
        key = name.lower().rstrip(".")
        waiting = self.held.pop(key, [])
        for deferred in waiting:
            deferred.callback(None)

    def restore(self, name: str) -> None:
        """Let ``name`` answer normally again."""
        key = name.lower().rstrip(".")
        self.silent.discard(key)
        self.failing.discard(key)

    def asked(self, name: str, kind: int = dns.A) -> int:
        """How many queries of type ``kind`` came for ``name``."""
        key = name.lower().rstrip(".")
        return sum(1 for n, t in self.queries if n == key and t == kind)

    # --- IResolver ---------------------------------------------------------

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        key = name.decode("ascii").lower().rstrip(".")
        self.queries.append((key, type))
        if key in self.silent:
            return Deferred()
        if key in self.held:
            waiting: Deferred[Any] = Deferred()
            self.held[key].append(waiting)
            return waiting.addCallback(lambda _: self._answer(key, name, type))
        if key in self.failing:
            return fail(ServerFailure(key))
        return self._answer(key, name, type)

    def _answer(self, key: str, name: bytes, type: int) -> Deferred[Any]:
        records = self.records.get(key)
        if records is None:
            return fail(error.DomainError(name))
        return succeed(([r for r in records if r.type == type], [], []))


class _ServerFactory(server.DNSServerFactory):
    """A DNS server factory that answers SERVFAIL for :class:`ServerFailure` without logging it."""

    noisy = False

    def gotResolverError(self, failure: Failure, protocol: Any, message: Any, address: Any) -> None:
        if failure.check(ServerFailure):
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, response, address)
            return
        super().gotResolverError(failure, protocol, message, address)


class DnsZoneServer:
    """Serves a :class:`TestZone` on 127.0.0.1, UDP and TCP on the same free port.

    :param zone: the authority to serve.
    :param reactor: the running reactor.
    """

    def __init__(self, zone: TestZone, reactor: Any) -> None:
        self.zone = zone
        self.reactor = reactor
        self.port = 0
        self._listening: list[Any] = []

    def start(self, port: int = 0) -> DnsZoneServer:
        """Listen; UDP first on ``port`` (0: a free one), then TCP on the same number."""
        factory = _ServerFactory(authorities=[self.zone])
        for _ in range(1 if port else 50):
            # Each attempt asks for the port requested: a UDP port given back by
            # stopListening is closed a turn later, so asking for it again at
            # once would fail (and Twisted leaves the socket of a failed bind open).
            udp = self.reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
            bound = udp.getHost().port
            try:
                tcp = self.reactor.listenTCP(bound, factory, interface="127.0.0.1")
            except CannotListenError:
                udp.stopListening()
                continue
            self.port = bound
            self._listening = [udp, tcp]
            return self
        raise RuntimeError("no loopback port free for both UDP and TCP")

    @property
    def nameserver(self) -> str:
        """The ``dns.nameservers`` entry for this server."""
        return f"127.0.0.1:{self.port}"

    def stop(self) -> Deferred[Any]:
        """Stop listening."""
        stopped = [maybeDeferred(p.stopListening) for p in self._listening]
        self._listening = []
        return DeferredList(stopped, consumeErrors=True)
