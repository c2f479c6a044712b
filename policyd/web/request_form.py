"""``/exemption``: the public form where a user asks for a bulk-send exemption.

Anyone who reaches the page may send it, so it tells nothing an outsider
could use: a request for an account that does not exist gets the very
answer a real one gets (the attempt is in the audit log), and each client
may send only :data:`FORM_BURST` requests, then one per :data:`FORM_EVERY`
seconds.  Every field is checked here and a wrong one is named beside it
(``aria-describedby``, ``aria-invalid``), in the reader's language.

Who asked is recorded as the page knows it: ``web, claiming ACCOUNT`` when
no one checked who sent the form, ``web user NAME`` when a reverse proxy
that authenticates users names them (``http.user_header``).
"""

from __future__ import annotations

import logging
import math
import re
from typing import TYPE_CHECKING, Any

import attrs
from twisted.web.resource import Resource
from twisted.web.server import Request

from policyd.admin import UnknownAccount, normalise_account, parse_when
from policyd.errors import PolicydError
from policyd.quarantine.digest import show_duration
from policyd.store import AuditEntry
from policyd.times import zone_name
from policyd.web.limits import ClientRate
from policyd.web.pages import asserted_user, client_address, form_fields, printable, respond
from policyd.web.render import Answer, Texts, message_page, page, request_language

if TYPE_CHECKING:
    from policyd.config import Config
    from policyd.web.admin import AdminSite

log = logging.getLogger("policyd.http")

#: What a form token is for: the public exemption form (the admin page's are useless here).
EXEMPTION_FORM = "exemption"

#: Requests one client may send the public form at once, and seconds to earn one more.
FORM_BURST = 5
FORM_EVERY = 60.0

#: Longest text kept of a free-text field: a reason is a sentence or two, not a document.
TEXT_AT_MOST = 2000


def requester(account: str, user: str | None) -> str:
    """Who the audit log names for a request: the authenticated user, else whom the sender claims to be."""
    return f"web user {user}" if user else f"web, claiming {printable(account, 320)}"


@attrs.frozen
class Field:
    """One field of the form, as the template shows it."""

    name: str
    label: str
    kind: str
    autocomplete: str
    value: str
    hint: str = ""
    error: str = ""
    low: int = 0
    high: int = 0

    @property
    def described(self) -> str:
        """The ids that describe it (its error first), for ``aria-describedby``."""
        return " ".join(f"{self.name}-{part}" for part, text in (("error", self.error), ("hint", self.hint)) if text)


class RequestForm(Resource):
    """The user's exemption request form.

    :param owner: the HTTP site (:class:`policyd.web.admin.AdminSite`): the
        admin operations, the form tokens, the configuration.
    """

    isLeaf = True

    def __init__(self, owner: AdminSite) -> None:
        super().__init__()
        self.owner = owner
        #: Requests to the form, per client.
        self.rate = ClientRate(owner.admin.clock, FORM_BURST, FORM_EVERY)

    @property
    def config(self) -> Config:
        """The configuration in force (it changes on reload)."""
        return self.owner.admin.config

    def _language(self, request: Request) -> str:
        return request_language(request, self.config.language)

    def render_GET(self, request: Request) -> Any:
        language = self._language(request)
        user = asserted_user(request, self.config.http.user_header)
        return respond(request, lambda: self._show(language, user, {}), page=True, language=language)

    async def _show(self, language: str, user: str | None, values: dict[str, str],
                    errors: dict[str, str] | None = None, problem: str = "", status: int = 200) -> Answer:
        """The form, filled with ``values``, each of ``errors`` beside its field."""
        t = Texts(language)
        errors = errors or {}
        bounds = self.config.exemptions
        limit = self.config.outbound.limit
        zone = t("hint.times", zone=zone_name(self.owner.admin.clock.seconds()))
        window = show_duration(float(bounds.max_window), language)
        specs = (
            ("account", "text", "username", ""),
            ("organisation", "text", "organization", ""),
            ("start", "datetime-local", "off", zone),
            ("end", "datetime-local", "off", t("hint.end", window=window) + " " + zone),
            ("limit", "number", "off", t("hint.limit", limit=limit, high=bounds.max_limit)),
            ("reason", "textarea", "off", ""),
        )
        fields = [
            Field(name, t(f"field.{name}"), kind, auto,
                  values.get(name, (user or "") if name == "account" else ""), hint, errors.get(name, ""),
                  limit + 1, bounds.max_limit)
            for name, kind, auto, hint in specs
        ]
        if errors and not problem:
            problem = t("exemption.invalid")
        return page(status, "exemption.html", language, fields=fields, problem=problem, limit=limit, user=user,
                    csrf=self.owner.csrf(EXEMPTION_FORM))

    def render_POST(self, request: Request) -> Any:
        language = self._language(request)
        return respond(request, lambda: self._submit(request, language), page=True, language=language)

    def _check(self, values: dict[str, str], language: str) -> tuple[dict[str, Any], dict[str, str]]:
        """The request's values, and an error for each field that is wrong (the same for any account)."""
        t = Texts(language)
        bounds = self.config.exemptions
        now = self.owner.admin.clock.seconds()
        got: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for name in ("account", "organisation", "start", "end", "limit", "reason"):
            if not values.get(name, "").strip():
                errors[name] = t("invalid.required")
        if "account" not in errors:
            try:
                got["account"] = normalise_account(values["account"])
            except PolicydError:
                errors["account"] = t("invalid.account")
        for name in ("start", "end"):
            if name not in errors:
                try:
                    got[name] = parse_when(values[name], now)
                except (PolicydError, OverflowError, OSError, ValueError):
                    errors[name] = t("invalid.when")
        if "limit" not in errors:
            low, high = self.config.outbound.limit + 1, bounds.max_limit
            text = values["limit"].strip()
            if not re.fullmatch(r"[0-9]{1,19}", text) or not 1 <= int(text) <= high:
                errors["limit"] = t("invalid.limit", low=low, high=high)
            elif int(text) < low:
                errors["limit"] = t("invalid.below", limit=low - 1)
            else:
                got["limit"] = int(text)
        if "end" in got and "end" not in errors:
            if got["end"] <= now:
                errors["end"] = t("invalid.past")
            elif "start" in got and got["end"] <= got["start"]:
                errors["end"] = t("invalid.order")
            elif "start" in got and got["end"] - got["start"] > bounds.max_window:
                errors["end"] = t("invalid.long", window=show_duration(float(bounds.max_window), language))
        organisation = " ".join(values.get("organisation", "").split())[:TEXT_AT_MOST]
        reason = " ".join(values.get("reason", "").split())[:TEXT_AT_MOST]
        got["reason"] = f"{reason} (organisation: {organisation})"
        return got, errors

    async def _submit(self, request: Request, language: str) -> Answer:
        wait = self.rate.take(client_address(request))
        if wait:
            return self._too_many(request, wait, language)
        user = asserted_user(request, self.config.http.user_header)
        values = form_fields(request)
        if not self.owner.csrf_ok(values.get("csrf", ""), EXEMPTION_FORM):
            return await self._show(language, user, values, problem=Texts(language)("exemption.expired"),
                                    status=403)
        got, errors = self._check(values, language)
        if errors:
            return await self._show(language, user, values, errors, status=400)
        admin = self.owner.admin
        account = got["account"]
        by = requester(account, user)
        try:
            made = await admin.request_exemption(account, got["limit"], got["start"], got["end"], got["reason"], by)
        except UnknownAccount:
            # Answered like a recorded request, so that the form does not tell
            # who has an account; the administrators see the attempt in the
            # audit log, and nothing is pending.
            log.info("exemption form: request for unknown account %r (client %s) not recorded",
                     account, client_address(request))
            await admin.store.record(AuditEntry(admin.clock.seconds(), by, "exemption-refused",
                                                printable(account, 320), "not a valid account"))
            return self._received(language, account, got["limit"], got["start"], got["end"])
        except PolicydError as error:
            # A rule of the admin operations the form does not check itself
            # (checked before the account, so the same for every account).
            problem = Texts(language)("exemption.refused", reason=str(error))
            return await self._show(language, user, values, problem=problem, status=400)
        return self._received(language, made.account, made.limit, made.start, made.end)

    @staticmethod
    def _received(language: str, account: str, limit: int, start: float, end: float) -> Answer:
        """The same answer whether or not the account exists."""
        return page(201, "received.html", language, account=account, limit=limit, start=start, end=end)

    @staticmethod
    def _too_many(request: Request, wait: float, language: str) -> Answer:
        minutes = max(1, math.ceil(wait / 60))
        request.setHeader("retry-after", str(math.ceil(wait)))
        t = Texts(language)
        return message_page(429, language, t("toomany.title"),
                            t("toomany", wait=show_duration(minutes * 60.0, language)))
