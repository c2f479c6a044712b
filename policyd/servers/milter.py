"""``policyd milter``: wires configuration, store, model, filter and listener together.

A running milter picks up a retrained model by itself within
:data:`MODEL_CHECK` seconds, and removes held mail past its retention every
:data:`EXPIRE_EVERY` seconds.  With ``listen.milter_metrics`` set it serves
its Prometheus metrics, and nothing else, at ``/metrics`` there.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IListeningPort

from policyd import logs
from policyd.config import Config
from policyd.content.scorer import ContentScorer, header_secret, load_model, model_path
from policyd.content.spamfilter import SpamFilter
from policyd.daemon import BaseServer, run_daemon
from policyd.errors import PolicydError
from policyd.forwarding.aliases import aliases_from_config
from policyd.forwarding.authentication import authentication_on, authenticator
from policyd.forwarding.sealing import arc_sealer
from policyd.metrics import MilterMetrics
from policyd.netlists import NetworkSet
from policyd.protocols.milter import (
    ACCEPT,
    TEMPFAIL,
)
from policyd.protocols.milter_session import MilterFactory
from policyd.quarantine.preferences import Preferences
from policyd.reactor import in_thread
from policyd.store import Store, open_store

log = logging.getLogger("policyd.milter")


#: How often a running milter looks whether the model file changed.
MODEL_CHECK = 5.0

#: How often held mail past its retention is removed.
EXPIRE_EVERY = 600.0


class MilterServer(BaseServer):
    """A running ``policyd milter``: listener, filter, model reloads, quarantine expiry.

    :param reactor: the reactor.
    :param config: the validated configuration.
    :param path: the configuration file, re-read on SIGHUP.
    """

    def __init__(self, reactor: Any, config: Config, path: str | None = None) -> None:
        super().__init__(reactor, config, path, log)
        model, self.model_file = load_model(config)
        self._model_stamp = self._stamp()
        self.store: Store = open_store(config.store.url, float(config.store.deadline), reactor)
        self.scorer = ContentScorer(model, header_secret(config, create=True), config.content.max_body)
        self.metrics = MilterMetrics()
        aliases = aliases_from_config(config, reactor, in_thread(reactor))
        self.filter = SpamFilter(
            config,
            self.store,
            reactor,
            self.scorer,
            in_thread(reactor),
            Preferences(config, self.store, reactor, in_thread(reactor)),
            metrics=self.metrics,
            aliases=aliases,
            sealer=arc_sealer(config, aliases, reactor, in_thread(reactor)),
            authenticator=authenticator(config, reactor, in_thread(reactor)),
        )
        self.factory = MilterFactory(
            self.filter,
            reactor,
            NetworkSet(config.allowed_clients),
            config.limits.max_connections,
            memory_limit=config.content.max_body,
            keep_limit=config.quarantine.max_size,
            idle_timeout=float(config.limits.idle_timeout),
            on_error=TEMPFAIL if config.content.on_error == "tempfail" else ACCEPT,
            needs_helo=authentication_on(config),
        )
        self.port: IListeningPort | None = None
        self.metrics_port: IListeningPort | None = None
        self.every(MODEL_CHECK, self.check_model)
        self.every(EXPIRE_EVERY, self.expire, now=True)
        # Verdict lines are buffered (logs.decisions): pushed out every FLUSH_EVERY.
        self.every(logs.FLUSH_EVERY, logs.flush)

    def _stamp(self) -> tuple[float, int] | None:
        try:
            stat = os.stat(model_path(self.config))
        except OSError:
            return None
        return stat.st_mtime, stat.st_size

    @inlineCallbacks
    def start(self) -> Any:
        """Listen; fires with the listening port."""
        self.port = yield self.listen("listen.milter", self.config.listen.milter, self.factory)
        where = self.config.listen.milter_metrics
        if where:
            self.metrics_port = yield self.listen("listen.milter_metrics", where, metrics_site(self.metrics, self.reactor))
            log.info("milter metrics on %s at /metrics", where)
        self.start_loops()
        log.info(
            "policyd milter listening on %s (model %s, tag_at %g, spam default %s)",
            self.config.listen.milter,
            self.model_file,
            self.config.content.tag_at,
            self.config.quarantine.default,
        )
        return self.port

    def check_model(self) -> None:
        """Load the model again when ``policyd train`` replaced it."""
        stamp = self._stamp()
        if stamp == self._model_stamp:
            return
        self._model_stamp = stamp
        try:
            model, self.model_file = load_model(self.config)
        except PolicydError as error:
            log.error("%s: keeping the running model", error)
            return
        self.scorer.model = model
        log.info("content model loaded from %s", self.model_file)

    def expire(self) -> Deferred[Any]:
        """Forget held mail past its retention."""

        def expired(count: int) -> None:
            if count:
                log.info("quarantine: %d expired message(s) removed", count)

        done = self.store.quarantine_expire(now=self.reactor.seconds()).addCallback(expired)
        return done.addErrback(lambda f: log.error("quarantine expiry failed: %s", f.getErrorMessage()))

    def configure(self, config: Config) -> None:
        """Apply a reloaded configuration: thresholds, choices, body bound, and the model again."""
        # Made afresh, before anything changes (a key that is no RSA key refuses the reload):
        # SIGHUP reads the aliases, local_domains and the ARC key again, like every list.
        aliases = aliases_from_config(config, self.reactor, in_thread(self.reactor))
        sealer = arc_sealer(config, aliases, self.reactor, in_thread(self.reactor))
        checks = authenticator(config, self.reactor, in_thread(self.reactor))
        self.filter.config = config
        self.filter.preferences.configure(config)
        self.filter.aliases, self.filter.sealer, self.filter.authenticator = aliases, sealer, checks
        # Connections made from now on ask for HELO when SPF needs it.
        self.factory.options["needs_helo"] = checks is not None
        self.factory.max_connections = config.limits.max_connections
        self.scorer.max_bytes = config.content.max_body
        self.config = config
        self._model_stamp = None
        self.check_model()

    @inlineCallbacks
    def stop(self) -> Any:
        """Stop accepting, answer the messages being scored (bounded), close the store."""
        self.stop_loops()
        if self.metrics_port is not None:
            yield self.metrics_port.stopListening()
        if self.port is not None:
            yield self.port.stopListening()
        yield self.drain(self.factory, "messages being scored")
        for connection in list(self.factory.connections):
            connection.transport.loseConnection()
        yield self.close_store(self.store)
        log.info("policyd milter stopped")
        logs.flush()


def metrics_site(metrics: MilterMetrics, reactor: Any) -> Any:
    """The milter's metrics listener: ``/metrics`` only, held to :mod:`policyd.web.limits`.

    Few connections, short timeouts: a scraper needs one, and nothing on
    this port may take descriptors or time from the milter's connections.
    """
    from twisted.web.resource import Resource

    from policyd.web.limits import LimitedSite

    class Page(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.setHeader("content-type", "text/plain; version=0.0.4; charset=utf-8")
            return metrics.exposition()

    root = Resource()
    root.putChild(b"metrics", Page())
    return LimitedSite(root, reactor, max_connections=METRICS_CONNECTIONS, max_body=0, request_time=10.0, idle_time=30.0)


#: Connections the milter's metrics listener takes at once: a scraper or two.
METRICS_CONNECTIONS = 8


def run(path: str | None) -> None:
    """Run the milter in the foreground until SIGTERM or SIGINT.

    :raises PolicydError: when the configuration, model, store or listener fails.
    """
    run_daemon(path, MilterServer, threads=4)
