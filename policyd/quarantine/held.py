"""The quarantine: spam held for the recipients who chose it, and their choices.

Each recipient chooses what happens to mail scored as spam
(``policyd prefs set ADDRESS --spam inbox|quarantine``; without a choice,
``quarantine.default``):

- ``inbox``: delivered, tagged;
- ``quarantine``: removed from that recipient's delivery by the milter and
  kept here (tagged, as it would have been delivered) for
  ``quarantine.retention``, then forgotten.

An administrator lists, shows, releases or deletes held mail
(``policyd quarantine ...``).  Release re-injects the message by SMTP
through ``quarantine.smtp`` to its recipient only, with an
``X-Policyd-Release`` header signed with the install's header secret, so
that the milter, which scores it again on the way in, delivers it to that
recipient's inbox instead of holding it a second time.  Every release and
deletion is in the audit log.  A release first takes a claim on the message
in the store (:meth:`policyd.store.Store.claim_release`), so two presses of a
release button (or an admin and a user at once) deliver it once; the message
stays held until the MTA has taken it, so a release that dies on the way
loses nothing.

Once the MTA has taken it, a released message is learned as ham onto the
content model in use (``content.learn_from_release``; who learned it is who
released it), through the :class:`~policyd.content.feedback.Feedback`
given to :class:`Quarantine`: off the reactor thread, after the release is
done, so learning can neither delay nor fail a release.

policyd's own digest mail carries an ``X-Policyd-Digest`` header signed the
same way, so the milter never tags or holds the digest that lists spam.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import smtplib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from policyd.config import Config
from policyd.errors import NoSuchObject, PolicydError, UsageError
from policyd.quarantine.preferences import Preferences
from policyd.store import SPAM_CHOICES, AuditEntry, Quarantined, Store

if TYPE_CHECKING:
    from policyd.content.feedback import Feedback

log = logging.getLogger("policyd.quarantine")

#: The header a released message carries, so it is not held again.
RELEASE_HEADER = "X-Policyd-Release"

#: The header of policyd's own digest mail, so the milter never tags or holds it.
DIGEST_HEADER = "X-Policyd-Digest"

#: How long after it was made a digest header is honoured: the outbox may
#: retry a digest for a while, a copy replayed weeks later is not trusted.
DIGEST_HEADER_AGE = 3 * 86400.0

#: How long an SMTP conversation with ``quarantine.smtp`` may take.
SMTP_TIMEOUT = 60.0

#: How long a release claim keeps other releases of the message away: far
#: longer than one SMTP conversation, short enough that a release that died
#: leaves the message releasable again soon.
RELEASE_LEASE = 10 * SMTP_TIMEOUT

#: ``deliver(smtp, sender, recipient, message)``: hands a released message to the MTA.
Deliver = Callable[[str, str, str, bytes], "Deferred[Any]"]


def normalise_address(address: str) -> str:
    """An envelope address as preferences and the quarantine key it: no ``<>``, lower case."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address.strip().lower()


def check_address(address: str) -> str:
    """A normalised address given on the command line.

    :raises UsageError: when it is not ``local@domain``.
    """
    clean = normalise_address(address)
    local, at, domain = clean.rpartition("@")
    if not at or not local or not domain or any(c.isspace() or ord(c) < 0x20 for c in clean):
        raise UsageError(f"{address!r} is not a mail address (local@domain)")
    return clean


def _release_token(secret: bytes, entry_id: int, recipient: str) -> str:
    message = f"release|{entry_id}|{normalise_address(recipient)}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:32]


def release_header(secret: bytes, entry_id: int, recipient: str) -> str:
    """The value of the ``X-Policyd-Release`` header of a released message."""
    return f"id={entry_id}; recipient={normalise_address(recipient)}; token={_release_token(secret, entry_id, recipient)}"


def released_for(value: str, secret: bytes) -> str | None:
    """The recipient a genuine ``X-Policyd-Release`` header names, or None."""
    fields = _header_fields(value)
    try:
        entry_id = int(fields["id"])
        recipient = fields["recipient"]
        token = fields["token"]
    except (KeyError, ValueError):
        return None
    if not hmac.compare_digest(_release_token(secret, entry_id, recipient), token.lower()):
        return None
    return normalise_address(recipient)


def _header_fields(value: str) -> dict[str, str]:
    fields = {}
    for part in " ".join(value.split()).split(";"):
        name, equals, field = part.strip().partition("=")
        if equals:
            fields[name.strip().lower()] = field.strip()
    return fields


def _digest_token(secret: bytes, recipient: str, stamp: int) -> str:
    message = f"digest|{stamp}|{normalise_address(recipient)}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:32]


def digest_header(secret: bytes, recipient: str, now: float) -> str:
    """The value of the ``X-Policyd-Digest`` header of a digest to ``recipient``."""
    stamp = int(now)
    return f"recipient={normalise_address(recipient)}; time={stamp}; token={_digest_token(secret, recipient, stamp)}"


def digest_for(value: str, secret: bytes, now: float, max_age: float = DIGEST_HEADER_AGE) -> str | None:
    """The recipient a genuine, recent ``X-Policyd-Digest`` header names, or None."""
    fields = _header_fields(value)
    try:
        recipient = fields["recipient"]
        stamp = int(fields["time"])
        token = fields["token"]
    except (KeyError, ValueError):
        return None
    if not hmac.compare_digest(_digest_token(secret, recipient, stamp), token.lower()):
        return None
    if not -300 <= now - stamp <= max_age:
        return None
    return normalise_address(recipient)


#: Longest Message-ID kept in an audit entry: a real one is under 100
#: characters; a sender's absurd one must not fill the audit log.
MAX_MESSAGE_ID = 200


def message_id(headers: Sequence[tuple[str, str]] | bytes) -> str:
    """The Message-ID of a message (its headers, or its bytes), unfolded and bounded; "" without one."""
    if isinstance(headers, bytes):
        block = headers.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
        text = block.decode("utf-8", "replace")
        fields: list[tuple[str, str]] = []
        for line in text.replace("\r\n", "\n").split("\n"):
            if line[:1] in (" ", "\t") and fields:
                fields[-1] = (fields[-1][0], fields[-1][1] + line)
            elif ":" in line:
                name, _, value = line.partition(":")
                fields.append((name, value))
        headers = fields
    for name, value in headers:
        if name.strip().lower() == "message-id":
            return " ".join(value.split())[:MAX_MESSAGE_ID]
    return ""


def audit_reason(reason: str, entry: Quarantined, found_id: str) -> str:
    """An audit reason for held mail, naming the message as Postfix's log does: Message-ID and queue id."""
    ids = f"Message-ID {found_id or '(none)'}, queue id {entry.queue_id or '(none)'}"
    return f"{reason} ({ids})" if reason else ids


def held_audit(entry: Quarantined, found_id: str, by: str, action: str, reason: str, at: float) -> AuditEntry:
    """The audit entry of held mail: ``quarantine #N for RECIPIENT``, the reason with the message's ids."""
    subject = f"quarantine #{entry.id} for {entry.recipient}"
    return AuditEntry(at, by, action, subject, audit_reason(reason, entry, found_id))


def reinject(
    host_port: str, sender: str, recipient: str, message: bytes, timeout: float = SMTP_TIMEOUT
) -> None:
    """Hand ``message`` to the MTA at ``host:port`` for ``recipient`` only (blocking).

    :raises PolicydError: when the MTA is unreachable or refuses it.
    """
    host, _, port = host_port.rpartition(":")
    try:
        with smtplib.SMTP(host.strip("[]"), int(port), timeout=timeout) as client:
            client.ehlo_or_helo_if_needed()
            refused = client.sendmail(sender, [recipient], message)
    except smtplib.SMTPRecipientsRefused as error:
        code, reply = error.recipients.get(recipient, (0, b""))
        raise PolicydError(f"{host_port} refused {recipient}: {code} {reply.decode('utf-8', 'replace')}") from None
    except smtplib.SMTPResponseException as error:
        answer = error.smtp_error
        shown = answer.decode("utf-8", "replace") if isinstance(answer, bytes) else str(answer)
        raise PolicydError(f"{host_port} refused the message: {error.smtp_code} {shown}") from None
    except (smtplib.SMTPException, OSError) as error:
        raise PolicydError(f"cannot re-inject through {host_port}: {error}") from None
    if refused:
        raise PolicydError(f"{host_port} refused {recipient}: {refused[recipient]}")


class Quarantine:
    """Admin operations on held mail and spam choices; each change is audited.

    :param config: the configuration (``quarantine.*``).
    :param store: the state store.
    :param clock: time source.
    :param secret: the header secret, to sign released messages (None: they
        are re-injected unsigned and may be held again).
    :param deliver: hands a released message to the MTA; by default
        :func:`reinject` in the reactor's thread pool (``clock`` is then the reactor).
    :param preferences: resolves choices (own, provisioned, default); one
        reading provisioning at once is made when not given.
    :param feedback: learns released mail as ham (with ``content.learn_from_release``);
        None: released mail is not learned.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        clock: IReactorTime,
        secret: bytes | None = None,
        deliver: Deliver | None = None,
        preferences: Preferences | None = None,
        feedback: Feedback | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.secret = secret
        self.deliver = deliver or self._reinject_in_thread
        self.preferences = preferences or Preferences(config, store, clock)
        self.feedback = feedback
        # Learning started by releases and not finished yet (see settled()).
        self._learning: set[Deferred[Any]] = set()

    def _reinject_in_thread(self, smtp: str, sender: str, recipient: str, message: bytes) -> Deferred[Any]:
        from twisted.internet import threads

        return threads.deferToThreadPool(
            self.clock,  # type: ignore[arg-type]
            self.clock.getThreadPool(),  # type: ignore[attr-defined]
            reinject,
            smtp,
            sender,
            recipient,
            message,
        )

    async def entries(self, recipient: str | None = None, limit: int = 1000) -> list[Quarantined]:
        """Held mail (of one recipient, or all), newest first."""
        wanted = check_address(recipient) if recipient else None
        return await self.store.quarantine_list(now=self.clock.seconds(), recipient=wanted, limit=limit)

    async def entry(self, entry_id: int) -> tuple[Quarantined, bytes]:
        """One held message and its description.

        :raises NoSuchObject: when there is no such (live) entry.
        """
        found = await self.store.quarantined(entry_id, now=self.clock.seconds())
        if found is None:
            raise NoSuchObject(f"no quarantined message #{entry_id} (released, deleted or expired?)")
        return found

    async def release(
        self,
        entry_id: int,
        by: str,
        reason: str = "",
        only_if: Callable[[Quarantined], bool] | None = None,
    ) -> Quarantined:
        """Deliver a held message to its recipient, once, then forget it.

        A claim in the store comes first: of two releases at once, one
        delivers and the other is refused.

        :param only_if: a check of the entry (a self-service link names it);
            when it fails nothing is changed.
        :raises UsageError: when there is no such entry (or ``only_if`` refuses
            it, or another release of it is under way).
        :raises PolicydError: when ``quarantine.smtp`` does not take it (it stays held).
        """
        entry, message = await self.entry(entry_id)
        if only_if is not None and not only_if(entry):
            raise UsageError(f"quarantine #{entry_id} is not the message this link names")
        if not await self.store.claim_release(entry.id, now=self.clock.seconds(), lease=RELEASE_LEASE):
            raise UsageError(f"quarantine #{entry_id} is being released already")
        held = message
        if self.secret is not None:
            header = f"{RELEASE_HEADER}: {release_header(self.secret, entry.id, entry.recipient)}\r\n"
            message = header.encode() + message
        smtp = self.config.quarantine.smtp
        try:
            await self.deliver(smtp, entry.sender, entry.recipient, message)
        except BaseException:
            try:
                await self.store.end_claim(entry.id)
            except Exception as error:  # the lease ends by itself
                log.warning("quarantine #%d: release claim not ended (%s)", entry.id, error)
            raise
        await self.store.quarantine_delete(entry.id)
        await self._audit(by, "release", entry, message, reason or f"re-injected through {smtp}")
        log.info("quarantine #%d released to %s by %s", entry.id, entry.recipient, by)
        self._learn_ham(entry, held, by)
        return entry

    def _learn_ham(self, entry: Quarantined, message: bytes, by: str) -> None:
        """Start learning a released message as ham; the release does not wait for it."""
        if self.feedback is None or not self.config.content.learn_from_release:
            return
        try:
            learning = self.feedback.learn(self.config, message, False, by, f"quarantine #{entry.id} released")
        except Exception as error:  # the release is done whatever happens here
            log.error("quarantine #%d: released message not learned: %s", entry.id, error)
            return
        self._learning.add(learning)

        def done(result: object) -> object:
            self._learning.discard(learning)
            return result

        learning.addBoth(done)

    async def settled(self) -> None:
        """Wait until the learning of released mail has finished (a command waits before it exits)."""
        while self._learning:
            await next(iter(self._learning))

    async def delete(self, entry_id: int, by: str, reason: str = "") -> Quarantined:
        """Forget a held message.

        :raises UsageError: when there is no such entry.
        """
        entry, message = await self.entry(entry_id)
        await self.store.quarantine_delete(entry.id)
        await self._audit(by, "quarantine-delete", entry, message, reason or "deleted")
        return entry

    async def expire(self) -> int:
        """Forget held mail past its retention."""
        return await self.store.quarantine_expire(now=self.clock.seconds())

    async def _audit(self, by: str, action: str, entry: Quarantined, message: bytes, reason: str) -> None:
        await self.store.record(held_audit(entry, message_id(message), by, action, reason, self.clock.seconds()))

    # --- preferences -------------------------------------------------------------

    async def set_choice(self, address: str, spam: str | None, by: str) -> str:
        """Record ``address``'s choice (None: back to ``quarantine.default``); returns the address.

        :raises UsageError: for a bad address or choice.
        """
        clean = check_address(address)
        if spam is not None and spam not in SPAM_CHOICES:
            raise UsageError(f"--spam must be one of {', '.join(SPAM_CHOICES)}")
        await self.store.set_preference(clean, spam)
        await self.store.record(
            AuditEntry(self.clock.seconds(), by, "prefs", clean, f"spam: {spam or 'default'}")
        )
        return clean

    async def choices(self, addresses: Sequence[str] | None = None) -> dict[str, str]:
        """The choice of each address (its own, else the default), or every recorded choice."""
        if addresses is None:
            return await self.store.preferences()
        clean = [check_address(a) for a in addresses]
        return await self.preferences.spam(clean)
