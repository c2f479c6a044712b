"""The quota's hot path in SQLite: counting recipients, blocks, accounts seen, pruning."""

from __future__ import annotations

import bisect
import json
import math
import sqlite3
from collections.abc import Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import deferLater

from policyd.store import (
    Admission,
    Block,
    Charge,
    Outcome,
)
from policyd.store.sqlite.connection import PRUNE_BATCH, WRITE_EVERY, SQLiteConnection
from policyd.store.sqlite.schema import (
    INSERT_SEND,
    AccountWindow,
    HeldRow,
    block_of_row,
    sql_limit,
    window_of,
)


class SQLiteCounts(SQLiteConnection):
    """Counts and blocks (:class:`policyd.store.Counts`), answered from the windows in memory."""


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

    def count_at_once(self, account: str, now: float, window: float, limit: int, instance: str, client: str) -> int:
        """Count one recipient let through, when a server can tell at once: the new count, else 0.

        The quota's usual case, without a Charge, an Admission or a
        Deferred: the account has no block, stays within ``limit`` and the
        windows in memory are up to date.  Everything else (a block, the
        recipient that makes one, another connection's writes to read
        first, an admin command, windows to load) answers 0 and changes
        nothing the same recipient's :meth:`admit` then needs.
        """
        reactor = self.reactor
        windows = self._windows
        if reactor is None or windows is None:
            return 0
        seconds = reactor.seconds()
        followed = self._followed
        if seconds - followed >= WRITE_EVERY or seconds < followed:
            return 0  # time to look for other connections' writes: admit() does
        start = now - window
        if start < self._covered:
            return 0
        self._covered = start
        state = windows.get(account)
        if state is None:
            state = windows[account] = AccountWindow()
        elif state.block is not None:
            return 0
        sends = state.sends
        if sends and sends[0] <= start:
            state.expire(start)
        count = len(sends)
        if count >= limit:
            return 0
        state.add(now, client)
        self._rows.append((account, now, instance, client))
        if self._commit_call is None:
            self._schedule(WRITE_EVERY)
        return count + 1

    def recent(self, account: str, start: float) -> int:
        """Recipients of ``account`` after ``start`` in this server's copy in memory (0 without one).

        The quota's fallback limiter starts from this when an admission
        fails, rather than keeping every recipient's time a second time.
        """
        windows = self._windows
        state = None if windows is None else windows.get(account)
        if state is None:
            return 0
        sends = state.sends
        return len(sends) - bisect.bisect_right(sends, start)

    def _admit_now(self, db: sqlite3.Connection, charge: Charge) -> Admission:
        admission, row = self._count(db, charge)
        if row is not None:
            self._last_row = (
                db.execute(INSERT_SEND, row).lastrowid
                or self._last_row
            )
        elif admission.outcome is Outcome.NEWLY_BLOCKED:
            assert admission.block is not None
            self._save_block(db, admission.block, charge.notify, admission)
        return admission

    def _count(self, db: sqlite3.Connection, charge: Charge) -> tuple[Admission, HeldRow | None]:
        """Decide one recipient from the windows in memory; the row to write when it is counted."""
        account, now = charge.account, charge.now
        start = now - charge.window
        windows = self._windows
        if windows is None or start < self._covered:
            windows = self._load(db, start)
        else:
            self._covered = start
        state = window_of(windows, account)
        block = state.block
        if block is not None:
            if block.until > now:
                return Admission(Outcome.BLOCKED, block.count, block), None
            state.block = None  # its row goes when the store is pruned
        sends = state.sends
        if sends and sends[0] <= start:
            state.expire(start)
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
                (now - window, sql_limit(limit)),
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
            return None if row is None else block_of_row(row)

        return self._run(work)

    def blocks(self, *, now: float) -> Deferred[list[Block]]:
        """See :meth:`policyd.store.Store.blocks`."""

        def work(db: sqlite3.Connection) -> list[Block]:
            rows = db.execute(
                "SELECT account, since, until, reason, count, clients, by FROM blocks WHERE until > ? ORDER BY since, account",
                (now,),
            )
            return [block_of_row(row) for row in rows]

        return self._run(work)

    def block(self, block: Block) -> Deferred[Block]:
        """See :meth:`policyd.store.Store.block`."""

        def work(db: sqlite3.Connection) -> Block:
            self._put_block(db, block)
            self._changed(db)
            if self._windows is not None:
                window_of(self._windows, block.account).block = block
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
            return None if row is None else block_of_row(row)

        return self._run(work, write=True)


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
