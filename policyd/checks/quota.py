"""The outbound quota: external recipients per account per rolling hour (SPEC 4)."""

from __future__ import annotations

import bisect
import logging
import math
import sys
from array import array
from collections import deque
from collections.abc import Callable
from typing import Protocol, TypeVar, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from policyd.addresses import domain_of
from policyd.checks import ON_ERROR, Verdict
from policyd.config import Config, format_duration, read_domain_list
from policyd.metrics import Metrics
from policyd.netlists import NetworkSet
from policyd.protocols.policy import DUNNO, Action, Request
from policyd.store import Admission, Block, Charge, Counts, Exemption, Exemptions, Outcome
from policyd.texts import Texts

log = logging.getLogger("policyd.quota")

T = TypeVar("T")

#: Seconds between reloads of approved exemptions: an approval applies within this.
EXEMPTION_REFRESH = 2.0
#: Seconds between two notes that an account authenticated.
NOTE_EVERY = 3600.0

#: Recipients let through during a store outage kept for the store (the oldest go first).
MAX_UNWRITTEN = 100_000

#: The limit a recipient counted after an outage is counted with: it went out already.
UNLIMITED = 1 << 40

#: Recipients of an outage counted per reactor turn, with a store that answers at once.
WRITE_BACK_BATCH = 500

#: Most accounts noted as authenticating in one hour before the notes start again.
MAX_NOTED = 200_000
#: Most entries of a cache worked out from the configuration (notification addresses).
MAX_CACHED = 10_000




class QuotaStore(Counts, Exemptions, Protocol):
    """What the quota needs of the store: counts and blocks, and the exemptions in force."""

def settled(deferred: Deferred[T]) -> T | Failure | None:
    """The result of a Deferred that has fired, taken out of it; None while it waits.

    A Deferred still waiting (on another one it was chained to) keeps its
    result for the callbacks added after this.
    """
    if deferred.called and not deferred.paused:
        # Fired, and its callbacks have run: its value can be read where it
        # lies (a Failure is taken out below, so it is never reported as unhandled).
        value = deferred.result
        if not isinstance(value, Failure | Deferred):
            return cast(T, value)
    seen: list[T | Failure] = []
    waiting = False

    def take(result: T | Failure) -> T | Failure | None:
        if waiting:
            return result
        seen.append(result)
        return None

    deferred.addBoth(take)
    if seen:
        return seen[0]
    waiting = True
    return None


class FallbackLimiter:
    """The quota in this process's memory, used while the store cannot answer.

    It counts every recipient let through, so when the store fails the
    process still knows each account's recent sending and keeps applying the
    limit on its own: an outage never means unlimited sending.  Each
    account's times are an array of whole POSIX seconds, rounded up (4 bytes
    a recipient): a recipient is remembered up to a second longer than its
    window, never shorter, which is all a limit kept through an outage needs.
    """

    def __init__(self) -> None:
        self._sends: dict[str, array[int]] = {}

    def note(self, account: str, now: float) -> None:
        """Count one recipient let through."""
        sends = self._sends.get(account)
        if sends is None:
            sends = self._sends[account] = array("I")
        at = math.ceil(now)
        try:
            if not sends or at >= sends[-1]:
                sends.append(at)
            else:
                sends.insert(bisect.bisect_right(sends, at), at)
        except OverflowError:  # a clock before 1970 or after 2106
            sends.append(sends[-1] if sends else 0)

    def allows(self, account: str, now: float, window: float, limit: int) -> bool:
        """Whether one more recipient stays within the limit (and count it if so)."""
        sends = self._sends.get(account)
        if sends is not None:
            _expire(sends, now - window)
            if len(sends) >= limit:
                return False
        self.note(account, now)
        return True

    def forget(self, account: str) -> None:
        """Clear an account (it was unblocked)."""
        self._sends.pop(account, None)

    def prune(self, now: float, window: float) -> None:
        """Drop accounts with nothing left in the window."""
        start = now - window
        for account in list(self._sends):
            sends = self._sends[account]
            _expire(sends, start)
            if not sends:
                del self._sends[account]


def _expire(sends: array[int], start: float) -> None:
    """Forget the times at or before ``start`` (``sends`` is in order)."""
    if sends and sends[0] <= start:
        del sends[: bisect.bisect_right(sends, start)]


class OutboundQuota:
    """Counts external recipients of authenticated senders and blocks on excess.

    :param config: the configuration in force.
    :param store: where counts and blocks live.
    :param clock: time source (the reactor, or a fake clock in tests).
    :param on_block: told of every new block (notifications, audit).
    :param metrics: the server's Prometheus metrics; None keeps none.
    """

    name = "quota"

    def __init__(
        self,
        config: Config,
        store: QuotaStore,
        clock: IReactorTime,
        on_block: Callable[[Block], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        #: Whether the store answers within its own bound (no timer per request then).
        self._bounded = getattr(store, "bounded", False)
        #: The store's count of a recipient when it can tell at once (SQLite; see check).
        self._count_at_once: Callable[[str, float, float, int, str, str], int] | None = getattr(
            store, "count_at_once", None
        )
        #: Accounts by SASL login as sent (interned, lower case).
        self._accounts: dict[str, str] = {}
        self.clock = clock
        self.on_block = on_block
        self.fallback = FallbackLimiter()
        #: Recipients the fallback limiter let through, to count in the store when it is back.
        self.unwritten: deque[Charge] = deque(maxlen=MAX_UNWRITTEN)
        self._writing_back = False
        self.metrics = metrics
        #: Approved exemptions not yet over, by account; refreshed from the store.
        self.exemptions: dict[str, list[Exemption]] = {}
        self._next_refresh = 0.0
        self._refreshing = False
        #: Accounts noted in the store as authenticating, this hour and the last.
        self._noted: set[str] = set()
        self._noted_before: set[str] = set()
        self._noted_until = -math.inf
        #: Per connection: the account and instance whose recipients are counted
        #: but whose END-OF-MESSAGE has not been seen, and when its first
        #: recipient was (give-back only).
        self.open: dict[object, tuple[str, str, float]] = {}
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Apply a (re)loaded configuration."""
        outbound = config.outbound
        self.config = config
        self.limit = outbound.limit
        self.overrides = {k.lower(): v for k, v in outbound.overrides.items()}
        self.window = float(outbound.window)
        self.block_for = float(outbound.block_for)
        self.deadline = float(config.store.deadline)
        self.give_back = outbound.give_back
        self.trusted = NetworkSet(config.trusted_networks)
        self.local_domains = read_domain_list(config.local_domains, config.source)
        self.texts = Texts(config.language, config.templates)
        #: Block reasons by limit, rendered once.
        self._reasons: dict[int, str] = {}
        #: Notification addresses by account, worked out once per configuration.
        self._notify: dict[str, tuple[str, ...]] = {}
        #: Whether recipients' domains (as written) are local, worked out once per configuration.
        self._local_domains: dict[str, bool] = {}
        self.on_error = ON_ERROR[config.store.on_error]
        self.blocked_word = "REJECT" if outbound.blocked_action == "reject" else "DEFER"
        self.blocked_code = "5.7.1" if outbound.blocked_action == "reject" else "4.7.1"

    def identity(self, request: Request, login: str) -> str:
        """The account a request is charged to: SASL login, else (trusted clients) the sender.

        :param login: the request's ``sasl_username`` (read once by the caller).
        """
        # Interned: the store's window, the fallback limiter and the caches
        # below then share one string per account.
        if login:
            return sys.intern(login.lower())
        if self.trusted and request.get("client_address") in self.trusted:
            return sys.intern(request.get("sender").lower())
        return ""

    def limit_of(self, account: str, now: float) -> int:
        """The hourly limit of an account at ``now``: configured, or raised by an exemption."""
        limit = self.overrides.get(account, self.limit)
        for exemption in self.exemptions.get(account, ()):
            if exemption.active(now) and exemption.limit > limit:
                limit = exemption.limit
        return limit

    def _refresh(self, now: float) -> None:
        """Reload approved exemptions every EXEMPTION_REFRESH seconds, without waiting."""
        if now < self._next_refresh or self._refreshing:
            return
        self._refreshing = True
        self._next_refresh = now + EXEMPTION_REFRESH

        def loaded(found: list[Exemption]) -> None:
            current: dict[str, list[Exemption]] = {}
            for exemption in found:
                if exemption.status == "approved" and exemption.end > now:
                    current.setdefault(exemption.account, []).append(exemption)
            self.exemptions = current

        def failed(failure: Failure) -> None:
            log.error("could not load exemptions: %s", failure.getErrorMessage())

        def done(_: object) -> None:
            self._refreshing = False

        self.store.exemptions().addCallbacks(loaded, failed).addBoth(done)

    def _note(self, account: str, now: float) -> None:
        """Remember, once every one to two hours per account, that it authenticated.

        The accounts noted are kept in two sets, this hour's and the last
        one's, so memory holds the accounts of two hours at most.
        """
        if now >= self._noted_until:
            self._noted_before = self._noted if now < self._noted_until + NOTE_EVERY else set()
            self._noted = set()
            self._noted_until = now + NOTE_EVERY
        if account in self._noted or account in self._noted_before:
            return
        if len(self._noted) >= MAX_NOTED:
            self._noted_before, self._noted = self._noted, set()
        self._noted.add(account)
        self.store.note_account(account, now=now).addErrback(
            lambda f: log.error("could not note account %s: %s", account, f.getErrorMessage())
        )

    def check(self, request: Request, login: str | None = None) -> Verdict | Deferred[Verdict]:
        """Decide one request of an authenticated (or trusted) client.

        Requests that the store need not see are answered at once; a counted
        recipient is answered when the store has counted it: at once too
        when the store can tell at once (a SQLite server's copy in memory).

        :param login: the request's ``sasl_username``, when the caller read it already.
        """
        state = request.get("protocol_state")
        if state != "RCPT":
            state = state.upper()
        if login is None:
            login = request.get("sasl_username")
        if login:
            account = self._accounts.get(login)
            if account is None:
                if len(self._accounts) >= MAX_CACHED:  # bounded: forget and start again
                    self._accounts.clear()
                account = self._accounts[login] = self.identity(request, login)
        else:
            account = self.identity(request, login)
        if state != "RCPT":
            if self.give_back and state == "END-OF-MESSAGE":
                self.open.pop(request.session, None)
            return Verdict(DUNNO, self.name, account, f"not counted at {state or '?'}")
        if not account:
            return Verdict(DUNNO, self.name, "-", "no account")
        now = self.clock.seconds()
        if now >= self._next_refresh:
            self._refresh(now)
        if login and (account not in self._noted or now >= self._noted_until):
            self._note(account, now)
        recipient = request.get("recipient")
        local = self._local_domains.get(recipient.rpartition("@")[2])
        if local is None:
            local = self._is_local(recipient)
        if local:
            return self._local(account, now)
        instance = request.get("instance")
        if self.give_back:
            self._track(request.session, account, instance, now)
        limit = self.limit_of(account, now) if self.exemptions else self.overrides.get(account, self.limit)
        # Interned: a window keeps its clients, and few send for many accounts.
        client = sys.intern(request.get("client_address"))
        count_at_once = self._count_at_once
        if count_at_once is not None:
            count = count_at_once(account, now, self.window, limit, instance, client)
            if count:
                # Let through and counted: what _admitted says of an ALLOWED admission.
                if self.unwritten and not self._writing_back:
                    self._write_back()
                return Verdict(DUNNO, self.name, account, f"{count}/{limit}")
        reason = self._reasons.get(limit)
        if reason is None:
            reason = self._reasons[limit] = self.texts.render(
                "block_reason", limit=limit, window=format_duration(self.window)
            )
        charge = Charge(
            account,
            now,
            self.window,
            limit,
            self.block_for,
            reason,
            instance,
            client,
            self._recipients(account),
        )
        admitted = self.store.admit(charge)
        if admitted.called:
            # The store answered at once (memory, a SQLite server's copy):
            # decide now rather than through three more callbacks.
            result = settled(admitted)
            if result is not None:
                if isinstance(result, Failure):
                    return self._store_failed(result, charge)
                return self._admitted(result, charge)
        elif not self._bounded:
            admitted.addTimeout(self.deadline, self.clock)
        admitted.addCallbacks(self._admitted, self._store_failed, callbackArgs=(charge,), errbackArgs=(charge,))
        return admitted  # type: ignore[return-value]

    def _is_local(self, recipient: str) -> bool:
        """Whether a recipient is ours (or has no domain): worked out once per domain as written."""
        written = recipient.rpartition("@")[2]
        local = self._local_domains.get(written)
        if local is None:
            if len(self._local_domains) >= MAX_CACHED:  # bounded: forget and start again
                self._local_domains.clear()
            domain = domain_of(recipient)
            local = self._local_domains[written] = domain is None or domain in self.local_domains
        return local

    def _local(self, account: str, now: float) -> Deferred[Verdict]:
        """A local recipient never counts, but a blocked account still cannot send."""
        looked_up = self.store.block_of(account, now=now)
        if not looked_up.called and not self._bounded:
            looked_up.addTimeout(self.deadline, self.clock)

        def decided(block: Block | None) -> Verdict:
            if block is None:
                return Verdict(DUNNO, self.name, account, "local recipient")
            return Verdict(self.refusal(block), self.name, account, "blocked")

        def failed(failure: Failure) -> Verdict:
            self._store_error(failure)
            return Verdict(self.on_error, self.name, account, "store error (local recipient)")

        return looked_up.addCallbacks(decided, failed)

    def _recipients(self, account: str) -> tuple[str, ...]:
        """Who hears of a block of ``account``, worked out once per account (once per
        domain when the user is not told)."""
        # Accounts with the same text after "@" have the same domain contact.
        key = account if self.config.notify.notify_user else account.rpartition("@")[2]
        found = self._notify.get(key)
        if found is None:
            if len(self._notify) >= MAX_CACHED:  # bounded: forget and start again
                self._notify.clear()
            found = self._notify[key] = self.config.notify.recipients(account)
        return found

    def refusal(self, block: Block) -> Action:
        """The reply to every attempt of a blocked account."""
        text = self.texts.render("blocked", account=block.account, reason=block.reason)
        return Action(self.blocked_word, f"{self.blocked_code} {text}")

    def _admitted(self, admission: Admission, charge: Charge) -> Verdict:
        account, limit = charge.account, charge.limit
        if self.unwritten and not self._writing_back:
            self._write_back()
        if admission.outcome is Outcome.ALLOWED:
            # A store with its own count in memory (SQLite) tells the fallback
            # limiter what it counted when it fails: no second copy here.
            if getattr(self.store, "recent", None) is None:
                self.fallback.note(account, charge.now)
            return Verdict(DUNNO, self.name, account, f"{admission.count}/{limit}")
        assert admission.block is not None
        if admission.outcome is Outcome.NEWLY_BLOCKED:
            log.warning(
                "account %s blocked: %d external recipients in %s (limit %d), clients %s",
                account,
                admission.count,
                format_duration(self.window),
                limit,
                ",".join(admission.block.clients) or "-",
            )
            if self.metrics is not None:
                self.metrics.blocks_made.inc()
            if self.on_block is not None:
                self.on_block(admission.block)
            return Verdict(self.refusal(admission.block), self.name, account, "over limit: blocked")
        return Verdict(self.refusal(admission.block), self.name, account, "blocked")

    def _store_error(self, failure: Failure) -> None:
        log.error(
            "store error, replying per store.on_error (%s): %s",
            self.config.store.on_error,
            failure.getErrorMessage() or failure.type.__name__,
        )
        if self.metrics is not None:
            self.metrics.store_errors.inc()

    def _store_failed(self, failure: Failure, charge: Charge) -> Verdict:
        """The store did not answer in time: reply per store.on_error, limit in memory.

        A recipient let through is kept, and counted in the store once it
        answers again (:meth:`_write_back`).
        """
        account, limit = charge.account, charge.limit
        self._store_error(failure)
        recent = getattr(self.store, "recent", None)
        counted = recent(account, charge.now - self.window) if recent is not None else 0
        if self.fallback.allows(account, charge.now, self.window, limit - counted):
            if self.on_error.word != "DEFER_IF_PERMIT":
                self.unwritten.append(charge)
            return Verdict(self.on_error, self.name, account, "store error: fallback limiter allows")
        text = self.texts.render(
            "over_limit_fallback", account=account, limit=limit, window=format_duration(self.window)
        )
        return Verdict(Action("DEFER", f"4.7.1 {text}"), self.name, account, "store error: fallback limit")

    def _write_back(self) -> None:
        """Count in the store, in order, the recipients let through while it could not answer.

        Each keeps its time, so it leaves the window when it would have; one
        too old to matter is dropped.  Counting them may block the account
        at its next recipient, as if the store had never been away.  A store
        that fails again keeps the rest for its next answer.  (A recipient
        whose count reached the store but whose answer did not is counted
        twice: the stricter error.)
        """
        self._writing_back = True
        written = 0

        def step() -> None:
            turn = 0
            while self.unwritten:
                turn += 1
                if turn > WRITE_BACK_BATCH:
                    # A store that answers at once would hold the reactor: go on next turn.
                    self.clock.callLater(0, step)
                    return
                charge = self.unwritten[0]
                if charge.now <= self.clock.seconds() - charge.window:
                    self.unwritten.popleft()
                    continue
                counted = self.store.admit(charge._replace(limit=UNLIMITED))
                result = settled(counted)
                if result is None:
                    counted.addCallbacks(went_on, stopped)
                    return
                if isinstance(result, Failure):
                    stopped(result)
                    return
                counted_one()
            finished()

        def counted_one() -> None:
            nonlocal written
            self.unwritten.popleft()
            written += 1

        def went_on(_: Admission) -> None:
            counted_one()
            step()

        def stopped(failure: Failure) -> None:
            log.error("store error while counting %d recipients let through during its outage: %s",
                      len(self.unwritten), failure.getErrorMessage() or failure.type.__name__)
            finished()

        def finished() -> None:
            self._writing_back = False
            if written:
                log.info("counted in the store %d recipients let through while it could not answer", written)

        step()

    # --- give-back of unfinished transactions ---------------------------

    def _track(self, session: object, account: str, instance: str, now: float) -> None:
        previous = self.open.get(session)
        if previous is not None:
            if previous[:2] == (account, instance):
                return
            self._give_back(*previous)
        self.open[session] = (account, instance, now)

    def connection_closed(self, session: object) -> None:
        """A policy connection ended: give back its unfinished transaction."""
        previous = self.open.pop(session, None)
        if previous is not None:
            self._give_back(*previous)

    def _give_back(self, account: str, instance: str, since: float) -> None:
        def done(count: int) -> None:
            if count:
                log.info("gave back %d recipients of unfinished transaction %s of %s", count, instance, account)

        def failed(failure: Failure) -> None:
            log.error("could not give back transaction %s of %s: %s", instance, account, failure.getErrorMessage())

        self.store.give_back(account, instance, since).addCallbacks(done, failed)

    def forget(self, account: str) -> None:
        """Drop what this process remembers of an account (after an unblock)."""
        self.fallback.forget(account)
