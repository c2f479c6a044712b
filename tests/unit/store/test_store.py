"""The store contract on the memory and SQLite back ends, and SQLite specifics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from policyd.errors import ConfigError, StoreDamaged, StoreError
from policyd.store import Block, Charge, Outcome, open_store
from policyd.store.memory import MemoryStore
from policyd.store.sqlite import SQLiteStore
from tests.harness.store_contract import *  # noqa: F403
from tests.harness.store_contract import HOUR, T0, admit


@pytest.fixture(params=["memory", "sqlite", "sqlite-grouped"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[object]:
    """Each embedded back end, empty (SQLite also with commits grouped per reactor turn)."""
    if request.param == "memory":
        yield MemoryStore()
    else:
        grouped = reactor if request.param == "sqlite-grouped" else None
        sqlite = SQLiteStore(str(tmp_path / "state.db"), reactor=grouped)
        yield sqlite
        sqlite.close()


async def a_moment() -> None:
    """Long enough for a server's store to write its counts and look at other processes' writes."""
    from twisted.internet.task import deferLater

    from policyd.store.sqlite.connection import WRITE_EVERY

    await deferLater(reactor, 3 * WRITE_EVERY, lambda: None)


async def written(path: str, account: str = "alice") -> int:
    """An account's recipients in the file, as another process (an admin command) reads them."""
    other = SQLiteStore(path)
    try:
        return int(await other.usage(account, now=T0, window=HOUR))
    finally:
        await other.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_state_survives_reopening(tmp_path: Path) -> None:
    """Counts and blocks are still there after the store is closed and reopened."""
    path = str(tmp_path / "state.db")
    first = SQLiteStore(path)
    for _ in range(4):
        await admit(first)
    await first.close()
    second = SQLiteStore(path)
    assert (await second.block_of("alice", now=T0)).count == 3
    assert await second.usage("alice", now=T0, window=HOUR) == 3
    await second.close()


@pytest_twisted.ensureDeferred
async def test_two_sqlite_connections_never_overshoot(tmp_path: Path) -> None:
    """Two processes' connections on one file share the count and the block."""
    path = str(tmp_path / "state.db")
    one, two = SQLiteStore(path), SQLiteStore(path)
    outcomes = [await admit(s, limit=5) for _ in range(5) for s in (one, two)]
    allowed = [o for o in outcomes if o.outcome is Outcome.ALLOWED]
    assert len(allowed) == 5
    assert (await admit(one, limit=5)).outcome is Outcome.BLOCKED
    await one.close()
    await two.close()


def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    """A corrupt or foreign file is a one-line StoreError (StoreDamaged: exit 2), not a traceback."""
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreDamaged, match=r"SQLite store .* is damaged \(file is not a database\)"):
        SQLiteStore(str(path))


def test_open_store_by_url(tmp_path: Path) -> None:
    """store.url picks the back end; an unknown scheme is a config error."""
    assert isinstance(open_store("memory://"), MemoryStore)
    sqlite = open_store(f"sqlite:///{tmp_path}/s.db")
    assert isinstance(sqlite, SQLiteStore)
    sqlite.close()
    with pytest.raises(ConfigError, match="unknown store"):
        open_store("mysql://x")


@pytest_twisted.ensureDeferred
async def test_sqlite_error_becomes_store_error(tmp_path: Path) -> None:
    """A failing statement surfaces as a StoreError in the Deferred."""
    sqlite = SQLiteStore(str(tmp_path / "s.db"))
    sqlite.db.execute("DROP TABLE sends")
    with pytest.raises(StoreError, match="no such table"):
        await admit(sqlite)
    await sqlite.close()


@pytest_twisted.ensureDeferred
async def test_server_counts_at_once_and_writes_them_together(tmp_path: Path) -> None:
    """A server answers a count at once; the counts of WRITE_EVERY share a commit, then others see them."""
    from twisted.internet.task import deferLater

    from policyd.store.sqlite.connection import WRITE_EVERY

    path = str(tmp_path / "state.db")
    grouped = SQLiteStore(path, reactor=reactor)
    answers = [grouped.admit(Charge("alice", T0, HOUR, 10, 60, "r")) for _ in range(5)]
    assert all(d.called for d in answers)
    assert [(await d).count for d in answers] == [1, 2, 3, 4, 5]
    assert await written(path) == 0  # not written yet
    await deferLater(reactor, WRITE_EVERY * 5, lambda: None)
    assert await written(path) == 5
    assert await grouped.usage("alice", now=T0, window=HOUR) == 5
    await grouped.close()


@pytest_twisted.ensureDeferred
async def test_other_writes_fire_after_their_commit(tmp_path: Path) -> None:
    """A block (and a new block from admit) fires only once committed, with the counts before it."""
    path = str(tmp_path / "state.db")
    grouped = SQLiteStore(path, reactor=reactor)
    for _ in range(2):
        await grouped.admit(Charge("alice", T0, HOUR, 2, 60, "r"))
    blocking = grouped.admit(Charge("alice", T0, HOUR, 2, 60, "r"))
    assert not blocking.called
    assert (await blocking).outcome is Outcome.NEWLY_BLOCKED
    assert await written(path) == 2
    other = SQLiteStore(path)
    assert (await other.block_of("alice", now=T0)) is not None
    await other.close()
    await grouped.close()


@pytest_twisted.ensureDeferred
async def test_counts_that_cannot_be_written_are_kept_and_written_later(tmp_path: Path) -> None:
    """While another process holds the file's write lock, counts stay in memory and go in afterwards."""
    import sqlite3

    from twisted.internet.task import deferLater

    path = str(tmp_path / "state.db")
    grouped = SQLiteStore(path, reactor=reactor, busy_timeout=0.05)
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    for _ in range(3):
        assert (await grouped.admit(Charge("alice", T0, HOUR, 10, 60, "r"))).outcome is Outcome.ALLOWED
    await deferLater(reactor, 0.3, lambda: None)  # a write or two failed meanwhile
    assert (await grouped.admit(Charge("alice", T0, HOUR, 10, 60, "r"))).count == 4
    locker.execute("ROLLBACK")
    locker.close()
    await deferLater(reactor, 0.3, lambda: None)
    assert await written(path) == 4
    await grouped.close()


@pytest_twisted.ensureDeferred
async def test_grouped_failure_fails_the_whole_group(tmp_path: Path) -> None:
    """A failing write rolls back its group: every write in it fails, none is half-counted."""
    path = str(tmp_path / "state.db")
    grouped = SQLiteStore(path, reactor=reactor)
    first = grouped.block(Block("alice", T0, T0 + 60, "by hand", 0, ()))
    grouped.db.execute("DROP TABLE marks")  # inside the open group: the next write fails
    second = grouped.block(Block("bob", T0, T0 + 60, "by hand", 0, ()))
    for pending in (first, second):
        with pytest.raises(StoreError):
            await pending
    await grouped.close()
    again = SQLiteStore(path)
    assert await again.blocks(now=T0) == []
    await again.close()


def test_root_hands_new_files_to_the_state_directory_owner(tmp_path: Path) -> None:
    """An admin command run as root leaves the database owned by the service user."""
    import os

    if os.geteuid() != 0:
        pytest.fail("this test needs root (CI and make test run as root)")
    directory = tmp_path / "state"
    directory.mkdir()
    os.chown(directory, 4242, 4343)
    sqlite = SQLiteStore(str(directory / "state.db"))
    owners = {(p.name, p.stat().st_uid, p.stat().st_gid) for p in directory.iterdir()}
    assert ("state.db", 4242, 4343) in owners
    assert all(uid == 4242 for _, uid, _ in owners)
    sqlite.close()


@pytest_twisted.ensureDeferred
async def test_windows_in_memory_follow_other_writers(tmp_path: Path) -> None:
    """A server's in-memory windows see another process's unblock and counts at once."""
    path = str(tmp_path / "state.db")
    server, admin = SQLiteStore(path, reactor=reactor), SQLiteStore(path)
    for _ in range(4):
        await admit(server)
    assert (await admit(server)).outcome is Outcome.BLOCKED
    await admin.unblock("alice", now=T0)
    await a_moment()
    assert (await admit(server)).count == 1
    await a_moment()  # the server writes its count
    assert (await admit(admin)).count == 2  # the other process counts on top
    await a_moment()
    assert (await admit(server)).count == 3  # ... and the server sees it
    blocked = await admit(server)
    assert blocked.outcome is Outcome.NEWLY_BLOCKED and blocked.count == 3
    await server.close()
    await admin.close()


@pytest_twisted.ensureDeferred
async def test_checkpoints_run_in_a_thread(tmp_path: Path) -> None:
    """A server's store copies the log into the database file by itself, off the reactor thread."""
    from twisted.internet.task import deferLater

    path = tmp_path / "state.db"
    server = SQLiteStore(str(path), reactor=reactor)
    empty = path.stat().st_size
    for n in range(2000):
        await server.admit(Charge(f"user{n}", T0, HOUR, 10, 60, "r"))
    assert (tmp_path / "state.db-wal").stat().st_size > 0
    await deferLater(reactor, 2.5, lambda: None)
    assert path.stat().st_size > empty
    await server.close()


@pytest_twisted.ensureDeferred
async def test_an_idle_server_does_not_checkpoint_again(tmp_path: Path) -> None:
    """Once the log is copied, checkpoints wait for the next write (of this process or another)."""
    from twisted.internet.task import deferLater

    path = str(tmp_path / "state.db")
    server = SQLiteStore(path, reactor=reactor)
    await server.admit(Charge("alice", T0, HOUR, 10, 60, "r"))
    await deferLater(reactor, 2.5, lambda: None)
    settled = server.checkpoints
    assert settled >= 1
    await deferLater(reactor, 2.5, lambda: None)
    assert server.checkpoints == settled  # nothing written: no thread woken
    other = SQLiteStore(path)
    await other.admit(Charge("bob", T0, HOUR, 10, 60, "r"))
    await other.close()
    await deferLater(reactor, 2.5, lambda: None)
    assert server.checkpoints > settled
    await server.close()


@pytest_twisted.ensureDeferred
async def test_windows_in_memory_follow_another_process_changes(tmp_path: Path) -> None:
    """Another process's give-back, manual block and new block reach a server's copy in memory."""
    path = str(tmp_path / "state.db")
    server, other = SQLiteStore(path, reactor=reactor), SQLiteStore(path)
    await admit(server, limit=10, instance="s1")
    await a_moment()
    await admit(other, limit=10, instance="o1")
    await admit(other, limit=10, instance="o1")
    await a_moment()
    assert (await admit(server, limit=10, instance="s2")).count == 4
    await a_moment()
    assert await other.give_back("alice", "o1") == 2
    await a_moment()
    assert (await admit(server, limit=10, instance="s3")).count == 3
    await other.block(Block("alice", T0, T0 + 60, "by hand", 0, ()))
    await a_moment()
    assert (await admit(server, limit=10)).outcome is Outcome.BLOCKED
    for _ in range(3):
        await admit(other, "bob", limit=3)
    assert (await admit(other, "bob", limit=3)).outcome is Outcome.NEWLY_BLOCKED
    await a_moment()
    assert (await admit(server, "bob", limit=3)).outcome is Outcome.BLOCKED
    await server.close()
    await other.close()


@pytest_twisted.ensureDeferred
async def test_window_in_memory_reloads_for_an_earlier_or_longer_window(tmp_path: Path) -> None:
    """A request whose window starts before what memory covers reads the file again."""
    server = SQLiteStore(str(tmp_path / "state.db"), reactor=reactor)
    await admit(server, now=T0)
    await admit(server, now=T0 + 2 * HOUR)  # the first recipient has left memory
    assert (await admit(server, now=T0 + 30)).count == 3  # the clock went back: T0 counts again
    longer = await server.admit(Charge("alice", T0 + 2 * HOUR, 3 * HOUR, 10, 60, "r"))
    assert longer.count == 4
    await server.close()


def test_old_account_index_is_dropped(tmp_path: Path) -> None:
    """A file made by an older version loses the per-account index, which slowed every insert."""
    import sqlite3

    path = str(tmp_path / "state.db")
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE sends (account TEXT NOT NULL, at REAL NOT NULL, instance TEXT NOT NULL DEFAULT '', "
                "client TEXT NOT NULL DEFAULT '')")
    old.execute("CREATE INDEX sends_by_account ON sends (account, at)")
    old.commit()
    old.close()
    store = SQLiteStore(path)
    indexes = {name for (name,) in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "sends_by_account" not in indexes and "sends_by_time" in indexes
    store.close()


@pytest_twisted.ensureDeferred
async def test_block_lists_the_most_recent_clients(tmp_path: Path) -> None:
    """A new block names the clients that sent in the window, most recent first, at most MAX_BLOCK_CLIENTS."""
    from policyd.store import MAX_BLOCK_CLIENTS

    server = SQLiteStore(str(tmp_path / "state.db"), reactor=reactor)
    total = MAX_BLOCK_CLIENTS + 5
    for n in range(total - 1):
        await admit(server, now=T0 + n, limit=total, client=f"192.0.2.{n}")
    await admit(server, now=T0 + total, limit=total, client="")
    blocked = await admit(server, now=T0 + total, limit=total)
    assert blocked.outcome is Outcome.NEWLY_BLOCKED
    assert blocked.block.clients == tuple(f"192.0.2.{n}" for n in range(total - 2, total - 2 - MAX_BLOCK_CLIENTS, -1))
    await server.close()


@pytest_twisted.ensureDeferred
async def test_prune_works_in_batches_until_nothing_old_is_left(tmp_path: Path) -> None:
    """More old rows than one batch are all pruned, a batch per reactor turn; the window stays."""
    from policyd.store.sqlite.connection import PRUNE_BATCH

    server = SQLiteStore(str(tmp_path / "state.db"), reactor=reactor)
    old = 2 * PRUNE_BATCH + 7
    server.db.executemany(
        "INSERT INTO sends (account, at, instance, client) VALUES (?, ?, '', '')",
        [(f"user{n % 10}", T0 - HOUR - n, ) for n in range(old)],
    )
    await admit(server, now=T0, limit=10)
    assert await server.prune(now=T0, window=HOUR) == old
    (left,) = server.db.execute("SELECT COUNT(*) FROM sends").fetchone()
    assert left == 1
    assert (await admit(server, now=T0, limit=10)).count == 2
    await server.close()


@pytest_twisted.ensureDeferred
async def test_closing_writes_the_counts_held_in_memory(tmp_path: Path) -> None:
    """A server's store that is closed (a stop) writes the counts it was holding."""
    path = str(tmp_path / "state.db")
    grouped = SQLiteStore(path, reactor=reactor)
    for _ in range(3):
        await grouped.admit(Charge("alice", T0, HOUR, 10, 60, "r"))
    await grouped.close()
    again = SQLiteStore(path)
    assert await again.usage("alice", now=T0, window=HOUR) == 3
    await again.close()


@pytest_twisted.ensureDeferred
async def test_sqlite_quarantine_ids_survive_reopening_and_upgrades(tmp_path: Path) -> None:
    """After a restart a new held message gets a new id, even when the newest was deleted; a store made
    before the id sequence continues after every id it held or named in its audit log."""
    import sqlite3

    from tests.harness.store_contract import RAW, held

    path = str(tmp_path / "state.db")
    first = SQLiteStore(path)
    one = await first.quarantine(held(), RAW)
    two = await first.quarantine(held(), RAW)
    await first.quarantine_delete(two.id)
    await first.close()
    second = SQLiteStore(path)
    three = await second.quarantine(held(), RAW)
    await second.close()
    assert (one.id, two.id, three.id) == (1, 2, 3)

    # A store of an older version: no sequence; #7 was deleted, #5 is still held.
    db = sqlite3.connect(path)
    with db:
        db.execute("DELETE FROM marks WHERE name = 'quarantine-id'")
        db.execute("DELETE FROM quarantine")
        db.execute("INSERT INTO audit (at, who, action, subject, reason) VALUES "
                   "(1, 'root', 'quarantine-delete', 'quarantine #7 for bob@example.org', 'deleted')")
    db.close()
    upgraded = SQLiteStore(path)
    kept = await upgraded.quarantine(held(), RAW)
    assert kept.id == 8
    await upgraded.close()
