"""The shared store: one Redis server (or a Sentinel-managed one) for several mail hosts.

Every read-check-write runs inside Redis as a Lua script, so ``policyd serve``
processes on several hosts never let an account past its limit, whatever the
concurrency.  Scripts are registered once and run by ``EVALSHA``; when Redis
has forgotten them (a restart, ``SCRIPT FLUSH``, a failover) redis-py loads
them again and retries (``NOSCRIPT`` fallback).

Keys, all under ``policyd:``:

``policyd:window:<account>``
    sorted set of the recipients counted in the window, scored by time.  A
    member is ``<sequence>|<length of instance>|<instance><client>``: the
    sequence (from ``policyd:seq``) keeps members unique even at the same
    instant and orders them; the client is what a block lists; the instance
    keeps each member self-describing.  Expires one window after the last
    recipient counted.
``policyd:instance:<length of account>:<account>:<instance>``
    set of the members one SMTP transaction added, so that give-back
    removes them without scanning the window; expires with the window.
``policyd:block:<account>``
    hash of the live block; expires when the block ends.
``policyd:active``
    sorted set of account -> time of its last counted recipient, for
    :meth:`RedisStore.busiest` and :meth:`RedisStore.prune`.
``policyd:blocks``
    sorted set of account -> block start, to list blocks without ``KEYS``.
``policyd:audit``
    list of JSON audit entries, capped at :data:`AUDIT_CAP`.
``policyd:exemptions`` and ``policyd:exemption-seq``
    hash of exemption id -> JSON exemption; ids from the sequence.
``policyd:accounts``
    hash of account -> last time it was noted authenticating.
``policyd:quarantine``, ``policyd:quarantine:<id>`` and ``policyd:quarantine-seq``
    held messages: a sorted set of id -> expiry time, and a hash per
    message (``entry``: its JSON description, ``message``: the bytes) that
    expires by itself at the end of its retention.
``policyd:releasing:<id>``
    a release in progress of held message ``id``: when its claim ends (set by
    a script only when no live claim exists), so two presses of a release
    button deliver once.
``policyd:preferences``
    hash of recipient address -> spam choice (``inbox`` or ``quarantine``).
``policyd:outbox`` and ``policyd:outbox:<id>``
    the notification outbox: a sorted set of notice id -> when it is due,
    and a hash per notice (kind, recipient, JSON payload, created, attempts,
    last error); ids come from ``policyd:notice-seq``.  A sent notice leaves
    both.
``policyd:digest-mark``
    up to when held mail has been in a quarantine digest (the time, as text).

Times are those the caller passes (``now``), so tests may drive a fake
clock; key lifetimes are set relative to them (``PEXPIRE``), never as
absolute instants, so a fake clock does not make Redis drop keys early.

Redis Cluster is not supported: an admission reads and writes the
account's keys and the shared indexes in one script, which Cluster allows
only inside one hash slot, so every key would sit on one node anyway.  One
Redis answers tens of thousands of admissions a second; Sentinel gives it a
standby.

The client is redis-py's ``redis.asyncio`` running on Twisted's asyncio
reactor.  Each operation is bounded by ``deadline`` with
:func:`asyncio.wait_for`; a Redis error or a timeout fails the Deferred with
:class:`~policyd.errors.StoreError`.  After an outage the pool reconnects on
the next command: nothing needs restarting.
"""

from __future__ import annotations

import asyncio
import json
import math
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import attrs
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError
from twisted.internet.defer import Deferred

from policyd.errors import ConfigError, StoreError
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

#: Every key starts with this, so policyd can share a Redis database.
PREFIX = "policyd:"
_ACTIVE = PREFIX + "active"
_BLOCKS = PREFIX + "blocks"
_SEQUENCE = PREFIX + "seq"
_AUDIT = PREFIX + "audit"
_OUTBOX = PREFIX + "outbox"
_EXEMPTIONS = PREFIX + "exemptions"
_EXEMPTION_SEQUENCE = PREFIX + "exemption-seq"
_ACCOUNTS = PREFIX + "accounts"
_NOTICE_SEQUENCE = PREFIX + "notice-seq"
_QUARANTINE = PREFIX + "quarantine"
_QUARANTINE_SEQUENCE = PREFIX + "quarantine-seq"
_PREFERENCES = PREFIX + "preferences"
_DIGEST_MARK = PREFIX + "digest-mark"
_RELEASING = PREFIX + "releasing"

#: Audit entries kept: admin actions are a few a day, so this is years of
#: history, while the list stays bounded in memory.
AUDIT_CAP = 100_000

#: Connections to Redis per process.  Redis runs commands one at a time, so
#: more connections would not answer sooner; operations beyond this many wait
#: for a free connection (within their deadline) instead of failing.
CONNECTIONS = 32

#: Most recipients counted in one pipeline.
ADMIT_BATCH = 256

#: A recipient waiting for its pipeline: account, script keys and arguments, its answer.
_Admit = tuple[str, list[str], list[Any], Deferred[Admission]]

#: Errors of reading a reply that is not what our scripts return.
_UNREADABLE = (ValueError, TypeError, KeyError, IndexError)

#: Accounts handled by one prune script: bounds how long one script holds
#: Redis (which runs scripts one at a time) when many accounts are active.
PRUNE_BATCH = 200

_BLOCK_FIELDS = ("since", "until", "reason", "count", "clients", "by")


def _window_key(account: str) -> str:
    return f"{PREFIX}window:{account}"


def _instance_key(account: str, instance: str) -> str:
    # The length keeps ("a:b", "c") and ("a", "b:c") apart.
    return f"{PREFIX}instance:{len(account)}:{account}:{instance}"


def _block_key(account: str) -> str:
    return f"{PREFIX}block:{account}"


# --- Lua ----------------------------------------------------------------------
#
# Numbers from Python travel as strings (repr of a float is exact) and are
# handed to Redis unchanged: Lua would print them with 14 digits only.

_PRELUDE = """
local function split(member)
  local a = string.find(member, '|', 1, true)
  local b = string.find(member, '|', a + 1, true)
  local n = tonumber(string.sub(member, a + 1, b - 1))
  return string.sub(member, b + 1, b + n), string.sub(member, b + n + 1)
end
"""

#: KEYS: window, block, sequence, active, blocks, instance, outbox, notice sequence.
#: ARGV: now, cutoff, limit, until, reason, instance, client, window ms,
#: block ms, max clients, account, then the addresses to notify of a block.
_ADMIT = (
    _PRELUDE
    + """
local block = redis.call('HMGET', KEYS[2], 'since', 'until', 'reason', 'count', 'clients', 'by')
if block[1] then
  if tonumber(block[2]) > tonumber(ARGV[1]) then
    return {'blocked', block[1], block[2], block[3], block[4], block[5], block[6]}
  end
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[5], ARGV[11])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local count = redis.call('ZCARD', KEYS[1])
if count < tonumber(ARGV[3]) then
  local seq = redis.call('INCR', KEYS[3])
  local member = string.format('%016x', seq) .. '|' .. #ARGV[6] .. '|' .. ARGV[6] .. ARGV[7]
  redis.call('ZADD', KEYS[1], ARGV[1], member)
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
  redis.call('SADD', KEYS[6], member)
  redis.call('PEXPIRE', KEYS[6], ARGV[8])
  redis.call('ZADD', KEYS[4], 'GT', ARGV[1], ARGV[11])
  redis.call('PEXPIRE', KEYS[4], ARGV[8])
  return {'allowed', count + 1}
end
local seen, clients = {}, {}
for _, member in ipairs(redis.call('ZREVRANGE', KEYS[1], 0, -1)) do
  local _, client = split(member)
  if client ~= '' and not seen[client] then
    seen[client] = true
    clients[#clients + 1] = cjson.encode(client)
    if #clients >= tonumber(ARGV[10]) then break end
  end
end
local listed = '[' .. table.concat(clients, ',') .. ']'
redis.call('HSET', KEYS[2], 'since', ARGV[1], 'until', ARGV[4], 'reason', ARGV[5],
           'count', count, 'clients', listed, 'by', 'policyd')
redis.call('PEXPIRE', KEYS[2], ARGV[9])
redis.call('ZADD', KEYS[5], ARGV[1], ARGV[11])
local payload = '{"account":' .. cjson.encode(ARGV[11]) .. ',"since":' .. ARGV[1] ..
  ',"until":' .. ARGV[4] .. ',"reason":' .. cjson.encode(ARGV[5]) .. ',"count":' .. count ..
  ',"clients":' .. listed .. ',"by":"policyd"}'
for i = 12, #ARGV do
  local id = redis.call('INCR', KEYS[8])
  redis.call('HSET', KEYS[7] .. ':' .. id, 'kind', 'block', 'recipient', ARGV[i],
             'payload', payload, 'created', ARGV[1], 'attempts', 0, 'last_error', '')
  redis.call('ZADD', KEYS[7], ARGV[1], id)
end
return {'newly-blocked', ARGV[1], ARGV[4], ARGV[5], count, listed, 'policyd'}
"""
)

#: KEYS: outbox.  ARGV: now, lease end, limit.
_CLAIM = """
local claimed = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])) do
  local key = KEYS[1] .. ':' .. id
  redis.call('ZADD', KEYS[1], ARGV[2], id)
  redis.call('HINCRBY', key, 'attempts', 1)
  local fields = redis.call('HMGET', key, 'kind', 'recipient', 'payload', 'created', 'attempts', 'last_error')
  claimed[#claimed + 1] = {id, fields[1], fields[2], fields[3], fields[4], fields[5], fields[6]}
end
return claimed
"""

#: KEYS: outbox.  ARGV: id, retry time, error.
_FAILED = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
  redis.call('HSET', KEYS[1] .. ':' .. ARGV[1], 'last_error', ARGV[3])
end
return 1
"""

#: KEYS: digest mark, outbox, notice sequence.  ARGV: mark expected ('' for none),
#: new mark, then recipient and JSON payload of each digest.
_QUEUE_DIGEST = """
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
for i = 3, #ARGV, 2 do
  local id = redis.call('INCR', KEYS[3])
  redis.call('HSET', KEYS[2] .. ':' .. id, 'kind', 'digest', 'recipient', ARGV[i],
             'payload', ARGV[i + 1], 'created', ARGV[2], 'attempts', 0, 'last_error', '')
  redis.call('ZADD', KEYS[2], ARGV[2], id)
end
return 1
"""

#: KEYS: release claim.  ARGV: now, claim end, lifetime in ms.  The end is
#: compared with the caller's now (fake clocks in tests); the lifetime only
#: lets Redis forget the key.
_CLAIM_RELEASE = """
local until_ = redis.call('GET', KEYS[1])
if until_ and tonumber(until_) > tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""

#: KEYS: window, instance.
_GIVE_BACK = """
local given = 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  given = given + redis.call('ZREM', KEYS[1], member)
end
redis.call('DEL', KEYS[2])
return given
"""

#: KEYS: block, blocks.  ARGV: since, until, reason, count, clients, by, ms, account.
_PUT_BLOCK = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'since', ARGV[1], 'until', ARGV[2], 'reason', ARGV[3],
           'count', ARGV[4], 'clients', ARGV[5], 'by', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[8])
return 1
"""

#: KEYS: block, window, active, blocks.  ARGV: now, account.
_UNBLOCK = """
local block = redis.call('HMGET', KEYS[1], 'since', 'until', 'reason', 'count', 'clients', 'by')
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[2])
if block[1] and tonumber(block[2]) > tonumber(ARGV[1]) then
  return block
end
return {}
"""

#: KEYS: active, then windows.  ARGV: cutoff, then the windows' accounts.
_PRUNE_WINDOWS = """
local removed = 0
for i = 2, #KEYS do
  removed = removed + redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[1])
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
"""

#: KEYS: blocks, then block keys.  ARGV: now, then the blocks' accounts.
_PRUNE_BLOCKS = """
for i = 2, #KEYS do
  local until_ = redis.call('HGET', KEYS[i], 'until')
  if not until_ or tonumber(until_) <= tonumber(ARGV[1]) then
    redis.call('DEL', KEYS[i])
    redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return 1
"""


# --- URLs -----------------------------------------------------------------------


def describe_url(url: str) -> str:
    """The server a store URL names, for messages: no password, no query.

    >>> describe_url("redis://:secret@10.0.0.5:6380/2?password=x")
    'redis://10.0.0.5:6380/2'
    """
    scheme, _, rest = url.partition("://")
    rest = rest.split("?", 1)[0]
    where = rest.rpartition("@")[2]
    if scheme == "unix":
        return f"unix://{where}"
    return f"{scheme}://{where}"


def _ms(seconds: float) -> int:
    """A key lifetime in milliseconds, at least 1 (PEXPIRE 0 would delete at once)."""
    return max(1, math.ceil(seconds * 1000))


def _one_line(error: BaseException, secrets: Sequence[str]) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _client_options(deadline: float, connections: int) -> dict[str, Any]:
    """Options shared by every connection the store opens."""
    return {
        "max_connections": connections,
        # Lossless round trip of any text, including the lone surrogates the
        # protocol uses for bytes that are not UTF-8.
        "encoding": "utf-8",
        "encoding_errors": "surrogateescape",
        "decode_responses": True,
        "socket_timeout": deadline,
        "socket_connect_timeout": deadline,
        "client_name": "policyd",
        # No blind retry: a counting script whose reply was lost must not run
        # twice.  A pooled connection closed by a restart is still detected
        # and reopened before a command is sent, so recovery needs no retry.
        "retry": Retry(NoBackoff(), 0),
    }


def _check_url(url: str) -> None:
    """What redis-py would silently ignore or default: a missing host, a bad database.

    :raises ValueError: naming the problem.
    """
    parsed = urllib.parse.urlsplit(url)
    db = urllib.parse.parse_qs(parsed.query).get("db", [""])[0]
    if parsed.scheme != "unix":
        if not parsed.hostname:
            raise ValueError("no host")
        parsed.port  # noqa: B018 - raises ValueError for a bad port
        db = db or parsed.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"database {db!r} is not a number")


class _Sentinel:
    """What ``redis+sentinel://`` parses into."""

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        netloc = parsed.netloc
        credentials, at, hosts = netloc.rpartition("@")
        self.username: str | None = None
        self.password: str | None = None
        if at:
            user, colon, password = credentials.partition(":")
            if colon:
                self.username = urllib.parse.unquote(user) or None
                self.password = urllib.parse.unquote(password) or None
            else:
                self.password = urllib.parse.unquote(user) or None
        self.sentinels: list[tuple[str, int]] = []
        for item in hosts.split(","):
            host, colon, port = item.strip().rpartition(":")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"sentinel {item!r} is not host:port")
            self.sentinels.append((host.strip("[]"), int(port)))
        parts = [p for p in parsed.path.split("/") if p]
        if not parts or len(parts) > 2:
            raise ValueError("expected /service_name or /service_name/db after the sentinels")
        self.service = urllib.parse.unquote(parts[0])
        if len(parts) == 2 and not parts[1].isdigit():
            raise ValueError(f"database {parts[1]!r} is not a number")
        self.db = int(parts[1]) if len(parts) == 2 else 0
        query = urllib.parse.parse_qs(parsed.query)
        unknown = set(query) - {"sentinel_password"}
        if unknown:
            raise ValueError(f"unknown option {sorted(unknown)[0]!r} (only sentinel_password)")
        self.sentinel_password = query.get("sentinel_password", [None])[0]


# --- the store ----------------------------------------------------------------


class RedisStore:
    """State in Redis, shared by every ``policyd serve`` that uses the same server.

    :param url: ``redis://[[user]:password@]host:port/db``, ``rediss://…``
        (TLS), ``unix:///path/to/redis.sock?db=0[&password=…]``, or
        ``redis+sentinel://[password@]host:port[,host:port…]/service_name[/db]``
        (``?sentinel_password=…`` when the sentinels want one too).
    :param deadline: longest wait, in seconds, for one operation
        (``store.deadline``); past it the operation fails with
        :class:`~policyd.errors.StoreError`.
    :param connections: most connections open at once (:data:`CONNECTIONS`).
    :raises ConfigError: when the URL cannot name a Redis server.

    Nothing connects until the first operation: a server started while Redis
    is down answers from its fallback limiter until Redis is back.
    """

    #: Answers at once (memory), within a turn or the busy timeout (SQLite),
    #: or within ``deadline`` (Redis): see :attr:`policyd.store.Store.bounded`.
    bounded = True

    def __init__(self, url: str, deadline: float = 0.5, connections: int = CONNECTIONS) -> None:
        self.deadline = deadline
        # Operations queue here for a connection rather than failing with
        # "Too many connections" when a burst exceeds the pool.
        self._slots = asyncio.Semaphore(connections)
        self.name = describe_url(url)
        self._sentinel: Sentinel | None = None
        self._secrets: list[str] = []
        options = _client_options(deadline, connections)
        try:
            if url.startswith("redis+sentinel://"):
                parsed = _Sentinel(url)
                self._secrets = [s for s in (parsed.password, parsed.sentinel_password) if s]
                sentinel_options = {k: v for k, v in options.items() if k.startswith("socket_")}
                if parsed.sentinel_password:
                    sentinel_options["password"] = parsed.sentinel_password
                self._sentinel = Sentinel(
                    parsed.sentinels,
                    sentinel_kwargs=sentinel_options,
                    username=parsed.username,
                    password=parsed.password,
                    db=parsed.db,
                    **options,
                )
                self.client: redis.asyncio.Redis = self._sentinel.master_for(parsed.service)
            elif url.startswith(("redis://", "rediss://", "unix://")):
                self._secrets = self._url_secrets(url)
                _check_url(url)
                self.client = redis.asyncio.Redis.from_url(url, **options)
            else:
                raise ValueError("not a redis://, rediss://, unix:// or redis+sentinel:// URL")
        except (ValueError, TypeError, RedisError) as error:
            raise ConfigError(
                f"store.url: bad Redis URL {self.name}: {_one_line(error, self._secrets)}"
            ) from None
        register = self.client.register_script
        self._admit = register(_ADMIT)
        self._give_back = register(_GIVE_BACK)
        self._put_block = register(_PUT_BLOCK)
        self._unblock = register(_UNBLOCK)
        self._prune_windows = register(_PRUNE_WINDOWS)
        self._prune_blocks = register(_PRUNE_BLOCKS)
        self._claim = register(_CLAIM)
        self._failed = register(_FAILED)
        self._queue_digest = register(_QUEUE_DIGEST)
        self._claim_release = register(_CLAIM_RELEASE)

        #: Recipients counted this turn, sent together by _send_admits.
        self._admits: list[_Admit] = []

    @staticmethod
    def _url_secrets(url: str) -> list[str]:
        """Passwords in a URL, to keep out of messages."""
        parsed = urllib.parse.urlsplit(url)
        found = [parsed.password] if parsed.password else []
        found += urllib.parse.parse_qs(parsed.query).get("password", [])
        return [urllib.parse.unquote(s) for s in found] + found

    def _call(self, work: Callable[[], Awaitable[T]], what: str) -> Deferred[T]:
        """Run ``work()`` on the asyncio loop within the deadline, as a Deferred."""

        async def limited() -> T:
            async with self._slots:
                return await work()

        async def bounded() -> T:
            try:
                return await asyncio.wait_for(limited(), self.deadline)
            except TimeoutError:
                raise StoreError(
                    f"Redis store {self.name}: no answer within {self.deadline:g}s ({what})"
                ) from None
            except (RedisError, OSError, *_UNREADABLE) as error:
                raise self._error(what, error) from None

        return Deferred.fromFuture(asyncio.ensure_future(bounded()))

    def _error(self, what: str, error: Exception) -> StoreError:
        """The one-line error of an operation that Redis refused or whose reply cannot be read."""
        if isinstance(error, _UNREADABLE):
            # Keys of ours holding something else: the reply cannot be read.
            return StoreError(
                f"Redis store {self.name}: {what}: unexpected data ({type(error).__name__}: "
                f"{_one_line(error, self._secrets)})"
            )
        return StoreError(f"Redis store {self.name}: {what}: {_one_line(error, self._secrets)}")

    # --- quota ------------------------------------------------------------

    def admit(self, charge: Charge) -> Deferred[Admission]:
        """See :meth:`policyd.store.Store.admit`.

        Recipients counted in one turn of the event loop go to Redis
        together, in one pipeline (one round trip, one connection): with one
        script call per recipient, redis-py's cost per call was the limit.
        """
        account = charge.account
        keys = [
            _window_key(account),
            _block_key(account),
            _SEQUENCE,
            _ACTIVE,
            _BLOCKS,
            _instance_key(account, charge.instance),
            _OUTBOX,
            _NOTICE_SEQUENCE,
        ]
        args = [
            repr(charge.now),
            repr(charge.now - charge.window),
            charge.limit,
            repr(charge.now + charge.block_for),
            charge.reason,
            charge.instance,
            charge.client,
            _ms(charge.window),
            _ms(charge.block_for),
            MAX_BLOCK_CLIENTS,
            account,
            *charge.notify,
        ]
        waiting: Deferred[Admission] = Deferred()
        self._admits.append((account, keys, args, waiting))
        if len(self._admits) == 1:
            asyncio.get_running_loop().call_soon(self._send_admits)
        return waiting

    def _send_admits(self) -> None:
        """Send the recipients counted since the last turn, at most :data:`ADMIT_BATCH` in one pipeline."""
        batch, self._admits = self._admits[:ADMIT_BATCH], self._admits[ADMIT_BATCH:]
        if self._admits:
            asyncio.get_running_loop().call_soon(self._send_admits)
        if not batch:
            return

        def answered(replies: list[Any]) -> None:
            for (account, _, _, waiting), reply in zip(batch, replies, strict=True):
                if isinstance(reply, Exception):
                    waiting.errback(self._error("admit", reply))
                    continue
                try:
                    admission = _admission(account, reply)
                except _UNREADABLE as error:
                    waiting.errback(self._error("admit", error))
                    continue
                waiting.callback(admission)

        def failed(failure: Any) -> None:
            for *_, waiting in batch:
                waiting.errback(failure)

        self._call(lambda: self._pipelined_admits(batch), "admit").addCallbacks(answered, failed)

    async def _pipelined_admits(self, batch: list[_Admit]) -> list[Any]:
        """Every script call's reply, or its error; the script is loaded once if Redis lost it."""
        replies = await self._pipeline_admits(batch)
        if any(isinstance(reply, NoScriptError) for reply in replies):
            await self.client.script_load(_ADMIT)
            replies = await self._pipeline_admits(batch)
        return replies

    async def _pipeline_admits(self, batch: list[_Admit]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        sha = self._admit.sha
        for _, keys, args, _ in batch:
            pipe.evalsha(sha, len(keys), *keys, *args)
        return await pipe.execute(raise_on_error=False)

    def give_back(self, account: str, instance: str, since: float | None = None) -> Deferred[int]:
        """See :meth:`policyd.store.Store.give_back`."""

        async def work() -> int:
            keys = [_window_key(account), _instance_key(account, instance)]
            return int(await self._give_back(keys=keys, args=[]))

        return self._call(work, "give back")

    def usage(self, account: str, *, now: float, window: float) -> Deferred[int]:
        """See :meth:`policyd.store.Store.usage`."""

        async def work() -> int:
            return int(await self.client.zcount(_window_key(account), f"({now - window!r}", "+inf"))

        return self._call(work, "usage")

    def busiest(self, *, now: float, window: float, limit: int = 20) -> Deferred[list[tuple[str, int]]]:
        """See :meth:`policyd.store.Store.busiest`."""
        cutoff = f"({now - window!r}"

        async def work() -> list[tuple[str, int]]:
            if limit <= 0:
                return []
            accounts = cast(list[str], await self.client.zrangebyscore(_ACTIVE, cutoff, "+inf"))
            counts: list[tuple[str, int]] = []
            for start in range(0, len(accounts), 1000):
                chunk = accounts[start : start + 1000]
                pipe = self.client.pipeline(transaction=False)
                for account in chunk:
                    pipe.zcount(_window_key(account), cutoff, "+inf")
                found = await pipe.execute()
                counts += [(a, int(n)) for a, n in zip(chunk, found, strict=True) if int(n)]
            return sorted(counts, key=lambda c: (-c[1], c[0]))[:limit]

        return self._call(work, "busiest")

    # --- blocks -------------------------------------------------------------

    def block_of(self, account: str, *, now: float) -> Deferred[Block | None]:
        """See :meth:`policyd.store.Store.block_of`."""

        async def work() -> Block | None:
            fields = cast(list[str | None], await self.client.hmget(_block_key(account), list(_BLOCK_FIELDS)))
            if fields[0] is None or fields[1] is None or float(fields[1]) <= now:
                return None
            return _block(account, fields)

        return self._call(work, "block look-up")

    def blocks(self, *, now: float) -> Deferred[list[Block]]:
        """See :meth:`policyd.store.Store.blocks`."""

        async def work() -> list[Block]:
            accounts = cast(list[str], await self.client.zrange(_BLOCKS, 0, -1))
            pipe = self.client.pipeline(transaction=False)
            for account in accounts:
                pipe.hmget(_block_key(account), list(_BLOCK_FIELDS))
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
                keys=[_block_key(block.account), _BLOCKS],
                args=[
                    repr(block.since),
                    repr(block.until),
                    block.reason,
                    block.count,
                    json.dumps(list(block.clients)),
                    block.by,
                    _ms(block.until - block.since),
                    block.account,
                ],
            )
            return block

        return self._call(work, "block")

    def unblock(self, account: str, *, now: float) -> Deferred[Block | None]:
        """See :meth:`policyd.store.Store.unblock`."""

        async def work() -> Block | None:
            fields = await self._unblock(
                keys=[_block_key(account), _window_key(account), _ACTIVE, _BLOCKS],
                args=[repr(now), account],
            )
            return _block(account, fields) if fields else None

        return self._call(work, "unblock")

    # --- audit ----------------------------------------------------------------

    def record(self, entry: AuditEntry) -> Deferred[None]:
        """See :meth:`policyd.store.Store.record`."""
        line = json.dumps(entry.as_dict(), separators=(",", ":"))

        async def work() -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.rpush(_AUDIT, line)
            pipe.ltrim(_AUDIT, -AUDIT_CAP, -1)
            await pipe.execute()

        return self._call(work, "audit record")

    def audit(self, *, limit: int = 100) -> Deferred[list[AuditEntry]]:
        """See :meth:`policyd.store.Store.audit`."""

        async def work() -> list[AuditEntry]:
            if limit <= 0:
                return []
            # The list holds AUDIT_CAP entries at most; a larger index is out of Redis's range.
            lines = cast(list[str], await self.client.lrange(_AUDIT, -min(limit, AUDIT_CAP), -1))
            return [AuditEntry(**json.loads(line)) for line in lines]

        return self._call(work, "audit")

    # --- notification outbox ------------------------------------------------------

    def claim_notices(self, *, now: float, lease: float, limit: int = 20) -> Deferred[list[Notice]]:
        """See :meth:`policyd.store.Store.claim_notices`."""

        async def work() -> list[Notice]:
            rows = await self._claim(keys=[_OUTBOX], args=[repr(now), repr(now + lease), limit])
            return [
                Notice(int(i), kind, to, json.loads(data), float(created), int(attempts), error)
                for i, kind, to, data, created, attempts, error in rows
            ]

        return self._call(work, "claim notices")

    def notice_sent(self, notice_id: int, *, now: float) -> Deferred[None]:
        """See :meth:`policyd.store.Store.notice_sent`."""

        async def work() -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.zrem(_OUTBOX, notice_id)
            pipe.delete(f"{_OUTBOX}:{notice_id}")
            await pipe.execute()

        return self._call(work, "notice sent")

    def notice_failed(self, notice_id: int, *, retry_at: float, error: str) -> Deferred[None]:
        """See :meth:`policyd.store.Store.notice_failed`."""

        async def work() -> None:
            await self._failed(keys=[_OUTBOX], args=[notice_id, repr(retry_at), error[:500]])

        return self._call(work, "notice failed")

    def pending_notices(self) -> Deferred[int]:
        """See :meth:`policyd.store.Store.pending_notices`."""

        async def work() -> int:
            return int(await self.client.zcard(_OUTBOX))

        return self._call(work, "pending notices")

    # --- exemptions and accounts ---------------------------------------------------

    def save_exemption(self, exemption: Exemption) -> Deferred[Exemption]:
        """See :meth:`policyd.store.Store.save_exemption`."""

        async def work() -> Exemption:
            saved = exemption
            if not saved.id:
                saved = attrs.evolve(saved, id=int(await self.client.incr(_EXEMPTION_SEQUENCE)))
            await self.client.hset(_EXEMPTIONS, str(saved.id), json.dumps(attrs.asdict(saved)))
            return saved

        return self._call(work, "save exemption")

    def exemption(self, exemption_id: int) -> Deferred[Exemption | None]:
        """See :meth:`policyd.store.Store.exemption`."""

        async def work() -> Exemption | None:
            data = await self.client.hget(_EXEMPTIONS, str(exemption_id))
            return None if data is None else Exemption(**json.loads(data))

        return self._call(work, "exemption")

    def exemptions(self) -> Deferred[list[Exemption]]:
        """See :meth:`policyd.store.Store.exemptions`."""

        async def work() -> list[Exemption]:
            found = [Exemption(**json.loads(v)) for v in (await self.client.hvals(_EXEMPTIONS))]
            return sorted(found, key=lambda e: e.id)

        return self._call(work, "exemptions")

    def note_account(self, account: str, *, now: float) -> Deferred[None]:
        """See :meth:`policyd.store.Store.note_account`."""

        async def work() -> None:
            await self.client.hset(_ACCOUNTS, account, repr(now))

        return self._call(work, "note account")

    def account_seen(self, account: str) -> Deferred[bool]:
        """See :meth:`policyd.store.Store.account_seen`."""

        async def work() -> bool:
            return bool(await self.client.hexists(_ACCOUNTS, account))

        return self._call(work, "account seen")

    # --- housekeeping -----------------------------------------------------------

    def prune(self, *, now: float, window: float) -> Deferred[int]:
        """See :meth:`policyd.store.Store.prune`.

        Works in batches of :data:`PRUNE_BATCH` accounts so that no single
        script holds Redis long; each batch is atomic, the whole is not (and
        need not be).  The deadline applies to the whole.
        """

        async def work() -> int:
            removed = 0
            accounts = cast(list[str], await self.client.zrange(_ACTIVE, 0, -1))
            for start in range(0, len(accounts), PRUNE_BATCH):
                chunk = accounts[start : start + PRUNE_BATCH]
                removed += int(
                    await self._prune_windows(
                        keys=[_ACTIVE, *map(_window_key, chunk)], args=[repr(now - window), *chunk]
                    )
                )
            blocked = cast(list[str], await self.client.zrange(_BLOCKS, 0, -1))
            for start in range(0, len(blocked), PRUNE_BATCH):
                chunk = blocked[start : start + PRUNE_BATCH]
                await self._prune_blocks(keys=[_BLOCKS, *map(_block_key, chunk)], args=[repr(now), *chunk])
            return removed

        return self._call(work, "prune")

    # --- quarantine and preferences ------------------------------------------------

    def quarantine(self, entry: Quarantined, message: bytes) -> Deferred[Quarantined]:
        """See :meth:`policyd.store.Store.quarantine`."""

        async def work() -> Quarantined:
            held = attrs.evolve(entry, id=int(await self.client.incr(_QUARANTINE_SEQUENCE)))
            key = f"{_QUARANTINE}:{held.id}"
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(key, mapping={"entry": json.dumps(held.as_dict()), "message": message})
            pipe.pexpire(key, _ms(held.until - held.at))
            pipe.zadd(_QUARANTINE, {str(held.id): repr(held.until)})
            await pipe.execute()
            return held

        return self._call(work, "quarantine")

    def quarantined(self, entry_id: int, *, now: float) -> Deferred[tuple[Quarantined, bytes] | None]:
        """See :meth:`policyd.store.Store.quarantined`."""

        async def work() -> tuple[Quarantined, bytes] | None:
            entry, message = cast(
                list[str | None], await self.client.hmget(f"{_QUARANTINE}:{entry_id}", ["entry", "message"])
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
            ids = cast(list[str], await self.client.zrangebyscore(_QUARANTINE, f"({now!r}", "+inf"))
            found: list[Quarantined] = []
            for start in range(0, len(ids), 1000):
                pipe = self.client.pipeline(transaction=False)
                for entry_id in ids[start : start + 1000]:
                    pipe.hget(f"{_QUARANTINE}:{entry_id}", "entry")
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
            pipe.delete(f"{_QUARANTINE}:{entry_id}")
            pipe.zrem(_QUARANTINE, str(entry_id))
            pipe.delete(f"{_RELEASING}:{entry_id}")
            deleted, _, _ = await pipe.execute()
            return bool(deleted)

        return self._call(work, "quarantine delete")

    def claim_release(self, entry_id: int, *, now: float, lease: float) -> Deferred[bool]:
        """See :meth:`policyd.store.Store.claim_release`."""

        async def work() -> bool:
            taken = await self._claim_release(
                keys=[f"{_RELEASING}:{entry_id}"], args=[repr(now), repr(now + lease), _ms(lease)]
            )
            return bool(int(taken))

        return self._call(work, "claim release")

    def end_claim(self, entry_id: int) -> Deferred[None]:
        """See :meth:`policyd.store.Store.end_claim`."""

        async def work() -> None:
            await self.client.delete(f"{_RELEASING}:{entry_id}")

        return self._call(work, "end release claim")

    def quarantine_expire(self, *, now: float) -> Deferred[int]:
        """See :meth:`policyd.store.Store.quarantine_expire`."""

        async def work() -> int:
            ids = cast(list[str], await self.client.zrangebyscore(_QUARANTINE, "-inf", repr(now)))
            if not ids:
                return 0
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(*(f"{_QUARANTINE}:{i}" for i in ids))
            pipe.zrem(_QUARANTINE, *ids)
            await pipe.execute()
            return len(ids)

        return self._call(work, "quarantine expiry")

    def set_preference(self, address: str, spam: str | None) -> Deferred[None]:
        """See :meth:`policyd.store.Store.set_preference`."""

        async def work() -> None:
            if spam is None:
                await self.client.hdel(_PREFERENCES, address)
            else:
                await self.client.hset(_PREFERENCES, address, spam)

        return self._call(work, "set preference")

    def preferences(self, addresses: Sequence[str] | None = None) -> Deferred[dict[str, str]]:
        """See :meth:`policyd.store.Store.preferences`."""

        async def work() -> dict[str, str]:
            if addresses is None:
                return dict(sorted(cast(dict[str, str], await self.client.hgetall(_PREFERENCES)).items()))
            wanted = list(dict.fromkeys(addresses))
            if not wanted:
                return {}
            values = cast(list[str | None], await self.client.hmget(_PREFERENCES, wanted))
            return {a: v for a, v in zip(wanted, values, strict=True) if v is not None}

        return self._call(work, "preferences")

    def digest_mark(self) -> Deferred[float | None]:
        """See :meth:`policyd.store.Store.digest_mark`."""

        async def work() -> float | None:
            value = await self.client.get(_DIGEST_MARK)
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
            done = await self._queue_digest(keys=[_DIGEST_MARK, _OUTBOX, _NOTICE_SEQUENCE], args=args)
            return bool(int(done))

        return self._call(work, "queue digest")

    def close(self) -> Deferred[None]:
        """Close the connection pool (and the sentinels' connections)."""

        async def work() -> None:
            await self.client.aclose()
            if self._sentinel is not None:
                await self._sentinel.aclose()

        return self._call(work, "close")

    def __repr__(self) -> str:
        return f"RedisStore({self.name!r}, deadline={self.deadline!r})"


def _held(text: str) -> Quarantined:
    """A quarantine entry from its JSON description."""
    data = json.loads(text)
    data["reasons"] = tuple(data.get("reasons", ()))
    return Quarantined(**data)


def _admission(account: str, reply: Sequence[Any]) -> Admission:
    """The admit script's reply: allowed and the count, or the block (already there, or new)."""
    if reply[0] == "allowed":
        return Admission(Outcome.ALLOWED, int(reply[1]))
    block = _block(account, reply[1:])
    if reply[0] == "blocked":
        return Admission(Outcome.BLOCKED, block.count, block)
    return Admission(Outcome.NEWLY_BLOCKED, block.count, block)


def _block(account: str, fields: Sequence[Any]) -> Block:
    """A block from its hash fields (since, until, reason, count, clients, by)."""
    since, until, reason, count, clients, by = fields
    return Block(account, float(since), float(until), reason, int(count), tuple(json.loads(clients)), by)
