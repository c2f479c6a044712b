"""``policyd exemption request|approve|deny|revoke|list``: bulk-send exemptions, one occasion each."""

from __future__ import annotations

import click

from policyd.admin import Admin, parse_when
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
from policyd.store import Exemption
from policyd.times import WHEN_HELP


@cli.group()
def exemption() -> None:
    """Bulk-send exemptions: request, approve, deny, revoke, list."""


@exemption.command("request")
@config_option
@click.argument("account", type=ACCOUNT)
@click.option("--limit", type=POSITIVE, required=True, help="Hourly limit wanted inside the window.")
@click.option("--from", "start", type=TEXT, required=True, metavar="WHEN", help=f"Start: {WHEN_HELP}.")
@click.option("--until", "end", type=TEXT, required=True, metavar="WHEN", help=f"End: {WHEN_HELP}.")
@click.option("--reason", type=TEXT, required=True, help="The business reason.")
@by_option
@json_option
def exemption_request(
    account: str, limit: int, start: str, end: str, reason: str, by: str | None, as_json: bool
) -> None:
    """Request an exemption for ACCOUNT (pending until an admin approves it).

    ACCOUNT must be a valid account (the accounts file or table; without
    one, an account that has authenticated before), --limit above its
    current hourly limit, and the window at most exemptions.max_window.
    Times are shown in the server's time zone, with their offset.
    """

    async def work(admin: Admin) -> Exemption:
        now = admin.clock.seconds()
        return await admin.request_exemption(
            account, limit, parse_when(start, now), parse_when(end, now), reason, who(by)
        )

    made = with_admin(work)
    show(as_json, {"id": made.id, "status": made.status}, f"exemption #{made.id} requested for {made.account}: {made.limit}/h " f"from {when(made.start)} until {when(made.end)} (pending)")


def _decide(action: str, exemption_id: int, reason: str, by: str | None, as_json: bool) -> None:

    async def work(admin: Admin) -> tuple[Exemption, float]:
        if action == "approve":
            decided = await admin.approve(exemption_id, who(by), reason)
        elif action == "deny":
            decided = await admin.deny(exemption_id, who(by), reason)
        else:
            decided = await admin.revoke(exemption_id, who(by), reason)
        return decided, admin.clock.seconds()

    decided, now = with_admin(work)
    show(as_json, decided.as_dict(now), f"exemption #{decided.id} for {decided.account} {decided.status}")


def _decision(action: str, summary: str, reason_help: str, reason_required: bool) -> None:
    """Add ``policyd exemption ACTION ID``: one decision on one exemption, audited."""

    @exemption.command(action, help=summary)
    @config_option
    @click.argument("exemption_id", metavar="ID", type=POSITIVE)
    @click.option("--reason", type=TEXT, required=reason_required, default=None if reason_required else "",
                  help=reason_help)
    @by_option
    @json_option
    def decide(exemption_id: int, reason: str, by: str | None, as_json: bool) -> None:
        _decide(action, exemption_id, reason, by, as_json)


_decision("approve", "Approve request ID: its limit applies inside its window only, once.",
          "A note for the audit log.", reason_required=False)
_decision("deny", "Deny request ID.", "Why (told in the audit log).", reason_required=True)
_decision("revoke", "Withdraw approved exemption ID before its window ends.", "Why (told in the audit log).",
          reason_required=True)


@exemption.command("list")
@config_option
@click.option("--status", type=click.Choice(["pending", "approved", "denied", "revoked", "expired"]))
@json_option
def exemption_list(status: str | None, as_json: bool) -> None:
    """List exemptions (all, or those with one status)."""

    async def work(admin: Admin) -> tuple[list[Exemption], float]:
        return await admin.exemptions(), admin.clock.seconds()

    found, now = with_admin(work)
    chosen = [e for e in found if status is None or e.state(now) == status]
    show_list(
        as_json,
        chosen,
        lambda e: e.as_dict(now),
        ["ID", "ACCOUNT", "LIMIT", "FROM", "UNTIL", "STATUS", "BY", "REASON"],
        lambda e: (e.id, e.account, e.limit, when(e.start), when(e.end), e.state(now), e.requested_by, e.reason),
        empty="no exemption",
    )
