"""The ``policyd`` command: servers and admin commands (click).

One module per command group; :mod:`policyd.cli.common` holds the root
group and what every command shares.  Every command takes ``-c/--config``
(before or after its name); errors are one line on stderr and a non-zero
exit, never a traceback; lists print a table, or with ``--json`` one
compact JSON object per line.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence

import click

# The command modules register their commands on the root group when imported.
from policyd.cli import accounts, content, exemptions, forwarding, learning, quarantine, servers  # noqa: F401
from policyd.cli.common import cli, say
from policyd.errors import PolicydError
from policyd.logs import under_journald

__all__ = ["cli", "main"]


def _error_priority() -> str:
    """``<3>`` when standard error goes to journald, so a daemon's start-up error is filed as an error."""
    return "<3>" if under_journald(sys.stderr) else ""


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
        say(f"{_error_priority()}policyd: error: {error}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as error:
        say(f"{_error_priority()}policyd: internal error: {type(error).__name__}: {error}", err=True)
        sys.exit(70)
    sys.exit(result if isinstance(result, int) else 0)
