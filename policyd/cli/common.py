"""What every command shares: the root group, argument types, options, the admin and store plumbing, output.

Every command takes ``-c/--config`` (before or after its name); errors are
one line on stderr and a non-zero exit, never a traceback; lists print a
table, or with ``--json`` one compact JSON object per line.  Text that came
from outside is shown with control characters escaped (:func:`policyd.texts.printable`).
"""

from __future__ import annotations

import getpass
import json
import re
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import click

from policyd import __version__
from policyd import config as configuration
from policyd.errors import UsageError
from policyd.texts import printable
from policyd.times import WHEN_HELP, show_time, with_iso

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
    # Imported here: a command that needs no store (policyd score) starts without them.
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
    """A time for tables and lines: ISO 8601 in the server's zone, with its offset
    (:func:`policyd.times.show_time`), which ``--from``/``--since`` read back as it is."""
    return show_time(timestamp)


def moment_option(name: str, what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add an option ``--NAME WHEN`` (:data:`policyd.times.WHEN_HELP`)."""
    return click.option(f"--{name}", f"{name}_text", type=TEXT, metavar="WHEN", help=f"{what}: {WHEN_HELP}.")


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
    """One compact JSON object on one line; each time field (epoch seconds) gets an
    ISO 8601 twin named ``FIELD_iso`` (:func:`policyd.times.with_iso`)."""
    click.echo(json_line(with_iso(item)))


def show(as_json: bool, data: Any, text: str) -> None:
    """One result: its JSON object with ``--json``, else a line for people."""
    if as_json:
        print_json(data)
    else:
        say(text)


def show_list(
    as_json: bool,
    items: Sequence[T],
    as_dict: Callable[[T], Any],
    headers: Sequence[str],
    row: Callable[[T], Sequence[Any]],
    empty: str | None = None,
) -> None:
    """A list: one JSON object per item with ``--json``, else a table (or ``empty`` when there is none)."""
    if as_json:
        for item in items:
            print_json(as_dict(item))
    elif not items and empty is not None:
        say(empty)
    else:
        print_table(headers, [row(item) for item in items])


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Aligned columns, headers first; a cell's controls (a newline too) are escaped."""
    text = [[printable(str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]
    for row in [list(headers), *text]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="policyd")
@config_option
def cli() -> None:
    """Mail policy service for Postfix: outbound quota, blocks and spam scoring.

    Times are shown, and read when they name no zone, in the server's time
    zone (shown with its offset); --json adds FIELD_iso in UTC beside each
    time in seconds.  Exit status: 0 done, 1 nothing to do or no such
    object, 2 usage or configuration error.
    """
