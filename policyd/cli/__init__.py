"""The ``policyd`` command: servers and admin commands (click).

Every command takes ``-c/--config`` (before or after its name); errors are
one line on stderr and a non-zero exit, never a traceback; lists print a
table, or with ``--json`` one compact JSON object per line.
"""

from __future__ import annotations

import datetime
import getpass
import io
import json
import re
import sys
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import click

from policyd import __version__
from policyd import config as configuration
from policyd.errors import PolicydError, UsageError
from policyd.texts import printable

T = TypeVar("T")

#: Largest id or count a command takes: the stores keep them as 64-bit signed integers.
MAX_INT = 2**63 - 1


# --- arguments ---------------------------------------------------------------


def _named(param: click.Parameter | None) -> str:
    """How an error names an argument: its long option, or its metavar (``ID``, ``ACCOUNT``)."""
    if isinstance(param, click.Option):
        return max(param.opts, key=len)
    if param is not None:
        return param.metavar or (param.name or "argument").upper()
    return "argument"


class Text(click.ParamType):
    """Text from the command line (a reason, a name, an address): valid UTF-8.

    Bytes that are not UTF-8 reach Python as surrogates, which no store,
    socket or terminal can take; they are refused here, as a usage error.
    """

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """The text, or :class:`~policyd.errors.UsageError`."""
        text = str(value)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            given = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise UsageError(f"{_named(param)}: '{given}' is not UTF-8 text") from None
        return text


class AccountName(Text):
    """An account (a SASL login): UTF-8 without spaces or control characters, lower-cased."""

    name = "account"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        """The account as the stores know it, or :class:`~policyd.errors.UsageError`."""
        from policyd.admin import normalise_account

        text = super().convert(value, param, ctx)
        # normalise_account refuses the C0 controls; DEL and the C1 ones are refused here too.
        if any(0x7F <= ord(c) <= 0x9F for c in text):
            raise UsageError(f"{_named(param)}: {text!r} is not an account name")
        return normalise_account(text)


class WholeNumber(click.ParamType):
    """An id or a count between two bounds.

    An id beyond 64 bits would overflow the store, and a negative limit
    would mean "all" to SQLite: both are usage errors, said in one line.

    :param low: smallest accepted.
    :param high: largest accepted.
    """

    name = "integer"

    def __init__(self, low: int, high: int = MAX_INT) -> None:
        self.low = low
        self.high = high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        """The number, or :class:`~policyd.errors.UsageError`."""
        if isinstance(value, int) and not isinstance(value, bool):
            number: int | None = value
        else:
            # Plain ASCII digits (int() would also take "1_000" and other scripts'
            # digits), and not thousands of them (int() refuses over 4300).
            digits = str(value).strip()
            number = int(digits) if re.fullmatch(r"-?[0-9]{1,40}", digits) else None
        if number is None or not self.low <= number <= self.high:
            given = str(value) if len(str(value)) <= 40 else f"{str(value)[:40]}..."
            raise UsageError(f"{_named(param)}: expected a whole number from {self.low} to {self.high}, got {given!r}")
        return number


#: Free text: reasons, names, addresses, times.
TEXT = Text()
#: An account name.
ACCOUNT = AccountName()
#: A quarantine or exemption id, or a count: from 1 to what the stores can hold.
POSITIVE = WholeNumber(1)


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
    return click.option(
        "--by", type=TEXT, default=None, help="Who does this, for the audit log (default: your login)."
    )(command)


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
        login = getpass.getuser()
        login.encode("utf-8")  # $LOGNAME is bytes from the environment
    except (KeyError, OSError, UnicodeEncodeError):
        return "unknown"
    return login


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


#: What ``say(..., keep=LINES)`` writes as it is: text of several lines (a message).
LINES = "\n\t"


def say(text: str, *, err: bool = False, keep: str = "") -> None:
    """Write a line for people, every character a terminal could act on escaped.

    All the command's output goes through here (or :func:`print_json`):
    subjects, senders, reasons and account names come from outside, and an
    escape sequence among them would otherwise clear the admin's screen or
    write to their clipboard (see :func:`policyd.texts.printable`).

    :param keep: characters written as they are (:data:`LINES` for text of
        several lines, whose CRLF line ends are then written as LF).
    """
    if "\n" in keep:
        text = text.replace("\r\n", "\n")
    click.echo(printable(text, keep), err=err)


def json_line(item: Any) -> str:
    """One compact JSON object on one line, nothing in it a terminal could act on.

    ``json.dumps`` escapes the C0 controls but, without ``ensure_ascii``,
    writes DEL, the C1 controls and bidi overrides as they are: those are
    written ``\\uXXXX`` too (they can only be inside strings), while other
    non-ASCII text stays readable.
    """
    text = json.dumps(item, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _json_escape(c) for c in text)


def _json_escape(character: str) -> str:
    code = ord(character)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def print_json(item: Any) -> None:
    """One compact JSON object on one line."""
    click.echo(json_line(item))


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Aligned columns, headers first; a cell's controls (a newline too) are escaped."""
    text = [[printable(str(c)) for c in row] for row in rows]
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
    from policyd.servers.policy import run

    run(chosen_config())


@cli.group("config")
def config_group() -> None:
    """Configuration commands."""


@config_group.command("check")
@config_option
def config_check() -> None:
    """Validate the configuration file; exit 2 naming the key and line of an error."""
    config = load_config()
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
    from policyd.protocols import client

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


@cli.command()
@config_option
@click.argument("account", type=ACCOUNT, required=False)
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
        say("no account has sent to external recipients in the window")
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
        say("no account is blocked")
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
@click.argument("account", type=ACCOUNT)
@click.option("--reason", type=TEXT, required=True, help="Why (kept in the block and the audit log).")
@click.option("--for", "duration", type=TEXT, help="How long (default and maximum: outbound.block_for).")
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
        say(f"{made.account} blocked until {when(made.until)}")


@cli.command()
@config_option
@click.argument("account", type=ACCOUNT)
@click.option("--reason", type=TEXT, required=True, help="Why (kept in the audit log).")
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
        say(f"{lifted.account} unblocked (was blocked since {when(lifted.since)}: {lifted.reason})")


@cli.command()
@config_option
@click.option("--limit", type=POSITIVE, default=100, show_default=True, help="How many entries.")
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
@click.argument("account", type=ACCOUNT)
@click.option("--limit", type=POSITIVE, required=True, help="Hourly limit wanted inside the window.")
@click.option("--from", "start", type=TEXT, required=True, metavar="WHEN", help="Start: ISO 8601, now, or +DURATION.")
@click.option("--until", "end", type=TEXT, required=True, metavar="WHEN", help="End: ISO 8601, now, or +DURATION.")
@click.option("--reason", type=TEXT, required=True, help="The business reason.")
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
        say(
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
        say(f"exemption #{decided.id} for {decided.account} {decided.status}")


@exemption.command("approve")
@config_option
@click.argument("exemption_id", metavar="ID", type=POSITIVE)
@click.option("--reason", type=TEXT, default="", help="A note for the audit log.")
@by_option
@json_option
def exemption_approve(exemption_id: int, reason: str, by: str | None, as_json: bool) -> None:
    """Approve request ID: its limit applies inside its window only, once."""
    _decide("approve", exemption_id, reason, by, as_json)


@exemption.command("deny")
@config_option
@click.argument("exemption_id", metavar="ID", type=POSITIVE)
@click.option("--reason", type=TEXT, required=True, help="Why (told in the audit log).")
@by_option
@json_option
def exemption_deny(exemption_id: int, reason: str, by: str | None, as_json: bool) -> None:
    """Deny request ID."""
    _decide("deny", exemption_id, reason, by, as_json)


@exemption.command("revoke")
@config_option
@click.argument("exemption_id", metavar="ID", type=POSITIVE)
@click.option("--reason", type=TEXT, required=True, help="Why (told in the audit log).")
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
        say("no exemption")
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
@click.argument("address", type=TEXT)
@click.option("--helo", type=TEXT, help="The HELO name the client gave (for the HELO heuristics).")
@json_option
def score_ip(address: str, helo: str | None, as_json: bool) -> None:
    """Explain the network reputation of client ADDRESS: each list and heuristic, total, decision.

    Asks the configured DNS zones through dns.nameservers, reads the
    network lists and looks up the reverse DNS, as the server does.
    """
    from policyd.checks.reputation import Assessment, NetworkReputation
    from policyd.netlists import NetworkSet, parse_address

    parsed = parse_address(address)
    if parsed is None:
        raise UsageError(f"{address!r} is not an IP address")
    config = load_config()
    if parsed in NetworkSet(config.trusted_networks):
        message = f"{parsed} is in trusted_networks: its mail is outbound and not scored"
        if as_json:
            print_json({"address": str(parsed), "trusted": True, "score": 0, "decision": "DUNNO"})
        else:
            say(message)
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


# --- content scoring: milter, train, score, quarantine, prefs -------------------------


@cli.command()
@config_option
def milter() -> None:
    """Run the content-scoring milter in the foreground (Postfix smtpd_milters)."""
    from policyd.content.scoring import run

    run(chosen_config())


def _mail_paths(paths: Sequence[str], option: str) -> list[Any]:
    from pathlib import Path

    found = []
    for path in paths:
        candidate = Path(path)
        if not candidate.exists():
            raise UsageError(f"{option} {path}: no such file or directory")
        found.append(candidate)
    return found


@cli.command()
@config_option
@click.option("--ham", "ham", multiple=True, required=True, metavar="PATH",
              help="Good mail: a Maildir, a directory of message files, or an mbox (repeatable).")
@click.option("--spam", "spam", multiple=True, required=True, metavar="PATH",
              help="Spam: a Maildir, a directory of message files, or an mbox (repeatable).")
@click.option("--passes", type=WholeNumber(1, 50), default=None, help="Passes over the mail (default 6).")
@json_option
def train(ham: tuple[str, ...], spam: tuple[str, ...], passes: int | None, as_json: bool) -> None:
    """Train the content classifier and replace the model the milter and score use."""
    import time

    from policyd.content import classifier
    from policyd.content import features as content
    from policyd.content.scoring import model_path

    config = load_config()
    sources = [(p, False) for p in _mail_paths(ham, "--ham")] + [(p, True) for p in _mail_paths(spam, "--spam")]
    max_bytes = config.content.max_body
    unreadable: list[str] = []

    def examples() -> Any:
        for path, is_spam in sources:
            try:
                for _where, raw in content.read_mail(path):
                    yield content.extract(raw, max_bytes), is_spam
            except OSError as error:
                unreadable.append(f"{path}: {error.strerror or error}")

    started = time.monotonic()
    try:
        model = classifier.train(examples(), passes=passes or classifier.PASSES)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if unreadable:
        raise PolicydError("cannot read " + "; ".join(unreadable))
    target = model_path(config)
    model.info["sources"] = [str(p) for p, _ in sources]
    try:
        model.save(target)
    except OSError as error:
        raise PolicydError(f"cannot write the model {target}: {error.strerror or error}") from None
    seconds = time.monotonic() - started
    if as_json:
        print_json({"model": str(target), "ham": model.info["ham"], "spam": model.info["spam"],
                    "seconds": round(seconds, 1)})
    else:
        say(
            f"trained on {model.info['ham']} ham and {model.info['spam']} spam in {seconds:.1f}s; "
            f"model written to {target}"
        )


def _messages_to_score(paths: Sequence[str]) -> Any:
    """(shown path, file) for every message named: a file is one message; a directory holds many."""
    import os
    from pathlib import Path

    from policyd.content import features as content

    for given in paths:
        path = Path(given)
        if path.is_dir():
            for file in content.message_files(path):
                yield os.path.join(given, os.path.relpath(file, path)), file
        else:
            yield given, path


@cli.command()
@config_option
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--top", type=WholeNumber(0), default=8, show_default=True, help="How many reasons to give.")
@json_option
def score(paths: tuple[str, ...], top: int, as_json: bool) -> None:
    """Score messages (files, Maildirs, directories of files) and explain each score.

    With --json, one line per message: {"path", "score", "spam", "content",
    "network", "reasons"}.  spam is score >= content.tag_at.
    """
    from policyd.content import features as content
    from policyd.content.scoring import ContentScorer, header_secret, load_model

    config = load_config()
    model, source = load_model(config)
    scorer = ContentScorer(model, header_secret(config, create=False), config.content.max_body)
    tag_at = config.content.tag_at
    failed = 0
    for shown, file in _messages_to_score(paths):
        try:
            raw = content.strip_from_line(file.read_bytes())
        except OSError as error:
            say(f"policyd: error: {shown}: {error.strerror or error}", err=True)
            failed += 1
            continue
        result = scorer.score(raw, explain=top)
        spam = result.points >= tag_at
        if as_json:
            print_json(
                {
                    "path": shown,
                    "score": result.points,
                    "spam": spam,
                    "content": result.content,
                    "network": result.network,
                    "reasons": [r.as_dict() for r in result.reasons],
                }
            )
            continue
        verdict = "SPAM" if spam else "not spam"
        say(
            f"{shown}: score {result.points:.2f} -> {verdict} (tag_at {tag_at:g}; "
            f"content {result.content:.2f}, network {result.network:g})"
        )
        if result.subject:
            say(f"  subject: {result.subject[:100]}")
        if result.network:
            say(f"  network: +{result.network:g} from X-Policyd-Network ({result.network_reasons})")
        for reason in result.reasons:
            say(f"  {reason.points:+7.2f}  {reason.feature[:80]}")
    if not as_json:
        say(f"(model {source})", err=True)
    if failed:
        sys.exit(1)


def with_quarantine(work: Callable[[Any], Coroutine[Any, Any, T]], secret: bool = False) -> T:
    """Open the store, run ``work(quarantine)``, close the store."""
    from policyd.content.scoring import header_secret
    from policyd.quarantine.held import Quarantine
    from policyd.store import open_store

    config = load_config()
    key = header_secret(config, create=True) if secret else None

    async def main(reactor: Any) -> T:
        store = open_store(config.store.url, float(config.store.deadline))
        try:
            return await work(Quarantine(config, store, reactor, key))
        finally:
            await store.close()

    return run_async(main)


@cli.group("quarantine")
def quarantine_group() -> None:
    """Held spam: list, show, release, delete."""


@quarantine_group.command("list")
@config_option
@click.option("--recipient", type=TEXT, help="Only the mail held for this address.")
@click.option("--limit", type=POSITIVE, default=1000, show_default=True, help="How many entries.")
@json_option
def quarantine_list(recipient: str | None, limit: int, as_json: bool) -> None:
    """List held messages, newest first."""
    from policyd.quarantine.held import Quarantine
    from policyd.store import Quarantined

    async def work(quarantine: Quarantine) -> list[Quarantined]:
        return await quarantine.entries(recipient, limit)

    entries = with_quarantine(work)
    if as_json:
        for entry in entries:
            print_json(entry.as_dict())
        return
    if not entries:
        say("the quarantine is empty")
        return
    print_table(
        ["ID", "HELD", "EXPIRES", "RECIPIENT", "SENDER", "SCORE", "SUBJECT"],
        [
            (e.id, when(e.at), when(e.until), e.recipient, e.sender or "<>", f"{e.score:.1f}", e.subject[:60])
            for e in entries
        ],
    )


@quarantine_group.command("show")
@config_option
@click.argument("entry_id", metavar="ID", type=POSITIVE)
@click.option("--raw", is_flag=True, help="Print the whole message as it would be delivered.")
@json_option
def quarantine_show(entry_id: int, raw: bool, as_json: bool) -> None:
    """Show held message ID: its details, headers and the start of its text."""
    from policyd.content import features as content
    from policyd.quarantine.held import Quarantine
    from policyd.store import Quarantined

    async def work(quarantine: Quarantine) -> tuple[Quarantined, bytes]:
        return await quarantine.entry(entry_id)

    entry, message = with_quarantine(work)
    if raw:
        if sys.stdout.isatty():
            # Read on a screen, not saved: the message's own escapes must not act.
            text = message.decode("utf-8", "surrogateescape").replace("\r\n", "\n")
            say(text.removesuffix("\n"), keep=LINES)
            return
        sys.stdout.buffer.write(message)
        sys.stdout.buffer.flush()
        return
    headers, _ = content.split_message(message)
    if as_json:
        print_json(entry.as_dict() | {"headers": [[n, content.decode_header(v)] for n, v in headers]})
        return
    print_table(
        ["FIELD", "VALUE"],
        [
            ("id", entry.id),
            ("recipient", entry.recipient),
            ("sender", entry.sender or "<>"),
            ("client", entry.client or "-"),
            ("queue id", entry.queue_id or "-"),
            ("held", when(entry.at)),
            ("expires", when(entry.until)),
            ("score", f"{entry.score:.2f}"),
            ("reasons", ", ".join(entry.reasons) or "-"),
            ("size", entry.size),
        ],
    )
    say("")
    for name, value in headers:
        say(f"{name}: {content.decode_header(value)[:200]}", keep=LINES)
    text = content.extract(message).text
    say("")
    say(text[:800], keep=LINES)


@quarantine_group.command("release")
@config_option
@click.argument("entry_id", metavar="ID", type=POSITIVE)
@click.option("--reason", type=TEXT, default="", help="A note for the audit log.")
@by_option
@json_option
def quarantine_release(entry_id: int, reason: str, by: str | None, as_json: bool) -> None:
    """Deliver held message ID to its recipient (by SMTP through quarantine.smtp), then forget it."""
    from policyd.quarantine.held import Quarantine
    from policyd.store import Quarantined

    async def work(quarantine: Quarantine) -> Quarantined:
        return await quarantine.release(entry_id, who(by), reason)

    entry = with_quarantine(work, secret=True)
    if as_json:
        print_json({"id": entry.id, "recipient": entry.recipient, "released": True})
    else:
        say(f"quarantine #{entry.id} released to {entry.recipient}")


@quarantine_group.command("delete")
@config_option
@click.argument("entry_id", metavar="ID", type=POSITIVE)
@click.option("--reason", type=TEXT, default="", help="A note for the audit log.")
@by_option
@json_option
def quarantine_delete(entry_id: int, reason: str, by: str | None, as_json: bool) -> None:
    """Forget held message ID without delivering it."""
    from policyd.quarantine.held import Quarantine
    from policyd.store import Quarantined

    async def work(quarantine: Quarantine) -> Quarantined:
        return await quarantine.delete(entry_id, who(by), reason)

    entry = with_quarantine(work)
    if as_json:
        print_json({"id": entry.id, "recipient": entry.recipient, "deleted": True})
    else:
        say(f"quarantine #{entry.id} for {entry.recipient} deleted")


@cli.group()
def prefs() -> None:
    """Each recipient's choice for spam: inbox (tagged) or quarantine."""


@prefs.command("set")
@config_option
@click.argument("address", type=TEXT)
@click.option("--spam", "choice", required=True, type=click.Choice(["inbox", "quarantine", "default"]),
              help="inbox: delivered tagged; quarantine: held; default: quarantine.default.")
@by_option
@json_option
def prefs_set(address: str, choice: str, by: str | None, as_json: bool) -> None:
    """Choose what happens to spam for ADDRESS."""
    from policyd.quarantine.held import Quarantine

    spam = None if choice == "default" else choice

    async def work(quarantine: Quarantine) -> str:
        return await quarantine.set_choice(address, spam, who(by))

    clean = with_quarantine(work)
    if as_json:
        print_json({"address": clean, "spam": choice})
    else:
        say(f"spam for {clean}: {choice}")


@prefs.command("show")
@config_option
@click.argument("addresses", type=TEXT, nargs=-1, metavar="[ADDRESS]...")
@json_option
def prefs_show(addresses: tuple[str, ...], as_json: bool) -> None:
    """Show the spam choice of ADDRESSes (with the default), or every recorded choice."""
    from policyd.quarantine.held import Quarantine

    async def work(quarantine: Quarantine) -> dict[str, str]:
        return await quarantine.choices(list(addresses) if addresses else None)

    choices = with_quarantine(work)
    if as_json:
        for address, choice in choices.items():
            print_json({"address": address, "spam": choice})
        return
    if not choices:
        say(f"no recorded choice (everyone gets quarantine.default: {load_config().quarantine.default})")
        return
    print_table(["ADDRESS", "SPAM"], sorted(choices.items()))


@cli.group("digest")
def digest_group() -> None:
    """The quarantine digest: one mail per recipient with held mail (quarantine.digest_at)."""


@digest_group.command("send-now")
@config_option
@json_option
def digest_send_now(as_json: bool) -> None:
    """Queue the digest now: one mail per recipient with mail held since the last digest.

    The running ``policyd serve`` sends them from the outbox within seconds;
    the next daily digest lists only what is held after this one.
    """
    from policyd.quarantine.digest import DigestJob, DigestRun
    from policyd.store import open_store

    config = load_config()

    async def work(reactor: Any) -> DigestRun:
        store = open_store(config.store.url, float(config.store.deadline))
        try:
            return await DigestJob(config, store, reactor).run()
        finally:
            await store.close()

    done = run_async(work)
    if as_json:
        print_json(done.as_dict())
    elif not done.queued:
        say("another process queued this digest at the same moment: nothing more queued")
    else:
        period = f"held since {when(done.since)}" if done.since is not None else "everything held so far"
        say(
            f"queued {done.recipients} digest(s) listing {done.messages} message(s) ({period}); "
            "policyd serve sends them"
        )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run a command, turning every error into one line and an exit status."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            # A name the locale cannot write is shown escaped, not a crash.
            stream.reconfigure(errors="backslashreplace")
    try:
        result = cli.main(args=argv, prog_name="policyd", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as error:
        error.show()  # a group named alone: its help, as the user asked
        sys.exit(error.exit_code)
    except click.ClickException as error:
        # One line like every other error; it repeats what was typed, escaped like the rest.
        hint = ""
        if isinstance(error, click.UsageError) and error.ctx is not None:
            hint = f" (see {error.ctx.command_path} --help)"
        say(f"policyd: error: {' '.join(error.format_message().split())}{hint}", err=True)
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        say("policyd: aborted", err=True)
        sys.exit(1)
    except PolicydError as error:
        say(f"policyd: error: {error}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:
        say(f"policyd: internal error: {type(error).__name__}: {error}", err=True)
        sys.exit(70)
    sys.exit(result if isinstance(result, int) else 0)
