"""State files (the database and its journals, secrets) are private whatever the umask."""

from __future__ import annotations

import signal
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from policyd.statefiles import private_directory, private_file
from policyd.testing import rcpt
from tests.harness.servers import POLICYD, ask, free_port, wait_for_port


def mode(path: Path) -> int:
    """The permission bits of a file or directory."""
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def running(command: str, config: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``policyd COMMAND -c CONFIG`` started under umask 022, as a login shell has it."""
    with open(config.with_suffix(".log"), "wb") as log:
        process = subprocess.Popen(
            [POLICYD, command, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT, umask=0o022
        )
    try:
        wait_for_port(port, 20, process)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0, config.with_suffix(".log").read_text(encoding="utf-8")


def test_server_database_and_journals_are_private(tmp_path: Path) -> None:
    """policyd serve under umask 022: the state directories it makes are 0700, the database, -wal and -shm 0600."""
    port = free_port()
    state = tmp_path / "var" / "lib" / "policyd"
    config = tmp_path / "policyd.yaml"
    config.write_text(
        f'listen:\n  policy: "tcp:{port}:interface=127.0.0.1"\n'
        f'store:\n  url: "sqlite:///{state}/state.db"\nlocal_domains: [example.org]\noutbound:\n  limit: 3\n',
        encoding="utf-8",
    )
    with running("serve", config, port):
        assert ask(port, rcpt(sasl_username="alice", recipient="x@gmail.com")) == "DUNNO"
        files = {name: mode(state / name) for name in ("state.db", "state.db-wal", "state.db-shm")}
        assert files == {"state.db": 0o600, "state.db-wal": 0o600, "state.db-shm": 0o600}
    assert [mode(d) for d in (tmp_path / "var", tmp_path / "var" / "lib", state)] == [0o700] * 3


def test_milter_secret_and_database_are_private(tmp_path: Path) -> None:
    """policyd milter under umask 022 makes the header secret 0600 in a new 0700 directory, and the database 0600."""
    port = free_port()
    secret = tmp_path / "keys" / "policyd" / "header.key"
    config = tmp_path / "policyd.yaml"
    config.write_text(
        f'listen:\n  milter: "tcp:{port}:interface=127.0.0.1"\n'
        f'store:\n  url: "sqlite:///{tmp_path}/state/state.db"\nlocal_domains: [example.org]\n'
        f"inbound:\n  header_secret: {secret}\n",
        encoding="utf-8",
    )
    with running("milter", config, port):
        pass
    assert mode(secret) == 0o600
    assert mode(secret.parent) == mode(secret.parent.parent) == 0o700
    assert mode(tmp_path / "state") == 0o700 and mode(tmp_path / "state" / "state.db") == 0o600


def test_admin_command_takes_others_off_an_old_world_readable_database(tmp_path: Path) -> None:
    """A database an earlier version made 0644 is 0640 after an admin command opened it; a new one is 0600."""
    old = tmp_path / "old" / "state.db"
    old.parent.mkdir()
    sqlite3.connect(old).close()
    old.chmod(0o644)
    for database in (old, tmp_path / "new" / "state.db"):
        config = tmp_path / f"{database.parent.name}.yaml"
        config.write_text(
            f'listen:\n  policy: "tcp:{free_port()}:interface=127.0.0.1"\n'
            f'store:\n  url: "sqlite:///{database}"\nlocal_domains: [example.org]\noutbound:\n  limit: 3\n',
            encoding="utf-8",
        )
        result = subprocess.run([POLICYD, "blocks", "-c", str(config)], capture_output=True, timeout=60, umask=0o022)
        assert result.returncode == 0, result.stderr
    assert mode(old) == 0o640
    assert mode(tmp_path / "new" / "state.db") == 0o600 and mode(tmp_path / "new") == 0o700


def test_existing_files_and_directories_keep_their_mode(tmp_path: Path) -> None:
    """What the admin made (a shared 0750 directory, a 0640 file) is not changed."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o750)
    private_directory(shared / "inner")
    assert mode(shared) == 0o750 and mode(shared / "inner") == 0o700
    kept = shared / "kept"
    kept.write_bytes(b"x")
    kept.chmod(0o640)
    assert private_file(kept) is False and mode(kept) == 0o640 and kept.read_bytes() == b"x"
    assert private_file(shared / "made") is True and mode(shared / "made") == 0o600
