"""Admin operations shared by the command line and (later) the HTTP API.

Every change is written to the audit log with who, when and why.
"""

from __future__ import annotations

import datetime
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

from policyd.checks.accounts import Accounts
from policyd.config import Config, format_duration, parse_duration
from policyd.errors import UsageError
from policyd.store import AuditEntry, Block, Exemption, Store


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
            raise UsageError(f"no exemption #{exemption_id}")
        return found

    async def approve(self, exemption_id: int, by: str, reason: str = "") -> Exemption:
        """Approve one pending request; it applies inside its window only.

        :raises UsageError: when it is not pending, its window has passed, or
            the account already has an approved exemption overlapping it.
        """
        exemption = await self._pending(exemption_id)
        now = self.clock.seconds()
        if exemption.status != "pending":
            raise UsageError(f"exemption #{exemption_id} is {exemption.state(now)}, not pending")
        if exemption.end <= now:
            raise UsageError(f"exemption #{exemption_id} asked for a window that has already ended")
        for other in await self.store.exemptions():
            if (
                other.account == exemption.account
                and other.status == "approved"
                and other.start < exemption.end
                and exemption.start < other.end
            ):
                raise UsageError(
                    f"{exemption.account} already has approved exemption #{other.id} in that window"
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
        if exemption.state(now) not in allowed:
            raise UsageError(f"exemption #{exemption_id} is {exemption.state(now)}, not {' or '.join(allowed)}")
        decided = attrs.evolve(exemption, status=status, decided_by=by, decided_at=now, decision=reason)
        await self.store.save_exemption(decided)
        action = "exemption-deny" if status == "denied" else "exemption-revoke"
        await self.store.record(AuditEntry(now, by, action, _subject(decided), reason))
        return decided


def _subject(exemption: Exemption) -> str:
    return f"exemption #{exemption.id} ({exemption.account}, {exemption.limit}/h)"


def parse_when(text: str, now: float) -> float:
    """``now``, ``+1h`` (from now), or an ISO 8601 time (local time when no zone is given).

    :raises UsageError: when the text is none of these.
    """
    text = text.strip()
    if text == "now":
        return now
    if text.startswith("+"):
        try:
            return now + parse_duration(text[1:])
        except ValueError:
            raise UsageError(f"{text!r}: expected now, +DURATION (+1h, +2d) or an ISO 8601 time") from None
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{text!r}: expected now, +DURATION (+1h, +2d) or an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.astimezone()
    return moment.timestamp()


def _reason(reason: str, message: str = "--reason must say why") -> str:
    reason = " ".join(reason.split())
    if not reason:
        raise UsageError(message)
    return reason
