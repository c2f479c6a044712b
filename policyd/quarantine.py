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
deletion is in the audit log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import smtplib
from collections.abc import Sequence

from twisted.internet.interfaces import IReactorTime

from policyd.config import Config
from policyd.errors import PolicydError, UsageError
from policyd.store import SPAM_CHOICES, AuditEntry, Quarantined, Store

log = logging.getLogger("policyd.quarantine")

#: The header a released message carries, so it is not held again.
RELEASE_HEADER = "X-Policyd-Release"

#: How long an SMTP conversation with ``quarantine.smtp`` may take.
SMTP_TIMEOUT = 60.0


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
    fields = {}
    for part in " ".join(value.split()).split(";"):
        name, equals, field = part.strip().partition("=")
        if equals:
            fields[name.strip().lower()] = field.strip()
    try:
        entry_id = int(fields["id"])
        recipient = fields["recipient"]
        token = fields["token"]
    except (KeyError, ValueError):
        return None
    if not hmac.compare_digest(_release_token(secret, entry_id, recipient), token.lower()):
        return None
    return normalise_address(recipient)


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
    """

    def __init__(self, config: Config, store: Store, clock: IReactorTime, secret: bytes | None = None) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.secret = secret

    async def entries(self, recipient: str | None = None, limit: int = 1000) -> list[Quarantined]:
        """Held mail (of one recipient, or all), newest first."""
        wanted = check_address(recipient) if recipient else None
        return await self.store.quarantine_list(now=self.clock.seconds(), recipient=wanted, limit=limit)

    async def entry(self, entry_id: int) -> tuple[Quarantined, bytes]:
        """One held message and its description.

        :raises UsageError: when there is no such (live) entry.
        """
        found = await self.store.quarantined(entry_id, now=self.clock.seconds())
        if found is None:
            raise UsageError(f"no quarantined message #{entry_id} (released, deleted or expired?)")
        return found

    async def release(self, entry_id: int, by: str, reason: str = "") -> Quarantined:
        """Deliver a held message to its recipient, then forget it.

        :raises UsageError: when there is no such entry.
        :raises PolicydError: when ``quarantine.smtp`` does not take it (it stays held).
        """
        from twisted.internet import threads

        entry, message = await self.entry(entry_id)
        if self.secret is not None:
            header = f"{RELEASE_HEADER}: {release_header(self.secret, entry.id, entry.recipient)}\r\n"
            message = header.encode() + message
        smtp = self.config.quarantine.smtp
        await threads.deferToThreadPool(
            self.clock,  # type: ignore[arg-type]
            self.clock.getThreadPool(),  # type: ignore[attr-defined]
            reinject,
            smtp,
            entry.sender,
            entry.recipient,
            message,
        )
        await self.store.quarantine_delete(entry.id)
        await self._audit(by, "release", entry, reason or f"re-injected through {smtp}")
        log.info("quarantine #%d released to %s by %s", entry.id, entry.recipient, by)
        return entry

    async def delete(self, entry_id: int, by: str, reason: str = "") -> Quarantined:
        """Forget a held message.

        :raises UsageError: when there is no such entry.
        """
        entry, _ = await self.entry(entry_id)
        await self.store.quarantine_delete(entry.id)
        await self._audit(by, "quarantine-delete", entry, reason or "deleted")
        return entry

    async def expire(self) -> int:
        """Forget held mail past its retention."""
        return await self.store.quarantine_expire(now=self.clock.seconds())

    async def _audit(self, by: str, action: str, entry: Quarantined, reason: str) -> None:
        subject = f"quarantine #{entry.id} for {entry.recipient}"
        await self.store.record(AuditEntry(self.clock.seconds(), by, action, subject, reason))

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
        found = await self.store.preferences(clean)
        return {a: found.get(a, self.config.quarantine.default) for a in clean}
