"""Held mail and recipients' choices in SQLite."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed

from policyd.store import (
    Quarantined,
)
from policyd.store.sqlite.connection import SQLiteConnection
from policyd.store.sqlite.schema import held_entry, next_quarantine_id, sql_limit, storable_id


class SQLiteHeldMail(SQLiteConnection):
    """The quarantine, release claims, digest mark and choices (:class:`policyd.store.HeldMail`, :class:`~policyd.store.Choices`)."""


    def quarantine(self, entry: Quarantined, message: bytes) -> Deferred[Quarantined]:
        """See :meth:`policyd.store.Store.quarantine`."""

        def work(db: sqlite3.Connection) -> Quarantined:
            entry_id = next_quarantine_id(db)
            db.execute(
                "INSERT INTO quarantine (id, recipient, sender, subject, score, at, until, size, client, "
                "queue_id, reasons, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry_id,
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
            return attrs.evolve(entry, id=entry_id)

        return self._run(work, write=True)

    def quarantined(self, entry_id: int, *, now: float) -> Deferred[tuple[Quarantined, bytes] | None]:
        """See :meth:`policyd.store.Store.quarantined`."""

        def work(db: sqlite3.Connection) -> tuple[Quarantined, bytes] | None:
            row = db.execute(
                "SELECT id, recipient, sender, subject, score, at, until, size, client, queue_id, reasons, message FROM quarantine WHERE id = ? AND until > ?", (entry_id, now)
            ).fetchone()
            return None if row is None else (held_entry(row[:-1]), bytes(row[-1]))

        return self._run(work) if storable_id(entry_id) else succeed(None)

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
                    (now, after, sql_limit(limit)),
                )
            else:
                rows = db.execute(
                    "SELECT id, recipient, sender, subject, score, at, until, size, client, queue_id, reasons FROM quarantine "
                    "WHERE recipient = ? AND until > ? AND at > ? "
                    "ORDER BY at DESC, id DESC LIMIT ?",
                    (recipient, now, after, sql_limit(limit)),
                )
            return [held_entry(row) for row in rows]

        return self._run(work)

    def quarantine_delete(self, entry_id: int) -> Deferred[bool]:
        """See :meth:`policyd.store.Store.quarantine_delete`."""

        def work(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM release_claims WHERE id = ?", (entry_id,))
            return db.execute("DELETE FROM quarantine WHERE id = ?", (entry_id,)).rowcount > 0

        return self._run(work, write=True) if storable_id(entry_id) else succeed(False)

    def claim_release(self, entry_id: int, *, now: float, lease: float) -> Deferred[bool]:
        """See :meth:`policyd.store.Store.claim_release`."""

        def work(db: sqlite3.Connection) -> bool:
            taken = db.execute(
                "INSERT INTO release_claims (id, until) VALUES (?, ?) "
                "ON CONFLICT (id) DO UPDATE SET until = excluded.until WHERE release_claims.until <= ?",
                (entry_id, now + lease, now),
            )
            return taken.rowcount > 0

        return self._run(work, write=True) if storable_id(entry_id) else succeed(False)

    def end_claim(self, entry_id: int) -> Deferred[None]:
        """See :meth:`policyd.store.Store.end_claim`."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM release_claims WHERE id = ?", (entry_id,))

        return self._run(work, write=True) if storable_id(entry_id) else succeed(None)

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
