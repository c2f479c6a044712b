"""Test helpers shipped with the product: a policy client and request builders.

Use them to test a Postfix policy setup, or policyd itself:

- :func:`rcpt` builds a request as Postfix sends it at ``RCPT TO``;
- :class:`PolicyClient` speaks the policy protocol like Postfix, with
  pipelining, over any Twisted transport;
- :class:`~policyd.store.memory.MemoryStore` is the in-memory store.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from policyd.protocols.policy import Request
from policyd.store.memory import MemoryStore

__all__ = ["FakeMTA", "MemoryStore", "MilterReply", "PolicyClient", "encode", "rcpt"]


def rcpt(
    recipient: str = "someone@example.net",
    sasl_username: str = "",
    client_address: str = "192.0.2.10",
    instance: str = "1a2b.5f3c1d2e.0",
    **more: str,
) -> dict[str, str]:
    """The attributes Postfix sends for one ``RCPT TO`` (SMTPD_POLICY_README)."""
    attributes = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": client_address,
        "client_name": "mail.example.net",
        "reverse_client_name": "mail.example.net",
        "helo_name": "mail.example.net",
        "sender": sasl_username or "sender@example.net",
        "recipient": recipient,
        "recipient_count": "0",
        "queue_id": "",
        "instance": instance,
        "size": "0",
        "etrn_domain": "",
        "stress": "",
        "sasl_method": "PLAIN" if sasl_username else "",
        "sasl_username": sasl_username,
        "sasl_sender": "",
        "ccert_subject": "",
        "ccert_issuer": "",
        "ccert_fingerprint": "",
        "ccert_pubkey_fingerprint": "",
        "encryption_protocol": "",
        "encryption_cipher": "",
        "encryption_keysize": "0",
        "server_address": "127.0.0.1",
        "server_port": "587",
        "policy_context": "",
        "compatibility_level": "3.6",
        "mail_version": "3.7.11",
    }
    attributes.update(more)
    return attributes


def request(attributes: dict[str, str], session: object = None) -> Request:
    """A parsed :class:`~policyd.protocols.policy.Request` from attributes."""
    return Request(dict(attributes), "test", session)


def encode(attributes: dict[str, str]) -> bytes:
    """One request on the wire."""
    return "".join(f"{k}={v}\n" for k, v in attributes.items()).encode() + b"\n"


class PolicyClient(Protocol):
    """Speaks the policy protocol as Postfix does: requests may be pipelined.

    :meth:`ask` fires with the reply's action text (``DUNNO``,
    ``REJECT 5.7.1 ...``) in request order.
    """

    #: The connected transport.
    transport: Any

    def __init__(self) -> None:
        self._waiting: deque[Deferred[str]] = deque()
        self._buffer = b""
        self.closed: Deferred[None] = Deferred()

    def ask(self, attributes: dict[str, str]) -> Deferred[str]:
        """Send one request; fires with its reply's action."""
        waiting: Deferred[str] = Deferred()
        self._waiting.append(waiting)
        self.transport.write(encode(attributes))
        return waiting

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (to test bad input)."""
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        """Split replies and hand each to the request that waits for it."""
        self._buffer += data
        while b"\n\n" in self._buffer:
            reply, self._buffer = self._buffer.split(b"\n\n", 1)
            waiting = self._waiting.popleft()
            text = reply.decode("utf-8", "replace")
            if not text.startswith("action="):
                waiting.errback(ValueError(f"malformed reply {text!r}"))
            else:
                waiting.callback(text[len("action=") :])

    def connectionLost(self, reason: Failure | Any = None) -> None:
        """Fail requests that will never get a reply."""
        while self._waiting:
            self._waiting.popleft().errback(ConnectionError("connection closed before the reply"))
        if not self.closed.called:
            self.closed.callback(None)


# --- a fake MTA for the milter ------------------------------------------------------


class MilterReply:
    """One packet the milter sent: its command byte and data."""

    __slots__ = ("command", "data")

    def __init__(self, command: bytes, data: bytes) -> None:
        self.command = command
        self.data = data

    def strings(self) -> list[str]:
        """The NUL-terminated strings of the data (after a 4-byte index for 'm' and 'i')."""
        data = self.data[4:] if self.command in (b"m", b"i") else self.data
        if data.endswith(b"\0"):
            data = data[:-1]
        return [s.decode("utf-8", "surrogateescape") for s in data.split(b"\0")]

    @property
    def index(self) -> int:
        """The header index of a change-header ('m') or insert-header ('i') reply."""
        return int.from_bytes(self.data[:4], "big")

    def __repr__(self) -> str:
        return f"MilterReply({self.command!r}, {self.data!r})"


class FakeMTA:
    """Drives a milter protocol in memory the way Postfix does (milter protocol 6).

    Connect it to any :class:`~twisted.internet.interfaces.IProtocol` (a
    :class:`policyd.protocols.milter_session.MilterProtocol`): it writes packets into the
    protocol and reads the replies from a ``StringTransport``, waiting for
    a reply only where the negotiated steps say one comes.

    :param protocol: the milter side.
    :param actions: the SMFIF_* actions the MTA allows (Postfix: all, 0x1ff).
    :param steps: the SMFIP_* steps the MTA offers to skip (Postfix 3: 0x1fffff).
    """

    def __init__(self, protocol: Protocol, actions: int = 0x1FF, steps: int = 0x1FFFFF) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        self.protocol = protocol
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 54321))
        protocol.makeConnection(self.transport)
        self.offered_actions = actions
        self.offered_steps = steps
        self.actions = 0
        self.steps = 0
        self._pending = b""

    # --- wire -------------------------------------------------------------------

    @staticmethod
    def packet(command: bytes, data: bytes = b"") -> bytes:
        """One packet as the MTA sends it."""
        return (len(data) + 1).to_bytes(4, "big") + command + data

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (to test bad input)."""
        self.protocol.dataReceived(data)

    def replies(self) -> list[MilterReply]:
        """Every complete reply packet written since the last call."""
        self._pending += self.transport.value()
        self.transport.clear()
        found = []
        while len(self._pending) >= 5:
            length = int.from_bytes(self._pending[:4], "big")
            if len(self._pending) < 4 + length:
                break
            found.append(MilterReply(self._pending[4:5], self._pending[5 : 4 + length]))
            self._pending = self._pending[4 + length :]
        return found

    def command(self, command: bytes, data: bytes = b"") -> list[MilterReply]:
        """Send one command; return the replies it got (none for steps negotiated without reply)."""
        self.protocol.dataReceived(self.packet(command, data))
        return self.replies()

    @property
    def closed(self) -> bool:
        """Whether the milter closed the connection."""
        return bool(self.transport.disconnecting)

    # --- the conversation ---------------------------------------------------------

    def negotiate(self, version: int = 6) -> MilterReply:
        """SMFIC_OPTNEG; remembers what the milter asked for."""
        data = version.to_bytes(4, "big") + self.offered_actions.to_bytes(4, "big") + self.offered_steps.to_bytes(4, "big")
        (reply,) = self.command(b"O", data)
        self.actions = int.from_bytes(reply.data[4:8], "big")
        self.steps = int.from_bytes(reply.data[8:12], "big")
        return reply

    def macros(self, stage: bytes, **values: str) -> None:
        """SMFIC_MACRO for the next command; one-letter names go bare (``i``), others in braces."""
        data = b"".join(
            (k if len(k) == 1 else f"{{{k}}}").encode() + b"\0" + v.encode() + b"\0" for k, v in values.items()
        )
        self.command(b"D", stage + data)

    def connect(self, hostname: str = "mail.example.net", address: str = "192.0.2.7", port: int = 4567) -> list[MilterReply]:
        """SMFIC_CONNECT from an IPv4 client."""
        data = hostname.encode() + b"\0" + b"4" + port.to_bytes(2, "big") + address.encode() + b"\0"
        return self.command(b"C", data)

    def mail(self, sender: str) -> list[MilterReply]:
        """SMFIC_MAIL."""
        return self.command(b"M", f"<{sender}>".encode() + b"\0")

    def rcpt(self, recipient: str) -> list[MilterReply]:
        """SMFIC_RCPT."""
        return self.command(b"R", f"<{recipient}>".encode() + b"\0")

    def header(self, name: str, value: str) -> list[MilterReply]:
        """SMFIC_HEADER (value without the space after the colon, as Postfix sends it)."""
        return self.command(b"L", name.encode() + b"\0" + value.encode("utf-8", "surrogateescape") + b"\0")

    def end_of_headers(self) -> list[MilterReply]:
        """SMFIC_EOH (unless the milter asked to skip it)."""
        if self.steps & 0x40:
            return []
        return self.command(b"N")

    def body(self, data: bytes) -> list[MilterReply]:
        """SMFIC_BODY chunks of at most 65,535 bytes, as Postfix sends them."""
        replies = []
        for start in range(0, len(data), 65535):
            replies += self.command(b"B", data[start : start + 65535])
        return replies

    def end(self) -> list[MilterReply]:
        """SMFIC_BODYEOB: the modifications and the final reply (once the filter answered)."""
        return self.command(b"E")

    def abort(self) -> None:
        """SMFIC_ABORT."""
        self.command(b"A")

    def quit(self) -> None:
        """SMFIC_QUIT."""
        self.command(b"Q")

    def message(
        self,
        sender: str,
        recipients: list[str],
        headers: list[tuple[str, str]],
        body: bytes,
        queue_id: str = "4XyZ1",
    ) -> list[MilterReply]:
        """MAIL, RCPT..., headers, body and end-of-message; returns the end-of-message replies."""
        self.mail(sender)
        for recipient in recipients:
            self.rcpt(recipient)
        for name, value in headers:
            self.header(name, value)
        self.end_of_headers()
        self.body(body)
        self.macros(b"E", i=queue_id)
        return self.end()
