"""The HTTP listener (``listen.http``): metrics, a JSON admin API and two small pages.

- ``/metrics``: Prometheus text format, no authentication (bind it to loopback
  or a management network).
- ``/api/v1/...``: the admin operations of the command line, as JSON, with
  ``Authorization: Bearer <token>`` (the token is in ``http.token_file``).
- ``/exemption``: a form where a user asks for a bulk-send exemption.
- ``/admin``: pending requests to approve or deny (HTTP Basic, any user
  name, the token as password).
- ``/self-service/...``: the quarantine digest's release and preference
  pages for recipients, opened by signed links (:mod:`policyd.web.selfservice`).

Pages are plain HTML with labels and no script.  Forms carry a token bound
to their purpose (and, on ``/admin``, to the admin user), signed with the
admin token; an admin decision must also come from the page's own origin
(:func:`same_origin`).  No page may be framed.  The public form counts
requests per client (:class:`~policyd.web.limits.ClientRate`) and answers
alike whether or not the account exists.  What any client may cost the
process on the wire (body size, time, connections) is bounded by
:mod:`policyd.web.limits`.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlsplit

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from policyd.admin import Admin, UnknownAccount, normalise_account, parse_when
from policyd.errors import PolicydError
from policyd.metrics import Metrics
from policyd.store import AuditEntry, Block, Exemption
from policyd.web import limits as httplimits
from policyd.web.limits import ClientRate, LimitedSite, client_key

log = logging.getLogger("policyd.http")

#: Largest request body read (JSON or form): admin calls are small.
MAX_BODY = httplimits.MAX_BODY
#: How long a form's CSRF token stays valid.
FORM_TTL = 3600

#: What a form token is for: the public exemption form, or decisions on ``/admin``.
EXEMPTION_FORM = "exemption"
ADMIN_FORM = "admin"

#: Requests one client may send the public form at once, and seconds to earn one more.
FORM_BURST = 5
FORM_EVERY = 60.0

#: Largest ``?limit=`` of the audit API: the log is read in one go.
AUDIT_AT_MOST = 10_000

#: Largest exemption id (SQLite integers are 64-bit signed).
ID_AT_MOST = 2**63 - 1

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


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp))


class _Handled(Exception):
    """An HTTP error to answer with: status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AdminSite:
    """Everything the HTTP resources need: the admin operations, metrics and the token.

    :param admin: admin operations (the same as the command line's).
    :param metrics: the server's metrics.
    :param token: the admin token (API bearer token, admin page password).
    :param self_service: the ``/self-service`` pages (:meth:`policyd.web.selfservice.SelfService.pages`).
    """

    def __init__(self, admin: Admin, metrics: Metrics, token: str, self_service: Resource | None = None) -> None:
        self.admin = admin
        self.metrics = metrics
        self.token = token
        self.self_service = self_service
        #: Requests to the public form, per client.
        self.form_rate = ClientRate(admin.clock, FORM_BURST, FORM_EVERY)

    def site(self) -> Site:
        """The twisted.web site to listen with (held to :mod:`policyd.web.limits`)."""
        root = _Index()
        root.putChild(b"", root)
        root.putChild(b"metrics", _MetricsPage(self))
        root.putChild(b"exemption", _RequestForm(self))
        root.putChild(b"admin", _AdminPage(self))
        api = Resource()
        api.putChild(b"v1", _Api(self))
        root.putChild(b"api", api)
        if self.self_service is not None:
            root.putChild(b"self-service", self.self_service)
        return LimitedSite(root, self.admin.clock, headers=HEADERS)

    # --- authentication ----------------------------------------------------

    def bearer_ok(self, request: Request) -> bool:
        """Whether the request carries the admin token as a Bearer token.

        Compared as bytes: a header in any encoding is a wrong token, not an error.
        """
        header = (request.getHeader(b"authorization") or b"").strip()
        scheme, _, value = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token.encode())

    def basic_ok(self, request: Request) -> bool:
        """Whether HTTP Basic credentials carry the admin token as password (compared as bytes)."""
        password = request.getPassword()
        return bool(password) and hmac.compare_digest(password, self.token.encode())

    def csrf(self, purpose: str, user: str = "", now: float | None = None) -> str:
        """A form token: a time and its HMAC, under the admin token, over purpose, user and time.

        :param purpose: what the form does (:data:`EXEMPTION_FORM`, :data:`ADMIN_FORM`).
        :param user: who it was given to (the admin user; empty on the public form).
        """
        stamp = str(int(now if now is not None else time.time()))
        # JSON keeps the three parts apart whatever characters the user name holds.
        signed = json.dumps(["form", purpose, user, stamp]).encode()
        mac = hmac.new(self.token.encode(), signed, hashlib.sha256).hexdigest()[:32]
        return f"{stamp}.{mac}"

    def csrf_ok(self, value: str, purpose: str, user: str = "") -> bool:
        """Whether a form token is ours, fresh, and was given for this purpose to this user."""
        stamp, _, _ = value.partition(".")
        if not re.fullmatch(r"[0-9]{1,12}", stamp) or time.time() - int(stamp) > FORM_TTL:
            return False
        return hmac.compare_digest(self.csrf(purpose, user, int(stamp)).encode(), value.encode())


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
    peer = request.getClientAddress()
    host = peer.host if isinstance(peer, IPv4Address | IPv6Address) else None
    if host is None or ipaddress.ip_address(host.split("%")[0]).is_loopback:
        forwarded = request.requestHeaders.getRawHeaders(b"x-forwarded-for") or []
        if forwarded:
            last = forwarded[-1].split(b",")[-1].strip().decode("ascii", "replace")
            try:
                return client_key(str(ipaddress.ip_address(last)))
            except ValueError:
                pass
    return client_key(host or "local")


def printable(text: str, longest: int = 64) -> str:
    """Client-given text fit for the audit log: control characters replaced, bounded."""
    return "".join(c if c.isprintable() else "?" for c in text.strip())[:longest]


def _user(request: Request) -> str:
    """The HTTP Basic user name, as the audit log shows it."""
    return printable(request.getUser().decode("utf-8", "replace"))


def _respond(request: Request, work: Callable[[], Awaitable[tuple[int, str, bytes]]], page: bool = False) -> Any:
    """Run ``work`` and write (status, content type, body); errors become clean answers.

    :param page: the answer is a page for people: errors are pages too, not JSON.
    """

    async def run() -> None:
        try:
            status, kind, body = await work()
        except _Handled as error:
            status, kind, body = _error(error.status, str(error), page)
        except PolicydError as error:
            status, kind, body = _error(400, str(error), page)
        except Exception as error:
            log.exception("HTTP %s %s failed", request.method.decode(), request.uri.decode(errors="replace"))
            if page:
                # People get a page that says what to do; the log line has the details.
                status, kind, body = _error(500, "policyd could not do this just now. Please try again in a "
                                            "few minutes, or ask your administrators.", page)
            else:
                status, kind, body = _error(500, f"internal error: {type(error).__name__}", page)
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


def _error(status: int, message: str, page: bool) -> tuple[int, str, bytes]:
    """An error answer: a JSON object ``{"error": …}``, or a page for people."""
    if not page:
        return status, "application/json", json.dumps({"error": message}).encode()
    _, kind, body = _page("Something went wrong", f'<p class="error" role="alert">{html.escape(message)}</p>')
    return status, kind, body


def _json(status: int, data: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(data, separators=(",", ":")).encode()


def _body(request: Request) -> bytes:
    assert request.content is not None
    data = request.content.read(MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise _Handled(413, f"request body larger than {MAX_BODY} bytes")
    return bytes(data)


def _json_body(request: Request) -> dict[str, Any]:
    raw = _body(request)
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        # RecursionError: thousands of nested brackets fit in the body limit.
        raise _Handled(400, "request body is not JSON") from None
    if not isinstance(data, dict):
        raise _Handled(400, "request body must be a JSON object")
    return data


def _form(request: Request) -> dict[str, str]:
    _body(request)
    assert request.args is not None
    return {
        k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace")
        for k, v in request.args.items()
        if v
    }


def _field(data: dict[str, Any], name: str, kind: type = str, required: bool = True) -> Any:
    value = data.get(name)
    if value is None or value == "":
        if required:
            raise _Handled(400, f"missing field {name!r}")
        return None
    if kind is int:
        # A JSON whole number, or one written as digits; not true, 1.5 or "1e3".
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,18}", value.strip()):
            return int(value)
        raise _Handled(400, f"field {name!r} must be a whole number")
    if not isinstance(value, str):
        raise _Handled(400, f"field {name!r} must be text")
    return value


# --- pages ---------------------------------------------------------------------


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:42rem;margin:1rem auto;padding:0 1rem;line-height:1.5}"
    "label{display:block;margin-top:.8rem;font-weight:600}"
    "input,textarea{width:100%;padding:.4rem;font-size:1rem;box-sizing:border-box}"
    "button{margin-top:1rem;padding:.5rem 1.2rem;font-size:1rem}"
    "table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ccc;padding:.3rem;text-align:left}"
    ".error{color:#a00}.ok{color:#060}"
)


def _whole(text: str, what: str, low: int, high: int) -> int:
    """A whole number from ``low`` to ``high`` written in ASCII digits (400 otherwise)."""
    text = text.strip()
    if not re.fullmatch(r"[0-9]{1,19}", text) or not low <= int(text) <= high:
        raise _Handled(400, f"{what} must be a whole number from {low} to {high}")
    return int(text)


def _query(request: Request, name: str) -> str | None:
    """The first value of a query parameter, as text."""
    values = request.args.get(name.encode()) if request.args else None
    return values[0].decode("utf-8", "replace") if values else None


def _when_field(text: str, now: float) -> float:
    """A time from a form or the API (:func:`policyd.admin.parse_when`); a year out of range is a usage error."""
    try:
        return parse_when(text, now)
    except (OverflowError, OSError):
        raise _Handled(400, f"{text!r}: not a time policyd can handle") from None


def _page(title: str, body: str) -> tuple[int, str, bytes]:
    document = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main><h1>{html.escape(title)}</h1>{body}</main></body></html>"
    )
    return 200, "text/html; charset=utf-8", document.encode()


class _Index(Resource):
    def render_GET(self, request: Request) -> bytes:
        _, kind, body = _page(
            "policyd",
            '<ul><li><a href="/exemption">Request a bulk-send exemption</a></li>'
            '<li><a href="/admin">Pending requests (administrators)</a></li>'
            '<li><a href="/metrics">Metrics</a></li></ul>',
        )
        request.setHeader("content-type", kind)
        return body


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, owner: AdminSite) -> None:
        super().__init__()
        self.owner = owner

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("content-type", "text/plain; version=0.0.4; charset=utf-8")
        return self.owner.metrics.exposition()


_FORM_FIELDS = (
    ("account", "Account (the login that will send)", "text", "email"),
    ("organisation", "Organisation", "text", "organization"),
    ("start", "From (date and time)", "datetime-local", "off"),
    ("end", "Until (date and time)", "datetime-local", "off"),
    ("limit", "Messages per hour needed", "number", "off"),
)


class _RequestForm(Resource):
    """The user's exemption request form."""

    isLeaf = True

    def __init__(self, owner: AdminSite) -> None:
        super().__init__()
        self.owner = owner

    def render_GET(self, request: Request) -> Any:
        return _respond(request, lambda: self._show({}, ""), page=True)

    async def _show(self, values: dict[str, str], error: str) -> tuple[int, str, bytes]:
        fields = "".join(
            f'<label for="{name}">{html.escape(label)}</label>'
            f'<input id="{name}" name="{name}" type="{kind}" autocomplete="{auto}" required '
            f'value="{html.escape(values.get(name, ""))}">'
            for name, label, kind, auto in _FORM_FIELDS
        )
        message = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
        return _page(
            "Request a bulk-send exemption",
            f"{message}<p>Accounts may send {self.owner.admin.config.outbound.limit} messages an hour to "
            "external recipients. For one occasion that needs more, describe it below; an "
            "administrator approves or denies each request.</p>"
            f'<form method="post" action="/exemption">{fields}'
            '<label for="reason">Business reason</label>'
            f'<textarea id="reason" name="reason" rows="4" required>{html.escape(values.get("reason", ""))}'
            "</textarea>"
            f'<input type="hidden" name="csrf" value="{self.owner.csrf(EXEMPTION_FORM)}">'
            '<button type="submit">Send the request</button></form>',
        )

    def render_POST(self, request: Request) -> Any:
        return _respond(request, lambda: self._submit(request), page=True)

    async def _submit(self, request: Request) -> tuple[int, str, bytes]:
        wait = self.owner.form_rate.take(client_address(request))
        if wait:
            return self._too_many(request, wait)
        values = _form(request)
        if not self.owner.csrf_ok(values.get("csrf", ""), EXEMPTION_FORM):
            return await self._show(values, "The form has expired; please send it again.")
        admin = self.owner.admin
        organisation = values.get("organisation", "").strip()
        reason = values.get("reason", "").strip()
        now = admin.clock.seconds()
        try:
            account = normalise_account(values.get("account", ""))
            limit = int(values.get("limit", "0") or 0)
            start, end = _when_field(values.get("start", ""), now), _when_field(values.get("end", ""), now)
            by = f"web:{printable(account)}"
            made = await admin.request_exemption(
                account, limit, start, end,
                f"{reason} (organisation: {organisation})" if organisation and reason else reason, by,
            )
        except UnknownAccount:
            # Answered like a recorded request, so that the form does not tell
            # who has an account; the administrators see the attempt in the
            # audit log, and nothing is pending.
            log.info("exemption form: request for unknown account %r (client %s) not recorded",
                     account, client_address(request))
            await admin.store.record(AuditEntry(now, by, "exemption-refused", printable(account, 320),
                                                "not a valid account"))
            return self._received(account, limit, start, end)
        except _Handled as error:
            return await self._show(values, str(error))
        except (PolicydError, ValueError) as error:
            return await self._show(values, str(error) if isinstance(error, PolicydError) else "Invalid number.")
        return self._received(made.account, made.limit, made.start, made.end)

    @staticmethod
    def _received(account: str, limit: int, start: float, end: float) -> tuple[int, str, bytes]:
        """The same answer whether or not the account exists."""
        _, kind, body = _page(
            "Request received",
            f'<p class="ok" role="status">Your request for {html.escape(account)} ({limit} messages an hour, '
            f"{_when(start)} to {_when(end)}) is recorded: an administrator will review it.</p>",
        )
        return 201, kind, body

    @staticmethod
    def _too_many(request: Request, wait: float) -> tuple[int, str, bytes]:
        minutes = max(1, math.ceil(wait / 60))
        request.setHeader("retry-after", str(math.ceil(wait)))
        _, kind, body = _page(
            "Too many requests",
            '<p class="error" role="alert">This form was sent too many times from your network in a short '
            f"while. Nothing was recorded. Please try again in {minutes} minute{'s' if minutes > 1 else ''}, "
            "or ask your helpdesk.</p>",
        )
        return 429, kind, body


class _AdminPage(Resource):
    """Pending requests, to approve or deny (HTTP Basic, the token as password)."""

    isLeaf = True

    def __init__(self, owner: AdminSite) -> None:
        super().__init__()
        self.owner = owner

    def _challenge(self, request: Request) -> bytes:
        request.setResponseCode(401)
        request.setHeader("www-authenticate", 'Basic realm="policyd admin", charset="UTF-8"')
        request.setHeader("content-type", "text/plain; charset=utf-8")
        return b"The admin token is needed (any user name, the token as password).\n"

    def render_GET(self, request: Request) -> Any:
        if not self.owner.basic_ok(request):
            return self._challenge(request)
        return _respond(request, lambda: self._list(request, ""), page=True)

    async def _list(self, request: Request, note: str) -> tuple[int, str, bytes]:
        admin = self.owner.admin
        now = admin.clock.seconds()
        pending = [e for e in await admin.exemptions() if e.state(now) == "pending"]
        token = self.owner.csrf(ADMIN_FORM, _user(request))
        rows = "".join(
            f"<tr><td>{e.id}</td><td>{html.escape(e.account)}</td><td>{e.limit}</td>"
            f"<td>{_when(e.start)} – {_when(e.end)}</td><td>{html.escape(e.reason)}</td><td>"
            f'<form method="post" action="/admin"><input type="hidden" name="id" value="{e.id}">'
            f'<input type="hidden" name="csrf" value="{token}">'
            f'<label for="reason-{e.id}">Note</label><input id="reason-{e.id}" name="reason">'
            f'<button name="action" value="approve" id="approve-{e.id}">Approve</button> '
            f'<button name="action" value="deny" id="deny-{e.id}">Deny</button></form></td></tr>'
            for e in pending
        )
        table = (
            "<table><thead><tr><th>#</th><th>Account</th><th>Per hour</th><th>Window</th>"
            f"<th>Reason</th><th>Decision</th></tr></thead><tbody>{rows}</tbody></table>"
            if pending
            else "<p>No pending request.</p>"
        )
        message = f'<p class="ok" role="status">{html.escape(note)}</p>' if note else ""
        return _page("Pending exemption requests", message + table)

    def render_POST(self, request: Request) -> Any:
        if not self.owner.basic_ok(request):
            return self._challenge(request)
        return _respond(request, lambda: self._decide(request), page=True)

    async def _decide(self, request: Request) -> tuple[int, str, bytes]:
        if not same_origin(request):
            log.warning("admin page: decision posted from another site (Origin %r) refused",
                        (request.getHeader(b"origin") or request.getHeader(b"referer") or b"").decode("ascii", "replace"))
            raise _Handled(403, "This request came from another site; nothing was changed.")
        values = _form(request)
        if not self.owner.csrf_ok(values.get("csrf", ""), ADMIN_FORM, _user(request)):
            _, kind, body = await self._list(request, "The page had expired; nothing was changed.")
            return 403, kind, body
        admin = self.owner.admin
        by = f"web:{_user(request) or 'admin'}"
        ident = _whole(values.get("id", ""), "the request number", 1, ID_AT_MOST)
        try:
            if values.get("action") == "approve":
                done = await admin.approve(ident, by, values.get("reason", ""))
            else:
                done = await admin.deny(ident, by, values.get("reason", "") or "denied")
        except PolicydError as error:
            return await self._list(request, str(error))
        return await self._list(request, f"Request {done.id} for {done.account}: {done.status}.")


class _Api(Resource):
    """``/api/v1/``: the command line's admin operations as JSON."""

    isLeaf = True

    def __init__(self, owner: AdminSite) -> None:
        super().__init__()
        self.owner = owner

    def render(self, request: Request) -> Any:
        if not self.owner.bearer_ok(request):
            status, kind, body = _error(401, "missing or wrong Bearer token", page=False)
            request.setResponseCode(status)
            request.setHeader("content-type", kind)
            request.setHeader("www-authenticate", 'Bearer realm="policyd"')
            return body
        return _respond(request, lambda: self._route(request))

    async def _route(self, request: Request) -> tuple[int, str, bytes]:
        admin = self.owner.admin
        method = request.method.decode()
        parts = [p.decode("utf-8", "replace") for p in request.postpath or [] if p]
        named = printable((request.getHeader(b"x-policyd-by") or b"").decode("utf-8", "replace"))
        by = f"api:{named or 'admin'}"
        now = admin.clock.seconds()
        if method == "GET" and parts == ["blocks"]:
            return _json(200, [b.as_dict() for b in await admin.blocks()])
        if method == "GET" and len(parts) == 2 and parts[0] == "status":
            return _json(200, (await admin.status(parts[1])).as_dict())
        if method == "GET" and parts == ["audit"]:
            given = _query(request, "limit")
            limit = 100 if given is None else _whole(given, "limit", 1, AUDIT_AT_MOST)
            return _json(200, [e.as_dict() for e in await admin.audit(limit)])
        if method == "POST" and parts == ["unblock"]:
            data = _json_body(request)
            lifted: Block = await admin.unblock(_field(data, "account"), _field(data, "reason"), by)
            return _json(200, {"account": lifted.account, "unblocked": True})
        if method == "POST" and parts == ["block"]:
            data = _json_body(request)
            made = await admin.block(_field(data, "account"), _field(data, "reason"), by)
            return _json(200, made.as_dict())
        if method == "GET" and parts == ["exemptions"]:
            return _json(200, [e.as_dict(now) for e in await admin.exemptions()])
        if method == "POST" and parts == ["exemptions"]:
            data = _json_body(request)
            requested: Exemption = await admin.request_exemption(
                _field(data, "account"),
                _field(data, "limit", int),
                _when_field(_field(data, "from"), now),
                _when_field(_field(data, "until"), now),
                _field(data, "reason"),
                by,
            )
            return _json(201, {"id": requested.id, "status": requested.status})
        if method == "POST" and len(parts) == 3 and parts[0] == "exemptions":
            ident, action = _whole(parts[1], "an exemption id", 1, ID_AT_MOST), parts[2]
            data = _json_body(request)
            reason = _field(data, "reason", required=action != "approve") or ""
            if action == "approve":
                decided = await admin.approve(ident, by, reason)
            elif action == "deny":
                decided = await admin.deny(ident, by, reason)
            elif action == "revoke":
                decided = await admin.revoke(ident, by, reason)
            else:
                raise _Handled(404, f"unknown action {action!r}")
            return _json(200, decided.as_dict(now))
        raise _Handled(404, f"no such API call: {method} /api/v1/{quote('/'.join(parts))}")
