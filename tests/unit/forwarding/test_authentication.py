"""Checks on arrival in memory: SPF, DKIM, DMARC alignment, the organisational domain and the header text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]
import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from policyd.config.sections import Arc
from policyd.content.scorer import ContentScorer
from policyd.content.spamfilter import SpamFilter, apply_changes
from policyd.forwarding.aliases import Aliases
from policyd.forwarding.arc import (
    generate_key,
    key_record,
    message_bytes,
    public_key_of,
    zone_lookup,
)
from policyd.forwarding.authentication import (
    Arrival,
    Authenticator,
    DkimResult,
    Results,
    SpfResult,
    authenticate,
    authserv_id_of,
    check_dkim,
    check_spf,
    from_domain,
    valid_authserv_id,
)
from policyd.forwarding.dmarc import Dmarc, aligned, evaluate, org_domain, parse_record
from policyd.forwarding.lookups import Deadline, DnsTempError, Lookup, memory_lookup
from policyd.forwarding.sealing import ArcSealer
from policyd.protocols.milter import Modification
from policyd.reactor import inline
from policyd.testing import MilterReply
from tests.unit.quarantine.test_held import HAMMY, SECRET, SPAMMY, Site, WordModel, changed

SENDER_KEY = generate_key(1024)[0]
ARC_KEY = generate_key(1024)[0]

HEADERS = [("From", "Ann <ann@example.com>"), ("To", "fwd@example.org"), ("Subject", "Minutes"),
           ("Message-ID", "<m1@example.com>"), ("Date", "Thu, 03 Dec 2026 10:00:00 +0000")]

ZONE: dict[tuple[str, str], Any] = {
    ("example.com", "TXT"): [(b"v=spf1 ip4:192.0.2.0/24 -all",)],
    ("mail.example.com", "TXT"): [(b"v=spf1 a -all",)],
    ("mail.example.com", "A"): ["192.0.2.7"],
    ("_dmarc.example.com", "TXT"): [(b"v=DMARC1; p=reject; sp=quarantine",)],
    ("sel._domainkey.example.com", "TXT"): [(b"v=DKIM1; k=rsa; p=", public_key_of(SENDER_KEY).encode())],
}


def signed(headers: list[tuple[str, str]], body: bytes, domain: str = "example.com",
           include: list[bytes] | None = None) -> list[tuple[str, str]]:
    """The headers with a DKIM-Signature of ``domain`` (selector sel) on top."""
    signature = dkim.sign(message_bytes(headers, body), b"sel", domain.encode(), SENDER_KEY,
                          include_headers=include or [b"from", b"to", b"subject", b"message-id", b"date"])
    name, _, value = signature.decode().partition(":")
    return [(name, value.strip().replace("\r\n", "\n")), *headers]


def zone(**changes: Any) -> Lookup:
    """The test zone, with (name, kind) entries replaced: ``changes`` maps 'name|kind' to a value or None (removed)."""
    records = dict(ZONE)
    for key, value in changes.items():
        name, kind = key.split("|")
        if value is None:
            records.pop((name, kind), None)
        else:
            records[(name, kind)] = value
    return memory_lookup(records)


def arrival(headers: list[tuple[str, str]], body: bytes = HAMMY, client: str = "192.0.2.7",
            sender: str = "ann@example.com", helo: str = "mail.example.com") -> Arrival:
    """A message as the milter received it."""
    return Arrival(client, helo, sender, tuple(headers), body, True)


# --- SPF ---------------------------------------------------------------------------


def test_spf_for_mail_from_and_helo() -> None:
    """MAIL FROM and HELO are each checked against the client address; outside the record is fail."""
    assert check_spf("192.0.2.7", "ann@example.com", "mail.example.com", zone()) == (
        SpfResult("pass", "mailfrom", "ann@example.com", "example.com"),
        SpfResult("pass", "helo", "mail.example.com", "mail.example.com"),
    )
    assert [r.result for r in check_spf("198.51.100.1", "ann@example.com", "mail.example.com", zone())] == [
        "fail", "fail"]


def test_spf_null_sender_uses_the_helo_identity_and_odd_helos_are_not_checked() -> None:
    """An empty MAIL FROM is checked as postmaster@HELO; a HELO that is no domain gets no HELO check."""
    assert check_spf("192.0.2.7", "", "mail.example.com", zone())[0] == SpfResult(
        "pass", "mailfrom", "postmaster@mail.example.com", "mail.example.com")
    assert check_spf("192.0.2.7", "ann@example.com", "[192.0.2.7]", zone()) == (
        SpfResult("pass", "mailfrom", "ann@example.com", "example.com"),)


def test_spf_without_record_timeout_and_void_lookups() -> None:
    """No record is none, no answer is temperror, a record naming too many missing names is permerror."""
    assert check_spf("192.0.2.7", "bob@example.net", "", zone())[0].result == "none"
    late = zone(**{"example.com|TXT": DnsTempError("timeout")})
    assert check_spf("192.0.2.7", "ann@example.com", "", late)[0].result == "temperror"
    voids = zone(**{"example.com|TXT": [(b"v=spf1 a:x1.example.com a:x2.example.com a:x3.example.com -all",)]})
    assert check_spf("192.0.2.7", "ann@example.com", "", voids)[0].result == "permerror"


# --- DKIM --------------------------------------------------------------------------


def test_dkim_pass_fail_and_key_problems() -> None:
    """A good signature passes; a changed body fails; no key is permerror; an unanswered look-up temperror."""
    headers = signed(HEADERS, HAMMY)
    message = message_bytes(headers, HAMMY)
    (good,) = check_dkim(headers, message, True, zone())
    assert (good.result, good.domain, good.selector, good.algorithm) == ("pass", "example.com", "sel", "rsa-sha256")
    assert "from" in good.signed
    (changed_body,) = check_dkim(headers, message_bytes(headers, b"Other words.\r\n"), True, zone())
    assert changed_body.result == "fail"
    (no_key,) = check_dkim(headers, message, True, zone(**{"sel._domainkey.example.com|TXT": None}))
    assert (no_key.result, no_key.reason) == ("permerror", "no key")
    late = zone(**{"sel._domainkey.example.com|TXT": DnsTempError("timeout")})
    assert check_dkim(headers, message, True, late)[0].result == "temperror"
    assert check_dkim(headers, message, False, zone())[0].result == "policy"
    assert check_dkim(HEADERS, message_bytes(HEADERS, HAMMY), True, zone()) == ()


def test_dkim_changed_subject_fails() -> None:
    """A signed header changed on the way (a tag) fails the signature."""
    headers = [(n, "*{spam}* Minutes" if n == "Subject" else v) for n, v in signed(HEADERS, HAMMY)]
    assert check_dkim(headers, message_bytes(headers, HAMMY), True, zone())[0].result == "fail"


# --- DMARC -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "organisation"),
    [("example.com", "example.com"), ("Mail.Example.COM.", "example.com"), ("a.b.example.co.uk", "example.co.uk"),
     ("co.uk", "co.uk"), ("host.unknown-tld-test", "host.unknown-tld-test")],
)
def test_organisational_domain(domain: str, organisation: str) -> None:
    """The organisational domain is one label under the public suffix (the list's private names included)."""
    assert org_domain(domain) == organisation


def test_alignment_relaxed_and_strict() -> None:
    """Relaxed alignment takes the same organisation, strict only the same name."""
    assert aligned("mail.example.com", "example.com", "r") and aligned("example.com", "news.example.com", "r")
    assert not aligned("mail.example.com", "example.com", "s") and aligned("Example.com.", "example.com", "s")
    assert not aligned("example.net", "example.com", "r") and not aligned("", "example.com", "r")
    assert not aligned("a.example.co.uk", "b.other.co.uk", "r")


def test_dmarc_record_parsing() -> None:
    """Tags are read whatever their spacing; a record without v=DMARC1 first or a valid p= is no record."""
    policy = parse_record("v=DMARC1;p=Reject; adkim=s ; pct=50; rua=mailto:x@example.com", "Example.com")
    assert policy is not None
    assert (policy.domain, policy.p, policy.sp, policy.adkim, policy.aspf, policy.pct) == (
        "example.com", "reject", "reject", "s", "r", 50)
    assert parse_record("p=reject; v=DMARC1", "example.com") is None
    assert parse_record("v=DMARC1; p=maybe", "example.com") is None
    assert parse_record("v=spf1 -all", "example.com") is None


def test_dmarc_results() -> None:
    """Pass through an aligned SPF or DKIM pass; fail without; the org domain's record with sp; none; temperror."""
    lookup = zone()
    assert evaluate("example.com", ("pass", "example.com"), [], lookup) == Dmarc("pass", "example.com", "reject")
    assert evaluate("example.com", ("fail", "example.com"), [("pass", "mail.example.com")], lookup).result == "pass"
    assert evaluate("example.com", ("pass", "example.net"), [("pass", "example.net")], lookup) == Dmarc(
        "fail", "example.com", "reject")
    # No record at news.example.com: the organisational domain's applies, with its sp=.
    assert evaluate("news.example.com", ("pass", "example.com"), [], lookup) == Dmarc(
        "pass", "news.example.com", "quarantine")
    strict = zone(**{"_dmarc.example.com|TXT": [(b"v=DMARC1; p=none; aspf=s",)]})
    assert evaluate("example.com", ("pass", "mail.example.com"), [], strict).result == "fail"
    assert evaluate("example.net", ("pass", "example.net"), [], lookup) == Dmarc("none", "example.net")
    late = zone(**{"_dmarc.example.com|TXT": DnsTempError("timeout")})
    assert evaluate("example.com", ("pass", "example.com"), [], late).result == "temperror"
    assert evaluate("example.com", ("temperror", "example.com"), [], lookup).result == "temperror"
    assert evaluate("", ("pass", "example.com"), [], lookup).result == "permerror"


def test_from_domain_needs_one_from_with_one_address() -> None:
    """One From with one address gives its domain; none, two fields or two addresses give none."""
    assert from_domain([("from", "Ann <Ann@Example.COM>")]) == "example.com"
    assert from_domain([("From", "a@example.com, b@example.net")]) == ""
    assert from_domain([("From", "a@example.com"), ("From", "b@example.com")]) == ""
    assert from_domain([("To", "a@example.com")]) == ""


# --- results and the header --------------------------------------------------------


def test_whole_check_and_header_text() -> None:
    """A signed message from an allowed client passes all three; the header says so in RFC 8601 words."""
    headers = signed(HEADERS, HAMMY)
    results = authenticate(arrival(headers), zone(), "mx.example.org")
    assert results.header_value("mx.example.org") == (
        "mx.example.org; spf=pass smtp.mailfrom=ann@example.com; spf=pass smtp.helo=mail.example.com; "
        "dkim=pass header.d=example.com header.a=rsa-sha256 header.s=sel; "
        "dmarc=pass header.from=example.com policy.dmarc=reject"
    )
    assert results.arc == "none"
    bare = Results((SpfResult("none", "mailfrom", "", ""),), (), Dmarc("permerror", reason="no single From domain"))
    assert bare.texts() == ["spf=none", "dkim=none", "dmarc=permerror (no single From domain)"]
    assert Results(bare.spf, (DkimResult("temperror", "example.com", reason="key look-up failed"),), bare.dmarc,
                   "fail").header_value("mx").startswith("mx; arc=fail; spf=none; dkim=temperror (key look-up failed)")


def test_authserv_ids() -> None:
    """The authserv-id of a header is its first word, comments and case aside; ours must be a host name."""
    assert authserv_id_of(" MX.example.org; spf=pass") == "mx.example.org"
    assert authserv_id_of("(comment) mx.example.org (x) 1; none") == "mx.example.org"
    assert authserv_id_of("mx.example.org;dkim=pass") == "mx.example.org"
    assert valid_authserv_id("mx.example.org") and not valid_authserv_id("mx example") and not valid_authserv_id("")


# --- through the milter ------------------------------------------------------------


def checked_site(tmp_path: Path, arc: bool = False, spam: str = "tag") -> Site:
    """A milter site with aliases (fwd forwards outside), the checks on arrival and optionally an ARC seal."""
    path = tmp_path / "virtual"
    path.write_text("fwd@example.org  someone@example.net\n")
    site = Site(f"local_domains: [example.org]\nforwarding:\n  spam: {spam}\n  aliases: {path}\n")
    aliases = Aliases(str(path), frozenset({"example.org"}), site.clock)
    lookup = zone()
    checks = Authenticator("mx.example.org", lambda deadline: lookup, inline, site.clock, 5.0)
    sealer = None
    if arc:
        keys = zone_lookup({"arc1._domainkey.example.org": key_record(public_key_of(ARC_KEY))})
        sealer = ArcSealer(Arc("example.org", "arc1", "-"), ARC_KEY, aliases, keys, inline, site.clock,
                           authserv_id="mx.example.org")
    site.filter = SpamFilter(site.config, site.store, site.clock, ContentScorer(WordModel(), SECRET),
                             aliases=aliases, sealer=sealer, authenticator=checks)
    return site


def send(site: Site, recipients: list[str], headers: list[tuple[str, str]], body: bytes) -> list[MilterReply]:
    """One message from 192.0.2.7, HELO mail.example.com, MAIL FROM ann@example.com."""
    mta = site.mta()
    mta.command(b"H", b"mail.example.com\0")
    return mta.message("ann@example.com", recipients, headers, body)


def delivered(headers: list[tuple[str, str]], replies: list[MilterReply], body: bytes) -> bytes:
    """The message as the MTA delivers it after the milter's changes."""
    changes = [Modification(r.command, *r.strings(), r.index if r.command in (b"m", b"i") else 0)
               for r in replies if r.command in (b"h", b"m", b"i")]
    return message_bytes(apply_changes(headers, changes), body)


def test_local_mail_gets_authentication_results_and_forged_ones_go(tmp_path: Path) -> None:
    """Mail for a local recipient gets our header on top; an incoming one claiming our authserv-id is removed."""
    site = checked_site(tmp_path)
    headers = [("Authentication-Results", "other.example; spf=pass"), *signed(HEADERS, HAMMY),
               ("Authentication-Results", "MX.example.org; dkim=pass header.d=bank.example")]
    replies = send(site, ["bob@example.org"], headers, HAMMY)
    assert changed(replies, "Authentication-Results") == [(2, "")]
    ((name, value),) = [r.strings() for r in replies if r.command == b"i"]
    assert name == "Authentication-Results" and value.startswith("mx.example.org; spf=pass")
    assert "dkim=pass header.d=example.com" in value and "dmarc=pass" in value
    message = delivered(headers, replies, HAMMY)
    assert message.count(b"Authentication-Results:") == 2 and b"bank.example" not in message


def test_a_signature_over_authentication_results_keeps_them(tmp_path: Path) -> None:
    """When a passing DKIM signature covers Authentication-Results, claimed ones stay (the signature holds)."""
    site = checked_site(tmp_path)
    base = [("Authentication-Results", "mx.example.org; spf=pass"), *HEADERS]
    headers = signed(base, HAMMY, include=[b"from", b"subject", b"authentication-results"])
    replies = send(site, ["fwd@example.org"], headers, HAMMY)
    assert changed(replies, "Authentication-Results") == []
    assert dkim.verify(delivered(headers, replies, HAMMY), dnsfunc=_dkim_zone())


def _dkim_zone() -> Any:
    return zone_lookup({"sel._domainkey.example.com": key_record(public_key_of(SENDER_KEY))})


def test_clean_forwarded_mail_keeps_every_header_spam_still_stripped(tmp_path: Path) -> None:
    """Clean mail to a forwarding recipient keeps its X-Spam-* copies (its signature holds); local or spam loses them."""
    site = checked_site(tmp_path)
    base = [*HEADERS, ("X-Spam-Status", "No, score=-1.0")]
    headers = signed(base, HAMMY, include=[b"from", b"subject", b"x-spam-status"])
    forwarded = send(site, ["fwd@example.org"], headers, HAMMY)
    assert [r.command for r in forwarded] == [b"i", b"a"]
    message = delivered(headers, forwarded, HAMMY)
    assert message.endswith(message_bytes(headers, HAMMY)) and dkim.verify(message, dnsfunc=_dkim_zone())
    local = send(site, ["bob@example.org"], headers, HAMMY)
    assert changed(local, "X-Spam-Status") == [(1, "")]
    spam = send(site, ["fwd@example.org"], headers, SPAMMY)
    assert changed(spam, "X-Spam-Status") == [(1, "")] and changed(spam, "Subject")


def test_forwarded_mail_is_sealed_with_the_arrival_results(tmp_path: Path) -> None:
    """The ARC set carries spf, dkim and dmarc as checked on arrival, verifies, and the sender's DKIM holds."""
    site = checked_site(tmp_path, arc=True)
    headers = signed(HEADERS, HAMMY)
    replies = send(site, ["fwd@example.org"], headers, HAMMY)
    message = delivered(headers, replies, HAMMY)
    records = {"arc1._domainkey.example.org": key_record(public_key_of(ARC_KEY)),
               "sel._domainkey.example.com": key_record(public_key_of(SENDER_KEY))}
    assert dkim.arc_verify(message, dnsfunc=zone_lookup(records))[0] == b"pass"
    assert dkim.verify(message, dnsfunc=zone_lookup(records))
    aar = [line for line in message.split(b"\r\n") if line.startswith(b"ARC-Authentication-Results")][0]
    assert b"spf=pass" in aar and b"dkim=pass" in aar and b"dmarc=pass" in aar and b"i=1; mx.example.org" in aar
    assert message.count(b"Authentication-Results: mx.example.org") == 1


def test_late_checks_give_temperror_and_the_message_flows() -> None:
    """Checks that do not finish within the deadline give temperror results; the verdict does not wait longer."""
    clock = Clock()
    never: list[Deferred[Any]] = []

    def stuck(*args: Any) -> Deferred[Any]:
        never.append(Deferred())
        return never[-1]

    checks = Authenticator("mx.example.org", lambda deadline: zone(), stuck, clock, 3.0)
    site = Site()
    mta = site.mta()
    mta.command(b"H", b"mail.example.com\0")
    mta.mail("ann@example.com")
    mta.rcpt("bob@example.org")
    message = mta.protocol.message  # type: ignore[attr-defined]
    for name, value in signed(HEADERS, HAMMY):
        message.add_header(name, value)
    results: list[Results] = []
    checks.check(message).addCallback(results.append)
    clock.advance(2.9)
    assert results == []
    clock.advance(0.2)
    (found,) = results
    assert [s.result for s in found.spf] == ["temperror", "temperror"]
    assert [(d.result, d.domain) for d in found.dkim] == [("temperror", "example.com")]
    assert found.dmarc.result == "temperror" and found.arc == ""


def test_deadline_counts_down() -> None:
    """A deadline tells what is left, never less than zero."""
    now = [100.0]
    deadline = Deadline(2.0, now=lambda: now[0])
    now[0] += 1.5
    assert deadline.left() == pytest.approx(0.5)
    now[0] += 1.0
    assert deadline.left() == 0.0


def test_values_from_the_sender_cannot_add_clauses() -> None:
    """A d= or MAIL FROM carrying ';' or spaces is left out of the header, never written as it came."""
    forged = Results(
        (SpfResult("fail", "mailfrom", 'x@y; dkim=pass header.d=bank.example', "y"),),
        (DkimResult("fail", "x@y; dkim=pass header.d=bank.example", "s 1", "rsa-sha256"),),
        Dmarc("none", "example.com"),
    )
    value = forged.header_value("mx.example.org")
    assert value == ("mx.example.org; spf=fail smtp.mailfrom=y; dkim=fail header.a=rsa-sha256; "
                     "dmarc=none header.from=example.com")
    assert "bank.example" not in value


def test_checks_are_on_with_arc_by_default_and_the_authserv_id_is_checked(tmp_path: Path) -> None:
    """Unset, forwarding.authenticate follows forwarding.arc; true or false decide; a bad authserv_id is refused."""
    from policyd.errors import ConfigError
    from policyd.forwarding.authentication import (
        authentication_on,
        authserv_id,
        default_authserv_id,
    )
    from tests.conftest import make_config

    arc = "forwarding:\n  arc: {domain: example.org, selector: arc1, key: /k}\n"
    assert authentication_on(make_config(arc)) and not authentication_on(make_config(""))
    assert authentication_on(make_config("forwarding:\n  authenticate: true\n"))
    assert not authentication_on(make_config(arc + "  authenticate: false\n"))
    assert authserv_id(make_config("forwarding:\n  authserv_id: MX.Example.org.\n")) == "mx.example.org"
    assert authserv_id(make_config("")) == default_authserv_id() and valid_authserv_id(default_authserv_id())
    with pytest.raises(ConfigError, match="forwarding.authserv_id: must be a host name"):
        make_config("forwarding:\n  authserv_id: 'mx; dkim=pass'\n")


def test_names_asked_first_and_checks_with_them() -> None:
    """The SPF, DMARC and DKIM key names of a message are asked first; the checks find their answers there."""
    from policyd.forwarding.authentication import names_to_ask
    from policyd.forwarding.lookups import Known

    headers = signed(HEADERS, HAMMY)
    assert names_to_ask(arrival(headers)) == [
        ("example.com", "TXT"), ("mail.example.com", "TXT"), ("_dmarc.example.com", "TXT"),
        ("sel._domainkey.example.com", "TXT")]
    assert names_to_ask(arrival(HEADERS, client="")) == [("_dmarc.example.com", "TXT")]
    asked: list[list[tuple[str, str]]] = []
    answers = zone()

    def prefetch(names: Any, deadline: Deadline) -> Deferred[Known]:
        asked.append(list(names))
        return succeed({name: answers(*name) for name in names})

    clock = Clock()
    checks = Authenticator("mx.example.org", lambda deadline: zone(), inline, clock, 5.0, prefetch=prefetch)
    site = Site()
    mta = site.mta()
    mta.command(b"H", b"mail.example.com\0")
    mta.mail("ann@example.com")
    message = mta.protocol.message  # type: ignore[attr-defined]
    for name, value in headers:
        message.add_header(name, value)
    message.add_body(HAMMY)
    results: list[Results] = []
    checks.check(message).addCallback(results.append)
    assert asked and results[0].dmarc.result == "pass" and results[0].dkim[0].result == "pass"
