"""The milter protocol, version 6, as Postfix speaks it (``smtpd_milters``): the wire.

This module holds the packets, commands, replies, modifications and bounds;
:mod:`~policyd.protocols.milter_session` the conversation and
:mod:`~policyd.protocols.milter_message` the message.  What to do with a
message is decided by an injected :data:`~policyd.protocols.milter_session.Filter`,
called once per message at end-of-message with a
:class:`~policyd.protocols.milter_message.MilterMessage`, which answers a
:class:`Verdict` (header changes, recipients to remove, accept, discard or
tempfail).

Wire format (libmilter's ``mfdef.h``): every packet is a 4-byte big-endian
length, then a one-byte command, then ``length - 1`` bytes of data; strings
end with NUL.  The MTA opens with ``SMFIC_OPTNEG`` (protocol version, the
actions it allows, the protocol steps it can skip); :class:`~policyd.protocols.milter_session.MilterProtocol`
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
  (:attr:`~policyd.protocols.milter_message.MilterMessage.headers_complete`) and its headers are counted, not
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

import attrs

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

#: Steps we ask the MTA to leave out: we never look at them.  HELO is kept:
#: SPF checks the HELO name (:mod:`policyd.forwarding.authentication`); it needs no reply.
SKIPPED_STEPS = SMFIP_NOUNKNOWN | SMFIP_NODATA | SMFIP_NOEOH

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

#: A packet's head: its length and its command.
PACKET_HEAD = struct.Struct(">IB")
#: Command codes as the packet loop compares them (ints, not bytes).
MACRO_CODE = MACRO[0]
HEADER_CODE = HEADER[0]
CONNECT_CODE = CONNECT[0]
# Each command byte as bytes, made once.
COMMAND_BYTES = [bytes([code]) for code in range(256)]


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
