"""A SQLite file with a damaged page: servers refuse to start, and say what to do.

Starting on the fallback limiter alone would not enforce the blocks the
file holds; the one-line error names the file and the way back.  Held mail
is not checked at start (it is most of the file): a damaged message is
found when it is read.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.python.failure import Failure

from policyd.errors import StoreDamaged
from policyd.store import Quarantined
from policyd.store.sqlite import SQLiteStore, recover_command
from policyd.testing import rcpt
from tests.harness.servers import POLICYD, PolicydServer, ask, free_port
from tests.harness.store_contract import HOUR

#: Counted recipients written before the damage: enough for a file of a few hundred pages.
ROWS = 20_000


def state_with_a_block(path: Path) -> float:
    """A database where alice is blocked and 500 accounts sent in the last minute; returns now."""
    now = time.time()
    store = SQLiteStore(str(path))
    db = store.db
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO sends (account, at, instance, client) VALUES (?, ?, '', '192.0.2.1')",
        [(f"user{i % 500}", now - i * 0.002) for i in range(ROWS)],
    )
    db.execute(
        "INSERT INTO blocks VALUES ('alice', ?, ?, 'too many', 3, '[]', 'policyd')", (now - 60, now + HOUR)
    )
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return now


def damage_a_middle_page(path: Path) -> int:
    """Write garbage over one page in the middle of the file; returns its number."""
    with sqlite3.connect(path) as db:
        (size,) = db.execute("PRAGMA page_size").fetchone()
        (count,) = db.execute("PRAGMA page_count").fetchone()
    db.close()
    page = count // 2
    with open(path, "r+b") as file:
        file.seek((page - 1) * size)
        file.write(b"\xa5" * size)
    return int(page)


def config_for(path: Path, port: int, command: str = "serve") -> Path:
    """A configuration whose store is the SQLite file ``path``."""
    config = path.parent / f"{command}.yaml"
    listen = "milter" if command == "milter" else "policy"
    config.write_text(
        f'listen:\n  {listen}: "tcp:{port}:interface=127.0.0.1"\n'
        f'store:\n  url: "sqlite:///{path}"\nlocal_domains: [example.org]\noutbound:\n  limit: 3\n',
        encoding="utf-8",
    )
    return config


@pytest.mark.parametrize("command", ["serve", "milter"])
def test_server_refuses_a_damaged_file_with_one_line(tmp_path: Path, command: str) -> None:
    """policyd serve and milter on a file with a damaged middle page exit 2 with one line, never listening."""
    database = tmp_path / "state.db"
    state_with_a_block(database)
    damage_a_middle_page(database)
    port = free_port()
    started = time.monotonic()
    result = subprocess.run(
        [POLICYD, command, "-c", str(config_for(database, port, command))], capture_output=True, text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.strip()]
    assert line.startswith(f"policyd: error: SQLite store {database} is damaged (")
    assert f"sqlite3 {database} .dump | " in line and "restore it from a backup" in line
    assert "Traceback" not in result.stdout + result.stderr
    assert time.monotonic() - started < 10


def test_the_way_back_the_error_gives_keeps_what_can_be_read(tmp_path: Path) -> None:
    """The command in the error, then its two steps: the server starts again and still enforces alice's block."""
    database = tmp_path / "state.db"
    state_with_a_block(database)
    damage_a_middle_page(database)
    port = free_port()
    config = config_for(database, port)
    refused = subprocess.run([POLICYD, "serve", "-c", str(config)], capture_output=True, text=True, timeout=60)
    command = recover_command(str(database), f"{database}.recovered")
    assert f"keep what can be read: {command}; then delete state.db-wal and state.db-shm and " in refused.stderr
    subprocess.run(["sh", "-c", command], check=True, capture_output=True, timeout=60)
    for journal in ("state.db-wal", "state.db-shm"):
        (tmp_path / journal).unlink(missing_ok=True)
    os.replace(f"{database}.recovered", database)
    server = PolicydServer(config, port).start()
    try:
        assert ask(port, rcpt(sasl_username="alice", recipient="x@gmail.com")).startswith("REJECT")
    finally:
        assert server.stop() == 0, server.output()


def test_damaged_held_mail_leaves_the_server_up_and_is_found_when_read(tmp_path: Path) -> None:
    """A damaged page of held mail (unchecked at start): serve enforces alice's block; showing that message is exit 2."""
    database = tmp_path / "state.db"
    now = state_with_a_block(database)
    store = SQLiteStore(str(database))
    for n in range(40):
        entry = Quarantined(0, "bob@example.org", "x@example.net", f"held {n}", 9.0, now, now + HOUR, 30_000)
        store.quarantine(entry, b"Subject: held\r\n\r\n" + bytes([65 + n % 26]) * 30_000)
    store.close()
    with sqlite3.connect(database) as db:
        (size,) = db.execute("PRAGMA page_size").fetchone()
        (count,) = db.execute("PRAGMA page_count").fetchone()
    db.close()
    with open(database, "r+b") as file:
        file.seek((count - 20) * size)  # among the last messages' pages, far from the other tables
        file.write(b"\xa5" * size)
    port = free_port()
    config = config_for(database, port)
    server = PolicydServer(config, port).start()
    try:
        assert ask(port, rcpt(sasl_username="alice", recipient="x@gmail.com")).startswith("REJECT")
    finally:
        assert server.stop() == 0, server.output()
    unreadable = [n for n in range(1, 41) if run_show_in_memory(database, n, now) is None]
    assert 0 < len(unreadable) < 40
    sound = next(n for n in range(1, 41) if n not in unreadable)
    shown = subprocess.run(
        [POLICYD, "quarantine", "show", str(sound), "--raw", "-c", str(config)], capture_output=True, timeout=60
    )
    assert shown.returncode == 0 and shown.stdout.startswith(b"Subject: held")
    refused = subprocess.run(
        [POLICYD, "quarantine", "show", str(unreadable[0]), "--raw", "-c", str(config)], capture_output=True,
        text=True, timeout=60,
    )
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"policyd: error: SQLite store {database} is damaged (")
    assert len(refused.stderr.splitlines()) == 1


def run_show_in_memory(database: Path, entry_id: int, now: float) -> bytes | None:
    """The held message ``entry_id`` as the store reads it, or None when reading it finds damage."""
    store = SQLiteStore(str(database))
    try:
        found = store.quarantined(entry_id, now=now)
        outcome: list[object] = []
        found.addBoth(outcome.append)
        (result,) = outcome
        if isinstance(result, Failure):
            assert result.check(StoreDamaged), result
            return None
        assert isinstance(result, tuple)
        return bytes(result[1])
    finally:
        store.close()


def test_server_still_starts_on_a_sound_file_and_enforces_its_blocks(tmp_path: Path) -> None:
    """The check at start passes a sound file of the same size: alice's block is enforced at once."""
    database = tmp_path / "state.db"
    state_with_a_block(database)
    port = free_port()
    server = PolicydServer(config_for(database, port), port).start()
    try:
        assert ask(port, rcpt(sasl_username="alice", recipient="x@gmail.com")).startswith("REJECT")
    finally:
        assert server.stop() == 0, server.output()


def test_damage_found_while_serving_is_logged_and_the_fallback_answers(tmp_path: Path) -> None:
    """A page damaged after start: each request still gets an answer, and the log names the file and the way back."""
    database = tmp_path / "state.db"
    state_with_a_block(database)
    port = free_port()
    server = PolicydServer(config_for(database, port), port).start()
    try:
        damage_a_middle_page(database)
        assert ask(port, rcpt(sasl_username="user3", recipient="x@gmail.com")) == "DUNNO"
        assert ask(port, rcpt(sasl_username="user4", recipient="x@gmail.com")) == "DUNNO"
        output = server.output()
        assert f"SQLite store {database} is damaged (" in output and "keep what can be read" in output
        assert "Traceback" not in output
    finally:
        assert server.stop() == 0, server.output()


def test_admin_command_on_a_damaged_file_is_one_line_exit_2(tmp_path: Path) -> None:
    """policyd status reading a damaged page: exit 2 and the same one-line advice."""
    database = tmp_path / "state.db"
    state_with_a_block(database)
    damage_a_middle_page(database)
    result = subprocess.run(
        [POLICYD, "status", "user3", "-c", str(config_for(database, free_port()))],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"policyd: error: SQLite store {database} is damaged (")
    assert len(result.stderr.splitlines()) == 1


@pytest_twisted.ensureDeferred
async def test_store_error_for_damage_is_store_damaged(tmp_path: Path) -> None:
    """An operation that reads a damaged page fails with StoreDamaged, which is also a StoreError."""
    database = tmp_path / "state.db"
    now = state_with_a_block(database)
    store = SQLiteStore(str(database))
    try:
        damage_a_middle_page(database)
        with pytest.raises(StoreDamaged, match="is damaged .* keep what can be read: sqlite3 "):
            await store.usage("user3", now=now, window=HOUR)
    finally:
        await store.close()

