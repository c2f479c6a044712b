"""DNS for the checks on arrival: twisted.names with ``dns.nameservers``, answers cached, one deadline per message.

SPF (pyspf), DKIM and ARC (dkimpy) are synchronous libraries: they run in
the milter's thread pool and ask for records one at a time.  Each question
crosses to the reactor (:class:`BlockingDns`), where :class:`DnsCache`
answers from memory or asks the twisted.names resolver made from
``dns.nameservers`` (the same resolver ARC uses, never the system's
resolver library).

- Answers are cached by name and type, each for its own TTL capped at
  ``dns.cache_ttl``; names that do not exist (or have no record of the
  type) for at most :data:`NEGATIVE_TTL`.  At most ``dns.cache_size``
  entries are kept, the least recently used dropped first.  Timeouts and
  server failures are never cached.
- Every look-up of one message shares a :class:`Deadline`: once it has
  passed, a look-up fails at once as a temporary error, and none waits
  longer than what is left of it.  The checks then report ``temperror``
  and the message flows.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.names import dns, error
from twisted.python.failure import Failure

log = logging.getLogger("policyd.forwarding")

#: Longest a name that does not exist (or has no record of the asked type)
#: is remembered: short, so a record just published is seen soon.
NEGATIVE_TTL = 60

#: The record types the checks ask for.
KINDS = ("TXT", "A", "AAAA", "MX", "PTR")

#: What a look-up gives, by kind: TXT a tuple of its strings (bytes) per
#: record, A and AAAA addresses as text, MX (preference, name), PTR names.
Answer = list[Any]


class DnsTempError(Exception):
    """A look-up that got no answer: timeout, server failure, or the message's deadline passed."""


class Deadline:
    """One message's time for all its look-ups (monotonic seconds).

    :param seconds: from now.
    """

    def __init__(self, seconds: float, now: Callable[[], float] = time.monotonic) -> None:
        self._now = now
        self.end = now() + seconds

    def left(self) -> float:
        """Seconds left (0 once passed)."""
        return max(self.end - self._now(), 0.0)


#: Answers (or failures) already asked for one message, by (name, kind).
Known = dict[tuple[str, str], "Answer | DnsTempError"]

#: What the checks call, from their thread: ``lookup(name, kind)``; [] when
#: the name or the record does not exist; :class:`DnsTempError` when no answer came.
Lookup = Callable[[str, str], Answer]


def _values(records: list[Any], kind: str) -> Answer:
    """The values of the answer records of ``kind`` (CNAMEs followed by the resolver are skipped)."""
    wanted = getattr(dns, kind)
    values: Answer = []
    for record in records:
        if record.type != wanted:
            continue
        payload = record.payload
        if kind == "TXT":
            values.append(tuple(payload.data))
        elif kind == "A":
            values.append(payload.dottedQuad())
        elif kind == "AAAA":
            values.append(socket.inet_ntop(socket.AF_INET6, payload.address))
        elif kind == "MX":
            values.append((payload.preference, str(payload.name)))
        else:
            values.append(str(payload.name))
    return values


class DnsCache:
    """Cached look-ups on the reactor thread through a twisted.names resolver.

    :param resolver: an ``IResolver`` (:func:`policyd.checks.resolver.make_resolver`).
    :param clock: for TTLs and for a look-up's own timeout.
    :param size: entries kept at most (``dns.cache_size``).
    :param ttl: longest an answer is kept, whatever its TTL (``dns.cache_ttl``).
    """

    def __init__(self, resolver: Any, clock: IReactorTime, size: int = 10000, ttl: float = 300.0) -> None:
        self.resolver = resolver
        self.clock = clock
        self.size = size
        self.ttl = ttl
        self._entries: OrderedDict[tuple[str, str], tuple[float, Answer]] = OrderedDict()
        self._ask = {
            "TXT": resolver.lookupText,
            "A": resolver.lookupAddress,
            "AAAA": resolver.lookupIPV6Address,
            "MX": resolver.lookupMailExchange,
            "PTR": resolver.lookupPointer,
        }

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, name: str, kind: str, timeout: float) -> Deferred[Answer]:
        """The values of ``name``'s records of ``kind``; fails with :class:`DnsTempError` after ``timeout`` s."""
        key = (name.lower().rstrip("."), kind)
        now = self.clock.seconds()
        hit = self._entries.get(key)
        if hit is not None:
            if hit[0] > now:
                self._entries.move_to_end(key)
                return succeed(hit[1])
            del self._entries[key]
        asked: Deferred[Any] = self._ask[kind](key[0], (max(timeout, 0.001),))
        # The resolver times out by itself; this bounds a resolver that would not.
        asked.addTimeout(timeout + 0.5, self.clock)

        def answered(result: Any) -> Answer:
            answers = result[0]
            values = _values(answers, kind)
            ttls = [r.ttl for r in answers if r.type == getattr(dns, kind)]
            self._keep(key, values, min([self.ttl, *ttls]) if values else min(self.ttl, NEGATIVE_TTL))
            return values

        def failed(failure: Failure) -> Answer:
            if failure.check(error.DNSNameError, error.AuthoritativeDomainError, error.DomainError):
                self._keep(key, [], min(self.ttl, NEGATIVE_TTL))
                return []
            raise DnsTempError(f"{kind} {key[0]}: {failure.getErrorMessage() or failure.type.__name__}")

        return asked.addCallbacks(answered, failed)

    def _keep(self, key: tuple[str, str], values: Answer, ttl: float) -> None:
        if ttl <= 0 or self.size <= 0:
            return
        self._entries[key] = (self.clock.seconds() + ttl, values)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class BlockingDns:
    """The checks' side of :class:`DnsCache`: called from a pool thread, waits for the reactor's answer.

    :param cache: where look-ups go (on the reactor thread).
    :param reactor: the running reactor.
    :param timeout: longest one look-up may take (``dns.timeout``).
    """

    def __init__(self, cache: DnsCache, reactor: Any, timeout: float) -> None:
        self.cache = cache
        self.reactor = reactor
        self.timeout = timeout

    def bound(self, deadline: Deadline) -> Lookup:
        """A :data:`Lookup` for one message: no look-up outlives ``deadline``."""
        from twisted.internet.threads import blockingCallFromThread

        def lookup(name: str, kind: str) -> Answer:
            left = deadline.left()
            if left <= 0:
                raise DnsTempError(f"{kind} {name}: deadline passed")
            try:
                answer: Answer = blockingCallFromThread(
                    self.reactor, self.cache.lookup, name, kind, min(self.timeout, left)
                )
            except DnsTempError:
                raise
            except Exception as failure:  # a resolver fault is no answer, never a crash
                raise DnsTempError(f"{kind} {name}: {failure}") from None
            return answer

        return lookup


    def prefetch(self, names: Sequence[tuple[str, str]], deadline: Deadline) -> Deferred[Known]:
        """Ask for every (name, kind) at once, on the reactor thread, within ``deadline``.

        Fires (never fails) with each answer, or its :class:`DnsTempError`,
        so the checks in the thread find them without a wait: the names every
        message needs (SPF records, the DKIM keys, the DMARC record) are asked
        in parallel instead of one after the other.
        """
        found: Known = {}
        waiting = []
        for name, kind in names:
            key = (name.lower().rstrip("."), kind)
            left = min(self.timeout, deadline.left())
            if left <= 0:
                found[key] = DnsTempError(f"{kind} {key[0]}: deadline passed")
                continue
            asked = self.cache.lookup(key[0], kind, left)
            asked.addCallbacks(lambda value, key=key: found.__setitem__(key, value),
                               lambda failure, key=key: found.__setitem__(key, _temporary(failure)))
            waiting.append(asked)
        return DeferredList(waiting, consumeErrors=True).addCallback(lambda _: found)


def _temporary(failure: Failure) -> DnsTempError:
    error = failure.value
    return error if isinstance(error, DnsTempError) else DnsTempError(str(error))


def with_known(lookup: Lookup, known: Known) -> Lookup:
    """A :data:`Lookup` that answers from ``known`` (prefetched answers and failures) before asking ``lookup``."""

    def ask(name: str, kind: str) -> Answer:
        value = known.get((name.lower().rstrip("."), kind))
        if value is None:
            return lookup(name, kind)
        if isinstance(value, DnsTempError):
            raise value
        return list(value)

    return ask


def txt_lookup(lookup: Lookup) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` over a :data:`Lookup`: the first TXT record's strings joined, or None.

    A look-up without an answer raises dkimpy's ``DnsTimeoutError``, so the
    signature's result is a temporary error, not a missing key.
    """
    import dkim  # type: ignore[import-untyped]  # dkimpy ships no type hints

    def dnsfunc(name: bytes | str, timeout: float = 5.0) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        try:
            records = lookup(text.rstrip("."), "TXT")
        except DnsTempError as failure:
            raise dkim.DnsTimeoutError(str(failure)) from None
        return b"".join(records[0]) if records else None

    return dnsfunc


def memory_lookup(records: dict[tuple[str, str], Answer | Exception]) -> Lookup:
    """A :data:`Lookup` answering from memory (tests): an exception value is raised, a missing key is []."""
    lowered = {(name.lower().rstrip("."), kind): value for (name, kind), value in records.items()}

    def lookup(name: str, kind: str) -> Answer:
        value = lowered.get((name.lower().rstrip("."), kind), [])
        if isinstance(value, Exception):
            raise value
        return list(value)

    return lookup
