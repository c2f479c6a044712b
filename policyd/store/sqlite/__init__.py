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

from policyd.store.sqlite.connection import UNCHECKED, damaged, recover_command
from policyd.store.sqlite.counts import SQLiteCounts
from policyd.store.sqlite.held import SQLiteHeldMail
from policyd.store.sqlite.records import SQLiteRecords

__all__ = ["UNCHECKED", "SQLiteStore", "damaged", "recover_command"]


class SQLiteStore(SQLiteCounts, SQLiteRecords, SQLiteHeldMail):
    """Every role of :class:`policyd.store.Store` in one SQLite file: the parts share one connection.

    See :class:`~policyd.store.sqlite.connection.SQLiteConnection` for the file,
    the lock timeout and grouped commits.
    """
