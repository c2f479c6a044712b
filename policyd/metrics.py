"""Prometheus metrics of one ``policyd serve`` or ``policyd milter`` process.

Counters are bumped where things happen (decisions, store errors, DNS
errors, bad requests, messages scored); gauges that live in the store
(blocks active, the notification backlog) are refreshed by the server every
few seconds, since a scrape must not wait on the store.  Each server has its
own registry, so tests and several servers in one process never mix their
figures.  Both carry ``policyd_build_info{version=...}``.

``policyd serve`` shows them at ``/metrics`` of ``listen.http``; the milter,
which has no other HTTP listener, at ``/metrics`` of ``listen.milter_metrics``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from policyd import __version__

# The *_created series double every counter for no use here.
disable_created_metrics()

#: Decision latency buckets, in seconds: policy replies take microseconds to
#: milliseconds; anything near the store deadline is trouble.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


#: Scoring latency buckets, in seconds: a typical message is scored in a
#: millisecond or two, a large one in tens; Postfix waits minutes, but
#: anything past a second holds an smtpd process.
SCORING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def build_info(registry: CollectorRegistry) -> Gauge:
    """``policyd_build_info{version=...} 1``: which version answers, for dashboards and alerts after upgrades."""
    info = Gauge("policyd_build_info", "The running policyd version (always 1).", ["version"], registry=registry)
    info.labels(__version__).set(1)
    return info


class Metrics:
    """The metrics of one policy server, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        build_info(registry)
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
        self.notification_backlog = Gauge(
            "policyd_notification_backlog_seconds",
            "Age of the oldest notification waiting in the outbox (0 when none waits): "
            "a block notice that waits is an IT contact who does not know.",
            registry=registry,
        )
        self.notifications_failing = Gauge(
            "policyd_notifications_failing",
            "Notifications waiting in the outbox whose last attempt failed (the relay refused or was down).",
            registry=registry,
        )
        self.connections = Gauge(
            "policyd_policy_connections", "Open policy client connections.", registry=registry,
        )

    def decided(self, check: str, action: str, seconds: float) -> None:
        """Count one decision."""
        self.decisions.decided(check, action, seconds)

    def backlog(self, pending: int, oldest: float | None, failing: int, now: float) -> None:
        """Set the outbox gauges from what the store says (:meth:`policyd.store.Outbox.notice_backlog`)."""
        self.notifications_pending.set(pending)
        self.notification_backlog.set(0.0 if oldest is None else max(0.0, now - oldest))
        self.notifications_failing.set(failing)

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


class MilterMetrics:
    """The metrics of one milter, in their own registry.

    Messages are counted once each by outcome (``ham``, ``spam``, ``refused``,
    ``digest``: policyd's own digest, not scored); a spam message delivered
    to at least one inbox is also ``tagged``; each recipient's copy held is
    ``held``.  ``errors`` counts what went wrong around a message (choices or
    the quarantine unavailable, a filter failure), by kind.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        build_info(registry)
        self.messages = Counter(
            "policyd_milter_messages", "Messages decided by the milter, by outcome (ham, spam, refused, digest).",
            ["outcome"], registry=registry,
        )
        self.tagged = Counter(
            "policyd_milter_tagged", "Spam delivered tagged to at least one recipient.", registry=registry,
        )
        self.held = Counter(
            "policyd_milter_held", "Recipients' copies held in the quarantine.", registry=registry,
        )
        self.errors = Counter(
            "policyd_milter_errors",
            "Problems around a message, by kind (choices: spam choices unavailable; hold: a copy not "
            "held; filter: the message got content.on_error).",
            ["kind"], registry=registry,
        )
        self.scoring = Histogram(
            "policyd_milter_scoring_seconds", "Time from end of message to the milter's verdict.",
            buckets=SCORING_BUCKETS, registry=registry,
        )
        for outcome in ("ham", "spam", "refused", "digest"):
            self.messages.labels(outcome)
        for kind in ("choices", "hold", "filter"):
            self.errors.labels(kind)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
