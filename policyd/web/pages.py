"""What every page and API answer of the HTTP listener shares.

Answers are ``(status, content type, body)``; :func:`respond` writes one
with :data:`HEADERS` and turns errors into clean answers (JSON for the API,
a page for people, in their language).  Request bodies are read within
:data:`MAX_BODY`; form and JSON fields are checked here, each refusal a 400
that says why.  Who a page's user is, when a reverse proxy that
authenticates users says so, is :func:`asserted_user`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.web.server import NOT_DONE_YET, Request

from policyd.errors import PolicydError
from policyd.web.limits import MAX_BODY, client_key
from policyd.web.render import Answer, Texts, message_page

log = logging.getLogger("policyd.http")

__all__ = ["Answer", "HEADERS", "HttpError", "respond"]

#: Headers of every answer: no page may be framed, load anything from
#: elsewhere, run a script, or post a form to another site; no content type
#: is guessed; the admin page's own posts keep their ``Origin``.
HEADERS = {
    "x-frame-options": "DENY",
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
    "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}


class HttpError(Exception):
    """An HTTP error to answer with: status and message.

    :param key: the text that says it on a page (a key of the page
        catalogues, filled in with ``values``); None: the message, as is.
    """

    def __init__(self, status: int, message: str, key: str | None = None, **values: object) -> None:
        super().__init__(message)
        self.status = status
        self.key = key
        self.values = values

    def shown(self, language: str) -> str:
        """What a page says of it, in ``language``."""
        return Texts(language)(self.key, **self.values) if self.key else str(self)


def same_origin(request: Request) -> bool:
    """Whether a state-changing request comes from a page of this site.

    A browser sends ``Origin`` with every POST; it must name the host the
    request was sent to (``Host``, or ``X-Forwarded-Host`` from a reverse
    proxy that rewrites ``Host``; a page of another site can set neither).
    The scheme is not compared: a proxy in front may speak HTTPS.  ``null``
    (an opaque origin: a sandboxed frame, a ``data:`` page) is refused.
    Without ``Origin``, ``Referer`` is checked the same way when present;
    with neither, the request is not from a browser page (curl, scripts),
    so cross-site forgery is not in question and the form token suffices.
    """
    origin = request.getHeader(b"origin")
    if origin is None:
        origin = request.getHeader(b"referer")
        if origin is None:
            return True
    here = _authority(origin.strip())
    if here is None:
        return False
    hosts = [request.getHeader(b"host") or b""]
    for forwarded in request.requestHeaders.getRawHeaders(b"x-forwarded-host") or []:
        hosts += forwarded.split(b",")
    return any(_same_authority(here, _authority(b"//" + host.strip())) for host in hosts if host.strip())


def _authority(url: bytes) -> tuple[str, int | None] | None:
    """(host, port) of a URL; the port is None when the URL gives none; None for no host."""
    try:
        parts = urlsplit(url.decode("ascii"))
        port = parts.port
    except (UnicodeDecodeError, ValueError):
        return None
    if not parts.hostname:
        return None
    if port is None and parts.scheme in ("http", "https"):
        port = 80 if parts.scheme == "http" else 443
    return parts.hostname, port


def _same_authority(origin: tuple[str, int | None], host: tuple[str, int | None] | None) -> bool:
    if host is None or origin[0] != host[0]:
        return False
    # A Host header without a port names the scheme's default one.
    return host[1] is None and origin[1] in (80, 443) or host[1] == origin[1]


def client_address(request: Request) -> str:
    """Who is counted for the public form's rate: the client address, an IPv6 one by its /64.

    A request from loopback (or a local socket) that carries
    ``X-Forwarded-For`` came through a reverse proxy on this host: the
    address that proxy appended (the last one) is the client's.
    """
    host = _peer_host(request)
    if _from_this_host(host):
        forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for") or []
        if forwarded:
            last = forwarded[-1].split(b",")[-1].strip().decode("ascii", "replace")
            try:
                return client_key(str(ipaddress.ip_address(last)))
            except ValueError:
                pass
    return client_key(host or "local")


def _peer_host(request: Request) -> str | None:
    """The client's IP address; None for a local (UNIX) socket."""
    peer = request.getClientAddress()
    return peer.host if isinstance(peer, IPv4Address | IPv6Address) else None


def _from_this_host(host: str | None) -> bool:
    """Whether the peer is on this host (loopback, or a local socket): a reverse proxy we run."""
    return host is None or ipaddress.ip_address(host.split("%")[0]).is_loopback


def asserted_user(request: Request, header: str | None) -> str | None:
    """The user a reverse proxy in front of the pages authenticated; None when no one vouches.

    The name is read from ``header`` (``http.user_header``, e.g.
    ``X-Remote-User``) only when the request came from this host (loopback
    or a local socket), where the proxy runs: a client elsewhere could send
    any name in it.  The proxy must set the header itself, replacing any
    value the client sent.

    :param header: the header's name; None: the deployment authenticates no one.
    """
    if not header:
        return None
    if not _from_this_host(_peer_host(request)):
        return None
    value = request.getHeader(header.encode("ascii", "replace"))
    if value is None:
        return None
    user = printable(value.decode("utf-8", "replace"), 320)
    return user or None


def printable(text: str, longest: int = 64) -> str:
    """Client-given text fit for the audit log: control characters replaced, bounded."""
    return "".join(c if c.isprintable() else "?" for c in text.strip())[:longest]


def respond(
    request: Request, work: Callable[[], Awaitable[Answer]], page: bool = False, language: str = "en"
) -> Any:
    """Run ``work`` and write (status, content type, body); errors become clean answers.

    :param page: the answer is a page for people: errors are pages too, not JSON.
    :param language: the language of those pages.
    """

    async def run() -> None:
        try:
            status, kind, body = await work()
        except HttpError as error:
            status, kind, body = error_answer(error.status, error.shown(language) if page else str(error),
                                              page, language)
        except PolicydError as error:
            status, kind, body = error_answer(400, str(error), page, language)
        except Exception as error:
            log.exception("HTTP %s %s failed", request.method.decode(), request.uri.decode(errors="replace"))
            if page:
                # People get a page that says what to do; the log line has the details.
                text = Texts(language)("error.internal")
                status, kind, body = error_answer(500, text, page, language)
            else:
                status, kind, body = error_answer(500, f"internal error: {type(error).__name__}", page)
        if request.finished or request._disconnected:
            return
        request.setResponseCode(status)
        request.setHeader("content-type", kind)
        request.setHeader("cache-control", "no-store")
        request.setHeader("x-content-type-options", "nosniff")
        request.write(body)
        request.finish()

    Deferred.fromCoroutine(run())
    return NOT_DONE_YET


def error_answer(status: int, message: str, page: bool, language: str = "en") -> Answer:
    """An error answer: a JSON object ``{"error": …}``, or a page for people in ``language``."""
    if not page:
        return status, "application/json", json.dumps({"error": message}).encode()
    return message_page(status, language, Texts(language)("error.title"), message)


def json_answer(status: int, data: Any) -> tuple[int, str, bytes]:
    """A JSON answer, compact."""
    return status, "application/json", json.dumps(data, separators=(",", ":")).encode()


def read_body(request: Request) -> bytes:
    """The request body, refused (413) past :data:`MAX_BODY`."""
    assert request.content is not None
    data = request.content.read(MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise HttpError(413, f"request body larger than {MAX_BODY} bytes")
    return bytes(data)


def json_body(request: Request) -> dict[str, Any]:
    """The request body as a JSON object; 400 when it is not one."""
    raw = read_body(request)
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        # RecursionError: thousands of nested brackets fit in the body limit.
        raise HttpError(400, "request body is not JSON") from None
    if not isinstance(data, dict):
        raise HttpError(400, "request body must be a JSON object")
    return data


def form_fields(request: Request) -> dict[str, str]:
    """A form's fields as text (the first value of each), the body read within its bound."""
    read_body(request)
    assert request.args is not None
    return {
        k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace")
        for k, v in request.args.items()
        if v
    }


def field(data: dict[str, Any], name: str, kind: type = str, required: bool = True) -> Any:
    """One field of a form or JSON body, as ``kind`` (text or a whole number); 400 when missing or wrong."""
    value = data.get(name)
    if value is None or value == "":
        if required:
            raise HttpError(400, f"missing field {name!r}")
        return None
    if kind is int:
        # A JSON whole number, or one written as digits; not true, 1.5 or "1e3".
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value.strip()):
            return int(value)
        raise HttpError(400, f"field {name!r} must be a whole number")
    if not isinstance(value, str):
        raise HttpError(400, f"field {name!r} must be text")
    return value


def whole_number(text: str, what: str, low: int, high: int) -> int:
    """A whole number from ``low`` to ``high`` written in ASCII digits (400 otherwise)."""
    text = text.strip()
    if not re.fullmatch(r"[0-9]{1,19}", text) or not low <= int(text) <= high:
        raise HttpError(400, f"{what} must be a whole number from {low} to {high}")
    return int(text)


def query(request: Request, name: str) -> str | None:
    """The first value of a query parameter, as text."""
    values = request.args.get(name.encode()) if request.args else None
    return values[0].decode("utf-8", "replace") if values else None
