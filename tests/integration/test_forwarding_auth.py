"""End to end: authentication on arrival and ARC through a real Postfix, a real DNS zone and ``policyd milter``.

A loopback twisted.names zone publishes the test sender's SPF (allowing
127.0.0.1, where the test client connects from), DKIM key and DMARC
record, and the forwarder's ARC key; the milter's ``dns.nameservers``
points at it.  Postfix forwards ``fwd@example.org`` (a virtual alias) to
``outside@example.net``, relayed to the SMTP sink, where dkimpy checks
what arrived.
"""

from __future__ import annotations

import smtplib
from collections.abc import AsyncIterator, Callable, Sequence
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]
import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThread
from twisted.names import dns

from policyd.forwarding.arc import generate_key, key_record, public_key_of, write_key, zone_lookup
from tests.harness.dns_zone import DnsZoneServer, TestZone
from tests.harness.postfix import PostfixInstance, SmtpSink
from tests.harness.smtp_sink import Delivery
from tests.integration.test_postfix_milter import (
    HAM_BODY,
    SPAM_BODY,
    SPAM_SUBJECT,
    Milter,
    arrived,
    headers,
)
from tests.unit.content.test_classifier import training_mail

pytestmark = pytest.mark.integration
reactor: Any = _reactor

SENDER = "ann@example.com"
HELO = "mail.example.com"
AUTHSERV = "mx.example.org"
SENDER_KEY = generate_key(1024)[0]
RELAY_KEY = generate_key(1024)[0]


class AuthMilter(Milter):
    """The end-to-end milter with forwarding aliases, ARC, the checks on arrival and the test zone as resolver."""

    def __init__(self, root: Path, nameserver: str) -> None:
        self.nameserver = nameserver
        self.arc_key = root / "arc.key"
        if not self.arc_key.exists():
            write_key(self.arc_key, generate_key()[0])
        super().__init__(root)

    def write_config(self, smtp: str) -> None:
        """The milter's configuration plus forwarding (aliases, arc, authserv_id) and dns sections."""
        super().write_config(smtp)
        aliases = self.root / "virtual"
        aliases.write_text("fwd@example.org  outside@example.net\n", encoding="utf-8")
        with self.config.open("a", encoding="utf-8") as handle:
            handle.write(
                f"forwarding:\n  aliases: '{aliases}'\n  authserv_id: {AUTHSERV}\n"
                f"  arc: {{domain: example.org, selector: arc1, key: '{self.arc_key}'}}\n"
                f"dns:\n  nameservers: ['{self.nameserver}']\n  timeout: 1s\n  deadline: 3s\n"
            )

    def arc_record(self) -> str:
        """The TXT value publishing the milter's ARC key."""
        return key_record(public_key_of(self.arc_key.read_bytes()))


def txt(value: str) -> dns.Record_TXT:
    """A TXT record, split in strings of at most 255 bytes as DNS requires."""
    data = value.encode("ascii")
    return dns.Record_TXT(*[data[i:i + 255] for i in range(0, len(data), 255)], ttl=60)


RECORDS = {
    "example.com": "v=spf1 ip4:127.0.0.1 -all",
    HELO: "v=spf1 ip4:127.0.0.1 -all",
    "_dmarc.example.com": "v=DMARC1; p=reject",
    "sel._domainkey.example.com": key_record(public_key_of(SENDER_KEY)),
    "arc1._domainkey.relay.example.net": key_record(public_key_of(RELAY_KEY)),
}


@pytest_twisted.async_yield_fixture
async def zone() -> AsyncIterator[tuple[TestZone, DnsZoneServer]]:
    """The test sender's SPF, DKIM and DMARC records (the ARC key is added once the milter made it)."""
    authority = TestZone()
    for name, value in RECORDS.items():
        authority.add(name, txt(value), ttl=60)
    served = DnsZoneServer(authority, reactor).start()
    yield authority, served
    await served.stop()


Site = tuple[AuthMilter, PostfixInstance, SmtpSink, dict[str, str]]


@pytest.fixture
def site(
    tmp_path: Path, zone: tuple[TestZone, DnsZoneServer],
    postfix_factory: Callable[..., PostfixInstance], smtp_sink: SmtpSink,
) -> Any:
    """A trained milter using the zone, behind a real Postfix forwarding fwd@example.org to the sink."""
    authority, served = zone
    milter = AuthMilter(tmp_path, served.nameserver)
    records = {**RECORDS, "arc1._domainkey.example.org": milter.arc_record()}
    authority.add("arc1._domainkey.example.org", txt(records["arc1._domainkey.example.org"]), ttl=60)
    ham, spam = training_mail(tmp_path)
    milter.cli("train", "--ham", str(ham), "--spam", str(spam))
    milter.start()
    mta = postfix_factory(
        milters=f"inet:127.0.0.1:{milter.port}",
        # Long enough that a late milter would show (Postfix would then accept without our headers).
        main_cf={"virtual_alias_maps": "inline:{ fwd@example.org=outside@example.net }",
                 "milter_content_timeout": "30s"},
    )
    try:
        yield milter, mta, smtp_sink, records
    finally:
        assert milter.stop() == 0, milter.output()


def signed_message(subject: str, body: str, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    """A message from the test sender, DKIM-signed by example.com (selector sel), CRLF line ends."""
    message = EmailMessage(policy=SMTP)
    message["From"] = f"Ann <{SENDER}>"
    message["To"] = "fwd@example.org"
    message["Subject"] = subject
    message["Date"] = "Thu, 03 Dec 2026 10:00:00 +0000"
    message["Message-ID"] = f"<{abs(hash((subject, body)))}@example.com>"
    for name, value in extra:
        message[name] = value
    message.set_content(body, cte="quoted-printable")
    raw = message.as_bytes()
    include = [b"from", b"to", b"subject", b"date", b"message-id", *[n.lower().encode() for n, _ in extra]]
    return dkim.sign(raw, b"sel", b"example.com", SENDER_KEY, include_headers=include) + raw  # type: ignore[no-any-return]


def send(mta: PostfixInstance, recipients: list[str], raw: bytes) -> dict[str, Any]:
    """Send a raw message to Postfix's inbound port from 127.0.0.1 with HELO mail.example.com (blocking)."""
    with smtplib.SMTP("127.0.0.1", mta.inbound_port, local_hostname=HELO, timeout=120) as client:
        return client.sendmail(SENDER, recipients, raw)  # type: ignore[no-any-return]


async def forward(mta: PostfixInstance, sink: SmtpSink, raw: bytes) -> Delivery:
    """Send to fwd@example.org off the reactor thread (the zone answers the milter meanwhile); the copy
    delivered to outside@example.net."""
    refused = await deferToThread(send, mta, ["fwd@example.org"], raw)
    assert refused == {}, mta.log_tail()
    found = await deferToThread(arrived, sink, "outside@example.net")
    assert len(found) == 1, mta.log_tail()
    return found[0]


def aar(delivery: Delivery) -> str:
    """The newest ARC-Authentication-Results value."""
    values = headers(delivery, "ARC-Authentication-Results")
    assert values, delivery.data[:3000]
    return max(values, key=lambda v: int(v.split("i=", 1)[1].split(";", 1)[0]))


@pytest_twisted.ensureDeferred
async def test_forwarded_ham_keeps_the_senders_signature_and_is_sealed_with_the_results(site: Site) -> None:
    """Clean forwarded mail arrives with its headers and body as sent (the sender's DKIM verifies, its own
    X-Spam-Status kept), sealed (arc_verify pass) with spf, dkim and dmarc pass in the ARC set and our header."""
    milter, mta, sink, records = site
    raw = signed_message("Meeting notes", HAM_BODY, [("X-Spam-Status", "No, score=-2.0")])
    delivery = await forward(mta, sink, raw)
    keys = zone_lookup(records)
    assert delivery.data.endswith(raw), delivery.data[:3000]
    assert dkim.verify(delivery.data, dnsfunc=keys)
    assert dkim.arc_verify(delivery.data, dnsfunc=keys)[0] == b"pass"
    sealed = aar(delivery)
    assert f"i=1; {AUTHSERV}" in sealed
    for result in ("spf=pass smtp.mailfrom=ann@example.com", "spf=pass smtp.helo=mail.example.com",
                   "dkim=pass header.d=example.com", "dmarc=pass header.from=example.com policy.dmarc=reject"):
        assert result in sealed, sealed
    (ours,) = headers(delivery, "Authentication-Results")
    assert ours.startswith(f"{AUTHSERV}; spf=pass") and "dkim=pass" in ours and "dmarc=pass" in ours


@pytest_twisted.ensureDeferred
async def test_tagged_spam_is_sealed_with_the_results_seen_before_the_tag(site: Site) -> None:
    """Forwarded spam is tagged (breaking the sender's signature) and sealed: arc_verify passes and the ARC set
    says dkim=pass and spf=pass as checked on arrival; a local recipient gets our header too."""
    milter, mta, sink, records = site
    raw = signed_message(SPAM_SUBJECT, SPAM_BODY)
    refused = await deferToThread(send, mta, ["fwd@example.org", "bob@example.org"], raw)
    assert refused == {}, mta.log_tail()
    (forwarded,) = await deferToThread(arrived, sink, "outside@example.net")
    keys = zone_lookup(records)
    assert headers(forwarded, "Subject") == [f"*{{spam}}* {SPAM_SUBJECT}"]
    assert not dkim.verify(forwarded.data, dnsfunc=keys)
    assert dkim.arc_verify(forwarded.data, dnsfunc=keys)[0] == b"pass"
    sealed = aar(forwarded)
    assert "dkim=pass" in sealed and "spf=pass" in sealed and "dmarc=pass" in sealed, sealed
    (local,) = await deferToThread(arrived, sink, "bob@example.org")
    (ours,) = headers(local, "Authentication-Results")
    assert ours.startswith(f"{AUTHSERV}; spf=pass") and headers(local, "X-Spam-Flag") == ["YES"]


@pytest_twisted.ensureDeferred
async def test_a_broken_incoming_chain_is_sealed_on_as_failed(site: Site) -> None:
    """A message whose incoming ARC set no longer matches (changed after sealing) leaves with cv=fail and arc=fail."""
    milter, mta, sink, records = site
    raw = signed_message("Relayed notes", HAM_BODY)
    stamped = b"Authentication-Results: relay.example.net; spf=pass smtp.mailfrom=ann@example.com\r\n" + raw
    relay = dkim.arc_sign(stamped, b"arc1", b"relay.example.net", RELAY_KEY, b"relay.example.net")
    assert relay, "the relay's ARC set was not made"
    tampered = b"".join(relay) + raw.replace(b"Subject: Relayed notes", b"Subject: Changed notes")
    delivery = await forward(mta, sink, tampered)
    seals = headers(delivery, "ARC-Seal")
    newest = [s for s in seals if "i=2" in s.replace(" ", "")]
    assert newest and "cv=fail" in newest[0].replace(" ", ""), seals
    (ours,) = headers(delivery, "Authentication-Results")
    assert "arc=fail" in ours and "arc=fail" in aar(delivery)
    # Our message signature verifies; the chain it ends does not pass.  (dkimpy's verifier checks a
    # cv=fail seal over the earlier sets too, which its signer leaves out, so its as-valid says nothing.)
    status, sets, _ = dkim.arc_verify(delivery.data, dnsfunc=zone_lookup(records))
    assert status != b"pass" and sets[0]["instance"] == 2 and sets[0]["ams-valid"], sets


@pytest_twisted.ensureDeferred
async def test_a_dkim_key_that_does_not_resolve_is_temperror_and_mail_flows(
    site: Site, zone: tuple[TestZone, DnsZoneServer]
) -> None:
    """The sender's key look-up never answered: dkim=temperror, SPF still checked, the message delivered and sealed."""
    milter, mta, sink, records = site
    authority, _ = zone
    authority.silence("sel._domainkey.example.com")
    delivery = await forward(mta, sink, signed_message("Key trouble", HAM_BODY))
    (ours,) = headers(delivery, "Authentication-Results")
    assert "dkim=temperror" in ours and "spf=pass smtp.mailfrom=ann@example.com" in ours, ours
    assert "dmarc=pass" in ours  # SPF aligns with the From domain
    assert "dkim=temperror" in aar(delivery)
    assert dkim.arc_verify(delivery.data, dnsfunc=zone_lookup(records))[0] == b"pass"


@pytest_twisted.ensureDeferred
async def test_a_silent_dns_gives_temperror_within_the_deadline(
    site: Site, zone: tuple[TestZone, DnsZoneServer]
) -> None:
    """No name answers: the milter still answers Postfix (whose milter timeout is 30 s) with temperror
    results after its 3 s deadline; the message is delivered, sealed, nothing held back."""
    milter, mta, sink, records = site
    authority, _ = zone
    for name in (*RECORDS, "example.com"):
        authority.silence(name)
    delivery = await forward(mta, sink, signed_message("Silent DNS", HAM_BODY))
    (ours,) = headers(delivery, "Authentication-Results")
    for result in ("spf=temperror smtp.mailfrom=ann@example.com", "dkim=temperror", "dmarc=temperror"):
        assert result in ours, ours
    late = [line for line in mta.log_tail(200).splitlines() if "milter" in line and "timeout" in line.lower()]
    assert late == [], late
    assert dkim.arc_verify(delivery.data, dnsfunc=zone_lookup(records))[0] == b"pass"
