"""Errors that reach an administrator as one clear line."""


class PolicydError(Exception):
    """A failure to report as one line and a non-zero exit, never a traceback."""

    #: Process exit status used by the command line.
    exit_code = 1


class ConfigError(PolicydError):
    """The configuration file is missing, malformed or holds an impossible value."""

    exit_code = 2


class StoreError(PolicydError):
    """The state store could not answer (unreachable, locked, corrupt, too slow)."""


class UsageError(PolicydError):
    """A command was given an argument that cannot be acted upon."""

    exit_code = 2
