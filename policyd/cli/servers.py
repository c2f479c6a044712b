"""``policyd serve``, ``milter``, ``config check``, ``check`` and ``score-ip``: the daemons and what tries them."""

from __future__ import annotations

import sys
from typing import Any

import click

from policyd.checks.reputation import Assessment, NetworkReputation
from policyd.cli.common import (
    TEXT,
    chosen_config,
    cli,
    config_option,
    json_option,
    load_config,
    print_json,
    print_table,
    run_async,
    say,
    show,
)
from policyd.config.files import check_files
from policyd.errors import UsageError
from policyd.netlists import NetworkSet, parse_address
from policyd.protocols import client


@cli.command()
@config_option
def serve() -> None:
    """Run the policy server in the foreground (Postfix check_policy_service).

    It does not start (exit 2) when the configuration, or a file it names,
    is wrong: see policyd config check.
    """
    # Imported here: a daemon pulls in twisted.web, twisted.names and the
    # milter's parts, which no admin command needs to load.
    from policyd.servers.policy import run

    check_files(load_config())
    run(chosen_config())


@cli.group("config")
def config_group() -> None:
    """Configuration commands."""


@config_group.command("check")
@config_option
def config_check() -> None:
    """Validate the configuration file and the files it names.

    Exit 2 naming the key and line of an error, or the key and the file
    (network lists, local_domains, accounts, quarantine.preferences,
    content.model, templates, secrets) that is missing or unreadable.
    """
    config = load_config()
    check_files(config)
    say(f"{config.source}: configuration OK")


@cli.command()
@config_option
@click.option("--server", type=TEXT, help="HOST:PORT or socket path (default: from listen.policy).")
@click.option("--sasl-username", type=TEXT, help="Authenticated account.")
@click.option("--sender", type=TEXT, help="Envelope sender.")
@click.option("--recipient", type=TEXT, help="Envelope recipient.")
@click.option("--client-address", type=TEXT, default="127.0.0.1", show_default=True, help="SMTP client address.")
@click.option("--state", "protocol_state", type=TEXT, default="RCPT", show_default=True, help="protocol_state.")
@click.option("--context", "policy_context", type=TEXT, help="policy_context (submission or inbound).")
@click.option("--attr", "extra", type=TEXT, multiple=True, metavar="NAME=VALUE", help="Any other attribute.")
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
        try:
            lines = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as error:
            raise UsageError(f"standard input is not UTF-8 text ({error.reason} at byte {error.start})") from None
        pairs += [line for line in lines.splitlines() if line.strip()]
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
        say(action)


@cli.command("score-ip")
@config_option
@click.argument("address", type=TEXT)
@click.option("--helo", type=TEXT, help="The HELO name the client gave (for the HELO heuristics).")
@json_option
def score_ip(address: str, helo: str | None, as_json: bool) -> None:
    """Explain the network reputation of client ADDRESS: each list and heuristic, total, decision.

    Asks the configured DNS zones through dns.nameservers, reads the
    network lists and looks up the reverse DNS, as the server does.
    """

    parsed = parse_address(address)
    if parsed is None:
        raise UsageError(f"{address!r} is not an IP address")
    config = load_config()
    if parsed in NetworkSet(config.trusted_networks):
        message = f"{parsed} is in trusted_networks: its mail is outbound and not scored"
        show(as_json, {"address": str(parsed), "trusted": True, "score": 0, "decision": "DUNNO"}, message)
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
        say("no zone, network list or heuristic applies")
    if assessment.allowed_by is not None:
        say(f"{parsed} is allowlisted by {assessment.allowed_by}")
    say(f"score {assessment.score:g} (tag_at {inbound.tag_at:g}, reject_at {inbound.reject_at:g})")
    say(f"decision at RCPT: {action}")


@cli.command()
@config_option
def milter() -> None:
    """Run the content-scoring milter in the foreground (Postfix smtpd_milters)."""
    from policyd.servers.milter import run

    check_files(load_config())
    run(chosen_config())
