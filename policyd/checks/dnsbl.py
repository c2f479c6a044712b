"""DNS for network reputation: DNSBL/DNSWL zones, reverse and forward names.

Everything here is asynchronous (``twisted.names``) and bounded:

- each look-up has a timeout (``dns.timeout``), enforced here as well as by
  the resolver, so no resolver can make a request wait longer;
- answers are cached per client address, IPv6 clients per /64 (a spammer
  moving inside its /64 costs one look-up), in a cache of bounded size
  (``dns.cache_size``) for at most ``dns.cache_ttl`` or the record's TTL;
- a look-up already in flight is shared by every request that needs it;
- a zone that keeps timing out or failing is skipped for a while (a circuit
  breaker, ``dns.breaker_failures`` and ``dns.breaker_cooldown``), which is
  logged when it trips and when the zone answers again.

A DNSBL answer in 127.255.255.0/24 (Spamhaus's "query refused" codes, sent to
public resolvers) or outside 127.0.0.0/8 (a resolver that rewrites NXDOMAIN)
is an error, never a listing.  NXDOMAIN means "not listed".
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.names import dns, error
from twisted.python.failure import Failure

from policyd.checks.resolver import (
    CircuitBreaker,
    ClientCache,
    describe_failure,
    resolver_servers,
    timed,
    within,
)
from policyd.netlists import IPAddress

log = logging.getLogger("policyd.dns")


#: and each name costs two look-ups.
MAX_PTR_NAMES = 3

#: Shortest interval between two log lines about the same failing zone, so a
#: dead list does not write one line per client.
LOG_EVERY = 60.0

#: Errors a resolver reports for "this name does not exist".
_NO_SUCH_NAME = (error.DNSNameError,)
#: ``DomainError`` itself (not its subclasses such as SERVFAIL) is what an
#: authority answers for a missing name.
_PLAIN_NO_SUCH_NAME = (error.DomainError, error.AuthoritativeDomainError)


class Status(enum.Enum):
    """What became of one zone's look-up for one client."""

    LISTED = "listed"
    NOT_LISTED = "not listed"
    ERROR = "error"
    TIMEOUT = "timeout"
    SKIPPED = "skipped"

    @property
    def answered(self) -> bool:
        """Whether the zone gave a usable answer (listed or not)."""
        return self in (Status.LISTED, Status.NOT_LISTED)


@attrs.frozen
class ZoneAnswer:
    """One zone's answer about one client.

    :ivar zone: the DNSBL/DNSWL zone.
    :ivar status: listed, not listed, or why there is no answer.
    :ivar codes: the A records of a listing (``127.0.0.2``...).
    :ivar detail: what went wrong, for logs and ``policyd score-ip``.
    """

    zone: str
    status: Status
    codes: tuple[str, ...] = ()
    detail: str = ""


@attrs.frozen
class ReverseDns:
    """The client's reverse DNS and whether it is forward-confirmed.

    :ivar status: ``confirmed`` (a PTR name resolves back to the address),
        ``mismatch`` (PTR names, none resolving back), ``none`` (no PTR), or
        ``unknown`` (DNS did not answer).
    :ivar names: the PTR names.
    :ivar verified: the forward-confirmed name, if any.
    """

    status: str
    names: tuple[str, ...] = ()
    verified: str | None = None
    detail: str = ""


def query_name(address: IPAddress, zone: str) -> str:
    """The DNSBL query name: reversed octets (IPv4) or nibbles (IPv6), then the zone.

    >>> query_name(ipaddress.ip_address("192.0.2.10"), "zen.example")
    '10.2.0.192.zen.example'
    """
    reversed_labels = address.reverse_pointer.rsplit(".", 2)[0]
    return f"{reversed_labels}.{zone.strip('.')}"


@functools.lru_cache(maxsize=4096)
def cache_key(address: IPAddress) -> str:
    """Answers are shared per IPv4 address and per IPv6 /64."""
    if address.version == 6:
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


def _is_listing_code(code: str) -> bool:
    """127.0.0.0/8 except 127.255.255.0/24 (Spamhaus's error codes)."""
    return code.startswith("127.") and not code.startswith("127.255.255.")


class DnsblClient:
    """Asks DNSBL/DNSWL zones and reverse DNS about clients, with cache and breakers.

    :param resolver: any ``IResolver`` (a ``twisted.names`` client in
        production, an in-memory zone in tests).
    :param clock: time source for timeouts, cache and breakers.
    :param timeout: seconds per look-up.
    :param cache_ttl: longest a result is cached.
    :param cache_size: clients (IPv6: /64 networks) in the cache.
    :param breaker_failures: consecutive failures that make a zone skipped.
    :param breaker_cooldown: seconds a failing zone is skipped.
    :param per_server_timeout: the timeout handed to the resolver, per server.
    """

    def __init__(
        self,
        resolver: IResolver,
        clock: IReactorTime,
        *,
        timeout: float = 2.0,
        cache_ttl: float = 300.0,
        cache_size: int = 10000,
        breaker_failures: int = 5,
        breaker_cooldown: float = 60.0,
        per_server_timeout: float | None = None,
    ) -> None:
        self.resolver = resolver
        self.clock = clock
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self.breaker_failures = breaker_failures
        self.breaker_cooldown = breaker_cooldown
        self._resolver_timeout = (per_server_timeout or timeout,)
        #: The name servers asked, to name them when they do not answer.
        self.servers = resolver_servers(resolver)
        self.cache = ClientCache(clock, cache_size)
        self.breakers: dict[str, CircuitBreaker] = {}
        #: Look-ups in flight, with the requests waiting for each.
        self._pending: dict[tuple[str, str], list[Deferred[Any]]] = {}
        self._logged: dict[str, float] = {}
        #: What happened so far (look-ups, cache hits, timeouts, errors,
        #: skipped, breaker trips), for metrics.
        self.counters: Counter[str] = Counter()
        #: Told ``(zone, kind)`` of every zone look-up that failed (kind
        #: ``timeout`` or ``error``) or was skipped by the breaker (``skipped``).
        self.on_problem: Callable[[str, str], None] | None = None

    def breaker(self, zone: str) -> CircuitBreaker:
        """The circuit breaker of a zone."""
        breaker = self.breakers.get(zone)
        if breaker is None:
            breaker = self.breakers[zone] = CircuitBreaker(
                zone, self.clock, self.breaker_failures, self.breaker_cooldown
            )
        return breaker

    # --- DNSBL / DNSWL ----------------------------------------------------

    def cached_listings(self, address: IPAddress, zones: Iterable[str]) -> dict[str, ZoneAnswer] | None:
        """Every zone's cached answer (keyed ``zone:NAME``, as :func:`within` gives them), or None if one is missing."""
        key = cache_key(address)
        found = {}
        for zone in zones:
            cached = self.cache.get(key, zone.strip(".").lower())
            if cached is None:
                return None
            found[f"zone:{zone}"] = cached
        self.counters["cache_hits"] += len(found)
        return found

    def listing(self, address: IPAddress, zone: str) -> Deferred[ZoneAnswer]:
        """Whether ``zone`` lists ``address``; never fails."""
        zone = zone.strip(".").lower()
        key = cache_key(address)
        cached = self.cache.get(key, zone)
        if cached is not None:
            self.counters["cache_hits"] += 1
            return succeed(cached)
        waiter: Deferred[ZoneAnswer] = Deferred()
        waiting = self._pending.get((key, zone))
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        breaker = self.breaker(zone)
        admitted = breaker.admit()
        if admitted is None:
            self.counters["skipped"] += 1
            if self.on_problem is not None:
                self.on_problem(zone, "skipped")
            return succeed(ZoneAnswer(zone, Status.SKIPPED, (), breaker.explain()))
        self._pending[(key, zone)] = [waiter]
        name = query_name(address, zone)
        lookup = self._lookup("lookupAddress", name)
        lookup.addCallbacks(self._answered, self._not_answered, callbackArgs=(zone,), errbackArgs=(zone,))
        lookup.addErrback(lambda f: (ZoneAnswer(zone, Status.ERROR, (), self.describe(f)), 0.0))
        lookup.addCallback(self._settle, key, zone, breaker, admitted == "trial")
        return waiter

    def _answered(self, result: Any, zone: str) -> tuple[ZoneAnswer, float]:
        answers = result[0]
        records = [r for r in answers if r.type == dns.A]
        codes = tuple(sorted({r.payload.dottedQuad() for r in records}))
        if not codes:
            return ZoneAnswer(zone, Status.NOT_LISTED), _negative_ttl(result, self.cache_ttl)
        bad = [c for c in codes if not _is_listing_code(c)]
        if bad:
            why = "query refused" if bad[0].startswith("127.255.255.") else "answer outside 127.0.0.0/8"
            return ZoneAnswer(zone, Status.ERROR, codes, f"{why} ({', '.join(bad)})"), 0.0
        ttl = min(float(r.ttl) for r in records)
        return ZoneAnswer(zone, Status.LISTED, codes), ttl

    def _not_answered(self, failure: Failure, zone: str) -> tuple[ZoneAnswer, float]:
        if failure.check(*_NO_SUCH_NAME) or type(failure.value) in _PLAIN_NO_SUCH_NAME:
            message = failure.value.args[0] if failure.value.args else None
            ttl = _negative_ttl((None, getattr(message, "authority", []), None), self.cache_ttl)
            return ZoneAnswer(zone, Status.NOT_LISTED), ttl
        if failure.check(TimeoutError):
            return ZoneAnswer(zone, Status.TIMEOUT, (), self.describe(failure)), 0.0
        return ZoneAnswer(zone, Status.ERROR, (), self.describe(failure)), 0.0

    def describe(self, problem: Failure | BaseException) -> str:
        """A failed look-up in words, naming the servers asked (:func:`describe_failure`)."""
        return describe_failure(problem, self.servers, self.timeout)

    def _settle(
        self, outcome: tuple[ZoneAnswer, float], key: str, zone: str, breaker: CircuitBreaker, trial: bool
    ) -> None:
        answer, ttl = outcome
        if answer.status.answered:
            breaker.succeeded()
            self.cache.put(key, zone, answer, min(ttl, self.cache_ttl))
        else:
            self.counters["timeouts" if answer.status is Status.TIMEOUT else "errors"] += 1
            if self.on_problem is not None:
                self.on_problem(zone, answer.status.value)
            self._log_problem(zone, answer)
            if breaker.failed(answer.detail, trial):
                self.counters["breaker_trips"] += 1
        for waiter in self._pending.pop((key, zone), []):
            waiter.callback(answer)

    def _log_problem(self, zone: str, answer: ZoneAnswer) -> None:
        now = self.clock.seconds()
        last = self._logged.get(zone)
        if last is not None and now - last < LOG_EVERY:
            return
        self._logged[zone] = now
        log.warning("DNS zone %s: %s: %s (not counted as a listing)", zone, answer.status.value, answer.detail)

    # --- reverse and forward names ---------------------------------------

    def reverse_dns(self, address: IPAddress) -> Deferred[ReverseDns]:
        """The client's PTR names and whether one resolves back to it; never fails."""
        key = str(address)
        cached = self.cache.get(key, "reverse-dns")
        if cached is not None:
            self.counters["cache_hits"] += 1
            return succeed(cached)
        waiter: Deferred[ReverseDns] = Deferred()
        waiting = self._pending.get((key, "reverse-dns"))
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        self._pending[(key, "reverse-dns")] = [waiter]
        found = Deferred.fromCoroutine(self._reverse(address))
        found.addErrback(lambda f: ReverseDns("unknown", detail=self.describe(f)))
        found.addCallback(self._settle_reverse, key)
        return waiter

    def _settle_reverse(self, result: ReverseDns, key: str) -> None:
        if result.status != "unknown":
            self.cache.put(key, "reverse-dns", result, self.cache_ttl)
        for waiter in self._pending.pop((key, "reverse-dns"), []):
            waiter.callback(result)

    def _lookup(self, method: str, name: str) -> Deferred[Any]:
        self.counters["lookups"] += 1
        return timed(
            maybeDeferred(getattr(self.resolver, method), name, self._resolver_timeout),
            self.timeout,
            self.clock,
            name,
        )

    async def _reverse(self, address: IPAddress) -> ReverseDns:
        try:
            result = await self._lookup("lookupPointer", address.reverse_pointer)
        except Exception as problem:
            if isinstance(problem, _NO_SUCH_NAME) or type(problem) in _PLAIN_NO_SUCH_NAME:
                return ReverseDns("none", detail="no PTR record")
            return ReverseDns("unknown", detail=f"PTR look-up failed: {self.describe(problem)}")
        names = tuple(
            dict.fromkeys(str(r.payload.name).rstrip(".").lower() for r in result[0] if r.type == dns.PTR)
        )
        if not names:
            return ReverseDns("none", detail="no PTR record")
        unknown = False
        for name in names[:MAX_PTR_NAMES]:
            forward = within(
                self.clock,
                self.timeout * 2,
                {
                    "A": _addresses(self._lookup("lookupAddress", name)),
                    "AAAA": _addresses(self._lookup("lookupIPV6Address", name)),
                },
            )
            found = await forward
            if any(address in addresses for addresses in found.values() if addresses is not None):
                return ReverseDns("confirmed", names, name)
            if len(found) < 2 or any(v is None for v in found.values()):
                unknown = True
        if unknown:
            return ReverseDns("unknown", names, detail="forward look-up of the PTR name failed")
        return ReverseDns("mismatch", names, detail="no PTR name resolves back to the address")


def _addresses(lookup: Deferred[Any]) -> Deferred[set[IPAddress] | None]:
    """The A/AAAA addresses of an answer; an empty set for NXDOMAIN, None on errors."""

    def found(result: Any) -> set[IPAddress]:
        addresses: set[IPAddress] = set()
        for record in result[0]:
            if record.type in (dns.A, dns.AAAA):
                try:
                    addresses.add(ipaddress.ip_address(record.payload.address))
                except (ValueError, AttributeError):
                    continue
        return addresses

    def failed(failure: Failure) -> set[IPAddress] | None:
        if failure.check(*_NO_SUCH_NAME) or type(failure.value) in _PLAIN_NO_SUCH_NAME:
            return set()
        return None

    return lookup.addCallbacks(found, failed)


def _negative_ttl(result: Any, default: float) -> float:
    """How long "not listed" holds: the SOA minimum of the authority section (RFC 2308)."""
    for record in (result[1] or []) if result else []:
        if getattr(record, "type", None) == dns.SOA:
            return float(min(record.ttl, record.payload.minimum))
    return default
