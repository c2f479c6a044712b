"""One MTA's milter conversation: negotiation, packets in order, the filter's verdict at end of message.

The wire format, the bounds and the replies are described in
:mod:`policyd.protocols.milter`; the message in :mod:`policyd.protocols.milter_message`.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from policyd.netlists import NetworkSet
from policyd.protocols.connections import ConnectionTracking, describe_peer
from policyd.protocols.milter import (
    ABORT,
    ACCEPT,
    BODY,
    BODYEOB,
    COMMAND_BYTES,
    CONNECT,
    CONTINUE,
    DATA,
    EOH,
    FILTER_TIMEOUT,
    HEADER,
    HEADER_CODE,
    HELO,
    MACRO_CODE,
    MAIL,
    MAX_PACKET,
    NO_REPLY_STEPS,
    OPTNEG,
    PACKET_HEAD,
    QUIT,
    QUIT_NC,
    RCPT,
    SKIP,
    SKIPPED_STEPS,
    SMFIP_NOHELO,
    SMFIP_NR_BODY,
    SMFIP_NR_CONN,
    SMFIP_NR_DATA,
    SMFIP_NR_EOH,
    SMFIP_NR_HDR,
    SMFIP_NR_HELO,
    SMFIP_NR_MAIL,
    SMFIP_NR_RCPT,
    SMFIP_NR_UNKN,
    SMFIP_SKIP,
    UNKNOWN,
    VERSION,
    WANTED_ACTIONS,
    ProtocolError,
    Verdict,
    nul_strings,
    packet,
    text,
)
from policyd.protocols.milter_message import MilterMessage
from policyd.reactor import write_now, writes_directly

log = logging.getLogger("policyd.milter")


Filter = Callable[[MilterMessage], "Deferred[Verdict]"]


class MilterProtocol(Protocol):
    """One MTA connection (one Postfix ``smtpd`` process talking to us).

    :param filter: called at end-of-message; fires with the verdict.
    :param clock: for the idle and filter timeouts.
    :param memory_limit: body bytes kept in memory (beyond: a temporary file).
    :param keep_limit: body bytes kept at all.
    :param idle_timeout: a connection silent this long is closed.
    :param filter_timeout: longest wait for the filter.
    :param on_error: the reply when the filter fails (:data:`ACCEPT` or :data:`TEMPFAIL`).
    :param needs_helo: ask the MTA for the HELO step (only SPF reads it; without
        it Postfix sends two packets fewer per SMTP session).
    """

    factory: MilterFactory | None = None
    transport: Any

    def __init__(
        self,
        filter: Filter,
        clock: IReactorTime,
        memory_limit: int = 1024 * 1024,
        keep_limit: int = 32 * 1024 * 1024,
        idle_timeout: float = 600.0,
        filter_timeout: float = FILTER_TIMEOUT,
        on_error: bytes = ACCEPT,
        needs_helo: bool = True,
    ) -> None:
        self.filter = filter
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.filter_timeout = filter_timeout
        self.on_error = on_error
        self.needs_helo = needs_helo
        self.peer = "?"
        self.version = 0
        self.actions = 0
        self.steps = 0
        self.message = MilterMessage(memory_limit, keep_limit)
        self._buffer = b""
        self._start = 0
        # Bytes still to read past of a header longer than MAX_PACKET.
        self._passing = 0
        self._busy = False
        self._closing = False
        self._processing = False
        self._heard = 0.0
        self._direct = False
        self._idle_timer: IDelayedCall | None = None

    # --- connection -----------------------------------------------------------

    def connectionMade(self) -> None:
        """Start the idle timer."""
        self.peer = describe_peer(self.transport.getPeer())
        # A plain TCP or unix socket of Twisted's can take replies directly (write_now).
        self._direct = writes_directly(self.transport)
        self._heard = self.clock.seconds()
        self._idle_timer = self.clock.callLater(self.idle_timeout, self._check_idle)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        """Forget everything (a message cut off mid-way is simply dropped)."""
        self._closing = True
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None
        self.message.close()
        if self.factory is not None:
            self.factory.closed(self)

    def _check_idle(self) -> None:
        # Input only notes the time; the timer looks when it fires, and waits
        # again for the rest if something came meanwhile.  Moving the timer
        # at every read cost more than reading the packet.
        silent = self.clock.seconds() - self._heard
        if silent < self.idle_timeout:
            self._idle_timer = self.clock.callLater(self.idle_timeout - silent, self._check_idle)
            return
        self._idle_timer = None
        self.timeoutConnection()

    def timeoutConnection(self) -> None:
        """Drop an MTA connection that went silent."""
        log.info("milter client %s idle for %ss: closing", self.peer, self.idle_timeout)
        self._closing = True
        self.transport.abortConnection()

    # --- input ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Split packets and handle them in order (waiting while the filter works)."""
        if self._closing:
            return
        self._heard = self.clock.seconds()
        self._buffer += data
        self._process()

    def _process(self) -> None:
        # A filter that answers at once ends in _finish, which calls this
        # again: that call returns at once and the loop below goes on (no
        # recursion, however many messages one read holds).  The read
        # position lives on self, and every packet is consumed before it is
        # handled.
        if self._processing:
            return
        self._processing = True
        try:
            self._take_packets()
        finally:
            self._processing = False

    def _take_packets(self) -> None:
        # Handling a packet never adds to the buffer; only _fail empties it,
        # and that also closes.  Macro packets, half of all, are kept here.
        buffer = self._buffer
        size = len(buffer)
        start = self._start
        try:
            while not self._busy and not self._closing:
                if self._passing:
                    start = self._pass_header(size - start)
                    if self._passing:
                        break
                    continue
                if size - start < 5:
                    break
                length, command = PACKET_HEAD.unpack_from(buffer, start)
                if length > MAX_PACKET and command == HEADER_CODE and self.version:
                    # Postfix sends a header as long as its header_size_limit
                    # allows.  Closing would let the message through unjudged
                    # (milter_default_action); it is read past instead, and
                    # its message can no longer be kept whole.
                    self.message.note_header(length + 1, read=False)
                    self._passing = length - 1
                    start = self._start = start + 5
                    continue
                if length < 1 or length > MAX_PACKET:
                    raise ProtocolError(f"packet of {length} bytes (at most {MAX_PACKET})")
                end = start + 4 + length
                if size < end:
                    break
                self._start = end
                if command == MACRO_CODE and self.version:
                    if length == 1:
                        raise ProtocolError("empty macro packet")
                    self.message.add_macros(buffer[start + 5 : end])
                else:
                    self._handle(COMMAND_BYTES[command], buffer[start + 5 : end])
                start = end
            if self._closing:
                return
            if not self._busy and not self._passing and len(self._buffer) - self._start == 4:
                # A length alone: refused at once when no packet can have it
                # (a longer one may still be a header, known from its next byte).
                (length,) = struct.unpack_from(">I", self._buffer, self._start)
                if length < 1:
                    raise ProtocolError(f"packet of {length} bytes (at most {MAX_PACKET})")
            if self._busy and len(self._buffer) - self._start > 2 * MAX_PACKET:
                raise ProtocolError("MTA sent too much while its message was being scored")
        except ProtocolError as error:
            self._fail(str(error))
            return
        if self._start:
            self._buffer = self._buffer[self._start :]
            self._start = 0

    def _pass_header(self, available: int) -> int:
        """Read past up to ``available`` bytes of an overlong header; the new read position."""
        passed = min(self._passing, available)
        self._passing -= passed
        self._start += passed
        if not self._passing:
            self._reply(SMFIP_NR_HDR)
        return self._start

    def _fail(self, problem: str) -> None:
        log.warning("bad milter input from %s: %s; closing connection", self.peer, problem)
        self._closing = True
        self._buffer = b""
        self._start = 0
        self.message.close()
        self.transport.loseConnection()

    def _send(self, data: bytes) -> None:
        if not self._closing:
            write_now(self.transport, data, self._direct)

    def _reply(self, flag: int, reply: bytes = CONTINUE) -> None:
        """Answer a step unless the MTA agreed not to wait for it."""
        if not self.steps & flag:
            self._send(packet(reply))

    def _handle(self, command: bytes, data: bytes) -> None:
        # The commands of every message first: headers, body (macros are taken before).
        if command == HEADER and self.version:
            if not data or data == b"\0":
                raise ProtocolError("header packet without a name")
            name, _, rest = data.partition(b"\0")
            self.message.add_header(
                name.decode("utf-8", "surrogateescape"), rest.partition(b"\0")[0].decode("utf-8", "surrogateescape")
            )
            self._reply(SMFIP_NR_HDR)
        elif command == BODY and self.version:
            wants_more = self.message.add_body(data)
            if not self.steps & SMFIP_NR_BODY:
                skip = not wants_more and self.steps & SMFIP_SKIP
                self._send(packet(SKIP if skip else CONTINUE))
        elif command == OPTNEG:
            self._negotiate(data)
        elif not self.version:
            raise ProtocolError(f"command {command!r} before option negotiation")
        elif command == CONNECT:
            self._connect(data)
            self._reply(SMFIP_NR_CONN)
        elif command == HELO:
            strings = nul_strings(data)
            self.message.helo = text(strings[0]) if strings else ""
            self._reply(SMFIP_NR_HELO)
        elif command == MAIL:
            self.message.new_message()
            strings = nul_strings(data)
            self.message.sender = text(strings[0]) if strings else ""
            self._reply(SMFIP_NR_MAIL)
        elif command == RCPT:
            strings = nul_strings(data)
            if strings:
                self.message.add_recipient(text(strings[0]))
            self._reply(SMFIP_NR_RCPT)
        elif command == DATA:
            self._reply(SMFIP_NR_DATA)
        elif command == EOH:
            self._reply(SMFIP_NR_EOH)
        elif command == BODYEOB:
            if data:
                self.message.add_body(data)
            self._end_of_message()
        elif command == ABORT:
            self.message.new_message()
        elif command == UNKNOWN:
            self._reply(SMFIP_NR_UNKN)
        elif command == QUIT:
            self._closing = True
            self.message.close()
            self.transport.loseConnection()
        elif command == QUIT_NC:
            # The MTA keeps this socket for its next SMTP session.
            self.message.close()
            self.message = MilterMessage(self.message.memory_limit, self.message.keep_limit)
        else:
            raise ProtocolError(f"unknown command {command!r}")

    def _negotiate(self, data: bytes) -> None:
        if len(data) < 12:
            raise ProtocolError("option negotiation shorter than 12 bytes")
        version, actions, steps = struct.unpack(">III", data[:12])
        if version < 2:
            raise ProtocolError(f"MTA speaks milter protocol version {version} (2 or later needed)")
        self.version = min(version, VERSION)
        self.actions = actions & WANTED_ACTIONS
        missing = WANTED_ACTIONS & ~actions
        if missing:
            log.warning(
                "milter client %s does not allow actions 0x%x: spam cannot be fully tagged or quarantined",
                self.peer,
                missing,
            )
        # No reply to body chunks: a reply per chunk is a round trip per
        # message.  Only an MTA that cannot do without them gets one, with
        # SKIP once the body is past keep_limit.
        wanted = SKIPPED_STEPS | NO_REPLY_STEPS | SMFIP_NR_BODY
        if not steps & SMFIP_NR_BODY:
            wanted |= SMFIP_SKIP
        if not self.needs_helo:
            wanted |= SMFIP_NOHELO
        self.steps = steps & wanted
        self._send(packet(OPTNEG, struct.pack(">III", self.version, self.actions, self.steps)))

    def _connect(self, data: bytes) -> None:
        self.message.close()
        self.message = self.message.new_session()
        end = data.find(b"\0")
        if end < 0:
            raise ProtocolError("connect packet without a host name")
        self.message.client_name = text(data[:end])
        rest = data[end + 1 :]
        if rest[:1] in (b"4", b"6") and len(rest) >= 3:
            self.message.client_address = text(nul_strings(rest[3:])[0]) if rest[3:] else ""

    def _end_of_message(self) -> None:
        self._busy = True
        decided = maybeDeferred(self.filter, self.message)
        if decided.called and not decided.paused and isinstance(decided.result, Verdict):
            # Most mail is decided at once: the verdict is taken as it is,
            # without a callback chain run for it.
            self._decided(decided.result)
            return
        if not decided.called:
            decided.addTimeout(self.filter_timeout, self.clock)
        decided.addCallbacks(self._decided, self._failed)

    def _decided(self, verdict: Verdict) -> None:
        self._finish(verdict.encode(self.actions))

    def _failed(self, failure: Failure) -> None:
        log.error(
            "scoring a message from %s failed (%s): answered %s",
            self.peer,
            failure.getErrorMessage() or failure.type.__name__,
            "accept" if self.on_error == ACCEPT else "tempfail",
        )
        self._finish(packet(self.on_error))

    def _finish(self, reply: bytes) -> None:
        self._send(reply)
        self.message.new_message()
        self._busy = False
        if self.factory is not None:
            self.factory.idle()
        if not self._closing and self._buffer:
            self._process()

    @property
    def busy(self) -> bool:
        """Whether a message is being scored."""
        return self._busy


class MilterFactory(ConnectionTracking, Factory):
    """Builds a :class:`MilterProtocol` per MTA connection.

    :param filter: the message filter.
    :param clock: the reactor.
    :param allowed_clients: networks that may connect (unix sockets always may).
    :param max_connections: connections at once (one per Postfix smtpd process).
    :param options: the rest of :class:`MilterProtocol`'s keyword arguments.
    """

    noisy = False

    def __init__(
        self,
        filter: Filter,
        clock: IReactorTime,
        allowed_clients: NetworkSet | None = None,
        max_connections: int = 1000,
        **options: Any,
    ) -> None:
        self.filter = filter
        self.clock = clock
        self.allowed_clients = allowed_clients
        self.max_connections = max_connections
        self.options = options
        self._start_tracking()

    def buildProtocol(self, addr: Any) -> MilterProtocol | None:  # type: ignore[override]
        """Refuse clients outside ``allowed_clients`` and beyond the connection bound."""
        if (
            self.allowed_clients is not None
            and isinstance(addr, IPv4Address | IPv6Address)
            and addr.host not in self.allowed_clients
        ):
            log.warning("milter client %s not in allowed_clients: refused", describe_peer(addr))
            return None
        if len(self.connections) >= self.max_connections:
            log.warning("milter client %s refused: already %d connections", describe_peer(addr), len(self.connections))
            return None
        protocol = MilterProtocol(self.filter, self.clock, **self.options)
        protocol.factory = self
        self.connections.add(protocol)
        return protocol
