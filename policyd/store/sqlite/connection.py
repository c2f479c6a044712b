"""The SQLite connection: opening the file privately, checking it, grouped commits, checkpoints, the windows' copy."""

from __future__ import annotations

import logging
import math
import os
import shlex
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from policyd.errors import StoreDamaged, StoreError
from policyd.statefiles import private_directory, private_file, withhold_from_others
from policyd.store.sqlite.schema import (
    EPOCH,
    INSERT_SEND,
    SCHEMA,
    AccountWindow,
    HeldRow,
    block_of_row,
    window_of,
)

T = TypeVar("T")

log = logging.getLogger("policyd.store")


#: together: a commit per recipient cost more than the decision.  A crash
#: (not a stop) loses at most these last seconds of counts.
WRITE_EVERY = 0.01
#: Counted recipients held while the file cannot be written; older ones beyond are dropped.
MAX_HELD_ROWS = 100_000
#: Old rows deleted per statement when pruning: about a millisecond of work.
PRUNE_BATCH = 500
#: Seconds between two checkpoints of the log, in a thread (server only).
CHECKPOINT_EVERY = 1.0


UNCHECKED = ("quarantine",)
#: SQLite's result codes for a file that is damaged or not a database at all.
DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def is_damage(error: BaseException) -> bool:
    """Whether SQLite refused because the file is damaged (not locked, full or unreadable)."""
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(error, sqlite3.DatabaseError) and code is not None and code & 0xFF in DAMAGED


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


def file_state(path: str) -> tuple[int, int]:
    """A file's size and modification time (nanoseconds): what changes when it is written."""
    found = os.stat(path)
    return found.st_size, found.st_mtime_ns


class SQLiteConnection:
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
        self._windows: dict[str, AccountWindow] | None = None
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
        self._rows: list[HeldRow] = []
        #: Rows written in the open transaction (kept for a retry if it fails).
        self._written: list[HeldRow] = []
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
            self.db.executescript(SCHEMA)
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
            if is_damage(error):
                raise damaged(path, str(error)) from None
            raise StoreError(f"cannot open SQLite store {path}: {error}") from None

    def _error(self, error: Exception) -> StoreError:
        """The one-line error of an operation SQLite refused."""
        if is_damage(error):
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
            log_state = file_state(path + "-wal")
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
                db.executemany(INSERT_SEND, rows)
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


    def _load(self, db: sqlite3.Connection, start: float) -> dict[str, AccountWindow]:
        """Read every account's window since ``start``, and every block, into memory."""
        windows: dict[str, AccountWindow] = {}
        for account, at, client in db.execute(
            "SELECT account, at, client FROM sends WHERE at > ? ORDER BY at", (start,)
        ):
            window_of(windows, account).add(at, client)
        for row in db.execute("SELECT account, since, until, reason, count, clients, by FROM blocks"):
            window_of(windows, row[0]).block = block_of_row(row)
        for account, at, _, client in self._rows:  # counted, not written yet
            if at > start:
                window_of(windows, account).add(at, client)
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
            window_of(windows, account).add(at, client)
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
