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

from policyd.protocol import Request
from policyd.store.memory import MemoryStore

__all__ = ["MemoryStore", "PolicyClient", "encode", "rcpt"]


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
    """A parsed :class:`~policyd.protocol.Request` from attributes."""
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
