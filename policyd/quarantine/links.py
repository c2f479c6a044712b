"""Signed links of the quarantine digest: release one held message, choose inbox or quarantine.

A link is ``<payload>.<mac>``: the payload (base64url of a small JSON list)
names what the link does, the recipient, the held message (its id and the
time it was held, so an id the store hands out again never matches another
message) and when the link expires; the MAC is HMAC-SHA-256 of the payload
text under the install's link secret (``quarantine.link_secret``), in
base64url.  Both parts are compared as text, so no character of a link can
change without it being refused.  Links are checked against an injected
clock, so tests make them expire without waiting.

Forms on the pages carry a token bound to the link and to the time, signed
with the same secret (:meth:`LinkSigner.form_token`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

from policyd.config import Config
from policyd.statefiles import load_secret, process_secret, secret_file
from policyd.store import Quarantined

log = logging.getLogger("policyd.links")

#: What a link does.
RELEASE = "release"
PREFERENCE = "preference"
_KINDS = {"r": RELEASE, "p": PREFERENCE}

#: File name of the link secret beside the SQLite store (or in /var/lib/policyd).
SECRET_NAME = "link.secret"  # noqa: S105 (a file name, not a secret)

#: How long a page's form stays valid after the page was shown.
FORM_TTL = 3600.0

#: Longest link accepted before it is even decoded: real ones are ~150 characters.
MAX_LINK = 2048


class LinkError(Exception):
    """A link that is refused.

    :ivar reason: ``invalid`` (forged, altered, cut short) or ``expired``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@attrs.frozen
class Link:
    """What a genuine link says.

    :ivar kind: :data:`RELEASE` or :data:`PREFERENCE`.
    :ivar recipient: the address the link was made for.
    :ivar expires: when it stops working.
    :ivar entry: the held message's id (release links).
    :ivar held: when that message was held, in milliseconds (release links).
    """

    kind: str
    recipient: str
    expires: float
    entry: int = 0
    held: int = 0

    def names(self, entry: Quarantined) -> bool:
        """Whether this release link is for ``entry`` (same id, recipient and time held)."""
        return (
            self.kind == RELEASE
            and entry.id == self.entry
            and entry.recipient == self.recipient
            and held_ms(entry.at) == self.held
        )


def held_ms(at: float) -> int:
    """A held message's time as whole milliseconds (what links carry)."""
    return int(round(at * 1000))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class LinkSigner:
    """Makes and checks links with the install's secret.

    :param secret: the link secret (:func:`link_secret`).
    :param clock: time source for expiry.
    :param ttl: how long a link works (``quarantine.link_ttl``).
    """

    def __init__(self, secret: bytes, clock: IReactorTime, ttl: float) -> None:
        self.secret = secret
        self.clock = clock
        self.ttl = ttl

    def _mac(self, text: str, purpose: bytes = b"policyd-link") -> str:
        return _b64(hmac.new(self.secret, purpose + b"\0" + text.encode("ascii"), hashlib.sha256).digest())

    def _sign(self, fields: list[Any]) -> str:
        payload = _b64(json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        return f"{payload}.{self._mac(payload)}"

    def release(self, entry: Quarantined, now: float | None = None) -> str:
        """A link that releases ``entry`` to its recipient."""
        expires = int((self.clock.seconds() if now is None else now) + self.ttl)
        return self._sign(["r", entry.recipient, expires, entry.id, held_ms(entry.at)])

    def preference(self, recipient: str, now: float | None = None) -> str:
        """A link to ``recipient``'s preference page."""
        expires = int((self.clock.seconds() if now is None else now) + self.ttl)
        return self._sign(["p", recipient, expires])

    def verify(self, token: str, kind: str) -> Link:
        """What a link says, when it is genuine, of ``kind`` and still valid.

        :raises LinkError: ``invalid`` for anything forged, altered or cut
            short; ``expired`` for a genuine link past its time.
        """
        if len(token) > MAX_LINK or not token.isascii() or token.count(".") != 1:
            raise LinkError("invalid", "not a policyd link")
        payload, mac = token.split(".")
        if not hmac.compare_digest(self._mac(payload).encode(), mac.encode("ascii", "replace")):
            raise LinkError("invalid", "bad signature")
        try:
            fields = json.loads(_unb64(payload).decode("utf-8"))
            code, recipient, expires, *rest = fields
            link = Link(_KINDS[code], str(recipient), float(expires), *(int(v) for v in rest))
        except (ValueError, TypeError, KeyError, binascii.Error, UnicodeDecodeError):
            # Signed by us yet unreadable: only a bug could make one; refuse it all the same.
            raise LinkError("invalid", "unreadable link") from None
        if link.kind != kind:
            raise LinkError("invalid", f"a {link.kind} link, not a {kind} link")
        if self.clock.seconds() >= link.expires:
            raise LinkError("expired", "the link has expired")
        return link

    def form_token(self, token: str, now: float | None = None) -> str:
        """The anti-forgery token of a page's form: a time and a MAC bound to the link."""
        stamp = str(int(self.clock.seconds() if now is None else now))
        return f"{stamp}.{self._mac(f'{stamp}.{token}', b'policyd-form')}"

    def form_ok(self, value: str, token: str) -> bool:
        """Whether a form token is ours, for this link, and fresh."""
        stamp, _, _ = value.partition(".")
        if not stamp.isdigit() or not 0 <= self.clock.seconds() - int(stamp) <= FORM_TTL:
            return False
        return hmac.compare_digest(self.form_token(token, int(stamp)).encode(), value.encode("ascii", "replace"))


def link_secret(config: Config) -> bytes:
    """The install's link secret: ``quarantine.link_secret``, else ``link.secret``
    beside the SQLite store, else in the state directory; created on first use.

    A ``memory://`` store without ``quarantine.link_secret`` gets a secret for
    this process only (its quarantine is gone at exit anyway).

    :raises OSError: when the file cannot be read or created.
    :raises ValueError: when it holds too short a secret.
    """
    path = secret_file(config, SECRET_NAME, config.quarantine.link_secret)
    return process_secret() if path is None else load_secret(path, "link secret")
