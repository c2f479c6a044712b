"""What the milter tells the admin: one verdict line in Postfix's words, audit entries of held mail, metrics."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from policyd import logs
from policyd.content.scorer import ContentScorer
from policyd.content.spamfilter import SpamFilter
from policyd.metrics import MilterMetrics
from policyd.protocols.milter_session import MilterProtocol
from policyd.testing import FakeMTA
from tests.conftest import make_config
from tests.unit.quarantine.test_held import SECRET, SPAMMY, Site, WordModel


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """policyd's log written to a string for the test, then back to the default."""
    stream = io.StringIO()
    logs.setup(make_config("").log, stream=stream)
    try:
        yield stream
    finally:
        logs.setup(make_config("").log, stream=io.StringIO())


def metered(config: str = "") -> tuple[Site, MilterMetrics]:
    """A milter site whose filter keeps metrics."""
    site = Site(config)
    metrics = MilterMetrics()
    site.filter = SpamFilter(site.config, site.store, site.clock, ContentScorer(WordModel(), SECRET), metrics=metrics)
    return site, metrics


def samples(metrics: MilterMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, by name and labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
    }


def test_the_verdict_line_carries_the_envelope_in_postfix_words(log_lines: io.StringIO) -> None:
    """Queue id, client, SASL user ({auth_authen}), from and to, control characters escaped, one line."""
    site, _ = metered("quarantine:\n  default: inbox\n")
    mta = FakeMTA(MilterProtocol(site.filter, site.clock))
    mta.negotiate()
    mta.connect(address="192.0.2.7")
    mta.macros(b"M", auth_authen="lou")
    mta.message("lou\r\n@example.org", ["bob@example.org", "carol@example.org"],
                [("Subject", "win"), ("Message-ID", "<m1@example.org>")], SPAMMY)
    logs.flush()
    (line,) = [x for x in log_lines.getvalue().split("\n") if "policyd.milter" in x]
    assert re.search(
        r" INFO policyd\.milter: milter 4XyZ1 client=192\.0\.2\.7 sasl_username=lou "
        r"from=<lou\\x\{d\}\\x\{a\}@example\.org> to=<bob@example\.org>,<carol@example\.org> score=10\.00 ", line
    ), line
    assert "win" not in line and "m1@example.org" not in line  # no message content


def test_held_copies_are_audited_with_message_id_and_queue_id() -> None:
    """Each copy held is one quarantine-hold audit entry by the milter, naming Message-ID and queue id."""
    site, metrics = metered("quarantine:\n  default: quarantine\n")
    site.send(["bob@example.org", "carol@example.org"], [("Subject", "x"), ("Message-Id", " <spam.9@example.net>")])
    entries = [(e.who, e.action, e.subject, e.reason) for e in site.store.entries]
    assert entries == [
        ("milter", "quarantine-hold", f"quarantine #{n} for {who}@example.org",
         "score 10.0 (Message-ID <spam.9@example.net>, queue id 4XyZ1)")
        for n, who in ((1, "bob"), (2, "carol"))
    ]
    found = samples(metrics)
    assert found[("policyd_milter_held_total", ())] == 2
    assert found[("policyd_milter_messages_total", (("outcome", "spam"),))] == 1
    assert found[("policyd_milter_tagged_total", ())] == 0  # held for everyone: nobody got it tagged


def test_milter_metrics_count_messages_tags_errors_and_latency() -> None:
    """Ham and spam by outcome, tagged spam, a failed hold as an error, each message in the latency histogram."""
    site, metrics = metered("quarantine:\n  default: inbox\n")
    site.send(["bob@example.org"], body=b"see you at the meeting\r\n")
    site.send(["bob@example.org"])
    site.store.set_preference("carol@example.org", "quarantine")

    def full(*_: object) -> None:
        raise OSError("disk full")

    site.store.quarantine = full  # type: ignore[method-assign]
    site.send(["carol@example.org"])
    found = samples(metrics)
    assert found[("policyd_milter_messages_total", (("outcome", "ham"),))] == 1
    assert found[("policyd_milter_messages_total", (("outcome", "spam"),))] == 2
    assert found[("policyd_milter_tagged_total", ())] == 2
    assert found[("policyd_milter_errors_total", (("kind", "hold"),))] == 1
    assert found[("policyd_milter_errors_total", (("kind", "filter"),))] == 0
    assert found[("policyd_milter_scoring_seconds_count", ())] == 3
    assert found[("policyd_build_info", (("version", __import__("policyd").__version__),))] == 1


def test_a_failing_filter_is_counted() -> None:
    """A scorer that raises is a filter error in the metrics (the milter then applies content.on_error)."""
    site, metrics = metered()

    def broken(*_: object) -> None:
        raise RuntimeError("model gone")

    site.filter.scorer.score_message = broken  # type: ignore[method-assign]
    site.send(["bob@example.org"])
    assert samples(metrics)[("policyd_milter_errors_total", (("kind", "filter"),))] == 1


@pytest.mark.parametrize("at_once", [True, False])
def test_a_filter_failing_off_the_event_loop_is_counted(at_once: bool) -> None:
    """Scoring that fails in the thread pool, at once or later, is a filter error; a verdict given
    at once counts none."""
    from twisted.internet.defer import Deferred, fail

    site, metrics = metered()
    pending: list[Deferred[object]] = []

    def run_cpu(*_: object) -> Deferred[object]:
        if at_once:
            return fail(RuntimeError("model gone"))
        pending.append(Deferred())
        return pending[-1]

    site.filter.run_cpu = run_cpu
    site.filter.inline_bytes = 0
    replies = site.send(["bob@example.org"])
    if not at_once:
        assert replies == []
        pending.pop().errback(RuntimeError("model gone"))
    assert samples(metrics)[("policyd_milter_errors_total", (("kind", "filter"),))] == 1
    site.filter.inline_bytes = 1 << 20
    assert [r.command for r in site.send(["bob@example.org"], body=b"hello")][-1] == b"a"
    assert samples(metrics)[("policyd_milter_errors_total", (("kind", "filter"),))] == 1
