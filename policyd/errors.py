"""Errors that reach an administrator as one clear line."""


class PolicydError(Exception):
    """A failure to report as one line and a non-zero exit, never a traceback.

    :param message: the line, in English (the command line and the log).
    :param key: the web pages' text for it (a key of their catalogues, filled
        in with ``values``), so a page in another language says it in that
        language; "" when the pages have none.
    """

    #: Process exit status used by the command line.
    exit_code = 1

    def __init__(self, message: str = "", key: str = "", **values: object) -> None:
        super().__init__(message)
        self.key = key
        self.values = values


class ConfigError(PolicydError):
    """The configuration file is missing, malformed or holds an impossible value."""

    exit_code = 2


class StoreError(PolicydError):
    """The state store could not answer (unreachable, locked, corrupt, too slow)."""


class StoreDamaged(StoreError):
    """The state store's file is damaged: an admin must restore or recover it.

    Exit status 2, like a configuration error: trying again will not help.
    """

    exit_code = 2


class UsageError(PolicydError):
    """A command was given an argument that cannot be acted upon."""

    exit_code = 2


class NothingToDo(UsageError):
    """The command was understood but there is nothing to do: an account that
    is not blocked, an exemption already approved.

    Exit status 1, as ``grep`` finding nothing: a script can tell it from a
    mistake in the command (2).  A :class:`UsageError` still, so code that
    answers a usage error (the web pages) answers this one the same way.
    """

    exit_code = 1


class NoSuchObject(NothingToDo):
    """The command names something that does not exist: an unknown exemption or
    quarantine id (exit status 1)."""
