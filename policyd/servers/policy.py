"""``policyd serve``: wires configuration, store, policy and listener together."""

from __future__ import annotations

import logging
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.interfaces import IListeningPort

from policyd import config as configuration
from policyd import logs
from policyd.admin import Admin
from policyd.config import Config
from policyd.daemon import CLOSE_BOUND, DRAIN_BOUND, BaseServer, run_daemon
from policyd.errors import PolicydError
from policyd.metrics import Metrics
from policyd.netlists import NetworkSet
from policyd.notify import Notifier
from policyd.policy import PolicyService
from policyd.protocols.policy import PolicyFactory
from policyd.statefiles import load_secret, state_file
from policyd.store import Store, open_store
from policyd.web.admin import AdminSite
from policyd.web.selfservice import SelfService

log = logging.getLogger("policyd.server")

#: How often old counts are pruned from the store: often, so each time is short.
PRUNE_EVERY = 10.0

#: How often the store-backed gauges (blocks, outbox) are read for /metrics.
GAUGES_EVERY = 5.0


class PolicyServer(BaseServer):
    """A running policy server: listener, service and housekeeping.

    :param reactor: the reactor (asyncio reactor in production).
    :param config: the validated configuration.
    :param path: the configuration file, re-read on SIGHUP.
    """

    def __init__(self, reactor: Any, config: Config, path: str | None = None) -> None:
        super().__init__(reactor, config, path, log)
        self.store: Store = open_store(config.store.url, float(config.store.deadline), reactor)
        self.metrics = Metrics()
        # The digest job kicks the notifier, which writes the digest's mail:
        # the self-service parts come first, told to kick through the server.
        self.self_service = SelfService.from_config(config, self.store, reactor, kick=self._kick_notifier)
        self.notifier = Notifier(config, self.store, reactor, digest=self.self_service.mail)
        self.service = PolicyService(
            config, self.store, reactor, on_block=lambda _: self.notifier.kick(), metrics=self.metrics
        )
        self.factory = PolicyFactory(
            self.service.decide,
            config.limits,
            NetworkSet(config.allowed_clients),
            on_failure=self.service.quota.on_error,
            on_close=self.service.connection_closed,
            on_bad_request=self.metrics.bad_requests.inc,
        )
        self.port: IListeningPort | None = None
        self.http_port: IListeningPort | None = None
        self.every(PRUNE_EVERY, self.prune)
        self.every(GAUGES_EVERY, self.refresh_gauges, now=True)
        self.every(logs.FLUSH_EVERY, logs.flush)

    def _kick_notifier(self) -> None:
        """Have the notifier look at the outbox now (digests were queued)."""
        self.notifier.kick()

    @inlineCallbacks
    def start(self) -> Any:
        """Listen and start housekeeping; fires with the listening port."""
        self.port = yield self.listen("listen.policy", self.config.listen.policy, self.factory)
        self.notifier.start()
        if self.config.listen.http:
            yield self.start_http(self.config.listen.http)
        self.self_service.start()
        self.start_loops()
        log.info(
            "policyd serving policy requests on %s (store %s, limit %d per %s)",
            self.config.listen.policy,
            _safe_url(self.config.store.url),
            self.config.outbound.limit,
            configuration.format_duration(self.config.outbound.window),
        )
        return self.port

    @inlineCallbacks
    def start_http(self, where: str) -> Any:
        """Listen on ``where`` (listen.http): metrics, admin API, exemption and self-service pages."""

        path = state_file(self.config, "http.token", self.config.http.token_file)
        try:
            token = load_secret(path, "admin token").decode()
        except (OSError, ValueError) as error:
            raise PolicydError(f"http.token_file: {error}") from None
        admin = Admin(self.config, self.store, self.reactor)
        site = AdminSite(admin, self.metrics, token, self.self_service.pages()).site()
        self.http_port = yield self.listen("listen.http", where, site)
        self.self_service.listening(getattr(self.http_port.getHost(), "port", None))
        log.info("HTTP (metrics, admin API) on %s; admin token in %s", where, path)

    @inlineCallbacks
    def refresh_gauges(self) -> Any:
        """Read the gauges that live in the store (blocks, outbox)."""
        self.metrics.connections.set(len(self.factory.connections))
        try:
            blocks = yield self.store.blocks(now=self.reactor.seconds())
            self.metrics.blocks_active.set(len(blocks))
            pending = yield self.store.pending_notices()
            oldest, failing = yield self.store.notice_backlog()
            self.metrics.backlog(pending, oldest, failing, self.reactor.seconds())
        except Exception as error:
            log.debug("gauges not refreshed: %s", error)

    def prune(self) -> Deferred[Any]:
        """Forget counts that left the window."""
        now = self.reactor.seconds()
        self.service.quota.fallback.prune(now, self.service.quota.window)
        return self.store.prune(now=now, window=self.service.quota.window).addErrback(
            lambda f: log.error("pruning the store failed: %s", f.getErrorMessage())
        )

    def configure(self, config: Config) -> None:
        """Apply a reloaded configuration to the service, the notifier, the pages and the listener's bounds."""
        self.service.configure(config)
        self.notifier.configure(config)
        self.self_service.configure(config)
        self.factory.limits = config.limits
        self.factory.allowed_clients = NetworkSet(config.allowed_clients)
        self.factory.on_failure = self.service.quota.on_error

    @inlineCallbacks
    def stop(self) -> Any:
        """Stop accepting, answer what is in flight (bounded), close the store."""
        self.stop_loops()
        yield self.self_service.stop()
        if self.http_port is not None:
            yield self.http_port.stopListening()
        if self.port is not None:
            yield self.port.stopListening()
        # The notices' bound runs beside the drain's: whatever hangs, the
        # whole stop takes at most DRAIN_BOUND + 2 * CLOSE_BOUND.
        stopping = self.notifier.stop()
        stopping.addTimeout(DRAIN_BOUND, self.reactor)
        yield self.drain(self.factory, "requests")
        # Let the replies already written reach their clients before the
        # reactor goes: wait (bounded) until every connection has closed.
        closed = self.factory.all_closed()
        for connection in list(self.factory.connections):
            connection.transport.loseConnection()
        closed.addTimeout(CLOSE_BOUND, self.reactor)
        yield DeferredList([closed], consumeErrors=True)
        for connection in list(self.factory.connections):
            connection.transport.abortConnection()
        yield DeferredList([stopping], consumeErrors=True)
        yield self.close_store(self.store)
        log.info("policyd stopped")
        logs.flush()


def _safe_url(url: str) -> str:
    """A store URL without its credentials or query, for logs."""
    if url.startswith(("redis", "unix://")):
        from policyd.store.redis import describe_url

        return describe_url(url)
    return url


def run(path: str | None) -> None:
    """Run the policy server in the foreground until SIGTERM or SIGINT.

    :raises PolicydError: when the configuration, store or listener fails.
    """
    run_daemon(path, PolicyServer)
