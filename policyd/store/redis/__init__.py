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
the next command: nothing needs restarting.  Admissions, the hot path, are
batched per turn of the event loop into one call of the admit script, sent
for ``redis://`` and ``unix://`` URLs on a connection of the store's own on
the reactor (:mod:`policyd.store.redis.wire`), with the same deadline.
"""

from __future__ import annotations

from policyd.store.redis.connection import describe_url
from policyd.store.redis.counts import RedisCounts
from policyd.store.redis.held import RedisHeldMail
from policyd.store.redis.records import RedisRecords

__all__ = ["RedisStore", "describe_url"]


class RedisStore(RedisCounts, RedisRecords, RedisHeldMail):
    """Every role of :class:`policyd.store.Store` in Redis: the parts share one connection.

    See :class:`~policyd.store.redis.connection.RedisConnection` for the URL forms,
    the deadline and the pool.
    """
