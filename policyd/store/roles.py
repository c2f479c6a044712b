"""The store's roles: each consumer depends on the few operations it uses.

A back end provides them all (:class:`Store`); a fake or a contract test may
cover one role.  Every operation returns a Deferred, so a back end may answer
at once (memory, SQLite) or over the network (Redis).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from policyd.store.records import (
    Admission,
    AuditEntry,
    Block,
    Charge,
    Exemption,
    Notice,
    Quarantined,
)


class Counts(Protocol):
    """The quota's hot path: recipients counted per account, blocks, accounts seen."""

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

    def prune(self, *, now: float, window: float) -> Deferred[int]:
        """Forget counts older than the window and expired blocks."""

    def note_account(self, account: str, *, now: float) -> Deferred[None]:
        """Remember that ``account`` authenticated (valid accounts when no list is configured)."""

    def account_seen(self, account: str) -> Deferred[bool]:
        """Whether ``account`` was ever noted."""


class Exemptions(Protocol):
    """Bulk-send exemptions: requested, decided, looked up."""

    def save_exemption(self, exemption: Exemption) -> Deferred[Exemption]:
        """Store a new exemption (``id`` 0: one is given) or replace one; returns it."""

    def exemption(self, exemption_id: int) -> Deferred[Exemption | None]:
        """One exemption by id."""

    def exemptions(self) -> Deferred[list[Exemption]]:
        """Every exemption, oldest request first."""


class AuditLog(Protocol):
    """Who did what, when and why."""

    def record(self, entry: AuditEntry) -> Deferred[None]:
        """Append one entry to the audit log."""

    def audit(
        self,
        *,
        limit: int = 100,
        account: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> Deferred[list[AuditEntry]]:
        """The latest ``limit`` audit entries a search asks for, oldest first.

        :param account: only those whose subject names this account
            (:func:`policyd.store.audit.names_account`).
        :param since: only those made at or after this time.
        :param until: only those made before this time.
        """


class Outbox(Protocol):
    """Notices waiting for the relay: durable, leased, retried."""

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

    def notice_backlog(self) -> Deferred[tuple[float | None, int]]:
        """When the oldest waiting notice was queued (None when none waits), and how
        many waiting notices failed at their last attempt; for the metrics."""


class HeldMail(Protocol):
    """The quarantine's messages, their release claims and the digest mark."""

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


class Choices(Protocol):
    """Each recipient's spam choice."""

    def set_preference(self, address: str, spam: str | None) -> Deferred[None]:
        """Record what ``address`` wants done with its spam (``inbox`` or ``quarantine``); None forgets it."""

    def preferences(self, addresses: Sequence[str] | None = None) -> Deferred[dict[str, str]]:
        """The recorded choices of ``addresses`` (those without one are left out), or of everyone."""


class Store(Counts, Exemptions, AuditLog, Outbox, HeldMail, Choices, Protocol):
    """Every role: what one back end (memory, SQLite, Redis) provides."""

    def close(self) -> Deferred[None]:
        """Flush and release the store."""
