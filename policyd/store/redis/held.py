"""Held mail and recipients' choices in Redis."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred

from policyd.store import (
    Quarantined,
)
from policyd.store.redis.connection import RedisConnection, milliseconds
from policyd.store.redis.schema import (
    DIGEST_MARK,
    NOTICE_SEQUENCE,
    OUTBOX,
    PREFERENCES,
    QUARANTINE,
    QUARANTINE_SEQUENCE,
    RELEASING,
)


class RedisHeldMail(RedisConnection):
    """The quarantine, release claims, digest mark and choices (:class:`policyd.store.HeldMail`, :class:`~policyd.store.Choices`)."""


    # --- quarantine and preferences ------------------------------------------------

    def quarantine(self, entry: Quarantined, message: bytes) -> Deferred[Quarantined]:
        """See :meth:`policyd.store.Store.quarantine`."""

        async def work() -> Quarantined:
            held = attrs.evolve(entry, id=int(await self.client.incr(QUARANTINE_SEQUENCE)))
            key = f"{QUARANTINE}:{held.id}"
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(key, mapping={"entry": json.dumps(held.as_dict()), "message": message})
            pipe.pexpire(key, milliseconds(held.until - held.at))
            pipe.zadd(QUARANTINE, {str(held.id): repr(held.until)})
            await pipe.execute()
            return held

        return self._call(work, "quarantine")

    def quarantined(self, entry_id: int, *, now: float) -> Deferred[tuple[Quarantined, bytes] | None]:
        """See :meth:`policyd.store.Store.quarantined`."""

        async def work() -> tuple[Quarantined, bytes] | None:
            entry, message = cast(
                list[str | None], await self.client.hmget(f"{QUARANTINE}:{entry_id}", ["entry", "message"])
            )
            if entry is None or message is None:
                return None
            held = _held(entry)
            if held.until <= now:
                return None
            # Values come back decoded with surrogateescape: encoding the same
            # way gives back the exact bytes stored.
            return held, message.encode("utf-8", "surrogateescape")

        return self._call(work, "quarantined message")

    def quarantine_list(
        self, *, now: float, recipient: str | None = None, limit: int = 1000, since: float | None = None
    ) -> Deferred[list[Quarantined]]:
        """See :meth:`policyd.store.Store.quarantine_list`."""

        async def work() -> list[Quarantined]:
            ids = cast(list[str], await self.client.zrangebyscore(QUARANTINE, f"({now!r}", "+inf"))
            found: list[Quarantined] = []
            for start in range(0, len(ids), 1000):
                pipe = self.client.pipeline(transaction=False)
                for entry_id in ids[start : start + 1000]:
                    pipe.hget(f"{QUARANTINE}:{entry_id}", "entry")
                found += [_held(e) for e in await pipe.execute() if e is not None]
            chosen = [
                e
                for e in found
                if (recipient is None or e.recipient == recipient) and (since is None or e.at > since)
            ]
            return sorted(chosen, key=lambda e: (-e.at, -e.id))[: max(limit, 0)]

        return self._call(work, "quarantine list")

    def quarantine_delete(self, entry_id: int) -> Deferred[bool]:
        """See :meth:`policyd.store.Store.quarantine_delete`."""

        async def work() -> bool:
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(f"{QUARANTINE}:{entry_id}")
            pipe.zrem(QUARANTINE, str(entry_id))
            pipe.delete(f"{RELEASING}:{entry_id}")
            deleted, _, _ = await pipe.execute()
            return bool(deleted)

        return self._call(work, "quarantine delete")

    def claim_release(self, entry_id: int, *, now: float, lease: float) -> Deferred[bool]:
        """See :meth:`policyd.store.Store.claim_release`."""

        async def work() -> bool:
            taken = await self._claim_release(
                keys=[f"{RELEASING}:{entry_id}"], args=[repr(now), repr(now + lease), milliseconds(lease)]
            )
            return bool(int(taken))

        return self._call(work, "claim release")

    def end_claim(self, entry_id: int) -> Deferred[None]:
        """See :meth:`policyd.store.Store.end_claim`."""

        async def work() -> None:
            await self.client.delete(f"{RELEASING}:{entry_id}")

        return self._call(work, "end release claim")

    def quarantine_expire(self, *, now: float) -> Deferred[int]:
        """See :meth:`policyd.store.Store.quarantine_expire`."""

        async def work() -> int:
            ids = cast(list[str], await self.client.zrangebyscore(QUARANTINE, "-inf", repr(now)))
            if not ids:
                return 0
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(*(f"{QUARANTINE}:{i}" for i in ids))
            pipe.zrem(QUARANTINE, *ids)
            await pipe.execute()
            return len(ids)

        return self._call(work, "quarantine expiry")

    def set_preference(self, address: str, spam: str | None) -> Deferred[None]:
        """See :meth:`policyd.store.Store.set_preference`."""

        async def work() -> None:
            if spam is None:
                await self.client.hdel(PREFERENCES, address)
            else:
                await self.client.hset(PREFERENCES, address, spam)

        return self._call(work, "set preference")

    def preferences(self, addresses: Sequence[str] | None = None) -> Deferred[dict[str, str]]:
        """See :meth:`policyd.store.Store.preferences`."""

        async def work() -> dict[str, str]:
            if addresses is None:
                return dict(sorted(cast(dict[str, str], await self.client.hgetall(PREFERENCES)).items()))
            wanted = list(dict.fromkeys(addresses))
            if not wanted:
                return {}
            values = cast(list[str | None], await self.client.hmget(PREFERENCES, wanted))
            return {a: v for a, v in zip(wanted, values, strict=True) if v is not None}

        return self._call(work, "preferences")

    def digest_mark(self) -> Deferred[float | None]:
        """See :meth:`policyd.store.Store.digest_mark`."""

        async def work() -> float | None:
            value = await self.client.get(DIGEST_MARK)
            return None if value is None else float(value)

        return self._call(work, "digest mark")

    def queue_digest(
        self, *, since: float | None, until: float, notices: Sequence[tuple[str, dict[str, Any]]]
    ) -> Deferred[bool]:
        """See :meth:`policyd.store.Store.queue_digest`."""
        args: list[str] = ["" if since is None else repr(since), repr(until)]
        for recipient, payload in notices:
            args += [recipient, json.dumps(payload, separators=(",", ":"))]

        async def work() -> bool:
            done = await self._queue_digest(keys=[DIGEST_MARK, OUTBOX, NOTICE_SEQUENCE], args=args)
            return bool(int(done))

        return self._call(work, "queue digest")


def _held(text: str) -> Quarantined:
    """A quarantine entry from its JSON description."""
    data = json.loads(text)
    data["reasons"] = tuple(data.get("reasons", ()))
    return Quarantined(**data)
