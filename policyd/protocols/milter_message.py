"""One message as the milter receives it: macros, envelope, every header (bounded), the body (in memory, then spooled)."""

from __future__ import annotations

import logging
import tempfile
from typing import IO

from policyd.protocols.milter import (
    CONNECT_CODE,
    MAX_HEADER_COUNT,
    MAX_HEADERS,
    MAX_RECIPIENTS,
    text,
    wire,
)

log = logging.getLogger("policyd.milter")


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
        if CONNECT_CODE in self._macro_packets:
            fresh._macro_packets[CONNECT_CODE] = self._macro_packets[CONNECT_CODE]
        return fresh

    @property
    def macros(self) -> dict[str, str]:
        """Every macro received (names without braces: ``i``, ``auth_authen``); the latest value wins."""
        if self._macros is None:
            macros: dict[str, str] = {}
            for data in self._macro_packets.values():
                # Decoded whole, then split: a NUL is never inside a UTF-8 sequence, so the strings
                # are those :func:`~policyd.protocols.milter.nul_strings` gives, decoded by one call instead of two per macro.
                strings = data[1:-1] if data.endswith(b"\0") else data[1:]
                if strings:
                    values = text(strings).split("\0")
                    macros.update(zip([name.strip("{}") for name in values[::2]], values[1::2], strict=False))
            self._macros = macros
        return self._macros

    def macro(self, name: str) -> str:
        """One macro's latest value (name without braces), empty when none came: :attr:`macros`' value,
        read from the newest packets first, without decoding the others."""
        if self._macros is not None:
            return self._macros.get(name, "")
        wanted = wire(name)
        for data in reversed(self._macro_packets.values()):
            if wanted not in data:
                # Not named in this packet: not split, not decoded.
                continue
            strings = data[1:-1] if data.endswith(b"\0") else data[1:]
            parts = strings.split(b"\0")
            # The last of a name in a packet wins, as in :attr:`macros`; a name without a value is dropped.
            for index in range(len(parts) - 2 - len(parts) % 2, -1, -2):
                if text(parts[index]).strip("{}") == name:
                    return text(parts[index + 1])
        return ""

    @property
    def queue_id(self) -> str:
        """Postfix's queue id (macro ``i``), once known."""
        return self.macro("i")

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
        if (
            not self._header_unread
            and self.header_size + size <= MAX_HEADERS
            and self.header_count < MAX_HEADER_COUNT
        ):
            # Within the bounds, as nearly every header is: counted and kept without more checks.
            self.header_count += 1
            self.header_size += size
            self.header_bytes += size
            self.headers.append((name, value))
            return
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
