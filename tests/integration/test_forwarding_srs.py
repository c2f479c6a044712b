"""SRS for forwarded mail: a real Postfix rewrites envelopes through a real postsrsd (docs/forwarding.md).

The site: ``policyd milter`` (``forwarding: {aliases, spam: hold}``) behind a
private Postfix whose ``virtual_alias_maps`` forwards ``fwd@example.org`` to
``outside@example.net`` and whose canonical maps are postsrsd's two TCP
tables (Debian's recipe), every message delivered to the SMTP sink.  SPF at
the destination is checked with pyspf against a twisted.names zone on
loopback that publishes ``v=spf1 ip4:127.0.0.1 -all`` for example.org.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import AsyncIterator, Callable, Iterator
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import dns.resolver
import pytest
import pytest_twisted
import spf
from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThread
from twisted.names import dns as names_dns

from tests.harness.dns_zone import DnsZoneServer, TestZone
from tests.harness.postfix import PostfixInstance, SmtpSink
from tests.harness.postsrsd import Postsrsd, postsrsd  # noqa: F401  (fixture)
from tests.integration.test_forwarding import ForwardingMilter, spam_is_held_for_the_alias
from tests.integration.test_postfix_milter import (
    HAM_BODY,
    HAM_SUBJECT,
    arrived,
    headers,
)
from tests.unit.content.test_classifier import training_mail

pytestmark = pytest.mark.integration
reactor: Any = _reactor

#: Postfix's smtp client reaches the sink (the destination) from this address.
OUR_ADDRESS = "127.0.0.1"
#: An SRS0 address of ours for ``user@domain``: SRS0=hash=timestamp=domain=user@example.org.
SRS0 = r"SRS0=[^=@]+=[^=@]+={domain}={user}@example\.org"

Site = tuple[ForwardingMilter, PostfixInstance, SmtpSink, Postsrsd]


@pytest.fixture
def site(
    tmp_path: Path, postfix_factory: Callable[..., PostfixInstance], smtp_sink: SmtpSink,
    postsrsd: Postsrsd,  # noqa: F811
) -> Iterator[Site]:
    """A trained milter (forwarding spam held) behind a Postfix that uses postsrsd; the milter exits 0 at the end."""
    milter = ForwardingMilter(tmp_path)
    ham, spam = training_mail(tmp_path)
    milter.cli("train", "--ham", str(ham), "--spam", str(spam))
    milter.start()
    try:
        mta = postfix_factory(
            milters=f"inet:127.0.0.1:{milter.port}",
            main_cf={"virtual_alias_maps": "inline:{ fwd@example.org=outside@example.net }", **postsrsd.main_cf()},
        )
        assert "tcp:127.0.0.1:" in mta.postconf("sender_canonical_maps")
        yield milter, mta, smtp_sink, postsrsd
    finally:
        assert milter.stop() == 0, milter.output()


@pytest_twisted.async_yield_fixture
async def spf_zone() -> AsyncIterator[DnsZoneServer]:
    """example.org allows only this server; example.net (the original senders) allows another one."""
    zone = TestZone()
    zone.add("example.org", names_dns.Record_TXT(b"v=spf1 ip4:127.0.0.1 -all"))
    zone.add("example.net", names_dns.Record_TXT(b"v=spf1 ip4:192.0.2.25 -all"))
    served = DnsZoneServer(zone, reactor).start()
    yield served
    await served.stop()


def spf_result(server: DnsZoneServer, sender: str) -> str:
    """pyspf's verdict at the destination for mail from ``OUR_ADDRESS`` with envelope sender ``sender``.

    pyspf asks dnspython's default resolver: it is pointed at the test zone for this call.
    """
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port
    resolver.lifetime = 10.0
    saved, dns.resolver.default_resolver = dns.resolver.default_resolver, resolver
    try:
        result, _explanation = spf.check2(i=OUR_ADDRESS, s=sender, h="mx.example.org")
    finally:
        dns.resolver.default_resolver = saved
    return str(result)


def bounce(mta: PostfixInstance, to: str, subject: str) -> str:
    """Send a delivery status notification (null sender) to ``to`` on the inbound port, like a remote MTA.

    :returns: its Message-ID.
    """
    message = EmailMessage()
    message["From"] = "Mail Delivery System <MAILER-DAEMON@mx.example.net>"
    message["To"] = to
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="mx.example.net")
    message.set_content(HAM_BODY)  # the returned message (the scorer's tag does not matter here)
    with mta.connect(mta.inbound_port) as client:
        try:
            client.sendmail("", [to], message.as_bytes())
        except smtplib.SMTPException as error:
            raise AssertionError(f"the bounce to {to} was refused: {error}\n{mta.log_tail()}") from None
    return str(message["Message-ID"])


@pytest.mark.filterwarnings("ignore:please use dns.resolver.resolve:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_forwarded_copy_leaves_with_an_srs_sender_that_passes_spf(
    site: Site, spf_zone: DnsZoneServer,
) -> None:
    """The forwarded copy's envelope sender is SRS0 in example.org (postsrsd's own answer) and SPF passes for
    it at the destination, where the original sender's domain fails; headers and body are untouched."""
    _milter, mta, sink, srs = site
    sent = await deferToThread(mta.send, mta.inbound_port, "ann@example.net", ["fwd@example.org"],
                               subject=HAM_SUBJECT, body=HAM_BODY)
    assert sent.accepted == ["fwd@example.org"], mta.log_tail()
    (forwarded,) = await deferToThread(arrived, sink, "outside@example.net")
    assert forwarded.recipients == ("outside@example.net",)
    assert re.fullmatch(SRS0.format(domain=r"example\.net", user="ann"), forwarded.sender), forwarded.sender
    assert await deferToThread(srs.reverse, forwarded.sender) == (200, "ann@example.net")
    assert headers(forwarded, "From") == ["ann@example.net"] and headers(forwarded, "Subject") == [HAM_SUBJECT]

    assert await deferToThread(spf_result, spf_zone, forwarded.sender) == "pass"
    assert await deferToThread(spf_result, spf_zone, "ann@example.net") == "fail"


def test_a_bounce_to_the_srs_address_comes_back_to_the_original_sender(site: Site) -> None:
    """A bounce sent to the forwarded copy's SRS0 sender is delivered to the original sender's address;
    an SRS0 address with a forged hash is not turned into anyone's address."""
    _milter, mta, sink, _srs = site
    sent = mta.send(mta.inbound_port, "ann@example.net", ["fwd@example.org"], subject=HAM_SUBJECT, body=HAM_BODY)
    assert sent.accepted == ["fwd@example.org"], mta.log_tail()
    (forwarded,) = arrived(sink, "outside@example.net")
    assert forwarded.sender.startswith("SRS0="), forwarded.sender

    message_id = bounce(mta, forwarded.sender, "Undelivered Mail Returned to Sender")
    (returned,) = arrived(sink, "ann@example.net")
    assert returned.recipients == ("ann@example.net",) and returned.sender == ""
    assert headers(returned, "Message-ID") == [message_id]
    assert headers(returned, "To") == ["ann@example.net"]  # header_recipient: the To: line is undone too

    forged = re.sub(r"^SRS0=[^=]+=", "SRS0=AAAA=", forwarded.sender)
    assert forged != forwarded.sender
    bounce(mta, forged, "Forged bounce")
    (kept,) = arrived(sink, forged)
    assert kept.recipients == (forged,)
    mta.wait_queue_empty()
    assert len(arrived(sink, "ann@example.net")) == 1


def test_local_recipients_are_not_rewritten(site: Site) -> None:
    """Mail to a local recipient keeps its recipient; a sender of our own domain is never rewritten,
    an outside sender is rewritten here too (postsrsd 1.x rewrites in cleanup, before routing)."""
    _milter, mta, sink, _srs = site
    sent = mta.send(mta.inbound_port, "ann@example.net", ["bob@example.org"], subject=HAM_SUBJECT, body=HAM_BODY)
    assert sent.accepted == ["bob@example.org"], mta.log_tail()
    (local,) = arrived(sink, "bob@example.org")
    assert local.recipients == ("bob@example.org",)
    assert re.fullmatch(SRS0.format(domain=r"example\.net", user="ann"), local.sender), local.sender

    sent = mta.send(mta.inbound_port, "carol@example.org", ["fwd@example.org"], subject=HAM_SUBJECT, body=HAM_BODY)
    assert sent.accepted == ["fwd@example.org"], mta.log_tail()
    (own,) = arrived(sink, "outside@example.net")
    assert own.sender == "carol@example.org"


def test_held_spam_is_never_forwarded_with_srs(site: Site) -> None:
    """With forwarding.spam: hold, level-1 spam for the alias never leaves (held under the alias) while the
    local recipient gets it tagged; ham for the alias leaves with an SRS sender."""
    milter, mta, sink, _srs = site
    spam_is_held_for_the_alias(milter, mta, sink)

    sent = mta.send(mta.inbound_port, "friend@example.net", ["fwd@example.org"], subject=HAM_SUBJECT, body=HAM_BODY)
    assert sent.accepted == ["fwd@example.org"], mta.log_tail()
    (forwarded,) = arrived(sink, "outside@example.net")
    assert re.fullmatch(SRS0.format(domain=r"example\.net", user="friend"), forwarded.sender), forwarded.sender
    assert headers(forwarded, "X-Spam-Flag") == []
