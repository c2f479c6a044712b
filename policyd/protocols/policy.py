"""Postfix's SMTP access policy delegation protocol (SMTPD_POLICY_README).

A request is ``name=value`` lines ended by an empty line; the reply is
``action=...`` and an empty line.  Postfix keeps a connection open and sends
request after request on it.  :class:`PolicyProtocol` only frames, parses and
bounds the input, then hands each request to an injected
``decide(request) -> Deferred[Action]``; replies go back in request order
even when later requests are decided first.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable
from typing import Any, overload

from twisted.internet import interfaces
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from policyd.addresses import sanitise
from policyd.config import Limits
from policyd.netlists import NetworkSet
from policyd.protocols.connections import ConnectionTracking, describe_peer
from policyd.reactor import write_now, writes_directly

log = logging.getLogger("policyd.protocol")

_NAME = re.compile(rb"[A-Za-z0-9_.\-]+")
# C0 controls other than TAB, and DEL: never in a value Postfix sends.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# A whole well-formed request without its final empty line.  The repeats are
# possessive: nothing they take could be given back to make a match (a name
# never holds "=", a value never holds a newline), and not keeping the
# positions to go back to makes the match twice as fast.
_ATTRIBUTE = rb"[A-Za-z0-9_.\-]++=[^\x00-\x08\x0a-\x1f\x7f]*+"
_REQUEST = re.compile(_ATTRIBUTE + rb"(?:\n" + _ATTRIBUTE + rb")*+")

#: The bytes of attribute names.
_NAME_BYTES = bytes(c for c in range(128) if chr(c).isalnum() or chr(c) in "_.-")
#: Every control byte but TAB and newline made NUL, the rest kept (see _lines_of).
_SHAPE = bytes(0 if c < 0x20 and c not in (0x09, 0x0A) or c == 0x7F else c for c in range(256))
_EMPTY_NAME = re.compile(rb"\n=")
#: The end of a request (the regular expression finds it in half the time of bytes.find).
_END = re.compile(rb"\n\n")


def _lines_of(block: bytes) -> int:
    """The newlines of ``block`` (no empty line in it, none at its end) if it matches :data:`_REQUEST`, else -1.

    The same answer in C passes over the bytes rather than the regular
    expression's, about twice as fast: with the name bytes deleted and
    control bytes made NUL, a well-formed request is ``=`` and a value per
    line, with no NUL, and each newline followed by ``=``; the names
    deleted must not have been empty.
    """
    shape = block.translate(_SHAPE, _NAME_BYTES)
    newlines = shape.count(b"\n")
    if (
        shape.startswith(b"=")
        and shape.find(0) < 0
        and shape.count(b"\n=") == newlines
        and not block.startswith(b"=")
        and _EMPTY_NAME.search(block) is None
    ):
        return newlines
    return -1


#: "\nname=" for each attribute name the code asks for (a few dozen).
_NEEDLES: dict[str, str] = {}


class Request:
    """One policy request: Postfix's attributes, and where it came from.

    A request read off the wire keeps its text and looks attributes up in it
    when asked: a decision reads a handful of Postfix's thirty attributes, and
    splitting all of them into a dictionary cost more than the decision.

    :ivar peer: the policy client's address, for logs.
    :ivar session: the connection the request came on; requests of one
        ``smtpd`` process share it, so it ties an ``instance`` together.
    """

    __slots__ = ("_attributes", "_text", "peer", "session")

    def __init__(self, attributes: dict[str, str], peer: str = "", session: object = None) -> None:
        self._attributes: dict[str, str] | None = attributes
        self._text = ""
        self.peer = peer
        self.session = session

    @classmethod
    def from_lines(cls, text: str, peer: str = "", session: object = None) -> Request:
        """A request from its validated ``name=value`` lines (no final empty line)."""
        request = cls.__new__(cls)
        request._attributes = None
        # A newline in front makes every attribute start with "\n" + name + "=",
        # and one behind makes every value end with a newline.
        request._text = f"\n{text}\n"
        request.peer = peer
        request.session = session
        return request

    @property
    def attributes(self) -> dict[str, str]:
        """Every attribute as sent (unknown ones kept); a repeated name keeps its last value."""
        attributes = self._attributes
        if attributes is None:
            attributes = self._attributes = dict(line.split("=", 1) for line in self._text[1:-1].split("\n"))
        return attributes

    @overload
    def get(self, name: str, default: str = "") -> str: ...

    @overload
    def get(self, name: str, default: None) -> str | None: ...

    def get(self, name: str, default: str | None = "") -> str | None:
        """The value of an attribute, or ``default`` when Postfix did not send it."""
        if self._attributes is not None:
            return self._attributes.get(name, default)
        text = self._text
        # Names are [A-Za-z0-9_.-] and values hold no newline (the parser
        # checked), so "\nname=" can only be the start of that attribute; the
        # last one wins, as in :attr:`attributes`.
        needle = _NEEDLES.get(name)
        if needle is None:
            needle = _NEEDLES[name] = f"\n{name}="
        start = text.rfind(needle)
        if start < 0:
            return default
        start += len(needle)
        return text[start : text.find("\n", start)]

    def __repr__(self) -> str:
        return f"Request({self.attributes!r}, peer={self.peer!r})"


class Action:
    """A reply: an access(5) action word and its text, sanitised.

    >>> Action("REJECT", "5.7.1 blocked\\r\\naction=OK").line()
    b'action=REJECT 5.7.1 blocked  action=OK\\n\\n'
    """

    __slots__ = ("_line", "text", "word")

    def __init__(self, word: str, text: str = "") -> None:
        self.word = word
        self.text = sanitise(text) if text else ""
        self._line = (f"action={word} {self.text}\n\n" if self.text else f"action={word}\n\n").encode()

    def line(self) -> bytes:
        """The reply as sent on the wire, empty line included."""
        return self._line

    def __str__(self) -> str:
        return f"{self.word} {self.text}" if self.text else self.word

    def __repr__(self) -> str:
        return f"Action({self.word!r}, {self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Action) and (self.word, self.text) == (other.word, other.text)

    def __hash__(self) -> int:
        return hash((self.word, self.text))


#: The neutral answer: let Postfix's other restrictions decide.
DUNNO = Action("DUNNO")

#: The policy: an Action when it knows at once, a Deferred when it must wait.
Decide = Callable[[Request], "Action | Deferred[Action]"]


class BadRequest(Exception):
    """Input that breaks the protocol; the connection is closed."""


@implementer(interfaces.IPushProducer)
class PolicyProtocol(Protocol, TimeoutMixin):
    """One policy client connection (one Postfix ``smtpd`` process).

    Reading pauses while ``limits.max_pending`` requests wait for a decision
    or while the client does not read its replies, so a client can never make
    the server hold more than a bounded amount of memory for it.
    """

    factory: PolicyFactory
    #: The TCP or unix transport, set by makeConnection.
    transport: Any

    def __init__(self, decide: Decide, limits: Limits) -> None:
        self.decide = decide
        self.limits = limits
        self.peer = "?"
        self._buffer = b""
        #: Replies in request order; None until that request is decided.
        self._replies: deque[list[bytes | None]] = deque()
        #: Replies decided at once while nothing was waiting, not written yet.
        self._ready: list[bytes] = []
        self._closing = False
        self._write_paused = False
        self._read_paused = False
        self._direct = False

    # --- connection -----------------------------------------------------

    def connectionMade(self) -> None:
        """Start the idle timer and watch the client's reading."""
        transport = self.transport
        self.peer = describe_peer(transport.getPeer())
        # A plain TCP or unix socket of Twisted's can take replies directly (write_now).
        self._direct = writes_directly(transport)
        transport.registerProducer(self, True)
        self.setTimeout(self.limits.idle_timeout)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        """Stop timers and tell the factory."""
        self._closing = True
        self.setTimeout(None)
        self.factory.closed(self)

    def timeoutConnection(self) -> None:
        """Drop a client that has been idle (or stuck) too long."""
        log.info("policy client %s idle for %ss: closing", self.peer, self.limits.idle_timeout)
        self._closing = True
        self.transport.abortConnection()

    # --- input ----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Split input into requests, enforcing every bound.

        A complete request is checked in C (:func:`_lines_of`); only bad
        input takes the slow path that finds what is wrong.
        """
        if self._closing:
            return
        self.resetTimeout()
        buffer = self._buffer + data if self._buffer else data
        if buffer.find(b"\r") >= 0:
            buffer = buffer.replace(b"\r\n", b"\n")
        start = 0
        limits = self.limits
        search = _END.search
        try:
            while True:
                found = search(buffer, start)
                if found is None:
                    break
                end = found.start()
                block = buffer[start:end]
                start = end + 2
                if not block or block.startswith(b"\n"):
                    block = block.lstrip(b"\n")
                    if not block:
                        continue
                if (
                    len(block) > limits.max_line
                    or len(block) > limits.max_request
                    or not 0 <= _lines_of(block) < limits.max_attributes
                ):
                    self._diagnose(block + b"\n")
                self._dispatch(block)
                if self._closing:
                    self._ready = []
                    return
            rest = buffer[start:]
            if rest.startswith(b"\n"):
                rest = rest.lstrip(b"\n")  # stray empty lines before a request
            if rest:
                # Check what is complete of the next request now, so garbage
                # is refused at once rather than when an empty line comes.
                cut = rest.rfind(b"\n")
                lines = rest[:cut].lstrip(b"\n") if cut > 0 else b""
                if (
                    len(rest) > limits.max_line
                    or len(rest) > limits.max_request
                    or rest.count(b"\n") >= limits.max_attributes
                    or (lines and not _REQUEST.fullmatch(lines))
                ):
                    self._diagnose(rest[: cut + 1], partial=rest[cut + 1 :])
            self._buffer = rest
        except BadRequest as error:
            if self._ready:
                self._flush()  # requests before the bad one still get their replies
            self._reject(str(error))
        ready = self._ready
        if ready:
            if self._replies or self._read_paused or self._closing:
                self._flush()
            else:
                # _flush, written out for the usual case: every reply decided at once.
                self._ready = []
                write_now(self.transport, ready[0] if len(ready) == 1 else b"".join(ready), self._direct)
                self.factory.idle()

    def _diagnose(self, lines: bytes, partial: bytes = b"") -> None:
        """Find the first broken bound in ``lines`` and raise it as BadRequest."""
        limits = self.limits
        if len(lines) + len(partial) > limits.max_request:
            raise BadRequest(f"request larger than {limits.max_request} bytes")
        if len(partial) > limits.max_line:
            raise BadRequest(f"line longer than {limits.max_line} bytes")
        if lines.count(b"\n") > limits.max_attributes:
            raise BadRequest(f"more than {limits.max_attributes} attributes")
        for line in lines.split(b"\n")[:-1]:
            if len(line) > limits.max_line:
                raise BadRequest(f"line longer than {limits.max_line} bytes")
            name, equals, value = line.partition(b"=")
            if not equals:
                raise BadRequest(f"line without '=': {_shown(line)}")
            if not _NAME.fullmatch(name):
                raise BadRequest(f"bad attribute name: {_shown(name)}")
            if _CONTROL.search(value):
                raise BadRequest(f"control character in {name.decode()}")

    def _reject(self, problem: str) -> None:
        log.warning("bad policy request from %s: %s; closing connection", self.peer, problem)
        if self.factory.on_bad_request is not None:
            self.factory.on_bad_request()
        self._closing = True
        self._buffer = b""
        self.transport.loseConnection()

    def _dispatch(self, block: bytes) -> None:
        # Postfix sends UTF-8 (SMTPUTF8) or plain ASCII; keep any other byte
        # losslessly rather than dropping it.
        request = Request.from_lines(block.decode("utf-8", "surrogateescape"), self.peer, self)
        try:
            decided = self.decide(request)
        except Exception:
            log.exception("policy decision failed for %s", self.peer)
            decided = self.factory.on_failure
        if isinstance(decided, Action):
            if self._replies:
                self._replies.append([decided.line()])
            else:
                self._ready.append(decided.line())
            return
        slot: list[bytes | None] = [None]
        self._replies.append(slot)
        decided.addCallbacks(self._decided, self._failed, callbackArgs=(slot,), errbackArgs=(slot,))
        if len(self._replies) >= self.limits.max_pending and not self._read_paused:
            self._read_paused = True
            self.transport.pauseProducing()

    def _decided(self, action: Action, slot: list[bytes | None]) -> None:
        slot[0] = action.line()
        self._flush()

    def _failed(self, failure: Failure, slot: list[bytes | None]) -> None:
        log.error("policy decision failed for %s: %s", self.peer, failure.getErrorMessage())
        slot[0] = self.factory.on_failure.line()
        self._flush()

    def _flush(self) -> None:
        """Write every reply whose turn has come."""
        out = self._ready
        self._ready = []
        replies = self._replies
        while replies and (reply := replies[0][0]) is not None:
            replies.popleft()
            out.append(reply)
        if out and not self._closing:
            write_now(self.transport, out[0] if len(out) == 1 else b"".join(out), self._direct)
        if self._read_paused and len(replies) < self.limits.max_pending and not self._write_paused:
            self._read_paused = False
            self.transport.resumeProducing()
        if not replies:
            self.factory.idle()

    @property
    def busy(self) -> bool:
        """Whether a request on this connection still waits for its reply."""
        return bool(self._replies)

    # --- IPushProducer: the transport tells us when the client stops reading

    def pauseProducing(self) -> None:
        """The client is not reading its replies: stop reading its requests."""
        self._write_paused = True
        if not self._read_paused:
            self._read_paused = True
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """The client reads again."""
        self._write_paused = False
        if self._read_paused and len(self._replies) < self.limits.max_pending:
            self._read_paused = False
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The connection is going away."""
        self._closing = True


def _shown(data: bytes) -> str:
    return repr(data[:60])[2:-1] + ("..." if len(data) > 60 else "")


class PolicyFactory(ConnectionTracking, Factory):
    """Builds a :class:`PolicyProtocol` per accepted client.

    :param decide: the policy, called once per request.
    :param limits: protocol bounds.
    :param allowed_clients: networks that may connect (unix sockets always may:
        their file permissions guard them).
    :param on_failure: reply when ``decide`` fails unexpectedly.
    :param on_close: told when a connection ends (the session of its requests).
    :param on_bad_request: told of every connection closed for bad input (metrics).
    """

    protocol = PolicyProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        decide: Decide,
        limits: Limits,
        allowed_clients: NetworkSet,
        on_failure: Action = DUNNO,
        on_close: Callable[[object], None] | None = None,
        on_bad_request: Callable[[], None] | None = None,
    ) -> None:
        self.decide = decide
        self.limits = limits
        self.allowed_clients = allowed_clients
        self.on_failure = on_failure
        self.on_close = on_close
        self.on_bad_request = on_bad_request
        self._start_tracking()

    def buildProtocol(self, addr: Any) -> PolicyProtocol | None:  # type: ignore[override]
        """Refuse clients outside ``allowed_clients`` and beyond the connection bound."""
        if isinstance(addr, IPv4Address | IPv6Address) and addr.host not in self.allowed_clients:
            log.warning("policy client %s not in allowed_clients: refused", describe_peer(addr))
            return None
        if len(self.connections) >= self.limits.max_connections:
            log.warning(
                "policy client %s refused: already %d connections (limits.max_connections)",
                describe_peer(addr),
                len(self.connections),
            )
            return None
        protocol = PolicyProtocol(self.decide, self.limits)
        protocol.factory = self
        self.connections.add(protocol)
        return protocol

    def closed(self, protocol: PolicyProtocol) -> None:
        """Forget a connection (and give back its unfinished transaction)."""
        if self.on_close is not None:
            self.on_close(protocol)
        super().closed(protocol)
