"""What a server factory knows of its connections, and how it waits on them."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred


def describe_peer(address: Any) -> str:
    """``host:port`` for TCP peers, ``unix`` for a local socket."""
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    return "unix"


class ConnectionTracking:
    """The open connections of a factory, and waits for them to settle.

    A factory using it adds each protocol to :attr:`connections` when built
    and calls :meth:`closed` when it goes; protocols have a ``busy`` property
    (a request or message still waiting for its answer) and call
    :meth:`idle` when they answer.  Shutdown uses :meth:`drained` (every
    answer given) and :meth:`all_closed` (every connection gone).
    """

    def _start_tracking(self) -> None:
        self.connections: set[Any] = set()
        self._drained: list[Deferred[None]] = []
        self._closed_waiters: list[Deferred[None]] = []

    def closed(self, protocol: Any) -> None:
        """Forget a connection."""
        self.connections.discard(protocol)
        self.idle()
        if self._closed_waiters and not self.connections:
            self._fire(self._closed_waiters)
            self._closed_waiters = []

    def idle(self) -> None:
        """Fire drain waiters once no connection has something in flight."""
        if self._drained and not any(c.busy for c in self.connections):
            self._fire(self._drained)
            self._drained = []

    def drained(self) -> Deferred[None]:
        """Fires when everything received so far has been answered."""
        waiter: Deferred[None] = Deferred()
        self._drained.append(waiter)
        self.idle()
        return waiter

    def all_closed(self) -> Deferred[None]:
        """Fires once no connection is left open."""
        waiter: Deferred[None] = Deferred()
        if self.connections:
            self._closed_waiters.append(waiter)
        else:
            waiter.callback(None)
        return waiter

    @staticmethod
    def _fire(waiters: list[Deferred[None]]) -> None:
        for waiter in list(waiters):
            waiter.callback(None)
