"""The Redis audit search reads the list page by page from its end, on a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_twisted

from policyd.store import AuditEntry
from policyd.store.redis import RedisStore
from policyd.store.redis import records as redis_records
from tests.harness.redis_server import RedisServer, running_redis

T0 = 1_700_000_000.0


@pytest.fixture
def store() -> Iterator[RedisStore]:
    """A RedisStore on its own empty redis-server."""
    server: RedisServer
    with running_redis() as server:
        opened = RedisStore(server.url, deadline=2.0)
        yield opened
        pytest_twisted.blockon(opened.close())


@pytest_twisted.ensureDeferred
async def test_search_crosses_pages_and_stops_before_since(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """With pages of 4, a search finds matches spread over pages, keeps the latest limit, and ignores pages before since."""
    monkeypatch.setattr(redis_records, "AUDIT_PAGE", 4)
    for n in range(23):
        subject = "alice@example.org" if n % 5 == 0 else f"user{n}@example.org"
        await store.record(AuditEntry(T0 + n, "root", "block", subject, f"n={n}"))
    alice = await store.audit(account="alice@example.org")
    assert [e.reason for e in alice] == ["n=0", "n=5", "n=10", "n=15", "n=20"]
    assert [e.reason for e in await store.audit(account="alice@example.org", limit=3)] == ["n=10", "n=15", "n=20"]
    assert [e.reason for e in await store.audit(since=T0 + 17, until=T0 + 19)] == ["n=17", "n=18"]
    assert [e.reason for e in await store.audit(account="alice@example.org", since=T0 + 4)] == ["n=5", "n=10", "n=15", "n=20"]
    assert len(await store.audit(limit=100)) == 23
