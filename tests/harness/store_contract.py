"""The contract every store back end passes (memory, SQLite, Redis).

A test module imports these tests and provides a ``store`` fixture.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted

from policyd.store import AuditEntry, Block, Charge, Exemption, Outcome, Quarantined, Store

HOUR = 3600.0
T0 = 1_700_000_000.0


async def admit(store: Store, account: str = "alice", now: float = T0, limit: int = 3, **extra: Any) -> Any:
    if "notify" in extra:
        extra["notify"] = tuple(extra["notify"])
    return await store.admit(Charge(account, now, HOUR, limit, 3 * 86400, "too many", **extra))


@pytest_twisted.ensureDeferred
async def test_admits_up_to_the_limit_then_blocks(store: Store) -> None:
    """limit recipients pass, the next one is refused and blocks the account."""
    for n in range(1, 4):
        admission = await admit(store, client=f"192.0.2.{n}")
        assert admission.outcome is Outcome.ALLOWED
        assert admission.count == n
    admission = await admit(store, client="192.0.2.9")
    assert admission.outcome is Outcome.NEWLY_BLOCKED
    assert admission.count == 3
    block = admission.block
    assert block.account == "alice"
    assert block.since == T0 and block.until == T0 + 3 * 86400
    assert block.reason == "too many" and block.count == 3
    assert set(block.clients) == {"192.0.2.1", "192.0.2.2", "192.0.2.3"}
    again = await admit(store)
    assert again.outcome is Outcome.BLOCKED
    assert await store.usage("alice", now=T0, window=HOUR) == 3


@pytest_twisted.ensureDeferred
async def test_refused_recipients_are_not_counted(store: Store) -> None:
    """Attempts while blocked never add to the count."""
    for _ in range(10):
        await admit(store, limit=1)
    assert await store.usage("alice", now=T0, window=HOUR) == 1


@pytest_twisted.ensureDeferred
async def test_window_rolls(store: Store) -> None:
    """Recipients older than the window stop counting; no reset at clock-hour boundaries."""
    await admit(store, now=T0)
    await admit(store, now=T0 + 1800)
    await admit(store, now=T0 + 3000)
    assert (await admit(store, now=T0 + 3599)).outcome is Outcome.NEWLY_BLOCKED
    await store.unblock("alice", now=T0 + 3599)
    await admit(store, now=T0)
    await admit(store, now=T0 + 1800)
    await admit(store, now=T0 + 3000)
    assert (await admit(store, now=T0 + 3600)).outcome is Outcome.ALLOWED
    assert await store.usage("alice", now=T0 + 3600, window=HOUR) == 3


@pytest_twisted.ensureDeferred
async def test_accounts_are_independent(store: Store) -> None:
    """One account's sending never counts against another."""
    for _ in range(3):
        await admit(store, "alice")
    assert (await admit(store, "bob")).outcome is Outcome.ALLOWED
    assert await store.usage("bob", now=T0, window=HOUR) == 1


@pytest_twisted.ensureDeferred
async def test_block_expires(store: Store) -> None:
    """A block ends by itself after block_for."""
    for _ in range(4):
        await admit(store, limit=3)
    assert await store.block_of("alice", now=T0 + 3 * 86400 - 1) is not None
    later = T0 + 3 * 86400
    assert await store.block_of("alice", now=later) is None
    assert (await admit(store, now=later)).outcome is Outcome.ALLOWED


@pytest_twisted.ensureDeferred
async def test_unblock_clears_block_and_window(store: Store) -> None:
    """Unblock returns the block, empties the window, and the account sends again."""
    for _ in range(4):
        await admit(store)
    lifted = await store.unblock("alice", now=T0 + 10)
    assert lifted is not None and lifted.account == "alice"
    assert await store.block_of("alice", now=T0 + 10) is None
    assert await store.usage("alice", now=T0 + 10, window=HOUR) == 0
    assert (await admit(store, now=T0 + 10)).count == 1
    assert await store.unblock("bob", now=T0) is None


@pytest_twisted.ensureDeferred
async def test_manual_block_and_listing(store: Store) -> None:
    """An admin's block is live, listed oldest first, and replaces an older one."""
    await store.block(Block("bob", T0 + 5, T0 + 100, "phished", 0, (), "admin"))
    await store.block(Block("alice", T0, T0 + 100, "phished", 0, (), "admin"))
    listed = await store.blocks(now=T0 + 50)
    assert [b.account for b in listed] == ["alice", "bob"]
    assert listed[1] == Block("bob", T0 + 5, T0 + 100, "phished", 0, (), "admin")
    assert (await admit(store, "bob", now=T0 + 50)).outcome is Outcome.BLOCKED
    assert await store.blocks(now=T0 + 100) == []


@pytest_twisted.ensureDeferred
async def test_give_back_uncounts_one_transaction(store: Store) -> None:
    """Recipients of an unfinished transaction are given back, others stay."""
    await admit(store, instance="a1")
    await admit(store, instance="b2")
    await admit(store, instance="b2")
    assert await store.give_back("alice", "b2") == 2
    assert await store.usage("alice", now=T0, window=HOUR) == 1
    assert await store.give_back("alice", "zz") == 0
    assert (await admit(store, instance="c3")).count == 2  # the next decision sees it too


@pytest_twisted.ensureDeferred
async def test_busiest_accounts(store: Store) -> None:
    """The busiest list is ordered by count and leaves out idle accounts."""
    for _ in range(3):
        await admit(store, "carol", limit=10)
    await admit(store, "dave", limit=10)
    assert await store.busiest(now=T0, window=HOUR) == [("carol", 3), ("dave", 1)]
    assert await store.busiest(now=T0 + HOUR, window=HOUR) == []


@pytest_twisted.ensureDeferred
async def test_audit_log_keeps_order(store: Store) -> None:
    """Audit entries come back oldest first, the latest ones when limited."""
    for n in range(5):
        await store.record(AuditEntry(T0 + n, "root", "unblock", f"user{n}", "cleaned"))
    entries = await store.audit(limit=2)
    assert [e.subject for e in entries] == ["user3", "user4"]
    assert entries[0] == AuditEntry(T0 + 3, "root", "unblock", "user3", "cleaned")


@pytest_twisted.ensureDeferred
async def test_audit_search_by_account_and_period(store: Store) -> None:
    """An audit search keeps the entries naming the account as a whole word, from since up to until, the latest limit."""
    subjects = [
        "alice@example.org",
        "alice@example.org.evil",
        "exemption #3 (alice@example.org, 9000/h)",
        "mallory@example.org",
        "quarantine #7 for alice@example.org",
        "al_ce@example.org",
        "alice@example.org",
    ]
    for n, subject in enumerate(subjects):
        await store.record(AuditEntry(T0 + n, "root", "block", subject, "why"))
    alice = await store.audit(account="alice@example.org")
    assert [e.at - T0 for e in alice] == [0, 2, 4, 6]
    assert [e.at - T0 for e in await store.audit(account="alice@example.org", limit=2)] == [4, 6]
    assert [e.at - T0 for e in await store.audit(since=T0 + 2, until=T0 + 4)] == [2, 3]
    both = await store.audit(account="alice@example.org", since=T0 + 1, until=T0 + 6)
    assert [e.subject for e in both] == subjects[2:5:2]
    assert await store.audit(account="al%ce@example.org") == []
    assert await store.audit(account="al_ce@example.org") == [AuditEntry(T0 + 5, "root", "block", subjects[5], "why")]
    assert await store.audit(since=T0 + 100) == []


@pytest_twisted.ensureDeferred
async def test_prune_forgets_old_counts(store: Store) -> None:
    """Pruning drops counts outside the window and keeps the rest."""
    await admit(store, now=T0)
    await admit(store, now=T0 + 1000)
    await store.prune(now=T0 + HOUR + 1, window=HOUR)
    assert await store.usage("alice", now=T0 + HOUR + 1, window=HOUR) == 1


@pytest_twisted.ensureDeferred
async def test_unicode_and_odd_account_names(store: Store) -> None:
    """Account names are opaque text: non-ASCII, quotes and separators round-trip."""
    for name in ["élodie@exemple.fr", "o'brien", "a:b|c", "x" * 300]:
        admission = await admit(store, name, limit=1)
        assert admission.outcome is Outcome.ALLOWED
        assert (await admit(store, name, limit=1)).block.account == name


@pytest_twisted.ensureDeferred
async def test_new_block_queues_one_notice_per_address(store: Store) -> None:
    """A block puts one notice per address in the outbox; later refusals add none."""
    for _ in range(8):
        await admit(store, notify=("helpdesk@example.org", "it@example.org"))
    assert await store.pending_notices() == 2
    notices = await store.claim_notices(now=T0, lease=60)
    assert sorted(n.recipient for n in notices) == ["helpdesk@example.org", "it@example.org"]
    notice = notices[0]
    assert notice.kind == "block" and notice.attempts == 1 and notice.created == T0
    assert notice.payload["account"] == "alice" and notice.payload["count"] == 3


@pytest_twisted.ensureDeferred
async def test_claimed_notices_wait_for_their_lease(store: Store) -> None:
    """A claimed notice is not handed out again until its lease ends."""
    for _ in range(4):
        await admit(store, notify=("helpdesk@example.org",))
    assert len(await store.claim_notices(now=T0, lease=60)) == 1
    assert await store.claim_notices(now=T0 + 59, lease=60) == []
    again = await store.claim_notices(now=T0 + 60, lease=60)
    assert len(again) == 1 and again[0].attempts == 2


@pytest_twisted.ensureDeferred
async def test_failed_notice_is_retried_and_sent_one_is_not(store: Store) -> None:
    """notice_failed schedules a retry with the error; notice_sent ends it for good."""
    for _ in range(4):
        await admit(store, notify=("helpdesk@example.org",))
    (notice,) = await store.claim_notices(now=T0, lease=60)
    await store.notice_failed(notice.id, retry_at=T0 + 10, error="connection refused")
    assert await store.claim_notices(now=T0 + 9, lease=60) == []
    (retry,) = await store.claim_notices(now=T0 + 10, lease=60)
    assert retry.last_error == "connection refused" and retry.attempts == 2
    await store.notice_sent(retry.id, now=T0 + 11)
    assert await store.pending_notices() == 0
    assert await store.claim_notices(now=T0 + 1000, lease=60) == []


@pytest_twisted.ensureDeferred
async def test_notice_backlog_gives_the_oldest_waiting_and_the_failing(store: Store) -> None:
    """The backlog is the oldest waiting notice's queue time and how many failed last; sent ones leave it."""
    assert await store.notice_backlog() == (None, 0)
    await admit(store, "alice", now=T0, limit=1, notify=("helpdesk@example.org",))
    await admit(store, "alice", now=T0, limit=1, notify=("helpdesk@example.org",))
    await admit(store, "bob", now=T0 + 5, limit=1, notify=("helpdesk@example.org",))
    await admit(store, "bob", now=T0 + 5, limit=1, notify=("helpdesk@example.org",))
    assert await store.notice_backlog() == (T0, 0)
    first, second = sorted(await store.claim_notices(now=T0 + 5, lease=60), key=lambda n: n.created)
    await store.notice_failed(first.id, retry_at=T0 + 30, error="connection refused")
    assert await store.notice_backlog() == (T0, 1)
    await store.notice_sent(first.id, now=T0 + 31)
    assert await store.notice_backlog() == (T0 + 5, 0)
    await store.notice_sent(second.id, now=T0 + 31)
    assert await store.notice_backlog() == (None, 0)


@pytest_twisted.ensureDeferred
async def test_exemptions_round_trip(store: Store) -> None:
    """A new exemption gets an id; saving it again replaces it; all come back in id order."""
    first = await store.save_exemption(Exemption(0, "alice", 20000, T0, T0 + HOUR, "newsletter", "jane", T0))
    second = await store.save_exemption(Exemption(0, "bob", 9000, T0, T0 + 60, "launch", "joe", T0 + 1))
    assert first.id and second.id and first.id != second.id
    approved = Exemption(first.id, "alice", 20000, T0, T0 + HOUR, "newsletter", "jane", T0,
                         "approved", "root", T0 + 5, "ok")
    await store.save_exemption(approved)
    assert await store.exemption(first.id) == approved
    assert await store.exemption(99999) is None
    assert [e.account for e in await store.exemptions()] == ["alice", "bob"]


@pytest_twisted.ensureDeferred
async def test_accounts_seen(store: Store) -> None:
    """Accounts noted as authenticating are remembered."""
    assert not await store.account_seen("alice")
    await store.note_account("alice", now=T0)
    assert await store.account_seen("alice")


def held(recipient: str = "bob@example.org", at: float = T0, keep: float = 30 * 86400, **more: object) -> Quarantined:
    """A quarantine entry as the milter makes it (id 0: the store gives one)."""
    fields: dict[str, object] = {
        "id": 0,
        "recipient": recipient,
        "sender": "spammer@example.net",
        "subject": "*{spam}* Gagnez un iPhone",
        "score": 12.5,
        "at": at,
        "until": at + keep,
        "size": 42,
        "client": "192.0.2.7",
        "queue_id": "4XyZ1",
        "reasons": ("url:example.biz", "subject:gagnez"),
    }
    fields.update(more)
    return Quarantined(**fields)  # type: ignore[arg-type]


#: Bytes that are not UTF-8 and a CR LF: a held message comes back byte for byte.
RAW = b"Subject: x\r\n\r\ncaf\xe9 \xff\x00 body\r\n"


@pytest_twisted.ensureDeferred
async def test_quarantine_keeps_the_exact_message(store: Store) -> None:
    """A held message gets an id and comes back with its description and exact bytes."""
    first = await store.quarantine(held(), RAW)
    second = await store.quarantine(held("carol@example.org"), b"other")
    assert first.id and second.id and first.id != second.id
    assert first == held(id=first.id)
    found = await store.quarantined(first.id, now=T0 + 1)
    assert found is not None
    entry, message = found
    assert entry == first and message == RAW
    assert await store.quarantined(99999, now=T0) is None


@pytest_twisted.ensureDeferred
async def test_quarantine_lists_newest_first_by_recipient(store: Store) -> None:
    """Listing shows live entries, newest first, optionally for one recipient."""
    a = await store.quarantine(held("bob@example.org", at=T0), b"a")
    b = await store.quarantine(held("carol@example.org", at=T0 + 10), b"b")
    c = await store.quarantine(held("bob@example.org", at=T0 + 20), b"c")
    assert [e.id for e in await store.quarantine_list(now=T0 + 30)] == [c.id, b.id, a.id]
    assert [e.id for e in await store.quarantine_list(now=T0 + 30, recipient="bob@example.org")] == [c.id, a.id]
    assert [e.id for e in await store.quarantine_list(now=T0 + 30, limit=1)] == [c.id]
    assert await store.quarantine_list(now=T0 + 30, recipient="nobody@example.org") == []


@pytest_twisted.ensureDeferred
async def test_quarantine_delete(store: Store) -> None:
    """A deleted entry is gone; deleting it again says so."""
    entry = await store.quarantine(held(), RAW)
    assert await store.quarantine_delete(entry.id) is True
    assert await store.quarantined(entry.id, now=T0) is None
    assert await store.quarantine_list(now=T0) == []
    assert await store.quarantine_delete(entry.id) is False


@pytest_twisted.ensureDeferred
async def test_quarantine_retention_expires(store: Store) -> None:
    """Entries past their retention are neither listed nor shown, and expiry removes them."""
    short = await store.quarantine(held(at=T0, keep=60), b"short")
    long = await store.quarantine(held(at=T0, keep=3600), b"long")
    assert await store.quarantined(short.id, now=T0 + 60) is None
    assert [e.id for e in await store.quarantine_list(now=T0 + 60)] == [long.id]
    assert await store.quarantine_expire(now=T0 + 60) == 1
    assert await store.quarantine_expire(now=T0 + 60) == 0
    assert await store.quarantine_delete(short.id) is False
    assert (await store.quarantined(long.id, now=T0 + 60)) is not None


@pytest_twisted.ensureDeferred
async def test_quarantine_ids_are_never_given_twice(store: Store) -> None:
    """Deleting, releasing or expiring the newest held message never frees its id for the next one."""
    first = await store.quarantine(held(), RAW)
    second = await store.quarantine(held(), RAW)
    assert await store.quarantine_delete(second.id) is True
    third = await store.quarantine(held(keep=60), RAW)
    assert await store.quarantine_expire(now=T0 + 60) == 1
    fourth = await store.quarantine(held(), RAW)
    ids = [first.id, second.id, third.id, fourth.id]
    assert ids == sorted(set(ids)), ids


@pytest_twisted.ensureDeferred
async def test_spam_preferences(store: Store) -> None:
    """A recipient's spam choice is recorded, replaced, looked up in bulk and forgotten."""
    assert await store.preferences(["bob@example.org"]) == {}
    await store.set_preference("bob@example.org", "quarantine")
    await store.set_preference("élodie@exemple.fr", "inbox")
    await store.set_preference("bob@example.org", "inbox")
    assert await store.preferences(["bob@example.org", "x@example.org", "bob@example.org"]) == {
        "bob@example.org": "inbox"
    }
    assert await store.preferences() == {"bob@example.org": "inbox", "élodie@exemple.fr": "inbox"}
    await store.set_preference("bob@example.org", None)
    assert await store.preferences() == {"élodie@exemple.fr": "inbox"}
    assert await store.preferences([]) == {}


@pytest_twisted.ensureDeferred
async def test_one_release_claim_at_a_time(store: Store) -> None:
    """A release claim is taken once until it ends or its lease passes; deleting the message drops it."""
    entry = await store.quarantine(held(), RAW)
    assert await store.claim_release(entry.id, now=T0, lease=600) is True
    assert await store.claim_release(entry.id, now=T0 + 599, lease=600) is False
    assert await store.claim_release(entry.id, now=T0 + 600, lease=600) is True  # the first one died
    await store.end_claim(entry.id)
    assert await store.claim_release(entry.id, now=T0 + 601, lease=600) is True
    other = await store.quarantine(held("carol@example.org"), RAW)
    assert await store.claim_release(other.id, now=T0 + 601, lease=600) is True
    assert await store.quarantine_delete(entry.id) is True
    assert await store.quarantined(entry.id, now=T0 + 602) is None
    assert await store.claim_release(other.id, now=T0 + 602, lease=600) is False


@pytest_twisted.ensureDeferred
async def test_quarantine_list_since(store: Store) -> None:
    """since= lists only what was held after that time (the digest's period)."""
    old = await store.quarantine(held(at=T0), b"old")
    new = await store.quarantine(held(at=T0 + 100), b"new")
    other = await store.quarantine(held("carol@example.org", at=T0 + 200), b"other")
    assert [e.id for e in await store.quarantine_list(now=T0 + 300, since=T0)] == [other.id, new.id]
    assert [e.id for e in await store.quarantine_list(now=T0 + 300, since=T0 + 100)] == [other.id]
    assert [e.id for e in await store.quarantine_list(now=T0 + 300, since=None)] == [other.id, new.id, old.id]
    listed = await store.quarantine_list(now=T0 + 300, since=T0 - 1, recipient="bob@example.org")
    assert [e.id for e in listed] == [new.id, old.id]


@pytest_twisted.ensureDeferred
async def test_digest_is_queued_once_per_period(store: Store) -> None:
    """queue_digest moves the mark and queues the notices together, once; a stale mark changes nothing."""
    assert await store.digest_mark() is None
    payload = {"ids": [3, 1], "total": 2, "since": None, "until": T0}
    assert await store.queue_digest(since=None, until=T0, notices=[("bob@example.org", payload)]) is True
    assert await store.digest_mark() == T0
    # A second server that read the mark before the first moved it: nothing more.
    assert await store.queue_digest(since=None, until=T0 + 1, notices=[("bob@example.org", payload)]) is False
    assert await store.digest_mark() == T0
    (notice,) = await store.claim_notices(now=T0, lease=60)
    assert notice.kind == "digest" and notice.recipient == "bob@example.org"
    assert notice.payload == payload and notice.created == T0 and notice.attempts == 1
    # An empty period moves the mark too, and queues nothing.
    assert await store.queue_digest(since=T0, until=T0 + 86400.25, notices=[]) is True
    assert await store.digest_mark() == T0 + 86400.25
    assert await store.pending_notices() == 1


#: Beyond what SQLite and Redis hold as integers: an id or a count an outsider may send.
HUGE = 2**70


@pytest_twisted.ensureDeferred
async def test_ids_beyond_64_bits_are_unknown_and_limits_are_bounded(store: Store) -> None:
    """An id beyond 64 bits is no such entry; a limit of 0 or less lists nothing, a huge one lists all."""
    entry = await store.quarantine(held(), RAW)
    await store.record(AuditEntry(T0, "jane", "block", "alice", "phished"))
    await admit(store)
    assert await store.quarantined(HUGE, now=T0) is None
    assert await store.quarantined(-HUGE, now=T0) is None
    assert await store.exemption(HUGE) is None
    assert await store.quarantine_delete(HUGE) is False
    for limit in (0, -5, -HUGE):
        assert await store.audit(limit=limit) == []
        assert await store.quarantine_list(now=T0, limit=limit) == []
        assert await store.busiest(now=T0, window=HOUR, limit=limit) == []
    assert len(await store.audit(limit=HUGE)) == 1
    assert [e.id for e in await store.quarantine_list(now=T0, limit=HUGE)] == [entry.id]
    assert await store.busiest(now=T0, window=HOUR, limit=HUGE) == [("alice", 1)]
