"""What the classifier sees of a message: tokens and text, from its headers and MIME parts.

:func:`extract` parses a message with the :mod:`email` package, decodes
every text part (base64, quoted-printable, RFC 2047 headers, any charset),
reduces HTML to text, collects URLs and their domains, and returns
:class:`Features`:

- ``tokens``: words of the body and Subject, words of selected headers
  prefixed with the header's name (``from:gmail``), header names present,
  URL domains (``url:example.biz``, and the registered domain), attachment
  types, and a few facts about the structure (``meta:html-only``);
- ``text``: the Subject and the body text, lower-cased and cut to
  :data:`TEXT_CHARS`, from which the classifier takes character n-grams,
  which catch what words miss (misspellings, French and English alike,
  obfuscated spelling, words glued together).

Words are Unicode words (``gagné``, ``l'offre``), lower-cased; an accented
word also gives its unaccented form, since spam often drops the accents.
Nothing here depends on a language.

Everything is bounded: at most :data:`MAX_PARTS` MIME parts and
:data:`MAX_TOKENS` tokens per message, whatever the message holds.
"""

from __future__ import annotations

import email
import email.errors
import email.header
import email.message
import email.policy
import html
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path

import attrs

#: Characters of Subject and body kept for character n-grams: the start of a
#: message says what it is; the rest mostly repeats it (TREC results agree).
TEXT_CHARS = 4000

#: Body characters tokenised into words.
WORD_CHARS = 60_000

#: MIME parts looked at; a message with thousands of parts is an attack.
MAX_PARTS = 64

#: Tokens per message; enough for any real mail.
MAX_TOKENS = 8000

#: Headers whose words are tokens, with the prefix they get.  Others only
#: count by their presence (``hdr:x-mailer``).
WORD_HEADERS = {
    "subject": "subject",
    "from": "from",
    "reply-to": "reply-to",
    "to": "to",
    "cc": "cc",
    "return-path": "return-path",
    "sender": "sender",
    "message-id": "message-id",
    "x-mailer": "mailer",
    "user-agent": "mailer",
    "content-type": "content-type",
    "received": "received",
    "list-id": "list-id",
    "list-unsubscribe": "list-unsubscribe",
    "precedence": "precedence",
    "organization": "organization",
    "x-priority": "priority",
    "importance": "priority",
    "x-msmail-priority": "priority",
    "mime-version": "mime-version",
    "date": "date",
    "content-transfer-encoding": "cte",
}

#: Headers that say nothing about the sender's mail: ours, and verdicts of
#: other filters that a sender can forge at will.
IGNORED_HEADERS = ("x-spam-", "x-policyd-", "x-virus-", "x-dspam-", "x-bogosity")

_WORD = re.compile(r"[^\W_](?:[^\W_]|['’.\-][^\W_])*")
_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"'()\[\]{}]+", re.IGNORECASE)
_HREF = re.compile(r"""(?:href|src|action)\s*=\s*["']?([^"'\s>]+)""", re.IGNORECASE)
_SCRIPT = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_TAG = re.compile(r"<[^>]*>")
_TAG_NAME = re.compile(r"<\s*([a-zA-Z][a-zA-Z0-9]*)")
_SPACE = re.compile(r"\s+")
_IP_HOST = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")
_EMAIL = re.compile(r"[\w.+\-]+@([\w\-]+(?:\.[\w\-]+)+)")
#: Second-level labels under which registrations happen (co.uk, com.fr, ...).
_SECOND_LEVEL = frozenset({"co", "com", "net", "org", "gov", "ac", "edu", "gouv", "asso", "ne", "or"})


@attrs.frozen
class Features:
    """What the classifier sees of one message.

    :ivar tokens: word, header, URL and structure tokens (repeats removed).
    :ivar text: Subject and body text, lower-cased, for character n-grams.
    :ivar subject: the decoded Subject, for people.
    """

    tokens: tuple[str, ...]
    text: str
    subject: str = ""


def decode_header(value: str) -> str:
    """An RFC 2047 header value as text; undecodable pieces are kept as they are."""
    if "=?" not in value:
        return _SPACE.sub(" ", value).strip()
    try:
        return _SPACE.sub(" ", str(email.header.make_header(email.header.decode_header(value)))).strip()
    except (ValueError, LookupError, UnicodeError, email.errors.HeaderParseError):
        return _SPACE.sub(" ", value).strip()


def parse(raw: bytes) -> email.message.Message:
    """Parse a message leniently (never raises on malformed input)."""
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def html_to_text(markup: str) -> tuple[str, list[str], list[str]]:
    """Reduce HTML to its visible text; also return its links and its tag names."""
    links = _HREF.findall(markup)
    tags = [t.lower() for t in _TAG_NAME.findall(markup[:200_000])]
    markup = _SCRIPT.sub(" ", markup)
    markup = _COMMENT.sub(" ", markup)
    text = _TAG.sub(" ", markup)
    return html.unescape(text), links, tags


def _payload_text(part: email.message.Message) -> str:
    """The decoded text of a leaf part, whatever its encoding and charset claim."""
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except (LookupError, UnicodeError):
        return payload.decode("latin-1")


def _unaccented(word: str) -> str:
    decomposed = unicodedata.normalize("NFKD", word)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def words(text: str) -> Iterator[str]:
    """Lower-cased words of 2 to 30 characters, and the unaccented form of accented ones."""
    for match in _WORD.finditer(text):
        word = match.group().lower().strip(".'’-")
        if 2 <= len(word) <= 30:
            yield word
            if not word.isascii():
                plain = _unaccented(word)
                if plain != word:
                    yield plain


def domain_of(url: str) -> str:
    """The host of a URL (``https://a.b.example/x`` -> ``a.b.example``), lower-cased."""
    rest = url.split("://", 1)[-1]
    host = re.split(r"[/?#\\]", rest, maxsplit=1)[0]
    host = host.rsplit("@", 1)[-1].split(":", 1)[0]
    return host.strip(".").lower()


def registered_domain(host: str) -> str:
    """The domain under which ``host`` was registered (``a.b.example.co.uk`` -> ``example.co.uk``)."""
    labels = host.split(".")
    if len(labels) >= 3 and labels[-2] in _SECOND_LEVEL and len(labels[-1]) == 2:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def url_tokens(urls: Iterable[str]) -> Iterator[str]:
    """Tokens of links: their hosts, registered domains and a few telling facts."""
    for url in urls:
        host = domain_of(html.unescape(url))
        if not host or "." not in host:
            continue
        if _IP_HOST.match(host):
            yield "url:ip-address"
            continue
        yield f"url:{host}"
        yield f"url-domain:{registered_domain(host)}"
        if url.lower().startswith("https"):
            yield "url:https"
        if "@" in url.split("://", 1)[-1].split("/", 1)[0]:
            yield "url:userinfo"


def _bucket(value: int) -> int:
    """A rough size class: 0, 1, 2-3, 4-7, 8-15, ..."""
    return value.bit_length()


def extract(raw: bytes | email.message.Message, max_bytes: int | None = None) -> Features:
    """The tokens and text of one message (bytes as received, or parsed).

    :param max_bytes: read at most this much of ``raw`` (a huge message is
        judged on its start).
    """
    if isinstance(raw, bytes):
        if max_bytes is not None and len(raw) > max_bytes:
            raw = raw[:max_bytes]
        message = parse(raw)
    else:
        message = raw
    tokens: list[str] = []
    add = tokens.append

    # --- headers ---
    subject = ""
    for name, value in message.items()[:200]:
        lower = name.lower()
        if lower.startswith(IGNORED_HEADERS):
            continue
        add(f"hdr:{lower[:40]}")
        prefix = WORD_HEADERS.get(lower)
        if prefix is None:
            continue
        text = decode_header(str(value))[:2000]
        if lower == "subject":
            subject = subject or text
            if text.isupper() and len(text) > 8:
                add("meta:subject-shouting")
        for domain in _EMAIL.findall(text):
            add(f"{prefix}-domain:{registered_domain(domain.lower())}")
        for word in words(text):
            add(f"{prefix}:{word}")

    # --- body ---
    texts: list[str] = []
    urls: list[str] = []
    kinds: set[str] = set()
    for count, part in enumerate(message.walk()):
        if count >= MAX_PARTS:
            add("meta:too-many-parts")
            break
        ctype = part.get_content_type()
        add(f"part:{ctype}")
        if part.is_multipart():
            continue
        filename = part.get_filename()
        if filename:
            name = decode_header(str(filename)).lower()
            extension = name.rsplit(".", 1)[-1] if "." in name else "none"
            add(f"attachment:{extension[:10]}")
        charset = part.get_content_charset()
        if charset:
            add(f"charset:{charset[:30]}")
        encoding = str(part.get("content-transfer-encoding", "")).lower().strip()
        if encoding:
            add(f"encoding:{encoding[:20]}")
        if ctype == "text/plain" and not filename:
            kinds.add("plain")
            texts.append(_payload_text(part))
        elif ctype == "text/html" and not filename:
            kinds.add("html")
            text, links, tags = html_to_text(_payload_text(part))
            texts.append(text)
            urls.extend(links)
            tokens.extend(f"html:{tag}" for tag in dict.fromkeys(tags))
        elif ctype.startswith("image/"):
            kinds.add("image")
    if kinds == {"html"}:
        add("meta:html-only")
    if "image" in kinds and not texts:
        add("meta:image-only")
    body = "\n".join(texts)
    if len(body) > WORD_CHARS:
        body = body[:WORD_CHARS]
    urls.extend(_URL.findall(body))
    tokens.extend(url_tokens(urls[:500]))
    add(f"meta:urls-{_bucket(len(urls))}")
    add(f"meta:body-{_bucket(len(body) // 64)}")
    body_words = list(words(body))
    tokens.extend(body_words)
    # Word pairs catch phrases ("click here", "cliquez ici").
    tokens.extend(f"{a} {b}" for a, b in zip(body_words[:400], body_words[1:401], strict=False))
    letters = [c for c in body[:5000] if c.isalpha()]
    if len(letters) > 40 and sum(c.isupper() for c in letters) > 0.5 * len(letters):
        add("meta:body-shouting")

    unique = tuple(dict.fromkeys(tokens))[:MAX_TOKENS]
    text = _SPACE.sub(" ", f"{subject}\n{body}")[:TEXT_CHARS].lower()
    return Features(unique, text, subject)


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
    if is_maildir(directory):
        roots = [directory / "cur", directory / "new"]
        for box in roots:
            yield from sorted(p for p in box.iterdir() if p.is_file() and not p.name.startswith("."))
        return
    for top, folders, files in os.walk(directory):
        folders[:] = sorted(f for f in folders if not f.startswith(".") and f != "tmp")
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(top) / name


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
