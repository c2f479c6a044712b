"""Prometheus metrics of one ``policyd serve`` process.

Counters are bumped where things happen (decisions, store errors, DNS
errors, bad requests); gauges that live in the store (blocks active,
notifications pending) are refreshed by the server every few seconds, since
a scrape must not wait on the store.  Each server has its own registry, so
tests and several servers in one process never mix their figures.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# The *_created series double every counter for no use here.
disable_created_metrics()

#: Decision latency buckets, in seconds: policy replies take microseconds to
#: milliseconds; anything near the store deadline is trouble.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The metrics of one server, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "policyd_requests", "Policy requests decided, by check and action word.",
            ["check", "action"], registry=registry,
        )
        self.latency = Histogram(
            "policyd_decision_seconds", "Time from a request to its decision, by check.",
            ["check"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.store_errors = Counter(
            "policyd_store_errors", "Store operations that failed or missed store.deadline.",
            registry=registry,
        )
        self.dns_errors = Counter(
            "policyd_dns_errors", "DNS look-ups that failed, by zone and kind (timeout, error).",
            ["zone", "kind"], registry=registry,
        )
        self.bad_requests = Counter(
            "policyd_bad_requests", "Connections closed for malformed policy input.", registry=registry,
        )
        self.blocks_made = Counter("policyd_blocks", "Accounts blocked by this process.", registry=registry)
        self.blocks_active = Gauge("policyd_blocks_active", "Accounts blocked now.", registry=registry)
        self.notifications_pending = Gauge(
            "policyd_notifications_pending", "Notifications waiting in the outbox.", registry=registry,
        )
        #: Label children, looked up once (labels() costs more than inc()).
        self._counters: dict[tuple[str, str], Any] = {}
        self._histograms: dict[str, Any] = {}
        self.connections = Gauge(
            "policyd_policy_connections", "Open policy client connections.", registry=registry,
        )

    def decided(self, check: str, action: str, seconds: float) -> None:
        """Count one decision."""
        counter = self._counters.get((check, action))
        if counter is None:
            counter = self._counters[(check, action)] = self.requests.labels(check, action)
        histogram = self._histograms.get(check)
        if histogram is None:
            histogram = self._histograms[check] = self.latency.labels(check)
        counter.inc()
        histogram.observe(seconds)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
