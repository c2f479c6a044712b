"""The reactor: Twisted on asyncio (so redis.asyncio runs beside it), and where blocking work runs."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed

T = TypeVar("T")

#: How a component runs blocking or CPU-bound work: :func:`inline` or :func:`in_thread`.
RunBlocking = Callable[..., "Deferred[Any]"]


def install_reactor() -> Any:
    """Install Twisted's asyncio reactor (once) and return the running reactor.

    Must run before anything imports ``twisted.internet.reactor``.
    """
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import asyncioreactor

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        asyncioreactor.install(loop)
    from twisted.internet import reactor

    return reactor


def inline(work: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
    """Run work at once (admin commands, tests, and callers already off the event loop)."""
    return succeed(work(*args, **kwargs))


def in_thread(reactor: Any) -> RunBlocking:
    """Run blocking or CPU-bound work (file reads, ``postmap``, scoring) in the reactor's
    thread pool, off the event loop."""
    from twisted.internet.threads import deferToThreadPool

    def run(work: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), work, *args, **kwargs)

    return run


def writes_directly(transport: Any) -> bool:
    """Whether ``transport`` is a plain TCP or unix socket of Twisted's that :func:`write_now` can write to."""
    from twisted.internet.abstract import FileDescriptor

    return isinstance(transport, FileDescriptor) and all(
        hasattr(transport, name) for name in ("socket", "dataBuffer", "_tempDataBuffer")
    )


def write_now(transport: Any, data: bytes, direct: bool) -> None:
    """Write ``data``, straight to the socket when ``direct`` and nothing waits before it.

    ``transport.write`` queues the bytes and writes them on the event loop's
    next turn, registering the socket for writing and removing it again: for
    one short message that round trip costs more than making it, and the
    peer starts on it a turn later.  Bytes that do not fit in the socket, or
    any bytes while earlier ones still wait, go through the transport as
    usual, which also finds out about a broken connection and reports it.

    :param direct: what :func:`writes_directly` said of ``transport``.
    """
    if direct and not transport.dataBuffer and not transport._tempDataBuffer:
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
