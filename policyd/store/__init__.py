"""The state store: one interface, several back ends.

Every operation returns a :class:`~twisted.internet.defer.Deferred`, so a
back end may answer at once (memory, SQLite) or over the network (Redis).
Read-check-write operations such as :meth:`Store.admit` are atomic in every
back end: several ``policyd serve`` processes sharing one store never let an
account past its limit.  Times are POSIX seconds passed in by the caller, so
tests drive them with a fake clock.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from policyd.errors import ConfigError

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


class Store(Protocol):
    """What the checks and the admin commands need from a state store."""

    #: Whether every operation answers or fails within the store's deadline
    #: by itself (the checks then set no timer of their own per request).
    bounded: bool

    def admit(self, charge: Charge) -> Deferred[Admission]:
        """Count one external recipient for ``charge.account`` if it may send.

        Atomically: an account with a live block is refused; one with fewer
        than ``limit`` recipients in the last ``window`` seconds gets this one
        counted; otherwise the account is blocked for ``block_for`` seconds
        (the block records ``reason``, the count and the client addresses seen
        in the window) and the recipient is refused.  Refused recipients are
        never counted.  A new block puts one ``block`` notice per address in
        ``notify`` in the outbox, in the same atomic step, so one block means
        exactly one notification to each, even across a crash.
        """

    def give_back(self, account: str, instance: str, since: float | None = None) -> Deferred[int]:
        """Uncount the recipients of one transaction; returns how many.

        :param since: when its first recipient was counted, when known: a
            store may look only at what it counted from then on.
        """

    def usage(self, account: str, *, now: float, window: float) -> Deferred[int]:
        """Recipients counted for ``account`` in the window ending at ``now``."""

    def busiest(self, *, now: float, window: float, limit: int = 20) -> Deferred[list[tuple[str, int]]]:
        """The accounts with most recipients in the window, most first."""

    def block_of(self, account: str, *, now: float) -> Deferred[Block | None]:
        """The live block of ``account``, if any."""

    def blocks(self, *, now: float) -> Deferred[list[Block]]:
        """Every live block, oldest first."""

    def block(self, block: Block) -> Deferred[Block]:
        """Record a block made by an admin (replacing any live one)."""

    def unblock(self, account: str, *, now: float) -> Deferred[Block | None]:
        """Lift the block of ``account`` and clear its window.

        Returns the block that was lifted, or None when there was none (the
        window is cleared either way).
        """

    def record(self, entry: AuditEntry) -> Deferred[None]:
        """Append one entry to the audit log."""

    def claim_notices(self, *, now: float, lease: float, limit: int = 20) -> Deferred[list[Notice]]:
        """Take up to ``limit`` due notices for sending.

        Claimed notices are not due again for ``lease`` seconds, so two
        processes sharing the store never send the same one at once; a
        process that dies while sending leaves it to be retried.
        """

    def notice_sent(self, notice_id: int, *, now: float) -> Deferred[None]:
        """Mark a notice delivered; it is never sent again."""

    def notice_failed(self, notice_id: int, *, retry_at: float, error: str) -> Deferred[None]:
        """Record a failed attempt and when to try again."""

    def pending_notices(self) -> Deferred[int]:
        """How many notices wait to be delivered."""

    def save_exemption(self, exemption: Exemption) -> Deferred[Exemption]:
        """Store a new exemption (``id`` 0: one is given) or replace one; returns it."""

    def exemption(self, exemption_id: int) -> Deferred[Exemption | None]:
        """One exemption by id."""

    def exemptions(self) -> Deferred[list[Exemption]]:
        """Every exemption, oldest request first."""

    def note_account(self, account: str, *, now: float) -> Deferred[None]:
        """Remember that ``account`` authenticated (valid accounts when no list is configured)."""

    def account_seen(self, account: str) -> Deferred[bool]:
        """Whether ``account`` was ever noted."""

    def audit(self, *, limit: int = 100) -> Deferred[list[AuditEntry]]:
        """The latest audit entries, oldest first."""

    def prune(self, *, now: float, window: float) -> Deferred[int]:
        """Forget counts older than the window and expired blocks."""

    def quarantine(self, entry: Quarantined, message: bytes) -> Deferred[Quarantined]:
        """Hold ``message`` for ``entry.recipient``; returns the entry with its id."""

    def quarantined(self, entry_id: int, *, now: float) -> Deferred[tuple[Quarantined, bytes] | None]:
        """One held message and its description; None when unknown or expired."""

    def quarantine_list(
        self, *, now: float, recipient: str | None = None, limit: int = 1000, since: float | None = None
    ) -> Deferred[list[Quarantined]]:
        """Held messages that have not expired (of one recipient, or all), newest first.

        :param since: only those held after this time (the digest's period).
        """

    def quarantine_delete(self, entry_id: int) -> Deferred[bool]:
        """Forget one held message (and its release claim); whether it was there."""

    def claim_release(self, entry_id: int, *, now: float, lease: float) -> Deferred[bool]:
        """Take the right to release one held message, atomically; False when another
        release holds it (until its ``lease`` seconds have passed).

        The message stays held while it is delivered: a release that dies on
        the way leaves it to be released again after the lease, never lost.
        """

    def end_claim(self, entry_id: int) -> Deferred[None]:
        """Give up a release claim (the delivery failed; the message stays held)."""

    def quarantine_expire(self, *, now: float) -> Deferred[int]:
        """Forget held messages whose retention has passed; returns how many."""

    def set_preference(self, address: str, spam: str | None) -> Deferred[None]:
        """Record what ``address`` wants done with its spam (``inbox`` or ``quarantine``); None forgets it."""

    def preferences(self, addresses: Sequence[str] | None = None) -> Deferred[dict[str, str]]:
        """The recorded choices of ``addresses`` (those without one are left out), or of everyone."""

    def digest_mark(self) -> Deferred[float | None]:
        """Up to when held mail has been in a digest (None before the first digest)."""

    def queue_digest(
        self, *, since: float | None, until: float, notices: Sequence[tuple[str, dict[str, Any]]]
    ) -> Deferred[bool]:
        """Queue one digest: move the digest mark from ``since`` to ``until`` and put a
        ``digest`` notice per (recipient, payload) in the outbox, in one atomic step.

        Nothing is done, and False returned, when the mark is no longer ``since``:
        another process sent that digest, so several servers sharing the store
        send each recipient one digest, and a crash never sends it twice or loses it.
        """

    def close(self) -> Deferred[None]:
        """Flush and release the store."""


def open_store(url: str, deadline: float = 0.5, reactor: IReactorTime | None = None) -> Store:
    """Open the store named by ``store.url``.

    :param deadline: longest wait for one operation of a networked store
        (``store.deadline``); the embedded ones answer at once.
    :param reactor: a server's reactor, which lets SQLite group the commits
        of one reactor turn; admin commands leave it out.

    :raises ConfigError: for an unknown scheme.
    :raises StoreError: when the store cannot be opened.
    """
    if url.startswith("memory://"):
        from policyd.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:///"):
        from policyd.store.sqlite import SQLiteStore

        return SQLiteStore(url[len("sqlite:///") :], reactor=reactor)
    if url.startswith(("redis://", "rediss://", "redis+sentinel://", "unix://")):
        from policyd.store.redis import RedisStore

        return RedisStore(url, deadline=deadline)
    raise ConfigError(f"store.url: unknown store {url!r}")
