"""The audit log, the notification outbox and the exemptions in SQLite."""

from __future__ import annotations

import json
import re
import sqlite3

import attrs
from twisted.internet.defer import Deferred, succeed

from policyd.store import (
    AuditEntry,
    Exemption,
    Notice,
)
from policyd.store.audit import matches
from policyd.store.sqlite.connection import SQLiteConnection
from policyd.store.sqlite.schema import sql_limit, storable_id


class SQLiteRecords(SQLiteConnection):
    """The audit log, outbox and exemptions (:class:`policyd.store.AuditLog`, :class:`~policyd.store.Outbox`, :class:`~policyd.store.Exemptions`)."""


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

    def notice_backlog(self) -> Deferred[tuple[float | None, int]]:
        """See :meth:`policyd.store.Store.notice_backlog`."""

        def work(db: sqlite3.Connection) -> tuple[float | None, int]:
            oldest, failing = db.execute(
                "SELECT MIN(created), COUNT(*) FILTER (WHERE last_error != '') FROM outbox WHERE sent IS NULL"
            ).fetchone()
            return (None if oldest is None else float(oldest)), int(failing)

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

        return self._run(work) if storable_id(exemption_id) else succeed(None)

    def exemptions(self) -> Deferred[list[Exemption]]:
        """See :meth:`policyd.store.Store.exemptions`."""

        def work(db: sqlite3.Connection) -> list[Exemption]:
            return [Exemption(*row) for row in db.execute("SELECT * FROM exemptions ORDER BY id")]

        return self._run(work)


    def audit(
        self,
        *,
        limit: int = 100,
        account: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> Deferred[list[AuditEntry]]:
        """See :meth:`policyd.store.Store.audit`."""

        def work(db: sqlite3.Connection) -> list[AuditEntry]:
            if limit <= 0:
                return []
            conditions: list[str] = []
            values: list[object] = []
            if since is not None:
                conditions.append("at >= ?")
                values.append(since)
            if until is not None:
                conditions.append("at < ?")
                values.append(until)
            if account is not None:
                # LIKE narrows the rows (and ignores ASCII case, as accounts do);
                # matches() then keeps only those naming the account as a word.
                conditions.append("subject LIKE ? ESCAPE '\\'")
                values.append("%" + re.sub(r"([%_\\])", r"\\\1", account) + "%")
            where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
            query = f"SELECT at, who, action, subject, reason FROM audit {where} ORDER BY id DESC"  # noqa: S608 - fixed conditions, values bound
            rows = db.execute(query, values)
            chosen: list[AuditEntry] = []
            for row in rows:
                entry = AuditEntry(*row)
                if matches(entry, account, since, until):
                    chosen.append(entry)
                    if len(chosen) >= sql_limit(limit):
                        break
            return chosen[::-1]

        return self._run(work)
