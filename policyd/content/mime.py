"""The MIME parts of a message, read directly: the common structures without the :mod:`email` parser.

The :mod:`email` package parses a multipart message line by line, in
Python, and compiles a regular expression for each boundary: on mail with
parts, that was most of the time spent scoring.  :func:`walk` splits a
body on its boundary with ``bytes.find`` instead, and reads each part's
few header fields itself, giving the parts in the order
:meth:`email.message.Message.walk` gives them, with the same content
types, parameters and decoded payloads (the tests compare the two on
every message of the evaluation corpus).  A body whose boundary is
missing, or never found, is left to the :mod:`email` package
(:func:`walk` returns None).
"""

from __future__ import annotations

import binascii
import importlib
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import email.message

#: Header lines of a part read (a forwarded message's fields come as a part's too); the rest is body.
MAX_PART_LINES = 1000

# A header field's name (printable ASCII but the colon), then its colon.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:[ \t]?")
# A parameter of a structured header: name=value or name="quoted value".
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
_UU = ("x-uuencode", "uuencode", "uue", "x-uue")
# The base64 decoding get_payload uses (padding errors forgiven), from a module without type stubs.
_decode_b: Callable[[bytes], tuple[bytes, Any]] = importlib.import_module("email._encoded_words").decode_b


class Part:
    """One MIME part: its header fields (the first of each name, lower-cased) and its raw body.

    :ivar fields: header fields, name lower-cased, value as received.
    :ivar body: the body as received (still transfer-encoded); None for the top of a parsed email.
    :ivar ctype: the content type, lower-cased (``text/plain`` when missing or malformed).
    :ivar container: whether the part holds other parts (``multipart/*``, ``message/rfc822``).
    """

    __slots__ = ("body", "container", "ctype", "fields", "message")

    def __init__(self, fields: dict[str, str], body: bytes, default: str = "text/plain",
                 message: email.message.Message | None = None) -> None:
        self.fields = fields
        self.body = body
        self.message = message
        value = fields.get("content-type")
        ctype = default if value is None else value.split(";", 1)[0].strip().lower()
        self.ctype = ctype if ctype.count("/") == 1 else "text/plain"
        self.container = self.ctype.startswith(("multipart/", "message/"))

    def param(self, name: str, field: str = "content-type") -> str | None:
        """A parameter of a header field (``charset``, ``filename``), unquoted, or None."""
        value = self.fields.get(field)
        if value is None or name not in value.lower():
            return None
        for key, found in _PARAM.findall(value):
            if key.lower() == name:
                found = found.strip()
                if len(found) > 1 and found[0] == found[-1] == '"':
                    found = found[1:-1].replace('\\\\', '\\').replace('\\"', '"')
                return found
        return None

    def filename(self) -> str | None:
        """``get_filename()``: the ``filename`` of Content-Disposition, else the ``name`` of Content-Type."""
        if self.message is not None or "*" in self.fields.get("content-disposition", "") + self.fields.get(
                "content-type", ""):
            # RFC 2231 continuations and charsets (rare): the email package knows them.
            return self._email().get_filename()
        found = self.param("filename", "content-disposition")
        if found is None:
            found = self.param("name")
        return None if found is None else found.strip()

    def charset(self) -> str | None:
        """``get_content_charset()``: the charset parameter, lower-cased (None when not ASCII)."""
        if self.message is not None or "*" in self.fields.get("content-type", ""):
            return self._email().get_content_charset()
        found = self.param("charset")
        if found is None or not found.isascii():
            return None
        return found.lower()

    def payload(self, limit: int | None = None) -> bytes:
        """The body without its transfer encoding, as ``get_payload(decode=True)`` gives it.

        :param limit: only the first ``limit`` bytes are needed: a large
            quoted-printable or base64 body is decoded from its start, whole
            lines only, until they give that much (more may come back);
            decoding all of a 1 MB part took milliseconds, the cost of ten
            messages.  Well-formed encodings give the same bytes as decoding
            it all; damaged base64 may decode where decoding it all would not.
        """
        if self.message is not None:
            data = self.message.get_payload(decode=True)
            return data if isinstance(data, bytes) else b""
        encoding = self.fields.get("content-transfer-encoding", "").lower()
        body = self.body
        if encoding == "quoted-printable":
            # At most 3 encoded bytes a byte, and a soft line break per line: 4 give one, but for odd mail.
            if limit is not None and (cut := body.find(b"\n", 4 * limit)) >= 0:
                start = binascii.a2b_qp(body[: cut + 1])
                if len(start) >= limit:
                    return start
            return binascii.a2b_qp(body)
        if encoding == "base64":
            # 4 encoded bytes give 3 (line ends aside): twice the limit gives half as much again.
            if limit is not None and (cut := body.find(b"\n", 2 * limit)) >= 0:
                joined = b"".join(body[:cut].splitlines())
                try:
                    # Whole groups of 4 only: the last group of a cut could be read otherwise than in the whole.
                    start = binascii.a2b_base64(joined[: len(joined) // 4 * 4])
                except binascii.Error:
                    start = b""
                if len(start) >= limit + 3:
                    return start
            return bytes(_decode_b(b"".join(body.splitlines()))[0])
        if encoding in _UU:
            return self._email().get_payload(decode=True) or b""  # type: ignore[return-value]
        return body

    def _email(self) -> email.message.Message:
        """This part as an email message, for what only the email package reads."""
        if self.message is None:
            import email.message  # rarely needed: not imported with policyd score

            message = email.message.Message()
            for name, value in self.fields.items():
                message[name] = value
            message.set_payload(self.body.decode("ascii", "surrogateescape"))
            self.message = message
        return self.message


def part_fields(block: bytes) -> tuple[dict[str, str], bytes]:
    """The header fields of a part (first of each name, lower-cased) and its body.

    Like the email parser: the fields end at the first empty line, or at a
    line that is not a field (which starts the body); a part that starts
    with an empty line has none.
    """
    fields: dict[str, str] = {}
    position = 0
    size = len(block)
    last = ""
    for _ in range(MAX_PART_LINES):
        if position >= size:
            break
        newline = block.find(b"\n", position)
        end = size if newline < 0 else newline
        line = block[position:end]
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            position = end + 1
            break
        if line[0] in b" \t":
            if last:
                fields[last] += "\n" + line.decode("ascii", "surrogateescape")
        else:
            field = _FIELD.match(line)
            if field is None:
                break
            name = field.group(1).decode("ascii").lower()
            if name in fields:
                last = ""
            else:
                last = name
                fields[name] = line[field.end():].decode("ascii", "surrogateescape").rstrip()
        position = end + 1
    return fields, block[position:]


def _split(body: bytes, boundary: bytes, limit: int) -> list[bytes] | None:
    """The parts between the delimiter lines of ``boundary`` (None when there is none).

    A delimiter is a line of ``--boundary``, maybe ``--`` after it (the
    last), maybe blanks; the line end before it belongs to it.
    """
    delimiter = b"--" + boundary
    text = b"\n" + body
    found: list[tuple[int, int, bool]] = []  # (line start, after the line, closing)
    position = 0
    while len(found) <= limit:
        start = text.find(b"\n" + delimiter, position)
        if start < 0:
            break
        after = start + 1 + len(delimiter)
        newline = text.find(b"\n", after)
        end = len(text) if newline < 0 else newline
        rest = text[after:end].rstrip(b"\r")
        closing = rest.startswith(b"--")
        if (rest[2:] if closing else rest).strip(b" \t"):
            position = after  # a longer boundary, or text after it: not a delimiter
            continue
        found.append((start, end + 1, closing))
        if closing:
            break
        position = end
    if not found:
        return None
    parts = []
    for (_, after, closing), (start, _, _) in zip(found, [*found[1:], (len(text), 0, True)], strict=True):
        if closing:
            break
        piece = text[after:start] if after <= start else b""
        if start < len(text) and piece.endswith(b"\r"):
            piece = piece[:-1]  # the \r of the line end before the delimiter
        parts.append(piece)
    return parts


def walk(fields: dict[str, str], body: bytes, limit: int) -> list[Part] | None:
    """The parts of a message whose top-level fields are ``fields``, as ``Message.walk()`` orders them.

    At most ``limit + 1`` parts are given.  None: a structure left to the
    email package (a multipart body without its boundary).
    """
    found: list[Part] = []
    pending = [Part(fields, body)]
    while pending and len(found) <= limit:
        part = pending.pop()
        found.append(part)
        if not part.container:
            continue
        if part.ctype.startswith("message/") and part.ctype != "message/rfc822":
            return None  # delivery reports and the like: parsed by the email package
        if part.ctype == "message/rfc822":
            inner, inner_body = part_fields(part.body)
            pending.append(Part(inner, inner_body))
            continue
        boundary = part.param("boundary")
        if not boundary:
            return None
        pieces = _split(part.body, boundary.encode("utf-8", "surrogateescape"), limit)
        if pieces is None:
            return None
        default = "message/rfc822" if part.ctype == "multipart/digest" else "text/plain"
        children = [Part(*part_fields(piece), default=default) for piece in pieces]
        pending.extend(reversed(children))
    return found
