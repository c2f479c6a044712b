"""The milter protocol, version 6, as Postfix speaks it (``smtpd_milters``).

Only the wire format and the conversation live here; what to do with a
message is decided by an injected :data:`Filter`, called once per message
at end-of-message with a :class:`MilterMessage`, which answers a
:class:`Verdict` (header changes, recipients to remove, accept, discard or
tempfail).

Wire format (libmilter's ``mfdef.h``): every packet is a 4-byte big-endian
length, then a one-byte command, then ``length - 1`` bytes of data; strings
end with NUL.  The MTA opens with ``SMFIC_OPTNEG`` (protocol version, the
actions it allows, the protocol steps it can skip); :class:`MilterProtocol`
answers with version 6, only the actions it uses (add and change headers,
delete recipients), and asks the MTA to skip the steps it does not need
(HELO, DATA, unknown commands, end of headers) and not to wait for a reply
where it has nothing to say (connect, MAIL, RCPT, each header, each body
chunk): with Postfix, the only reply per message is the verdict.  Then, per
SMTP connection: macros, connect, MAIL, RCPT..., headers, body chunks,
end-of-message; ``SMFIC_ABORT`` ends a message early, ``SMFIC_QUIT`` the
connection, and ``SMFIC_QUIT_NC`` ends the SMTP session but keeps the
socket for the next one.

Bounds, so a broken or hostile MTA connection cannot hurt the others:

- a packet longer than :data:`MAX_PACKET` (Postfix sends body chunks of at
  most 64 KiB), an unknown command, or a command out of place closes that
  connection, with a log line naming the peer; only a header that long is
  read past instead (Postfix sends one when ``header_size_limit`` was raised
  above it), and its message is marked as not kept whole;
- every header is kept, in order, up to :data:`MAX_HEADERS` bytes and
  :data:`MAX_HEADER_COUNT` headers; a message beyond either is marked
  (:attr:`MilterMessage.headers_complete`) and its headers are counted, not
  kept, so the filter knows it cannot judge the header block whole;
- the body is kept in memory up to ``memory_limit`` bytes and in a
  temporary file beyond, up to ``keep_limit`` bytes; past that it is not
  kept (an MTA that waits for a reply to each chunk is asked to skip the
  rest of it when it allows).

When the filter fails or takes longer than ``filter_timeout``, the message
is accepted unchanged (``on_error``), so mail always flows; Postfix's own
``milter_default_action = accept`` covers a milter that is down.
"""

from __future__ import annotations

import logging
import struct
import tempfile
from collections.abc import Callable
from typing import IO, Any

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from policyd.netlists import NetworkSet
from policyd.protocols.connections import ConnectionTracking, describe_peer

log = logging.getLogger("policyd.milter")

#: Protocol version spoken (Postfix 2.6 and later, Sendmail 8.14 and later).
VERSION = 6

# --- commands from the MTA (SMFIC_*) ---
ABORT = b"A"
BODY = b"B"
CONNECT = b"C"
MACRO = b"D"
BODYEOB = b"E"
HELO = b"H"
QUIT_NC = b"K"
HEADER = b"L"
MAIL = b"M"
EOH = b"N"
OPTNEG = b"O"
QUIT = b"Q"
RCPT = b"R"
DATA = b"T"
UNKNOWN = b"U"

# --- replies to the MTA (SMFIR_*) ---
ADDRCPT = b"+"
DELRCPT = b"-"
ACCEPT = b"a"
REPLBODY = b"b"
CONTINUE = b"c"
DISCARD = b"d"
ADDHEADER = b"h"
INSHEADER = b"i"
CHGHEADER = b"m"
PROGRESS = b"p"
REJECT = b"r"
SKIP = b"s"
TEMPFAIL = b"t"
REPLYCODE = b"y"

# --- actions the milter may take (SMFIF_*) ---
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20

# --- protocol steps (SMFIP_*) ---
SMFIP_NOCONNECT = 0x01
SMFIP_NOHELO = 0x02
SMFIP_NOMAIL = 0x04
SMFIP_NORCPT = 0x08
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000

#: The actions we use: add headers (X-Spam-*, a missing Subject), change
#: them (the Subject, remove incoming X-Spam-*), delete recipients (those
#: whose copy goes to the quarantine).
WANTED_ACTIONS = SMFIF_ADDHDRS | SMFIF_CHGHDRS | SMFIF_DELRCPT

#: Steps we ask the MTA to leave out: we never look at them.
SKIPPED_STEPS = SMFIP_NOHELO | SMFIP_NOUNKNOWN | SMFIP_NODATA | SMFIP_NOEOH

#: Steps after which the MTA need not wait for our reply (we always continue).
NO_REPLY_STEPS = (
    SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL | SMFIP_NR_RCPT | SMFIP_NR_HDR
    | SMFIP_NR_DATA | SMFIP_NR_UNKN | SMFIP_NR_EOH
)

#: Longest packet accepted.  Postfix sends body chunks of at most 65,535
#: bytes and headers of at most ``header_size_limit`` (100 KiB by default);
#: anything longer is not an MTA speaking the protocol.
MAX_PACKET = 256 * 1024

#: Header bytes kept per message (names, values and 4 bytes of ``: `` and
#: CRLF each), every header of a message or none beyond: header changes are
#: only right when every header is seen.  Real mail has a few KiB; Postfix
#: bounds each header (``header_size_limit``, 100 KiB) but not their number,
#: so this bound is ours, as Exim's ``header_maxsize`` (1 MiB) is Exim's.
MAX_HEADERS = 1024 * 1024

#: Headers kept per message.  Real mail has a few dozen; Postfix refuses
#: more than ``hopcount_limit`` (50) Received headers but no other kind.
#: Bounds the work of judging one header block (a pass over every header,
#: and Postfix reads the block from the start for each header changed).
MAX_HEADER_COUNT = 10_000

#: Recipients kept per message (Postfix's ``smtpd_recipient_limit`` is 1000).
MAX_RECIPIENTS = 10_000

#: Longest wait for the filter before accepting the message unchanged;
#: below Postfix's ``milter_content_timeout`` (300 s) so Postfix never gives up first.
FILTER_TIMEOUT = 120.0

_HEADER = struct.Struct(">IB")
_MACRO = MACRO[0]
_HEADER_CODE = HEADER[0]
_STAGE_CONNECT = CONNECT[0]
# Each command byte as bytes, made once.
_COMMANDS = [bytes([code]) for code in range(256)]


def packet(command: bytes, data: bytes = b"") -> bytes:
    """One packet on the wire."""
    return struct.pack(">I", len(data) + 1) + command + data


def nul_strings(data: bytes) -> list[bytes]:
    """NUL-terminated strings of a packet (a missing last NUL is tolerated)."""
    if data.endswith(b"\0"):
        data = data[:-1]
    return data.split(b"\0") if data else []


def text(data: bytes) -> str:
    """Protocol bytes as text: UTF-8, other bytes kept losslessly."""
    return data.decode("utf-8", "surrogateescape")


def wire(value: str) -> bytes:
    """Text back to protocol bytes."""
    return value.encode("utf-8", "surrogateescape")


class ProtocolError(Exception):
    """Input that breaks the milter protocol; the connection is closed."""


@attrs.frozen
class Modification:
    """One change to the message, sent before the final reply.

    :ivar action: :data:`ADDHEADER`, :data:`INSHEADER`, :data:`CHGHEADER` or :data:`DELRCPT`.
    :ivar name: the header name, or the recipient for :data:`DELRCPT`.
    :ivar value: the header value (empty with :data:`CHGHEADER`: delete it).
    :ivar index: which occurrence of the header (1-based) for :data:`CHGHEADER`;
        the position for :data:`INSHEADER` (0: first).
    """

    action: bytes
    name: str
    value: str = ""
    index: int = 0

    def encode(self) -> bytes:
        """The reply packet."""
        if self.action == DELRCPT:
            return packet(DELRCPT, wire(self.name) + b"\0")
        body = wire(self.name) + b"\0" + wire(self.value) + b"\0"
        if self.action in (CHGHEADER, INSHEADER):
            body = struct.pack(">I", self.index) + body
        return packet(self.action, body)


def add_header(name: str, value: str) -> Modification:
    """Append a header."""
    return Modification(ADDHEADER, name, value)


def insert_header(name: str, value: str, index: int = 0) -> Modification:
    """Insert a header at ``index`` (0: before every other)."""
    return Modification(INSHEADER, name, value, index)


def change_header(name: str, value: str, index: int = 1) -> Modification:
    """Replace occurrence ``index`` of header ``name``; an empty value deletes it."""
    return Modification(CHGHEADER, name, value, index)


def delete_recipient(recipient: str) -> Modification:
    """Remove an envelope recipient (as the MTA gave it)."""
    return Modification(DELRCPT, recipient)


@attrs.frozen
class Verdict:
    """What to do with a message: changes, then the final reply.

    :ivar modifications: applied in order.
    :ivar reply: :data:`ACCEPT`, :data:`DISCARD`, :data:`TEMPFAIL` or :data:`REJECT`.
    :ivar smtp_reply: with :data:`TEMPFAIL` or :data:`REJECT`, the SMTP reply
        the client gets (``554 5.6.0 text``, sent as ``SMFIR_REPLYCODE``; its
        first digit must agree with ``reply``); empty: the MTA's own words.
    """

    modifications: tuple[Modification, ...] = ()
    reply: bytes = ACCEPT
    smtp_reply: str = ""

    def encode(self, actions: int) -> bytes:
        """The reply packets: the changes that ``actions`` (SMFIF_*) allow, then the final reply."""
        out = []
        for change in self.modifications:
            if change.action in (ADDHEADER, INSHEADER) and not actions & SMFIF_ADDHDRS:
                continue
            if change.action == CHGHEADER and not actions & SMFIF_CHGHDRS:
                continue
            if change.action == DELRCPT and not actions & SMFIF_DELRCPT:
                continue
            out.append(change.encode())
        if self.smtp_reply and self.reply in (TEMPFAIL, REJECT):
            # Postfix reads "%%" as "%" in a reply code text.
            out.append(packet(REPLYCODE, wire(self.smtp_reply.replace("%", "%%")) + b"\0"))
        else:
            out.append(packet(self.reply))
        return b"".join(out)


#: Accept the message unchanged.
ACCEPT_UNCHANGED = Verdict()


class MilterMessage:
    """What the MTA told us of one SMTP connection and its current message.

    :ivar client_name: the client's host name as the MTA knows it.
    :ivar client_address: its IP address (empty for a local or unknown one).
    :ivar helo: the HELO name, when the MTA sent it.
    :ivar sender: the envelope sender as given (``<a@b>``).
    :ivar recipients: the envelope recipients as given (``<c@d>``), the first
        :data:`MAX_RECIPIENTS`.
    :ivar recipient_count: envelope recipients the MTA sent (kept or not).
    :ivar headers: (name, value) of every header, in order, values as the MTA
        sent them; empty beyond the bounds (see :attr:`headers_complete`).
    :ivar header_count: headers the MTA sent (kept or not).
    :ivar header_size: bytes of the headers the MTA sent (kept or not).
    :ivar header_bytes: bytes of the headers kept.
    :ivar macros: every macro received, names without braces (``i``, ``auth_authen``).
    :ivar body_size: body bytes the MTA sent (kept or not).
    :ivar kept: body bytes kept (at most ``keep_limit``).
    """

    def __init__(self, memory_limit: int, keep_limit: int) -> None:
        self.memory_limit = memory_limit
        self.keep_limit = keep_limit
        self.client_name = ""
        self.client_address = ""
        self.helo = ""
        # Macro packets as received, the latest of each stage, in the order
        # they came; read only when a macro is asked for (most never are).
        self._macro_packets: dict[int, bytes] = {}
        self._macros: dict[str, str] | None = None
        # The body: chunks in memory while it fits in memory_limit, else a temporary file.
        self._chunks: list[bytes] = []
        self._spool: IO[bytes] | None = None
        self.new_message()

    def new_message(self) -> None:
        """Forget the message (not the connection)."""
        self.sender = ""
        self.recipients: list[str] = []
        self.recipient_count = 0
        self.headers: list[tuple[str, str]] = []
        self.header_count = 0
        self.header_size = 0
        self.header_bytes = 0
        self._header_unread = False
        self.body_size = 0
        self.kept = 0
        self.close()

    def close(self) -> None:
        """Drop the body (and its temporary file)."""
        self._chunks = []
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    @property
    def spooled(self) -> bool:
        """Whether the body went to a temporary file (it outgrew ``memory_limit``)."""
        return self._spool is not None

    def add_macros(self, data: bytes) -> None:
        """Keep a macro packet (the stage letter, then NUL-terminated names and values)."""
        stage = data[0]
        self._macro_packets.pop(stage, None)
        self._macro_packets[stage] = data
        self._macros = None

    def new_session(self) -> MilterMessage:
        """An empty copy for the next SMTP session, with the connect macros that came before it."""
        fresh = MilterMessage(self.memory_limit, self.keep_limit)
        if _STAGE_CONNECT in self._macro_packets:
            fresh._macro_packets[_STAGE_CONNECT] = self._macro_packets[_STAGE_CONNECT]
        return fresh

    @property
    def macros(self) -> dict[str, str]:
        """Every macro received (names without braces: ``i``, ``auth_authen``); the latest value wins."""
        if self._macros is None:
            self._macros = {}
            for data in self._macro_packets.values():
                values = nul_strings(data[1:])
                for name, value in zip(values[::2], values[1::2], strict=False):
                    self._macros[text(name).strip("{}")] = text(value)
        return self._macros

    @property
    def queue_id(self) -> str:
        """Postfix's queue id (macro ``i``), once known."""
        return self.macros.get("i", "")

    def add_recipient(self, recipient: str) -> None:
        """Count an envelope recipient; keep it within :data:`MAX_RECIPIENTS`."""
        self.recipient_count += 1
        if len(self.recipients) < MAX_RECIPIENTS:
            self.recipients.append(recipient)

    @property
    def recipients_complete(self) -> bool:
        """Whether every envelope recipient was kept."""
        return len(self.recipients) == self.recipient_count

    def add_header(self, name: str, value: str) -> None:
        """Keep a header while the header block is within the bounds; count it in any case.

        A block that outgrows them is dropped whole rather than cut: a
        filter that saw only part of it would change the wrong header (the
        index of a change counts headers of one name from the top) or miss
        one it must change.
        """
        size = len(name) + len(value) + 4
        self.note_header(size)
        if self.headers_complete:
            self.header_bytes += size
            self.headers.append((name, value))

    def note_header(self, size: int, read: bool = True) -> None:
        """Count a header of ``size`` bytes; past the bounds, or once a header was not ``read``, forget them all."""
        self.header_count += 1
        self.header_size += size
        if not read:
            self._header_unread = True
        if self.headers and not self.headers_complete:
            self.headers = []
            self.header_bytes = 0

    @property
    def headers_complete(self) -> bool:
        """Whether :attr:`headers` holds every header the MTA sent (within :data:`MAX_HEADERS` and
        :data:`MAX_HEADER_COUNT`, none too long to read)."""
        return (
            not self._header_unread and self.header_size <= MAX_HEADERS and self.header_count <= MAX_HEADER_COUNT
        )

    def add_body(self, chunk: bytes) -> bool:
        """Keep a body chunk, within ``keep_limit``; False once the limit is reached."""
        self.body_size += len(chunk)
        room = self.keep_limit - self.kept
        if room <= 0:
            return False
        piece = chunk[:room]
        if self._spool is None and self.kept + len(piece) > self.memory_limit:
            self._spool = tempfile.TemporaryFile()
            self._spool.writelines(self._chunks)
            self._chunks = []
        if self._spool is None:
            self._chunks.append(piece)
        else:
            self._spool.write(piece)
        self.kept += len(piece)
        return self.kept < self.keep_limit

    @property
    def complete(self) -> bool:
        """Whether the whole body was kept."""
        return self.kept == self.body_size

    def body(self, limit: int | None = None) -> bytes:
        """The kept body, or its first ``limit`` bytes."""
        if self._spool is not None:
            self._spool.seek(0)
            return self._spool.read(-1 if limit is None else limit)
        if len(self._chunks) > 1:
            self._chunks = [b"".join(self._chunks)]
        data = self._chunks[0] if self._chunks else b""
        return data if limit is None else data[:limit]

    def header_block(self) -> bytes:
        """The headers as a message has them (CRLF line ends), blank line included."""
        lines = []
        for name, value in self.headers:
            folded = value.replace("\r\n", "\n").replace("\n", "\r\n")
            lines.append(f"{name}: {folded}\r\n")
        return wire("".join(lines)) + b"\r\n"

    def raw(self, limit: int | None = None) -> bytes:
        """The message as received: headers, then the (first ``limit`` bytes of the) body."""
        return self.header_block() + self.body(limit)


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
    ) -> None:
        self.filter = filter
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.filter_timeout = filter_timeout
        self.on_error = on_error
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
        self._idle_timer: IDelayedCall | None = None

    # --- connection -----------------------------------------------------------

    def connectionMade(self) -> None:
        """Start the idle timer."""
        self.peer = describe_peer(self.transport.getPeer())
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
                length, command = _HEADER.unpack_from(buffer, start)
                if length > MAX_PACKET and command == _HEADER_CODE and self.version:
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
                if command == _MACRO and self.version:
                    if length == 1:
                        raise ProtocolError("empty macro packet")
                    self.message.add_macros(buffer[start + 5 : end])
                else:
                    self._handle(_COMMANDS[command], buffer[start + 5 : end])
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
            self.transport.write(data)

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
            self.message.add_header(text(name), text(rest.partition(b"\0")[0]))
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

