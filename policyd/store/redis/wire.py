"""A connection of Twisted's own to Redis, for the admit script, the quota's hot path.

Through redis-py's ``redis.asyncio``, every call went through several
asyncio tasks (the deadline, the pool, the write's own deadline, the read),
so a batch of recipients waited six or more turns of the event loop for its
reply while the server had nothing else to do.  Here the packed command is
written when the turn ends and the replies are read as they arrive, in
order, by hiredis, on the reactor's own callbacks: one turn there, one back.

It serves ``redis://`` and ``unix://`` URLs; TLS and Sentinel stay on
redis-py's pool, like every other operation.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from twisted.internet import error as net_errors
from twisted.internet.defer import CancelledError, Deferred, DeferredList, FirstError, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from policyd.errors import StoreError
from policyd.reactor import write_now, writes_directly

#: redis-py's connection classes whose address this connection can reach.
PLAIN_CONNECTIONS = ("Connection", "UnixDomainSocketConnection")


class WireError(Exception):
    """The connection failed or closed, or Redis sent what is not RESP."""


class RedisWire(Protocol):
    """One connection: commands are written at once, their replies answered in order."""

    #: The TCP or unix transport, set by makeConnection.
    transport: Any

    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8", errors="surrogateescape")
        self.waiting: deque[Deferred[Any]] = deque()
        self.open = False
        self._direct = False
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.open = True
        transport = self.transport
        if hasattr(transport, "setTcpNoDelay"):
            transport.setTcpNoDelay(True)
        # A plain TCP or unix socket of Twisted's can take a command directly (write_now).
        self._direct = writes_directly(transport)

    def send(self, command: bytes, replies: int = 1) -> list[Deferred[Any]]:
        """Write a packed command (or several); one Deferred per reply, a Redis error as its value."""
        if not self.open:
            raise WireError("connection closed")
        answers: list[Deferred[Any]] = [Deferred() for _ in range(replies)]
        self.waiting.extend(answers)
        write_now(self.transport, command, self._direct)
        return answers

    def dataReceived(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as error:
                self.abort(f"not a Redis reply ({error})")
                return
            if reply is False:
                return
            if not waiting:
                self.abort("a reply nothing asked for")
                return
            waiting.popleft().callback(reply)

    def abort(self, why: str) -> None:
        """Drop the connection; every reply still awaited fails with ``why``."""
        self.open = False
        self._fail(why)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = net_errors.ConnectionDone) -> None:  # type: ignore[assignment]
        self.open = False
        self._fail(f"connection lost ({reason.getErrorMessage()})")
        self.closed.callback(None)

    def _fail(self, why: str) -> None:
        waiting, self.waiting = self.waiting, deque()
        for answer in waiting:
            answer.errback(WireError(why))


class AdmitLine:
    """The store's own connection for the admit script: opened on first use, again after a failure.

    :param options: the ``connection_kwargs`` of redis-py's pool (host and
        port or path, username, password, db).
    :param deadline: longest wait for a reply (and for connecting).
    :param describe: the store's name for messages.
    :param error: makes the store's one-line error of a failure.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        options: dict[str, Any],
        deadline: float,
        describe: str,
        error: Callable[[str, Exception], StoreError],
    ) -> None:
        self.reactor = reactor
        self.options = options
        self.deadline = deadline
        self.name = describe
        self.error = error
        self.wire: RedisWire | None = None
        #: Callers waiting for the connection being made.
        self.waiters: list[Deferred[RedisWire]] = []
        #: Calls not known to be answered, oldest first: when each must be, its
        #: result, and what it does.  One timer watches the oldest rather than
        #: one timer a call: a timer cost more than packing a batch.
        self._watched: deque[tuple[float, Deferred[Any], str]] = deque()
        self._watch: IDelayedCall | None = None

    def _endpoint(self) -> Any:
        options = self.options
        if options.get("path"):
            return UNIXClientEndpoint(self.reactor, options["path"], timeout=self.deadline)
        return HostnameEndpoint(
            self.reactor, options.get("host", "localhost"), int(options.get("port", 6379)), timeout=self.deadline
        )

    def _ready(self) -> Deferred[RedisWire]:
        """The open connection, connecting first when there is none; one attempt serves every caller."""
        waiter: Deferred[RedisWire] = Deferred()
        self.waiters.append(waiter)
        if len(self.waiters) == 1:
            self._connect()
        return waiter

    def _connect(self) -> None:
        """Connect and say who we are (AUTH, SELECT, CLIENT SETNAME), within the deadline."""
        options = self.options
        hello: list[tuple[Any, ...]] = []
        if options.get("password"):
            user = options.get("username")
            hello.append(("AUTH", user, options["password"]) if user else ("AUTH", options["password"]))
        if options.get("db"):
            hello.append(("SELECT", int(options["db"])))
        hello.append(("CLIENT", "SETNAME", "policyd"))
        made: list[RedisWire] = []

        def greet(wire: RedisWire) -> Deferred[Any]:
            made.append(wire)
            command = b"".join(hiredis.pack_command(h) for h in hello)
            answers = wire.send(command, len(hello))
            return DeferredList(answers, fireOnOneErrback=True, consumeErrors=True)

        def greeted(results: list[tuple[bool, Any]]) -> None:
            wire = made[0]
            refused = next((reply for _, reply in results if isinstance(reply, Exception)), None)
            if refused is not None:
                raise refused
            self.wire = wire
            wire.closed.addBoth(lambda _: self._lost(wire))
            tell(wire)

        def failed(failure: Failure) -> None:
            if made and made[0].open:
                made[0].abort("could not connect")
            if failure.check(FirstError):
                failure = failure.value.subFailure
            if failure.check(CancelledError):
                failure = Failure(WireError(f"not connected within {self.deadline:g}s"))
            tell(failure)

        def tell(result: RedisWire | Failure) -> None:
            waiters, self.waiters = self.waiters, []
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        connecting = connectProtocol(self._endpoint(), RedisWire()).addCallback(greet)
        connecting.addTimeout(self.deadline, self.reactor)
        connecting.addCallbacks(greeted, failed).addErrback(failed)

    def _lost(self, wire: RedisWire) -> None:
        if self.wire is wire:
            self.wire = None

    def call(self, command: bytes, reload: bytes, what: str = "admit") -> Deferred[Any]:
        """The reply to one packed command; on NOSCRIPT, ``reload`` (SCRIPT LOAD) and the command again.

        Fails with a one-line :class:`StoreError` when Redis refuses it, when
        the connection fails, or when no reply came within the deadline (the
        connection is then dropped: a reply coming later would answer the
        wrong call).
        """
        result: Deferred[Any] = Deferred()
        wire = self.wire
        if wire is not None and wire.open:
            answer = self._send(wire, command, reload)
        else:
            # A batch answered already (its deadline passed while connecting) is not sent.
            answer = self._ready().addCallback(
                lambda ready: None if result.called else self._send(ready, command, reload)
            )

        def settled(reply: Any) -> None:
            if result.called:
                return
            if isinstance(reply, Failure):
                value = reply.value
                if isinstance(value, StoreError):
                    result.errback(value)
                else:
                    result.errback(self.error(what, value if isinstance(value, Exception) else WireError(str(value))))
            elif isinstance(reply, Exception):
                result.errback(self.error(what, reply))
            else:
                result.callback(reply)

        self._watched.append((self.reactor.seconds() + self.deadline, result, what))
        if self._watch is None:
            self._watch = self.reactor.callLater(self.deadline, self._look)
        answer.addBoth(settled)
        return result

    def _look(self) -> None:
        """Fail the calls whose deadline has passed, and drop the connection they wait on.

        A reply coming later would answer the wrong call; the calls sent
        after them on that connection fail with it, as a lost connection.
        """
        self._watch = None
        watched = self._watched
        now = self.reactor.seconds()
        late = False
        while watched and (watched[0][1].called or watched[0][0] <= now):
            _, result, what = watched.popleft()
            if not result.called:
                late = True
                result.errback(StoreError(f"Redis store {self.name}: no answer within {self.deadline:g}s ({what})"))
        if late:
            current = self.wire
            if current is not None and current.open:
                current.abort("dropped after a late reply")
        while watched and watched[0][1].called:
            watched.popleft()
        if watched:
            self._watch = self.reactor.callLater(max(0.0, watched[0][0] - now), self._look)

    def _send(self, wire: RedisWire, command: bytes, reload: bytes) -> Deferred[Any]:
        (answer,) = wire.send(command)

        def again(reply: Any) -> Any:
            if reload and isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT"):
                if not wire.open:
                    raise WireError("connection closed")
                loaded, repeated = wire.send(reload + command, 2)
                loaded.addErrback(lambda _: None)  # the repeated call says what went wrong
                return repeated
            return reply

        return answer.addCallback(again)

    def close(self) -> Deferred[None]:
        """Close the connection (when open)."""
        if self._watch is not None and self._watch.active():
            self._watch.cancel()
        self._watch = None
        wire = self.wire
        if wire is None or not wire.open:
            return succeed(None)
        wire.open = False
        done: Deferred[None] = Deferred()
        wire.closed.addBoth(lambda _: done.callback(None))
        wire.transport.loseConnection()
        return done
