"""What the quota keeps in memory per account stays bounded and answers the same."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed

from policyd.checks import quota
from policyd.checks.quota import FallbackLimiter
from policyd.store.memory import MemoryStore
from policyd.store.sqlite.schema import AccountWindow
from tests.unit.checks.test_quota import decide, service


class NotingStore(MemoryStore):
    """A memory store that remembers every note_account call."""

    def __init__(self) -> None:
        super().__init__()
        self.notes: list[tuple[str, float]] = []

    def note_account(self, account: str, *, now: float) -> Deferred[None]:
        self.notes.append((account, now))
        return succeed(None)


def test_an_account_is_noted_once_in_an_hour_and_again_within_two() -> None:
    """An authenticating account is noted in the store at its first request, not at the
    next ones of the same hour, and again within the two hours after."""
    store = NotingStore()
    svc, clock, _ = service(store=store)
    for _ in range(3):
        decide(svc, sasl_username="alice", recipient="x@gmail.com")
    assert [a for a, _ in store.notes] == ["alice"]
    clock.advance(3000)
    decide(svc, sasl_username="alice", recipient="x@gmail.com")
    decide(svc, sasl_username="bob", recipient="x@gmail.com")
    assert [a for a, _ in store.notes] == ["alice", "bob"]
    clock.advance(2 * quota.NOTE_EVERY + 1)
    decide(svc, sasl_username="alice", recipient="x@gmail.com")
    assert [a for a, _ in store.notes] == ["alice", "bob", "alice"]


def test_noted_accounts_are_bounded(monkeypatch: Any) -> None:
    """Past MAX_NOTED accounts in an hour, the older set is let go: memory holds two sets at most."""
    monkeypatch.setattr(quota, "MAX_NOTED", 10)
    store = NotingStore()
    svc, _, _ = service(store=store)
    for n in range(35):
        decide(svc, sasl_username=f"user{n}", recipient="x@example.net")
    check = svc.quota
    assert len(check._noted) <= 10 and len(check._noted_before) <= 10
    assert len(store.notes) == 35


def test_local_domains_are_worked_out_once_per_domain_and_bounded(monkeypatch: Any) -> None:
    """Local and external recipients are told apart as before (case, IDN, subdomains), and
    the cache of domains stays within MAX_CACHED."""
    monkeypatch.setattr(quota, "MAX_CACHED", 3)
    svc, _, store = service()
    for recipient in ("bob@EXAMPLE.org", "bob@xn--exmple-cua.fr", "bob@Exämple.fr", "bob@example.org."):
        assert decide(svc, sasl_username="alice", recipient=recipient).word == "DUNNO"
    assert len(store.sends.get("alice", ())) == 0
    for n in range(4):
        decide(svc, sasl_username="alice", recipient=f"x@d{n}.example.net")
    assert len(svc.quota._local_domains) <= 3
    assert len(store.sends["alice"]) == 4
    assert decide(svc, sasl_username="alice", recipient="sub@mail.example.org").word == "DUNNO"
    assert len(store.sends["alice"]) == 5  # a subdomain of a local domain is external


def test_fallback_limiter_keeps_times_in_order_and_forgets_old_ones() -> None:
    """Times noted out of order are kept in order; the window and prune forget old ones."""
    limiter = FallbackLimiter()
    for at in (10.0, 30.0, 20.0, 5.0, 40.0):
        limiter.note("alice", at)
    assert list(limiter._sends["alice"]) == [5.0, 10.0, 20.0, 30.0, 40.0]
    # Window of 25 s at 45: 30 and 40 remain (20 is at its start); a limit of 3 allows one more.
    assert limiter.allows("alice", 45.0, 25.0, 3)
    assert list(limiter._sends["alice"]) == [30.0, 40.0, 45.0]
    assert not limiter.allows("alice", 45.0, 25.0, 3)
    limiter.prune(100.0, 25.0)
    assert "alice" not in limiter._sends


def test_fallback_limiter_keeps_whole_seconds_rounded_up_in_4_bytes() -> None:
    """A recipient is kept as its second, rounded up: remembered up to a second longer, never shorter."""
    limiter = FallbackLimiter()
    limiter.note("alice", 1_700_000_000.2)
    sends = limiter._sends["alice"]
    assert sends.itemsize == 4 and list(sends) == [1_700_000_001]
    # A window of 60 s: still counted 60.5 s later (its second is 1_700_000_001), gone 61 s later.
    assert not limiter.allows("alice", 1_700_000_060.7, 60.0, 1)
    assert limiter.allows("alice", 1_700_000_061.0, 60.0, 1)
    # A clock outside what 4 bytes hold does not break the limiter.
    limiter.note("bob", -5.0)
    limiter.note("bob", 2.0**40)
    assert len(limiter._sends["bob"]) == 2


def test_account_window_expires_up_to_and_including_the_start() -> None:
    """A window forgets the recipients at or before the start, keeps the rest in order."""
    window = AccountWindow()
    for at in (1.0, 3.0, 2.0, 5.0, 4.0):
        window.add(at, "192.0.2.1")
    assert list(window.sends) == [1.0, 2.0, 3.0, 4.0, 5.0]
    window.expire(3.0)
    assert list(window.sends) == [4.0, 5.0]
    window.expire(0.5)
    assert list(window.sends) == [4.0, 5.0]
    window.expire(9.0)
    assert len(window.sends) == 0


def test_a_failing_sqlite_store_hands_its_count_to_the_fallback_limiter(tmp_path: Any) -> None:
    """With SQLite, the fallback limiter keeps no second copy of the counts: when an
    admission fails, it starts from what the server's copy in memory counted, so the
    limit still holds."""
    import sqlite3

    from twisted.internet.task import Clock

    from policyd.policy import PolicyService
    from policyd.store.sqlite import SQLiteStore
    from tests.conftest import make_config
    from tests.unit.checks.test_quota import BASE

    clock = Clock()
    clock.advance(1_700_000_000)
    store = SQLiteStore(str(tmp_path / "state.db"), reactor=clock)
    svc = PolicyService(make_config(BASE), store, clock)
    assert [decide(svc, sasl_username="alice", recipient="x@gmail.com").word for _ in range(3)] == ["DUNNO"] * 3
    assert "alice" not in svc.quota.fallback._sends

    def broken(*_: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    # The file fails when the server next looks for other connections' writes
    # (every WRITE_EVERY seconds): each request below comes that much later.
    store._follow = broken  # type: ignore[method-assign,assignment]
    words = []
    for _ in range(4):
        clock.advance(0.02)
        words.append(decide(svc, sasl_username="alice", recipient="x@gmail.com").word)
    assert words == ["DUNNO", "DUNNO", "DEFER", "DEFER"]
    clock.advance(0.1)
    store.close()
