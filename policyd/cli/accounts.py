"""``policyd status``, ``blocks``, ``block``, ``unblock`` and ``audit``: accounts, their blocks and the audit log."""

from __future__ import annotations

import click

from policyd import config as configuration
from policyd.admin import Admin, Status
from policyd.cli.common import (
    ACCOUNT,
    POSITIVE,
    TEXT,
    by_option,
    cli,
    config_option,
    json_option,
    show,
    show_list,
    when,
    who,
    with_admin,
)
from policyd.errors import UsageError
from policyd.store import AuditEntry, Block


@cli.command()
@config_option
@click.argument("account", type=ACCOUNT, required=False)
@json_option
def status(account: str | None, as_json: bool) -> None:
    """Count in the window, limit and block of ACCOUNT (or of the busiest accounts)."""

    async def work(admin: Admin) -> list[Status]:
        if account is None:
            return await admin.busiest()
        return [await admin.status(account)]

    statuses = with_admin(work)
    show_list(
        as_json,
        statuses,
        Status.as_dict,
        ["ACCOUNT", "SENT", "LIMIT", "WINDOW", "BLOCKED UNTIL", "REASON"],
        lambda s: (
            s.account,
            s.count,
            s.limit,
            configuration.format_duration(s.window),
            when(s.block.until) if s.block else "-",
            s.block.reason if s.block else "-",
        ),
        empty=None if account else "no account has sent to external recipients in the window",
    )


@cli.command()
@config_option
@json_option
def blocks(as_json: bool) -> None:
    """List blocked accounts."""

    async def work(admin: Admin) -> list[Block]:
        return await admin.blocks()

    found = with_admin(work)
    show_list(
        as_json,
        found,
        Block.as_dict,
        ["ACCOUNT", "SINCE", "UNTIL", "COUNT", "BY", "CLIENTS", "REASON"],
        lambda b: (b.account, when(b.since), when(b.until), b.count, b.by, ",".join(b.clients) or "-", b.reason),
        empty="no account is blocked",
    )


@cli.command()
@config_option
@click.argument("account", type=ACCOUNT)
@click.option("--reason", type=TEXT, required=True, help="Why (kept in the block and the audit log).")
@click.option("--for", "duration", type=TEXT, help="How long (default and maximum: outbound.block_for).")
@by_option
@json_option
def block(account: str, reason: str, duration: str | None, by: str | None, as_json: bool) -> None:
    """Block ACCOUNT from sending."""

    seconds = None
    if duration is not None:
        try:
            seconds = configuration.parse_duration(duration)
        except ValueError as error:
            raise UsageError(f"--for: {error}") from None

    async def work(admin: Admin) -> Block:
        return await admin.block(account, reason, who(by), seconds)

    made = with_admin(work)
    show(as_json, made.as_dict(), f"{made.account} blocked until {when(made.until)}")


@cli.command()
@config_option
@click.argument("account", type=ACCOUNT)
@click.option("--reason", type=TEXT, required=True, help="Why (kept in the audit log).")
@by_option
@json_option
def unblock(account: str, reason: str, by: str | None, as_json: bool) -> None:
    """Unblock ACCOUNT and clear its window, so the same burst does not block it again."""

    async def work(admin: Admin) -> Block:
        return await admin.unblock(account, reason, who(by))

    lifted = with_admin(work)
    show(as_json, {"account": lifted.account, "unblocked": True}, f"{lifted.account} unblocked (was blocked since {when(lifted.since)}: {lifted.reason})")


@cli.command()
@config_option
@click.option("--limit", type=POSITIVE, default=100, show_default=True, help="How many entries.")
@json_option
def audit(limit: int, as_json: bool) -> None:
    """List the latest admin actions (who, when, what, why)."""

    async def work(admin: Admin) -> list[AuditEntry]:
        return await admin.audit(limit)

    entries = with_admin(work)
    show_list(
        as_json,
        entries,
        AuditEntry.as_dict,
        ["WHEN", "WHO", "ACTION", "SUBJECT", "REASON"],
        lambda e: (when(e.at), e.who, e.action, e.subject, e.reason),
    )
