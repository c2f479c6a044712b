"""The embedded store: one SQLite file in WAL mode, for a single mail host.

Statements run on the reactor thread: each is an indexed look-up or a
short write, a few microseconds, less than handing work to a thread pool
and back (see the README's figures).  What costs is the commit (the write
of the log pages), so a server writes counted recipients together: it
answers at once from its copy in memory and writes the counts of each
WRITE_EVERY seconds in one transaction (a crash loses at most those; a
failed write keeps them in memory and tries again).  Every other write of
one reactor turn shares one transaction, committed on the next turn, and
only then do their Deferreds fire.  WAL with ``synchronous=NORMAL`` makes a
commit a write without an fsync; a server moves the checkpoints, which do
sync, to a thread, so no reply waits for the disk.  Admin commands (no
reactor) run each operation in a transaction of its own, under the write
lock taken by ``BEGIN IMMEDIATE`` before reading.

A server keeps every account's window (the times of its recipients in the
last window, their clients, and its block) in memory, so a decision reads
nothing.  The copy follows other processes on the same file (an admin
command, another server) within WRITE_EVERY seconds without re-reading
everything: ``PRAGMA data_version`` tells that another connection wrote;
rows it appended to ``sends`` are then read by rowid, and a change that is
not an append (an unblock, a block, a give-back) bumps the ``sends`` epoch
in ``marks``, which makes every copy load again.  ``sends`` is therefore
indexed by time only: an index by account put each insert on another page
of the file and cost each decision more than the rest of it.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import shlex
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from policyd.errors import StoreDamaged, StoreError
from policyd.statefiles import private_directory, private_file, withhold_from_others
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
DROP INDEX IF EXISTS sends_by_account;
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
    """An account's counted recipients (times, oldest first), clients and live block, in memory."""

    __slots__ = ("block", "clients", "sends")

    def __init__(self) -> None:
        self.sends: deque[float] = deque()
        self.block: Block | None = None
        #: When each client address last sent for the account (for a block's list).
        self.clients: dict[str, float] = {}

    def add(self, at: float, client: str) -> None:
        """Count one recipient sent at ``at`` (usually the newest)."""
        sends = self.sends
        if not sends or at >= sends[-1]:
            sends.append(at)
        else:
            sends.insert(bisect.bisect_right(sends, at), at)
        if client:
            clients = self.clients
            if clients.get(client, -math.inf) < at:
                clients[client] = at
            if len(clients) > 8 * MAX_BLOCK_CLIENTS:
                newest = sorted(clients.items(), key=lambda item: item[1])[-MAX_BLOCK_CLIENTS:]
                self.clients = dict(newest)

    def recent_clients(self, since: float) -> tuple[str, ...]:
        """Client addresses that sent after ``since``, most recent first."""
        ordered = sorted(((at, c) for c, at in self.clients.items() if at > since), reverse=True)
        return tuple(c for _, c in ordered[:MAX_BLOCK_CLIENTS])


def _window(windows: dict[str, _Window], account: str) -> _Window:
    """An account's window in ``windows``, made empty if it has none yet."""
    state = windows.get(account)
    if state is None:
        state = windows[account] = _Window()
    return state


#: One counted recipient as a server holds it before writing: account, time, instance, client.
_Row = tuple[str, float, str, str]
#: One counted recipient, as a server writes it.
_INSERT_SEND = "INSERT INTO sends (account, at, instance, client) VALUES (?, ?, ?, ?)"
#: ``marks`` name of the counter bumped by every change to sends and blocks that is not an append.
EPOCH = "sends-epoch"
#: Seconds a server holds counted recipients in memory before writing them
#: together: a commit per recipient cost more than the decision.  A crash
#: (not a stop) loses at most these last seconds of counts.
WRITE_EVERY = 0.01
#: Counted recipients held while the file cannot be written; older ones beyond are dropped.
MAX_HELD_ROWS = 100_000
#: Old rows deleted per statement when pruning: about a millisecond of work.
PRUNE_BATCH = 500
#: Seconds between two checkpoints of the log, in a thread (server only).
CHECKPOINT_EVERY = 1.0


#: SQLite's integers are 64-bit signed.
_LARGEST = 2**63 - 1


def _stored(row_id: int) -> bool:
    """Whether a row could have this id: one beyond 64 bits (from a URL, say) is no entry,
    not an OverflowError."""
    return -_LARGEST - 1 <= row_id <= _LARGEST


def _limit(limit: int) -> int:
    """A LIMIT as the other stores read it: none below 0 (SQLite reads a negative one as no
    limit at all), and no overflow for a huge one."""
    return max(0, min(limit, _LARGEST))


#: Tables a server does not check at start: the held mail (see :meth:`SQLiteStore._check`).
UNCHECKED = ("quarantine",)
#: SQLite's result codes for a file that is damaged or not a database at all.
_DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _damage(error: BaseException) -> bool:
    """Whether SQLite refused because the file is damaged (not locked, full or unreadable)."""
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(error, sqlite3.DatabaseError) and code is not None and code & 0xFF in _DAMAGED


def damaged(path: str, detail: str) -> StoreDamaged:
    """The one-line error for a damaged database: what SQLite saw and what the admin can do.

    The way back uses ``.dump``, which Debian's ``sqlite3`` has (its
    ``.recover`` needs a library built with ``sqlite_dbpage``, which
    Debian's is not): the dump skips what it cannot read and then ends in
    ROLLBACK, which ``sed`` makes a COMMIT.  The old file's ``-wal`` must go
    with it, or SQLite would replay it onto the new file.
    """
    detail = " ".join(detail.replace("*** in database main ***", "").split())
    name = Path(path).name
    recovered = f"{path}.recovered"
    return StoreDamaged(
        f"SQLite store {path} is damaged ({detail}): stop policyd, then restore it from a backup, or keep what "
        f"can be read: {recover_command(path, recovered)}; then delete {name}-wal and {name}-shm and "
        f"move {Path(recovered).name} over {name}"
    )


def recover_command(path: str, recovered: str) -> str:
    """A shell command that copies what can be read of the database ``path`` into a new file ``recovered``."""
    return (
        f"sqlite3 {shlex.quote(path)} .dump | sed 's/^ROLLBACK; -- due to errors$/COMMIT;/' "
        f"| sqlite3 {shlex.quote(recovered)}"
    )


def _file_state(path: str) -> tuple[int, int]:
    """A file's size and modification time (nanoseconds): what changes when it is written."""
    found = os.stat(path)
    return found.st_size, found.st_mtime_ns


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
        #: Every account's window in memory (an account not here sent nothing
        #: since ``_covered``), or None until loaded (see the module's text).
        self._windows: dict[str, _Window] | None = None
        #: The oldest time the copy in memory is complete from.
        self._covered = math.inf
        #: ``PRAGMA data_version`` and the sends epoch the copy was made at,
        #: and the last rowid of sends it holds.
        self._version = -1
        self._epoch = ""
        self._last_row = 0
        #: When a server last looked for other connections' writes (reactor time).
        self._followed = -math.inf
        #: Counted recipients not written yet (a server writes them every WRITE_EVERY).
        self._rows: list[_Row] = []
        #: Rows written in the open transaction (kept for a retry if it fails).
        self._written: list[_Row] = []
        self._commit_call: Any = None
        self._checkpointing = False
        #: The log file's (size, modification time) when the last checkpoint began.
        self._checkpointed: tuple[int, int] | None = None
        #: Checkpoints started (for tests and curious admins).
        self.checkpoints = 0
        self._checkpointer: LoopingCall | None = None
        try:
            if path not in ("", ":memory:"):
                self._make_private()
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            self.db.executescript(_SCHEMA)
            self._give_files_to_directory_owner()
            if reactor is not None and path not in ("", ":memory:"):
                self._check()
            if reactor is not None and IReactorThreads.providedBy(reactor) and path != ":memory:":
                # Checkpoints sync the disk: do them in a thread, not in a commit.
                self.db.execute("PRAGMA wal_autocheckpoint = 0")
                self._checkpointer = LoopingCall(self._checkpoint)
                self._checkpointer.clock = reactor
                self._checkpointer.start(CHECKPOINT_EVERY, now=False)
        except (sqlite3.Error, OSError) as error:
            if _damage(error):
                raise damaged(path, str(error)) from None
            raise StoreError(f"cannot open SQLite store {path}: {error}") from None

    def _error(self, error: Exception) -> StoreError:
        """The one-line error of an operation SQLite refused."""
        if _damage(error):
            return damaged(self.path, str(error))
        return StoreError(f"SQLite store {self.path}: {error}")

    def _check(self) -> None:
        """Check the tables a server decides from before it uses them (``PRAGMA quick_check``).

        A damaged page in the middle is otherwise found only when a request
        reads it, and the server would run on its fallback limiter, not
        enforcing the blocks it cannot read.  Held mail (:data:`UNCHECKED`)
        is left out: it is most of the file, and reading all of it after a
        reboot took 10 s a GB on the test machine, past the 10 s a server has
        to start; a damaged held message is found when it is read, alone.
        The check runs on a connection of its own, so that the server's
        cache holds none of the pages.

        :raises StoreDamaged: when a checked table is damaged.
        """
        started = time.monotonic()
        checker = sqlite3.connect(self.path, isolation_level=None)
        try:
            tables = [
                name
                for (name,) in checker.execute("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
                if name not in UNCHECKED and not name.startswith("sqlite_")
            ]
            for table in tables:
                try:
                    ((verdict,), *_) = checker.execute(f"PRAGMA quick_check('{table}')").fetchall()
                except sqlite3.DatabaseError as error:
                    verdict = str(error)  # a page too damaged to be checked
                if verdict != "ok":
                    raise damaged(self.path, f"table {table}: {verdict}")
        finally:
            checker.close()
        log.debug("SQLite store %s checked in %.2fs", self.path, time.monotonic() - started)

    def _checkpoint(self) -> None:
        """Copy the log into the database from a thread (PASSIVE: never blocks writers).

        Skipped while the log is as the last checkpoint left it (no process
        wrote since): an idle server does not wake a thread every second.
        """
        if self._checkpointing:
            return
        path = self.path
        try:
            log_state = _file_state(path + "-wal")
        except OSError:
            log_state = None
        if log_state is not None and log_state == self._checkpointed:
            return
        self._checkpointing = True
        self.checkpoints += 1

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
            self._checkpointed = log_state

        reactor: Any = self.reactor
        deferToThreadPool(reactor, reactor.getThreadPool(), work).addErrback(failed).addBoth(done)

    def _make_private(self) -> None:
        """Create the file 0600 (its directory 0700) before SQLite opens it, whatever the umask.

        It holds quarantined mail.  SQLite gives the ``-wal`` and ``-shm``
        files it makes the mode of the database file, so they are private
        too.  Files an earlier version made readable by all lose the others'
        permissions.
        """
        database = Path(self.path)
        private_directory(database.parent)
        if not private_file(database):
            for suffix in ("", "-wal", "-shm"):
                withhold_from_others(Path(self.path + suffix))

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
        if self.reactor is not None:
            if write:
                return self._grouped(work)
            if self._rows:
                self._commit()  # a read sees every count made before it
        db = self.db
        try:
            if write:
                self._begin(db)
            try:
                result = work(db)
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                    self._windows = None
                raise
            if db.in_transaction:
                db.execute("COMMIT")
        except sqlite3.Error as error:
            return fail(self._error(error))
        return succeed(result)

    def _grouped(self, work: Callable[[sqlite3.Connection], T]) -> Deferred[T]:
        """Run a write in the group transaction; fire when it is committed (on the next turn)."""
        db = self.db
        try:
            if not db.in_transaction:
                self._begin(db)
            self._write_rows(db)
            result = work(db)
        except sqlite3.Error as error:
            # The whole group is rolled back: every write in it fails alike,
            # so the caller's fallback applies and nothing is half-counted.
            self._fail_group(error)
            return fail(self._error(error))
        self._schedule(0)
        waiting: Deferred[T] = Deferred()
        self._group.append((waiting, result))
        return waiting

    def _schedule(self, delay: float) -> None:
        """Commit within ``delay`` seconds."""
        assert self.reactor is not None
        call = self._commit_call
        if call is None or not call.active():
            self._commit_call = self.reactor.callLater(delay, self._commit)
        elif call.getTime() > self.reactor.seconds() + delay:
            call.reset(delay)

    def _begin(self, db: sqlite3.Connection) -> None:
        """Take the write lock; bring the windows in memory up to date if another connection wrote."""
        db.execute("BEGIN IMMEDIATE")
        self._follow(db)

    def _follow(self, db: sqlite3.Connection) -> None:
        """Bring the windows in memory up to date if another connection wrote."""
        (version,) = db.execute("PRAGMA data_version").fetchone()
        if version != self._version:
            self._version = version
            if self._windows is not None:
                self._catch_up(db)

    def _keep_up(self) -> None:
        """A server looks for other connections' writes at most every WRITE_EVERY seconds."""
        assert self.reactor is not None
        now = self.reactor.seconds()
        if now - self._followed >= WRITE_EVERY or now < self._followed:
            self._followed = now
            self._follow(self.db)

    def _write_rows(self, db: sqlite3.Connection) -> None:
        """Write the counted recipients still held in memory, in the open transaction."""
        rows = self._rows
        if rows:
            self._rows = []
            try:
                db.executemany(_INSERT_SEND, rows)
            except sqlite3.Error:
                self._rows = rows + self._rows
                raise
            self._written += rows
            (self._last_row,) = db.execute("SELECT MAX(rowid) FROM sends").fetchone()

    def _commit(self) -> None:
        """Write held counts and commit the group; fire the group's writes."""
        if self._commit_call is not None and self._commit_call.active():
            self._commit_call.cancel()
        self._commit_call = None
        group, self._group = self._group, []
        db = self.db
        try:
            if self._rows and not db.in_transaction:
                self._begin(db)
            self._write_rows(db)
            if db.in_transaction:
                db.execute("COMMIT")
        except sqlite3.Error as error:
            self._group = group
            self._fail_group(error)
            return
        finally:
            self._written = []
        for waiting, result in group:
            waiting.callback(result)

    def _fail_group(self, error: sqlite3.Error) -> None:
        group, self._group = self._group, []
        # Counts written in this group are kept in memory and written again.
        self._rows = self._written + self._rows
        self._written = []
        if len(self._rows) > MAX_HELD_ROWS:
            log.error("SQLite store %s: dropping %d held counts", self.path, len(self._rows) - MAX_HELD_ROWS)
            del self._rows[: len(self._rows) - MAX_HELD_ROWS]
        if self._rows:
            log.error("SQLite store %s: %d counts not written yet, trying again: %s", self.path, len(self._rows), error)
            self._schedule(WRITE_EVERY)
        self._windows = None  # they may hold what the rollback undid
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        for waiting, _ in group:
            waiting.errback(self._error(error))

    def admit(self, charge: Charge) -> Deferred[Admission]:
        """See :meth:`policyd.store.Store.admit`.

        A server decides from its copy in memory and answers at once; the
        counted recipient is written with the others of the next WRITE_EVERY
        seconds.  A new block waits for its commit, like every other write.
        Admin commands (no reactor) count in a transaction of their own.
        """
        if self.reactor is None:
            return self._run(lambda db: self._admit_now(db, charge), write=True)
        db = self.db
        try:
            self._keep_up()
            admission, row = self._count(db, charge)
        except sqlite3.Error as error:
            return fail(self._error(error))
        if row is not None:
            self._rows.append(row)
            if self._commit_call is None:
                self._schedule(WRITE_EVERY)
            return succeed(admission)
        if admission.outcome is Outcome.NEWLY_BLOCKED:
            assert admission.block is not None
            block = admission.block
            return self._grouped(lambda db: self._save_block(db, block, charge.notify, admission))
        return succeed(admission)

    def _admit_now(self, db: sqlite3.Connection, charge: Charge) -> Admission:
        admission, row = self._count(db, charge)
        if row is not None:
            self._last_row = (
                db.execute(_INSERT_SEND, row).lastrowid
                or self._last_row
            )
        elif admission.outcome is Outcome.NEWLY_BLOCKED:
            assert admission.block is not None
            self._save_block(db, admission.block, charge.notify, admission)
        return admission

    def _count(self, db: sqlite3.Connection, charge: Charge) -> tuple[Admission, _Row | None]:
        """Decide one recipient from the windows in memory; the row to write when it is counted."""
        account, now = charge.account, charge.now
        start = now - charge.window
        windows = self._windows
        if windows is None or start < self._covered:
            windows = self._load(db, start)
        else:
            self._covered = start
        state = _window(windows, account)
        block = state.block
        if block is not None:
            if block.until > now:
                return Admission(Outcome.BLOCKED, block.count, block), None
            state.block = None  # its row goes when the store is pruned
        sends = state.sends
        while sends and sends[0] <= start:
            sends.popleft()
        count = len(sends)
        if count < charge.limit:
            client = charge.client
            state.add(now, client)
            return Admission(Outcome.ALLOWED, count + 1), (account, now, charge.instance, client)
        block = Block(account, now, now + charge.block_for, charge.reason, count, state.recent_clients(start))
        state.block = block
        return Admission(Outcome.NEWLY_BLOCKED, count, block), None

    def _save_block(
        self, db: sqlite3.Connection, block: Block, notify: Sequence[str], admission: Admission
    ) -> Admission:
        """Write a new block and its notices (one step: one block, one notice per address)."""
        self._put_block(db, block)
        self._changed(db)
        payload = json.dumps(block.as_dict())
        db.executemany(
            "INSERT INTO outbox (kind, recipient, payload, created, due) VALUES ('block', ?, ?, ?, ?)",
            [(recipient, payload, block.since, block.since) for recipient in notify],
        )
        return admission

    def _load(self, db: sqlite3.Connection, start: float) -> dict[str, _Window]:
        """Read every account's window since ``start``, and every block, into memory."""
        windows: dict[str, _Window] = {}
        for account, at, client in db.execute(
            "SELECT account, at, client FROM sends WHERE at > ? ORDER BY at", (start,)
        ):
            _window(windows, account).add(at, client)
        for row in db.execute("SELECT account, since, until, reason, count, clients, by FROM blocks"):
            _window(windows, row[0]).block = _block(row)
        for account, at, _, client in self._rows:  # counted, not written yet
            if at > start:
                _window(windows, account).add(at, client)
        (self._last_row,) = db.execute("SELECT COALESCE(MAX(rowid), 0) FROM sends").fetchone()
        self._epoch = self._read_epoch(db)
        self._covered = start
        self._windows = windows
        return windows

    def _catch_up(self, db: sqlite3.Connection) -> None:
        """After another connection wrote: add the rows it appended, or load again if it changed more."""
        assert self._windows is not None
        if self._read_epoch(db) != self._epoch:
            self._windows = None
            return
        windows = self._windows
        for row_id, account, at, client in db.execute(
            "SELECT rowid, account, at, client FROM sends WHERE rowid > ? ORDER BY rowid", (self._last_row,)
        ):
            _window(windows, account).add(at, client)
            self._last_row = row_id

    @staticmethod
    def _read_epoch(db: sqlite3.Connection) -> str:
        row = db.execute("SELECT value FROM marks WHERE name = ?", (EPOCH,)).fetchone()
        return "" if row is None else str(row[0])

    def _changed(self, db: sqlite3.Connection) -> None:
        """Tell the other connections' copies that sends or blocks changed beyond appends."""
        before = self._read_epoch(db)
        after = str(int(before or 0) + 1)
        db.execute("INSERT OR REPLACE INTO marks (name, value) VALUES (?, ?)", (EPOCH, after))
        if self._windows is not None and before == self._epoch:
            self._epoch = after  # our own change: our copy is changed alike
        else:
            self._windows = None

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

    def give_back(self, account: str, instance: str, since: float | None = None) -> Deferred[int]:
        """See :meth:`policyd.store.Store.give_back`."""

        def work(db: sqlite3.Connection) -> int:
            first = since if since is not None else self._covered
            if math.isinf(first):
                count = db.execute(
                    "DELETE FROM sends WHERE account = ? AND instance = ?", (account, instance)
                ).rowcount
            else:
                # The time index narrows the search to the transaction's own minutes.
                count = db.execute(
                    "DELETE FROM sends WHERE at >= ? AND account = ? AND instance = ?", (first, account, instance)
                ).rowcount
            if count:
                self._changed(db)
                self._reread(db, account, first)
            return count

        return self._run(work, write=True)

    def _reread(self, db: sqlite3.Connection, account: str, since: float) -> None:
        """Read an account's recipients since ``since`` again from the file (some were removed)."""
        windows = self._windows
        state = None if windows is None else windows.get(account)
        if state is None:
            return
        sends = state.sends
        while sends and sends[-1] >= since:
            sends.pop()
        for at, client in db.execute(
            "SELECT at, client FROM sends WHERE at >= ? AND account = ? ORDER BY at", (since, account)
        ):
            state.add(at, client)

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
                (now - window, _limit(limit)),
            )
            return [(account, int(count)) for account, count in rows]

        return self._run(work)

    def block_of(self, account: str, *, now: float) -> Deferred[Block | None]:
        """See :meth:`policyd.store.Store.block_of`."""
        if self.reactor is not None and self._windows is not None:
            # A server answers from its copy, as it does for admit.
            try:
                self._keep_up()
            except sqlite3.Error as error:
                return fail(self._error(error))
            if self._windows is not None:
                state = self._windows.get(account)
                block = None if state is None else state.block
                return succeed(block if block is not None and block.until > now else None)

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
            self._put_block(db, block)
            self._changed(db)
            if self._windows is not None:
                _window(self._windows, block.account).block = block
            return block

        return self._run(work, write=True)

    def unblock(self, account: str, *, now: float) -> Deferred[Block | None]:
        """See :meth:`policyd.store.Store.unblock`."""

        def work(db: sqlite3.Connection) -> Block | None:
            row = db.execute(
                "SELECT account, since, until, reason, count, clients, by FROM blocks WHERE account = ? AND until > ?",
                (account, now),
            ).fetchone()
            db.execute("DELETE FROM blocks WHERE account = ?", (account,))
            db.execute("DELETE FROM sends WHERE account = ?", (account,))
            self._changed(db)
            if self._windows is not None:
                self._windows.pop(account, None)
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

        return self._run(work) if _stored(exemption_id) else succeed(None)

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
                (_limit(limit),),
            )
            return [AuditEntry(*row) for row in rows]

        return self._run(work)

    def prune(self, *, now: float, window: float) -> Deferred[int]:
        """See :meth:`policyd.store.Store.prune`.

        Old counts go PRUNE_BATCH rows at a time, each batch in its own
        turn of the reactor, so a long backlog never holds replies back.
        """
        return Deferred.fromCoroutine(self._prune(now - window, now))

    async def _prune(self, start: float, now: float) -> int:
        def batch(db: sqlite3.Connection) -> int:
            return db.execute(
                "DELETE FROM sends WHERE rowid IN (SELECT rowid FROM sends WHERE at <= ? ORDER BY at LIMIT ?)",
                (start, PRUNE_BATCH),
            ).rowcount

        def rest(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM blocks WHERE until <= ?", (now,))
            windows = self._windows
            if windows is not None:
                self._covered = max(self._covered, start)
                idle = [a for a, w in windows.items() if w.block is None and (not w.sends or w.sends[-1] <= start)]
                for account in idle:
                    del windows[account]  # idle accounts leave memory

        removed = 0
        while True:
            count = await self._run(batch, write=True)
            removed += count
            if count < PRUNE_BATCH:
                break
            if self.reactor is not None:
                await deferLater(self.reactor, 0, lambda: None)
        await self._run(rest, write=True)
        return removed

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

        return self._run(work) if _stored(entry_id) else succeed(None)

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
                    (now, after, _limit(limit)),
                )
            else:
                rows = db.execute(
                    "SELECT id, recipient, sender, subject, score, at, until, size, client, queue_id, reasons FROM quarantine "
                    "WHERE recipient = ? AND until > ? AND at > ? "
                    "ORDER BY at DESC, id DESC LIMIT ?",
                    (recipient, now, after, _limit(limit)),
                )
            return [_held(row) for row in rows]

        return self._run(work)

    def quarantine_delete(self, entry_id: int) -> Deferred[bool]:
        """See :meth:`policyd.store.Store.quarantine_delete`."""

        def work(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM release_claims WHERE id = ?", (entry_id,))
            return db.execute("DELETE FROM quarantine WHERE id = ?", (entry_id,)).rowcount > 0

        return self._run(work, write=True) if _stored(entry_id) else succeed(False)

    def claim_release(self, entry_id: int, *, now: float, lease: float) -> Deferred[bool]:
        """See :meth:`policyd.store.Store.claim_release`."""

        def work(db: sqlite3.Connection) -> bool:
            taken = db.execute(
                "INSERT INTO release_claims (id, until) VALUES (?, ?) "
                "ON CONFLICT (id) DO UPDATE SET until = excluded.until WHERE release_claims.until <= ?",
                (entry_id, now + lease, now),
            )
            return taken.rowcount > 0

        return self._run(work, write=True) if _stored(entry_id) else succeed(False)

    def end_claim(self, entry_id: int) -> Deferred[None]:
        """See :meth:`policyd.store.Store.end_claim`."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM release_claims WHERE id = ?", (entry_id,))

        return self._run(work, write=True) if _stored(entry_id) else succeed(None)

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
        if self._commit_call is not None and self._commit_call.active():
            self._commit_call.cancel()
        if self._rows:
            log.error("SQLite store %s: %d counts could not be written before closing", self.path, len(self._rows))
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.db.close()
        except sqlite3.Error as error:
            return fail(self._error(error))
        return succeed(None)
