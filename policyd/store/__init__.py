"""The state store: one interface, several back ends.

Every operation returns a :class:`~twisted.internet.defer.Deferred`, so a
back end may answer at once (memory, SQLite) or over the network (Redis).
Read-check-write operations such as :meth:`Store.admit` are atomic in every
back end: several ``policyd serve`` processes sharing one store never let an
account past its limit.  Times are POSIX seconds passed in by the caller, so
tests drive them with a fake clock.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from policyd.errors import ConfigError
from policyd.store.records import (
    EXEMPTION_STATES,
    MAX_BLOCK_CLIENTS,
    SPAM_CHOICES,
    Admission,
    AuditEntry,
    Block,
    Charge,
    Exemption,
    Notice,
    Outcome,
    Quarantined,
)
from policyd.store.roles import AuditLog, Choices, Counts, Exemptions, HeldMail, Outbox, Store

__all__ = [
    "Admission",
    "AuditEntry",
    "Block",
    "Charge",
    "EXEMPTION_STATES",
    "Exemption",
    "MAX_BLOCK_CLIENTS",
    "Notice",
    "Outcome",
    "Quarantined",
    "SPAM_CHOICES",
    "AuditLog",
    "Choices",
    "Counts",
    "Exemptions",
    "HeldMail",
    "Outbox",
    "Store",
    "open_store",
]


def open_store(url: str, deadline: float = 0.5, reactor: IReactorTime | None = None) -> Store:
    """Open the store named by ``store.url``.

    :param deadline: longest wait for one operation of a networked store
        (``store.deadline``); the embedded ones answer at once.
    :param reactor: a server's reactor, which lets SQLite group the commits
        of one reactor turn; admin commands leave it out.

    :raises ConfigError: for an unknown scheme.
    :raises StoreError: when the store cannot be opened.
    """
    if url.startswith("memory://"):
        from policyd.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:///"):
        from policyd.store.sqlite import SQLiteStore

        return SQLiteStore(url[len("sqlite:///") :], reactor=reactor)
    if url.startswith(("redis://", "rediss://", "redis+sentinel://", "unix://")):
        from policyd.store.redis import RedisStore

        return RedisStore(url, deadline=deadline)
    raise ConfigError(f"store.url: unknown store {url!r}")
