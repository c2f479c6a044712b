"""Small files policyd keeps beside its state: per-install secrets and tokens."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from policyd.config import Config

log = logging.getLogger("policyd.state")

#: Where files go when the store has no directory of its own (Redis, memory).
STATE_DIR = "/var/lib/policyd"
#: Shortest secret accepted from a file (characters); shorter is a mistake.
MIN_SECRET = 32


def state_file(config: Config, name: str, configured: str | None = None) -> Path:
    """Where a state file lives: ``configured`` when set, else beside the
    SQLite database, else in :data:`STATE_DIR`."""
    if configured:
        return Path(configured)
    url = config.store.url
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///") :]).parent / name
    return Path(STATE_DIR) / name


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
        path.parent.mkdir(parents=True, exist_ok=True)
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
