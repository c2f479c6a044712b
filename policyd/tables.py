"""Postfix lookup tables (``hash:/etc/postfix/virtual``, ``ldap:...``): telling them from files, asking them with ``postmap -q``.

Postfix's own ``postmap -q - TABLE`` reads keys on its input and prints
``key<TAB>value`` for each found, so any table type Postfix reads works,
without a client library per type.  It is a blocking call: run it off the
event loop (:func:`policyd.reactor.in_thread`), bounded by :data:`POSTMAP_TIMEOUT`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

#: Longest one ``postmap -q`` may take: well under Postfix's milter timeouts.
POSTMAP_TIMEOUT = 10.0

#: ``type:name`` as Postfix writes lookup tables.
_TABLE = re.compile(r"^[a-z][a-z0-9_]*:.+")

#: Files Postfix's indexed table types keep beside ``name`` (looked at for changes).
TABLE_SUFFIXES = ("", ".db", ".lmdb", ".cdb", ".dir", ".pag")


class TableError(Exception):
    """``postmap`` is missing, failed or took too long; the message says which."""


def is_table(source: str) -> bool:
    """Whether ``source`` is a ``type:name`` Postfix table rather than a file path."""
    return bool(_TABLE.match(source)) and not source.startswith("/")


def table_files(source: str) -> list[Path]:
    """The files whose change means the table changed (none for LDAP, SQL...)."""
    name = source.split(":", 1)[1]
    while is_table(name):  # proxy:hash:/etc/postfix/virtual
        name = name.split(":", 1)[1]
    return [Path(name + suffix) for suffix in TABLE_SUFFIXES] if name.startswith("/") else []


def source_stamp(source: str) -> tuple[tuple[int, int, int] | None, ...]:
    """What changes when the file or table ``source`` changes: (inode, mtime, size) of each of its files."""
    stamps: list[tuple[int, int, int] | None] = []
    for path in table_files(source) if is_table(source) else [Path(source)]:
        try:
            stat = path.stat()
        except OSError:
            stamps.append(None)
            continue
        stamps.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
    return tuple(stamps)


def postmap_query(source: str, keys: list[str], timeout: float = POSTMAP_TIMEOUT) -> dict[str, str]:
    """The value of each key found in the table ``source`` (keys as given, lower case).

    :raises TableError: when postmap is not installed, fails or exceeds ``timeout``.
    """
    if not keys:
        return {}
    postmap = shutil.which("postmap") or ("/usr/sbin/postmap" if Path("/usr/sbin/postmap").exists() else None)
    if postmap is None:
        raise TableError("postmap is not installed")
    try:
        done = subprocess.run(  # noqa: S603 - fixed program, no shell
            [postmap, "-q", "-", source],
            input="".join(f"{k}\n" for k in keys),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise TableError(f"postmap -q failed: {error}") from None
    # Exit 1 with nothing on stderr: none of the keys is in the table.
    if done.returncode not in (0, 1) or done.stderr.strip():
        raise TableError("postmap -q failed: " + (" ".join(done.stderr.split()) or f"exit status {done.returncode}"))
    answers: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("\t")
        if key.strip():
            answers[key.strip().lower()] = value.strip()
    return answers
