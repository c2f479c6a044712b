"""The DNS plumbing of the checks: name servers, the twisted.names resolver, deadlines, circuit breakers, caches."""

from __future__ import annotations

import ipaddress
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IResolver
from twisted.names import client, error
from twisted.python.failure import Failure

log = logging.getLogger("policyd.dns")


T = TypeVar("T")

#: Where the system's resolvers are listed when ``dns.nameservers`` is empty.
RESOLV_CONF = "/etc/resolv.conf"

#: PTR names checked for forward confirmation; a client with more is odd,

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


def describe_servers(servers: Sequence[tuple[str, int]]) -> str:
    """``DNS server 127.0.0.1:53`` or ``DNS servers 10.0.0.1:53, [2001:db8::1]:53``, for people."""
    if not servers:
        return "the DNS server"
    named = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in servers]
    return f"DNS server{'s' if len(named) > 1 else ''} {', '.join(named)}"


def describe_failure(
    problem: Failure | BaseException, servers: Sequence[tuple[str, int]] = (), timeout: float | None = None
) -> str:
    """A DNS failure in words, for the log and ``score-ip``.

    A time-out names the servers that were asked and how long they had
    (``DNS server 127.0.0.1:53 did not answer within 2s``): the resolver's
    own exception only shows the query it sent.

    :param servers: the name servers that were asked (``host, port``).
    :param timeout: the seconds they had, when known.
    """
    value = problem.value if isinstance(problem, Failure) else problem
    if isinstance(value, TimeoutError):
        within_ = f" within {timeout:g}s" if timeout is not None else ""
        return f"{describe_servers(servers)} did not answer{within_}"
    if isinstance(value, error.DNSServerError):
        return "server failure (SERVFAIL)"
    if isinstance(value, error.DNSQueryRefusedError):
        return "query refused (REFUSED)"
    if isinstance(value, error.DNSFormatError):
        return "the server could not read the query (FORMERR)"
    if isinstance(value, error.DNSNotImplementedError):
        return "query type not implemented by the server (NOTIMP)"
    if isinstance(value, error.DNSUnknownError):
        return "unknown error code from the server"
    if isinstance(value, OSError) and value.strerror:
        return f"cannot reach {describe_servers(servers)}: {value.strerror}"
    text = str(value)
    return f"{type(value).__name__}: {text}" if text else type(value).__name__


def resolver_servers(resolver: object) -> tuple[tuple[str, int], ...]:
    """The ``(host, port)`` name servers a ``twisted.names`` client asks; none for other resolvers."""
    servers = getattr(resolver, "servers", None) or ()
    try:
        return tuple((str(host), int(port)) for host, port in servers)
    except (TypeError, ValueError):
        return ()
