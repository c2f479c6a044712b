"""Inbound network reputation: DNS lists, network files, heuristics, decisions, the header.

Unit tests use the in-code zone of :mod:`tests.harness.dns_zone` as the resolver and
a fake clock; the ``real DNS`` tests serve that zone over UDP/TCP on
127.0.0.1 and go through ``twisted.names``' client, and the end-to-end test
runs ``policyd serve`` and ``policyd score-ip`` against it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import signal
import stat
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.names import client, dns

from policyd.checks import Verdict
from policyd.checks.dnsbl import cache_key, query_name
from policyd.checks.names import NamePatterns, helo_findings, is_fqdn
from policyd.checks.network_header import (
    HEADER,
    header_secret_path,
    load_header_secret,
    sign_header,
    verify_header,
)
from policyd.checks.reputation import Assessment, NetworkReputation, TaggedInstances
from policyd.checks.resolver import parse_nameserver, system_nameservers
from policyd.config import Config
from policyd.errors import ConfigError
from policyd.metrics import Metrics
from policyd.netlists import parse_address
from policyd.policy import PolicyService
from policyd.protocols.policy import Action
from policyd.store.memory import MemoryStore
from policyd.testing import rcpt, request
from tests.conftest import make_config
from tests.harness.dns_zone import DnsZoneServer, TestZone
from tests.harness.servers import PolicydServer, ask, free_port, policyd

reactor: Any = _reactor

START = 1_700_000_000.0


def conf(inbound: str = "", top: str = "") -> Config:
    """A configuration with tag_at 5, reject_at 10, a memory store and more inbound keys."""
    return make_config(
        'store:\n  url: "memory://"\nlocal_domains: [example.org]\n'
        + textwrap.dedent(top)
        + "\ninbound:\n  tag_at: 5\n  reject_at: 10\n"
        + textwrap.indent(textwrap.dedent(inbound), "  ")
    )


def clock() -> Clock:
    fake = Clock()
    fake.advance(START)
    return fake


def checker(
    inbound: str = "", top: str = "", zone: TestZone | None = None, metrics: Metrics | None = None
) -> tuple[NetworkReputation, Clock, TestZone]:
    fake = clock()
    zone = zone if zone is not None else TestZone()
    return NetworkReputation(conf(inbound, top), fake, resolver=zone, metrics=metrics), fake, zone


def start(reputation: NetworkReputation, **attributes: str) -> list[Verdict]:
    """Start one RCPT check; the list fills when it is decided."""
    decided: list[Verdict] = []
    maybeDeferred(reputation.check, request(rcpt(**attributes))).addCallback(decided.append)
    return decided


def verdict(reputation: NetworkReputation, **attributes: str) -> Verdict:
    """One RCPT check that completes at once."""
    decided = start(reputation, **attributes)
    assert decided, "the check did not complete synchronously"
    return decided[0]


def assessed(reputation: NetworkReputation, address: str) -> Assessment:
    """A client's assessment, when DNS answers at once."""
    found: list[Assessment] = []
    reputation.assess(address).addCallback(found.append)
    assert found, "the assessment did not complete synchronously"
    return found[0]


ZONE = """
dnsbl:
  - zone: bl.test
    weight: 10
"""


# --- DNS names, cache keys, resolvers ---------------------------------------------


def test_query_names_reverse_ipv4_octets_and_ipv6_nibbles() -> None:
    """IPv4 queries reverse the octets; IPv6 queries use 32 reversed nibbles."""
    assert query_name(ipaddress.ip_address("192.0.2.10"), "bl.test") == "10.2.0.192.bl.test"
    name = query_name(ipaddress.ip_address("2001:db8::1"), "bl.test.")
    assert name == "1." + "0." * 23 + "8.b.d.0.1.0.0.2.bl.test"
    assert len(name.split(".")) == 32 + 2


def test_cache_key_is_the_address_or_the_ipv6_64() -> None:
    """IPv4 clients are cached per address, IPv6 clients per /64."""
    assert cache_key(ipaddress.ip_address("192.0.2.10")) == "192.0.2.10"
    assert cache_key(ipaddress.ip_address("2001:db8:1:2:aaaa::1")) == "2001:db8:1:2::/64"
    assert cache_key(ipaddress.ip_address("2001:db8:1:2:ffff::9")) == "2001:db8:1:2::/64"


def test_nameservers_are_read_as_host_port() -> None:
    """dns.nameservers entries: host:port, [v6]:port, a bare address (port 53)."""
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_nameserver("[::1]:5300") == ("::1", 5300)
    assert parse_nameserver("::1") == ("::1", 53)
    for bad in ["resolver.example:53", "127.0.0.1:0", "127.0.0.1:x", "[::1"]:
        with pytest.raises(ValueError):
            parse_nameserver(bad)


def test_bad_nameserver_is_a_config_error_naming_key_and_line() -> None:
    """A resolver that is not an IP address is refused with the key and the line."""
    with pytest.raises(ConfigError, match=r"test.yaml:4: dns.nameservers: .*must be an IP address"):
        make_config('store:\n  url: "memory://"\ndns:\n  nameservers: ["dns.example:53"]\n')


def test_new_dns_and_inbound_keys_load() -> None:
    """cache_size, breaker_failures, breaker_cooldown and inbound.header_secret are read."""
    config = conf(
        "header_secret: /srv/policyd/secret\n",
        "dns:\n  cache_size: 10\n  breaker_failures: 3\n  breaker_cooldown: 2m\n",
    )
    assert config.dns.cache_size == 10
    assert config.dns.breaker_failures == 3
    assert config.dns.breaker_cooldown == 120
    assert config.inbound.header_secret == "/srv/policyd/secret"


def test_system_resolvers_come_from_resolv_conf(tmp_path: Path) -> None:
    """With no dns.nameservers, resolv.conf's nameserver lines are used (127.0.0.1 if none)."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("search example\nnameserver 127.0.0.53 # stub\nnameserver ::1\n", encoding="utf-8")
    assert system_nameservers(str(resolv)) == [("127.0.0.53", 53), ("::1", 53)]
    assert system_nameservers(str(tmp_path / "absent")) == [("127.0.0.1", 53)]


# --- DNSBL scoring ------------------------------------------------------------------


def test_listed_client_is_refused_at_rcpt_naming_the_zone() -> None:
    """A level-2 client (listed, weight 10) gets REJECT 5.7.1 naming the DNSBL zone."""
    reputation, _, zone = checker(ZONE)
    zone.listed("192.0.2.10", "bl.test", "127.0.0.2")
    found = verdict(reputation, client_address="192.0.2.10")
    assert found.action.word == "REJECT"
    assert found.action.text.startswith("5.7.1 ")
    assert "bl.test" in found.action.text and "192.0.2.10" in found.action.text
    assert "level 2" in found.reason


def test_refusal_text_is_shipped_in_french() -> None:
    """language: fr gives the French refusal text, still naming the zone."""
    reputation, _, zone = checker(ZONE, "language: fr\n")
    zone.listed("192.0.2.10", "bl.test")
    action = verdict(reputation, client_address="192.0.2.10").action
    assert action.word == "REJECT" and "refusé" in action.text and "bl.test" in action.text


def test_not_listed_nxdomain_scores_nothing() -> None:
    """NXDOMAIN means not listed: DUNNO and score 0."""
    reputation, _, zone = checker(ZONE)
    found = verdict(reputation, client_address="192.0.2.11")
    assert found.action.word == "DUNNO"
    assert found.reason == "score=0"
    assert zone.asked("11.2.0.192.bl.test") == 1


def test_only_rcpt_is_decided() -> None:
    """CONNECT, HELO, MAIL, DATA and END-OF-MESSAGE get DUNNO without any look-up."""
    reputation, _, zone = checker(ZONE)
    zone.listed("192.0.2.10", "bl.test")
    for state in ["CONNECT", "EHLO", "MAIL", "DATA", "END-OF-MESSAGE"]:
        found = verdict(reputation, client_address="192.0.2.10", protocol_state=state)
        assert found.action.word == "DUNNO", state
    assert zone.queries == []


def test_code_filters_give_weights_per_return_code() -> None:
    """Entries of one zone with different code filters add their own weights."""
    reputation, _, zone = checker(
        """
        dnsbl:
          - zone: zen.test
            weight: 10
            codes: "127.0.0.[2..3]"
          - zone: zen.test
            weight: 3
            codes: "127.0.0.[10;11]"
        """
    )
    zone.listed("192.0.2.1", "zen.test", "127.0.0.10")
    zone.listed("192.0.2.2", "zen.test", "127.0.0.2", "127.0.0.11")
    zone.listed("192.0.2.3", "zen.test", "127.0.0.4")
    results = [assessed(reputation, f"192.0.2.{n}") for n in (1, 2, 3)]
    assert [a.score for a in results] == [3, 13, 0]
    assert zone.asked("1.2.0.192.zen.test") == 1, "one query per zone, however many entries"
    assert "no code counted" in results[2].sources[0].detail


def test_each_entry_counts_once_however_many_codes_match() -> None:
    """A zone answering three listing codes adds its weight once."""
    reputation, _, zone = checker(
        """
        dnsbl:
          - zone: multi.test
            weight: 4
        """
    )
    zone.listed("192.0.2.10", "multi.test", "127.0.0.2", "127.0.0.3", "127.0.0.4")
    found = verdict(reputation, client_address="192.0.2.10")
    assert found.reason == "score=4 (multi.test=4)"


def test_dnswl_negative_weight_lowers_the_score() -> None:
    """A DNSWL listing (negative weight) takes a level-2 client down to level 1."""
    reputation, _, zone = checker(
        """
        dnsbl:
          - zone: bl.test
            weight: 10
          - zone: wl.test
            weight: -5
            codes: "127.0.[0..255].[1..3]"
        """
    )
    zone.listed("192.0.2.10", "bl.test", "127.0.0.2")
    zone.listed("192.0.2.10", "wl.test", "127.0.10.2")
    found = verdict(reputation, client_address="192.0.2.10")
    assert found.action.word == "PREPEND"
    assert "score=5;" in found.action.text
    assert "reasons=bl.test,wl.test;" in found.action.text


@pytest.mark.parametrize(
    ("code", "problem"),
    [
        ("127.255.255.254", "query refused"),
        ("8.8.8.8", "answer outside 127.0.0.0/8"),
        ("10.0.0.2", "answer outside 127.0.0.0/8"),
    ],
)
def test_error_codes_are_errors_not_listings(code: str, problem: str, caplog: pytest.LogCaptureFixture) -> None:
    """Answers in 127.255.255.0/24 or outside 127/8 score nothing, are logged, and are not cached."""
    reputation, _, zone = checker(ZONE)
    zone.listed("192.0.2.10", "bl.test", code)
    with caplog.at_level(logging.WARNING, "policyd.dns"):
        assessment = assessed(reputation, "192.0.2.10")
    assert assessment.score == 0
    assert assessment.sources[0].detail.startswith("error: " + problem)
    assert problem in caplog.text and "not counted as a listing" in caplog.text
    reputation.assess("192.0.2.10")
    assert zone.asked("10.2.0.192.bl.test") == 2


def test_servfail_is_an_error() -> None:
    """A zone that fails to answer scores nothing; the reply is DUNNO."""
    reputation, _, zone = checker(ZONE)
    zone.servfail("10.2.0.192.bl.test")
    found = verdict(reputation, client_address="192.0.2.10")
    assert found.action.word == "DUNNO"
    assert "DNS unavailable" in found.reason


# --- timeouts, deadline, breaker ----------------------------------------------------------


def test_timeout_is_not_a_listing() -> None:
    """A zone that never answers times out after dns.timeout: DUNNO, nothing scored."""
    reputation, fake, zone = checker(ZONE, "dns:\n  timeout: 2s\n  deadline: 5s\n")
    zone.silence("10.2.0.192.bl.test")
    decided = start(reputation, client_address="192.0.2.10")
    fake.advance(1.9)
    assert decided == []
    fake.advance(0.1)
    assert [v.action.word for v in decided] == ["DUNNO"]
    decided = []
    reputation.assess("192.0.2.10").addCallback(decided.append)
    fake.advance(2)
    assert decided[0].sources[0].detail == "timeout: the DNS server did not answer within 2s"


def test_deadline_bounds_the_reply_and_the_look_up_goes_on() -> None:
    """dns.deadline answers before a slow look-up's timeout; the look-up still ends and counts."""
    reputation, fake, zone = checker(
        ZONE + "  - zone: fast.test\n    weight: 10\n", "dns:\n  timeout: 3s\n  deadline: 1s\n"
    )
    zone.silence("10.2.0.192.bl.test")
    zone.listed("192.0.2.10", "fast.test")
    decided = start(reputation, client_address="192.0.2.10")
    fake.advance(0.9)
    assert decided == []
    fake.advance(0.1)
    assert [v.action.word for v in decided] == ["REJECT"], "the zone that answered still counts"
    assert reputation.dns is not None
    assert reputation.dns.breakers["bl.test"].in_a_row == 0
    fake.advance(2)
    assert reputation.dns.breakers["bl.test"].in_a_row == 1
    assert reputation.dns.counters["timeouts"] == 1
    assert not fake.getDelayedCalls()


def test_look_ups_in_flight_are_shared() -> None:
    """Concurrent requests for one client wait for one query, answered in order."""
    reputation, _, zone = checker(ZONE)
    name = zone.listed("192.0.2.10", "bl.test")
    zone.hold(name)
    pending = [start(reputation, client_address="192.0.2.10", recipient=f"r{n}@example.org") for n in range(5)]
    assert all(p == [] for p in pending)
    zone.release(name)
    assert [p[0].action.word for p in pending] == ["REJECT"] * 5
    assert zone.asked(name) == 1


def test_breaker_trips_skips_the_zone_and_recovers(caplog: pytest.LogCaptureFixture) -> None:
    """After N timeouts the zone is skipped (logged); after the cooldown a trial recovers it."""
    reputation, fake, zone = checker(
        ZONE, "dns:\n  timeout: 1s\n  breaker_failures: 2\n  breaker_cooldown: 60s\n"
    )
    for n in (1, 2, 3):
        zone.silence(f"{n}.2.0.192.bl.test")
    with caplog.at_level(logging.INFO, "policyd.dns"):
        for n in (1, 2):
            decided = start(reputation, client_address=f"192.0.2.{n}")
            fake.advance(1)
            assert decided[0].action.word == "DUNNO"
        assert "bl.test skipped for 60s after 2 consecutive failures" in caplog.text
        skipped = verdict(reputation, client_address="192.0.2.3")
        assert skipped.action.word == "DUNNO"
        assert zone.asked("3.2.0.192.bl.test") == 0, "an open breaker sends no query"
        assessment = assessed(reputation, "192.0.2.3")
        assert assessment.sources[0].detail.startswith("skipped: 2 consecutive failures")
        fake.advance(59)
        assert zone.asked("3.2.0.192.bl.test") == 0
        zone.restore("3.2.0.192.bl.test")
        zone.listed("192.0.2.3", "bl.test")
        fake.advance(1)
        recovered = verdict(reputation, client_address="192.0.2.3")
        assert recovered.action.word == "REJECT"
        assert "bl.test answers again" in caplog.text
    assert reputation.dns is not None and not reputation.dns.breakers["bl.test"].is_open


def test_breaker_trial_failure_reopens_it() -> None:
    """A trial look-up that fails skips the zone for another cooldown; one trial at a time."""
    reputation, fake, zone = checker(ZONE, "dns:\n  timeout: 1s\n  breaker_failures: 1\n  breaker_cooldown: 10s\n")
    zone.servfail("1.2.0.192.bl.test")
    zone.servfail("2.2.0.192.bl.test")
    verdict(reputation, client_address="192.0.2.1")
    fake.advance(10)
    zone.silence("3.2.0.192.bl.test")
    trial = start(reputation, client_address="192.0.2.3")
    verdict(reputation, client_address="192.0.2.2")
    assert zone.asked("2.2.0.192.bl.test") == 0, "no second look-up while the trial runs"
    fake.advance(1)
    assert trial[0].action.word == "DUNNO"
    assert reputation.dns is not None and reputation.dns.breakers["bl.test"].is_open
    verdict(reputation, client_address="192.0.2.2")
    assert zone.asked("2.2.0.192.bl.test") == 0


def test_dns_problems_are_counted_in_the_metrics() -> None:
    """Timeouts, errors and breaker skips are counted per zone in policyd_dns_errors."""
    metrics = Metrics()
    reputation, fake, zone = checker(ZONE, "dns:\n  timeout: 1s\n  breaker_failures: 2\n", metrics=metrics)
    zone.silence("1.2.0.192.bl.test")
    zone.servfail("2.2.0.192.bl.test")
    start(reputation, client_address="192.0.2.1")
    fake.advance(1)
    verdict(reputation, client_address="192.0.2.2")
    verdict(reputation, client_address="192.0.2.3")
    counted = {
        kind: metrics.registry.get_sample_value("policyd_dns_errors_total", {"zone": "bl.test", "kind": kind})
        for kind in ("timeout", "error", "skipped")
    }
    assert counted == {"timeout": 1, "error": 1, "skipped": 1}


@pytest.mark.parametrize(("on_error", "word"), [("dunno", "DUNNO"), ("defer_if_permit", "DEFER_IF_PERMIT")])
def test_all_dns_down_replies_per_store_on_error(on_error: str, word: str) -> None:
    """When no zone answers, the reply follows store.on_error and the reason says DNS is unavailable."""
    fake, zone = clock(), TestZone()
    config = make_config(
        f'store:\n  url: "memory://"\n  on_error: {on_error}\n'
        "inbound:\n  dnsbl:\n    - zone: bl.test\n      weight: 10\n"
    )
    reputation = NetworkReputation(config, fake, resolver=zone)
    zone.silence("10.2.0.192.bl.test")
    decided = start(reputation, client_address="192.0.2.10")
    fake.advance(5)
    assert decided[0].action.word == word
    assert "DNS unavailable (bl.test)" in decided[0].reason


def test_local_lists_still_refuse_while_dns_is_down(tmp_path: Path) -> None:
    """A client on a deny list is refused even when every zone times out."""
    deny = tmp_path / "deny.cidr"
    deny.write_text("192.0.2.0/24\n", encoding="utf-8")
    reputation, fake, zone = checker(ZONE + f"networks:\n  - file: {deny}\n    weight: 10\n")
    zone.silence("10.2.0.192.bl.test")
    decided = start(reputation, client_address="192.0.2.10")
    fake.advance(5)
    assert decided[0].action.word == "REJECT"
    assert "deny.cidr" in decided[0].action.text


def test_unexpected_failure_lets_mail_flow(caplog: pytest.LogCaptureFixture) -> None:
    """A bug inside the check becomes DUNNO and a log line, never an error reply."""
    reputation, _, _ = checker(ZONE)

    def broken(*args: object, **kwargs: object) -> Deferred[Any]:
        raise RuntimeError("boom")

    reputation._assess = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, "policyd.reputation"):
        found = verdict(reputation, client_address="192.0.2.10")
    assert found.action.word == "DUNNO"
    assert "reputation check failed" in found.reason
    assert "reputation check of 192.0.2.10 failed, mail flows: boom" in caplog.text


# --- cache -------------------------------------------------------------------------------


def test_answers_are_cached_for_the_record_ttl() -> None:
    """A listing is reused until its TTL (capped by dns.cache_ttl) runs out."""
    reputation, fake, zone = checker(ZONE)
    name = zone.listed("192.0.2.10", "bl.test", "127.0.0.2", ttl=60)
    for _ in range(3):
        assert verdict(reputation, client_address="192.0.2.10").action.word == "REJECT"
    assert zone.asked(name) == 1
    fake.advance(60)
    verdict(reputation, client_address="192.0.2.10")
    assert zone.asked(name) == 2


def test_a_client_whose_answers_are_cached_is_decided_without_a_deferred() -> None:
    """The first RCPT of a client waits for DNS; the next ones are decided at once, the same way."""
    reputation, fake, zone = checker(ZONE + "  - zone: wl.test\n    weight: -5\n")
    zone.listed("192.0.2.10", "bl.test", "127.0.0.2")
    zone.listed("192.0.2.10", "wl.test", "127.0.0.2")
    attributes = rcpt(client_address="192.0.2.10", helo_name="[192.0.2.10]")
    first = reputation.check(request(attributes))
    assert isinstance(first, Deferred)
    decided: list[Verdict] = []
    first.addCallback(decided.append)
    second = reputation.check(request({**attributes, "instance": "next.message"}))
    assert isinstance(second, Verdict)
    assert (second.action, second.reason) == (decided[0].action, decided[0].reason)
    assert second.action.word == "PREPEND" and "bl.test" in second.reason and "wl.test" in second.reason
    hits = reputation.dns.counters["cache_hits"] if reputation.dns else 0
    assert hits == 2
    fake.advance(301)  # past the records' TTL: asked again
    assert isinstance(reputation.check(request(attributes)), Deferred)


def test_not_listed_is_cached_for_cache_ttl() -> None:
    """NXDOMAIN is cached for dns.cache_ttl."""
    reputation, fake, zone = checker(ZONE, "dns:\n  cache_ttl: 30s\n")
    for _ in range(3):
        verdict(reputation, client_address="192.0.2.10")
    assert zone.asked("10.2.0.192.bl.test") == 1
    fake.advance(30)
    verdict(reputation, client_address="192.0.2.10")
    assert zone.asked("10.2.0.192.bl.test") == 2


def test_cache_is_bounded() -> None:
    """Beyond dns.cache_size clients, the least recently used is forgotten."""
    reputation, _, zone = checker(ZONE, "dns:\n  cache_size: 2\n")
    for n in (1, 2, 3, 3, 1):
        verdict(reputation, client_address=f"192.0.2.{n}")
    assert [zone.asked(f"{n}.2.0.192.bl.test") for n in (1, 2, 3)] == [2, 1, 1]
    assert reputation.dns is not None and len(reputation.dns.cache) == 2


def test_ipv6_clients_use_nibbles_and_share_a_64() -> None:
    """An IPv6 client is looked up by nibbles; its whole /64 shares the answer; another /64 is asked."""
    reputation, _, zone = checker(ZONE)
    name = zone.listed("2001:db8:1:2::10", "bl.test")
    assert name.startswith("0.1.0.0.") and name.endswith(".2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.test")
    assert verdict(reputation, client_address="2001:db8:1:2::10").action.word == "REJECT"
    assert verdict(reputation, client_address="2001:db8:1:2:ffff::99").action.word == "REJECT"
    assert zone.asked(name) == 1
    assert len(zone.queries) == 1
    assert verdict(reputation, client_address="2001:db8:1:3::10").action.word == "DUNNO"
    assert len(zone.queries) == 2


def test_ipv4_mapped_ipv6_client_is_looked_up_as_ipv4() -> None:
    """::ffff:192.0.2.10 is the IPv4 client 192.0.2.10."""
    reputation, _, zone = checker(ZONE)
    zone.listed("192.0.2.10", "bl.test")
    assert verdict(reputation, client_address="::ffff:192.0.2.10").action.word == "REJECT"


# --- network lists -------------------------------------------------------------------------


DENY = """\
# networks that sent us spam
192.0.2.0/24      # documentation net, hash with spaces
2001:db8:bad::/48#no space before the comment
   # an indented comment line

10.0.0.1 # one host
"""


def network_entry(path: Path, weight: float = 10, allow: bool = False) -> str:
    return f"  - file: {path}\n    weight: {weight}\n    allow: {'true' if allow else 'false'}\n"


def network_list(path: Path, weight: float = 10, allow: bool = False) -> str:
    return "networks:\n" + network_entry(path, weight, allow)


def test_cidr_file_with_comments_refuses_naming_the_file(tmp_path: Path) -> None:
    """CIDR entries (v4, v6, hosts) with # comments anywhere; the refusal names the file."""
    deny = tmp_path / "deny.cidr"
    deny.write_text(DENY, encoding="utf-8")
    reputation, _, _ = checker(network_list(deny))
    for address in ["192.0.2.10", "2001:db8:bad:1::5", "10.0.0.1"]:
        found = verdict(reputation, client_address=address)
        assert found.action.word == "REJECT", address
        assert "deny.cidr" in found.action.text
        assert str(tmp_path) not in found.action.text, "only the file's name is shown to the client"
    assert verdict(reputation, client_address="10.0.0.2").action.word == "DUNNO"


def test_cidr_file_change_is_picked_up_without_reload(tmp_path: Path) -> None:
    """An edited list applies within a second, without SIGHUP."""
    deny = tmp_path / "deny.cidr"
    deny.write_text(DENY, encoding="utf-8")
    reputation, fake, _ = checker(network_list(deny))
    assert verdict(reputation, client_address="192.0.2.10").action.word == "REJECT"
    deny.write_text("198.51.100.0/24 # moved\n", encoding="utf-8")
    fake.advance(1)
    assert verdict(reputation, client_address="192.0.2.10").action.word == "DUNNO"
    assert verdict(reputation, client_address="198.51.100.7").action.word == "REJECT"


def test_cidr_files_are_reread_on_reload(tmp_path: Path) -> None:
    """SIGHUP (PolicyService.configure) re-reads the lists at once."""
    deny = tmp_path / "deny.cidr"
    deny.write_text("192.0.2.0/24\n", encoding="utf-8")
    config = conf(network_list(deny))
    service = PolicyService(config, MemoryStore(), clock())
    assert decide(service, client_address="198.51.100.7").word == "DUNNO"
    deny.write_text("198.51.100.0/24\n", encoding="utf-8")
    service.configure(config)
    assert decide(service, client_address="198.51.100.7").word == "REJECT"


def test_broken_cidr_file_refuses_the_reload_and_keeps_the_old_list(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bad line refuses a reload (naming file and line); a bad edit keeps the previous list."""
    deny = tmp_path / "deny.cidr"
    deny.write_text("192.0.2.0/24\n", encoding="utf-8")
    reputation, fake, _ = checker(network_list(deny))
    deny.write_text("192.0.2.0/24\nnot-a-network # oops\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"deny.cidr:2: 'not-a-network' is not an IP network"):
        reputation.configure(conf(network_list(deny)))
    with caplog.at_level(logging.ERROR, "policyd.reputation"):
        fake.advance(1)
        assert verdict(reputation, client_address="192.0.2.10").action.word == "REJECT"
    assert "keeping the previous list" in caplog.text


def test_missing_cidr_file_is_empty_until_it_appears(tmp_path: Path) -> None:
    """A list file that does not exist yet is empty, and applies once written."""
    deny = tmp_path / "later.cidr"
    reputation, fake, _ = checker(network_list(deny))
    assert verdict(reputation, client_address="192.0.2.10").action.word == "DUNNO"
    deny.write_text("192.0.2.10\n", encoding="utf-8")
    fake.advance(1)
    assert verdict(reputation, client_address="192.0.2.10").action.word == "REJECT"


# --- allowlists -------------------------------------------------------------------------------


def test_allowlisted_client_on_a_listed_network_gets_dunno(tmp_path: Path) -> None:
    """An allow network wins over a deny network and a DNSBL listing, with no DNS query."""
    deny = tmp_path / "deny.cidr"
    deny.write_text("192.0.2.0/24\n", encoding="utf-8")
    allow = tmp_path / "allow.cidr"
    allow.write_text("192.0.2.0/28 # our partner\n", encoding="utf-8")
    reputation, _, zone = checker(ZONE + network_list(deny) + network_entry(allow, allow=True))
    zone.listed("192.0.2.10", "bl.test")
    found = verdict(reputation, client_address="192.0.2.10", client_name="unknown", helo_name="[192.0.2.10]")
    assert found.action.word == "DUNNO"
    assert found.reason == "allowlisted by allow.cidr"
    assert zone.queries == []
    assert verdict(reputation, client_address="192.0.2.20").action.word == "REJECT"


def test_allow_names_match_only_the_forward_confirmed_name() -> None:
    """allow_names match Postfix's client_name (exact or .suffix), never the unverified PTR name."""
    reputation, _, zone = checker(ZONE + "allow_names: [mx.partner.test, .trusted.test]\n")
    zone.listed("192.0.2.10", "bl.test")
    for name in ["mx.partner.test", "MX.Partner.Test.", "a.b.trusted.test"]:
        assert verdict(reputation, client_address="192.0.2.10", client_name=name).action.word == "DUNNO"
    for name, reverse in [("unknown", "mx.partner.test"), ("trusted.test", "trusted.test"), ("evilmx.partner.test", "x")]:
        found = verdict(reputation, client_address="192.0.2.10", client_name=name, reverse_client_name=reverse)
        assert found.action.word == "REJECT", name


def test_trusted_networks_are_not_scored() -> None:
    """A trusted_networks client asked in the inbound context is not scored."""
    reputation, _, zone = checker(ZONE, "trusted_networks: [192.0.2.0/24]\n")
    zone.listed("192.0.2.10", "bl.test")
    found = verdict(reputation, client_address="192.0.2.10")
    assert (found.action.word, found.reason) == ("DUNNO", "trusted network")


# --- heuristics ---------------------------------------------------------------------------------


HEURISTICS = """
heuristics:
  no_reverse_dns: 2
  reverse_dns_mismatch: 1
  helo_bare_ip: 2
  helo_not_fqdn: 1
  helo_claims_us: 5
our_names: [mx.example.org, .corp.test]
"""


def test_heuristics_are_worth_nothing_unless_configured() -> None:
    """No reverse DNS and a bare-IP HELO score 0 with the default configuration."""
    reputation, _, _ = checker()
    found = verdict(
        reputation, client_address="192.0.2.10", client_name="unknown", reverse_client_name="unknown",
        helo_name="192.0.2.10",
    )
    assert (found.action.word, found.reason) == ("DUNNO", "score=0")


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ({"reverse_client_name": "unknown", "client_name": "unknown"}, {"no_reverse_dns": 2}),
        ({"reverse_client_name": "host.example.net", "client_name": "unknown"}, {"reverse_dns_mismatch": 1}),
        ({"helo_name": "192.0.2.10"}, {"helo_bare_ip": 2}),
        ({"helo_name": "[192.0.2.10]"}, {"helo_bare_ip": 2}),
        ({"helo_name": "[IPv6:2001:db8::1]"}, {"helo_bare_ip": 2}),
        ({"helo_name": "localhost"}, {"helo_not_fqdn": 1}),
        ({"helo_name": "WIN-7QK2B9"}, {"helo_not_fqdn": 1}),
        ({"helo_name": "host.123"}, {"helo_not_fqdn": 1}),
        ({"helo_name": "bad_name..test"}, {"helo_not_fqdn": 1}),
        ({"helo_name": ""}, {"helo_not_fqdn": 1}),
        ({"helo_name": "example.org"}, {"helo_claims_us": 5}),
        ({"helo_name": "MX.example.org."}, {"helo_claims_us": 5}),
        ({"helo_name": "smtp.corp.test"}, {"helo_claims_us": 5}),
        ({"helo_name": "[127.0.0.1]", "server_address": "127.0.0.1"}, {"helo_bare_ip": 2, "helo_claims_us": 5}),
        ({"helo_name": "mail.example.net"}, {}),
    ],
)
def test_heuristics_score_what_they_find(attributes: dict[str, str], expected: dict[str, float]) -> None:
    """Each heuristic adds its configured points for what it finds, and only then."""
    reputation, _, _ = checker(HEURISTICS)
    found = verdict(reputation, client_address="192.0.2.10", **attributes)
    parts = ", ".join(f"{k}={v}" for k, v in expected.items())
    summary = found.reason.removeprefix("level 1: ")
    assert summary == f"score={sum(expected.values()):g}" + (f" ({parts})" if parts else "")


def test_client_name_unknown_without_reverse_name_means_no_reverse_dns() -> None:
    """Without reverse_client_name, Postfix's client_name=unknown counts as no reverse DNS."""
    reputation, _, zone = checker(HEURISTICS)
    found: list[Assessment] = []
    reputation.assess("192.0.2.10", client_name="unknown").addCallback(found.append)
    assert [(p.source, p.points) for p in found[0].sources] == [("no_reverse_dns", 2)]
    assert zone.queries == [], "Postfix's names are used, not looked up again"


def test_addresses_and_names_are_read_alike_every_time_and_long_text_is_refused() -> None:
    """Remembered answers are the first answers; text longer than any address or name is neither."""
    for _ in range(2):
        assert parse_address("192.0.2.1") == ipaddress.ip_address("192.0.2.1")
        assert parse_address("[2001:db8::1]") == ipaddress.ip_address("2001:db8::1")
        assert parse_address("::ffff:192.0.2.9") == ipaddress.ip_address("192.0.2.9")
        assert parse_address("mail.example.net") is None
        assert is_fqdn("mail.example.net") and not is_fqdn("mail") and not is_fqdn("mail.123")
    assert parse_address("1" * 10_000) is None
    assert parse_address(" " * 200 + "192.0.2.1") is None
    assert not is_fqdn(("a" * 60 + ".") * 5 + "net")


def test_helo_findings_explain_themselves() -> None:
    """helo_findings names the problem in words."""
    ours = NamePatterns(["mx.example.org"])
    assert helo_findings("[192.0.2.1]", ours) == [("helo_bare_ip", "address literal [192.0.2.1]")]
    assert helo_findings("[300.1.1.1]", ours) == [("helo_not_fqdn", "malformed address literal [300.1.1.1]")]
    assert helo_findings("mx.example.org", ours) == [("helo_claims_us", "mx.example.org is one of our names")]


# --- through the policy service: once per message, contexts ------------------------------------


def decide(service: PolicyService, **attributes: str) -> Action:
    decided: list[Action] = []
    maybeDeferred(service.decide, request(rcpt(**attributes))).addCallback(decided.append)
    assert decided, "decision did not complete synchronously"
    return decided[0]


def level_one(tmp_path: Path, extra: str = "") -> tuple[PolicyService, Clock]:
    listed = tmp_path / "level1.cidr"
    listed.write_text("198.51.100.0/24\n", encoding="utf-8")
    fake = clock()
    secret = tmp_path / "header.secret"
    service = PolicyService(conf(network_list(listed, 5) + f"header_secret: {secret}\n" + extra), MemoryStore(), fake)
    return service, fake


def test_fifty_recipients_of_one_message_get_exactly_one_prepend(tmp_path: Path) -> None:
    """A level-1 client's message with 50 recipients gets one PREPEND, at its first RCPT."""
    service, _ = level_one(tmp_path)
    words = [
        decide(service, client_address="198.51.100.7", instance="7f3.65a1b2c3.0", recipient=f"u{n}@example.org").word
        for n in range(50)
    ]
    assert words == ["PREPEND"] + ["DUNNO"] * 49
    end = decide(service, client_address="198.51.100.7", instance="7f3.65a1b2c3.0", protocol_state="END-OF-MESSAGE")
    assert end.word == "DUNNO"
    following = decide(service, client_address="198.51.100.7", instance="7f3.65a1b2c3.1")
    assert following.word == "PREPEND", "the next message of the session is tagged too"


def test_pipelined_recipients_waiting_for_dns_get_one_prepend() -> None:
    """Fifty recipients decided together when DNS answers: only the first gets the header."""
    zone = TestZone()
    reputation, _, _ = checker("dnsbl:\n  - zone: bl.test\n    weight: 6\n", zone=zone)
    name = zone.listed("192.0.2.10", "bl.test")
    zone.hold(name)
    pending = [
        start(reputation, client_address="192.0.2.10", instance="abc.1", recipient=f"u{n}@example.org")
        for n in range(50)
    ]
    zone.release(name)
    assert [p[0].action.word for p in pending] == ["PREPEND"] + ["DUNNO"] * 49


def test_prepend_is_never_sent_at_end_of_message(tmp_path: Path) -> None:
    """A message whose only policy request is END-OF-MESSAGE gets no header."""
    service, _ = level_one(tmp_path)
    action = decide(service, client_address="198.51.100.7", instance="x.1", protocol_state="END-OF-MESSAGE")
    assert action.word == "DUNNO"


def test_the_header_verifies_with_the_install_secret(tmp_path: Path) -> None:
    """The PREPEND header carries score and reasons, and its token verifies with the secret file."""
    service, fake = level_one(tmp_path)
    action = decide(service, client_address="198.51.100.7", instance="m.1")
    name, _, value = action.text.partition(": ")
    assert name == HEADER
    assert value.startswith("score=5; reasons=level1.cidr; client=198.51.100.7; time=1700000000; token=")
    secret_file = tmp_path / "header.secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = secret_file.read_text(encoding="utf-8").strip().encode()
    assert verify_header(value, secret) == 5
    assert verify_header(action.text, secret, client="198.51.100.7") == 5
    assert verify_header(value, secret, client="203.0.113.1") is None, "a copy replayed by another client"


def test_a_forged_header_never_verifies() -> None:
    """Headers the sender writes (no token, a guessed token, altered fields, another secret) are refused."""
    secret = b"a" * 64
    genuine = sign_header(7, ["bl.test"], "192.0.2.10", START, secret)
    assert verify_header(genuine, secret, client="192.0.2.10", now=START + 10, max_age=3600) == 7
    forged = [
        "score=-100; reasons=wl.test",
        "score=-100; reasons=wl.test; client=192.0.2.10; time=1700000000; token=" + "0" * 32,
        genuine.replace("score=7", "score=-7"),
        genuine.replace("reasons=bl.test", "reasons=wl.test"),
        genuine.replace("time=1700000000", "time=1800000000"),
        genuine.rsplit("token=", 1)[0],
        "",
        "garbage;;;==",
    ]
    for value in forged:
        assert verify_header(value, secret) is None, value
    assert verify_header(genuine, b"b" * 64) is None
    assert verify_header(genuine, secret, now=START + 7200, max_age=3600) is None
    folded = f"{HEADER}: " + genuine.replace("; client", ";\r\n\tclient")
    assert verify_header(folded, secret) == 7


def test_header_secret_is_created_once_and_kept(tmp_path: Path) -> None:
    """The secret file is created on first use (0600), then read as it is; a short one is refused."""
    path = tmp_path / "header.secret"
    first = load_header_secret(path)
    assert len(first) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_header_secret(path) == first
    assert [p.name for p in tmp_path.iterdir()] == ["header.secret"], "no temporary file left"
    path.write_text("short\n", encoding="utf-8")
    with pytest.raises(ValueError, match="at least 32"):
        load_header_secret(path)


def test_header_secret_lives_beside_the_store() -> None:
    """Default secret path: beside the SQLite file, /var/lib/policyd for Redis, none for memory://."""
    assert header_secret_path(make_config('store:\n  url: "sqlite:////srv/p/state.db"\n')) == Path("/srv/p/header.secret")
    assert header_secret_path(make_config('store:\n  url: "redis://127.0.0.1:6379/0"\n')) == Path(
        "/var/lib/policyd/header.secret"
    )
    assert header_secret_path(make_config('store:\n  url: "memory://"\n')) is None
    explicit = make_config('store:\n  url: "memory://"\ninbound:\n  header_secret: /etc/policyd/s\n')
    assert header_secret_path(explicit) == Path("/etc/policyd/s")


def test_tagged_instances_are_bounded_and_expire() -> None:
    """The memory of tagged messages keeps at most `size` instances, each for `ttl` seconds."""
    fake = clock()
    tagged = TaggedInstances(fake, ttl=10, size=3)
    assert [tagged.first(i) for i in "abcd"] == [True] * 4
    assert len(tagged) == 3
    assert tagged.first("a") is True, "the oldest was forgotten"
    assert tagged.first("d") is False
    fake.advance(10)
    assert tagged.first("d") is True
    assert len(tagged) == 1


def test_policy_context_and_authentication_select_the_checks(tmp_path: Path) -> None:
    """Inbound context scores even authenticated clients; without context SASL means quota."""
    deny = tmp_path / "deny.cidr"
    deny.write_text("192.0.2.0/24\n", encoding="utf-8")
    service = PolicyService(conf(network_list(deny)), MemoryStore(), clock())
    assert decide(service, client_address="192.0.2.10").word == "REJECT"
    assert decide(service, client_address="192.0.2.10", policy_context="inbound").word == "REJECT"
    assert decide(service, client_address="192.0.2.10", sasl_username="alice").word == "DUNNO"
    assert decide(service, client_address="192.0.2.10", sasl_username="alice", policy_context="inbound").word == "REJECT"
    assert decide(service, client_address="192.0.2.10", policy_context="submission").word == "DUNNO"


# --- real DNS: twisted.names client against the in-process server -------------------------------


@pytest_twisted.async_yield_fixture
async def dns_server() -> AsyncIterator[DnsZoneServer]:
    """A TestZone served over UDP and TCP on 127.0.0.1."""
    running = DnsZoneServer(TestZone(), reactor).start()
    yield running
    await running.stop()


def real(server: DnsZoneServer, inbound: str, dns_keys: str = "", timeout: str = "1s") -> NetworkReputation:
    top = f'dns:\n  nameservers: ["{server.nameserver}"]\n  timeout: {timeout}\n  deadline: 4s\n{dns_keys}'
    return NetworkReputation(conf(inbound, top), reactor)


async def check(reputation: NetworkReputation, **attributes: str) -> Verdict:
    result: Verdict = await maybeDeferred(reputation.check, request(rcpt(**attributes)))
    return result


REAL_ZONES = """
dnsbl:
  - zone: bl.test
    weight: 10
    codes: "127.0.0.[2..11]"
  - zone: wl.test
    weight: -5
"""


@pytest_twisted.ensureDeferred
async def test_real_dns_listed_not_listed_errors(dns_server: DnsZoneServer) -> None:
    """Over UDP: a listing, NXDOMAIN, a refused code, an answer outside 127/8 and SERVFAIL."""
    zone = dns_server.zone
    zone.listed("192.0.2.66", "bl.test", "127.0.0.2")
    zone.listed("192.0.2.67", "bl.test", "127.255.255.254")
    zone.listed("192.0.2.68", "bl.test", "8.8.8.8")
    zone.servfail("69.2.0.192.bl.test")
    zone.listed("192.0.2.70", "bl.test", "127.0.0.2")
    zone.listed("192.0.2.70", "wl.test", "127.0.10.3")
    reputation = real(dns_server, REAL_ZONES)
    listed = await check(reputation, client_address="192.0.2.66")
    assert listed.action.word == "REJECT" and "bl.test" in listed.action.text
    details = {}
    for n in (65, 67, 68, 69):
        assessment = await reputation.assess(f"192.0.2.{n}")
        details[n] = assessment.sources[0].detail
        assert assessment.score == 0
    assert details[65] == "not listed"
    assert details[67].startswith("error: query refused (127.255.255.254)")
    assert details[68].startswith("error: answer outside 127.0.0.0/8 (8.8.8.8)")
    assert details[69] == "error: server failure (SERVFAIL)"
    both = await check(reputation, client_address="192.0.2.70", instance="r.1")
    assert both.action.word == "PREPEND" and "score=5;" in both.action.text


@pytest_twisted.ensureDeferred
async def test_real_dns_ipv6_client(dns_server: DnsZoneServer) -> None:
    """Over UDP: an IPv6 client is asked by nibbles and refused; its /64 neighbour reuses the answer."""
    name = dns_server.zone.listed("2001:db8:5::25", "bl.test", "127.0.0.4")
    reputation = real(dns_server, REAL_ZONES)
    assert (await check(reputation, client_address="2001:db8:5::25")).action.word == "REJECT"
    assert (await check(reputation, client_address="2001:db8:5::26")).action.word == "REJECT"
    assert dns_server.zone.asked(name) == 1


@pytest_twisted.ensureDeferred
async def test_real_dns_timeouts_trip_the_breaker_which_recovers(dns_server: DnsZoneServer) -> None:
    """Over UDP: silent zones time out within dns.timeout, trip the breaker, and recover after the cooldown."""
    zone = dns_server.zone
    for n in (1, 2, 3):
        zone.silence(f"{n}.2.0.192.bl.test")
    reputation = real(dns_server, ZONE, "  breaker_failures: 2\n  breaker_cooldown: 1s\n", timeout="0.3s")
    for n in (1, 2):
        began = time.monotonic()
        timed_out = await check(reputation, client_address=f"192.0.2.{n}")
        assert timed_out.action.word == "DUNNO"
        assert 0.2 <= time.monotonic() - began < 2.5
    began = time.monotonic()
    skipped = await reputation.assess("192.0.2.3")
    assert time.monotonic() - began < 0.2
    assert skipped.sources[0].detail.startswith("skipped:")
    assert zone.asked("3.2.0.192.bl.test") == 0
    await deferLater(reactor, 1.2, lambda: None)
    zone.restore("3.2.0.192.bl.test")
    zone.listed("192.0.2.3", "bl.test")
    recovered = await check(reputation, client_address="192.0.2.3")
    assert recovered.action.word == "REJECT"
    assert reputation.dns is not None and not reputation.dns.breakers["bl.test"].is_open


@pytest_twisted.ensureDeferred
async def test_real_reverse_and_forward_dns(dns_server: DnsZoneServer) -> None:
    """Without Postfix's names, PTR and A/AAAA look-ups find no rDNS, FCrDNS failure and allowed names."""
    zone = dns_server.zone
    zone.pointer("192.0.2.20", "mail.good.test")
    zone.host("mail.good.test", "192.0.2.20")
    zone.pointer("192.0.2.21", "liar.test")
    zone.host("liar.test", "192.0.2.99", "2001:db8::99")
    zone.pointer("2001:db8::22", "v6.good.test")
    zone.host("v6.good.test", "2001:db8::22")
    reputation = real(dns_server, HEURISTICS + "allow_names: [.good.test]\n")
    confirmed = await reputation.assess("192.0.2.20")
    assert confirmed.allowed_by == "mail.good.test"
    assert (await reputation.assess("2001:db8::22")).allowed_by == "v6.good.test"
    mismatch = await reputation.assess("192.0.2.21")
    assert [(p.source, p.points) for p in mismatch.sources] == [("reverse_dns_mismatch", 1)]
    missing = await reputation.assess("192.0.2.22")
    assert [(p.source, p.points) for p in missing.sources] == [("no_reverse_dns", 2)]
    assert zone.asked("mail.good.test", dns.A) == 1


@pytest_twisted.ensureDeferred
async def test_real_dns_zone_answers_over_tcp(dns_server: DnsZoneServer) -> None:
    """The test zone is served over TCP too (for truncated answers)."""
    name = dns_server.zone.listed("192.0.2.66", "bl.test", "127.0.0.3")
    resolver = client.Resolver(servers=[("127.0.0.1", dns_server.port)], reactor=reactor)
    message = await resolver.queryTCP([dns.Query(name, dns.A)])
    assert [r.payload.dottedQuad() for r in message.answers] == ["127.0.0.3"]
    for connection in list(resolver.connections):
        connection.transport.loseConnection()


# --- end to end: policyd serve and policyd score-ip against the served zone -------------------------


def e2e_config(path: Path, port: int, nameserver: str, deny_weight: int = 5, heuristics: str = "") -> Path:
    folder = path.parent
    path.write_text(
        f'listen:\n  policy: "tcp:{port}:interface=127.0.0.1"\n'
        f'store:\n  url: "sqlite:///{folder}/state.db"\n'
        "local_domains: [example.org]\n"
        "inbound:\n  tag_at: 5\n  reject_at: 10\n"
        f"{heuristics}"
        "  dnsbl:\n"
        '    - zone: bl.test\n      weight: 10\n      codes: "127.0.0.[2..11]"\n'
        "    - zone: wl.test\n      weight: -5\n"
        f"  networks:\n    - file: {folder}/deny.cidr\n      weight: {deny_weight}\n"
        f"    - file: {folder}/allow.cidr\n      allow: true\n"
        f'dns:\n  nameservers: ["{nameserver}"]\n  timeout: 1s\n  deadline: 3s\n',
        encoding="utf-8",
    )
    return path


async def in_thread(function: Any, *args: Any) -> Any:
    return await deferToThread(function, *args)


@pytest_twisted.ensureDeferred
async def test_policyd_serve_scores_clients_end_to_end(dns_server: DnsZoneServer, tmp_path: Path) -> None:
    """policyd serve with dns.nameservers on the test zone: REJECT, one PREPEND, allowlist, SIGHUP."""
    zone = dns_server.zone
    zone.listed("192.0.2.66", "bl.test", "127.0.0.2")
    zone.listed("192.0.2.77", "bl.test", "127.0.0.2")
    zone.listed("203.0.113.9", "bl.test", "127.0.0.2")
    zone.listed("203.0.113.9", "wl.test", "127.0.10.2")
    (tmp_path / "deny.cidr").write_text("198.51.100.0/24  # level 1\n", encoding="utf-8")
    (tmp_path / "allow.cidr").write_text("192.0.2.72/29 # partner, also listed\n", encoding="utf-8")
    port = free_port()
    config = e2e_config(tmp_path / "policyd.yaml", port, dns_server.nameserver)
    server = PolicydServer(config, port)
    await in_thread(server.start)
    try:

        async def reply(client: str, instance: str = "e2e.1", **more: str) -> str:
            return str(await in_thread(ask, port, rcpt(client_address=client, instance=instance, **more)))

        refused = await reply("192.0.2.66")
        assert refused.startswith("REJECT 5.7.1 ") and "bl.test" in refused
        assert await reply("192.0.2.77") == "DUNNO", "allowlisted although listed"
        assert await reply("203.0.113.50") == "DUNNO"
        tagged = [await reply("198.51.100.7", "e2e.2", recipient=f"u{n}@example.org") for n in range(3)]
        assert tagged[1:] == ["DUNNO", "DUNNO"]
        assert tagged[0].startswith(f"PREPEND {HEADER}: score=5; reasons=deny.cidr;")
        secret = (tmp_path / "header.secret").read_text(encoding="utf-8").strip().encode()
        value = tagged[0].split(": ", 1)[1]
        assert verify_header(value, secret, client="198.51.100.7") == 5
        lowered = await reply("203.0.113.9", "e2e.3")
        assert lowered.startswith("PREPEND") and "reasons=bl.test,wl.test" in lowered

        e2e_config(config, port, dns_server.nameserver, deny_weight=10)
        server.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (answer := await reply("198.51.100.7", "e2e.4")).startswith("PREPEND") or answer == "DUNNO":
            assert time.monotonic() < deadline, "SIGHUP did not apply the new weight"
            await deferLater(reactor, 0.2, lambda: None)
        assert answer.startswith("REJECT 5.7.1") and "deny.cidr" in answer
    finally:
        status = await in_thread(server.stop)
    assert status == 0, server.output()
    output = server.output()
    assert "reputation 192.0.2.66" in output
    assert "DNSDatagramProtocol" not in output and "UDP Port" not in output, "no log line per DNS query"


@pytest_twisted.ensureDeferred
async def test_score_ip_explains_a_score(dns_server: DnsZoneServer, tmp_path: Path) -> None:
    """policyd score-ip lists each zone, list and heuristic with its points, the total and the decision."""
    dns_server.zone.listed("192.0.2.66", "bl.test", "127.0.0.2")
    (tmp_path / "deny.cidr").write_text("192.0.2.0/24\n", encoding="utf-8")
    config = e2e_config(
        tmp_path / "policyd.yaml", free_port(), dns_server.nameserver, heuristics="  heuristics:\n    helo_not_fqdn: 1\n"
    )
    result = await in_thread(policyd, "score-ip", "192.0.2.66", "--helo", "localhost", "--json", "-c", str(config))
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    explained = json.loads(line)
    assert explained["score"] == 16 and explained["decision"] == "REJECT"
    assert explained["action"].startswith("REJECT 5.7.1 ")
    points = {(s["source"], s["kind"]): s["points"] for s in explained["sources"]}
    assert points == {("deny.cidr", "network"): 5, ("helo_not_fqdn", "heuristic"): 1, ("bl.test", "dnsbl"): 10, ("wl.test", "dnsbl"): 0}
    table = await in_thread(policyd, "score-ip", "192.0.2.9", "-c", str(config))
    assert table.returncode == 0, table.stderr
    assert "SOURCE" in table.stdout and "deny.cidr" in table.stdout and "not listed" in table.stdout
    assert "score 5 (tag_at 5, reject_at 10)" in table.stdout
    assert f"decision at RCPT: PREPEND {HEADER}: score=5; reasons=deny.cidr" in table.stdout
    bad = await in_thread(policyd, "score-ip", "not-an-ip", "-c", str(config))
    assert bad.returncode == 2 and "not an IP address" in bad.stderr and "Traceback" not in bad.stderr

