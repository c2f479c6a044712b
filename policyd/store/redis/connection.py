"""The Redis connection: URLs, the client pool, one deadline per operation, one-line errors."""

from __future__ import annotations

import asyncio
import math
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from twisted.internet.defer import Deferred

from policyd.errors import ConfigError, StoreError
from policyd.store.redis.schema import (
    ADMIT,
    CLAIM,
    CLAIM_RELEASE,
    CONNECTIONS,
    FAILED,
    GIVE_BACK,
    PRUNE_BLOCKS,
    PRUNE_WINDOWS,
    PUT_BLOCK,
    QUEUE_DIGEST,
    UNBLOCK,
    UNREADABLE,
    PendingAdmit,
)
from policyd.store.redis.wire import PLAIN_CONNECTIONS, AdmitLine

T = TypeVar("T")


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


def milliseconds(seconds: float) -> int:
    """A key lifetime in milliseconds, at least 1 (PEXPIRE 0 would delete at once)."""
    return max(1, math.ceil(seconds * 1000))


def one_line(error: BaseException, secrets: Sequence[str]) -> str:
    """An error as one line, with the URL's passwords left out."""
    text = " ".join(str(error).split()) or type(error).__name__
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def client_options(deadline: float, connections: int) -> dict[str, Any]:
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


def check_url(url: str) -> None:
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


class SentinelURL:
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


class RedisConnection:
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
        options = client_options(deadline, connections)
        try:
            if url.startswith("redis+sentinel://"):
                parsed = SentinelURL(url)
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
                check_url(url)
                self.client = redis.asyncio.Redis.from_url(url, **options)
            else:
                raise ValueError("not a redis://, rediss://, unix:// or redis+sentinel:// URL")
        except (ValueError, TypeError, RedisError) as error:
            raise ConfigError(
                f"store.url: bad Redis URL {self.name}: {one_line(error, self._secrets)}"
            ) from None
        register = self.client.register_script
        self._admit = register(ADMIT)
        self._give_back = register(GIVE_BACK)
        self._put_block = register(PUT_BLOCK)
        self._unblock = register(UNBLOCK)
        self._prune_windows = register(PRUNE_WINDOWS)
        self._prune_blocks = register(PRUNE_BLOCKS)
        self._claim = register(CLAIM)
        self._failed = register(FAILED)
        self._queue_digest = register(QUEUE_DIGEST)
        self._claim_release = register(CLAIM_RELEASE)

        #: Recipients counted this turn, sent together by _send_admits.
        self._admits: list[PendingAdmit] = []
        #: Accounts noted this turn (account, time, answer), written together.
        self._notes: list[tuple[str, float, Deferred[None]]] = []
        #: Where the admissions' own connection goes (None: through the pool).
        pool = self.client.connection_pool
        self._line_options: dict[str, Any] | None = (
            dict(pool.connection_kwargs)
            if self._sentinel is None and pool.connection_class.__name__ in PLAIN_CONNECTIONS
            else None
        )
        self._line: AdmitLine | None = None

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
            except (RedisError, OSError, *UNREADABLE) as error:
                raise self._error(what, error) from None

        return Deferred.fromFuture(asyncio.ensure_future(bounded()))

    def _error(self, what: str, error: Exception) -> StoreError:
        """The one-line error of an operation that Redis refused or whose reply cannot be read."""
        if isinstance(error, UNREADABLE):
            # Keys of ours holding something else: the reply cannot be read.
            return StoreError(
                f"Redis store {self.name}: {what}: unexpected data ({type(error).__name__}: "
                f"{one_line(error, self._secrets)})"
            )
        return StoreError(f"Redis store {self.name}: {what}: {one_line(error, self._secrets)}")


    def close(self) -> Deferred[None]:
        """Close the admissions' connection and the pool (and the sentinels' connections)."""

        async def work() -> None:
            await self.client.aclose()
            if self._sentinel is not None:
                await self._sentinel.aclose()

        line, self._line = self._line, None
        closing = self._call(work, "close")
        if line is None:
            return closing
        return line.close().addCallback(lambda _: closing)

    def __repr__(self) -> str:
        return f"RedisStore({self.name!r}, deadline={self.deadline!r})"
