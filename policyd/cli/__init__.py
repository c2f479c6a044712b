"""The ``policyd`` command: servers and admin commands (click).

One module per command group; :mod:`policyd.cli.common` holds the root
group and what every command shares.  Every command takes ``-c/--config``
(before or after its name); errors are one line on stderr and a non-zero
exit, never a traceback; lists print a table, or with ``--json`` one
compact JSON object per line.
"""

from __future__ import annotations

import importlib
import io
import sys
from collections.abc import Sequence
from typing import Any

import click

from policyd.cli import common
from policyd.cli.common import say
from policyd.errors import PolicydError

__all__ = ["cli", "main"]

#: The modules whose commands register on the root group when imported.
COMMAND_MODULES = ("accounts", "content", "exemptions", "forwarding", "learning", "quarantine", "servers")

#: Commands run often by scripts, with the one module that defines them: only it
#: is imported (``policyd score --json`` over thousands of files starts faster).
_ALONE = {"score": "content"}


def load_commands(argv: Sequence[str] = ()) -> click.Group:
    """The root group with the commands that ``argv`` may run (every command unless one of :data:`_ALONE`)."""
    modules: tuple[str, ...] = COMMAND_MODULES
    words = list(argv)
    # The command is the first word that is not the group's own option (-c FILE, --config FILE, --config=FILE).
    position = 0
    while position < len(words) and words[position].startswith(("-c", "--config")):
        position += 2 if words[position] in ("-c", "--config") else 1
    if position < len(words) and words[position] in _ALONE:
        modules = (_ALONE[words[position]],)
    for name in modules:
        importlib.import_module(f"policyd.cli.{name}")
    return common.cli


def __getattr__(name: str) -> Any:
    """``policyd.cli.cli``: the root group with every command."""
    if name == "cli":
        return load_commands()
    raise AttributeError(name)


def _error_priority() -> str:
    """``<3>`` when standard error goes to journald, so a daemon's start-up error is filed as an error."""
    from policyd.logs import under_journald

    return "<3>" if under_journald(sys.stderr) else ""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run a command, turning every error into one line and an exit status."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            # A name the locale cannot write is shown escaped, not a crash.
            stream.reconfigure(errors="backslashreplace")
    arguments = sys.argv[1:] if argv is None else list(argv)
    try:
        result = load_commands(arguments).main(args=arguments, prog_name="policyd", standalone_mode=False)
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
        say(f"{_error_priority()}policyd: error: {error}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:
        say(f"{_error_priority()}policyd: internal error: {type(error).__name__}: {error}", err=True)
        sys.exit(70)
    sys.exit(result if isinstance(result, int) else 0)
