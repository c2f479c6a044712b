"""The audit log, the notification outbox and the exemptions in Redis."""

from __future__ import annotations

import json
from typing import cast

import attrs
from twisted.internet.defer import Deferred, succeed

from policyd.store import (
    AuditEntry,
    Exemption,
    Notice,
)
from policyd.store.audit import matches
from policyd.store.redis.connection import RedisConnection
from policyd.store.redis.schema import AUDIT, AUDIT_CAP, EXEMPTION_SEQUENCE, EXEMPTIONS, OUTBOX

#: Audit entries read in one call when searching: a page is parsed well within the
#: store's deadline, and a search of the whole capped list takes a hundred calls.
AUDIT_PAGE = 1000


def _entry(line: str) -> AuditEntry:
    """An audit entry from its JSON line (fields it does not know are left out)."""
    data = json.loads(line)
    return AuditEntry(**{f.name: data[f.name] for f in attrs.fields(AuditEntry) if f.name in data})


class RedisRecords(RedisConnection):
    """The audit log, outbox and exemptions (:class:`policyd.store.AuditLog`, :class:`~policyd.store.Outbox`, :class:`~policyd.store.Exemptions`)."""


    # --- audit ----------------------------------------------------------------

    def record(self, entry: AuditEntry) -> Deferred[None]:
        """See :meth:`policyd.store.Store.record`."""
        line = json.dumps(entry.as_dict(), separators=(",", ":"))

        async def work() -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.rpush(AUDIT, line)
            pipe.ltrim(AUDIT, -AUDIT_CAP, -1)
            await pipe.execute()

        return self._call(work, "audit record")

    def audit(
        self,
        *,
        limit: int = 100,
        account: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> Deferred[list[AuditEntry]]:
        """See :meth:`policyd.store.Store.audit`.

        Without a search, the last ``limit`` entries are read in one call.
        With one, the list is read from its end in pages of
        :data:`AUDIT_PAGE`, each one call within the store's deadline, until
        ``limit`` entries are found, the list is read, or a whole page is
        older than ``since`` (entries are appended as they are made, so the
        earlier pages are older still).
        """
        if limit <= 0:
            return succeed([])
        if account is None and since is None and until is None:

            async def latest() -> list[AuditEntry]:
                # The list holds AUDIT_CAP entries at most; a larger index is out of Redis's range.
                lines = cast(list[str], await self.client.lrange(AUDIT, -min(limit, AUDIT_CAP), -1))
                return [_entry(line) for line in lines]

            return self._call(latest, "audit")
        return Deferred.fromCoroutine(self._search(limit, account, since, until))

    async def _search(
        self, limit: int, account: str | None, since: float | None, until: float | None
    ) -> list[AuditEntry]:
        chosen: list[AuditEntry] = []
        end = -1
        while len(chosen) < limit:

            async def page(stop: int = end) -> list[str]:
                return cast(list[str], await self.client.lrange(AUDIT, stop - AUDIT_PAGE + 1, stop))

            lines = await self._call(page, "audit")
            entries = [_entry(line) for line in lines]
            chosen[:0] = [e for e in entries if matches(e, account, since, until)][-(limit - len(chosen)):]
            if len(lines) < AUDIT_PAGE or -end >= AUDIT_CAP:
                break
            if since is not None and all(e.at < since for e in entries):
                break
            end -= AUDIT_PAGE
        return chosen

    # --- notification outbox ------------------------------------------------------

    def claim_notices(self, *, now: float, lease: float, limit: int = 20) -> Deferred[list[Notice]]:
        """See :meth:`policyd.store.Store.claim_notices`."""

        async def work() -> list[Notice]:
            rows = await self._claim(keys=[OUTBOX], args=[repr(now), repr(now + lease), limit])
            return [
                Notice(int(i), kind, to, json.loads(data), float(created), int(attempts), error)
                for i, kind, to, data, created, attempts, error in rows
            ]

        return self._call(work, "claim notices")

    def notice_sent(self, notice_id: int, *, now: float) -> Deferred[None]:
        """See :meth:`policyd.store.Store.notice_sent`."""

        async def work() -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.zrem(OUTBOX, notice_id)
            pipe.delete(f"{OUTBOX}:{notice_id}")
            await pipe.execute()

        return self._call(work, "notice sent")

    def notice_failed(self, notice_id: int, *, retry_at: float, error: str) -> Deferred[None]:
        """See :meth:`policyd.store.Store.notice_failed`."""

        async def work() -> None:
            await self._failed(keys=[OUTBOX], args=[notice_id, repr(retry_at), error[:500]])

        return self._call(work, "notice failed")

    def pending_notices(self) -> Deferred[int]:
        """See :meth:`policyd.store.Store.pending_notices`."""

        async def work() -> int:
            return int(await self.client.zcard(OUTBOX))

        return self._call(work, "pending notices")

    def notice_backlog(self) -> Deferred[tuple[float | None, int]]:
        """See :meth:`policyd.store.Store.notice_backlog`.

        Reads every waiting notice's two fields: the outbox holds a few
        notices, or a few thousand when the relay has been down for long.
        """

        async def work() -> tuple[float | None, int]:
            ids = cast(list[str], await self.client.zrange(OUTBOX, 0, -1))
            oldest: float | None = None
            failing = 0
            for start in range(0, len(ids), 1000):
                pipe = self.client.pipeline(transaction=False)
                for notice_id in ids[start : start + 1000]:
                    pipe.hmget(f"{OUTBOX}:{notice_id}", ["created", "last_error"])
                for created, error in await pipe.execute():
                    if created is not None:
                        oldest = float(created) if oldest is None else min(oldest, float(created))
                    failing += bool(error)
            return oldest, failing

        return self._call(work, "notice backlog")

    # --- exemptions and accounts ---------------------------------------------------

    def save_exemption(self, exemption: Exemption) -> Deferred[Exemption]:
        """See :meth:`policyd.store.Store.save_exemption`."""

        async def work() -> Exemption:
            saved = exemption
            if not saved.id:
                saved = attrs.evolve(saved, id=int(await self.client.incr(EXEMPTION_SEQUENCE)))
            await self.client.hset(EXEMPTIONS, str(saved.id), json.dumps(attrs.asdict(saved)))
            return saved

        return self._call(work, "save exemption")

    def exemption(self, exemption_id: int) -> Deferred[Exemption | None]:
        """See :meth:`policyd.store.Store.exemption`."""

        async def work() -> Exemption | None:
            data = await self.client.hget(EXEMPTIONS, str(exemption_id))
            return None if data is None else Exemption(**json.loads(data))

        return self._call(work, "exemption")

    def exemptions(self) -> Deferred[list[Exemption]]:
        """See :meth:`policyd.store.Store.exemptions`."""

        async def work() -> list[Exemption]:
            found = [Exemption(**json.loads(v)) for v in (await self.client.hvals(EXEMPTIONS))]
            return sorted(found, key=lambda e: e.id)

        return self._call(work, "exemptions")
