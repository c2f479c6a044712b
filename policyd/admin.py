"""Admin operations shared by the command line and (later) the HTTP API.

Every change is written to the audit log with who, when and why.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

from policyd.checks.accounts import Accounts
from policyd.config import Config, format_duration
from policyd.errors import NoSuchObject, NothingToDo, UsageError
from policyd.store import AuditEntry, Block, Exemption, Store
from policyd.times import parse_when, show_time

__all__ = [
    "Admin", "BlockChange", "Status", "UnknownAccount", "normalise_account", "parse_when",
]


class UnknownAccount(UsageError):
    """An exemption was requested for an account that is not one of ``accounts``."""


def normalise_account(account: str) -> str:
    """Accounts are SASL logins, compared without case.

    :raises UsageError: for an empty name or one with spaces or control characters.
    """
    account = account.strip().lower()
    if not account or any(c.isspace() or ord(c) < 0x20 for c in account):
        raise UsageError(f"{account!r} is not an account name")
    return account


@attrs.frozen
class Status:
    """What the quota knows of one account."""

    account: str
    count: int
    limit: int
    window: float
    block: Block | None

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return {
            "account": self.account,
            "count": self.count,
            "limit": self.limit,
            "window": format_duration(self.window),
            "blocked": self.block is not None,
            "block": None if self.block is None else self.block.as_dict(),
        }


@attrs.frozen
class BlockChange:
    """What ``policyd block`` did: the block now in force, and the one it replaced (None for a new block)."""

    made: Block
    replaced: Block | None

    def changes(self) -> list[str]:
        """What the block changed, in words (empty for a new block or an identical one)."""
        if self.replaced is None:
            return []
        said = []
        if self.replaced.until != self.made.until:
            said.append(f"until {show_time(self.replaced.until)} -> {show_time(self.made.until)}")
        if self.replaced.reason != self.made.reason:
            said.append(f"reason {self.replaced.reason!r} -> {self.made.reason!r}")
        return said


class Admin:
    """Admin actions on the quota state.

    :param config: the configuration (limits, overrides).
    :param store: the state store.
    :param clock: time source.
    """

    def __init__(self, config: Config, store: Store, clock: IReactorTime) -> None:
        self.config = config
        self.store = store
        self.clock = clock

    async def limit_of(self, account: str, now: float) -> int:
        """An account's hourly limit at ``now``, raised by an active exemption."""
        overrides = {k.lower(): v for k, v in self.config.outbound.overrides.items()}
        limit = overrides.get(account, self.config.outbound.limit)
        for exemption in await self.store.exemptions():
            if exemption.account == account and exemption.active(now):
                limit = max(limit, exemption.limit)
        return limit

    async def status(self, account: str) -> Status:
        """Count in the window, limit and block of one account."""
        account = normalise_account(account)
        now = self.clock.seconds()
        window = float(self.config.outbound.window)
        count = await self.store.usage(account, now=now, window=window)
        block = await self.store.block_of(account, now=now)
        return Status(account, count, await self.limit_of(account, now), window, block)

    async def busiest(self, limit: int = 20) -> list[Status]:
        """The accounts sending most in the window."""
        now = self.clock.seconds()
        window = float(self.config.outbound.window)
        busiest = await self.store.busiest(now=now, window=window, limit=limit)
        result = []
        for account, count in busiest:
            block = await self.store.block_of(account, now=now)
            result.append(Status(account, count, await self.limit_of(account, now), window, block))
        return result

    async def blocks(self) -> list[Block]:
        """Every live block."""
        return await self.store.blocks(now=self.clock.seconds())

    async def block(self, account: str, reason: str, by: str, duration: float | None = None) -> Block:
        """Block an account by hand; see :meth:`block_account`."""
        return (await self.block_account(account, reason, by, duration)).made

    async def block_account(
        self, account: str, reason: str, by: str, duration: float | None = None
    ) -> BlockChange:
        """Block an account by hand, or change the block it has.

        A new block lasts ``duration`` from now.  Re-blocking a blocked
        account keeps when it was first blocked and the clients seen (a
        notice already on its way stays true) and replaces the end and the
        reason; the returned change holds the block it replaced, so the
        admin is told what changed.

        :raises UsageError: when the reason is empty or the duration too long.
        """
        account = normalise_account(account)
        reason = _reason(reason)
        longest = float(self.config.outbound.block_for)
        duration = longest if duration is None else duration
        if not 0 < duration <= longest:
            raise UsageError(f"--for must be between 1s and outbound.block_for ({format_duration(longest)})")
        now = self.clock.seconds()
        count = await self.store.usage(account, now=now, window=float(self.config.outbound.window))
        replaced = await self.store.block_of(account, now=now)
        if replaced is None:
            block = Block(account, now, now + duration, reason, count, (), by)
            noted = reason
        else:
            block = Block(account, replaced.since, now + duration, reason, max(count, replaced.count),
                          replaced.clients, by)
            noted = f"{reason} (was: until {show_time(replaced.until)}, {replaced.reason})"
        await self.store.block(block)
        await self.store.record(AuditEntry(now, by, "block", account, noted))
        return BlockChange(block, replaced)

    async def unblock(self, account: str, reason: str, by: str) -> Block:
        """Lift a block and clear the account's window.

        :raises NothingToDo: when the account is not blocked (its window is
            cleared all the same).
        :raises UsageError: when the reason is empty.
        """
        account = normalise_account(account)
        reason = _reason(reason)
        now = self.clock.seconds()
        block = await self.store.unblock(account, now=now)
        if block is None:
            raise NothingToDo(f"account {account} is not blocked")
        await self.store.record(AuditEntry(now, by, "unblock", account, reason))
        return block

    async def audit(
        self,
        limit: int = 100,
        account: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[AuditEntry]:
        """The latest ``limit`` audit entries, oldest first: all of them, or those
        naming ``account`` and made from ``since`` up to (not including) ``until``.

        :raises UsageError: when ``until`` is not after ``since``.
        """
        if since is not None and until is not None and until <= since:
            raise UsageError("--until must be after --since")
        chosen = None if account is None else normalise_account(account)
        return await self.store.audit(limit=limit, account=chosen, since=since, until=until)

    # --- exemptions -------------------------------------------------------

    async def request_exemption(
        self, account: str, limit: int, start: float, end: float, reason: str, by: str
    ) -> Exemption:
        """Record a request for a bulk-send exemption (pending until an admin decides).

        :raises UsageError: for an empty reason, or a window or limit outside
            what the configuration allows.
        :raises UnknownAccount: for an account that is not one of ``accounts``
            (checked after everything else).
        """
        account = normalise_account(account)
        reason = _reason(reason, "--reason must give the business reason")
        bounds = self.config.exemptions
        now = self.clock.seconds()
        if limit < 1 or limit > bounds.max_limit:
            raise UsageError(f"--limit must be between 1 and exemptions.max_limit ({bounds.max_limit})")
        # An exemption only ever raises a limit: one at or below it would be
        # approved and then change nothing, which misleads whoever asked.
        # The per-account override is compared after the account is known
        # valid, so the public form tells nothing of one account's limit.
        if limit <= self.config.outbound.limit:
            raise UsageError(_not_above(limit, self.config.outbound.limit, "outbound.limit"))
        if end <= start:
            raise UsageError("--until must be after --from")
        if end <= now:
            raise UsageError("the window has already ended")
        if end - start > bounds.max_window:
            raise UsageError(
                f"the window is longer than exemptions.max_window ({format_duration(bounds.max_window)})"
            )
        # Checked last, so that a request with an unknown account is refused
        # for that alone (the public form answers it like any other).
        if not await Accounts(self.config.accounts, self.store, self.clock).valid(account):
            raise UnknownAccount(f"{account} is not a valid account")
        overrides = {k.lower(): v for k, v in self.config.outbound.overrides.items()}
        if account in overrides and limit <= overrides[account]:
            raise UsageError(_not_above(limit, overrides[account], f"{account}'s outbound.overrides"))
        exemption = Exemption(0, account, limit, start, end, reason, by, now)
        saved = await self.store.save_exemption(exemption)
        await self.store.record(AuditEntry(now, by, "exemption-request", _subject(saved), reason))
        return saved

    async def exemptions(self) -> list[Exemption]:
        """Every exemption, oldest first."""
        return await self.store.exemptions()

    async def _pending(self, exemption_id: int) -> Exemption:
        found = await self.store.exemption(exemption_id)
        if found is None:
            raise NoSuchObject(f"no exemption #{exemption_id}", "refusal.unknown", id=exemption_id)
        return found

    async def approve(self, exemption_id: int, by: str, reason: str = "") -> Exemption:
        """Approve one pending request; it applies inside its window only.

        :raises NothingToDo: when it is approved already.
        :raises UsageError: when it is not pending, its window has passed, or
            the account already has an approved exemption overlapping it.
        """
        exemption = await self._pending(exemption_id)
        now = self.clock.seconds()
        state = exemption.state(now)
        if exemption.status == "approved":
            raise NothingToDo(f"exemption #{exemption_id} is {state} already", "refusal.already",
                              id=exemption_id, state=state)
        if exemption.status != "pending":
            raise UsageError(f"exemption #{exemption_id} is {state}, not pending", "refusal.not",
                             id=exemption_id, state=state, wanted="pending")
        if exemption.end <= now:
            raise UsageError(f"exemption #{exemption_id} asked for a window that has already ended", "refusal.ended",
                             id=exemption_id)
        for other in await self.store.exemptions():
            if (
                other.account == exemption.account
                and other.status == "approved"
                and other.start < exemption.end
                and exemption.start < other.end
            ):
                raise UsageError(
                    f"{exemption.account} already has approved exemption #{other.id} in that window",
                    "refusal.overlap", account=exemption.account, other=other.id,
                )
        approved = attrs.evolve(exemption, status="approved", decided_by=by, decided_at=now,
                                decision=" ".join(reason.split()))
        await self.store.save_exemption(approved)
        await self.store.record(AuditEntry(now, by, "exemption-approve", _subject(approved), approved.decision))
        return approved

    async def deny(self, exemption_id: int, by: str, reason: str) -> Exemption:
        """Deny one pending request."""
        return await self._decide(exemption_id, by, reason, "denied", ("pending",))

    async def revoke(self, exemption_id: int, by: str, reason: str) -> Exemption:
        """Withdraw an approved exemption before its window ends."""
        return await self._decide(exemption_id, by, reason, "revoked", ("approved",))

    async def _decide(
        self, exemption_id: int, by: str, reason: str, status: str, allowed: tuple[str, ...]
    ) -> Exemption:
        exemption = await self._pending(exemption_id)
        now = self.clock.seconds()
        reason = _reason(reason)
        state = exemption.state(now)
        if state == status or (status == "revoked" and state == "expired"):
            raise NothingToDo(f"exemption #{exemption_id} is {state} already", "refusal.already",
                              id=exemption_id, state=state)
        if state not in allowed:
            # One state is allowed for each decision (pending for a denial, approved for a revocation).
            raise UsageError(f"exemption #{exemption_id} is {state}, not {' or '.join(allowed)}", "refusal.not",
                             id=exemption_id, state=state, wanted=allowed[0])
        decided = attrs.evolve(exemption, status=status, decided_by=by, decided_at=now, decision=reason)
        await self.store.save_exemption(decided)
        action = "exemption-deny" if status == "denied" else "exemption-revoke"
        await self.store.record(AuditEntry(now, by, action, _subject(decided), reason))
        return decided


def _subject(exemption: Exemption) -> str:
    return f"exemption #{exemption.id} ({exemption.account}, {exemption.limit}/h)"


def _not_above(limit: int, current: int, named: str) -> str:
    return (
        f"--limit {limit} is not above the current limit of {current} external recipients per hour "
        f"({named}): an exemption only raises a limit, so ask for more than {current}"
    )


def _reason(reason: str, message: str = "--reason must say why") -> str:
    reason = " ".join(reason.split())
    if not reason:
        raise UsageError(message)
    return reason
