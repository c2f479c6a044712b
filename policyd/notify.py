"""Notifications: a durable outbox in the store, drained by SMTP.

A new block puts one ``block`` notice per recipient (help desk, the IT
contact of the account's organisation, optionally the user) in the store's
outbox in the same atomic step as the block itself; the quarantine digest
(:mod:`policyd.quarantine.digest`) puts one ``digest`` notice per recipient with held
mail.  The :class:`Notifier` writes each mail when it sends it and sends it
through ``notify.smtp`` with ``twisted.mail``, apart from the policy
replies, so a slow or dead relay never delays a decision; a failed attempt
is retried with growing delays, and a restart loses nothing.
"""

from __future__ import annotations

import email.utils
import logging
import shlex
from collections.abc import Callable
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall

from policyd.config import Config, format_duration
from policyd.errors import PolicydError
from policyd.store import Notice, Store
from policyd.texts import Texts
from policyd.times import say_time

if TYPE_CHECKING:
    from policyd.quarantine.digest import DigestMail

log = logging.getLogger("policyd.notify")

#: How often the outbox is looked at besides the kick a new block gives.
POLL_EVERY = 15.0
#: A claimed notice is not handed to another process for this long.
LEASE = 120.0
#: Longest wait for the relay to take one mail.
SEND_TIMEOUT = 60.0

Send = Callable[[str, str, bytes], "Deferred[Any]"]


def retry_delay(attempts: int, first: float = 30.0, longest: float = 3600.0) -> float:
    """Seconds before the next try after ``attempts`` failed ones (``notify.retry_*``)."""
    return float(min(longest, first * 2 ** max(0, attempts - 1)))


def split_hostport(text: str, default_port: int = 25) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (port optional)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, ""
    return host, int(port) if port else default_port


class Notifier:
    """Drains the outbox: writes each notice from its template and sends it.

    :param config: the configuration (``notify.*``, ``language``).
    :param store: where the outbox lives.
    :param reactor: reactor for timers and connections.
    :param send: ``send(sender, recipient, message) -> Deferred``; SMTP
        through ``notify.smtp`` unless given (tests pass their own).
    :param digest: writes ``digest`` notices (:class:`policyd.quarantine.digest.DigestMail`);
        without it they wait in the outbox, retried, until one is given.
    """

    def __init__(
        self, config: Config, store: Store, reactor: Any, send: Send | None = None, digest: DigestMail | None = None
    ) -> None:
        self.store = store
        self.reactor = reactor
        self._send = send
        self.digest = digest
        self._draining: Deferred[None] | None = None
        self._again = False
        self._loop = LoopingCall(self.drain)
        self._loop.clock = reactor
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Apply a (re)loaded configuration."""
        self.config = config
        self.notify = config.notify
        self.texts = Texts(config.language, config.templates)
        if self.digest is not None:
            self.digest.configure(config)

    def recipients(self, account: str) -> tuple[str, ...]:
        """Who hears of a block of ``account``."""
        return self.notify.recipients(account)

    # --- running -------------------------------------------------------

    def start(self) -> None:
        """Send what waits now, then look again every POLL_EVERY seconds (or sooner,
        when ``notify.retry_first`` is shorter, so no retry waits for the poll)."""
        self._loop.start(min(POLL_EVERY, float(self.notify.retry_first)), now=True)

    def stop(self) -> Deferred[None]:
        """Stop polling; fires when a drain in progress has finished."""
        if self._loop.running:
            self._loop.stop()
        return self._draining if self._draining is not None else succeed(None)

    def kick(self) -> None:
        """A block was just made: send its notices now rather than at the next poll."""
        self.reactor.callLater(0, self.drain)

    def drain(self) -> Deferred[None]:
        """Send every due notice (one drain at a time; a kick during it runs another)."""
        if self._draining is not None:
            self._again = True
            return self._draining
        draining = self._draining = Deferred.fromCoroutine(self._drain())

        def finished(result: Any) -> Any:
            self._draining = None
            if self._again:
                self._again = False
                self.reactor.callLater(0, self.drain)
            return None

        # A drain that finished at once (a memory store) has cleared _draining
        # already: return the Deferred itself, never None.
        draining.addBoth(finished)
        return draining

    async def _drain(self) -> None:
        try:
            while True:
                notices = await self.store.claim_notices(now=self.reactor.seconds(), lease=LEASE)
                if not notices:
                    return
                await DeferredList([Deferred.fromCoroutine(self._deliver(n)) for n in notices])
        except Exception as error:  # the store is down: the next poll tries again
            log.error("notification outbox unavailable: %s", error)

    async def _deliver(self, notice: Notice) -> None:
        try:
            message = await self._message(notice)
            if message is None:
                # A digest whose every message was released, deleted or expired meanwhile.
                await self.store.notice_sent(notice.id, now=self.reactor.seconds())
                log.info("%s for %s not sent: nothing left to list", _about(notice), notice.recipient)
                return
            sending = self.send(self.notify.from_, notice.recipient, message)
            sending.addTimeout(SEND_TIMEOUT, self.reactor)
            await sending
        except Exception as error:
            reason = _describe(error)
            delay = retry_delay(notice.attempts, self.notify.retry_first, self.notify.retry_max)
            log.warning(
                "notification to %s about %s not sent (attempt %d): %s; retrying in %s",
                notice.recipient, _about(notice), notice.attempts, reason,
                format_duration(delay),
            )
            await self.store.notice_failed(notice.id, retry_at=self.reactor.seconds() + delay, error=reason)
            return
        await self.store.notice_sent(notice.id, now=self.reactor.seconds())
        log.info("notification sent to %s about %s", notice.recipient, _about(notice))

    async def _message(self, notice: Notice) -> bytes | None:
        """The mail of a notice, or None when a digest has nothing left to list."""
        if notice.kind != "digest":
            return self.compose(notice, await self._ended(notice))
        if self.digest is None:
            raise PolicydError("this process does not write quarantine digests (policyd serve does)")
        return await self.digest.message(notice, self.store, self.reactor.seconds())

    async def _ended(self, notice: Notice) -> str | None:
        """How the block of a notice ended, when it is no longer in force: ``unblocked``
        or ``expired``; None while it lasts.

        Looked up as the mail is written, so a notice that waited in the
        outbox (a relay down) never tells of a block already lifted as if it
        still held; a newer block of the account is another incident, with
        its own notice.
        """
        block = notice.payload
        now = self.reactor.seconds()
        live = await self.store.block_of(str(block.get("account", "")), now=now)
        if live is not None and live.since == float(block.get("since", notice.created)):
            return None
        return "expired" if now >= float(block.get("until", notice.created)) else "unblocked"

    # --- writing and sending ------------------------------------------

    def compose(self, notice: Notice, ended: str | None = None) -> bytes:
        """The mail for one notice, from its template (first line ``Subject: ...``).

        :param ended: how the block ended when it is over (``unblocked`` or
            ``expired``): the mail then says "blocked, then unblocked".
        """
        block = notice.payload
        account = str(block.get("account", ""))
        to_user = notice.recipient.lower() == account.lower()
        name = "block_user" if to_user else "block_notice"
        until = _when(float(block.get("until", notice.created)))
        values = {
            "account": account,
            "since": _when(float(block.get("since", notice.created))),
            "until": until,
            "count": block.get("count", "?"),
            "reason": block.get("reason", ""),
            "clients": ", ".join(block.get("clients", [])) or "-",
            # Pasted into a shell by the help desk: the account name came from
            # outside (a SASL login) and must stay one inert argument.
            "unblock": f'policyd unblock {shlex.quote(account)} --reason "..."',
        }
        if ended is not None:
            name += "_lifted"
            values["ended"] = self.texts.render(f"block_ended_{ended}", until=until)
        text = self.texts.render(name, **values)
        subject, _, body = text.partition("\n")
        message = EmailMessage()
        message["From"] = self.notify.from_
        message["To"] = notice.recipient
        message["Subject"] = subject.removeprefix("Subject:").strip()
        message["Date"] = email.utils.formatdate(self.reactor.seconds(), usegmt=True)
        message["Message-ID"] = email.utils.make_msgid("policyd.block")
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(body.strip() + "\n")
        return message.as_bytes()

    def send(self, sender: str, recipient: str, message: bytes) -> Deferred[Any]:
        """Hand one mail to the relay (or to the injected sender)."""
        if self._send is not None:
            return self._send(sender, recipient, message)
        from twisted.mail.smtp import sendmail

        host, port = split_hostport(self.notify.smtp)
        return sendmail(
            host.encode(),
            sender.encode(),
            [recipient.encode()],
            message,
            port=port,
            reactor=self.reactor,
            username=self.notify.username.encode() if self.notify.username else None,
            password=self.notify.password.encode() if self.notify.password else None,
            requireAuthentication=bool(self.notify.username),
            requireTransportSecurity=self.notify.starttls,
        )


def _about(notice: Notice) -> str:
    if notice.kind == "digest":
        return "the quarantine digest"
    return str(notice.payload.get("account", "?"))


def _when(timestamp: float) -> str:
    """A time in a notice: the server's zone, named (:func:`policyd.times.say_time`)."""
    return say_time(timestamp)


def _describe(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(text.split())[:300]

