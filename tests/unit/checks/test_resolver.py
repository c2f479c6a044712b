"""DNS failures said in words: the servers asked and how long they had, never the resolver's query objects."""

from __future__ import annotations

import errno

from twisted.internet.defer import TimeoutError
from twisted.names import dns, error
from twisted.python.failure import Failure

from policyd.checks.resolver import (
    describe_failure,
    describe_servers,
    make_resolver,
    resolver_servers,
)


def test_a_resolver_time_out_names_the_server_and_the_time() -> None:
    """twisted.names' TimeoutError([Query(...)]) becomes 'DNS server 127.0.0.1:53 did not answer within 2s'."""
    raw = TimeoutError([dns.Query(b"10.2.0.192.zen.example", dns.PTR, dns.IN)])
    assert "Query(" in str(raw)
    text = describe_failure(Failure(raw), [("127.0.0.1", 53)], 2.0)
    assert text == "DNS server 127.0.0.1:53 did not answer within 2s"


def test_several_servers_and_ipv6_are_named() -> None:
    """Every server asked is named, IPv6 ones in brackets; without servers or time the sentence still reads."""
    assert describe_servers([("10.0.0.1", 53), ("2001:db8::1", 5353)]) == "DNS servers 10.0.0.1:53, [2001:db8::1]:5353"
    assert describe_failure(error.DNSQueryTimeoutError(7)) == "the DNS server did not answer"


def test_rcodes_and_socket_errors_are_words() -> None:
    """SERVFAIL, REFUSED, FORMERR and an unreachable server are named, not shown as exception reprs."""
    assert describe_failure(error.DNSServerError("x")) == "server failure (SERVFAIL)"
    assert describe_failure(error.DNSQueryRefusedError("x")) == "query refused (REFUSED)"
    assert describe_failure(error.DNSFormatError("x")).endswith("(FORMERR)")
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    assert describe_failure(refused, [("127.0.0.1", 53)]) == "cannot reach DNS server 127.0.0.1:53: Connection refused"


def test_the_servers_of_a_twisted_names_client_are_read() -> None:
    """The configured nameservers are what a failure names; a resolver without servers names none."""
    from twisted.internet.task import Clock

    resolver = make_resolver(["127.0.0.1:5353", "[::1]:53"], Clock(), 1.0)
    assert resolver_servers(resolver) == (("127.0.0.1", 5353), ("::1", 53))
    assert resolver_servers(object()) == ()
