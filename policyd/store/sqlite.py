"""The embedded store: one SQLite file in WAL mode, for a single mail host.

Statements run on the reactor thread: each is an indexed look-up or a
single-row write, a few microseconds, less than handing work to a thread
pool and back (see the README's figures).  What costs is the commit (the
write of the log pages), so a server groups them: every write made during
one turn of the reactor shares one transaction, committed on the next turn,
and only then do their Deferreds fire, so no reply goes out before its count
is in the log.  WAL with ``synchronous=NORMAL`` makes a commit a write
without an fsync; a server moves the checkpoints, which do sync, to a
thread, so no reply waits for the disk.

Each account's window is also kept in memory while this connection is the
only writer: ``PRAGMA data_version``, read once per transaction under the
write lock, tells when another process (an admin command, another server)
has written, and the copy is then dropped and read again.  A decision is
then one INSERT, whatever the account's count.  ``BEGIN IMMEDIATE`` takes the write lock before reading,
so several processes on one file (the server and an admin command, or two
servers) never count past the limit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from policyd.errors import StoreError
from policyd.store import (
    MAX_BLOCK_CLIENTS,
    Admission,
    AuditEntry,
    Block,
    Charge,
    Exemption,
    Notice,
    Outcome,
    Quarantined,
)

T = TypeVar("T")

log = logging.getLogger("policyd.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sends (
    account  TEXT NOT NULL,
    at       REAL NOT NULL,
    instance TEXT NOT NULL DEFAULT '',
    client   TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS sends_by_account ON sends (account, at);
CREATE INDEX IF NOT EXISTS sends_by_time ON sends (at);
CREATE TABLE IF NOT EXISTS blocks (
    account TEXT PRIMARY KEY,
    since   REAL NOT NULL,
    until   REAL NOT NULL,
    reason  TEXT NOT NULL,
    count   INTEGER NOT NULL,
    clients TEXT NOT NULL,
    by      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id         INTEGER PRIMARY KEY,
    kind       TEXT NOT NULL,
    recipient  TEXT NOT NULL,
    payload    TEXT NOT NULL,
    created    REAL NOT NULL,
    due        REAL NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    sent       REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (due) WHERE sent IS NULL;
CREATE TABLE IF NOT EXISTS exemptions (
    id           INTEGER PRIMARY KEY,
    account      TEXT NOT NULL,
    "limit"      INTEGER NOT NULL,
    start        REAL NOT NULL,
    "end"        REAL NOT NULL,
    reason       TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    requested_at REAL NOT NULL,
    status       TEXT NOT NULL,
    decided_by   TEXT NOT NULL,
    decided_at   REAL NOT NULL,
    decision     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS accounts (
    account   TEXT PRIMARY KEY,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    id        INTEGER PRIMARY KEY,
    recipient TEXT NOT NULL,
    sender    TEXT NOT NULL,
    subject   TEXT NOT NULL,
    score     REAL NOT NULL,
    at        REAL NOT NULL,
    until     REAL NOT NULL,
    size      INTEGER NOT NULL,
    client    TEXT NOT NULL,
    queue_id  TEXT NOT NULL,
    reasons   TEXT NOT NULL,
    message   BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS quarantine_by_recipient ON quarantine (recipient, at);
CREATE INDEX IF NOT EXISTS quarantine_by_expiry ON quarantine (until);
CREATE INDEX IF NOT EXISTS quarantine_by_time ON quarantine (at);
CREATE TABLE IF NOT EXISTS release_claims (
    id    INTEGER PRIMARY KEY,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS marks (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS preferences (
    address TEXT PRIMARY KEY,
    spam    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id      INTEGER PRIMARY KEY,
    at      REAL NOT NULL,
    who     TEXT NOT NULL,
    action  TEXT NOT NULL,
    subject TEXT NOT NULL,
    reason  TEXT NOT NULL
);
"""


def _held(row: Sequence[Any]) -> Quarantined:
    """A quarantine entry from its row (the columns of the table, in order, without the message)."""
    entry_id, recipient, sender, subject, score, at, until, size, client, queue_id, reasons = row
    return Quarantined(
        entry_id, recipient, sender, subject, score, at, until, size, client, queue_id, tuple(json.loads(reasons))
    )


def _block(row: tuple[str, float, float, str, int, str, str]) -> Block:
    account, since, until, reason, count, clients, by = row
    return Block(account, since, until, reason, count, tuple(json.loads(clients)), by)


class _Window:
    """An account's counted recipients (times, oldest first) and live block, in memory."""

    __slots__ = ("block", "sends", "window")

    def __init__(self, sends: deque[float], block: Block | None, window: float) -> None:
        self.sends = sends
        self.block = block
        self.window = window


#: Accounts whose window is kept in memory; beyond it the copy starts afresh.
CACHE_ACCOUNTS = 100_000
#: Seconds between two checkpoints of the log, in a thread (server only).
CHECKPOINT_EVERY = 1.0


class SQLiteStore:
    """State in one SQLite file.

    :param path: the database file; its directory is created when missing.
    :param busy_timeout: longest wait, in seconds, for another process's
        write lock; short, because the reactor waits with it.
    :param reactor: when given, writes of one reactor turn share one commit
        (a server); without it each write commits at once (admin commands).
    :raises StoreError: when the file cannot be opened or is not a database.
    """

    #: Answers at once (memory), within a turn or the busy timeout (SQLite),
    #: or within ``deadline`` (Redis): see :attr:`policyd.store.Store.bounded`.
    bounded = True

    def __init__(self, path: str, busy_timeout: float = 0.25, reactor: IReactorTime | None = None) -> None:
        self.path = path
        self.reactor = reactor
        #: Writes of the open group transaction, waiting for its commit.
        self._group: list[tuple[Deferred[Any], Any]] = []
        #: Accounts' windows in memory, valid while ``_version`` holds.
        self._windows: dict[str, _Window] = {}
        self._version = -1
        self._checkpointing = False
        self._checkpointer: LoopingCall | None = None
        try:
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            self.db.executescript(_SCHEMA)
            self._give_files_to_directory_owner()
            if reactor is not None and IReactorThreads.providedBy(reactor) and path != ":memory:":
                # Checkpoints sync the disk: do them in a thread, not in a commit.
                self.db.execute("PRAGMA wal_autocheckpoint = 0")
                self._checkpointer = LoopingCall(self._checkpoint)
                self._checkpointer.clock = reactor
                self._checkpointer.start(CHECKPOINT_EVERY, now=False)
        except (sqlite3.Error, OSError) as error:
            raise StoreError(f"cannot open SQLite store {path}: {error}") from None

    def _checkpoint(self) -> None:
        """Copy the log into the database from a thread (PASSIVE: never blocks writers)."""
        if self._checkpointing:
            return
        self._checkpointing = True
        path = self.path

        def work() -> None:
            connection = sqlite3.connect(path, timeout=1.0)
            try:
                connection.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                connection.close()

        def failed(failure: Failure) -> None:
            log.warning("SQLite checkpoint of %s failed: %s", path, failure.getErrorMessage())

        def done(_: object) -> None:
            self._checkpointing = False

        reactor: Any = self.reactor
        deferToThreadPool(reactor, reactor.getThreadPool(), work).addErrback(failed).addBoth(done)

    def _give_files_to_directory_owner(self) -> None:
        """When root (an admin command) creates the files, hand them to the service user.

        Otherwise a root-owned database, ``-wal`` or ``-shm`` file would lock
        the server, which runs as its own user, out of its state.
        """
        if self.path == ":memory:" or os.geteuid() != 0:
            return
        directory = os.stat(Path(self.path).parent)
        if directory.st_uid == 0:
            return
        for suffix in ("", "-wal", "-shm"):
            name = self.path + suffix
            if os.path.exists(name) and os.stat(name).st_uid == 0:
                os.chown(name, directory.st_uid, directory.st_gid)

    def _run(self, work: Callable[[sqlite3.Connection], T], write: bool = False) -> Deferred[T]:
        """Run ``work`` in a transaction and wrap its result in a Deferred."""
        if write and self.reactor is not None:
            return self._grouped(work)
        db = self.db
        try:
            if write:
                self._begin(db)
            try:
                result = work(db)
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                    self._windows.clear()
                raise
            if db.in_transaction:
                db.execute("COMMIT")
        except sqlite3.Error as error:
            return fail(StoreError(f"SQLite store {self.path}: {error}"))
        return succeed(result)

    def _grouped(self, work: Callable[[sqlite3.Connection], T]) -> Deferred[T]:
        """Run a write in the group transaction; fire when it is committed."""
        assert self.reactor is not None
        db = self.db
        try:
            if not db.in_transaction:
                self._begin(db)
                self.reactor.callLater(0, self._commit)
            result = work(db)
        except sqlite3.Error as error:
            # The whole group is rolled back: every write in it fails alike,
            # so the caller's fallback applies and nothing is half-counted.
            self._fail_group(error)
            return fail(StoreError(f"SQLite store {self.path}: {error}"))
        waiting: Deferred[T] = Deferred()
        self._group.append((waiting, result))
        return waiting

    def _begin(self, db: sqlite3.Connection) -> None:
        """Take the write lock; forget the windows in memory if another connection wrote."""
        db.execute("BEGIN IMMEDIATE")
        (version,) = db.execute("PRAGMA data_version").fetchone()
        if version != self._version:
            self._version = version
            self._windows.clear()

    def _commit(self) -> None:
        group, self._group = self._group, []
        try:
            if self.db.in_transaction:
                self.db.execute("COMMIT")
        except sqlite3.Error as error:
            self._group = group
            self._fail_group(error)
            return
        for waiting, result in group:
            waiting.callback(result)

    def _fail_group(self, error: sqlite3.Error) -> None:
        group, self._group = self._group, []
        self._windows.clear()  # they may hold what the rollback undid
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        for waiting, _ in group:
            waiting.errback(StoreError(f"SQLite store {self.path}: {error}"))

    def admit(self, charge: Charge) -> Deferred[Admission]:
        """See :meth:`policyd.store.Store.admit`."""
        account, now, window, limit = charge.account, charge.now, charge.window, charge.limit
        block_for, reason, instance, client, notify = (
            charge.block_for, charge.reason, charge.instance, charge.client, charge.notify
        )

        def work(db: sqlite3.Connection) -> Admission:
            state = self._windows.get(account)
            if state is None or state.window < window:
                state = self._load(db, account, now, window)
            block = state.block
            if block is not None:
                if block.until > now:
                    return Admission(Outcome.BLOCKED, block.count, block)
                db.execute("DELETE FROM blocks WHERE account = ?", (account,))
                state.block = None
            start = now - window
            sends = state.sends
            while sends and sends[0] <= start:
                sends.popleft()
            count = len(sends)
            if count < limit:
                db.execute(
                    "INSERT INTO sends (account, at, instance, client) VALUES (?, ?, ?, ?)",
                    (account, now, instance, client),
                )
                sends.append(now)
                return Admission(Outcome.ALLOWED, count + 1)
            clients = tuple(
                c
                for (c,) in db.execute(
                    "SELECT client FROM sends WHERE account = ? AND at > ? AND client != '' "
                    "GROUP BY client ORDER BY MAX(at) DESC LIMIT ?",
                    (account, start, MAX_BLOCK_CLIENTS),
                )
            )
            block = Block(account, now, now + block_for, reason, count, clients)
            self._put_block(db, block)
            state.block = block
            payload = json.dumps(block.as_dict())
            db.executemany(
                "INSERT INTO outbox (kind, recipient, payload, created, due) VALUES ('block', ?, ?, ?, ?)",
                [(recipient, payload, now, now) for recipient in notify],
            )
            return Admission(Outcome.NEWLY_BLOCKED, count, block)

        return self._run(work, write=True)

    def _load(self, db: sqlite3.Connection, account: str, now: float, window: float) -> _Window:
        """Read an account's window and block into memory."""
        row = db.execute(
            "SELECT account, since, until, reason, count, clients, by FROM blocks WHERE account = ?", (account,)
        ).fetchone()
        times = db.execute(
            "SELECT at FROM sends WHERE account = ? AND at > ? ORDER BY at", (account, now - window)
        ).fetchall()
        if len(self._windows) >= CACHE_ACCOUNTS:
            self._windows.clear()
        state = _Window(deque(at for (at,) in times), None if row is None else _block(row), window)
        self._windows[account] = state
        return state

    @staticmethod
    def _put_block(db: sqlite3.Connection, block: Block) -> None:
        db.execute(
            "INSERT OR REPLACE INTO blocks (account, since, until, reason, count, clients, by) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                block.account,
                block.since,
                block.until,
                block.reason,
                block.count,
                json.dumps(list(block.clients)),
                block.by,
            ),
        )

    def give_back(self, account: str, instance: str) -> Deferred[int]:
        """See :meth:`policyd.store.Store.give_back`."""

        def work(db: sqlite3.Connection) -> int:
            self._windows.pop(account, None)
            cursor = db.execute(
                "DELETE FROM sends WHERE account = ? AND instance = ?", (account, instance)
            )
            return cursor.rowcount

        return self._run(work, write=True)

    def usage(self, account: str, *, now: float, window: float) -> Deferred[int]:
        """See :meth:`policyd.store.Store.usage`."""

        def work(db: sqlite3.Connection) -> int:
            (count,) = db.execute(
                "SELECT COUNT(*) FROM sends WHERE account = ? AND at > ?", (account, now - window)
            ).fetchone()
            return int(count)

        return self._run(work)

    def busiest(self, *, now: float, window: float, limit: int = 20) -> Deferred[list[tuple[str, int]]]:
        """See :meth:`policyd.store.Store.busiest`."""

        def work(db: sqlite3.Connection) -> list[tuple[str, int]]:
            rows = db.execute(
                "SELECT account, COUNT(*) AS n FROM sends WHERE at > ? GROUP BY account "
                "ORDER BY n DESC, account LIMIT ?",
                (now - window, limit),
            )
            return [(account, int(count)) for account, count in rows]

        return self._run(work)

    def block_of(self, account: str, *, now: float) -> Deferred[Block | None]:
        """See :meth:`policyd.store.Store.block_of`."""

        def work(db: sqlite3.Connection) -> Block | None:
            row = db.execute(
                "SELECT account, since, until, reason, count, clients, by FROM blocks WHERE account = ? AND until > ?",
                (account, now),
            ).fetchone()
            return None if row is None else _block(row)

        return self._run(work)

    def blocks(self, *, now: float) -> Deferred[list[Block]]:
        """See :meth:`policyd.store.Store.blocks`."""

        def work(db: sqlite3.Connection) -> list[Block]:
            rows = db.execute(
                "SELECT account, since, until, reason, count, clients, by FROM blocks WHERE until > ? ORDER BY since, account",
                (now,),
            )
            return [_block(row) for row in rows]

        return self._run(work)

    def block(self, block: Block) -> Deferred[Block]:
        """See :meth:`policyd.store.Store.block`."""

        def work(db: sqlite3.Connection) -> Block:
            self._windows.pop(block.account, None)
            self._put_block(db, block)
            return block

        return self._run(work, write=True)

    def unblock(self, account: str, *, now: float) -> Deferred[Block | None]:
        """See :meth:`policyd.store.Store.unblock`."""

        def work(db: sqlite3.Connection) -> Block | None:
            row = db.execute(
                "SELECT account, since, until, reason, count, clients, by FROM blocks WHERE account = ? AND until > ?",
                (account, now),
            ).fetchone()
            self._windows.pop(account, None)
            db.execute("DELETE FROM blocks WHERE account = ?", (account,))
            db.execute("DELETE FROM sends WHERE account = ?", (account,))
            return None if row is None else _block(row)

        return self._run(work, write=True)

    def record(self, entry: AuditEntry) -> Deferred[None]:
        """See :meth:`policyd.store.Store.record`."""

        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO audit (at, who, action, subject, reason) VALUES (?, ?, ?, ?, ?)",
                (entry.at, entry.who, entry.action, entry.subject, entry.reason),
            )

        return self._run(work, write=True)

    def claim_notices(self, *, now: float, lease: float, limit: int = 20) -> Deferred[list[Notice]]:
        """See :meth:`policyd.store.Store.claim_notices`."""

        def work(db: sqlite3.Connection) -> list[Notice]:
            rows = db.execute(
                "UPDATE outbox SET due = ?, attempts = attempts + 1 WHERE id IN "
                "(SELECT id FROM outbox WHERE sent IS NULL AND due <= ? ORDER BY due, id LIMIT ?) "
                "RETURNING id, kind, recipient, payload, created, attempts, last_error",
                (now + lease, now, limit),
            ).fetchall()
            return sorted(
                (Notice(i, kind, to, json.loads(data), created, attempts, error)
                 for i, kind, to, data, created, attempts, error in rows),
                key=lambda n: n.id,
            )

        return self._run(work, write=True)

    def notice_sent(self, notice_id: int, *, now: float) -> Deferred[None]:
        """See :meth:`policyd.store.Store.notice_sent`."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("UPDATE outbox SET sent = ? WHERE id = ?", (now, notice_id))

        return self._run(work, write=True)

    def notice_failed(self, notice_id: int, *, retry_at: float, error: str) -> Deferred[None]:
        """See :meth:`policyd.store.Store.notice_failed`."""

        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE outbox SET due = ?, last_error = ? WHERE id = ? AND sent IS NULL",
                (retry_at, error[:500], notice_id),
            )

        return self._run(work, write=True)

    def pending_notices(self) -> Deferred[int]:
        """See :meth:`policyd.store.Store.pending_notices`."""

        def work(db: sqlite3.Connection) -> int:
            (count,) = db.execute("SELECT COUNT(*) FROM outbox WHERE sent IS NULL").fetchone()
            return int(count)

        return self._run(work)

    def save_exemption(self, exemption: Exemption) -> Deferred[Exemption]:
        """See :meth:`policyd.store.Store.save_exemption`."""

        def work(db: sqlite3.Connection) -> Exemption:
            values = attrs.astuple(exemption)
            if exemption.id:
                db.execute(
                    "INSERT OR REPLACE INTO exemptions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values
                )
                return exemption
            cursor = db.execute(
                "INSERT INTO exemptions VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values[1:]
            )
            return attrs.evolve(exemption, id=int(cursor.lastrowid or 0))

        return self._run(work, write=True)

    def exemption(self, exemption_id: int) -> Deferred[Exemption | None]:
        """See :meth:`policyd.store.Store.exemption`."""

        def work(db: sqlite3.Connection) -> Exemption | None:
            row = db.execute("SELECT * FROM exemptions WHERE id = ?", (exemption_id,)).fetchone()
            return None if row is None else Exemption(*row)

        return self._run(work)

    def exemptions(self) -> Deferred[list[Exemption]]:
        """See :meth:`policyd.store.Store.exemptions`."""

        def work(db: sqlite3.Connection) -> list[Exemption]:
            return [Exemption(*row) for row in db.execute("SELECT * FROM exemptions ORDER BY id")]

        return self._run(work)

    def note_account(self, account: str, *, now: float) -> Deferred[None]:
        """See :meth:`policyd.store.Store.note_account`."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO accounts (account, last_seen) VALUES (?, ?)", (account, now))

        return self._run(work, write=True)

    def account_seen(self, account: str) -> Deferred[bool]:
        """See :meth:`policyd.store.Store.account_seen`."""

        def work(db: sqlite3.Connection) -> bool:
            return db.execute("SELECT 1 FROM accounts WHERE account = ?", (account,)).fetchone() is not None

        return self._run(work)

    def audit(self, *, limit: int = 100) -> Deferred[list[AuditEntry]]:
        """See :meth:`policyd.store.Store.audit`."""

        def work(db: sqlite3.Connection) -> list[AuditEntry]:
            rows = db.execute(
                "SELECT at, who, action, subject, reason FROM "
                "(SELECT * FROM audit ORDER BY id DESC LIMIT ?) ORDER BY id",
                (limit,),
            )
            return [AuditEntry(*row) for row in rows]

        return self._run(work)

    def prune(self, *, now: float, window: float) -> Deferred[int]:
        """See :meth:`policyd.store.Store.prune`."""

        def work(db: sqlite3.Connection) -> int:
            removed = db.execute("DELETE FROM sends WHERE at <= ?", (now - window,)).rowcount
            db.execute("DELETE FROM blocks WHERE until <= ?", (now,))
            for account in [a for a, w in self._windows.items() if w.block is None and (
                not w.sends or w.sends[-1] <= now - window
            )]:
                del self._windows[account]  # idle accounts leave memory
            return removed

        return self._run(work, write=True)

    def quarantine(self, entry: Quarantined, message: bytes) -> Deferred[Quarantined]:
        """See :meth:`policyd.store.Store.quarantine`."""

        def work(db: sqlite3.Connection) -> Quarantined:
            cursor = db.execute(
                "INSERT INTO quarantine (recipient, sender, subject, score, at, until, size, client, "
                "queue_id, reasons, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.recipient,
                    entry.sender,
                    entry.subject,
                    entry.score,
                    entry.at,
                    entry.until,
                    entry.size,
                    entry.client,
                    entry.queue_id,
                    json.dumps(list(entry.reasons)),
                    sqlite3.Binary(message),
                ),
            )
            return attrs.evolve(entry, id=int(cursor.lastrowid or 0))

        return self._run(work, write=True)

    def quarantined(self, entry_id: int, *, now: float) -> Deferred[tuple[Quarantined, bytes] | None]:
        """See :meth:`policyd.store.Store.quarantined`."""

        def work(db: sqlite3.Connection) -> tuple[Quarantined, bytes] | None:
            row = db.execute(
                "SELECT id, recipient, sender, subject, score, at, until, size, client, queue_id, reasons, message FROM quarantine WHERE id = ? AND until > ?", (entry_id, now)
            ).fetchone()
            return None if row is None else (_held(row[:-1]), bytes(row[-1]))

        return self._run(work)

    def quarantine_list(
        self, *, now: float, recipient: str | None = None, limit: int = 1000, since: float | None = None
    ) -> Deferred[list[Quarantined]]:
        """See :meth:`policyd.store.Store.quarantine_list`."""
        after = -math.inf if since is None else since

        def work(db: sqlite3.Connection) -> list[Quarantined]:
            if recipient is None:
                rows = db.execute(
                    "SELECT id, recipient, sender, subject, score, at, until, size, client, queue_id, reasons FROM quarantine "
                    "WHERE until > ? AND at > ? ORDER BY at DESC, id DESC LIMIT ?",
                    (now, after, limit),
                )
            else:
                rows = db.execute(
                    "SELECT id, recipient, sender, subject, score, at, until, size, client, queue_id, reasons FROM quarantine "
                    "WHERE recipient = ? AND until > ? AND at > ? "
                    "ORDER BY at DESC, id DESC LIMIT ?",
                    (recipient, now, after, limit),
                )
            return [_held(row) for row in rows]

        return self._run(work)

    def quarantine_delete(self, entry_id: int) -> Deferred[bool]:
        """See :meth:`policyd.store.Store.quarantine_delete`."""

        def work(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM release_claims WHERE id = ?", (entry_id,))
            return db.execute("DELETE FROM quarantine WHERE id = ?", (entry_id,)).rowcount > 0

        return self._run(work, write=True)

    def claim_release(self, entry_id: int, *, now: float, lease: float) -> Deferred[bool]:
        """See :meth:`policyd.store.Store.claim_release`."""

        def work(db: sqlite3.Connection) -> bool:
            taken = db.execute(
                "INSERT INTO release_claims (id, until) VALUES (?, ?) "
                "ON CONFLICT (id) DO UPDATE SET until = excluded.until WHERE release_claims.until <= ?",
                (entry_id, now + lease, now),
            )
            return taken.rowcount > 0

        return self._run(work, write=True)

    def end_claim(self, entry_id: int) -> Deferred[None]:
        """See :meth:`policyd.store.Store.end_claim`."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM release_claims WHERE id = ?", (entry_id,))

        return self._run(work, write=True)

    def quarantine_expire(self, *, now: float) -> Deferred[int]:
        """See :meth:`policyd.store.Store.quarantine_expire`."""

        def work(db: sqlite3.Connection) -> int:
            db.execute("DELETE FROM release_claims WHERE until <= ?", (now,))
            return int(db.execute("DELETE FROM quarantine WHERE until <= ?", (now,)).rowcount)

        return self._run(work, write=True)

    def set_preference(self, address: str, spam: str | None) -> Deferred[None]:
        """See :meth:`policyd.store.Store.set_preference`."""

        def work(db: sqlite3.Connection) -> None:
            if spam is None:
                db.execute("DELETE FROM preferences WHERE address = ?", (address,))
            else:
                db.execute("INSERT OR REPLACE INTO preferences (address, spam) VALUES (?, ?)", (address, spam))

        return self._run(work, write=True)

    def preferences(self, addresses: Sequence[str] | None = None) -> Deferred[dict[str, str]]:
        """See :meth:`policyd.store.Store.preferences`."""

        def work(db: sqlite3.Connection) -> dict[str, str]:
            if addresses is None:
                return dict(db.execute("SELECT address, spam FROM preferences ORDER BY address"))
            found: dict[str, str] = {}
            wanted = list(dict.fromkeys(addresses))
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                found.update(
                    db.execute(
                        "SELECT address, spam FROM preferences WHERE address IN (" + marks + ")",  # noqa: S608
                        chunk,
                    )
                )
            return found

        return self._run(work)

    def digest_mark(self) -> Deferred[float | None]:
        """See :meth:`policyd.store.Store.digest_mark`."""

        def work(db: sqlite3.Connection) -> float | None:
            row = db.execute("SELECT value FROM marks WHERE name = 'digest'").fetchone()
            return None if row is None else float(row[0])

        return self._run(work)

    def queue_digest(
        self, *, since: float | None, until: float, notices: Sequence[tuple[str, dict[str, Any]]]
    ) -> Deferred[bool]:
        """See :meth:`policyd.store.Store.queue_digest`."""

        def work(db: sqlite3.Connection) -> bool:
            # Under the write lock (BEGIN IMMEDIATE): no other process moves the mark meanwhile.
            row = db.execute("SELECT value FROM marks WHERE name = 'digest'").fetchone()
            if (None if row is None else float(row[0])) != since:
                return False
            db.execute("INSERT OR REPLACE INTO marks (name, value) VALUES ('digest', ?)", (repr(until),))
            db.executemany(
                "INSERT INTO outbox (kind, recipient, payload, created, due) VALUES ('digest', ?, ?, ?, ?)",
                [(recipient, json.dumps(payload), until, until) for recipient, payload in notices],
            )
            return True

        return self._run(work, write=True)

    def close(self) -> Deferred[None]:
        """Commit pending writes, checkpoint the log into the database and close it."""
        if self._checkpointer is not None and self._checkpointer.running:
            self._checkpointer.stop()
        self._commit()
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.db.close()
        except sqlite3.Error as error:
            return fail(StoreError(f"SQLite store {self.path}: {error}"))
        return succeed(None)
