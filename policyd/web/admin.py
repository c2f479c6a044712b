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

Pages are plain HTML with labels and no script; forms carry a CSRF token
signed with the admin token.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from policyd.admin import Admin, parse_when
from policyd.errors import PolicydError
from policyd.metrics import Metrics
from policyd.store import Block, Exemption

log = logging.getLogger("policyd.http")

#: Largest request body read (JSON or form): admin calls are small.
MAX_BODY = 64 * 1024
#: How long a form's CSRF token stays valid.
FORM_TTL = 3600


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

    def site(self) -> Site:
        """The twisted.web site to listen with."""
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
        site = Site(root)
        site.noisy = False
        site.displayTracebacks = False
        return site

    # --- authentication ----------------------------------------------------

    def bearer_ok(self, request: Request) -> bool:
        """Whether the request carries the admin token as a Bearer token."""
        header = (request.getHeader("authorization") or "").strip()
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip(), self.token)

    def basic_ok(self, request: Request) -> bool:
        """Whether HTTP Basic credentials carry the admin token as password."""
        password = request.getPassword()
        return bool(password) and hmac.compare_digest(password.decode("utf-8", "replace"), self.token)

    def csrf(self, now: float | None = None) -> str:
        """A form token: a time and its HMAC under the admin token."""
        stamp = str(int(now if now is not None else time.time()))
        mac = hmac.new(self.token.encode(), f"form:{stamp}".encode(), hashlib.sha256).hexdigest()[:32]
        return f"{stamp}.{mac}"

    def csrf_ok(self, value: str) -> bool:
        """Whether a form token is ours and fresh."""
        stamp, _, mac = value.partition(".")
        if not stamp.isdigit() or time.time() - int(stamp) > FORM_TTL:
            return False
        return hmac.compare_digest(self.csrf(int(stamp)), value)


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
    except (ValueError, UnicodeDecodeError):
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
        try:
            return int(value)
        except (TypeError, ValueError):
            raise _Handled(400, f"field {name!r} must be a whole number") from None
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
            f'<input type="hidden" name="csrf" value="{self.owner.csrf()}">'
            '<button type="submit">Send the request</button></form>',
        )

    def render_POST(self, request: Request) -> Any:
        return _respond(request, lambda: self._submit(request), page=True)

    async def _submit(self, request: Request) -> tuple[int, str, bytes]:
        values = _form(request)
        if not self.owner.csrf_ok(values.get("csrf", "")):
            return await self._show(values, "The form has expired; please send it again.")
        admin = self.owner.admin
        organisation = values.get("organisation", "").strip()
        reason = values.get("reason", "").strip()
        try:
            now = admin.clock.seconds()
            limit = int(values.get("limit", "0") or 0)
            made = await admin.request_exemption(
                values.get("account", ""),
                limit,
                parse_when(values.get("start", ""), now),
                parse_when(values.get("end", ""), now),
                f"{reason} (organisation: {organisation})" if organisation and reason else reason,
                f"web:{values.get('account', '').strip().lower()}",
            )
        except (PolicydError, ValueError) as error:
            return await self._show(values, str(error) if isinstance(error, PolicydError) else "Invalid number.")
        _, kind, body = _page(
            "Request received",
            f'<p class="ok" role="status">Your request number <strong>{made.id}</strong> for '
            f"{html.escape(made.account)} ({made.limit} messages an hour, {_when(made.start)} to "
            f"{_when(made.end)}) waits for an administrator.</p>",
        )
        return 201, kind, body


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
        return _respond(request, lambda: self._list(""), page=True)

    async def _list(self, note: str) -> tuple[int, str, bytes]:
        admin = self.owner.admin
        now = admin.clock.seconds()
        pending = [e for e in await admin.exemptions() if e.state(now) == "pending"]
        token = self.owner.csrf()
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
        values = _form(request)
        if not self.owner.csrf_ok(values.get("csrf", "")):
            return await self._list("The page had expired; nothing was changed.")
        admin = self.owner.admin
        user = request.getUser().decode("utf-8", "replace") or "admin"
        ident = int(values.get("id", "0") or 0)
        try:
            if values.get("action") == "approve":
                done = await admin.approve(ident, f"web:{user}", values.get("reason", ""))
            else:
                done = await admin.deny(ident, f"web:{user}", values.get("reason", "") or "denied")
        except PolicydError as error:
            return await self._list(str(error))
        return await self._list(f"Request {done.id} for {done.account}: {done.status}.")


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
        by = f"api:{(request.getHeader('x-policyd-by') or 'admin').strip()[:64]}"
        now = admin.clock.seconds()
        if method == "GET" and parts == ["blocks"]:
            return _json(200, [b.as_dict() for b in await admin.blocks()])
        if method == "GET" and len(parts) == 2 and parts[0] == "status":
            return _json(200, (await admin.status(parts[1])).as_dict())
        if method == "GET" and parts == ["audit"]:
            assert request.args is not None
            limit = int((request.args.get(b"limit") or [b"100"])[0] or 100)
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
                parse_when(_field(data, "from"), now),
                parse_when(_field(data, "until"), now),
                _field(data, "reason"),
                by,
            )
            return _json(201, {"id": requested.id, "status": requested.status})
        if method == "POST" and len(parts) == 3 and parts[0] == "exemptions" and parts[1].isdigit():
            data = _json_body(request)
            ident, action = int(parts[1]), parts[2]
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
