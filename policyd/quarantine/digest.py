"""The quarantine digest: once a day, one mail to each recipient with mail held for them.

:class:`DigestJob` runs in ``policyd serve`` at ``quarantine.digest_at``
(HH:MM in the server's time zone).  It lists what was held since the last
digest and, in one atomic store step (:meth:`policyd.store.Store.queue_digest`),
moves the digest mark and puts one ``digest`` notice per recipient in the
notification outbox: several servers sharing a store send each recipient
one digest, and a crash neither loses nor doubles it.  Recipients with
nothing held get no mail.  A digest missed while the server was down is
sent when it starts.  ``policyd digest send-now`` queues one at once.

:class:`DigestMail` writes the mail when the outbox sends it (text and
HTML, from the ``digest*`` templates, in ``quarantine.digest_languages``):
each message still held gets a signed release link, and the mail a link to
the recipient's preference page (:mod:`policyd.quarantine.links`).  It carries a signed
``X-Policyd-Digest`` header, so the milter never tags or holds it.
"""

from __future__ import annotations

import datetime
import email.utils
import html
import logging
import socket
import time
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from policyd.config import Config, parse_time_of_day
from policyd.errors import PolicydError
from policyd.quarantine.held import DIGEST_HEADER, digest_header
from policyd.quarantine.links import LinkSigner
from policyd.store import HeldMail, Notice, Quarantined
from policyd.texts import Texts

log = logging.getLogger("policyd.digest")

#: How often the job looks at the clock: the digest leaves within this of
#: ``digest_at``, and clock steps or time-zone changes cannot skip a day.
CHECK_EVERY = 30.0

#: Held messages read for one digest run at most; a wave beyond it is logged.
SCAN_LIMIT = 200_000

#: Longest subject or sender shown in a digest.
SHOWN = 200

#: Where the self-service pages live under the HTTP listener.
PAGES = "/self-service"


# --- when ------------------------------------------------------------------------


def _at_day(now: float, days: int, at: tuple[int, int], tz: datetime.tzinfo | None) -> float:
    if tz is None:
        day = datetime.date.fromtimestamp(now) + datetime.timedelta(days=days)
        # mktime with isdst=-1 lets the C library apply the local DST rules.
        return time.mktime((day.year, day.month, day.day, at[0], at[1], 0, 0, 0, -1))
    day = datetime.datetime.fromtimestamp(now, tz).date() + datetime.timedelta(days=days)
    return datetime.datetime.combine(day, datetime.time(*at), tzinfo=tz).timestamp()


def next_run(now: float, at: tuple[int, int], tz: datetime.tzinfo | None = None) -> float:
    """The first moment after ``now`` whose time of day is ``at`` (in ``tz``; None: local time)."""
    for days in range(0, 3):
        moment = _at_day(now, days, at, tz)
        if moment > now:
            return moment
    raise AssertionError("unreachable")  # pragma: no cover


def previous_run(now: float, at: tuple[int, int], tz: datetime.tzinfo | None = None) -> float:
    """The last moment up to ``now`` whose time of day is ``at``."""
    for days in range(0, -3, -1):
        moment = _at_day(now, days, at, tz)
        if moment <= now:
            return moment
    raise AssertionError("unreachable")  # pragma: no cover


# --- the job ---------------------------------------------------------------------


@attrs.frozen
class DigestRun:
    """What one digest run did.

    :ivar queued: False when another process had already sent this period's digest.
    :ivar since: the previous mark (None before the first digest).
    :ivar until: the new mark.
    :ivar recipients: digests queued (one per recipient with held mail).
    :ivar messages: held messages listed in them.
    """

    queued: bool
    since: float | None
    until: float
    recipients: int
    messages: int

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return attrs.asdict(self)


class DigestJob:
    """Queues the digest at ``quarantine.digest_at`` every day.

    :param config: the configuration (``quarantine.*``).
    :param store: held mail, the digest mark, the outbox.
    :param clock: time source.
    :param on_queued: called after digests were queued (kicks the notifier).
    :param tz: the time zone of ``digest_at``; None: the server's.
    """

    def __init__(
        self,
        config: Config,
        store: HeldMail,
        clock: IReactorTime,
        on_queued: Callable[[], object] = lambda: None,
        tz: datetime.tzinfo | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.on_queued = on_queued
        self.tz = tz
        self.next: float | None = None
        self._running: Deferred[Any] | None = None
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock
        self.configure(config)

    @property
    def at(self) -> tuple[int, int] | None:
        """``digest_at`` as (hour, minute), None when no digest is configured."""
        return parse_time_of_day(self.config.quarantine.digest_at or "")

    def configure(self, config: Config) -> None:
        """Apply a (re)loaded configuration: a new ``digest_at`` applies from now."""
        self.config = config
        at = self.at
        self.next = None if at is None else next_run(self.clock.seconds(), at, self.tz)

    def start(self) -> Deferred[Any]:
        """Look at the clock every CHECK_EVERY seconds; send a digest missed while stopped."""
        self._loop.start(CHECK_EVERY, now=False)
        at = self.at
        if at is None:
            return succeed(None)
        log.info("quarantine digest every day at %02d:%02d (next %s)", at[0], at[1],
                 _local(self.next or 0, self.tz))
        return Deferred.fromCoroutine(self._catch_up(at))

    async def _catch_up(self, at: tuple[int, int]) -> None:
        try:
            mark = await self.store.digest_mark()
        except Exception as error:
            log.error("quarantine digest: cannot read the last digest's time: %s", error)
            return
        missed = previous_run(self.clock.seconds(), at, self.tz)
        if mark is not None and mark < missed:
            log.info("quarantine digest of %s was missed (last one %s): sending it now",
                     _local(missed, self.tz), _local(mark, self.tz))
            await self._run_logged()

    def stop(self) -> Deferred[Any]:
        """Stop; fires when a run in progress has finished."""
        if self._loop.running:
            self._loop.stop()
        return self._running if self._running is not None else succeed(None)

    def tick(self) -> Deferred[Any] | None:
        """Run when ``digest_at`` has come."""
        at = self.at
        now = self.clock.seconds()
        if at is None or self.next is None or now < self.next:
            return None
        self.next = next_run(now, at, self.tz)
        return Deferred.fromCoroutine(self._run_logged())

    async def _run_logged(self) -> None:
        if self._running is not None:
            return
        self._running = Deferred.fromCoroutine(self.run())
        try:
            await self._running
        except Exception as error:
            log.error("quarantine digest failed: %s (the next run covers this period too)", error)
        finally:
            self._running = None

    async def run(self) -> DigestRun:
        """Queue one digest per recipient with mail held since the last digest, now.

        :raises StoreError: when the store cannot answer (nothing is queued).
        """
        since = await self.store.digest_mark()
        now = self.clock.seconds()
        until = now if since is None else max(now, since)
        held = await self.store.quarantine_list(now=now, since=since, limit=SCAN_LIMIT)
        if len(held) >= SCAN_LIMIT:
            log.warning("quarantine digest: more than %d held messages; the oldest are not listed", SCAN_LIMIT)
        by_recipient: dict[str, list[Quarantined]] = {}
        for entry in held:  # newest first
            if entry.at <= until:
                by_recipient.setdefault(entry.recipient, []).append(entry)
        most = self.config.quarantine.digest_max
        notices = [
            (recipient, {"ids": [e.id for e in entries[:most]], "total": len(entries), "since": since,
                         "until": until})
            for recipient, entries in sorted(by_recipient.items())
        ]
        queued = await self.store.queue_digest(since=since, until=until, notices=notices)
        messages = sum(len(entries) for entries in by_recipient.values())
        if not queued:
            log.info("quarantine digest: already sent by another process")
            return DigestRun(False, since, until, 0, 0)
        log.info("quarantine digest: %d recipient(s), %d held message(s)", len(notices), messages)
        if notices:
            self.on_queued()
        return DigestRun(True, since, until, len(notices), messages)


# --- the mail --------------------------------------------------------------------


def default_base_url(listen_http: str | None, port: int | None = None) -> str | None:
    """``http://ADDRESS:PORT`` of a TCP ``listen.http`` (``port``: the one actually bound)."""
    if not listen_http:
        return None
    kind, _, rest = listen_http.partition(":")
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    parts = rest.split(":")
    options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    chosen = port if port is not None else int(parts[0]) if parts[0].isdigit() else 0
    host = options.get("interface", "")
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - reading, not binding
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if kind == "ssl" else "http"
    return f"{scheme}://{host}:{chosen}"


def _local(timestamp: float, tz: datetime.tzinfo | None) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, tz) if tz else datetime.datetime.fromtimestamp(timestamp)
    return moment.strftime("%Y-%m-%d %H:%M")


def show_time(timestamp: float, language: str, tz: datetime.tzinfo | None = None) -> str:
    """A time for people, in the server's time zone (or ``tz``)."""
    moment = datetime.datetime.fromtimestamp(timestamp, tz) if tz else datetime.datetime.fromtimestamp(timestamp)
    return moment.strftime("%d/%m/%Y %H:%M" if language == "fr" else "%Y-%m-%d %H:%M")


def show_duration(seconds: float, language: str) -> str:
    """``2592000`` -> ``30 days`` (``30 jours``)."""
    units = (
        (86400, "day", "jour"),
        (3600, "hour", "heure"),
        (60, "minute", "minute"),
    )
    for size, english, french in units:
        if seconds >= size and seconds % size == 0 or size == 60:
            count = max(1, round(seconds / size))
            word = french if language == "fr" else english
            return f"{count} {word}{'s' if count > 1 else ''}"
    raise AssertionError("unreachable")  # pragma: no cover


def counted(count: int, language: str, held: bool) -> str:
    """``1 message held``, ``3 messages retenus``; ``2 more``, ``2 autres`` (``held`` False)."""
    many = count > 1
    if language == "fr":
        if held:
            return f"{count} message{'s' if many else ''} retenu{'s' if many else ''}"
        return f"{count} autre{'s' if many else ''}"
    return f"{count} message{'s' if many else ''} held" if held else f"{count} more"


def one_line(text: str, limit: int = SHOWN) -> str:
    """Text from a message (subject, sender) made safe to show: no control characters, one line."""
    cleaned = "".join(c if c.isprintable() else " " for c in text)
    cleaned = " ".join(cleaned.split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


class DigestMail:
    """Writes digest mail from the ``digest*`` templates.

    :param config: the configuration (``quarantine.*``, ``notify.from``, ``content.tag``).
    :param signer: makes the links.
    :param base_url: where users reach the self-service pages (None until known:
        the server sets it once its HTTP listener is bound).
    :param header_secret: signs the ``X-Policyd-Digest`` header (None: not signed).
    :param tz: the time zone of the dates shown; None: the server's.
    """

    def __init__(
        self,
        config: Config,
        signer: LinkSigner,
        base_url: str | None = None,
        header_secret: bytes | None = None,
        tz: datetime.tzinfo | None = None,
    ) -> None:
        self.signer = signer
        self.base_url = base_url
        self.header_secret = header_secret
        self.tz = tz
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Apply a (re)loaded configuration."""
        self.config = config
        self.languages = list(config.quarantine.digest_languages or [config.language])
        self.texts = {language: Texts(language, config.templates) for language in self.languages}
        self.signer.ttl = float(config.quarantine.link_ttl)
        if config.quarantine.base_url:
            self.base_url = config.quarantine.base_url

    def release_url(self, entry: Quarantined, now: float) -> str:
        """The release link of one held message."""
        return f"{self._base()}{PAGES}/release/{self.signer.release(entry, now)}"

    def preference_url(self, recipient: str, now: float) -> str:
        """The link to a recipient's preference page."""
        return f"{self._base()}{PAGES}/preference/{self.signer.preference(recipient, now)}"

    def _base(self) -> str:
        if not self.base_url:
            raise PolicydError("quarantine.base_url: the address of the self-service pages is not known")
        return self.base_url.rstrip("/")

    async def message(self, notice: Notice, store: HeldMail, now: float) -> bytes | None:
        """The digest mail of a ``digest`` notice; None when none of its messages is still held."""
        ids = [int(i) for i in notice.payload.get("ids", [])]
        since = notice.payload.get("since")
        live = await store.quarantine_list(now=now, recipient=notice.recipient, limit=SCAN_LIMIT)
        by_id = {e.id: e for e in live}
        entries = [by_id[i] for i in ids if i in by_id]
        if not entries:
            return None
        others = max(0, int(notice.payload.get("total", len(ids))) - len(ids))
        return self.compose(notice.recipient, entries, others, since, now)

    def compose(
        self, recipient: str, entries: Sequence[Quarantined], others: int, since: float | None, now: float
    ) -> bytes:
        """The digest to ``recipient`` listing ``entries`` (newest first) and counting ``others``."""
        preferences = self.preference_url(recipient, now)
        links = [self.release_url(entry, now) for entry in entries]
        first = min(entry.at for entry in entries) if since is None else float(since)
        subjects, texts, sections = [], [], []
        for language in self.languages:
            texts_of = self.texts[language]
            values = {
                "count": len(entries) + others,
                "held": counted(len(entries) + others, language, held=True),
                "recipient": recipient,
                "since": show_time(first, language, self.tz),
                "expires": show_time(now + self.signer.ttl, language, self.tz),
                "retention": show_duration(float(self.config.quarantine.retention), language),
                "tag": self.config.content.tag,
                "preferences": preferences,
            }
            rows = [
                {
                    "date": show_time(entry.at, language, self.tz),
                    "sender": one_line(entry.sender or "<>"),
                    "subject": one_line(entry.subject) or "-",
                    "score": f"{entry.score:.1f}",
                    "link": link,
                }
                for entry, link in zip(entries, links, strict=True)
            ]
            more = texts_of.render("digest_more", others=counted(others, language, held=False)) if others else ""
            text = texts_of.render(
                "digest",
                **values,
                entries="\n\n".join(texts_of.render("digest_entry", **row) for row in rows),
                more=f"\n{more}\n" if more else "",
            )
            subject, _, body = text.partition("\n")
            subjects.append(subject.removeprefix("Subject:").strip())
            texts.append(body.strip())
            escaped = {k: html.escape(str(v)) for k, v in values.items()}
            section = texts_of.render(
                "digest_html",
                **escaped,
                rows="\n".join(
                    texts_of.render("digest_row_html", **{k: html.escape(v) for k, v in row.items()}) for row in rows
                ),
                more=texts_of.render("digest_more_html", others=counted(others, language, held=False)) if others else "",
            )
            sections.append(f'<div lang="{language}">{section}</div>')
        message = EmailMessage()
        message["From"] = self.config.notify.from_
        message["To"] = recipient
        message["Subject"] = " / ".join(dict.fromkeys(subjects))
        message["Date"] = email.utils.formatdate(now, localtime=True)
        message["Message-ID"] = email.utils.make_msgid("policyd.digest")
        message["Auto-Submitted"] = "auto-generated"
        message["X-Auto-Response-Suppress"] = "All"
        message["Content-Language"] = ", ".join(self.languages)
        if self.header_secret is not None:
            message[DIGEST_HEADER] = digest_header(self.header_secret, recipient, now)
        message.set_content("\n\n----------\n\n".join(texts) + "\n")
        message.add_alternative(_document(self.languages[0], " / ".join(subjects), sections), subtype="html")
        return message.as_bytes()


def _document(language: str, title: str, sections: Sequence[str]) -> str:
    divider = '<hr style="border:0;border-top:1px solid #ccc;margin:2em 0">'
    return (
        f'<!doctype html><html lang="{language}"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title></head>"
        '<body style="font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;line-height:1.45;'
        'color:#111;background:#fff;max-width:40rem;margin:0 auto;padding:1em">'
        f"{divider.join(sections)}</body></html>\n"
    )
