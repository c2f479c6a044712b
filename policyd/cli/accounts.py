"""``policyd status``, ``blocks``, ``block``, ``unblock`` and ``audit``: accounts, their blocks and the audit log."""

from __future__ import annotations

import click

from policyd import config as configuration
from policyd.admin import Admin, BlockChange, Status, parse_when
from policyd.cli.common import (
    ACCOUNT,
    POSITIVE,
    TEXT,
    by_option,
    cli,
    config_option,
    json_option,
    moment_option,
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
    """Block ACCOUNT from sending.

    An account blocked already keeps the time it was first blocked; the new
    end (now plus --for) and reason replace the old ones, and the command
    says what changed.
    """

    seconds = None
    if duration is not None:
        try:
            seconds = configuration.parse_duration(duration)
        except ValueError as error:
            raise UsageError(f"--for: {error}") from None

    async def work(admin: Admin) -> BlockChange:
        return await admin.block_account(account, reason, who(by), seconds)

    change = with_admin(work)
    made, replaced = change.made, change.replaced
    data = made.as_dict() | {"replaced": None if replaced is None else replaced.as_dict()}
    if replaced is None:
        text = f"{made.account} blocked until {when(made.until)}"
    elif change.changes():
        text = (f"{made.account} was blocked already (since {when(made.since)}); changed: "
                f"{'; '.join(change.changes())}")
    else:
        text = f"{made.account} was blocked already until {when(made.until)} for that reason: nothing changed"
    show(as_json, data, text)


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
@click.option("--limit", type=POSITIVE, default=100, show_default=True, help="How many entries (the latest).")
@click.option("--account", type=ACCOUNT, help="Only the entries about this account.")
@moment_option("since", "Only the entries made at or after this time")
@moment_option("until", "Only the entries made before this time")
@json_option
def audit(limit: int, account: str | None, since_text: str | None, until_text: str | None, as_json: bool) -> None:
    """List the latest admin actions (who, when, what, why), oldest first.

    Times are shown in the server's time zone, with their offset; --since
    and --until read a time without a zone in that same zone.
    """

    async def work(admin: Admin) -> list[AuditEntry]:
        now = admin.clock.seconds()
        since = None if since_text is None else parse_when(since_text, now)
        until = None if until_text is None else parse_when(until_text, now)
        return await admin.audit(limit, account=account, since=since, until=until)

    entries = with_admin(work)
    searched = account is not None or since_text is not None or until_text is not None
    show_list(
        as_json,
        entries,
        AuditEntry.as_dict,
        ["WHEN", "WHO", "ACTION", "SUBJECT", "REASON"],
        lambda e: (when(e.at), e.who, e.action, e.subject, e.reason),
        empty="no audit entry matches" if searched else "the audit log is empty",
    )
