"""The SQLite schema, its rows as records, and the windows a server keeps in memory."""

from __future__ import annotations

import bisect
import json
import math
from array import array
from collections.abc import Sequence
from typing import Any

from policyd.store import (
    MAX_BLOCK_CLIENTS,
    Block,
    Quarantined,
)

SCHEMA = """
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


#: ``marks`` name of the last quarantine id given.  Ids come from this
#: sequence, never from the table's largest id: SQLite gives a deleted
#: newest row's id again, and two messages would then both be "#1" in the
#: audit log and the logs.
QUARANTINE_SEQUENCE = "quarantine-id"

#: The last quarantine id a store made before the sequence existed: the
#: largest id held, claimed or named in the audit log ("quarantine #12 for
#: ..."), so an upgraded store never gives one of them again.  SQLite reads
#: "12 for ..." cast to an integer as 12.
LAST_QUARANTINE_ID = """
SELECT MAX(
    (SELECT COALESCE(MAX(id), 0) FROM quarantine),
    (SELECT COALESCE(MAX(id), 0) FROM release_claims),
    (SELECT COALESCE(MAX(CAST(substr(subject, 13) AS INTEGER)), 0) FROM audit WHERE subject LIKE 'quarantine #%')
)
"""


def next_quarantine_id(db: Any) -> int:
    """Take the next quarantine id (inside the caller's write transaction).

    The first time on a store made by an older version, the sequence starts
    after :data:`LAST_QUARANTINE_ID`: that is the whole migration.
    """
    row = db.execute("SELECT value FROM marks WHERE name = ?", (QUARANTINE_SEQUENCE,)).fetchone()
    last = int(row[0]) if row is not None else int(db.execute(LAST_QUARANTINE_ID).fetchone()[0] or 0)
    db.execute("INSERT OR REPLACE INTO marks (name, value) VALUES (?, ?)", (QUARANTINE_SEQUENCE, str(last + 1)))
    return last + 1


def held_entry(row: Sequence[Any]) -> Quarantined:
    """A quarantine entry from its row (the columns of the table, in order, without the message)."""
    entry_id, recipient, sender, subject, score, at, until, size, client, queue_id, reasons = row
    return Quarantined(
        entry_id, recipient, sender, subject, score, at, until, size, client, queue_id, tuple(json.loads(reasons))
    )


def block_of_row(row: tuple[str, float, float, str, int, str, str]) -> Block:
    """A block from its row in ``blocks``."""
    account, since, until, reason, count, clients, by = row
    return Block(account, since, until, reason, count, tuple(json.loads(clients)), by)


class AccountWindow:
    """An account's counted recipients (times, oldest first), clients and live block, in memory.

    The times are an array of doubles: 8 bytes a recipient, where a deque
    of floats took 32 and a deque at least 600 for an account that sent one.
    """

    __slots__ = ("block", "clients", "sends")

    def __init__(self) -> None:
        self.sends: array[float] = array("d")
        self.block: Block | None = None
        #: When each client address last sent for the account (for a block's list).
        self.clients: dict[str, float] = {}

    def expire(self, start: float) -> None:
        """Forget the recipients at or before ``start``."""
        sends = self.sends
        if sends and sends[0] <= start:
            del sends[: bisect.bisect_right(sends, start)]

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


def window_of(windows: dict[str, AccountWindow], account: str) -> AccountWindow:
    """An account's window in ``windows``, made empty if it has none yet."""
    state = windows.get(account)
    if state is None:
        state = windows[account] = AccountWindow()
    return state


#: One counted recipient as a server holds it before writing: account, time, instance, client.
HeldRow = tuple[str, float, str, str]
#: One counted recipient, as a server writes it.
INSERT_SEND = "INSERT INTO sends (account, at, instance, client) VALUES (?, ?, ?, ?)"
#: ``marks`` name of the counter bumped by every change to sends and blocks that is not an append.
EPOCH = "sends-epoch"

#: SQLite's integers are 64-bit signed.
LARGEST = 2**63 - 1


def storable_id(row_id: int) -> bool:
    """Whether a row could have this id: one beyond 64 bits (from a URL, say) is no entry,
    not an OverflowError."""
    return -LARGEST - 1 <= row_id <= LARGEST


def sql_limit(limit: int) -> int:
    """A LIMIT as the other stores read it: none below 0 (SQLite reads a negative one as no
    limit at all), and no overflow for a huge one."""
    return max(0, min(limit, LARGEST))

