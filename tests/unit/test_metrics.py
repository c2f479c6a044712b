"""The decision metrics, kept as plain numbers and exposed in Prometheus' format."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from policyd.metrics import Metrics


def test_decisions_become_a_counter_and_a_cumulative_histogram() -> None:
    """Counts by check and action, and latency buckets that add up as Prometheus expects."""
    metrics = Metrics()
    for seconds in (0.00005, 0.0001, 0.0003, 0.002, 7.0):
        metrics.decided("quota", "DUNNO", seconds)
    metrics.decided("quota", "REJECT", 0.0001)
    metrics.decided("reputation", "DUNNO", 0.02)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
    }
    assert samples[("policyd_requests_total", (("action", "DUNNO"), ("check", "quota")))] == 5
    assert samples[("policyd_requests_total", (("action", "REJECT"), ("check", "quota")))] == 1
    assert samples[("policyd_requests_total", (("action", "DUNNO"), ("check", "reputation")))] == 1

    def bucket(check: str, le: str) -> float:
        return samples[("policyd_decision_seconds_bucket", (("check", check), ("le", le)))]

    assert bucket("quota", "0.0001") == 3  # a bound holds what equals it
    assert bucket("quota", "0.0005") == 4
    assert bucket("quota", "0.0025") == 5
    assert bucket("quota", "2.5") == 5
    assert bucket("quota", "+Inf") == 6
    assert samples[("policyd_decision_seconds_count", (("check", "quota"),))] == 6
    assert abs(samples[("policyd_decision_seconds_sum", (("check", "quota"),))] - 7.00255) < 1e-9
    assert bucket("reputation", "0.01") == 0 and bucket("reputation", "0.025") == 1
