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
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IResolver
from twisted.names import client, dns, error
from twisted.python.failure import Failure

from policyd.netlists import IPAddress

log = logging.getLogger("policyd.dns")

T = TypeVar("T")

#: Where the system's resolvers are listed when ``dns.nameservers`` is empty.
RESOLV_CONF = "/etc/resolv.conf"

#: PTR names checked for forward confirmation; a client with more is odd,
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


def parse_nameserver(text: str) -> tuple[str, int]:
    """Read ``host:port`` (``[v6]:port``; the port defaults to 53).

    :raises ValueError: when the host is not an IP address or the port is bad.
    """
    host, port = text.strip(), "53"
    if host.startswith("["):
        inside, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not host:port")
        host, port = inside, rest[1:] or "53"
    elif host.count(":") == 1:
        host, port = host.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: the resolver must be an IP address (host:port)") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: bad port {port!r}")
    return host, int(port)


def system_nameservers(path: str = RESOLV_CONF) -> list[tuple[str, int]]:
    """The ``nameserver`` lines of resolv.conf; 127.0.0.1 when there are none."""
    servers = []
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                servers.append(parse_nameserver(fields[1] if ":" not in fields[1] else f"[{fields[1]}]"))
            except ValueError:
                continue
    return servers or [("127.0.0.1", 53)]


def make_resolver(nameservers: list[str], reactor: Any, per_server_timeout: float) -> IResolver:
    """A ``twisted.names`` client for the configured (or the system's) resolvers.

    resolv.conf is read once here rather than polled by Twisted, so no timer
    outlives a reload; SIGHUP re-reads it.
    """
    servers = [parse_nameserver(s) for s in nameservers] or system_nameservers()
    resolver: IResolver = client.Resolver(
        servers=servers, reactor=reactor, timeout=(max(per_server_timeout, 0.001),)
    )
    return resolver


class CircuitBreaker:
    """Skips a failing zone for a while, then lets one trial look-up test it.

    :param name: the zone, for logs.
    :param clock: time source.
    :param failures: consecutive failures that open the breaker.
    :param cooldown: seconds the zone is skipped before a trial.
    """

    def __init__(self, name: str, clock: IReactorTime, failures: int, cooldown: float) -> None:
        self.name = name
        self.clock = clock
        self.failures = failures
        self.cooldown = cooldown
        #: Failures in a row so far.
        self.in_a_row = 0
        #: While open: when a trial may be made.
        self.open_until: float | None = None
        self._trial = False
        self.last_problem = ""

    @property
    def is_open(self) -> bool:
        """Whether the zone is being skipped."""
        return self.open_until is not None

    def admit(self) -> str | None:
        """``"normal"`` or ``"trial"`` when a look-up may go out, None to skip the zone."""
        if self.open_until is None:
            return "normal"
        if self._trial or self.clock.seconds() < self.open_until:
            return None
        self._trial = True
        log.info("DNS zone %s: cooldown over, trying it again", self.name)
        return "trial"

    def succeeded(self) -> None:
        """The zone answered: close the breaker."""
        if self.open_until is not None:
            log.warning("DNS zone %s answers again: no longer skipped", self.name)
        self.open_until = None
        self._trial = False
        self.in_a_row = 0

    def failed(self, problem: str, trial: bool) -> bool:
        """The zone timed out or erred; returns whether the breaker (re)opened."""
        self.in_a_row += 1
        self.last_problem = problem
        now = self.clock.seconds()
        if trial:
            self._trial = False
            self.open_until = now + self.cooldown
            log.warning(
                "DNS zone %s still failing (%s): skipped for another %gs", self.name, problem, self.cooldown
            )
            return True
        if self.open_until is None and self.in_a_row >= self.failures:
            self.open_until = now + self.cooldown
            log.warning(
                "DNS zone %s skipped for %gs after %d consecutive failures (last: %s)",
                self.name,
                self.cooldown,
                self.in_a_row,
                problem,
            )
            return True
        return False

    def explain(self) -> str:
        """Why the zone is skipped."""
        return f"{self.in_a_row} consecutive failures (last: {self.last_problem})"


class ClientCache:
    """Answers per client (address or /64), each with its own expiry.

    At most ``size`` clients are kept; the least recently used go first, so
    memory stays bounded whatever the number of clients.
    """

    def __init__(self, clock: IReactorTime, size: int) -> None:
        self.clock = clock
        self.size = size
        self._clients: OrderedDict[str, dict[str, tuple[float, Any]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def get(self, client_key: str, item: str) -> Any:
        """A cached answer, or None."""
        answers = self._clients.get(client_key)
        if answers is None:
            return None
        found = answers.get(item)
        if found is None:
            return None
        expires, value = found
        if expires <= self.clock.seconds():
            del answers[item]
            if not answers:
                del self._clients[client_key]
            return None
        self._clients.move_to_end(client_key)
        return value

    def put(self, client_key: str, item: str, value: Any, ttl: float) -> None:
        """Keep an answer for ``ttl`` seconds."""
        if self.size <= 0 or ttl <= 0:
            return
        answers = self._clients.get(client_key)
        if answers is None:
            answers = self._clients[client_key] = {}
        else:
            self._clients.move_to_end(client_key)
        answers[item] = (self.clock.seconds() + ttl, value)
        while len(self._clients) > self.size:
            self._clients.popitem(last=False)


def timed(deferred: Deferred[T], seconds: float, clock: IReactorTime, what: str) -> Deferred[T]:
    """A Deferred that fires like ``deferred``, or fails with TimeoutError after ``seconds``.

    The original is not cancelled (``twisted.names`` would then fire it
    twice); its late result is consumed and dropped.
    """
    result: Deferred[T] = Deferred()

    def expire() -> None:
        if not result.called:
            result.errback(TimeoutError(f"no answer for {what} within {seconds:g}s"))

    call: IDelayedCall | None = None

    def settle(outcome: Any) -> None:
        if call is not None and call.active():
            call.cancel()
        if result.called:
            return
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)

    deferred.addBoth(settle)
    if not result.called:
        call = clock.callLater(seconds, expire)
    return result


def within(
    clock: IReactorTime, seconds: float, lookups: Mapping[str, Deferred[Any]]
) -> Deferred[dict[str, Any]]:
    """Results of Deferreds that never fail, as far as they got in ``seconds``.

    Fires at once (synchronously) when all have already fired; keys of the
    ones still running at the deadline are missing from the result.
    """
    results: dict[str, Any] = {}
    done: Deferred[dict[str, Any]] = Deferred()
    remaining = len(lookups)
    if not remaining:
        done.callback(results)
        return done
    timer: IDelayedCall | None = None

    def one(value: Any, key: str) -> None:
        nonlocal remaining
        results[key] = value
        remaining -= 1
        if remaining == 0 and not done.called:
            if timer is not None and timer.active():
                timer.cancel()
            done.callback(dict(results))

    def deadline() -> None:
        if not done.called:
            done.callback(dict(results))

    for key, lookup in lookups.items():
        lookup.addCallback(one, key)
    if not done.called:
        timer = clock.callLater(seconds, deadline)
    return done


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
        lookup.addErrback(lambda f: (ZoneAnswer(zone, Status.ERROR, (), f.getErrorMessage()), 0.0))
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
            return ZoneAnswer(zone, Status.TIMEOUT, (), f"no answer within {self.timeout:g}s"), 0.0
        return ZoneAnswer(zone, Status.ERROR, (), _describe(failure)), 0.0

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
        found.addErrback(lambda f: ReverseDns("unknown", detail=_describe(f)))
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
            return ReverseDns("unknown", detail=f"PTR look-up failed: {_describe(problem)}")
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


def _describe(problem: Failure | BaseException) -> str:
    value = problem.value if isinstance(problem, Failure) else problem
    if isinstance(value, error.DNSServerError):
        return "server failure (SERVFAIL)"
    if isinstance(value, error.DNSQueryRefusedError):
        return "query refused (REFUSED)"
    text = str(value)
    return f"{type(value).__name__}: {text}" if text else type(value).__name__
