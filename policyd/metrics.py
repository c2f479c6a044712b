"""Prometheus metrics of one ``policyd serve`` process.

Counters are bumped where things happen (decisions, store errors, DNS
errors, bad requests); gauges that live in the store (blocks active,
notifications pending) are refreshed by the server every few seconds, since
a scrape must not wait on the store.  Each server has its own registry, so
tests and several servers in one process never mix their figures.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
        self.decisions = Decisions()
        registry.register(self.decisions)
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
        self.connections = Gauge(
            "policyd_policy_connections", "Open policy client connections.", registry=registry,
        )

    def decided(self, check: str, action: str, seconds: float) -> None:
        """Count one decision."""
        self.decisions.decided(check, action, seconds)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)


class Decisions(Collector):
    """Decisions by check and action word, and their latency, as plain numbers.

    Every decision updates them, so they are kept in dictionaries and turned
    into ``policyd_requests_total`` and the ``policyd_decision_seconds``
    histogram only when scraped: prometheus_client's own Counter and
    Histogram take a lock on every change, which cost a policy decision more
    than a tenth of its time.  Only the reactor thread changes them.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        #: Per check: decisions per latency bucket (the last one is +Inf).
        self.buckets: dict[str, list[int]] = {}
        self.seconds: dict[str, float] = {}

    def decided(self, check: str, action: str, seconds: float) -> None:
        """Count one decision."""
        key = (check, action)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        buckets = self.buckets.get(check)
        if buckets is None:
            buckets = self.buckets[check] = [0] * (len(LATENCY_BUCKETS) + 1)
            self.seconds[check] = 0.0
        buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.seconds[check] += seconds

    def collect(self) -> Iterator[Metric]:
        """The two metric families, as prometheus_client asks for them."""
        requests = CounterMetricFamily(
            "policyd_requests", "Policy requests decided, by check and action word.", labels=["check", "action"]
        )
        for (check, action), count in sorted(self.counts.items()):
            requests.add_metric([check, action], count)
        yield requests
        latency = HistogramMetricFamily(
            "policyd_decision_seconds", "Time from a request to its decision, by check.", labels=["check"]
        )
        bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        for check, buckets in sorted(self.buckets.items()):
            total = 0
            cumulative = []
            for bound, count in zip(bounds, buckets, strict=True):
                total += count
                cumulative.append((bound, total))
            latency.add_metric([check], cumulative, sum_value=self.seconds[check])
        yield latency
