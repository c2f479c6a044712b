"""The trusted network header: the reputation check signs it, the milter verifies it.

The header carries a token, an HMAC over its fields with a per-install
secret, so the milter can tell the copy Postfix added from one the sender
wrote.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Iterable
from pathlib import Path

from policyd.config import Config
from policyd.netlists import (
    parse_address,
)
from policyd.statefiles import load_secret, secret_file

#: The header added at level 1; the milter adds its points to the content's.
HEADER = "X-Policyd-Network"

#: The secret's file name (see :func:`header_secret_path`).
SECRET_NAME = "header.secret"  # noqa: S105 (a file name, not a secret)

_SAFE_REASON = re.compile(r"[^A-Za-z0-9._\-]")


def points_text(value: float) -> str:
    """Points as the header and the replies write them (``5``, ``2.5``)."""
    return f"{value:g}"


def safe_reason(name: str) -> str:
    """A reason as it may appear in the header (no ``;``, ``,``, spaces)."""
    return _SAFE_REASON.sub("_", name) or "_"


def _token(secret: bytes, score: str, reasons: str, client: str, when: str) -> str:
    message = f"v1|{score}|{reasons}|{client}|{when}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:32]


def sign_header(score: float, reasons: Iterable[str], client: str, when: float, secret: bytes) -> str:
    """The value of an ``X-Policyd-Network`` header, with its token.

    ``score=7; reasons=zen.example,helo_not_fqdn; client=192.0.2.1;
    time=1700000000; token=<32 hex digits>``: the token is an HMAC-SHA256
    (truncated to 128 bits) over score, reasons, client and time with the
    install's secret, so nobody without the secret can write a header that
    :func:`verify_header` accepts.
    """
    score_text = points_text(score)
    reasons_text = ",".join(safe_reason(r) for r in reasons) or "-"
    when_text = str(int(when))
    token = _token(secret, score_text, reasons_text, client, when_text)
    return f"score={score_text}; reasons={reasons_text}; client={client}; time={when_text}; token={token}"


def parse_header(value: str) -> dict[str, str]:
    """The ``name=value`` fields of a header value (unfolded, header name allowed)."""
    text = " ".join(value.split())
    if text.lower().startswith(HEADER.lower() + ":"):
        text = text[len(HEADER) + 1 :]
    fields: dict[str, str] = {}
    for part in text.split(";"):
        name, equals, field = part.strip().partition("=")
        if equals and name and name not in fields:
            fields[name.strip().lower()] = field.strip()
    return fields


def verify_header(
    value: str,
    secret: bytes,
    client: str | None = None,
    now: float | None = None,
    max_age: float | None = None,
) -> float | None:
    """The score of a genuine ``X-Policyd-Network`` header, or None.

    For the milter: a header whose token does not verify with the install's
    secret was written by someone else (the sender) and must be ignored.

    :param value: the header's value (or the whole header line).
    :param secret: the install's secret (:func:`load_header_secret`).
    :param client: the SMTP client address the milter sees; when given, a
        header made for another client (a replayed copy) is refused too.
    :param now: current time, with ``max_age`` (default: the system clock).
    :param max_age: refuse headers older than this many seconds.
    """
    fields = parse_header(value)
    try:
        score_text = fields["score"]
        reasons = fields["reasons"]
        header_client = fields["client"]
        when = fields["time"]
        token = fields["token"]
    except KeyError:
        return None
    expected = _token(secret, score_text, reasons, header_client, when)
    if not hmac.compare_digest(expected, token.lower()):
        return None
    if client is not None:
        mine, theirs = parse_address(client), parse_address(header_client)
        if mine is None or mine != theirs:
            return None
    if max_age is not None:
        try:
            age = (now if now is not None else time.time()) - int(when)
        except ValueError:
            return None
        if age > max_age:
            return None
    try:
        return float(score_text)
    except ValueError:
        return None


def header_secret_path(config: Config) -> Path | None:
    """Where the header secret lives; None for a ``memory://`` store with no path set.

    ``inbound.header_secret`` when set, else ``header.secret`` beside the
    SQLite database, else in the state directory.  The policy server and
    the milter of one host read the same file.
    """
    return secret_file(config, SECRET_NAME, config.inbound.header_secret)


def load_header_secret(path: Path) -> bytes:
    """Read the header secret, creating it on first use (see :func:`policyd.statefiles.load_secret`)."""
    return load_secret(path, "header secret")


# --- local network lists -------------------------------------------------------
