"""Files policyd keeps as its state: private to the service, whatever the umask.

The database holds quarantined mail and the secrets sign links and headers:
every state file is created 0600 and every directory made for them 0700
(SPEC 9), by :func:`private_directory` and :func:`private_file`, which set
the mode themselves rather than trust a umask (022 makes files 0644).  A
file or directory that exists already keeps the mode its admin gave it.
Per-install secrets and tokens are read, or made on first use, by
:func:`load_secret`.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from policyd.config import Config

log = logging.getLogger("policyd.state")

#: Where files go when the store has no directory of its own (Redis, memory).
STATE_DIR = "/var/lib/policyd"
#: Shortest secret accepted from a file (characters); shorter is a mistake.
MIN_SECRET = 32


def private_directory(path: Path) -> None:
    """Make ``path`` and its missing parents, each 0700; existing ones are left as they are.

    :raises OSError: when a directory cannot be made.
    """
    missing = []
    for directory in (path, *path.parents):
        if directory.is_dir():
            break
        missing.append(directory)
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made by another process meanwhile: theirs
        os.chmod(directory, 0o700)  # the umask may have taken bits away


def private_file(path: Path) -> bool:
    """Create ``path`` empty and 0600 unless it exists (then it is left alone).

    :returns: whether it was created now.
    :raises OSError: when it cannot be created.
    """
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    try:
        os.fchmod(descriptor, 0o600)
    finally:
        os.close(descriptor)
    return True


def withhold_from_others(path: Path) -> None:
    """Take the others' permissions off a file its owner opens (earlier versions made them 0644).

    The group's are kept: an admin may have shared the state with a group on
    purpose.  A file of another user, or a missing one, is left alone.
    """
    try:
        found = os.stat(path)
        if found.st_uid == os.geteuid() and found.st_mode & stat.S_IRWXO:
            os.chmod(path, stat.S_IMODE(found.st_mode) & ~stat.S_IRWXO)
            log.info("%s: no longer readable by other users", path)
    except OSError:
        pass  # not ours to change: whoever owns it decides


def state_file(config: Config, name: str, configured: str | None = None) -> Path:
    """Where a state file lives: ``configured`` when set, else beside the
    SQLite database, else in :data:`STATE_DIR`."""
    if configured:
        return Path(configured)
    url = config.store.url
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///") :]).parent / name
    return Path(STATE_DIR) / name


def secret_file(config: Config, name: str, configured: str | None = None) -> Path | None:
    """Where a per-install secret lives (:func:`state_file`); None for a ``memory://``
    store with no file configured: nothing of such a store outlives the process, so
    its secrets are the process's own (:func:`process_secret`) and no file is made."""
    if not configured and config.store.url.startswith("memory://"):
        return None
    return state_file(config, name, configured)


def process_secret() -> bytes:
    """A secret of this process only: what a ``memory://`` store signs with."""
    return secrets.token_hex(32).encode()


def load_secret(path: Path, what: str = "secret") -> bytes:
    """Read a secret, creating it on first use (random, mode 0600).

    Creation is atomic (a hard link of a complete temporary file), so two
    processes starting together agree on one secret.

    :raises OSError: when the file cannot be read or created.
    :raises ValueError: when the file holds too short a secret.
    """
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        private_directory(path.parent)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                file.write(secrets.token_hex(32) + "\n")
                file.flush()
                os.fsync(file.fileno())
            try:
                os.link(temporary, path)
                log.info("created the %s %s", what, path)
            except FileExistsError:
                pass  # another process made it first: use theirs
        finally:
            temporary.unlink(missing_ok=True)
        text = path.read_text(encoding="utf-8").strip()
    if len(text) < MIN_SECRET:
        raise ValueError(f"{path}: the {what} must be at least {MIN_SECRET} characters")
    return text.encode()
