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
resource), readable on a phone, in French or English from the browser's
``Accept-Language``; they send ``Referrer-Policy: no-referrer`` so the
link never leaks to another site, and may not be framed.

:class:`SelfService` bundles what ``policyd serve`` needs for the digest and
the pages: the link signer, the choice resolver, the quarantine, the
:class:`~policyd.quarantine.digest.DigestJob` and the :class:`~policyd.quarantine.digest.DigestMail`.
"""

from __future__ import annotations

import datetime
import email.parser
import email.policy
import html
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.web.resource import Resource
from twisted.web.server import Request

from policyd.config import Config
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
from policyd.web.pages import Answer, document, form_fields, respond

log = logging.getLogger("policyd.selfservice")

#: Who the audit log names for what recipients do on these pages.
WHO = "self-service"

#: Headers shown first on the release page, in this order (the rest are in a fold).
MAIN_HEADERS = ("From", "Reply-To", "To", "Cc", "Subject", "Date", "Message-ID")

#: Longest header value shown.
HEADER_SHOWN = 500


# --- texts -----------------------------------------------------------------------

TEXTS: dict[str, dict[str, str]] = {
    "en": {
        "release.title": "A message held for you",
        "release.intro": "This message to {recipient} was recognised as spam (score {score}) and kept "
        "in quarantine on {held}. Check who sent it before you release it: it will be delivered "
        "to your inbox, its subject starting with {tag}.",
        "release.button": "Deliver it to my inbox",
        "release.done.title": "Message released",
        "release.done": "The message is on its way to your inbox ({recipient}), its subject starting with {tag}.",
        "release.gone.title": "This message is no longer in quarantine",
        "release.gone": "It was already released, deleted, or kept longer than {retention}. Nothing was changed.",
        "release.failed.title": "Not delivered yet",
        "release.failed": "The mail service did not take the message just now; it is still in "
        "quarantine. Please press the button again in a few minutes.",
        "headers.envelope": "Sender (envelope)",
        "headers.held": "Held on",
        "headers.expires": "Deleted on",
        "headers.all": "All headers",
        "headers.caption": "Headers of the held message",
        "preference.link": "Choose what happens to your spam",
        "preference.title": "Spam: inbox or quarantine",
        "preference.now": "For {address}, mail recognised as spam is now: {choice} ({source}).",
        "preference.legend": "Mail recognised as spam should be",
        "preference.inbox": "delivered to my inbox, its subject starting with {tag}",
        "preference.quarantine": "kept in quarantine; a daily summary lists it and I release what I want",
        "preference.button": "Save",
        "preference.saved": "Saved: for {address}, spam is now {choice}.",
        "choice.inbox": "delivered to the inbox, tagged",
        "choice.quarantine": "kept in quarantine",
        "source.own": "your choice",
        "source.provisioned": "set for your account by your organisation",
        "source.default": "the service's default",
        "invalid.title": "This link is not valid",
        "invalid": "It may have been copied incompletely or changed. Nothing was changed. "
        "Use the link in your latest quarantine summary, as it is.",
        "expired.title": "This link has expired",
        "expired": "Links in a quarantine summary work for {ttl}. Nothing was changed. "
        "The next summary has new links.",
        "form.expired": "The page had expired; nothing was changed. Please press the button again.",
        "bad.choice": "Please choose one of the two options.",
    },
    "fr": {
        "release.title": "Un message retenu pour vous",
        "release.intro": "Ce message adressé à {recipient} a été reconnu comme spam (score {score}) "
        "et gardé en quarantaine le {held}. Vérifiez qui l'a envoyé avant de le libérer : il "
        "sera distribué dans votre boîte de réception, son objet commençant par {tag}.",
        "release.button": "Le distribuer dans ma boîte",
        "release.done.title": "Message libéré",
        "release.done": "Le message est en route vers votre boîte de réception ({recipient}), "
        "son objet commençant par {tag}.",
        "release.gone.title": "Ce message n'est plus en quarantaine",
        "release.gone": "Il a déjà été libéré, supprimé, ou gardé plus de {retention}. Rien n'a été modifié.",
        "release.failed.title": "Pas encore distribué",
        "release.failed": "Le service de messagerie n'a pas pris le message pour l'instant ; il est "
        "toujours en quarantaine. Merci d'appuyer de nouveau sur le bouton dans quelques minutes.",
        "headers.envelope": "Expéditeur (enveloppe)",
        "headers.held": "Retenu le",
        "headers.expires": "Supprimé le",
        "headers.all": "Tous les en-têtes",
        "headers.caption": "En-têtes du message retenu",
        "preference.link": "Choisir ce que deviennent vos spams",
        "preference.title": "Spam : boîte de réception ou quarantaine",
        "preference.now": "Pour {address}, le courrier reconnu comme spam est actuellement : {choice} ({source}).",
        "preference.legend": "Le courrier reconnu comme spam doit être",
        "preference.inbox": "distribué dans ma boîte de réception, son objet commençant par {tag}",
        "preference.quarantine": "gardé en quarantaine ; un récapitulatif quotidien le liste et je "
        "libère ce que je veux",
        "preference.button": "Enregistrer",
        "preference.saved": "Enregistré : pour {address}, le spam est désormais {choice}.",
        "choice.inbox": "distribué dans la boîte, marqué",
        "choice.quarantine": "gardé en quarantaine",
        "source.own": "votre choix",
        "source.provisioned": "réglé pour votre compte par votre organisation",
        "source.default": "le réglage par défaut du service",
        "invalid.title": "Ce lien n'est pas valide",
        "invalid": "Il a peut-être été copié incomplètement ou modifié. Rien n'a été modifié. "
        "Utilisez tel quel le lien de votre dernier récapitulatif de quarantaine.",
        "expired.title": "Ce lien a expiré",
        "expired": "Les liens d'un récapitulatif de quarantaine fonctionnent pendant {ttl}. Rien n'a "
        "été modifié. Le prochain récapitulatif contient de nouveaux liens.",
        "form.expired": "La page avait expiré ; rien n'a été modifié. Merci d'appuyer de nouveau sur le bouton.",
        "bad.choice": "Merci de choisir l'une des deux options.",
    },
}


def choose_language(accept: str | None, default: str = "en") -> str:
    """The page language from ``Accept-Language``: the preferred one of en and fr, else ``default``."""
    best: tuple[float, int, str] | None = None
    for position, part in enumerate((accept or "").split(",")):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        language = tag.strip().lower().split("-")[0]
        if language in TEXTS and quality > 0:
            candidate = (-quality, position, language)
            if best is None or candidate < best:
                best = candidate
    return best[2] if best is not None else default


_STYLE = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:40rem;margin:0 auto;"
    "padding:1rem;line-height:1.5;color:#111;background:#fff}"
    "h1{font-size:1.35rem;line-height:1.3}"
    "table{border-collapse:collapse;width:100%;table-layout:fixed}"
    "caption{text-align:left;font-weight:600;padding:.3rem 0}"
    "th,td{border-bottom:1px solid #ccc;padding:.35rem;text-align:left;vertical-align:top;"
    "word-break:break-word}"
    "th{width:34%;font-weight:600}"
    "button{margin-top:1rem;padding:.75rem 1.2rem;font-size:1.05rem;width:100%;border:0;border-radius:6px;"
    "background:#0b5394;color:#fff;cursor:pointer}"
    "button:focus,a:focus,input:focus{outline:3px solid #f0a800;outline-offset:2px}"
    "fieldset{border:1px solid #bbb;border-radius:6px;padding:.5rem .8rem}"
    "label{display:flex;gap:.6rem;align-items:flex-start;padding:.5rem 0}"
    "input[type=radio]{width:1.3rem;height:1.3rem;flex:none;margin-top:.15rem}"
    "details{margin-top:1rem}pre{white-space:pre-wrap;word-break:break-all;font-size:.85rem}"
    ".error{color:#a00000}.ok{color:#05600a}.tag{white-space:nowrap}"
    "a{color:#0645ad}"
)


def _document(language: str, title: str, body: str) -> bytes:
    return document(language, title, body, _STYLE, index=False)




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
    ) -> None:
        self.config = config
        self.store = store
        self.clock = reactor
        self.tz = tz
        self.signer = LinkSigner(secret, reactor, float(config.quarantine.link_ttl))
        self.preferences = Preferences(config, store, reactor, run_blocking or in_thread(reactor))
        self.quarantine = Quarantine(config, store, reactor, header_secret, deliver, self.preferences)
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
        # Read as bytes: a header that is not UTF-8 picks no language, it is no error.
        accept = (request.getHeader(b"accept-language") or b"").decode("ascii", "replace")
        language = choose_language(accept, self.service.config.language)
        request.setHeader("referrer-policy", "no-referrer")
        request.setHeader("x-frame-options", "DENY")
        request.setHeader(
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        )
        request.setHeader("vary", "Accept-Language")
        route = self._route(request)
        work: Callable[[], Awaitable[Answer]]
        if route is None:
            work = self._not_found(language)
        else:
            page = Page(self.service, language, route[1])
            if route[0] == RELEASE:
                work = (lambda: page.release_post(request)) if post else page.release
            else:
                work = (lambda: page.preference_post(request)) if post else page.preference
        return respond(request, lambda: _or_busy(work, language))

    def _not_found(self, language: str) -> Callable[[], Awaitable[Answer]]:
        async def answer() -> Answer:
            t = TEXTS[language]
            return 404, "text/html; charset=utf-8", _document(
                language, t["invalid.title"], f'<p role="alert" class="error">{html.escape(t["invalid"])}</p>'
            )

        return answer


async def _or_busy(work: Callable[[], Awaitable[Answer]], language: str) -> Answer:
    """The page, or a plain "try again later" page when the store (or anything) failed."""
    try:
        return await work()
    except Exception as error:
        log.error("self-service page failed: %s", error)
        title = "Service momentanément indisponible" if language == "fr" else "Service briefly unavailable"
        text = (
            "Merci de réessayer dans quelques minutes."
            if language == "fr"
            else "Please try again in a few minutes."
        )
        return 503, "text/html; charset=utf-8", _document(language, title, f'<p role="alert">{text}</p>')


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
        self.t = TEXTS[language]

    def text(self, key: str, **values: Any) -> str:
        """A text of the page's language, filled in."""
        return self.t[key].format(**values)

    def marked(self, text: str) -> str:
        """Text as HTML, the Subject tag kept on one line."""
        tag = html.escape(self.service.config.content.tag)
        return html.escape(text).replace(tag, f'<span class="tag">{tag}</span>')

    def html(self, status: int, title: str, body: str) -> Answer:
        """A page."""
        return status, "text/html; charset=utf-8", _document(self.language, title, body)

    def refused(self, error: LinkError) -> Answer:
        """The page of a refused link; nothing was changed."""
        log.info("self-service: %s link refused (%s)", error.reason, error)
        if error.reason == "expired":
            ttl = show_duration(float(self.service.config.quarantine.link_ttl), self.language)
            return self.html(410, self.t["expired.title"],
                             f'<p role="alert" class="error">{html.escape(self.text("expired", ttl=ttl))}</p>')
        return self.html(403, self.t["invalid.title"], f'<p role="alert" class="error">{html.escape(self.t["invalid"])}</p>')

    def form(self, fields: str, button: str) -> str:
        """A POST form back to this page, with its anti-forgery token."""
        csrf = self.service.signer.form_token(self.token)
        # No action attribute: the form posts to the page's own address, whatever
        # prefix a reverse proxy adds in front of it.
        return (
            f'<form method="post">{fields}<input type="hidden" name="csrf" value="{html.escape(csrf)}">'
            f'<button type="submit" id="submit">{html.escape(button)}</button></form>'
        )

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
        return self.html(410, self.t["release.gone.title"],
                         f'<p role="status">{html.escape(self.text("release.gone", retention=retention))}</p>'
                         + self.preference_link())

    def preference_link(self, recipient: str | None = None) -> str:
        """A link to the preference page of the link's recipient (relative: works behind any proxy)."""
        try:
            link = self.verify(RELEASE)
        except LinkError:
            return ""
        token = self.service.signer.preference(recipient or link.recipient)
        return f'<p><a href="../{PREFERENCE}/{token}">{html.escape(self.t["preference.link"])}</a></p>'

    async def release(self, note: str = "") -> Answer:
        """GET: the held message's headers and the release button."""
        try:
            link = self.verify(RELEASE)
        except LinkError as error:
            return self.refused(error)
        found = await self._held(link)
        if found is None:
            return self.gone()
        entry, message = found
        intro = self.text(
            "release.intro",
            recipient=entry.recipient,
            score=f"{entry.score:.1f}",
            held=show_time(entry.at, self.language, self.service.tz),
            tag=self.service.config.content.tag,
        )
        alert = f'<p role="alert" class="error">{html.escape(note)}</p>' if note else ""
        body = (
            alert
            + f"<p>{self.marked(intro)}</p>"
            + self.headers_table(entry, message)
            + self.form("", self.t["release.button"])
            + self.preference_link(entry.recipient)
        )
        return self.html(200, self.t["release.title"], body)

    def headers_table(self, entry: Quarantined, message: bytes) -> str:
        """The main headers in a table, every header in a fold."""
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
                    rows.append((wanted, value))
                    break
        rows += [
            (self.t["headers.envelope"], entry.sender or "<>"),
            (self.t["headers.held"], show_time(entry.at, self.language, self.service.tz)),
            (self.t["headers.expires"], show_time(entry.until, self.language, self.service.tz)),
        ]
        table = "".join(
            f'<tr><th scope="row">{html.escape(name)}</th><td>{html.escape(value[:HEADER_SHOWN])}</td></tr>'
            for name, value in rows
        )
        everything = "\n".join(f"{name}: {value[:HEADER_SHOWN]}" for name, value in items)
        return (
            f'<table><caption>{html.escape(self.t["headers.caption"])}</caption><tbody>{table}</tbody></table>'
            f'<details><summary>{html.escape(self.t["headers.all"])}</summary><pre>{html.escape(everything)}</pre></details>'
        )

    async def release_post(self, request: Request) -> Answer:
        """POST: release the message to the link's recipient, once."""
        try:
            link = self.verify(RELEASE)
        except LinkError as error:
            return self.refused(error)
        values = form_fields(request)
        if not self.service.signer.form_ok(values.get("csrf", ""), self.token):
            log.info("self-service: release form with a stale or forged token")
            answer = await self.release(self.t["form.expired"])
            return (403 if answer[0] == 200 else answer[0], answer[1], answer[2])
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
            return self.html(503, self.t["release.failed.title"],
                             f'<p role="alert" class="error">{html.escape(self.t["release.failed"])}</p>')
        done = self.text("release.done", recipient=entry.recipient, tag=self.service.config.content.tag)
        return self.html(200, self.t["release.done.title"],
                         f'<p role="status" class="ok">{self.marked(done)}</p>' + self.preference_link(entry.recipient))

    # --- preference --------------------------------------------------------------

    async def preference(self, note: str = "", status: int = 200, saved: bool = False) -> Answer:
        """GET: the address's choice and the form to change it."""
        try:
            link = self.verify(PREFERENCE)
        except LinkError as error:
            return self.refused(error)
        address = link.recipient
        choice = (await self.service.preferences.choices([address]))[address]
        tag = self.service.config.content.tag
        source = {OWN: "source.own", PROVISIONED: "source.provisioned", DEFAULT: "source.default"}[choice.source]
        now = self.text("preference.now", address=address, choice=self._choice(choice.spam), source=self.t[source])
        options = "".join(
            f'<label for="spam-{value}"><input type="radio" id="spam-{value}" name="spam" value="{value}"'
            f'{" checked" if choice.spam == value else ""}>'
            f'<span>{self.marked(self.text(f"preference.{value}", tag=tag))}</span></label>'
            for value in SPAM_CHOICES
        )
        fieldset = f'<fieldset><legend>{html.escape(self.t["preference.legend"])}</legend>{options}</fieldset>'
        if note:
            role, css = ("status", "ok") if saved else ("alert", "error")
            message = f'<p role="{role}" class="{css}">{self.marked(note)}</p>'
        else:
            message = ""
        body = message + f"<p>{self.marked(now)}</p>" + self.form(fieldset, self.t["preference.button"])
        return self.html(status, self.t["preference.title"], body)

    def _choice(self, spam: str) -> str:
        return f"{self.t['choice.' + spam]} {self.service.config.content.tag}" if spam == "inbox" else self.t[
            "choice." + spam
        ]

    async def preference_post(self, request: Request) -> Answer:
        """POST: record the address's choice (it wins over provisioning)."""
        try:
            link = self.verify(PREFERENCE)
        except LinkError as error:
            return self.refused(error)
        values = form_fields(request)
        if not self.service.signer.form_ok(values.get("csrf", ""), self.token):
            log.info("self-service: preference form with a stale or forged token")
            return await self.preference(self.t["form.expired"], status=403)
        spam = values.get("spam", "")
        if spam not in SPAM_CHOICES:
            return await self.preference(self.t["bad.choice"], status=400)
        await self.service.quarantine.set_choice(link.recipient, spam, WHO)
        log.info("self-service: spam for %s set to %s", link.recipient, spam)
        saved = self.text("preference.saved", address=link.recipient, choice=self._choice(spam))
        return await self.preference(saved, saved=True)
