"""A store in process memory: for tests, and for trying policyd out."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed

from policyd.store import (
    MAX_BLOCK_CLIENTS,
    Admission,
    AuditEntry,
    Block,
    Charge,
    Exemption,
    Notice,
    Outcome,
    Quarantined,
)
from policyd.store.audit import matches


@attrs.define
class _Queued:
    """A notice in the outbox, when it is due, and when it was sent."""

    notice: Notice
    due: float
    sent: float | None = None


class MemoryStore:
    """Keeps everything in dictionaries; lost when the process ends."""

    #: Answers at once (memory), within a turn or the busy timeout (SQLite),
    #: or within ``deadline`` (Redis): see :attr:`policyd.store.Store.bounded`.
    bounded = True

    def __init__(self) -> None:
        #: Per account: (time, instance, client) of every counted recipient.
        self.sends: dict[str, deque[tuple[float, str, str]]] = {}
        self.live_blocks: dict[str, Block] = {}
        self.entries: list[AuditEntry] = []
        self.outbox: dict[int, _Queued] = {}
        self.exempt: dict[int, Exemption] = {}
        self.accounts: dict[str, float] = {}
        self.held: dict[int, tuple[Quarantined, bytes]] = {}
        self.held_sequence = 0
        self.spam_choices: dict[str, str] = {}
        self.mark: float | None = None
        self.claims: dict[int, float] = {}

    def _window(self, account: str, now: float, window: float) -> deque[tuple[float, str, str]]:
        sends = self.sends.setdefault(account, deque())
        while sends and sends[0][0] <= now - window:
            sends.popleft()
        return sends

    def _live(self, account: str, now: float) -> Block | None:
        block = self.live_blocks.get(account)
        if block is not None and block.until <= now:
            del self.live_blocks[account]
            return None
        return block

    def admit(self, charge: Charge) -> Deferred[Admission]:
        """See :meth:`policyd.store.Store.admit`."""
        account, now, window, limit = charge.account, charge.now, charge.window, charge.limit
        block_for, reason, instance, client, notify = (
            charge.block_for, charge.reason, charge.instance, charge.client, charge.notify
        )
        block = self._live(account, now)
        if block is not None:
            return succeed(Admission(Outcome.BLOCKED, block.count, block))
        sends = self._window(account, now, window)
        if len(sends) < limit:
            sends.append((now, instance, client))
            return succeed(Admission(Outcome.ALLOWED, len(sends)))
        clients = tuple(dict.fromkeys(c for _, _, c in reversed(sends) if c))[:MAX_BLOCK_CLIENTS]
        block = Block(account, now, now + block_for, reason, len(sends), clients)
        self.live_blocks[account] = block
        for recipient in notify:
            notice = Notice(len(self.outbox) + 1, "block", recipient, block.as_dict(), now)
            self.outbox[notice.id] = _Queued(notice, now)
        return succeed(Admission(Outcome.NEWLY_BLOCKED, len(sends), block))

    def give_back(self, account: str, instance: str, since: float | None = None) -> Deferred[int]:
        """See :meth:`policyd.store.Store.give_back`."""
        sends = self.sends.get(account, deque())
        kept = deque(s for s in sends if s[1] != instance)
        given = len(sends) - len(kept)
        self.sends[account] = kept
        return succeed(given)

    def usage(self, account: str, *, now: float, window: float) -> Deferred[int]:
        """See :meth:`policyd.store.Store.usage`."""
        return succeed(len(self._window(account, now, window)))

    def busiest(self, *, now: float, window: float, limit: int = 20) -> Deferred[list[tuple[str, int]]]:
        """See :meth:`policyd.store.Store.busiest`."""
        counts = [(a, len(self._window(a, now, window))) for a in list(self.sends)]
        counts = [c for c in counts if c[1]]
        return succeed(sorted(counts, key=lambda c: (-c[1], c[0]))[: max(limit, 0)])

    def block_of(self, account: str, *, now: float) -> Deferred[Block | None]:
        """See :meth:`policyd.store.Store.block_of`."""
        return succeed(self._live(account, now))

    def blocks(self, *, now: float) -> Deferred[list[Block]]:
        """See :meth:`policyd.store.Store.blocks`."""
        live = [b for a in list(self.live_blocks) if (b := self._live(a, now)) is not None]
        return succeed(sorted(live, key=lambda b: (b.since, b.account)))

    def block(self, block: Block) -> Deferred[Block]:
        """See :meth:`policyd.store.Store.block`."""
        self.live_blocks[block.account] = block
        return succeed(block)

    def unblock(self, account: str, *, now: float) -> Deferred[Block | None]:
        """See :meth:`policyd.store.Store.unblock`."""
        self.sends.pop(account, None)
        block = self._live(account, now)
        self.live_blocks.pop(account, None)
        return succeed(block)

    def record(self, entry: AuditEntry) -> Deferred[None]:
        """See :meth:`policyd.store.Store.record`."""
        self.entries.append(entry)
        return succeed(None)

    def claim_notices(self, *, now: float, lease: float, limit: int = 20) -> Deferred[list[Notice]]:
        """See :meth:`policyd.store.Store.claim_notices`."""
        due = [q for q in self.outbox.values() if q.sent is None and q.due <= now][:limit]
        for queued in due:
            queued.notice = attrs.evolve(queued.notice, attempts=queued.notice.attempts + 1)
            queued.due = now + lease
        return succeed([q.notice for q in due])

    def notice_sent(self, notice_id: int, *, now: float) -> Deferred[None]:
        """See :meth:`policyd.store.Store.notice_sent`."""
        if notice_id in self.outbox:
            self.outbox[notice_id].sent = now
        return succeed(None)

    def notice_failed(self, notice_id: int, *, retry_at: float, error: str) -> Deferred[None]:
        """See :meth:`policyd.store.Store.notice_failed`."""
        queued = self.outbox.get(notice_id)
        if queued is not None:
            queued.notice = attrs.evolve(queued.notice, last_error=error)
            queued.due = retry_at
        return succeed(None)

    def pending_notices(self) -> Deferred[int]:
        """See :meth:`policyd.store.Store.pending_notices`."""
        return succeed(sum(1 for q in self.outbox.values() if q.sent is None))

    def notice_backlog(self) -> Deferred[tuple[float | None, int]]:
        """See :meth:`policyd.store.Store.notice_backlog`."""
        waiting = [q.notice for q in self.outbox.values() if q.sent is None]
        oldest = min((n.created for n in waiting), default=None)
        return succeed((oldest, sum(1 for n in waiting if n.last_error)))

    def save_exemption(self, exemption: Exemption) -> Deferred[Exemption]:
        """See :meth:`policyd.store.Store.save_exemption`."""
        if not exemption.id:
            exemption = attrs.evolve(exemption, id=max(self.exempt, default=0) + 1)
        self.exempt[exemption.id] = exemption
        return succeed(exemption)

    def exemption(self, exemption_id: int) -> Deferred[Exemption | None]:
        """See :meth:`policyd.store.Store.exemption`."""
        return succeed(self.exempt.get(exemption_id))

    def exemptions(self) -> Deferred[list[Exemption]]:
        """See :meth:`policyd.store.Store.exemptions`."""
        return succeed([self.exempt[i] for i in sorted(self.exempt)])

    def note_account(self, account: str, *, now: float) -> Deferred[None]:
        """See :meth:`policyd.store.Store.note_account`."""
        self.accounts[account] = now
        return succeed(None)

    def account_seen(self, account: str) -> Deferred[bool]:
        """See :meth:`policyd.store.Store.account_seen`."""
        return succeed(account in self.accounts)

    def audit(
        self,
        *,
        limit: int = 100,
        account: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> Deferred[list[AuditEntry]]:
        """See :meth:`policyd.store.Store.audit`."""
        chosen = [e for e in self.entries if matches(e, account, since, until)]
        return succeed(chosen[-limit:] if limit > 0 else [])

    def prune(self, *, now: float, window: float) -> Deferred[int]:
        """See :meth:`policyd.store.Store.prune`."""
        before = sum(len(s) for s in self.sends.values())
        for account in list(self.sends):
            if not self._window(account, now, window):
                del self.sends[account]
        for account in list(self.live_blocks):
            self._live(account, now)
        return succeed(before - sum(len(s) for s in self.sends.values()))

    def quarantine(self, entry: Quarantined, message: bytes) -> Deferred[Quarantined]:
        """See :meth:`policyd.store.Store.quarantine`."""
        self.held_sequence += 1
        entry = attrs.evolve(entry, id=self.held_sequence)
        self.held[entry.id] = (entry, bytes(message))
        return succeed(entry)

    def quarantined(self, entry_id: int, *, now: float) -> Deferred[tuple[Quarantined, bytes] | None]:
        """See :meth:`policyd.store.Store.quarantined`."""
        found = self.held.get(entry_id)
        if found is None or found[0].until <= now:
            return succeed(None)
        return succeed(found)

    def quarantine_list(
        self, *, now: float, recipient: str | None = None, limit: int = 1000, since: float | None = None
    ) -> Deferred[list[Quarantined]]:
        """See :meth:`policyd.store.Store.quarantine_list`."""
        live = [
            entry
            for entry, _ in self.held.values()
            if entry.until > now
            and (recipient is None or entry.recipient == recipient)
            and (since is None or entry.at > since)
        ]
        return succeed(sorted(live, key=lambda e: (-e.at, -e.id))[: max(limit, 0)])

    def quarantine_delete(self, entry_id: int) -> Deferred[bool]:
        """See :meth:`policyd.store.Store.quarantine_delete`."""
        self.claims.pop(entry_id, None)
        return succeed(self.held.pop(entry_id, None) is not None)

    def claim_release(self, entry_id: int, *, now: float, lease: float) -> Deferred[bool]:
        """See :meth:`policyd.store.Store.claim_release`."""
        if self.claims.get(entry_id, now) > now:
            return succeed(False)
        self.claims[entry_id] = now + lease
        return succeed(True)

    def end_claim(self, entry_id: int) -> Deferred[None]:
        """See :meth:`policyd.store.Store.end_claim`."""
        self.claims.pop(entry_id, None)
        return succeed(None)

    def quarantine_expire(self, *, now: float) -> Deferred[int]:
        """See :meth:`policyd.store.Store.quarantine_expire`."""
        old = [i for i, (entry, _) in self.held.items() if entry.until <= now]
        for entry_id in old:
            del self.held[entry_id]
        return succeed(len(old))

    def set_preference(self, address: str, spam: str | None) -> Deferred[None]:
        """See :meth:`policyd.store.Store.set_preference`."""
        if spam is None:
            self.spam_choices.pop(address, None)
        else:
            self.spam_choices[address] = spam
        return succeed(None)

    def preferences(self, addresses: Sequence[str] | None = None) -> Deferred[dict[str, str]]:
        """See :meth:`policyd.store.Store.preferences`."""
        if addresses is None:
            return succeed(dict(sorted(self.spam_choices.items())))
        return succeed({a: self.spam_choices[a] for a in addresses if a in self.spam_choices})

    def digest_mark(self) -> Deferred[float | None]:
        """See :meth:`policyd.store.Store.digest_mark`."""
        return succeed(self.mark)

    def queue_digest(
        self, *, since: float | None, until: float, notices: Sequence[tuple[str, dict[str, Any]]]
    ) -> Deferred[bool]:
        """See :meth:`policyd.store.Store.queue_digest`."""
        if self.mark != since:
            return succeed(False)
        self.mark = until
        for recipient, payload in notices:
            notice = Notice(len(self.outbox) + 1, "digest", recipient, dict(payload), until)
            self.outbox[notice.id] = _Queued(notice, until)
        return succeed(True)

    def close(self) -> Deferred[None]:
        """Nothing to flush."""
        return succeed(None)
