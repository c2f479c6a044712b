"""The policy protocol in memory: framing, ordering, bounds and sanitising."""

from __future__ import annotations

import logging
import random
import socket

import pytest
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport

from policyd.config import Limits
from policyd.netlists import NetworkSet
from policyd.protocols import policy as protocol
from policyd.protocols.policy import DUNNO, Action, PolicyFactory, PolicyProtocol, Request
from policyd.testing import encode, rcpt


class Recorder:
    """A decide() that records requests and answers from a script."""

    def __init__(self, manual: bool = False) -> None:
        self.requests: list[Request] = []
        self.pending: list[Deferred[Action]] = []
        self.manual = manual

    def __call__(self, request: Request) -> Deferred[Action]:
        self.requests.append(request)
        if self.manual:
            waiting: Deferred[Action] = Deferred()
            self.pending.append(waiting)
            return waiting
        return succeed(Action("OK", request.get("recipient")))


def connect(
    decide: Recorder | None = None, limits: Limits | None = None, peer: object = None
) -> tuple[PolicyProtocol, StringTransport, PolicyFactory, Clock]:
    factory = PolicyFactory(decide or Recorder(), limits or Limits(), NetworkSet(["127.0.0.0/8"]))
    address = peer or IPv4Address("TCP", "127.0.0.1", 40000)
    protocol = factory.buildProtocol(address)
    assert protocol is not None
    clock = Clock()
    protocol.callLater = clock.callLater  # type: ignore[assignment]
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport, factory, clock


def test_one_request_one_reply() -> None:
    """A request ended by an empty line gets action=... and an empty line."""
    decide = Recorder()
    protocol, transport, _, _ = connect(decide)
    protocol.dataReceived(encode(rcpt(recipient="a@b.c")))
    assert transport.value() == b"action=OK a@b.c\n\n"
    assert decide.requests[0].get("protocol_state") == "RCPT"


def test_requests_split_anywhere_are_reassembled() -> None:
    """Bytes arriving one at a time still make one request."""
    protocol, transport, _, _ = connect()
    for byte in encode(rcpt(recipient="x@y.z")):
        protocol.dataReceived(bytes([byte]))
    assert transport.value() == b"action=OK x@y.z\n\n"


def test_pipelined_replies_keep_request_order() -> None:
    """Replies go out in request order even when later ones are decided first."""
    decide = Recorder(manual=True)
    protocol, transport, _, _ = connect(decide)
    protocol.dataReceived(b"".join(encode(rcpt(recipient=f"r{n}@x")) for n in range(3)))
    assert len(decide.pending) == 3
    decide.pending[2].callback(Action("REJECT", "5.7.1 third"))
    decide.pending[1].callback(Action("DEFER", "4.7.1 second"))
    assert transport.value() == b""
    decide.pending[0].callback(DUNNO)
    assert transport.value() == (
        b"action=DUNNO\n\naction=DEFER 4.7.1 second\n\naction=REJECT 5.7.1 third\n\n"
    )


def test_value_may_contain_equals_and_unknown_attributes_are_kept() -> None:
    """Only the first '=' splits; attributes policyd does not know are passed along."""
    decide = Recorder()
    protocol, _, _, _ = connect(decide)
    protocol.dataReceived(b"recipient=a=b@c\nfuture_attribute=1\n\n")
    assert decide.requests[0].get("recipient") == "a=b@c"
    assert decide.requests[0].get("future_attribute") == "1"


def test_crlf_line_ends_are_accepted() -> None:
    """A client that writes CRLF (telnet, scripts) is understood."""
    decide = Recorder()
    protocol, transport, _, _ = connect(decide)
    protocol.dataReceived(b"recipient=a@b\r\n\r\n")
    assert transport.value() == b"action=OK a@b\n\n"


def test_empty_lines_between_requests_are_ignored() -> None:
    """Stray empty lines do not make empty requests."""
    decide = Recorder()
    protocol, _, _, _ = connect(decide)
    protocol.dataReceived(b"\n\n\nrecipient=a@b\n\n\n")
    assert len(decide.requests) == 1


def test_utf8_values_survive() -> None:
    """SMTPUTF8 addresses arrive as text."""
    decide = Recorder()
    protocol, _, _, _ = connect(decide)
    protocol.dataReceived("recipient=élodie@exämple.fr\n\n".encode())
    assert decide.requests[0].get("recipient") == "élodie@exämple.fr"


BAD_INPUT = {
    "line without =": b"recipient\n\n",
    "binary garbage": bytes(range(256)) * 4,
    "nul byte": b"recipient=a\x00b\n\n",
    "escape character": b"sender=a\x1b[2Jb\n\n",
    "bad name": b"reci pient=x\n\n",
    "endless line": b"recipient=" + b"x" * 9000,
    "long line": b"recipient=" + b"x" * 9000 + b"\n\n",
}


@pytest.mark.parametrize("data", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_closes_that_connection_and_is_logged(data: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """Malformed input is logged with the peer and the connection is closed, with no reply."""
    decide = Recorder()
    protocol, transport, _, _ = connect(decide)
    with caplog.at_level(logging.WARNING, "policyd.protocol"):
        protocol.dataReceived(data)
    assert transport.disconnecting
    assert decide.requests == []
    assert transport.value() == b""
    assert "bad policy request from 127.0.0.1:40000" in caplog.text
    protocol.dataReceived(encode(rcpt()))
    assert decide.requests == []


def test_garbage_is_refused_before_the_request_ends() -> None:
    """A broken line is refused as soon as it is complete, without waiting for the empty line."""
    protocol, transport, _, _ = connect()
    protocol.dataReceived(b"request=smtpd_access_policy\nGET / HTTP/1.0\nHost: x")
    assert transport.disconnecting


def test_too_many_attributes() -> None:
    """More than limits.max_attributes attributes closes the connection."""
    protocol, transport, _, _ = connect(limits=Limits(max_attributes=8))
    protocol.dataReceived(b"".join(b"a%d=1\n" % n for n in range(9)))
    assert transport.disconnecting


def test_request_too_large() -> None:
    """A request over limits.max_request bytes closes the connection before it ends."""
    protocol, transport, _, _ = connect(limits=Limits(max_request=2048))
    protocol.dataReceived(b"".join(b"a%d=%s\n" % (n, b"x" * 100) for n in range(30)))
    assert transport.disconnecting


def test_good_requests_before_bad_input_are_answered() -> None:
    """Requests completed before the garbage still get their replies."""
    protocol, transport, _, _ = connect()
    protocol.dataReceived(encode(rcpt(recipient="ok@x")) + b"garbage\n\n")
    assert transport.value() == b"action=OK ok@x\n\n"
    assert transport.disconnecting


def test_reply_text_cannot_inject_lines() -> None:
    """CR, LF, NEL and Unicode separators from a request never split the reply."""
    action = Action("REJECT", "5.7.1 blocked a\r\nb\x85c\u2028d\nQUIT\x00")
    line = action.line()
    assert line.count(b"\n") == 2 and line.endswith(b"\n\n")
    assert b"\r" not in line and b"\x00" not in line


def test_idle_connection_is_closed() -> None:
    """A client silent for limits.idle_timeout is dropped."""
    protocol, transport, _, clock = connect(limits=Limits(idle_timeout=600))  # type: ignore[arg-type]
    clock.advance(599)
    assert not transport.disconnecting
    protocol.dataReceived(encode(rcpt()))
    clock.advance(599)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnected or transport.disconnecting


def test_reading_pauses_while_too_many_requests_wait() -> None:
    """After max_pending undecided requests, reading pauses until replies go out."""
    decide = Recorder(manual=True)
    protocol, transport, _, _ = connect(decide, limits=Limits(max_pending=2))
    protocol.dataReceived(encode(rcpt()) * 2)
    assert transport.producerState == "paused"
    decide.pending[0].callback(DUNNO)
    assert transport.producerState == "producing"


def test_a_client_that_does_not_read_stops_being_read() -> None:
    """When the transport's buffer is full, reading pauses until it drains."""
    protocol, transport, _, _ = connect()
    protocol.pauseProducing()
    assert transport.producerState == "paused"
    protocol.resumeProducing()
    assert transport.producerState == "producing"


def test_failed_decision_gets_the_failure_reply() -> None:
    """An unexpected error in decide() still answers, with the factory's on_failure action."""
    decide = Recorder(manual=True)
    protocol, transport, factory, _ = connect(decide)
    factory.on_failure = Action("DEFER_IF_PERMIT", "4.3.0 try later")
    protocol.dataReceived(encode(rcpt()))
    decide.pending[0].errback(RuntimeError("boom"))
    assert transport.value() == b"action=DEFER_IF_PERMIT 4.3.0 try later\n\n"


def test_clients_outside_allowed_clients_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    """buildProtocol refuses addresses outside allowed_clients; unix sockets are allowed."""
    factory = PolicyFactory(Recorder(), Limits(), NetworkSet(["127.0.0.0/8", "::1/128"]))
    with caplog.at_level(logging.WARNING):
        assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 5000)) is None
    assert "192.0.2.1:5000 not in allowed_clients" in caplog.text
    assert factory.buildProtocol(IPv6Address("TCP", "::1", 5000)) is not None
    assert factory.buildProtocol(IPv6Address("TCP", "2001:db8::1", 5000)) is None
    assert factory.buildProtocol(UNIXAddress("/run/policyd.sock")) is not None


def test_connection_limit() -> None:
    """Beyond limits.max_connections, new clients are refused."""
    factory = PolicyFactory(Recorder(), Limits(max_connections=2), NetworkSet(["127.0.0.0/8"]))
    address = IPv4Address("TCP", "127.0.0.1", 1)
    first = factory.buildProtocol(address)
    assert first is not None
    first.makeConnection(StringTransport())
    second = factory.buildProtocol(address)
    assert second is not None
    second.makeConnection(StringTransport())
    assert factory.buildProtocol(address) is None
    first.connectionLost()
    assert factory.buildProtocol(address) is not None


def test_drained_waits_for_requests_in_flight() -> None:
    """drained() fires only once every received request is answered."""
    decide = Recorder(manual=True)
    protocol, _, factory, _ = connect(decide)
    protocol.dataReceived(encode(rcpt()))
    done = factory.drained()
    assert not done.called
    decide.pending[0].callback(DUNNO)
    assert done.called


def test_large_request_after_an_empty_line_split_across_reads() -> None:
    """A request over max_line bytes after a stray empty line is accepted however it is split."""
    decide = Recorder()
    protocol, transport, _, _ = connect(decide)
    big = encode(rcpt(recipient="x@y.z", ccert_subject="s" * 4000, ccert_issuer="i" * 4000, stress="t" * 2000))
    protocol.dataReceived(b"\n" + big[:9000])
    protocol.dataReceived(big[9000:])
    assert not transport.disconnecting
    assert transport.value() == b"action=OK x@y.z\n\n"


def test_attributes_are_found_by_whole_name() -> None:
    """A request read off the wire finds each attribute by its whole name; the last of a repeated name wins."""
    text = "reverse_client_name=rev.example\nclient_name=host.example\nsender=a=b@c\nname=x\nname=y\nempty="
    request = Request.from_lines(text)
    assert request.get("client_name") == "host.example"
    assert request.get("reverse_client_name") == "rev.example"
    assert request.get("sender") == "a=b@c"
    assert request.get("name") == "y"
    assert request.get("empty", "default") == ""
    assert request.get("recipient") == ""
    assert request.get("recipient", "none") == "none"
    assert request.get("e") == ""  # a suffix of another name is not that name
    assert request.attributes == {
        "reverse_client_name": "rev.example", "client_name": "host.example", "sender": "a=b@c", "name": "y", "empty": "",
    }


class SocketTransport(FileDescriptor):
    """A Twisted transport over one end of a socket pair, driven by a memory reactor."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(MemoryReactor())
        self.socket = sock
        self.connected = True

    def writeSomeData(self, data: bytes) -> int:
        return self.socket.send(data)

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 40000)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 10040)


def test_replies_go_straight_to_the_socket_and_the_rest_waits_in_the_transport() -> None:
    """A reply that fits is in the socket at once; what does not fit waits in the transport, in order."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    try:
        protocol = PolicyFactory(Recorder(), Limits(max_pending=100_000), NetworkSet([])).buildProtocol(
            UNIXAddress(None)
        )
        assert protocol is not None
        transport = SocketTransport(ours)
        protocol.makeConnection(transport)
        protocol.dataReceived(encode(rcpt(recipient="first@x")))
        assert theirs.recv(100) == b"action=OK first@x\n\n"
        assert not transport.dataBuffer and not transport._tempDataBuffer
        # Fill the socket: later replies queue in the transport, never overtaking.
        many = b"".join(encode(rcpt(recipient=f"r{n}@x")) for n in range(20_000))
        protocol.dataReceived(many)
        queued = len(transport.dataBuffer) + sum(map(len, transport._tempDataBuffer))
        assert queued > 0
        received = b""
        while True:
            try:
                chunk = theirs.recv(1 << 20)
            except BlockingIOError:
                break
            received += chunk
        transport.doWrite()
        while True:
            try:
                received += theirs.recv(1 << 20)
            except BlockingIOError:
                break
        replies = received.split(b"\n\n")[:-1]
        assert replies[0] == b"action=OK r0@x"
        assert replies == [f"action=OK r{n}@x".encode() for n in range(len(replies))]
    finally:
        ours.close()
        theirs.close()


def test_the_request_pattern_accepts_what_a_line_by_line_check_accepts() -> None:
    """The one regular expression that checks a request agrees with the plain reading of the rules."""

    name_bytes = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"

    def plain(block: bytes) -> bool:
        for line in block.split(b"\n"):
            name, equals, value = line.partition(b"=")
            if not equals or not name or any(c not in name_bytes for c in name):
                return False
            if any(c < 9 or 10 <= c < 32 or c == 127 for c in value):
                return False
        return True

    pick = random.Random(11)
    pieces = [b"a", b"Z9", b"_", b".", b"-", b"=", b"==", b"\n", b"\t", b" ", b"\x00", b"\x7f", b"\x1b", b"\xc3\xa9"]
    for _ in range(20_000):
        block = b"".join(pick.choice(pieces) for _ in range(pick.randint(1, 12)))
        assert bool(protocol._REQUEST.fullmatch(block)) == plain(block), block


def test_the_request_check_in_c_agrees_with_the_regular_expression() -> None:
    """_lines_of answers as _REQUEST.fullmatch for every request shape: Postfix's own,
    every byte in a name and in a value, and random runs of the bytes that matter."""

    def agree(block: bytes) -> None:
        expected = protocol._REQUEST.fullmatch(block) is not None
        assert protocol._lines_of(block) == (block.count(b"\n") if expected else -1), block

    agree(encode(rcpt(sasl_username="alice", recipient="bob@example.net"))[:-2])
    for byte in range(256):
        one = bytes([byte])
        for block in (one + b"=v", b"n=" + one, b"a=b\n" + one + b"=v", b"a=b\nn=" + one, b"a" + one + b"b=c"):
            if not block.endswith(b"\n") and b"\n\n" not in block:
                agree(block)
    rng = random.Random(8)
    alphabet = b"aZ9_.-=\n\t\x00\x08\x0b\x1f\x7f\r :@\xc3\xa9"
    for _ in range(20_000):
        block = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))
        if block.strip(b"\n") == block and b"\n\n" not in block:
            agree(block)
