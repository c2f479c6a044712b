"""The ``policyd`` command: servers and admin commands (click).

Every command takes ``-c/--config`` (before or after its name); errors are
one line on stderr and a non-zero exit, never a traceback; lists print a
table, or with ``--json`` one compact JSON object per line.
"""

from __future__ import annotations

import datetime
import getpass
import json
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import click

from policyd import __version__
from policyd import config as configuration
from policyd.errors import PolicydError, UsageError

T = TypeVar("T")


# --- plumbing ----------------------------------------------------------------


def _remember_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        ctx.find_root().meta["policyd.config"] = value
    return value


def config_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """Accept ``-c/--config FILE`` on this command (the group has it too)."""
    return click.option(
        "-c",
        "--config",
        "config_file",
        metavar="FILE",
        expose_value=False,
        is_eager=True,
        callback=_remember_config,
        help="Configuration file (default $POLICYD_CONFIG or /etc/policyd/policyd.yaml).",
    )(command)


def json_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--json``."""
    return click.option("--json", "as_json", is_flag=True, help="Print compact JSON lines.")(command)


def by_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--by`` (who, for the audit log)."""
    return click.option("--by", default=None, help="Who does this, for the audit log (default: your login).")(
        command
    )


def chosen_config() -> str | None:
    """The ``-c`` given anywhere on the command line, if any."""
    return click.get_current_context().find_root().meta.get("policyd.config")


def load_config() -> configuration.Config:
    """Load the configuration named on the command line."""
    return configuration.load(chosen_config())


def who(by: str | None) -> str:
    """The admin's name for the audit log."""
    if by and by.strip():
        return by.strip()
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def run_async(work: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    """Run ``work(reactor)`` on the asyncio reactor and return its result."""
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

    from policyd.reactor import install_reactor

    reactor = install_reactor()
    outcome: list[Any] = []

    def start() -> None:
        done = Deferred.fromCoroutine(work(reactor))
        done.addBoth(outcome.append)
        done.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def with_admin(work: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    """Open the store, run ``work(admin)``, close the store."""
    from policyd.admin import Admin
    from policyd.store import open_store

    config = load_config()

    async def main(reactor: Any) -> T:
        store = open_store(config.store.url, float(config.store.deadline))
        try:
            return await work(Admin(config, store, reactor))
        finally:
            await store.close()

    return run_async(main)


def when(timestamp: float) -> str:
    """A time for tables: ISO 8601 in UTC, to the second."""
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def print_json(item: Any) -> None:
    """One compact JSON object on one line."""
    click.echo(json.dumps(item, separators=(",", ":"), ensure_ascii=False, sort_keys=True))


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Aligned columns, headers first."""
    text = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]
    for row in [list(headers), *text]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


# --- commands ----------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="policyd")
@config_option
def cli() -> None:
    """Mail policy service for Postfix: outbound quota, blocks and spam scoring."""


@cli.command()
@config_option
def serve() -> None:
    """Run the policy server in the foreground (Postfix check_policy_service)."""
    from policyd.server import run

    run(chosen_config())


@cli.group("config")
def config_group() -> None:
    """Configuration commands."""


@config_group.command("check")
@config_option
def config_check() -> None:
    """Validate the configuration file; exit 2 naming the key and line of an error."""
    config = load_config()
    click.echo(f"{config.source}: configuration OK")


@cli.command()
@config_option
@click.option("--server", help="HOST:PORT or socket path (default: from listen.policy).")
@click.option("--sasl-username", help="Authenticated account.")
@click.option("--sender", help="Envelope sender.")
@click.option("--recipient", help="Envelope recipient.")
@click.option("--client-address", default="127.0.0.1", show_default=True, help="SMTP client address.")
@click.option("--state", "protocol_state", default="RCPT", show_default=True, help="protocol_state.")
@click.option("--context", "policy_context", help="policy_context (submission or inbound).")
@click.option("--attr", "extra", multiple=True, metavar="NAME=VALUE", help="Any other attribute.")
@click.option("--stdin", "from_stdin", is_flag=True, help="Read name=value lines from standard input.")
@json_option
def check(
    server: str | None,
    sasl_username: str | None,
    sender: str | None,
    recipient: str | None,
    client_address: str,
    protocol_state: str,
    policy_context: str | None,
    extra: tuple[str, ...],
    from_stdin: bool,
    as_json: bool,
) -> None:
    """Send one request to a running server and print its action."""
    from policyd import client

    attributes = {
        "request": "smtpd_access_policy",
        "protocol_state": protocol_state,
        "protocol_name": "ESMTP",
        "client_address": client_address,
        "client_name": "unknown",
        "instance": "policyd.check",
    }
    optional = {
        "sasl_username": sasl_username,
        "sender": sender,
        "recipient": recipient,
        "policy_context": policy_context,
    }
    attributes.update({k: v for k, v in optional.items() if v is not None})
    pairs = list(extra)
    if from_stdin:
        pairs += [line for line in sys.stdin.read().splitlines() if line.strip()]
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals or not name:
            raise UsageError(f"attribute {pair!r}: expected NAME=VALUE")
        attributes[name.strip()] = value
    address = client.parse_server(server) if server else client.client_address(load_config().listen.policy)
    action = client.ask(address, attributes)
    if as_json:
        word, _, text = action.partition(" ")
        print_json({"action": word, "text": text})
    else:
        click.echo(action)


@cli.command()
@config_option
@click.argument("account", required=False)
@json_option
def status(account: str | None, as_json: bool) -> None:
    """Count in the window, limit and block of ACCOUNT (or of the busiest accounts)."""
    from policyd.admin import Admin, Status

    async def work(admin: Admin) -> list[Status]:
        if account is None:
            return await admin.busiest()
        return [await admin.status(account)]

    statuses = with_admin(work)
    if as_json:
        for item in statuses:
            print_json(item.as_dict())
        return
    if account is None and not statuses:
        click.echo("no account has sent to external recipients in the window")
        return
    print_table(
        ["ACCOUNT", "SENT", "LIMIT", "WINDOW", "BLOCKED UNTIL", "REASON"],
        [
            (
                s.account,
                s.count,
                s.limit,
                configuration.format_duration(s.window),
                when(s.block.until) if s.block else "-",
                s.block.reason if s.block else "-",
            )
            for s in statuses
        ],
    )


@cli.command()
@config_option
@json_option
def blocks(as_json: bool) -> None:
    """List blocked accounts."""
    from policyd.admin import Admin
    from policyd.store import Block

    async def work(admin: Admin) -> list[Block]:
        return await admin.blocks()

    found = with_admin(work)
    if as_json:
        for block in found:
            print_json(block.as_dict())
        return
    if not found:
        click.echo("no account is blocked")
        return
    print_table(
        ["ACCOUNT", "SINCE", "UNTIL", "COUNT", "BY", "CLIENTS", "REASON"],
        [
            (b.account, when(b.since), when(b.until), b.count, b.by, ",".join(b.clients) or "-", b.reason)
            for b in found
        ],
    )


@cli.command()
@config_option
@click.argument("account")
@click.option("--reason", required=True, help="Why (kept in the block and the audit log).")
@click.option("--for", "duration", help="How long (default and maximum: outbound.block_for).")
@by_option
@json_option
def block(account: str, reason: str, duration: str | None, by: str | None, as_json: bool) -> None:
    """Block ACCOUNT from sending."""
    from policyd.admin import Admin
    from policyd.store import Block

    seconds = None
    if duration is not None:
        try:
            seconds = configuration.parse_duration(duration)
        except ValueError as error:
            raise UsageError(f"--for: {error}") from None

    async def work(admin: Admin) -> Block:
        return await admin.block(account, reason, who(by), seconds)

    made = with_admin(work)
    if as_json:
        print_json(made.as_dict())
    else:
        click.echo(f"{made.account} blocked until {when(made.until)}")


@cli.command()
@config_option
@click.argument("account")
@click.option("--reason", required=True, help="Why (kept in the audit log).")
@by_option
@json_option
def unblock(account: str, reason: str, by: str | None, as_json: bool) -> None:
    """Unblock ACCOUNT and clear its window, so the same burst does not block it again."""
    from policyd.admin import Admin
    from policyd.store import Block

    async def work(admin: Admin) -> Block:
        return await admin.unblock(account, reason, who(by))

    lifted = with_admin(work)
    if as_json:
        print_json({"account": lifted.account, "unblocked": True})
    else:
        click.echo(f"{lifted.account} unblocked (was blocked since {when(lifted.since)}: {lifted.reason})")


@cli.command()
@config_option
@click.option("--limit", default=100, show_default=True, help="How many entries.")
@json_option
def audit(limit: int, as_json: bool) -> None:
    """List the latest admin actions (who, when, what, why)."""
    from policyd.admin import Admin
    from policyd.store import AuditEntry

    async def work(admin: Admin) -> list[AuditEntry]:
        return await admin.audit(limit)

    entries = with_admin(work)
    if as_json:
        for entry in entries:
            print_json(entry.as_dict())
        return
    print_table(
        ["WHEN", "WHO", "ACTION", "SUBJECT", "REASON"],
        [(when(e.at), e.who, e.action, e.subject, e.reason) for e in entries],
    )


@cli.group()
def exemption() -> None:
    """Bulk-send exemptions: request, approve, deny, revoke, list."""


@exemption.command("request")
@config_option
@click.argument("account")
@click.option("--limit", type=int, required=True, help="Hourly limit wanted inside the window.")
@click.option("--from", "start", required=True, metavar="WHEN", help="Start: ISO 8601, now, or +DURATION.")
@click.option("--until", "end", required=True, metavar="WHEN", help="End: ISO 8601, now, or +DURATION.")
@click.option("--reason", required=True, help="The business reason.")
@by_option
@json_option
def exemption_request(
    account: str, limit: int, start: str, end: str, reason: str, by: str | None, as_json: bool
) -> None:
    """Request an exemption for ACCOUNT (pending until an admin approves it)."""
    from policyd.admin import Admin, parse_when
    from policyd.store import Exemption

    async def work(admin: Admin) -> Exemption:
        now = admin.clock.seconds()
        return await admin.request_exemption(
            account, limit, parse_when(start, now), parse_when(end, now), reason, who(by)
        )

    made = with_admin(work)
    if as_json:
        print_json({"id": made.id, "status": made.status})
    else:
        click.echo(
            f"exemption #{made.id} requested for {made.account}: {made.limit}/h "
            f"from {when(made.start)} until {when(made.end)} (pending)"
        )


def _decide(action: str, exemption_id: int, reason: str, by: str | None, as_json: bool) -> None:
    from policyd.admin import Admin
    from policyd.store import Exemption

    async def work(admin: Admin) -> tuple[Exemption, float]:
        if action == "approve":
            decided = await admin.approve(exemption_id, who(by), reason)
        elif action == "deny":
            decided = await admin.deny(exemption_id, who(by), reason)
        else:
            decided = await admin.revoke(exemption_id, who(by), reason)
        return decided, admin.clock.seconds()

    decided, now = with_admin(work)
    if as_json:
        print_json(decided.as_dict(now))
    else:
        click.echo(f"exemption #{decided.id} for {decided.account} {decided.status}")


@exemption.command("approve")
@config_option
@click.argument("exemption_id", metavar="ID", type=int)
@click.option("--reason", default="", help="A note for the audit log.")
@by_option
@json_option
def exemption_approve(exemption_id: int, reason: str, by: str | None, as_json: bool) -> None:
    """Approve request ID: its limit applies inside its window only, once."""
    _decide("approve", exemption_id, reason, by, as_json)


@exemption.command("deny")
@config_option
@click.argument("exemption_id", metavar="ID", type=int)
@click.option("--reason", required=True, help="Why (told in the audit log).")
@by_option
@json_option
def exemption_deny(exemption_id: int, reason: str, by: str | None, as_json: bool) -> None:
    """Deny request ID."""
    _decide("deny", exemption_id, reason, by, as_json)


@exemption.command("revoke")
@config_option
@click.argument("exemption_id", metavar="ID", type=int)
@click.option("--reason", required=True, help="Why (told in the audit log).")
@by_option
@json_option
def exemption_revoke(exemption_id: int, reason: str, by: str | None, as_json: bool) -> None:
    """Withdraw approved exemption ID before its window ends."""
    _decide("revoke", exemption_id, reason, by, as_json)


@exemption.command("list")
@config_option
@click.option("--status", type=click.Choice(["pending", "approved", "denied", "revoked", "expired"]))
@json_option
def exemption_list(status: str | None, as_json: bool) -> None:
    """List exemptions (all, or those with one status)."""
    from policyd.admin import Admin
    from policyd.store import Exemption

    async def work(admin: Admin) -> tuple[list[Exemption], float]:
        return await admin.exemptions(), admin.clock.seconds()

    found, now = with_admin(work)
    chosen = [e for e in found if status is None or e.state(now) == status]
    if as_json:
        for item in chosen:
            print_json(item.as_dict(now))
        return
    if not chosen:
        click.echo("no exemption")
        return
    print_table(
        ["ID", "ACCOUNT", "LIMIT", "FROM", "UNTIL", "STATUS", "BY", "REASON"],
        [
            (e.id, e.account, e.limit, when(e.start), when(e.end), e.state(now), e.requested_by, e.reason)
            for e in chosen
        ],
    )


@cli.command("score-ip")
@config_option
@click.argument("address")
@click.option("--helo", help="The HELO name the client gave (for the HELO heuristics).")
@json_option
def score_ip(address: str, helo: str | None, as_json: bool) -> None:
    """Explain the network reputation of client ADDRESS: each list and heuristic, total, decision.

    Asks the configured DNS zones through dns.nameservers, reads the
    network lists and looks up the reverse DNS, as the server does.
    """
    from policyd.netlists import NetworkSet, parse_address
    from policyd.reputation import Assessment, NetworkReputation

    parsed = parse_address(address)
    if parsed is None:
        raise UsageError(f"{address!r} is not an IP address")
    config = load_config()
    if parsed in NetworkSet(config.trusted_networks):
        message = f"{parsed} is in trusted_networks: its mail is outbound and not scored"
        if as_json:
            print_json({"address": str(parsed), "trusted": True, "score": 0, "decision": "DUNNO"})
        else:
            click.echo(message)
        return

    async def work(reactor: Any) -> tuple[Assessment, str]:
        reputation = NetworkReputation(config, reactor)
        assessment = await reputation.assess(parsed, helo=helo)
        return assessment, str(reputation.decision(assessment))

    assessment, action = run_async(work)
    inbound = config.inbound
    if as_json:
        print_json(
            {
                "address": str(parsed),
                "score": assessment.score,
                "allowed_by": assessment.allowed_by,
                "decision": action.split(" ", 1)[0],
                "action": action,
                "tag_at": inbound.tag_at,
                "reject_at": inbound.reject_at,
                "sources": [p.as_dict() for p in assessment.sources],
            }
        )
        return
    if assessment.sources:
        print_table(
            ["SOURCE", "KIND", "POINTS", "DETAIL"],
            [(p.source, p.kind, f"{p.points:g}", p.detail) for p in assessment.sources],
        )
    else:
        click.echo("no zone, network list or heuristic applies")
    if assessment.allowed_by is not None:
        click.echo(f"{parsed} is allowlisted by {assessment.allowed_by}")
    click.echo(f"score {assessment.score:g} (tag_at {inbound.tag_at:g}, reject_at {inbound.reject_at:g})")
    click.echo(f"decision at RCPT: {action}")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run a command, turning every error into one line and an exit status."""
    try:
        result = cli.main(args=argv, prog_name="policyd", standalone_mode=False)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        click.echo("policyd: aborted", err=True)
        sys.exit(1)
    except PolicydError as error:
        click.echo(f"policyd: error: {error}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:
        click.echo(f"policyd: internal error: {type(error).__name__}: {error}", err=True)
        sys.exit(70)
    sys.exit(result if isinstance(result, int) else 0)
