"""The quota's hot path in Redis: counting recipients, blocks, accounts seen, pruning."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.exceptions import NoScriptError, RedisError
from twisted.internet.defer import Deferred

from policyd.store import (
    MAX_BLOCK_CLIENTS,
    Admission,
    Block,
    Charge,
    Outcome,
)
from policyd.store.redis.connection import RedisConnection, milliseconds
from policyd.store.redis.schema import (
    ACCOUNTS,
    ACTIVE,
    ADMIT,
    ADMIT_BATCH,
    ADMIT_EARLY,
    ADMIT_SHARED,
    BLOCK_FIELDS,
    BLOCKS,
    PRUNE_BATCH,
    UNREADABLE,
    PendingAdmit,
    block_key,
    instance_key,
    window_key,
)
from policyd.store.redis.wire import AdmitLine


class RedisCounts(RedisConnection):
    """Counts and blocks (:class:`policyd.store.Counts`); one Lua script per admission, pipelined per turn."""

    # --- quota ------------------------------------------------------------

    def admit(self, charge: Charge) -> Deferred[Admission]:
        """See :meth:`policyd.store.Store.admit`.

        Recipients counted in one turn of the event loop go to Redis
        together, as one call of the admit script: one round trip, one
        command, still atomic (the script counts them in order, so the
        exact limit holds across processes), and each recipient gets its
        own answer.  A turn that reads many requests sends them in calls
        of :data:`ADMIT_EARLY` as they come: Redis works on the first while
        the server reads the rest, instead of all waiting for each other.
        """
        waiting: Deferred[Admission] = Deferred()
        admits = self._admits
        admits.append((charge, waiting))
        if len(admits) == 1:
            asyncio.get_running_loop().call_soon(self._send_admits)
        elif len(admits) >= ADMIT_EARLY:
            # Many clients at once: the first recipients go now, so Redis counts
            # them while the rest of the turn is read, rather than after it.
            self._send_admits()
        return waiting

    def _send_admits(self) -> None:
        """Send the recipients counted since the last turn, at most :data:`ADMIT_BATCH` in one script call."""
        admits = self._admits
        if not admits:
            return
        command, taken = _admit_command(self._admit.sha, admits)
        batch, self._admits = admits[:taken], admits[taken:]
        if self._admits:
            asyncio.get_running_loop().call_soon(self._send_admits)

        def answered(replies: list[Any]) -> None:
            if not isinstance(replies, list) or len(replies) != len(batch):
                failed(self._error("admit", ValueError(f"{len(batch)} recipients, reply {replies!r:.60}")))
                return
            for (charge, waiting), reply in zip(batch, replies, strict=True):
                if reply.__class__ is int:
                    waiting.callback(Admission(Outcome.ALLOWED, reply))
                    continue
                try:
                    if reply[0] == "error":
                        waiting.errback(self._error("admit", RedisError(reply[1])))
                        continue
                    admission = _admission(charge.account, reply)
                except UNREADABLE as error:
                    waiting.errback(self._error("admit", error))
                    continue
                waiting.callback(admission)

        def failed(failure: Any) -> None:
            for _, waiting in batch:
                waiting.errback(failure)

        line = self._admit_line()
        if line is not None:
            line.call(command, _LOAD_ADMIT).addCallbacks(answered, failed)
        else:
            self._call(lambda: self._admit_batch(command), "admit").addCallbacks(answered, failed)

    def _admit_line(self) -> AdmitLine | None:
        """The store's own connection for admissions (None: TLS or Sentinel, through the pool)."""
        line = self._line
        if line is None and self._line_options is not None:
            from twisted.internet import reactor  # installed by now: the server runs on it

            line = self._line = AdmitLine(reactor, self._line_options, self.deadline, self.name, self._error)
        return line

    async def _admit_batch(self, command: bytes) -> Any:
        """The admit script's replies; the script is loaded once if Redis lost it.

        The command is packed once by hiredis and sent on a connection of
        the pool: packing a script call's arguments in Python cost more
        than everything else policyd does for a recipient.
        """
        try:
            return await self._send_packed(command)
        except NoScriptError:
            await self.client.script_load(ADMIT)
            return await self._send_packed(command)

    async def _send_packed(self, command: bytes) -> Any:
        """Send one packed command on a pooled connection and read its reply."""
        pool = self.client.connection_pool
        connection = await pool.get_connection()
        try:
            # Both disconnect on any error but a reply of Redis's, so a
            # connection never goes back to the pool in the middle of a reply.
            await connection.send_packed_command(command, check_health=False)
            return await connection.read_response()
        finally:
            await pool.release(connection)

    def give_back(self, account: str, instance: str, since: float | None = None) -> Deferred[int]:
        """See :meth:`policyd.store.Store.give_back`."""

        async def work() -> int:
            keys = [window_key(account), instance_key(account, instance)]
            return int(await self._give_back(keys=keys, args=[]))

        return self._call(work, "give back")

    def usage(self, account: str, *, now: float, window: float) -> Deferred[int]:
        """See :meth:`policyd.store.Store.usage`."""

        async def work() -> int:
            return int(await self.client.zcount(window_key(account), f"({now - window!r}", "+inf"))

        return self._call(work, "usage")

    def busiest(self, *, now: float, window: float, limit: int = 20) -> Deferred[list[tuple[str, int]]]:
        """See :meth:`policyd.store.Store.busiest`."""
        cutoff = f"({now - window!r}"

        async def work() -> list[tuple[str, int]]:
            if limit <= 0:
                return []
            accounts = cast(list[str], await self.client.zrangebyscore(ACTIVE, cutoff, "+inf"))
            counts: list[tuple[str, int]] = []
            for start in range(0, len(accounts), 1000):
                chunk = accounts[start : start + 1000]
                pipe = self.client.pipeline(transaction=False)
                for account in chunk:
                    pipe.zcount(window_key(account), cutoff, "+inf")
                found = await pipe.execute()
                counts += [(a, int(n)) for a, n in zip(chunk, found, strict=True) if int(n)]
            return sorted(counts, key=lambda c: (-c[1], c[0]))[:limit]

        return self._call(work, "busiest")

    # --- blocks -------------------------------------------------------------

    def block_of(self, account: str, *, now: float) -> Deferred[Block | None]:
        """See :meth:`policyd.store.Store.block_of`."""

        async def work() -> Block | None:
            fields = cast(list[str | None], await self.client.hmget(block_key(account), list(BLOCK_FIELDS)))
            if fields[0] is None or fields[1] is None or float(fields[1]) <= now:
                return None
            return _block(account, fields)

        return self._call(work, "block look-up")

    def blocks(self, *, now: float) -> Deferred[list[Block]]:
        """See :meth:`policyd.store.Store.blocks`."""

        async def work() -> list[Block]:
            accounts = cast(list[str], await self.client.zrange(BLOCKS, 0, -1))
            pipe = self.client.pipeline(transaction=False)
            for account in accounts:
                pipe.hmget(block_key(account), list(BLOCK_FIELDS))
            found = await pipe.execute() if accounts else []
            live = [
                _block(account, fields)
                for account, fields in zip(accounts, found, strict=True)
                if fields[0] is not None and float(fields[1]) > now
            ]
            return sorted(live, key=lambda b: (b.since, b.account))

        return self._call(work, "list blocks")

    def block(self, block: Block) -> Deferred[Block]:
        """See :meth:`policyd.store.Store.block`."""

        async def work() -> Block:
            await self._put_block(
                keys=[block_key(block.account), BLOCKS],
                args=[
                    repr(block.since),
                    repr(block.until),
                    block.reason,
                    block.count,
                    json.dumps(list(block.clients)),
                    block.by,
                    milliseconds(block.until - block.since),
                    block.account,
                ],
            )
            return block

        return self._call(work, "block")

    def unblock(self, account: str, *, now: float) -> Deferred[Block | None]:
        """See :meth:`policyd.store.Store.unblock`."""

        async def work() -> Block | None:
            fields = await self._unblock(
                keys=[block_key(account), window_key(account), ACTIVE, BLOCKS],
                args=[repr(now), account],
            )
            return _block(account, fields) if fields else None

        return self._call(work, "unblock")

    def note_account(self, account: str, *, now: float) -> Deferred[None]:
        """See :meth:`policyd.store.Store.note_account`.

        The accounts noted in one turn are written together, in one HSET on
        the admissions' connection (where there is one).
        """
        if self._admit_line() is None:

            async def work() -> None:
                await self.client.hset(ACCOUNTS, account, repr(now))

            return self._call(work, "note account")
        waiting: Deferred[None] = Deferred()
        self._notes.append((account, now, waiting))
        if len(self._notes) == 1:
            asyncio.get_running_loop().call_soon(self._send_notes)
        return waiting

    def _send_notes(self) -> None:
        """Write the accounts noted since the last turn, at most :data:`ADMIT_BATCH` in one HSET."""
        batch, self._notes = self._notes[:ADMIT_BATCH], self._notes[ADMIT_BATCH:]
        if self._notes:
            asyncio.get_running_loop().call_soon(self._send_notes)
        line = self._admit_line()
        if not batch or line is None:
            return
        fields: list[bytes | str] = []
        for account, now, _ in batch:
            fields += (_text(account), repr(now))
        command = cast(bytes, hiredis.pack_command(("HSET", _ACCOUNTS, *fields)))  # type: ignore[arg-type]

        def written(_: object) -> None:
            for *_, waiting in batch:
                waiting.callback(None)

        def failed(failure: Any) -> None:
            for *_, waiting in batch:
                waiting.errback(failure)

        line.call(command, b"", what="note account").addCallbacks(written, failed)

    def account_seen(self, account: str) -> Deferred[bool]:
        """See :meth:`policyd.store.Store.account_seen`."""

        async def work() -> bool:
            return bool(await self.client.hexists(ACCOUNTS, account))

        return self._call(work, "account seen")

    # --- housekeeping -----------------------------------------------------------

    def prune(self, *, now: float, window: float) -> Deferred[int]:
        """See :meth:`policyd.store.Store.prune`.

        Only accounts whose newest recipient has left the window are read,
        :data:`PRUNE_BATCH` at a time: their windows go, and they leave the
        index of active accounts, so the next look finds the next ones.
        Reading every active account each time cost a list of all of them
        (8 MB for 100,000) and a script call per 200 every few seconds; the
        window of an account still sending is trimmed by its own next
        admission, and every count reads only the window anyway.  Each batch
        is atomic, the whole is not (and need not be); the deadline applies
        to the whole, and what one run leaves, the next one takes.
        """
        cutoff = repr(now - window)

        async def work() -> int:
            removed = 0
            stale = int(await self.client.zcount(ACTIVE, "-inf", cutoff))
            # As many batches as there were stale accounts: should the script leave one in
            # the index, the loop still ends (the next run takes it again).
            for _ in range(-(-stale // PRUNE_BATCH)):
                chunk = cast(
                    list[str], await self.client.zrangebyscore(ACTIVE, "-inf", cutoff, start=0, num=PRUNE_BATCH)
                )
                if not chunk:
                    break
                removed += int(await self._prune_windows(keys=[ACTIVE, *map(window_key, chunk)], args=[cutoff, *chunk]))
            blocked = cast(list[str], await self.client.zrange(BLOCKS, 0, -1))
            for start in range(0, len(blocked), PRUNE_BATCH):
                chunk = blocked[start : start + PRUNE_BATCH]
                await self._prune_blocks(keys=[BLOCKS, *map(block_key, chunk)], args=[repr(now), *chunk])
            return removed

        return self._call(work, "prune")


def _text(value: str) -> bytes:
    """Text as Redis gets it: UTF-8, the protocol's lone surrogates back to their bytes."""
    return value.encode("utf-8", "surrogateescape")


#: SCRIPT LOAD of the admit script, packed once.
_LOAD_ADMIT = cast(bytes, hiredis.pack_command(("SCRIPT", "LOAD", ADMIT)))  # type: ignore[arg-type]
#: The shared keys of the admit script, encoded once.
_SHARED_KEYS = [_text(key) for key in ADMIT_SHARED]
_MAX_CLIENTS = str(MAX_BLOCK_CLIENTS).encode()
_ACCOUNTS = _text(ACCOUNTS)


def _admit_command(sha: str, admits: Sequence[PendingAdmit]) -> tuple[bytes, int]:
    """One EVALSHA of the admit script for the first recipients of ``admits``, packed for the wire,
    and how many it counts.

    It takes at most :data:`ADMIT_BATCH` recipients, and only those with the
    first one's window and block length (they differ only across a reload):
    those go once, with the batch.  A reason goes with the first recipient
    that has it; one with the same reason as the recipient before sends ''.
    """
    first = admits[0][0]
    window, block_for = first.window, first.block_for
    args: list[bytes | str | int] = []
    reason: str | None = None
    taken = 0
    for charge, _ in admits:
        if taken == ADMIT_BATCH or charge.window != window or charge.block_for != block_for:
            break
        taken += 1
        if charge.reason is reason:
            given = b""
        else:
            reason = charge.reason
            given = b"=" + _text(reason)
        notify = charge.notify
        args += (
            _text(charge.account),
            _text(charge.instance),
            _text(charge.client),
            repr(charge.now),
            charge.limit,
            given,
            len(notify),
        )
        if notify:
            args += map(_text, notify)
    head = (
        "EVALSHA",
        sha,
        len(_SHARED_KEYS),
        *_SHARED_KEYS,
        _MAX_CLIENTS,
        repr(window),
        repr(block_for),
        milliseconds(window),
        milliseconds(block_for),
        taken,
    )
    # hiredis's stub types the tuple as having one element.
    return cast(bytes, hiredis.pack_command((*head, *args))), taken  # type: ignore[arg-type]


def _admission(account: str, reply: Sequence[Any]) -> Admission:
    """The admit script's reply for a recipient not let through: the block (already there, or new)."""
    block = _block(account, reply[1:])
    if reply[0] == "blocked":
        return Admission(Outcome.BLOCKED, block.count, block)
    return Admission(Outcome.NEWLY_BLOCKED, block.count, block)


def _block(account: str, fields: Sequence[Any]) -> Block:
    """A block from its hash fields (since, until, reason, count, clients, by)."""
    since, until, reason, count, clients, by = fields
    return Block(account, float(since), float(until), reason, int(count), tuple(json.loads(clients)), by)
