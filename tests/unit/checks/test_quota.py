"""The outbound quota and blocks through PolicyService, with a fake clock and memory store."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.task import Clock

from policyd.checks import quota
from policyd.errors import StoreError
from policyd.policy import PolicyService
from policyd.protocols.policy import Action
from policyd.store.memory import MemoryStore
from policyd.testing import rcpt, request
from tests.conftest import make_config

BASE = """
local_domains: [example.org, exämple.fr]
outbound:
  limit: 5
"""


def service(extra: str = "", store: Any = None, base: str = BASE) -> tuple[PolicyService, Clock, Any]:
    clock = Clock()
    clock.advance(1_700_000_000)
    store = store if store is not None else MemoryStore()
    return PolicyService(make_config(base + extra), store, clock), clock, store


def decide(svc: PolicyService, session: object = None, **attributes: str) -> Action:
    result: list[Action] = []
    maybeDeferred(svc.decide, request(rcpt(**attributes), session)).addCallback(result.append)
    assert result, "decision did not complete synchronously"
    return result[0]


def send(svc: PolicyService, n: int, account: str = "alice", to: str = "x@gmail.com") -> list[str]:
    return [decide(svc, sasl_username=account, recipient=to).word for _ in range(n)]


def test_limit_passes_and_next_recipient_blocks() -> None:
    """limit external recipients pass; the next is refused with a 'blocked' text and blocks."""
    svc, _, store = service()
    assert send(svc, 5) == ["DUNNO"] * 5
    refused = decide(svc, sasl_username="alice", recipient="y@gmail.com")
    assert refused.word == "REJECT"
    assert refused.text.startswith("5.7.1 ")
    assert "blocked" in refused.text and "IT support" in refused.text
    assert "alice" in store.live_blocks


def test_default_limit_is_5000() -> None:
    """With the default limit, 5,000 recipients pass and the 5,001st is refused."""
    svc, _, _ = service(base="local_domains: [example.org]\n")
    words = send(svc, 5001)
    assert words[:5000] == ["DUNNO"] * 5000
    assert words[5000] == "REJECT"


def test_blocked_account_is_refused_everything_and_not_counted() -> None:
    """While blocked, every attempt is refused (local recipients too) and none counts."""
    svc, clock, store = service()
    send(svc, 6)
    assert send(svc, 3) == ["REJECT"] * 3
    assert decide(svc, sasl_username="alice", recipient="bob@example.org").word == "REJECT"
    assert len(store.sends["alice"]) == 5
    assert store.live_blocks["alice"].count == 5


def test_local_recipients_never_count() -> None:
    """Local domains (any case, IDNA or Unicode) are never counted."""
    svc, _, store = service()
    for to in ["bob@example.org", "BOB@Example.ORG", "c@xn--exmple-cua.fr", "d@EXÄMPLE.fr", "postmaster"]:
        for _ in range(10):
            assert decide(svc, sasl_username="alice", recipient=to).word == "DUNNO"
    assert "alice" not in store.sends or not store.sends["alice"]
    assert send(svc, 5) == ["DUNNO"] * 5


def test_subdomain_of_local_domain_is_external() -> None:
    """Only the listed domains are local: a subdomain is not."""
    svc, _, store = service()
    decide(svc, sasl_username="alice", recipient="x@mail.example.org")
    assert len(store.sends["alice"]) == 1


def test_account_is_case_insensitive() -> None:
    """ALICE and alice are one account."""
    svc, _, store = service()
    send(svc, 3, "Alice")
    send(svc, 2, "ALICE")
    assert decide(svc, sasl_username="alice", recipient="x@gmail.com").word == "REJECT"


def test_window_rolls_with_the_clock() -> None:
    """A rolling hour: recipients leave the window one by one, not at clock-hour boundaries."""
    svc, clock, _ = service()
    send(svc, 3)
    clock.advance(1800)
    send(svc, 2)
    clock.advance(1799)
    assert send(svc, 1) == ["REJECT"]


def test_window_frees_room_after_an_hour() -> None:
    """Recipients an hour old stop counting."""
    svc, clock, _ = service()
    send(svc, 5)
    clock.advance(3600)
    assert send(svc, 5) == ["DUNNO"] * 5


def test_only_rcpt_is_counted() -> None:
    """CONNECT, MAIL, DATA and END-OF-MESSAGE get DUNNO and count nothing."""
    svc, _, store = service()
    for state in ["CONNECT", "EHLO", "MAIL", "DATA", "END-OF-MESSAGE", "VRFY"]:
        for _ in range(10):
            assert decide(svc, sasl_username="alice", recipient="x@gmail.com", protocol_state=state).word == "DUNNO"
    assert not store.sends.get("alice")


def test_message_is_delivered_to_recipients_before_the_limit() -> None:
    """Once blocked, END-OF-MESSAGE still gets DUNNO so accepted recipients get the mail."""
    svc, _, _ = service()
    send(svc, 6)
    assert decide(svc, sasl_username="alice", protocol_state="END-OF-MESSAGE").word == "DUNNO"


def test_unblock_lets_the_account_send_again_and_the_burst_does_not_reblock() -> None:
    """Unblock clears the window: the account gets a full limit again."""
    svc, clock, store = service()
    send(svc, 6)
    clock.advance(60)
    store.unblock("alice", now=clock.seconds())
    assert send(svc, 5) == ["DUNNO"] * 5
    assert send(svc, 1) == ["REJECT"]


def test_block_expires_after_block_for() -> None:
    """The block lasts outbound.block_for, then the account sends again."""
    svc, clock, _ = service("  block_for: 2h\n")
    send(svc, 6)
    clock.advance(7199)
    assert send(svc, 1) == ["REJECT"]
    clock.advance(1)
    assert send(svc, 1) == ["DUNNO"]


def test_block_records_clients_and_is_audited() -> None:
    """A block keeps the client addresses seen and leaves an audit entry."""
    svc, _, store = service()
    for n in range(5):
        decide(svc, sasl_username="alice", recipient="x@gmail.com", client_address=f"198.51.100.{n}")
    decide(svc, sasl_username="alice", recipient="x@gmail.com")
    block = store.live_blocks["alice"]
    assert set(block.clients) == {f"198.51.100.{n}" for n in range(5)}
    assert "more than 5 external recipients in 1h" in block.reason
    assert [(e.action, e.subject, e.who) for e in store.entries] == [("block", "alice", "policyd")]


def test_per_account_override() -> None:
    """outbound.overrides raises (or lowers) one account's limit."""
    svc, _, _ = service("  overrides:\n    Bulk@Example.org: 8\n")
    assert send(svc, 9, "bulk@example.org")[-2:] == ["DUNNO", "REJECT"]
    assert send(svc, 6, "other")[-1] == "REJECT"


def test_blocked_action_defer() -> None:
    """blocked_action: defer answers DEFER 4.7.1 instead of REJECT 5.7.1."""
    svc, _, _ = service("  blocked_action: defer\n")
    assert send(svc, 6)[-1] == "DEFER"
    action = decide(svc, sasl_username="alice", recipient="x@gmail.com")
    assert action.text.startswith("4.7.1 ")


def test_french_texts() -> None:
    """language: fr gives the shipped French text, with 'bloqué'."""
    svc, _, _ = service("language: fr\n")
    send(svc, 5)
    action = decide(svc, sasl_username="alice", recipient="x@gmail.com")
    assert "bloqué" in action.text


def test_trusted_network_is_charged_to_the_sender() -> None:
    """A trusted client without SASL is counted against its envelope sender."""
    svc, _, store = service("trusted_networks: [192.0.2.0/24]\n")
    decide(svc, recipient="x@gmail.com", sender="Web@Example.org", client_address="192.0.2.5")
    assert len(store.sends["web@example.org"]) == 1


def test_untrusted_unauthenticated_client_is_not_counted() -> None:
    """Unauthenticated clients get the inbound checks, never the quota."""
    svc, _, store = service()
    for _ in range(10):
        assert decide(svc, recipient="x@gmail.com", client_address="203.0.113.9").word == "DUNNO"
    assert not store.sends


def test_loopback_is_not_exempt() -> None:
    """An authenticated client on 127.0.0.1 is counted like any other."""
    svc, _, _ = service()
    words = [decide(svc, sasl_username="alice", recipient="x@gmail.com", client_address="127.0.0.1").word for _ in range(6)]
    assert words[-1] == "REJECT"


def test_policy_context_selects_checks() -> None:
    """policy_context=submission counts; inbound does not; an unknown one answers DUNNO."""
    svc, _, store = service()
    decide(svc, sasl_username="alice", recipient="x@gmail.com", policy_context="inbound")
    assert not store.sends
    decide(svc, sasl_username="alice", recipient="x@gmail.com", policy_context="submission")
    assert len(store.sends["alice"]) == 1
    assert decide(svc, sasl_username="alice", recipient="x@gmail.com", policy_context="bogus").word == "DUNNO"
    assert len(store.sends["alice"]) == 1


def test_submission_without_account_answers_dunno() -> None:
    """policy_context=submission but no account: nothing to charge, DUNNO."""
    svc, _, store = service()
    assert decide(svc, recipient="x@gmail.com", policy_context="submission").word == "DUNNO"
    assert not store.sends


class FailingStore(MemoryStore):
    """A store whose admit fails or never answers."""

    bounded = False

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def admit(self, charge: Any) -> Deferred[Any]:
        if self.mode == "error":
            return fail(StoreError("disk I/O error"))
        return Deferred()

    def block_of(self, account: str, *, now: float) -> Deferred[Any]:
        return fail(StoreError("disk I/O error"))


@pytest.mark.parametrize(("on_error", "word"), [("dunno", "DUNNO"), ("defer_if_permit", "DEFER_IF_PERMIT")])
def test_store_error_follows_on_error_and_fallback_limits(on_error: str, word: str) -> None:
    """With the store failing, replies follow store.on_error and the in-process limiter holds."""
    svc, _, _ = service(f"store:\n  on_error: {on_error}\n", store=FailingStore("error"))
    words = send(svc, 8)
    assert words[:5] == [word] * 5
    assert words[5:] == ["DEFER"] * 3
    assert decide(svc, sasl_username="alice", recipient="b@example.org").word == word


def test_store_timeout_replies_within_the_deadline() -> None:
    """A store that never answers: the reply comes when store.deadline passes."""
    svc, clock, _ = service("store:\n  deadline: 1s\n", store=FailingStore("hang"))
    result: list[Action] = []
    maybeDeferred(svc.decide, request(rcpt(sasl_username="alice", recipient="x@gmail.com"))).addCallback(result.append)
    assert result == []
    clock.advance(0.999)
    assert result == []
    clock.advance(0.002)
    assert [a.word for a in result] == ["DUNNO"]


def test_fallback_counts_what_the_store_let_through() -> None:
    """Recipients counted before an outage still count in the in-process limiter."""
    store = MemoryStore()
    svc, _, _ = service(store=store)
    send(svc, 4)
    svc.quota.store = FailingStore("error")
    assert send(svc, 3) == ["DUNNO", "DEFER", "DEFER"]


class FlakyStore(MemoryStore):
    """A memory store that fails while ``down`` (and counts the admits it was asked)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def admit(self, charge: Any) -> Deferred[Any]:
        if self.down:
            return fail(StoreError("disk I/O error"))
        return super().admit(charge)


def usage(store: MemoryStore, clock: Clock, account: str = "alice") -> int:
    counted: list[int] = []
    store.usage(account, now=clock.seconds(), window=3600).addCallback(counted.append)
    return counted[0]


def test_recipients_let_through_during_an_outage_are_counted_when_the_store_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What the fallback limiter let through reaches the store, with its time, and can block the account."""
    store = FlakyStore()
    svc, clock, _ = service(store=store)
    assert send(svc, 1) == ["DUNNO"]
    store.down = True
    clock.advance(10)
    assert send(svc, 3) == ["DUNNO"] * 3
    assert usage(store, clock) == 1 and len(svc.quota.unwritten) == 3
    store.down = False
    clock.advance(10)
    with caplog.at_level(logging.INFO, "policyd.quota"):
        assert send(svc, 1) == ["DUNNO"]
    assert "counted in the store 3 recipients let through" in caplog.text
    assert usage(store, clock) == 5 and not svc.quota.unwritten
    times = sorted(at for at, *_ in store.sends["alice"])
    assert times == [1_700_000_000.0, *[1_700_000_010.0] * 3, 1_700_000_020.0]
    assert send(svc, 1) == ["REJECT"]  # the sixth recipient in the hour: blocked


def test_a_store_failing_again_keeps_the_rest_and_old_recipients_are_dropped() -> None:
    """Counting after an outage stops at the next failure, and what left the window is not counted."""
    store = FlakyStore()
    svc, clock, _ = service(store=store)
    store.down = True
    assert send(svc, 2) == ["DUNNO"] * 2
    clock.advance(3601)
    assert send(svc, 2) == ["DUNNO"] * 2
    assert len(svc.quota.unwritten) == 4
    store.down = False
    assert send(svc, 1) == ["DUNNO"]
    assert usage(store, clock) == 3 and not svc.quota.unwritten  # the first two were over an hour old


def test_a_long_outage_is_counted_a_batch_per_reactor_turn() -> None:
    """With a store that answers at once, counting after an outage leaves the reactor between batches."""
    store = FlakyStore()
    svc, clock, _ = service(store=store, base="local_domains: [example.org]\noutbound:\n  limit: 2000\n")
    store.down = True
    assert set(send(svc, 1200)) == {"DUNNO"}
    store.down = False
    send(svc, 1)
    assert usage(store, clock) == 1 + quota.WRITE_BACK_BATCH
    assert len(svc.quota.unwritten) == 1200 - quota.WRITE_BACK_BATCH  # the rest waits for the reactor
    clock.advance(0)
    assert usage(store, clock) == 1201 and not svc.quota.unwritten


class LaterStore(FlakyStore):
    """A FlakyStore whose answers come later, when the test lets them go."""

    bounded = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[tuple[Deferred[Any], Any]] = []

    def admit(self, charge: Any) -> Deferred[Any]:
        later: Deferred[Any] = Deferred()
        self.waiting.append((later, charge))
        return later

    def answer_all(self) -> None:
        while self.waiting:
            later, charge = self.waiting.pop(0)
            super().admit(charge).chainDeferred(later)


def test_a_store_that_answers_later_gets_the_outage_one_recipient_at_a_time() -> None:
    """With a store that answers later, each recipient of the outage is sent once the one before is counted."""
    store = LaterStore()
    svc, clock, _ = service(store=store)
    store.down = True
    for _ in range(3):
        maybeDeferred(svc.decide, request(rcpt(sasl_username="alice", recipient="x@gmail.com")))
    store.answer_all()
    assert len(svc.quota.unwritten) == 3
    store.down = False
    maybeDeferred(svc.decide, request(rcpt(sasl_username="alice", recipient="x@gmail.com")))
    store.answer_all()
    assert usage(store, clock) == 4 and not svc.quota.unwritten and not store.waiting


def test_deferred_recipients_of_an_outage_are_not_counted_afterwards() -> None:
    """With store.on_error defer_if_permit nothing went out during the outage: nothing to count later."""
    store = FlakyStore()
    svc, clock, _ = service("store:\n  on_error: defer_if_permit\n", store=store)
    store.down = True
    assert send(svc, 2) == ["DEFER_IF_PERMIT"] * 2
    store.down = False
    assert send(svc, 1) == ["DUNNO"]
    assert usage(store, clock) == 1


def test_give_back_of_unfinished_transaction() -> None:
    """With give_back, recipients of an instance that never reached END-OF-MESSAGE are given back."""
    svc, _, store = service("  give_back: true\n")
    conn = object()
    for _ in range(3):
        decide(svc, conn, sasl_username="alice", recipient="x@gmail.com", instance="t1")
    # A new transaction on the same connection without END-OF-MESSAGE for t1.
    decide(svc, conn, sasl_username="alice", recipient="x@gmail.com", instance="t2")
    assert [s[1] for s in store.sends["alice"]] == ["t2"]
    decide(svc, conn, sasl_username="alice", protocol_state="END-OF-MESSAGE", instance="t2")
    decide(svc, conn, sasl_username="alice", recipient="x@gmail.com", instance="t3")
    assert [s[1] for s in store.sends["alice"]] == ["t2", "t3"]
    svc.connection_closed(conn)
    assert [s[1] for s in store.sends["alice"]] == ["t2"]


def test_without_give_back_aborted_transactions_still_count() -> None:
    """By default every recipient let through at RCPT counts."""
    svc, _, store = service()
    conn = object()
    for instance in ["t1", "t2", "t3"]:
        decide(svc, conn, sasl_username="alice", recipient="x@gmail.com", instance=instance)
    svc.connection_closed(conn)
    assert len(store.sends["alice"]) == 3


def test_reload_applies_a_new_limit() -> None:
    """configure() with a new outbound.limit applies to the next request."""
    svc, _, _ = service()
    send(svc, 5)
    svc.configure(make_config(BASE.replace("limit: 5", "limit: 7")))
    assert send(svc, 3) == ["DUNNO", "DUNNO", "REJECT"]


def test_settled_takes_a_fired_result_and_leaves_a_waiting_one() -> None:
    """A fired Deferred gives its result (or failure, then handled) at once; a waiting one keeps it."""
    from twisted.internet.defer import succeed
    from twisted.python.failure import Failure

    from policyd.checks.quota import settled

    assert settled(succeed(3)) == 3
    failed = settled(fail(ValueError("broken")))
    assert isinstance(failed, Failure) and failed.check(ValueError)
    waiting: Deferred[int] = Deferred()
    assert settled(waiting) is None
    later: list[int] = []
    waiting.addCallback(later.append)
    waiting.callback(5)
    assert later == [5]
    inner: Deferred[int] = Deferred()
    outer: Deferred[int] = succeed(0).addCallback(lambda _: inner)
    assert settled(outer) is None  # fired, but waits on another
    outer.addCallback(later.append)
    inner.callback(7)
    assert later == [5, 7]
