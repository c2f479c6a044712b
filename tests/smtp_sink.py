"""A real SMTP server (twisted.mail) on a loopback port that records every message."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.mail import smtp
from zope.interface import implementer


@implementer(smtp.IMessage)
class _Message:
    def __init__(self, sink: SmtpSink, sender: str, recipient: str) -> None:
        self.sink, self.sender, self.recipient, self.lines = sink, sender, recipient, []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> defer.Deferred[None]:
        raw = b"\n".join(self.lines) + b"\n"
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        self.sink.messages.append((self.sender, self.recipient, parsed))
        return defer.succeed(None)

    def connectionLost(self) -> None:
        self.lines = []


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink
        self.sender = ""

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        self.sender = str(origin)
        return origin

    def validateTo(self, user: smtp.User) -> Any:
        recipient = str(user.dest)
        return lambda: _Message(self.sink, self.sender, recipient)


class _Factory(smtp.SMTPFactory):
    noisy = False

    def __init__(self, sink: SmtpSink) -> None:
        super().__init__()
        self.sink = sink

    def buildProtocol(self, addr: Any) -> smtp.ESMTP:
        protocol = smtp.ESMTP()
        protocol.factory = self
        protocol.delivery = _Delivery(self.sink)
        return protocol


class SmtpSink:
    """Records (sender, recipient, message) for each delivered recipient.

    ``await start()`` listens on a free port (or the same one again after
    ``stop()``); ``port`` tells which.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.port = 0
        self.messages: list[tuple[str, str, EmailMessage]] = []
        self._listening: Any = None

    async def start(self) -> SmtpSink:
        endpoint = TCP4ServerEndpoint(self.reactor, self.port, interface="127.0.0.1")
        self._listening = await endpoint.listen(_Factory(self))
        self.port = self._listening.getHost().port
        return self

    async def stop(self) -> None:
        if self._listening is not None:
            await self._listening.stopListening()
            self._listening = None

    def to(self, recipient: str) -> list[EmailMessage]:
        """Messages delivered to one recipient."""
        return [m for _, r, m in self.messages if r == recipient]
