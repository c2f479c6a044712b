"""The checks' DNS cache on a fake clock, over an in-code zone: TTLs, negative answers, failures, its bound."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.names import dns

from policyd.forwarding.lookups import NEGATIVE_TTL, DnsCache, DnsTempError
from tests.harness.dns_zone import TestZone


def answer(cache: DnsCache, name: str, kind: str = "TXT", timeout: float = 2.0) -> Any:
    """The value or the failure of one look-up (the zone answers at once)."""
    found: list[Any] = []
    cache.lookup(name, kind, timeout).addBoth(found.append)
    assert found, "the look-up did not finish"
    failure = found[0]
    if hasattr(failure, "value"):
        return failure.value
    return failure


@pytest.fixture
def zone() -> TestZone:
    """example.com with TXT (TTL 100), A and MX records."""
    zone = TestZone()
    zone.add("example.com", dns.Record_TXT(b"v=spf1 ", b"-all", ttl=100), ttl=100)
    zone.add("example.com", dns.Record_A("192.0.2.1", ttl=100), ttl=100)
    zone.add("example.com", dns.Record_MX(10, b"mx.example.com", ttl=100), ttl=100)
    return zone


def test_answers_are_cached_for_their_ttl(zone: TestZone) -> None:
    """One question per TTL; values by kind (TXT strings, A text, MX preference and name)."""
    clock = Clock()
    cache = DnsCache(zone, clock, size=100, ttl=300)
    assert answer(cache, "Example.COM.") == [(b"v=spf1 ", b"-all")]
    assert answer(cache, "example.com") == [(b"v=spf1 ", b"-all")]
    assert zone.asked("example.com", dns.TXT) == 1
    assert answer(cache, "example.com", "A") == ["192.0.2.1"]
    assert answer(cache, "example.com", "MX") == [(10, "mx.example.com")]
    clock.advance(101)
    answer(cache, "example.com")
    assert zone.asked("example.com", dns.TXT) == 2


def test_cache_ttl_caps_and_negative_answers(zone: TestZone) -> None:
    """dns.cache_ttl caps a record's TTL; a missing name is remembered for NEGATIVE_TTL at most."""
    clock = Clock()
    cache = DnsCache(zone, clock, size=100, ttl=30)
    answer(cache, "example.com")
    clock.advance(31)
    answer(cache, "example.com")
    assert zone.asked("example.com", dns.TXT) == 2
    long = DnsCache(zone, clock, size=100, ttl=3600)
    assert answer(long, "missing.example.com") == [] and answer(long, "missing.example.com") == []
    assert zone.asked("missing.example.com", dns.TXT) == 1
    clock.advance(NEGATIVE_TTL + 1)
    answer(long, "missing.example.com")
    assert zone.asked("missing.example.com", dns.TXT) == 2


def test_failures_are_temporary_and_never_cached(zone: TestZone) -> None:
    """SERVFAIL and a silent server are DnsTempError (the silent one after its timeout), asked again next time."""
    clock = Clock()
    cache = DnsCache(zone, clock)
    zone.servfail("broken.example.com")
    assert isinstance(answer(cache, "broken.example.com"), DnsTempError)
    assert isinstance(answer(cache, "broken.example.com"), DnsTempError)
    assert zone.asked("broken.example.com", dns.TXT) == 2
    zone.silence("slow.example.com")
    found: list[Any] = []
    cache.lookup("slow.example.com", "TXT", 1.0).addErrback(lambda f: found.append(f.value))
    clock.advance(1.4)
    assert found == []
    clock.advance(0.2)
    assert isinstance(found[0], DnsTempError)


def test_the_cache_is_bounded(zone: TestZone) -> None:
    """Beyond its size the least recently used answers are dropped."""
    cache = DnsCache(zone, Clock(), size=2, ttl=300)
    for name in ("a.example.com", "b.example.com", "a.example.com", "c.example.com"):
        answer(cache, name)
    assert len(cache) == 2
    answer(cache, "a.example.com")
    assert zone.asked("a.example.com", dns.TXT) == 1
    answer(cache, "b.example.com")
    assert zone.asked("b.example.com", dns.TXT) == 2


def test_prefetch_asks_every_name_at_once_and_keeps_failures(zone: TestZone) -> None:
    """Names asked together; answers and temporary failures kept for the checks, which then ask nothing again."""
    from policyd.forwarding.lookups import BlockingDns, Deadline, with_known

    clock = Clock()
    zone.hold("example.com")
    zone.servfail("broken.example.com")
    blocking = BlockingDns(DnsCache(zone, clock), reactor=None, timeout=2.0)
    found: list[Any] = []
    blocking.prefetch([("example.com", "TXT"), ("broken.example.com", "TXT"), ("missing.example.com", "TXT")],
                      Deadline(5.0)).addCallback(found.append)
    assert found == [] and zone.asked("missing.example.com", dns.TXT) == 1  # asked while example.com waits
    zone.release("example.com")
    (known,) = found
    assert known[("example.com", "TXT")] == [(b"v=spf1 ", b"-all")] and known[("missing.example.com", "TXT")] == []
    assert isinstance(known[("broken.example.com", "TXT")], DnsTempError)

    def never(name: str, kind: str) -> list[Any]:
        raise AssertionError(f"{name} asked again")

    lookup = with_known(never, known)
    assert lookup("Example.com.", "TXT") == [(b"v=spf1 ", b"-all")]
    with pytest.raises(DnsTempError):
        lookup("broken.example.com", "TXT")
    with pytest.raises(AssertionError):
        lookup("other.example.com", "TXT")
