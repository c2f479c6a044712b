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

Pages are templates (:mod:`policyd.web.render`) in French or English by
``Accept-Language``: plain HTML with labels and no script.  Forms carry a
token bound to their purpose (and, on ``/admin``, to the admin user),
signed with the admin token; an admin decision must also come from the
page's own origin (:func:`same_origin`).  No page may be framed.  The
public form (:mod:`policyd.web.request_form`) counts requests per client
and answers alike whether or not the account exists.  What any client may
cost the process on the wire (body size, time, connections) is bounded by
:mod:`policyd.web.limits`.

Who decided is recorded as the page knows it: ``web user NAME`` when a
reverse proxy that authenticates users names them (``http.user_header``),
else ``web admin, claiming NAME`` (the HTTP Basic user name, which nothing
checks: the token is the same for every admin).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from typing import Any
from urllib.parse import quote

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from policyd.admin import Admin, parse_when
from policyd.errors import PolicydError
from policyd.metrics import Metrics
from policyd.store import Block, Exemption
from policyd.web.limits import LimitedSite
from policyd.web.pages import (
    HEADERS,
    HttpError,
    asserted_user,
    error_answer,
    field,
    form_fields,
    json_answer,
    json_body,
    printable,
    query,
    respond,
    same_origin,
    whole_number,
)
from policyd.web.render import Answer, Texts, message_page, page, render, request_language
from policyd.web.request_form import RequestForm

log = logging.getLogger("policyd.http")

#: How long a form's CSRF token stays valid.
FORM_TTL = 3600

#: What a form token is for: decisions on ``/admin`` (the public form's is
#: :data:`~policyd.web.request_form.EXEMPTION_FORM`).
ADMIN_FORM = "admin"

#: Largest ``?limit=`` of the audit API: the log is read in one go.
AUDIT_AT_MOST = 10_000

#: Largest exemption id (SQLite integers are 64-bit signed).
ID_AT_MOST = 2**63 - 1


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
        """The twisted.web site to listen with (held to :mod:`policyd.web.limits`)."""
        root = _Index(self)
        root.putChild(b"", root)
        root.putChild(b"metrics", _MetricsPage(self))
        root.putChild(b"exemption", RequestForm(self))
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

        :param purpose: what the form does (:data:`~policyd.web.request_form.EXEMPTION_FORM`, :data:`ADMIN_FORM`).
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

    def language(self, request: Request) -> str:
        """The language of the page answering ``request``."""
        return request_language(request, self.admin.config.language)


class Acting:
    """Who acts on the admin page, and how the audit log names them.

    :param request: the request to the admin page.
    :param header: ``http.user_header``: the header an authenticating proxy names users in.
    """

    def __init__(self, request: Request, header: str | None) -> None:
        verified = asserted_user(request, header)
        #: Whether a reverse proxy vouched for :attr:`name`.
        self.authenticated = verified is not None
        #: The name: the proxy's, else the HTTP Basic user name (unchecked).
        self.name = verified or printable(request.getUser().decode("utf-8", "replace"))
        #: Who the audit log names.
        self.who = f"web user {self.name}" if verified else (
            f"web admin, claiming {self.name}" if self.name else "web admin")


# --- pages ---------------------------------------------------------------------


def _when_field(text: str, now: float) -> float:
    """A time from a form or the API (:func:`policyd.admin.parse_when`); a year out of range is a usage error."""
    try:
        return parse_when(text, now)
    except (OverflowError, OSError):
        raise HttpError(400, f"{text!r}: not a time policyd can handle") from None


class _Index(Resource):
    def __init__(self, owner: AdminSite) -> None:
        super().__init__()
        self.owner = owner

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("content-type", "text/html; charset=utf-8")
        return render("index.html", self.owner.language(request))


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, owner: AdminSite) -> None:
        super().__init__()
        self.owner = owner

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("content-type", "text/plain; version=0.0.4; charset=utf-8")
        return self.owner.metrics.exposition()


class _AdminPage(Resource):
    """Pending requests, to approve or deny (HTTP Basic, the token as password)."""

    isLeaf = True

    def __init__(self, owner: AdminSite) -> None:
        super().__init__()
        self.owner = owner

    def _challenge(self, request: Request, language: str) -> bytes:
        request.setResponseCode(401)
        request.setHeader("www-authenticate", 'Basic realm="policyd admin", charset="UTF-8"')
        t = Texts(language)
        _, kind, body = message_page(401, language, t("admin.title"), t("admin.challenge"))
        request.setHeader("content-type", kind)
        return body

    def _acting(self, request: Request) -> Acting:
        return Acting(request, self.owner.admin.config.http.user_header)

    def render_GET(self, request: Request) -> Any:
        language = self.owner.language(request)
        if not self.owner.basic_ok(request):
            return self._challenge(request, language)
        return respond(request, lambda: self._list(request, language), page=True, language=language)

    async def _list(self, request: Request, language: str, note: str = "", failed: bool = False,
                    status: int = 200) -> Answer:
        admin = self.owner.admin
        now = admin.clock.seconds()
        pending = [e for e in await admin.exemptions() if e.state(now) == "pending"]
        acting = self._acting(request)
        return page(status, "admin.html", language, pending=pending, note=note, failed=failed,
                    csrf=self.owner.csrf(ADMIN_FORM, acting.name), user=acting.name or "–", who=acting.who,
                    authenticated=acting.authenticated)

    def render_POST(self, request: Request) -> Any:
        language = self.owner.language(request)
        if not self.owner.basic_ok(request):
            return self._challenge(request, language)
        return respond(request, lambda: self._decide(request, language), page=True, language=language)

    async def _decide(self, request: Request, language: str) -> Answer:
        t = Texts(language)
        if not same_origin(request):
            log.warning("admin page: decision posted from another site (Origin %r) refused",
                        (request.getHeader(b"origin") or request.getHeader(b"referer") or b"").decode("ascii", "replace"))
            raise HttpError(403, "This request came from another site; nothing was changed.", "admin.foreign")
        values = form_fields(request)
        acting = self._acting(request)
        if not self.owner.csrf_ok(values.get("csrf", ""), ADMIN_FORM, acting.name):
            return await self._list(request, language, t("admin.expired"), failed=True, status=403)
        admin = self.owner.admin
        ident = whole_number(values.get("id", ""), "the request number", 1, ID_AT_MOST)
        try:
            if values.get("action") == "approve":
                done = await admin.approve(ident, acting.who, values.get("reason", ""))
            else:
                done = await admin.deny(ident, acting.who, values.get("reason", "") or "denied")
        except PolicydError as error:
            return await self._list(request, language, t("admin.failed", reason=_refusal(t, error)), failed=True)
        return await self._list(request, language, t("admin.done", id=done.id, account=done.account,
                                                     status=_state(t, done.status)))


def _state(t: Texts, state: str) -> str:
    """An exemption's state in the page's language."""
    return t(f"status.{state}") if f"status.{state}" in t else state


def _refusal(t: Texts, error: PolicydError) -> str:
    """Why a decision was refused, in the page's language (the English line when the pages have no text for it)."""
    if error.key not in t:
        return str(error)
    values = {name: _state(t, str(value)) if name in ("state", "wanted") else value
              for name, value in error.values.items()}
    return t(error.key, **values)


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
