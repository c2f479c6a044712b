"""Admin operations shared by the command line and (later) the HTTP API.

Every change is written to the audit log with who, when and why.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

from policyd.config import Config, format_duration
from policyd.errors import UsageError
from policyd.store import AuditEntry, Block, Store


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

    def limit_of(self, account: str) -> int:
        """An account's hourly limit."""
        overrides = {k.lower(): v for k, v in self.config.outbound.overrides.items()}
        return overrides.get(account, self.config.outbound.limit)

    async def status(self, account: str) -> Status:
        """Count in the window, limit and block of one account."""
        account = normalise_account(account)
        now = self.clock.seconds()
        window = float(self.config.outbound.window)
        count = await self.store.usage(account, now=now, window=window)
        block = await self.store.block_of(account, now=now)
        return Status(account, count, self.limit_of(account), window, block)

    async def busiest(self, limit: int = 20) -> list[Status]:
        """The accounts sending most in the window."""
        now = self.clock.seconds()
        window = float(self.config.outbound.window)
        busiest = await self.store.busiest(now=now, window=window, limit=limit)
        result = []
        for account, count in busiest:
            block = await self.store.block_of(account, now=now)
            result.append(Status(account, count, self.limit_of(account), window, block))
        return result

    async def blocks(self) -> list[Block]:
        """Every live block."""
        return await self.store.blocks(now=self.clock.seconds())

    async def block(self, account: str, reason: str, by: str, duration: float | None = None) -> Block:
        """Block an account by hand.

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
        block = Block(account, now, now + duration, reason, count, (), by)
        await self.store.block(block)
        await self.store.record(AuditEntry(now, by, "block", account, reason))
        return block

    async def unblock(self, account: str, reason: str, by: str) -> Block:
        """Lift a block and clear the account's window.

        :raises UsageError: when the account is not blocked (its window is
            cleared all the same) or the reason is empty.
        """
        account = normalise_account(account)
        reason = _reason(reason)
        now = self.clock.seconds()
        block = await self.store.unblock(account, now=now)
        if block is None:
            raise UsageError(f"account {account} is not blocked")
        await self.store.record(AuditEntry(now, by, "unblock", account, reason))
        return block

    async def audit(self, limit: int = 100) -> list[AuditEntry]:
        """The latest audit entries."""
        return await self.store.audit(limit=limit)


def _reason(reason: str) -> str:
    reason = " ".join(reason.split())
    if not reason:
        raise UsageError("--reason must say why")
    return reason
