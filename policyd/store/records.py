"""What the store keeps: blocks, exemptions, notices, audit entries, held mail."""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import attrs

#: Client addresses kept with a block: enough to see a botnet, bounded in size.
MAX_BLOCK_CLIENTS = 20


@attrs.frozen
class Block:
    """An account refused from sending until an admin unblocks it or ``until`` passes."""

    account: str
    since: float
    until: float
    reason: str
    count: int
    clients: tuple[str, ...] = ()
    by: str = "policyd"

    def as_dict(self) -> dict[str, object]:
        """The block as plain data for ``--json`` and the admin API."""
        return attrs.asdict(self, recurse=False) | {"clients": list(self.clients)}


@attrs.frozen
class Notice:
    """One mail waiting in the durable outbox (a block notification, say).

    The store keeps only what happened (``kind`` and ``payload``); the mail
    is written from a template when it is sent, in the configured language.
    """

    id: int
    kind: str
    recipient: str
    payload: dict[str, Any]
    created: float
    attempts: int = 0
    last_error: str = ""


#: Exemption states: requested, then approved or denied; an approved one may be revoked.
EXEMPTION_STATES = ("pending", "approved", "denied", "revoked")


@attrs.frozen
class Exemption:
    """A bulk-send exemption: a higher hourly limit for one account, for one window.

    Requested with a business reason, then approved or denied by an admin,
    one request at a time; an approved exemption applies inside its window
    only and is never renewed.
    """

    id: int
    account: str
    limit: int
    start: float
    end: float
    reason: str
    requested_by: str
    requested_at: float
    status: str = "pending"
    decided_by: str = ""
    decided_at: float = 0.0
    decision: str = ""

    def state(self, now: float) -> str:
        """The status, with an approved exemption whose window has passed shown as ``expired``."""
        if self.status == "approved" and self.end <= now:
            return "expired"
        return self.status

    def active(self, now: float) -> bool:
        """Whether it raises the limit at ``now``."""
        return self.status == "approved" and self.start <= now < self.end

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        """Plain data for ``--json`` and the admin API."""
        data = attrs.asdict(self)
        if now is not None:
            data["status"] = self.state(now)
        return data


class Outcome(enum.Enum):
    """What :meth:`Store.admit` decided."""

    ALLOWED = "allowed"
    BLOCKED = "blocked"
    NEWLY_BLOCKED = "newly-blocked"


@attrs.frozen
class Admission:
    """The answer to one recipient: let through (and counted) or refused."""

    outcome: Outcome
    #: Recipients in the window, this one included when it was let through.
    count: int
    block: Block | None = None


class Charge(NamedTuple):
    """One external recipient to count for an account, and what counting needs.

    A named tuple: one is made for every recipient, three times faster than
    a frozen attrs class.

    :ivar now: when (POSIX seconds).
    :ivar window: the rolling window, in seconds.
    :ivar limit: recipients allowed in the window.
    :ivar block_for: how long a block made now lasts.
    :ivar reason: why, if this recipient blocks the account.
    :ivar instance: Postfix's transaction id (for give-back).
    :ivar client: the SMTP client's address (kept with a block).
    :ivar notify: who hears of a block made now.
    """

    account: str
    now: float
    window: float
    limit: int
    block_for: float
    reason: str
    instance: str = ""
    client: str = ""
    notify: tuple[str, ...] = ()


@attrs.frozen
class AuditEntry:
    """One admin action: who did what to whom, when and why."""

    at: float
    who: str
    action: str
    subject: str
    reason: str

    def as_dict(self) -> dict[str, object]:
        """The entry as plain data."""
        return attrs.asdict(self)


#: Spam choices a recipient may make (``policyd prefs set ADDRESS --spam ...``).
SPAM_CHOICES = ("inbox", "quarantine")


@attrs.frozen
class Quarantined:
    """One message held in the quarantine for one recipient.

    The message itself (bytes, as it would have been delivered: tagged) is
    stored beside this description and read with :meth:`Store.quarantined`.

    :ivar id: given by the store (0 before it is stored).
    :ivar recipient: the envelope recipient it was held for.
    :ivar sender: the envelope sender (empty for the null sender).
    :ivar subject: the decoded Subject, for listings.
    :ivar score: the spam score (network + content points).
    :ivar at: when it was held.
    :ivar until: when it expires (``quarantine.retention`` after ``at``).
    :ivar size: bytes of the message.
    :ivar client: the SMTP client address.
    :ivar queue_id: Postfix's queue id, to find it in the mail log.
    :ivar reasons: the main reasons of the score.
    """

    id: int
    recipient: str
    sender: str
    subject: str
    score: float
    at: float
    until: float
    size: int
    client: str = ""
    queue_id: str = ""
    reasons: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json`` and the admin API."""
        return attrs.asdict(self, recurse=False) | {"reasons": list(self.reasons)}
