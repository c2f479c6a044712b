"""The policy: picks the checks for a request, runs them, logs the decision."""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import perf_counter

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from policyd.checks import Verdict
from policyd.checks.quota import OutboundQuota
from policyd.checks.reputation import NetworkReputation
from policyd.config import Config, read_domain_list
from policyd.logs import decisions
from policyd.metrics import Metrics
from policyd.netlists import NetworkSet
from policyd.protocols.policy import DUNNO, Action, Request
from policyd.store import AuditEntry, Block, Store

errors = logging.getLogger("policyd.policy")

#: policy_context values (set in Postfix's check_policy_service) and what they select.
CONTEXTS = ("submission", "inbound")


class PolicyService:
    """Answers policy requests: outbound quota for senders, reputation for the rest.

    ``policy_context`` picks the checks (``submission`` or ``inbound``);
    without it, an authenticated client (or one in ``trusted_networks``) gets
    the outbound checks and any other client the inbound ones.

    :param config: the configuration in force; :meth:`reload` replaces it.
    :param store: the state store.
    :param clock: time source.
    :param on_block: told of every new block (the notifier's kick).
    :param metrics: the server's Prometheus metrics; None keeps none.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        clock: IReactorTime,
        on_block: Callable[[Block], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.on_block = on_block
        #: Prometheus metrics, when the server keeps them.
        self.metrics = metrics
        #: Counts one decision in the metrics (None without them).
        self._decided = None if metrics is None else metrics.decisions.decided
        self.quota = OutboundQuota(config, store, clock, on_block=self._blocked, metrics=metrics)
        self.reputation = NetworkReputation(config, clock, metrics=metrics)
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Apply a configuration (at start and on reload), all of it or none.

        :raises PolicydError: when part of it cannot be applied (a list file
            that cannot be read, say); the running configuration then stays.
        """
        # What can fail is tried before anything changes: the domain list,
        # then the reputation check, which validates before it applies.
        read_domain_list(config.local_domains, config.source)
        self.reputation.configure(config)
        self.quota.configure(config)
        self.config = config
        self.trusted = NetworkSet(config.trusted_networks)

    reload = configure

    def decide(self, request: Request) -> Action | Deferred[Action]:
        """Decide one request; never fails (errors become ``store.on_error`` replies).

        A check that knows at once answers a :class:`Verdict`; one that has to
        wait (a store, DNS) a Deferred of it.
        """
        started = perf_counter()
        context = request.get("policy_context")
        login = request.get("sasl_username")
        if context == "submission" or (
            not context and (login or (self.trusted and request.get("client_address") in self.trusted))
        ):
            verdict = self.quota.check(request, login)
        elif context == "inbound" or not context:
            verdict = self.reputation.check(request)
        else:
            verdict = Verdict(DUNNO, "none", "-", f"unknown policy_context {context!r}")
        if isinstance(verdict, Verdict):
            return self._logged(verdict, request, started)
        return verdict.addCallbacks(self._logged, self._failed, callbackArgs=(request, started))

    def _logged(self, verdict: Verdict, request: Request, started: float) -> Action:
        seconds = perf_counter() - started
        if self._decided is not None:
            self._decided(verdict.check, verdict.action.word, seconds)
        if decisions.enabled:
            self._log(verdict, request, seconds)
        return verdict.action

    def _log(self, verdict: Verdict, request: Request, seconds: float) -> None:
        """The decision's line (``log.decisions``)."""
        decisions.write(
            verdict.check,
            verdict.subject,
            request.get("client_address"),
            request.get("protocol_state"),
            str(verdict.action),
            verdict.reason,
            seconds * 1000,
            (
                request.get("queue_id", None),
                request.get("sasl_username", None),
                request.get("sender", None),
                request.get("recipient", None),
            ),
        )

    def _failed(self, failure: Failure) -> Action:
        errors.error("policy decision failed: %s", failure.getErrorMessage())
        return self.quota.on_error

    def _blocked(self, block: Block) -> None:
        if self.on_block is not None:
            self.on_block(block)
        entry = AuditEntry(block.since, block.by, "block", block.account, block.reason)
        self.store.record(entry).addErrback(
            lambda f: errors.error("could not audit block of %s: %s", block.account, f.getErrorMessage())
        )

    def connection_closed(self, session: object) -> None:
        """A policy connection ended."""
        self.quota.connection_closed(session)
