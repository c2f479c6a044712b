"""What the classifier sees of a message: its header block, tokens and text, from its headers and MIME parts.

:func:`message_features` reads a message as the milter receives it from
the MTA (header fields, then the body); :func:`extract` reads one as bytes
(a file, for training and ``policyd score``) by splitting it the same way
first (:func:`split_message`), so the milter and training see the same
features.  Every text part is decoded (base64, quoted-printable, RFC 2047
headers, any charset), HTML is reduced to text, URLs and their domains are
collected, and the result is :class:`Features`:

- ``head``: the header block as bytes (``Name: value`` lines, as received,
  cut to :data:`HEAD_BYTES`), from which the classifier takes byte 4-grams:
  the raw headers carry much of what tells spam (TREC 2005-2007);
- ``tokens``: header names present (``hdr:x-mailer``), sender domains
  (``from-domain:example.com``), URL hosts (``url:example.biz``, and the
  registered domain), attachment types and a few facts about the structure
  (``meta:html-only``);
- ``text``: the Subject and the body text, made plain by
  :func:`plain_text` and cut to :data:`WORD_CHARS`, from which the
  classifier takes words (:func:`text_words`) and character n-grams,
  which catch what words miss (misspellings, obfuscated spelling,
  words glued together).

Words are Unicode words (``gagné``), lower-cased, NFKC-normalised; an
apostrophe ends a word, so French elisions give the word itself
(``l'argent`` -> ``argent``, ``qu'il`` -> ``qu``, ``il``); an accented word
also gives its unaccented form, since spam often drops the accents.
Nothing here depends on a language.

Most mail is a single text part.  Its body is decoded directly; only a
message with parts (``multipart/*``, ``message/*``) goes through the
:mod:`email` parser, and every leaf part, from either path, is read by the
same code, so both give the same features (the tests check it).

Everything is bounded: at most :data:`MAX_PARTS` MIME parts,
:data:`MAX_TOKENS` tokens, :data:`HEAD_BYTES` of headers and
:data:`WORD_CHARS` of text per message, whatever the message holds.
"""

from __future__ import annotations

import email
import email.errors
import email.header
import functools
import html
import itertools
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from policyd.content import mime

if TYPE_CHECKING:
    import email.message

#: Bytes of the header block kept, a budget: the topmost fields (the last hops and
#: the sender's own) come first.  Scoring time grows with the budget, and in the
#: evaluation 1,000 bytes did as well as 3,000 (every field's name is a token anyway).
HEAD_BYTES = 1000

#: Characters of Subject and body text kept for words and n-grams: the start
#: of a message says what it is; the rest mostly repeats it (TREC results agree),
#: and every step of reading text costs time in proportion to its length
#: (3,000 did as well as 6,000 in the evaluation).
WORD_CHARS = 3000

#: Bytes of a text part read (decoded; HTML before it is reduced to text).
PART_BYTES = 8000

#: Shortest word kept, in bytes: one letter says nothing (the ``l`` of ``l'argent``).
MIN_WORD = 2

#: Longest word kept, in UTF-8 bytes: longer runs are identifiers, hashes and encoded junk.
MAX_WORD = 40

#: MIME parts looked at; a message with thousands of parts is an attack.
MAX_PARTS = 64

#: Lines that could delimit parts (``--boundary``) given to the email parser:
#: a part has two at most, and some text lines start with ``--`` too.
MAX_DELIMITERS = 4 * MAX_PARTS

#: Header fields looked at; real mail has a few dozen.
MAX_HEADER_FIELDS = 200

#: Tokens per message; enough for any real mail.
MAX_TOKENS = 2000

#: Body characters whose letters decide ``meta:body-shouting``.
SHOUTING_CHARS = 2000

#: Headers whose address domains are tokens (``from-domain:example.com``).
ADDRESS_HEADERS = frozenset({"from", "reply-to", "return-path", "sender"})

#: Headers that say nothing about the sender's mail: ours, and verdicts of
#: other filters that a sender can forge at will.
IGNORED_HEADERS = ("x-spam-", "x-policyd-", "x-virus-", "x-dspam-", "x-bogosity")

#: The top-level headers that say how the body is made (the MIME structure).
PART_HEADERS = ("content-type", "content-transfer-encoding", "content-disposition")

# The address headers in the order their tokens come.
_ADDRESS_ORDER = ("from", "reply-to", "return-path", "sender")
# The header fields whose values are read (the first of each name).
_READ_HEADERS = frozenset({"subject", *ADDRESS_HEADERS, *PART_HEADERS})
# A name of a field left out of the header block (IGNORED_HEADERS), lower-cased, after a line end.
_IGNORED_NAME = re.compile("\n(?:" + "|".join(re.escape(prefix) for prefix in IGNORED_HEADERS) + ")")
# Characters that end words in plain text (:func:`plain_text`): not letters,
# marks or digits, and not ASCII (ASCII is split by the classifier's byte classes).
# The ASCII range first: most characters are found in it at once, before the
# look-up of \w (three times faster than the other order).
_NOT_IN_WORDS = re.compile(r"[^\x00-\x7f\w]")
# Typographic apostrophes, quotes and dashes as their ASCII forms.
_TYPOGRAPHY_PAIRS = (("\u2019", "'"), ("\u2018", "'"), ("\u02bc", "'"), ("\u00b4", "'"), ("\u201c", '"'),
                     ("\u201d", '"'), ("\u00ab", '"'), ("\u00bb", '"'), ("\u2013", "-"), ("\u2014", "-"))
# Links in text: two patterns that each start with a literal, which the search skips to (one
# with an alternation is tried at every character); a "www." link after "http://" is found twice.
_URL = re.compile(r"https?://[^\s<>\"'()\[\]{}]+")
_WWW = re.compile(r"www\.[^\s<>\"'()\[\]{}]+")
# Applied to lower-cased markup: a case-insensitive search would be several times slower.
_HREF = re.compile(r"""(?:href|src|action)\s*+=\s*+["']?+([^"'\s>]++)""")
# Where hidden markup starts (a comment, a script, a style sheet), and where each ends.
_HIDDEN = re.compile(r"<!--|<(script|style)\b", re.IGNORECASE)
_HIDDEN_END = {
    None: re.compile(r"-->"),
    "script": re.compile(r"</script\s*>", re.IGNORECASE),
    "style": re.compile(r"</style\s*>", re.IGNORECASE),
}
# A tag holds no "<": a stray "<" is text.  Its name, if it has one, and the rest (its attributes);
# possessive, so the search stays linear.
_TAG_PARTS = re.compile(r"<(?:\s*+([a-zA-Z][a-zA-Z0-9]*+)([^<>]*+)|[^<>]*+)>")
_SPACE = re.compile(r"\s+")
# A URL's host: after the first "://" (if any) and the last "@" before the path, up to a port or the path.
_URL_HOST = re.compile(r"(?:.*?://)?(?:[^/?#\\]*@)?([^/?#\\:]*)", re.DOTALL)
_IP_HOST = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
# The domain of an address.  Starting with the "@" (the local part is only
# looked behind) lets the search jump from one "@" to the next.
_EMAIL = re.compile(r"@(?<=[\w.+\-]@)([\w\-]+(?:\.[\w\-]+)+)")
# A header field's name (printable ASCII but the colon), then its colon;
# like Postfix, blanks before the colon are allowed.
_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
# A header name longer than the 40 characters its token keeps.
_LONG_NAME = re.compile(r"[^\n]{41}")
# The end of the header block (an empty line), a block made only of fields
# (some folded), and each field's name and value (one space after the colon dropped).
_HEAD_END = re.compile(rb"\n\r?\n")
# Possessive quantifiers: nothing is ever given back, and sre keeps no state to give it back.
_FIELDS_BLOCK = re.compile(rb"(?:[\x21-\x39\x3b-\x7e]++[ \t]*+:[^\n]*+\n(?:[ \t][^\n]*+\n)*+)*+")
# Each match starts where the last ended, at the start of a line: no "^" to try at every byte.
_FIELD_TEXT = re.compile(r"([\x21-\x39\x3b-\x7e]++)[ \t]*+: ?+([^\n]*+(?:\n[ \t][^\n]*+)*+)\n")
#: Second-level labels under which registrations happen (co.uk, com.fr, ...).
_SECOND_LEVEL = frozenset({"co", "com", "net", "org", "gov", "ac", "edu", "gouv", "asso", "ne", "or"})
# Bytes that are not ASCII letters, and not upper-case ones, deleted to count the rest.
_NOT_LETTERS = bytes(b for b in range(256) if not (65 <= b <= 90 or 97 <= b <= 122))
_NOT_UPPER = bytes(b for b in range(256) if not 65 <= b <= 90)


@attrs.frozen
class Features:
    """What the classifier sees of one message.

    :ivar tokens: header, URL and structure tokens (repeats removed).
    :ivar text: Subject and body text made plain (:func:`plain_text`), for words and n-grams.
    :ivar subject: the decoded Subject, for people.
    :ivar head: the header block (``Name: value`` lines), for byte n-grams.
    """

    tokens: tuple[str, ...]
    text: str
    subject: str = ""
    head: bytes = b""


def decode_header(value: str) -> str:
    """An RFC 2047 header value as text; undecodable pieces are kept as they are."""
    if "=?" not in value:
        return " ".join(value.split())
    try:
        return _SPACE.sub(" ", str(email.header.make_header(email.header.decode_header(value)))).strip()
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return " ".join(value.split())


def parse(raw: bytes) -> email.message.Message:
    """Parse a message leniently with the :mod:`email` package (never raises on malformed input)."""
    # Imported here: most mail is read without the email parser, and its modules took 5% of the
    # start-up of policyd score.
    import email.policy

    return email.message_from_bytes(raw, policy=email.policy.compat32)


def split_message(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """A message's header fields and its body, as an MTA gives them to a milter.

    Like Postfix: a value loses the one space after the colon, folded lines
    are joined with ``\\n`` (their leading blanks kept), bytes are read as
    UTF-8 with other bytes kept as surrogate escapes
    (:func:`policyd.protocols.milter.text`), and the headers end at the first empty
    line, or at the first line that is not a header field (which then
    starts the body).  An mbox ``From`` line at the start is skipped.
    """
    position = 0
    if raw.startswith(b"From "):
        position = len(raw) if (newline := raw.find(b"\n")) < 0 else newline + 1
    if raw.startswith(b"\n", position) or raw.startswith(b"\r\n", position):
        return [], raw[raw.find(b"\n", position) + 1 :]
    # The common case in a few regular expressions, not line by line: a block of fields, then an empty line.
    end = _HEAD_END.search(raw, position)
    block = raw[position : end.start() + 1] if end else raw[position:] + b"\n"
    if b"\r" in block:
        block = block.replace(b"\r\n", b"\n")
    if _FIELDS_BLOCK.fullmatch(block):
        # Decoded once, whole: names and line ends are ASCII, so no character spans two values.
        fields = _FIELD_TEXT.findall(block.decode("utf-8", "surrogateescape"))
        return fields, raw[end.end() :] if end else b""
    return _split_slowly(raw)


def _split_slowly(raw: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """:func:`split_message` line by line: for headers that end without an empty line."""
    headers: list[tuple[str, str]] = []
    size = len(raw)
    position = 0
    if raw.startswith(b"From "):
        position = size if (newline := raw.find(b"\n")) < 0 else newline + 1
    while position < size:
        newline = raw.find(b"\n", position)
        end = size if newline < 0 else newline
        line = raw[position:end]
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            position = end + 1
            break
        if line[0] in b" \t":
            if not headers:
                break
            name, value = headers[-1]
            headers[-1] = (name, value + "\n" + line.decode("utf-8", "surrogateescape"))
        else:
            field = _FIELD_NAME.match(line)
            if field is None:
                break
            rest = line[field.end() :]
            if rest[:1] == b" ":
                rest = rest[1:]
            headers.append((field.group(1).decode("ascii"), rest.decode("utf-8", "surrogateescape")))
        position = end + 1
    return headers, raw[position:]


def html_to_text(markup: str) -> tuple[str, list[str], list[str]]:
    """Reduce HTML to its visible text; also return its links (lower-cased) and its tag names (each once).

    Comments, scripts and style sheets are dropped (one left open hides the
    rest, as in a browser), then tags, by one regular expression that also
    gives each tag's name and attributes (where the links are).  Time is
    linear in the length of the markup, whatever it holds.
    """
    shown = []
    position = 0
    while (start := _HIDDEN.search(markup, position)) is not None:
        shown.append(markup[position : start.start()])
        kind = start.group(1)
        end = _HIDDEN_END[kind.lower() if kind else None].search(markup, start.end())
        if end is None:
            position = len(markup)
            break
        position = end.end()
    shown.append(markup[position:])
    # Text, tag name, attributes, text, ...: a tag without a name gives None twice.
    pieces = _TAG_PARTS.split(" ".join(shown))
    text = " ".join(pieces[0::3])
    # Each name once (the tags of a page repeat), then lower-cased: a few calls instead of hundreds.
    tags = [name.lower() for name in dict.fromkeys(filter(None, pieces[1::3]))]
    links = _HREF.findall(" ".join(filter(None, pieces[2::3])).lower())
    if "&" in text:
        # The most common entity by str.replace: html.unescape calls Python for each one.
        # (a space: plain text makes a no-break space one, and ASCII text stays ASCII).
        text = html.unescape(text.replace("&nbsp;", " "))
    return text, links, tags


def _payload_text(payload: bytes, charset: str | None) -> str:
    """The decoded text of a leaf part, whatever its charset claims."""
    try:
        return payload.decode(charset or "utf-8", "replace")
    except (LookupError, UnicodeError):
        return payload.decode("latin-1")


@functools.cache
def _combining_marks() -> re.Pattern[str]:
    """Every combining character (accents once decomposed); all of them lie in planes 0 and 1."""
    marks = "".join(chr(c) for c in range(0x20000) if unicodedata.combining(chr(c)))
    return re.compile(f"[{re.escape(marks)}]")


def plain_text(text: str) -> str:
    """Lower-cased text whose words the classifier reads byte by byte.

    Non-ASCII text is NFKC-normalised (composed accents, ligatures and
    full-width letters as letters, ``\xa0`` as a space), typographic
    apostrophes, quotes and dashes become ASCII, and other characters that
    are not letters, marks or digits (symbols, emoji) become spaces.
    """
    lowered = text.lower()
    if lowered.isascii():
        return lowered
    # Most text is already in NFKC: the quick check costs a fraction of normalising.
    normal = lowered if unicodedata.is_normalized("NFKC", lowered) else unicodedata.normalize("NFKC", lowered)
    # str.translate with a dict looks up every character: a few replaces of the ones present are faster.
    for typographic, plain in _TYPOGRAPHY_PAIRS:
        if typographic in normal:
            normal = normal.replace(typographic, plain)
    return _NOT_IN_WORDS.sub(" ", normal).lower()


@functools.cache
def _text_word() -> re.Pattern[str]:
    """A word of plain text, as the classifier's byte classes find it: ASCII letters and digits, and
    any other character (compiled when first used: scoring never uses it, and it takes 2 ms)."""
    return re.compile(r"[a-z0-9\u0080-\U0010ffff]+")


def text_words(text: str) -> list[str]:
    """The words the classifier takes from plain text (:func:`plain_text`), in order.

    A word is a run of ASCII letters and digits and of non-ASCII characters
    (plain text has no non-ASCII character outside words), of
    :data:`MIN_WORD` to :data:`MAX_WORD` bytes in UTF-8.
    """
    found = _text_word().findall(text)
    return [w for w in found if MIN_WORD <= len(w.encode("utf-8", "surrogatepass")) <= MAX_WORD]


def unaccented(text: str) -> str:
    """``text`` without its accents (``été`` -> ``ete``): what spam that drops them writes."""
    if text.isascii():
        return text
    return _combining_marks().sub("", unicodedata.normalize("NFKD", text))


def domain_of(url: str) -> str:
    """The host of a URL (``https://a.b.example/x`` -> ``a.b.example``), lower-cased."""
    found = _URL_HOST.match(url)
    return found.group(1).strip(".").lower() if found else ""


def registered_domain(host: str) -> str:
    """The domain under which ``host`` was registered (``a.b.example.co.uk`` -> ``example.co.uk``)."""
    labels = host.split(".")
    if len(labels) >= 3 and labels[-2] in _SECOND_LEVEL and len(labels[-1]) == 2:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def url_tokens(urls: Iterable[str]) -> Iterator[str]:
    """Tokens of links: their hosts, registered domains and a few telling facts."""
    for url in urls:
        yield from _link_tokens(url)


@functools.lru_cache(maxsize=4096)
def _link_tokens(url: str) -> tuple[str, ...]:
    """The tokens of one link (remembered: the same links come again and again, in footers and lists)."""
    found = _host_tokens(domain_of(html.unescape(url) if "&" in url else url))
    if len(found) < 2:
        return found
    if url.lower().startswith("https"):
        found += ("url:https",)
    if "@" in url.split("://", 1)[-1].split("/", 1)[0]:
        found += ("url:userinfo",)
    return found


@functools.lru_cache(maxsize=4096)
def _host_tokens(host: str) -> tuple[str, ...]:
    """The tokens of a link's host (remembered too: most links are new, but their hosts are not)."""
    if not host or "." not in host:
        return ()
    if _IP_HOST.match(host):
        return ("url:ip-address",)
    return (f"url:{host}", f"url-domain:{registered_domain(host)}")


@functools.lru_cache(maxsize=4096)
def _address_tokens(header: str, value: str) -> list[str]:
    """``header-domain:`` tokens of an address header's value (remembered: senders write again)."""
    return [f"{header}-domain:{registered_domain(domain.lower())}" for domain in _EMAIL.findall(value)]


def _bucket(value: int) -> int:
    """A rough size class: 0, 1, 2-3, 4-7, 8-15, ..."""
    return value.bit_length()


def _shouting(text: str) -> bool:
    """Whether most of the (ASCII) letters of ``text`` are capitals; bytes.translate counts them in C."""
    data = text.encode("utf-8", "surrogatepass")
    letters = len(data.translate(None, _NOT_LETTERS))
    return letters > 40 and len(data.translate(None, _NOT_UPPER)) > 0.5 * letters


def _first_delimiters(body: bytes) -> bytes:
    """The body up to its :data:`MAX_DELIMITERS`-th line that could delimit a part (starts with ``--``).

    The email parser's time grows with such lines, and with their nesting
    faster still (thousands of them took seconds); more than MAX_PARTS
    parts are not looked at anyway.
    """
    position = 0
    for _ in range(MAX_DELIMITERS):
        position = body.find(b"\n--", position) + 1
        if not position:
            return body
    return body[:position]


def _parts(fields: dict[str, str], body: bytes, mime_parser: bool) -> list[mime.Part]:
    """The MIME parts of a body whose top-level headers are ``fields`` (as :meth:`Message.walk` gives them).

    Read directly (:func:`policyd.content.mime.walk`), else, for odd
    structures or when ``mime_parser``, by the :mod:`email` package: the
    two agree.
    """
    if not mime_parser:
        found = mime.walk(fields, body, MAX_PARTS)
        if found is not None:
            return found
    # Header values as the email parser holds them: bytes read as ASCII, others as surrogate escapes.
    raw_fields = {name: value.encode("utf-8", "surrogateescape") for name, value in fields.items()}
    if "multipart" in fields.get("content-type", "").lower():
        body = _first_delimiters(body)
    block = b"".join(b"%s: %s\r\n" % (name.encode(), value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
                     for name, value in raw_fields.items())
    parts = []
    for number, message in enumerate(parse(block + b"\r\n" + body).walk()):
        if number > MAX_PARTS:
            break
        part = mime.Part({}, b"", message=message)
        part.ctype = message.get_content_type()
        part.container = message.is_multipart()
        parts.append(part)
    return parts


def extract(raw: bytes, max_bytes: int | None = None) -> Features:
    """The tokens and text of a message as bytes (a file, or as received).

    :param max_bytes: read at most this much of ``raw`` (a huge message is
        judged on its start).
    """
    if max_bytes is not None and len(raw) > max_bytes:
        raw = raw[:max_bytes]
    headers, body = split_message(raw)
    return message_features(headers, body)


def message_features(
    headers: Sequence[tuple[str, str]], body: bytes, mime_parser: bool = False
) -> Features:
    """The header block, tokens and text of a message as the milter gets it: header fields, then the body.

    :param headers: (name, value) in order, values as the MTA gives them
        (or :func:`split_message`).
    :param body: the body as received (MIME encoded).
    :param mime_parser: parse even a single-part body with the :mod:`email`
        package (slower; the result is the same).
    """
    tokens: list[str] = []
    add = tokens.append

    # --- headers ---
    # Joined, lower-cased and looked up by C code (str.join, dict), not field by field in Python.
    selected = headers[:MAX_HEADER_FIELDS]
    # Names and values apart in one pass (zip of the pairs).
    given, values = zip(*selected, strict=True) if selected else ((), ())
    names = "\n".join(given).lower()
    if _IGNORED_NAME.search("\n" + names):
        selected = [field for field in selected if not field[0].lower().startswith(IGNORED_HEADERS)]
        given, values = zip(*selected, strict=True) if selected else ((), ())
        names = "\n".join(given).lower()
    head = "\n".join(map(": ".join, selected)).encode("utf-8", "surrogateescape")[:HEAD_BYTES]
    field_names = names.split("\n") if selected else []
    if len(field_names) != len(selected):  # a name with a line end in it (never from an MTA)
        field_names = [name.lower() for name, _ in selected]
        tokens.extend(["hdr:" + name[:40] for name in dict.fromkeys(field_names)])
    elif selected and _LONG_NAME.search(names) is None:
        # Every name prefixed at once, by replacing the line ends between them.
        tokens.extend(dict.fromkeys(f"hdr:{names}".replace("\n", "\nhdr:").split("\n")))
    else:
        tokens.extend(["hdr:" + name[:40] for name in dict.fromkeys(field_names)])
    # The first field of each name: the later ones are overwritten by the earlier.
    fields = dict(zip(reversed(field_names), reversed(values), strict=True))
    subject = ""
    if "subject" in fields:
        subject = decode_header(fields["subject"])[:2000]
        if subject.isupper() and len(subject) > 8:
            add("meta:subject-shouting")
    for lower in _ADDRESS_ORDER:
        value = fields.get(lower, "")
        if "@" in value:
            tokens.extend(_address_tokens(lower, value[:2000]))

    # --- body ---
    texts: list[str] = []
    length = 0
    urls: list[str] = []
    kinds: set[str] = set()
    structure = {name: fields[name] for name in PART_HEADERS if name in fields}
    for count, part in enumerate(_parts(structure, body, mime_parser)):
        if count >= MAX_PARTS:
            add("meta:too-many-parts")
            break
        ctype = part.ctype
        add(f"part:{ctype}")
        if part.container:
            continue
        filename = part.filename()
        if filename:
            name = decode_header(str(filename)).lower()
            extension = name.rsplit(".", 1)[-1] if "." in name else "none"
            add(f"attachment:{extension[:10]}")
        charset = part.charset()
        if charset:
            add(f"charset:{charset[:30]}")
        encoding = part.fields.get("content-transfer-encoding", "") if part.message is None else \
            str(part.message.get("content-transfer-encoding", ""))
        encoding = encoding.lower().strip()
        if encoding:
            add(f"encoding:{encoding[:20]}")
        # Parts after the first WORD_CHARS of text give their tokens, but their text is not read.
        if ctype == "text/plain" and not filename:
            kinds.add("plain")
            if length < WORD_CHARS:
                texts.append(_payload_text(part.payload(PART_BYTES)[:PART_BYTES], charset).rstrip())
                length += len(texts[-1])
        elif ctype == "text/html" and not filename:
            kinds.add("html")
            if length >= WORD_CHARS:
                continue
            text, links, tags = html_to_text(_payload_text(part.payload(PART_BYTES)[:PART_BYTES], charset))
            texts.append(text.rstrip())
            length += len(text)
            urls.extend(links)
            tokens.extend(f"html:{tag}" for tag in dict.fromkeys(tags))
        elif ctype.startswith("image/"):
            kinds.add("image")
    if kinds == {"html"}:
        add("meta:html-only")
    if "image" in kinds and not texts:
        add("meta:image-only")
    body_text = "\n".join(texts)
    if len(body_text) > WORD_CHARS:
        body_text = body_text[:WORD_CHARS]
    lowered = body_text.lower()
    urls.extend(_URL.findall(lowered))
    if "www." in lowered:
        urls.extend(_WWW.findall(lowered))
    # The same link repeated gives the same tokens: each is looked at once.
    tokens.extend(itertools.chain.from_iterable(map(_link_tokens, dict.fromkeys(urls[:500]))))
    add(f"meta:urls-{_bucket(len(urls))}")
    add(f"meta:body-{_bucket(len(body_text) // 64)}")
    if _shouting(body_text[:SHOUTING_CHARS]):
        add("meta:body-shouting")

    unique = tuple(dict.fromkeys(tokens))[:MAX_TOKENS]
    # Blanks are kept as they are (words and n-grams need no collapsing), but line ends are LF, as
    # in a file, whatever the MTA sent, and a part's text ends with its last visible character.
    if "\r" in lowered:
        lowered = lowered.replace("\r\n", "\n")
    text = plain_text(f"{subject}\n{lowered}"[:WORD_CHARS])
    return Features(unique, text, subject, head)


# --- reading mail from disk -------------------------------------------------------


def strip_from_line(raw: bytes) -> bytes:
    """A message without the mbox ``From `` line some files start with."""
    if raw.startswith(b"From "):
        end = raw.find(b"\n")
        return raw[end + 1 :] if end >= 0 else b""
    return raw


def is_maildir(path: Path) -> bool:
    """Whether a directory is a Maildir (has ``cur`` and ``new``)."""
    return (path / "cur").is_dir() and (path / "new").is_dir()


def message_files(directory: Path) -> Iterator[Path]:
    """The message files of a Maildir (``cur`` and ``new``) or of a folder (recursively), sorted.

    Hidden files and Maildir's ``tmp`` are left out.
    """
    return map(Path, message_paths(str(directory)))


def message_paths(directory: str) -> Iterator[str]:
    """:func:`message_files` as strings joined to ``directory`` (faster, for thousands of files)."""
    if os.path.isdir(os.path.join(directory, "cur")) and os.path.isdir(os.path.join(directory, "new")):
        for box in (os.path.join(directory, "cur"), os.path.join(directory, "new")):
            with os.scandir(box) as entries:
                names = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_file())
            for name in names:
                yield os.path.join(box, name)
        return
    for top, folders, files in os.walk(directory):
        folders[:] = sorted(f for f in folders if not f.startswith(".") and f != "tmp")
        for name in sorted(files):
            if not name.startswith("."):
                yield os.path.join(top, name)


def mbox_messages(path: Path) -> Iterator[bytes]:
    """The messages of an mbox file (``>From`` quoting undone)."""
    import mailbox

    box = mailbox.mbox(path, create=False)
    try:
        for key in box.iterkeys():
            yield box.get_bytes(key)
    finally:
        box.close()


def read_mail(path: Path) -> Iterator[tuple[str, bytes]]:
    """Every message under ``path`` for training: ``(where, raw)``.

    A directory is a Maildir or a folder of message files; a file is an
    mbox when it starts with a ``From `` line, else one message.

    :raises OSError: when ``path`` cannot be read.
    """
    if path.is_dir():
        for found in message_files(path):
            yield str(found), strip_from_line(found.read_bytes())
        return
    with open(path, "rb") as stream:
        start = stream.read(5)
    if start == b"From ":
        for number, raw in enumerate(mbox_messages(path)):
            yield f"{path}#{number + 1}", raw
    else:
        yield str(path), path.read_bytes()
