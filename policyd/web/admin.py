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
import json
import logging
import math
import re
import time
from typing import Any
from urllib.parse import quote

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from policyd.admin import Admin, UnknownAccount, normalise_account, parse_when
from policyd.errors import PolicydError
from policyd.metrics import Metrics
from policyd.store import AuditEntry, Block, Exemption
from policyd.web.limits import ClientRate, LimitedSite
from policyd.web.pages import (
    HEADERS,
    HttpError,
    client_address,
    error_answer,
    field,
    form_fields,
    html_page,
    json_answer,
    json_body,
    printable,
    query,
    respond,
    same_origin,
    whole_number,
)

log = logging.getLogger("policyd.http")

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

def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp))


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


def _user(request: Request) -> str:
    """The HTTP Basic user name, as the audit log shows it."""
    return printable(request.getUser().decode("utf-8", "replace"))


# --- pages ---------------------------------------------------------------------


def _when_field(text: str, now: float) -> float:
    """A time from a form or the API (:func:`policyd.admin.parse_when`); a year out of range is a usage error."""
    try:
        return parse_when(text, now)
    except (OverflowError, OSError):
        raise HttpError(400, f"{text!r}: not a time policyd can handle") from None


class _Index(Resource):
    def render_GET(self, request: Request) -> bytes:
        _, kind, body = html_page(
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
        return respond(request, lambda: self._show({}, ""), page=True)

    async def _show(self, values: dict[str, str], error: str) -> tuple[int, str, bytes]:
        fields = "".join(
            f'<label for="{name}">{html.escape(label)}</label>'
            f'<input id="{name}" name="{name}" type="{kind}" autocomplete="{auto}" required '
            f'value="{html.escape(values.get(name, ""))}">'
            for name, label, kind, auto in _FORM_FIELDS
        )
        message = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
        return html_page(
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
        return respond(request, lambda: self._submit(request), page=True)

    async def _submit(self, request: Request) -> tuple[int, str, bytes]:
        wait = self.owner.form_rate.take(client_address(request))
        if wait:
            return self._too_many(request, wait)
        values = form_fields(request)
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
        except HttpError as error:
            return await self._show(values, str(error))
        except (PolicydError, ValueError) as error:
            return await self._show(values, str(error) if isinstance(error, PolicydError) else "Invalid number.")
        return self._received(made.account, made.limit, made.start, made.end)

    @staticmethod
    def _received(account: str, limit: int, start: float, end: float) -> tuple[int, str, bytes]:
        """The same answer whether or not the account exists."""
        _, kind, body = html_page(
            "Request received",
            f'<p class="ok" role="status">Your request for {html.escape(account)} ({limit} messages an hour, '
            f"{_when(start)} to {_when(end)}) is recorded: an administrator will review it.</p>",
        )
        return 201, kind, body

    @staticmethod
    def _too_many(request: Request, wait: float) -> tuple[int, str, bytes]:
        minutes = max(1, math.ceil(wait / 60))
        request.setHeader("retry-after", str(math.ceil(wait)))
        _, kind, body = html_page(
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
        return respond(request, lambda: self._list(request, ""), page=True)

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
        return html_page("Pending exemption requests", message + table)

    def render_POST(self, request: Request) -> Any:
        if not self.owner.basic_ok(request):
            return self._challenge(request)
        return respond(request, lambda: self._decide(request), page=True)

    async def _decide(self, request: Request) -> tuple[int, str, bytes]:
        if not same_origin(request):
            log.warning("admin page: decision posted from another site (Origin %r) refused",
                        (request.getHeader(b"origin") or request.getHeader(b"referer") or b"").decode("ascii", "replace"))
            raise HttpError(403, "This request came from another site; nothing was changed.")
        values = form_fields(request)
        if not self.owner.csrf_ok(values.get("csrf", ""), ADMIN_FORM, _user(request)):
            _, kind, body = await self._list(request, "The page had expired; nothing was changed.")
            return 403, kind, body
        admin = self.owner.admin
        by = f"web:{_user(request) or 'admin'}"
        ident = whole_number(values.get("id", ""), "the request number", 1, ID_AT_MOST)
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
            status, kind, body = error_answer(401, "missing or wrong Bearer token", page=False)
            request.setResponseCode(status)
            request.setHeader("content-type", kind)
            request.setHeader("www-authenticate", 'Bearer realm="policyd"')
            return body
        return respond(request, lambda: self._route(request))

    async def _route(self, request: Request) -> tuple[int, str, bytes]:
        admin = self.owner.admin
        method = request.method.decode()
        parts = [p.decode("utf-8", "replace") for p in request.postpath or [] if p]
        named = printable((request.getHeader(b"x-policyd-by") or b"").decode("utf-8", "replace"))
        by = f"api:{named or 'admin'}"
        now = admin.clock.seconds()
        if method == "GET" and parts == ["blocks"]:
            return json_answer(200, [b.as_dict() for b in await admin.blocks()])
        if method == "GET" and len(parts) == 2 and parts[0] == "status":
            return json_answer(200, (await admin.status(parts[1])).as_dict())
        if method == "GET" and parts == ["audit"]:
            given = query(request, "limit")
            limit = 100 if given is None else whole_number(given, "limit", 1, AUDIT_AT_MOST)
            return json_answer(200, [e.as_dict() for e in await admin.audit(limit)])
        if method == "POST" and parts == ["unblock"]:
            data = json_body(request)
            lifted: Block = await admin.unblock(field(data, "account"), field(data, "reason"), by)
            return json_answer(200, {"account": lifted.account, "unblocked": True})
        if method == "POST" and parts == ["block"]:
            data = json_body(request)
            made = await admin.block(field(data, "account"), field(data, "reason"), by)
            return json_answer(200, made.as_dict())
        if method == "GET" and parts == ["exemptions"]:
            return json_answer(200, [e.as_dict(now) for e in await admin.exemptions()])
        if method == "POST" and parts == ["exemptions"]:
            data = json_body(request)
            requested: Exemption = await admin.request_exemption(
                field(data, "account"),
                field(data, "limit", int),
                _when_field(field(data, "from"), now),
                _when_field(field(data, "until"), now),
                field(data, "reason"),
                by,
            )
            return json_answer(201, {"id": requested.id, "status": requested.status})
        if method == "POST" and len(parts) == 3 and parts[0] == "exemptions":
            ident, action = whole_number(parts[1], "an exemption id", 1, ID_AT_MOST), parts[2]
            data = json_body(request)
            reason = field(data, "reason", required=action != "approve") or ""
            if action == "approve":
                decided = await admin.approve(ident, by, reason)
            elif action == "deny":
                decided = await admin.deny(ident, by, reason)
            elif action == "revoke":
                decided = await admin.revoke(ident, by, reason)
            else:
                raise HttpError(404, f"unknown action {action!r}")
            return json_answer(200, decided.as_dict(now))
        raise HttpError(404, f"no such API call: {method} /api/v1/{quote('/'.join(parts))}")
