"""The store contract on a real Redis server, and what only Redis does.

Every test here talks to a ``redis-server`` started for this module on a
free loopback port (see :mod:`tests.harness.redis_server`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import pytest_twisted
import redis
from twisted.internet.defer import DeferredList

from policyd.errors import ConfigError, StoreError
from policyd.store import Block, Charge, Outcome, open_store
from policyd.store.redis import RedisStore
from policyd.store.redis.schema import ADMIT_EARLY, PREFIX, PRUNE_BATCH
from tests.harness.redis_server import RedisServer, running_redis, running_sentinel
from tests.harness.store_contract import *  # noqa: F403
from tests.harness.store_contract import HOUR, T0, admit

#: Deadline of the stores under test; the margins below are generous on purpose.
DEADLINE = 0.5
MARGIN = 2.0


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the module, stopped at the end whatever happens."""
    with running_redis() as server:
        yield server


def raw(server: RedisServer) -> redis.Redis:
    """A plain synchronous client, to look at and poke the server directly."""
    return redis.Redis(host="127.0.0.1", port=server.port, password=server.password, decode_responses=True)


@pytest.fixture
def store(redis_server: RedisServer) -> Iterator[RedisStore]:
    """A RedisStore on an empty database of the running server."""
    if not redis_server.running:  # a previous test failed during its outage
        redis_server.start()
    with raw(redis_server) as client:
        client.flushall()
    opened = RedisStore(redis_server.url, deadline=DEADLINE)
    yield opened
    pytest_twisted.blockon(opened.close())


def one_line_error(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text, text
    return text


@pytest_twisted.ensureDeferred
async def test_open_store_picks_redis(redis_server: RedisServer) -> None:
    """store.url redis://… opens a RedisStore with the configured deadline."""
    opened = open_store(redis_server.url, deadline=0.25)
    assert isinstance(opened, RedisStore) and opened.deadline == 0.25
    assert (await admit(opened, "picks-redis")).outcome is Outcome.ALLOWED
    await opened.close()


@pytest_twisted.ensureDeferred
async def test_noscript_fallback_after_script_flush(store: RedisStore, redis_server: RedisServer) -> None:
    """After SCRIPT FLUSH (or a Redis restart) the scripts are loaded again and still count."""
    assert (await admit(store)).count == 1
    with raw(redis_server) as client:
        client.script_flush()
        assert client.script_exists(store._admit.sha) == [False]
    assert (await admit(store)).count == 2
    assert await store.give_back("alice", "") == 2
    with raw(redis_server) as client:
        assert client.script_exists(store._admit.sha) == [True]


@pytest_twisted.ensureDeferred
async def test_concurrent_admits_never_overshoot(store: RedisStore, redis_server: RedisServer) -> None:
    """Hundreds of admits in flight at once over two connection pools let exactly limit through."""
    other = RedisStore(redis_server.url, deadline=5.0)
    store.deadline = 5.0
    pending = [
        s.admit(Charge("alice", T0 + n / 1000, HOUR, 25, 60, "r", client=f"192.0.2.{n % 30}"))
        for n in range(300)
        for s in (store, other)
    ]
    results = await DeferredList(pending, fireOnOneErrback=True, consumeErrors=True)
    outcomes = [admission.outcome for _, admission in results]
    assert outcomes.count(Outcome.ALLOWED) == 25
    assert outcomes.count(Outcome.NEWLY_BLOCKED) == 1
    assert outcomes.count(Outcome.BLOCKED) == 600 - 26
    block = await store.block_of("alice", now=T0)
    assert block is not None and block.count == 25 and 0 < len(block.clients) <= 20
    await other.close()


@pytest_twisted.ensureDeferred
async def test_a_bad_key_fails_its_own_recipient_only(store: RedisStore, redis_server: RedisServer) -> None:
    """Recipients sent together each get their own answer: a window key holding something else fails only its own."""
    with raw(redis_server) as client:
        client.set(f"{PREFIX}window:mallory", "not a sorted set")
    pending = [store.admit(Charge(account, T0, HOUR, 10, 60, "r")) for account in ("alice", "mallory", "bob")]
    results = await DeferredList(pending, consumeErrors=True)
    (alice_ok, alice), (mallory_ok, mallory), (bob_ok, bob) = results
    assert alice_ok and bob_ok and not mallory_ok
    assert alice.outcome is Outcome.ALLOWED and bob.count == 1
    assert mallory.check(StoreError) and "admit" in one_line_error(mallory.value)


@pytest_twisted.ensureDeferred
async def test_same_instant_members_stay_distinct(store: RedisStore) -> None:
    """Recipients counted at the very same instant, instance and client are each counted."""
    for _ in range(5):
        await admit(store, limit=10, instance="i1", client="192.0.2.1")
    assert await store.usage("alice", now=T0, window=HOUR) == 5
    assert await store.give_back("alice", "i1") == 5


@pytest_twisted.ensureDeferred
async def test_give_back_with_odd_instances_and_clients(store: RedisStore) -> None:
    """Instances and clients holding the member separator are matched exactly, never by prefix."""
    await admit(store, limit=10, instance="a|1", client="192.0.2.1|x")
    await admit(store, limit=10, instance="a", client="|1192.0.2.1")
    await admit(store, limit=10, instance="", client="a|1")
    assert await store.give_back("alice", "a") == 1
    assert await store.give_back("alice", "a|1") == 1
    assert await store.usage("alice", now=T0, window=HOUR) == 1
    await admit(store, limit=1, client="z")
    block = await store.block_of("alice", now=T0)
    assert block is not None and block.clients == ("a|1",)


@pytest_twisted.ensureDeferred
async def test_accounts_beyond_ascii_give_back_what_they_counted(store: RedisStore) -> None:
    """The script names an account's keys from its bytes: give-back finds them for any account."""
    for account in ("jürgen@example.org", "\u5f20\u4f1f@example.cn", "odd\udcff@example.net"):
        for _ in range(3):
            assert (await admit(store, account, limit=10, instance="q1")).outcome is Outcome.ALLOWED
        assert await store.usage(account, now=T0, window=HOUR) == 3
        assert await store.give_back(account, "q1") == 3
        assert await store.usage(account, now=T0, window=HOUR) == 0


@pytest_twisted.ensureDeferred
async def test_one_call_keeps_each_recipients_limit_reason_and_window(store: RedisStore) -> None:
    """Recipients sent together with different limits, reasons and windows (a reload) each get their own."""
    pending = [
        store.admit(Charge("alice", T0, HOUR, 1, 60, "alice's limit")),
        store.admit(Charge("alice", T0, HOUR, 1, 60, "alice's limit")),
        store.admit(Charge("bob", T0, HOUR, 2, 60, "bob's limit")),
        store.admit(Charge("bob", T0, HOUR, 2, 60, "bob's limit")),
        store.admit(Charge("bob", T0, HOUR, 2, 60, "bob's limit")),
        store.admit(Charge("carol", T0, 10.0, 1, 120.5, "")),
        store.admit(Charge("carol", T0 + 1, 10.0, 1, 120.5, "")),
    ]
    alice_1, alice_2, bob_1, bob_2, bob_3, carol_1, carol_2 = await DeferredList(pending, fireOnOneErrback=True)
    assert [a[1].outcome for a in (alice_1, bob_1, bob_2, carol_1)] == [Outcome.ALLOWED] * 4
    assert bob_2[1].count == 2
    assert alice_2[1].block.reason == "alice's limit" and alice_2[1].outcome is Outcome.NEWLY_BLOCKED
    assert bob_3[1].block.reason == "bob's limit" and bob_3[1].block.count == 2
    carol = carol_2[1].block
    assert carol.reason == "" and carol.since == T0 + 1 and carol.until == T0 + 1 + 120.5
    # Block ends are worked out by the script: the same double as in Python.
    for account, until in (("alice", T0 + 60), ("bob", T0 + 60), ("carol", T0 + 1 + 120.5)):
        block = await store.block_of(account, now=T0)
        assert block is not None and block.until == until
    # Carol's window was 10 s: a minute later her old recipient no longer counts.
    await store.unblock("carol", now=T0 + 2)
    later = await store.admit(Charge("carol", T0 + 60, 10.0, 1, 120.5, ""))
    assert later.outcome is Outcome.ALLOWED and later.count == 1


@pytest_twisted.ensureDeferred
async def test_keys_are_prefixed_and_expire(store: RedisStore, redis_server: RedisServer) -> None:
    """Every key is under policyd:, windows expire after the window and blocks when they end."""
    await admit(store, limit=1)
    await admit(store, "bob", limit=1)
    await admit(store, "bob", limit=1)
    with raw(redis_server) as client:
        keys = client.keys("*")
        assert keys and all(k.startswith(PREFIX) for k in keys)
        assert 0 < client.pttl(f"{PREFIX}window:alice") <= HOUR * 1000
        assert HOUR * 1000 - 60_000 < client.pttl(f"{PREFIX}window:alice")
        assert 3 * 86400 * 1000 - 60_000 < client.pttl(f"{PREFIX}block:bob") <= 3 * 86400 * 1000
        assert client.ttl(f"{PREFIX}seq") == -1  # the sequence is shared and tiny
        instance = f"{PREFIX}instance:5:alice:"
        assert HOUR * 1000 - 60_000 < client.pttl(instance) <= HOUR * 1000
    await store.block(Block("carol", T0, T0 + 30, "phished", 0, (), "admin"))
    with raw(redis_server) as client:
        assert 25_000 < client.pttl(f"{PREFIX}block:carol") <= 30_000


@pytest_twisted.ensureDeferred
async def test_prune_cleans_indexes(store: RedisStore, redis_server: RedisServer) -> None:
    """prune() drops stale windows, expired blocks and their index entries; live ones stay."""
    await admit(store, "old", now=T0)
    await admit(store, "new", now=T0 + 3000)
    await store.block(Block("gone", T0, T0 + 10, "r", 0, (), "admin"))
    await store.block(Block("kept", T0, T0 + 86400, "r", 0, (), "admin"))
    assert await store.prune(now=T0 + HOUR + 1, window=HOUR) == 1
    with raw(redis_server) as client:
        assert client.zrange(f"{PREFIX}active", 0, -1) == ["new"]
        assert client.zrange(f"{PREFIX}blocks", 0, -1) == ["kept"]
        assert not client.exists(f"{PREFIX}window:old", f"{PREFIX}block:gone")
    assert await store.busiest(now=T0 + HOUR + 1, window=HOUR) == [("new", 1)]


@pytest_twisted.ensureDeferred
async def test_prune_takes_stale_accounts_in_batches_and_leaves_the_others(
    store: RedisStore, redis_server: RedisServer
) -> None:
    """Accounts that stopped sending go, over several batches; accounts still sending keep their windows."""
    stale = [f"stale{n}@example.org" for n in range(2 * PRUNE_BATCH + 50)]
    await DeferredList([store.admit(Charge(a, T0, HOUR, 10, 60, "r")) for a in stale], fireOnOneErrback=True)
    for account in ("alice", "bob"):
        await admit(store, account, now=T0)
        await admit(store, account, now=T0 + 3000)
    assert await store.prune(now=T0 + HOUR + 1, window=HOUR) == len(stale)
    with raw(redis_server) as client:
        assert sorted(client.zrange(f"{PREFIX}active", 0, -1)) == ["alice", "bob"]
        assert not any(client.exists(f"{PREFIX}window:{a}") for a in stale)
        assert client.zcard(f"{PREFIX}window:alice") == 2 and client.zcard(f"{PREFIX}window:bob") == 2
    assert await store.usage("alice", now=T0 + HOUR + 1, window=HOUR) == 1
    assert await store.prune(now=T0 + HOUR + 1, window=HOUR) == 0


@pytest_twisted.ensureDeferred
async def test_foreign_data_is_a_store_error(store: RedisStore, redis_server: RedisServer) -> None:
    """A key of ours holding something else fails as a StoreError, never another exception."""
    with raw(redis_server) as client:
        client.set(f"{PREFIX}window:alice", "not a sorted set")
        client.rpush(f"{PREFIX}audit", "not json")
    with pytest.raises(StoreError, match="WRONGTYPE"):
        await admit(store)
    with pytest.raises(StoreError, match="unexpected data"):
        await store.audit()


@pytest_twisted.ensureDeferred
async def test_text_that_is_not_utf8_round_trips(store: RedisStore) -> None:
    """Names with bytes that are not UTF-8 (kept as surrogates by the protocol) round-trip."""
    name = "caf\udce9@example.org"
    await admit(store, name, limit=1, client="198.51.100.7\udcff")
    block = (await admit(store, name, limit=1)).block
    assert block is not None and block.account == name and block.clients == ("198.51.100.7\udcff",)
    assert [b.account for b in await store.blocks(now=T0)] == [name]


@pytest_twisted.ensureDeferred
async def test_outage_fails_fast_then_recovers_with_data(store: RedisStore, redis_server: RedisServer) -> None:
    """With Redis down, operations fail with a one-line StoreError within the deadline; once
    it is back (same directory) the blocks are still there and the same store works again."""
    for _ in range(4):
        await admit(store)
    redis_server.kill()
    newcomer = RedisStore(redis_server.url, deadline=DEADLINE)  # opened during the outage
    try:
        for operation in (
            lambda: admit(store),
            lambda: store.block_of("alice", now=T0),
            lambda: store.usage("alice", now=T0, window=HOUR),
            lambda: admit(newcomer),
        ):
            started = time.monotonic()
            with pytest.raises(StoreError) as raised:
                await operation()
            assert time.monotonic() - started < DEADLINE + MARGIN
            message = one_line_error(raised.value)
            assert f"127.0.0.1:{redis_server.port}" in message
        redis_server.start()
        block = await store.block_of("alice", now=T0)
        assert block is not None and block.count == 3
        assert (await admit(store)).outcome is Outcome.BLOCKED
        assert (await admit(store, "bob")).outcome is Outcome.ALLOWED
        assert (await admit(newcomer, "bob")).count == 2
    finally:
        if not redis_server.running:
            redis_server.start()
        await newcomer.close()


@pytest_twisted.ensureDeferred
async def test_slow_redis_fails_at_the_deadline(store: RedisStore, redis_server: RedisServer) -> None:
    """A Redis that accepts but does not answer (stopped with SIGSTOP) fails at the deadline."""
    import signal

    await admit(store)
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="no answer within 0.5s|Timeout") as raised:
            await admit(store)
        elapsed = time.monotonic() - started
        assert DEADLINE * 0.8 <= elapsed < DEADLINE + MARGIN
        one_line_error(raised.value)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert (await admit(store)).count >= 2


@pytest_twisted.ensureDeferred
async def test_password_is_used_and_never_shown() -> None:
    """A password in the URL authenticates; a wrong one is a StoreError that does not show it."""
    with running_redis(password="s3cret-pw") as server:
        good = RedisStore(server.url, deadline=DEADLINE)
        assert (await admit(good)).outcome is Outcome.ALLOWED
        await good.close()
        bad = RedisStore(f"redis://:wrong-pw@127.0.0.1:{server.port}/0", deadline=DEADLINE)
        with pytest.raises(StoreError) as raised:
            await admit(bad)
        message = one_line_error(raised.value)
        assert f"127.0.0.1:{server.port}" in message and "wrong-pw" not in message
        await bad.close()
        missing = RedisStore(f"redis://127.0.0.1:{server.port}/0", deadline=DEADLINE)
        with pytest.raises(StoreError, match="(?i)auth"):
            await admit(missing)
        await missing.close()


@pytest_twisted.ensureDeferred
async def test_unix_socket_url(store: RedisStore, redis_server: RedisServer) -> None:
    """unix:///path?db=N reaches the same data as the TCP URL."""
    await admit(store)
    local = RedisStore(f"unix://{redis_server.socket}?db=0", deadline=DEADLINE)
    assert (await admit(local)).count == 2
    await local.close()


@pytest_twisted.ensureDeferred
async def test_databases_are_separate(store: RedisStore, redis_server: RedisServer) -> None:
    """The /db of the URL selects the database: two installations can share a server."""
    await admit(store)
    other = RedisStore(f"redis://127.0.0.1:{redis_server.port}/3", deadline=DEADLINE)
    assert (await admit(other)).count == 1
    await other.close()


@pytest_twisted.ensureDeferred
async def test_sentinel_url_finds_the_master(store: RedisStore, redis_server: RedisServer) -> None:
    """redis+sentinel://host:port/service/db asks the Sentinel for the master and uses it."""
    await admit(store)
    with running_sentinel(redis_server, "mail") as sentinel:
        managed = RedisStore(f"redis+sentinel://127.0.0.1:{sentinel.port}/mail/0", deadline=2.0)
        assert (await admit(managed)).count == 2
        await managed.close()
        unknown = RedisStore(f"redis+sentinel://127.0.0.1:{sentinel.port}/nosuch", deadline=2.0)
        with pytest.raises(StoreError, match="nosuch"):
            await admit(unknown)
        await unknown.close()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://127.0.0.1:notaport/0", "(?i)port"),
        ("redis://:hunter2@127.0.0.1:99999/0", "(?i)port"),
        ("redis://127.0.0.1:6380/notadb", "not a number"),
        ("unix:///run/redis.sock?db=x", "not a number"),
        ("http://127.0.0.1:6379/0", "not a redis://"),
        ("redis:///0", "no host"),
        ("redis+sentinel://127.0.0.1/policyd", "host:port"),
        ("redis+sentinel://127.0.0.1:26379", "service_name"),
        ("redis+sentinel://:hunter2@127.0.0.1:26379/svc/x", "not a number"),
        ("redis+sentinel://127.0.0.1:26379/svc?bogus=1", "unknown option"),
    ],
)
def test_bad_url_is_a_clear_config_error(url: str, problem: str) -> None:
    """A malformed URL is a one-line ConfigError naming store.url, never showing the password."""
    with pytest.raises(ConfigError, match=problem) as raised:
        RedisStore(url)
    message = one_line_error(raised.value)
    assert message.startswith("store.url: bad Redis URL") and "hunter2" not in message


def test_url_forms_are_accepted_without_connecting() -> None:
    """rediss:// uses TLS, a sentinel list may name several hosts; nothing connects yet."""
    tls = RedisStore("rediss://:pw@redis.example.org:6380/1")
    assert "SSL" in tls.client.connection_pool.connection_class.__name__
    assert tls.name == "rediss://redis.example.org:6380/1"
    sentinel = RedisStore("redis+sentinel://pw@10.0.0.1:26379,10.0.0.2:26379,[::1]:26380/mail/2?sentinel_password=sp")
    assert sentinel.name == "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379,[::1]:26380/mail/2"
    assert sorted(sentinel._secrets) == ["pw", "sp"]
    assert isinstance(open_store("unix:///run/redis/redis.sock?db=2"), RedisStore)


@pytest_twisted.ensureDeferred
async def test_one_turn_is_one_script_call_partly_over_the_limit(store: RedisStore, redis_server: RedisServer) -> None:
    """Recipients counted in one turn go to Redis as one script call, counted in order: a
    batch that crosses an account's limit allows up to it, blocks at it and refuses the
    rest, while another account in the same batch is counted on its own."""
    await admit(store, "carol")  # the script is loaded
    with raw(redis_server) as client:
        client.config_resetstat()
    charges = [Charge("alice", T0 + n / 1000, HOUR, 4, 60, "r", client=f"192.0.2.{n}") for n in range(10)]
    charges.insert(5, Charge("bob", T0, HOUR, 4, 60, "r"))
    results = await DeferredList([store.admit(c) for c in charges], fireOnOneErrback=True, consumeErrors=True)
    admissions = [admission for _, admission in results]
    bob = admissions.pop(5)
    assert bob.outcome is Outcome.ALLOWED and bob.count == 1
    assert [(a.outcome, a.count) for a in admissions] == (
        [(Outcome.ALLOWED, n) for n in (1, 2, 3, 4)] + [(Outcome.NEWLY_BLOCKED, 4)] + [(Outcome.BLOCKED, 4)] * 5
    )
    assert admissions[4].block is not None and admissions[4].block.clients == tuple(
        f"192.0.2.{n}" for n in (3, 2, 1, 0)
    )
    with raw(redis_server) as client:
        stats = client.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 1, stats
    assert await store.usage("alice", now=T0 + 1, window=HOUR) == 4


@pytest_twisted.ensureDeferred
async def test_a_busy_turn_goes_out_in_calls_of_admit_early_still_in_order(
    store: RedisStore, redis_server: RedisServer
) -> None:
    """A turn with more recipients than ADMIT_EARLY sends them in several script calls as they
    come; the limit is still exact, crossed in the second call, and the order kept."""
    await admit(store, "carol")  # the script is loaded
    with raw(redis_server) as client:
        client.config_resetstat()
    count = 2 * ADMIT_EARLY + ADMIT_EARLY // 2
    limit = ADMIT_EARLY + 3
    charges = [Charge("alice", T0 + n / 1000, HOUR, limit, 60, "r") for n in range(count)]
    results = await DeferredList([store.admit(c) for c in charges], fireOnOneErrback=True, consumeErrors=True)
    assert [(a.outcome, a.count) for _, a in results] == (
        [(Outcome.ALLOWED, n) for n in range(1, limit + 1)] + [(Outcome.NEWLY_BLOCKED, limit)]
        + [(Outcome.BLOCKED, limit)] * (count - limit - 1)
    )
    with raw(redis_server) as client:
        assert client.info("commandstats")["cmdstat_evalsha"]["calls"] == 3
    assert await store.usage("alice", now=T0 + 1, window=HOUR) == limit


#: A second process counting recipients of one account in batches, as a server does.
COUNTING_PROCESS = """
import json, sys
from twisted.internet import asyncioreactor
asyncioreactor.install()
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from policyd.store import Charge
from policyd.store.redis import RedisStore

async def main():
    store = RedisStore(sys.argv[1], deadline=10.0)
    outcomes = []
    for turn in range(int(sys.argv[2])):
        pending = [store.admit(Charge("shared", 1000.0 + turn + n / 1000, 3600.0, int(sys.argv[3]), 60.0, "r"))
                   for n in range(50)]
        results = await DeferredList(pending, fireOnOneErrback=True, consumeErrors=True)
        outcomes += [admission.outcome.name for _, admission in results]
    await store.close()
    print(json.dumps(outcomes))

failed = []

def run():
    done = ensureDeferred(main())
    done.addErrback(lambda failure: failed.append(failure.getTraceback()))
    done.addBoth(lambda _: reactor.stop())

reactor.callLater(0, run)
reactor.run()
if failed:
    sys.exit(failed[0])
"""


def test_batches_of_two_processes_keep_the_exact_limit(redis_server: RedisServer) -> None:
    """Two processes counting one account in batches of 50 at the same time let exactly
    the limit through, and block it once."""
    if not redis_server.running:
        redis_server.start()
    with raw(redis_server) as client:
        client.flushall()
    limit = 137
    children = [
        subprocess.Popen([sys.executable, "-c", COUNTING_PROCESS, redis_server.url, "8", str(limit)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outcomes: list[str] = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        outcomes += json.loads(out)
    assert len(outcomes) == 800
    assert outcomes.count("ALLOWED") == limit
    assert outcomes.count("NEWLY_BLOCKED") == 1
    assert outcomes.count("BLOCKED") == 800 - limit - 1


@pytest_twisted.ensureDeferred
async def test_admissions_connection_comes_back_after_redis_drops_it(
    store: RedisStore, redis_server: RedisServer
) -> None:
    """Admissions go on a connection of their own, named policyd; when Redis drops it
    (CLIENT KILL), the next admission opens it again and counts on."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    await admit(store)
    with raw(redis_server) as client:
        names = [c["name"] for c in client.client_list()]
        assert "policyd" in names, names
        killed = client.client_kill_filter(_type="normal", skipme=True)
        assert killed >= 1
    await deferLater(reactor, 0.2, lambda: None)
    assert (await admit(store)).count == 2


@pytest_twisted.ensureDeferred
async def test_a_server_that_never_answers_the_greeting_fails_at_the_deadline() -> None:
    """A listener that takes connections but never answers (not Redis, or hung) fails the
    admission at the deadline with a one-line StoreError, and nothing is sent later."""
    import socket as sockets

    listener = sockets.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    silent = RedisStore(f"redis://127.0.0.1:{port}/0", deadline=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError) as raised:
            await admit(silent)
        assert 0.2 <= time.monotonic() - started < 0.3 + MARGIN
        assert f"127.0.0.1:{port}" in one_line_error(raised.value)
    finally:
        await silent.close()
        listener.close()
