"""Self-service for recipients: the digest's release and preference pages.

Two pages under ``/self-service/`` on the HTTP listener (``listen.http``;
publish only that path to users through a reverse proxy):

``/self-service/release/LINK``
    shows the headers of one held message and a button; pressing it (a POST
    carrying a token bound to the link) releases the message to the
    recipient the link names, and to no one else, once.
``/self-service/preference/LINK``
    shows the address's spam choice (its own, its organisation's, or the
    default) and lets the recipient switch between ``inbox`` and ``quarantine``.

A forged, altered or expired link gets a page saying so and changes
nothing.  Every release and every change is in the audit log with
``self-service`` as who.  Pages are plain HTML (no script, no outside
resource), readable on a phone, from templates in French or English by
the browser's ``Accept-Language`` (:mod:`policyd.web.render`); they send ``Referrer-Policy: no-referrer`` so the
link never leaks to another site, and may not be framed.

:class:`SelfService` bundles what ``policyd serve`` needs for the digest and
the pages: the link signer, the choice resolver, the quarantine, the
:class:`~policyd.quarantine.digest.DigestJob` and the :class:`~policyd.quarantine.digest.DigestMail`.
"""

from __future__ import annotations

import datetime
import email.parser
import email.policy
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.web.resource import Resource
from twisted.web.server import Request

from policyd.config import Config
from policyd.content.feedback import Feedback
from policyd.errors import PolicydError, UsageError
from policyd.quarantine.digest import (
    DigestJob,
    DigestMail,
    default_base_url,
    show_duration,
    show_time,
)
from policyd.quarantine.held import Deliver, Quarantine
from policyd.quarantine.links import PREFERENCE, RELEASE, Link, LinkError, LinkSigner, link_secret
from policyd.quarantine.preferences import (
    DEFAULT,
    OWN,
    PROVISIONED,
    Preferences,
)
from policyd.reactor import RunBlocking, in_thread
from policyd.statefiles import process_secret
from policyd.store import SPAM_CHOICES, Quarantined, Store
from policyd.web.pages import Answer, form_fields, respond
from policyd.web.render import Texts, choose_language, message_page, page, request_language

__all__ = ["WHO", "SelfService", "SelfServicePages", "choose_language"]

log = logging.getLogger("policyd.selfservice")

#: Who the audit log names for what recipients do on these pages.
WHO = "self-service"

#: Headers shown first on the release page, in this order (the rest are in a fold).
MAIN_HEADERS = ("From", "Reply-To", "To", "Cc", "Subject", "Date", "Message-ID")

#: Longest header value shown.
HEADER_SHOWN = 500


# --- what serve needs --------------------------------------------------------------


class SelfService:
    """The digest and the self-service pages of one ``policyd serve``.

    :param config: the configuration.
    :param store: the state store.
    :param reactor: the reactor (clock, thread pool for SMTP and ``postmap``).
    :param secret: the link secret (:func:`policyd.quarantine.links.link_secret`).
    :param header_secret: signs released messages and the digest header (the
        milter's header secret); None: unsigned.
    :param kick: called when digests were queued (the notifier's kick).
    :param run_blocking: how provisioning is read (a thread in the server).
    :param deliver: hands released messages to the MTA (tests inject one).
    :param tz: time zone of ``digest_at`` and of dates shown; None: the server's.
    :param feedback: learns released mail as ham when ``deliver`` is given (by
        default the real delivery comes with the real learning).
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        reactor: Any,
        secret: bytes,
        header_secret: bytes | None = None,
        kick: Callable[[], object] = lambda: None,
        run_blocking: RunBlocking | None = None,
        deliver: Deliver | None = None,
        tz: datetime.tzinfo | None = None,
        feedback: Feedback | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = reactor
        self.tz = tz
        self.signer = LinkSigner(secret, reactor, float(config.quarantine.link_ttl))
        self.preferences = Preferences(config, store, reactor, run_blocking or in_thread(reactor))
        # Released mail is learned as ham off the reactor thread (content.learn_from_release);
        # with a test's deliver, nothing is learned unless the test says so.
        learning = Feedback(store, in_thread(reactor), reactor) if deliver is None else feedback
        self.quarantine = Quarantine(config, store, reactor, header_secret, deliver, self.preferences, learning)
        self.digest = DigestJob(config, store, reactor, kick, tz)
        self.mail = DigestMail(config, self.signer, config.quarantine.base_url, header_secret, tz)

    @classmethod
    def from_config(
        cls, config: Config, store: Store, reactor: Any, kick: Callable[[], object] = lambda: None
    ) -> SelfService:
        """The server's: secrets read (or created) beside the store.

        :raises PolicydError: when a secret file cannot be read or created.
        """
        from policyd.checks.network_header import header_secret_path, load_header_secret

        wanted = bool(config.listen.http or config.quarantine.base_url or config.quarantine.digest_at)
        if not wanted:
            # No pages, no digest: no file is created; a secret of this process
            # only, so nothing signed with it is ever forgeable.
            return cls(config, store, reactor, process_secret(), None, kick)
        try:
            secret = link_secret(config)
        except (OSError, ValueError) as error:
            raise PolicydError(f"quarantine.link_secret: {error}") from None
        path = header_secret_path(config)
        header: bytes | None = None
        if path is not None:
            try:
                header = load_header_secret(path)
            except (OSError, ValueError) as error:
                raise PolicydError(f"inbound.header_secret: {error}") from None
        return cls(config, store, reactor, secret, header, kick)

    def configure(self, config: Config) -> None:
        """Apply a reloaded configuration (SIGHUP): provisioning is read again."""
        self.config = config
        self.signer.ttl = float(config.quarantine.link_ttl)
        self.preferences.configure(config)
        self.quarantine.config = config
        self.digest.configure(config)
        self.mail.configure(config)

    def listening(self, port: int | None) -> None:
        """The HTTP listener is bound to ``port``: links point there unless ``quarantine.base_url`` says."""
        if not self.config.quarantine.base_url:
            self.mail.base_url = default_base_url(self.config.listen.http, port)

    def start(self) -> Deferred[Any]:
        """Start the digest job."""
        return self.digest.start()

    def stop(self) -> Deferred[Any]:
        """Stop the digest job (a run in progress finishes)."""
        return DeferredList([self.digest.stop()], consumeErrors=True)

    def pages(self) -> Resource:
        """The ``/self-service`` resource."""
        return SelfServicePages(self)


# --- the pages -------------------------------------------------------------------


class SelfServicePages(Resource):
    """``/self-service/release/LINK`` and ``/self-service/preference/LINK``."""

    isLeaf = True

    def __init__(self, service: SelfService) -> None:
        super().__init__()
        self.service = service

    def _route(self, request: Request) -> tuple[str, str] | None:
        parts = [p.decode("utf-8", "replace") for p in request.postpath or []]
        if len(parts) == 2 and parts[0] in (RELEASE, PREFERENCE) and parts[1]:
            return parts[0], parts[1]
        return None

    def render_GET(self, request: Request) -> Any:
        return self._answer(request, post=False)

    def render_POST(self, request: Request) -> Any:
        return self._answer(request, post=True)

    def _answer(self, request: Request, post: bool) -> Any:
        language = request_language(request, self.service.config.language)
        request.setHeader("referrer-policy", "no-referrer")
        request.setHeader("x-frame-options", "DENY")
        request.setHeader(
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        )
        route = self._route(request)
        work: Callable[[], Awaitable[Answer]]
        if route is None:
            work = self._not_found(language)
        else:
            one = Page(self.service, language, route[1])
            if route[0] == RELEASE:
                work = (lambda: one.release_post(request)) if post else one.release
            else:
                work = (lambda: one.preference_post(request)) if post else one.preference
        return respond(request, lambda: _or_busy(work, language))

    def _not_found(self, language: str) -> Callable[[], Awaitable[Answer]]:
        async def answer() -> Answer:
            t = Texts(language)
            return message_page(404, language, t("invalid.title"), t("invalid"), index=False)

        return answer


async def _or_busy(work: Callable[[], Awaitable[Answer]], language: str) -> Answer:
    """The page, or a plain "try again later" page when the store (or anything) failed."""
    try:
        return await work()
    except Exception as error:
        log.error("self-service page failed: %s", error)
        t = Texts(language)
        return message_page(503, language, t("busy.title"), t("busy"), css="", index=False)


class Page:
    """One request to a self-service page.

    :param service: the server's self-service.
    :param language: ``en`` or ``fr``.
    :param token: the link from the URL.
    """

    def __init__(self, service: SelfService, language: str, token: str) -> None:
        self.service = service
        self.language = language
        self.token = token
        self.t = Texts(language)

    def html(self, status: int, template: str, **context: Any) -> Answer:
        """A page of ``template``; it sees the Subject tag, and the form token of this link."""
        return page(status, template, self.language, tag=self.service.config.content.tag, index=False,
                    csrf=self.service.signer.form_token(self.token), **context)

    def refused(self, error: LinkError) -> Answer:
        """The page of a refused link; nothing was changed."""
        log.info("self-service: %s link refused (%s)", error.reason, error)
        if error.reason == "expired":
            ttl = show_duration(float(self.service.config.quarantine.link_ttl), self.language)
            return message_page(410, self.language, self.t("expired.title"), self.t("expired", ttl=ttl), index=False)
        return message_page(403, self.language, self.t("invalid.title"), self.t("invalid"), index=False)

    def verify(self, kind: str) -> Link:
        """The link, if genuine and valid (:class:`LinkError` otherwise)."""
        return self.service.signer.verify(self.token, kind)

    # --- release ---------------------------------------------------------------

    async def _held(self, link: Link) -> tuple[Quarantined, bytes] | None:
        found = await self.service.store.quarantined(link.entry, now=self.service.clock.seconds())
        if found is None or not link.names(found[0]):
            return None
        return found

    def gone(self) -> Answer:
        """The page of a message that left the quarantine."""
        retention = show_duration(float(self.service.config.quarantine.retention), self.language)
        return self.html(410, "release_result.html", title=self.t("release.gone.title"), role="status", css="",
                         text=self.t("release.gone", retention=retention), preference_token=self.preference_token())

    def preference_token(self, recipient: str | None = None) -> str:
        """The link to the preference page of the link's recipient ("" when the link is not valid)."""
        try:
            link = self.verify(RELEASE)
        except LinkError:
            return ""
        return self.service.signer.preference(recipient or link.recipient)

    async def release(self, note: str = "", status: int = 200) -> Answer:
        """GET: the held message's headers and the release button."""
        try:
            link = self.verify(RELEASE)
        except LinkError as error:
            return self.refused(error)
        found = await self._held(link)
        if found is None:
            return self.gone()
        entry, message = found
        intro = self.t(
            "release.intro",
            recipient=entry.recipient,
            score=f"{entry.score:.1f}",
            held=show_time(entry.at, self.language, self.service.tz),
            tag=self.service.config.content.tag,
        )
        rows, everything = self.headers(entry, message)
        return self.html(status, "release.html", note=note, intro=intro, rows=rows, everything=everything,
                         preference_token=self.preference_token(entry.recipient))

    def headers(self, entry: Quarantined, message: bytes) -> tuple[list[tuple[str, str]], str]:
        """The main headers (name, value) and every header as text, each value bounded."""
        from policyd.content.features import decode_header

        parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(message)
        items = []
        for name, value in parsed.items():
            try:
                shown = decode_header(str(value))
            except Exception:  # a header too broken to decode is shown as it is
                shown = str(value)
            items.append((name, " ".join("".join(c if c.isprintable() else " " for c in shown).split())))
        rows = []
        for wanted in MAIN_HEADERS:
            for name, value in items:
                if name.lower() == wanted.lower():
                    rows.append((wanted, value[:HEADER_SHOWN]))
                    break
        rows += [
            (self.t("headers.envelope"), entry.sender or "<>"),
            (self.t("headers.held"), show_time(entry.at, self.language, self.service.tz)),
            (self.t("headers.expires"), show_time(entry.until, self.language, self.service.tz)),
        ]
        return rows, "\n".join(f"{name}: {value[:HEADER_SHOWN]}" for name, value in items)

    async def release_post(self, request: Request) -> Answer:
        """POST: release the message to the link's recipient, once."""
        try:
            link = self.verify(RELEASE)
        except LinkError as error:
            return self.refused(error)
        values = form_fields(request)
        if not self.service.signer.form_ok(values.get("csrf", ""), self.token):
            log.info("self-service: release form with a stale or forged token")
            return await self.release(self.t("form.expired"), status=403)
        found = await self._held(link)
        if found is None:
            return self.gone()
        entry = found[0]
        try:
            await self.service.quarantine.release(
                entry.id, WHO, f"release link of {entry.recipient}", only_if=link.names
            )
        except UsageError:
            return self.gone()  # released by another press or an admin meanwhile
        except PolicydError as error:
            log.warning("self-service: quarantine #%d not released: %s", entry.id, error)
            return message_page(503, self.language, self.t("release.failed.title"), self.t("release.failed"),
                                index=False)
        done = self.t("release.done", recipient=entry.recipient, tag=self.service.config.content.tag)
        return self.html(200, "release_result.html", title=self.t("release.done.title"), role="status", css="ok",
                         text=done, preference_token=self.preference_token(entry.recipient))

    # --- preference --------------------------------------------------------------

    async def preference(self, note: str = "", status: int = 200, saved: bool = False) -> Answer:
        """GET: the address's choice and the form to change it."""
        try:
            link = self.verify(PREFERENCE)
        except LinkError as error:
            return self.refused(error)
        address = link.recipient
        choice = (await self.service.preferences.choices([address]))[address]
        source = {OWN: "source.own", PROVISIONED: "source.provisioned", DEFAULT: "source.default"}[choice.source]
        now = self.t("preference.now", address=address, choice=self._choice(choice.spam), source=self.t(source))
        return self.html(status, "preference.html", note=note, saved=saved, now=now, choices=SPAM_CHOICES,
                         current=choice.spam)

    def _choice(self, spam: str) -> str:
        shown = self.t("choice." + spam)
        return f"{shown} {self.service.config.content.tag}" if spam == "inbox" else shown

    async def preference_post(self, request: Request) -> Answer:
        """POST: record the address's choice (it wins over provisioning)."""
        try:
            link = self.verify(PREFERENCE)
        except LinkError as error:
            return self.refused(error)
        values = form_fields(request)
        if not self.service.signer.form_ok(values.get("csrf", ""), self.token):
            log.info("self-service: preference form with a stale or forged token")
            return await self.preference(self.t("form.expired"), status=403)
        spam = values.get("spam", "")
        if spam not in SPAM_CHOICES:
            return await self.preference(self.t("bad.choice"), status=400)
        await self.service.quarantine.set_choice(link.recipient, spam, WHO)
        log.info("self-service: spam for %s set to %s", link.recipient, spam)
        saved = self.t("preference.saved", address=link.recipient, choice=self._choice(spam))
        return await self.preference(saved, saved=True)
