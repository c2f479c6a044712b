"""The files a configuration refers to: each must be there and readable.

A misspelled network list would otherwise be read as an empty one, and its
points silently lost; a misspelled accounts file would refuse every
exemption.  ``policyd config check`` and the start of ``policyd serve`` and
``policyd milter`` therefore stop (exit 2) at the first file that is
missing or unreadable, naming the key and the file:
``policyd.yaml: inbound.networks[0].file: cannot read /etc/policyd/deny.cidr: No such file or directory``.

Files made on first use (secrets, the admin token, the state database) may
be absent, their directories too (they are made, private, with the file);
when present they must be readable.  A Postfix lookup table
``type:name`` is checked through the file Postfix reads for its type
(``hash:/etc/postfix/accounts`` is ``/etc/postfix/accounts.db``); tables
without a file of their own (``static:``, ``inline:``, ``tcp:``...) are not.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from policyd.config.sections import Config
from policyd.errors import ConfigError

#: ``type:name`` as Postfix writes lookup tables.
_TABLE = re.compile(r"^(?P<type>[a-z][a-z0-9_]*):(?P<name>.+)$")

#: The file Postfix reads for each indexed table type: the name plus a suffix.
_INDEXED = {"hash": ".db", "btree": ".db", "cdb": ".cdb", "lmdb": ".lmdb", "dbm": ".pag", "sdbm": ".pag"}

#: Table types read straight from the named file (or whose name is the file of their settings).
_PLAIN = {"texthash", "cidr", "pcre", "regexp", "ldap", "mysql", "pgsql", "sqlite", "memcache", "nis"}

#: Wrappers whose name is itself a table: ``proxy:hash:/etc/postfix/accounts``.
_WRAPPERS = {"proxy"}


def table_file(source: str) -> str | None:
    """The file behind a ``local file`` or ``type:name`` source, or None when it has none.

    >>> table_file("hash:/etc/postfix/accounts")
    '/etc/postfix/accounts.db'
    """
    match = _TABLE.match(source)
    if match is None or source.startswith("/"):
        return source
    kind, name = match["type"], match["name"]
    if kind in _WRAPPERS:
        return table_file(name)
    if kind in _INDEXED:
        return name + _INDEXED[kind]
    if kind in _PLAIN and name.startswith("/"):
        return name
    return None


def referred_files(config: Config) -> Iterator[tuple[str, str, bool]]:
    """Each (key, path, required) of a file the configuration names.

    ``required`` is False for files made on first use: they are checked
    only when they exist.
    """
    for index, network in enumerate(config.inbound.networks):
        yield f"inbound.networks[{index}].file", network.file, True
    if isinstance(config.local_domains, str):
        yield "local_domains", config.local_domains, True
    for key, source in (("accounts", config.accounts), ("quarantine.preferences", config.quarantine.preferences)):
        path = None if source is None else table_file(source)
        if path is not None:
            yield key, path, True
    if config.forwarding.aliases is not None:
        path = table_file(config.forwarding.aliases)
        if path is not None:
            yield "forwarding.aliases", path, True
    if config.forwarding.arc is not None:
        yield "forwarding.arc.key", config.forwarding.arc.key, True
    if config.content.model is not None:
        yield "content.model", config.content.model, True
    for key, secret in (
        ("inbound.header_secret", config.inbound.header_secret),
        ("quarantine.link_secret", config.quarantine.link_secret),
        ("http.token_file", config.http.token_file),
    ):
        if secret is not None:
            yield key, secret, False


def check_files(config: Config) -> None:
    """Refuse a configuration naming a file that is missing or unreadable.

    :raises ConfigError: naming the configuration file, the key and the file.
    """
    for key, path, required in referred_files(config):
        problem = _unreadable(Path(path), required)
        if problem is not None:
            raise ConfigError(f"{config.source}: {key}: cannot read {path}: {problem}")
    if config.templates is not None:
        folder = Path(config.templates)
        if not folder.is_dir():
            problem = "No such directory" if not folder.exists() else "Not a directory"
            raise ConfigError(f"{config.source}: templates: cannot read {folder}: {problem}")
        if not os.access(folder, os.R_OK | os.X_OK):
            raise ConfigError(f"{config.source}: templates: cannot read {folder}: Permission denied")


def _unreadable(path: Path, required: bool) -> str | None:
    """Why ``path`` cannot be read, or None when it can (or may be made later)."""
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except FileNotFoundError:
        return "No such file or directory" if required else None
    except IsADirectoryError:
        return "Is a directory"
    except OSError as error:
        return error.strerror or str(error)
    return None
