"""A SQLite server counts a recipient at once; the answers and log lines are those of the waiting path."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from policyd.logs import decisions
from policyd.policy import PolicyService
from policyd.store.sqlite import SQLiteStore
from policyd.testing import rcpt
from tests.conftest import make_config
from tests.unit.checks.test_quota import BASE, decide, request

#: A run of recipients: two accounts, the limit (5) reached and passed, local and
#: external recipients, a later hour, mixed case in the login.
SCRIPT: list[tuple[float, dict[str, str]]] = (
    [(0.001, {"sasl_username": "alice", "recipient": f"r{n}@gmail.com"}) for n in range(4)]
    + [(0.02, {"sasl_username": "Bob", "recipient": "x@gmail.com", "client_address": "192.0.2.7"})]
    + [(0.001, {"sasl_username": "alice", "recipient": "local@example.org"})]
    + [(0.001, {"sasl_username": "alice", "recipient": f"s{n}@gmail.com"}) for n in range(3)]
    + [(0.001, {"sasl_username": "alice", "recipient": "local@example.org"})]
    + [(4000.0, {"sasl_username": "bob", "recipient": "y@gmail.com"})]
    + [(0.001, {"sasl_username": "BOB", "recipient": f"z{n}@gmail.com"}) for n in range(6)]
)


@pytest.fixture
def decision_lines() -> Any:
    """The decision log on, written to a string; as it was afterwards."""
    saved = (decisions.enabled, decisions.json, decisions.stream, decisions.journal, decisions.syslog)
    stream = io.StringIO()
    decisions.enabled, decisions.json, decisions.stream, decisions.journal, decisions.syslog = (
        True, False, stream, False, None
    )
    yield stream
    decisions.enabled, decisions.json, decisions.stream, decisions.journal, decisions.syslog = saved


def run(path: Path, at_once: bool, stream: io.StringIO) -> tuple[list[str], list[str], int]:
    """The replies, decision lines (times and latencies left out) and rows written, with or without the inline count."""
    clock = Clock()
    clock.advance(1_700_000_000)
    store = SQLiteStore(str(path), reactor=clock)
    svc = PolicyService(make_config(BASE), store, clock)
    if not at_once:
        svc.quota._count_at_once = None
    start = stream.tell()
    replies = []
    for step, attributes in SCRIPT:
        clock.advance(step)
        result: list[Any] = []
        maybeDeferred(svc.decide, request(rcpt(**attributes))).addCallback(result.append)
        if not result:
            clock.advance(0)  # a new block is answered once it is committed
        replies.append(str(result[0]))
    clock.advance(1)
    lines = stream.getvalue()[start:].splitlines()
    lines = [re.sub(r" latency=[0-9.]+ms$", "", line.partition(" ")[2]) for line in lines]
    rows = store.db.execute("SELECT COUNT(*) FROM sends").fetchone()[0]
    store.close()
    return replies, lines, rows


def test_counting_at_once_answers_and_logs_as_the_waiting_path(tmp_path: Path, decision_lines: io.StringIO) -> None:
    """The same recipients, counted at once or through the store's Deferred: the same replies,
    the same decision lines and the same rows in the file."""
    inline = run(tmp_path / "inline.db", True, decision_lines)
    waiting = run(tmp_path / "waiting.db", False, decision_lines)
    assert inline == waiting
    replies, lines, rows = inline
    # alice: 5 let through, 2 refused, then a local recipient refused while blocked;
    # bob: his first recipient left the window, then 5 let through and 2 refused.
    words = [r.split()[0] for r in replies]
    assert words == ["DUNNO"] * 7 + ["REJECT"] * 3 + ["DUNNO"] * 5 + ["REJECT"] * 2
    assert sum("reason='5/5'" in line for line in lines) == 2
    assert sum("reason='over limit: blocked'" in line for line in lines) == 2
    assert rows == 11  # counted external recipients only


def test_counting_at_once_is_taken_only_when_it_can_answer(tmp_path: Path) -> None:
    """count_at_once answers 0, changing nothing, for a blocked account, the recipient
    over the limit, and when other connections' writes are due to be read."""
    clock = Clock()
    clock.advance(1_700_000_000)
    store = SQLiteStore(str(tmp_path / "state.db"), reactor=clock)
    svc = PolicyService(make_config(BASE), store, clock)
    decide(svc, sasl_username="alice", recipient="x@gmail.com")  # loads the windows
    now = clock.seconds()
    windows = store._windows
    assert windows is not None
    assert store.count_at_once("carol", now, 3600.0, 2, "i", "192.0.2.1") == 1
    assert store.count_at_once("carol", now, 3600.0, 2, "i", "192.0.2.1") == 2
    assert store.count_at_once("carol", now, 3600.0, 2, "i", "192.0.2.1") == 0
    assert len(windows["carol"].sends) == 2
    assert windows["carol"].block is None
    clock.advance(0.02)
    assert store.count_at_once("dave", clock.seconds(), 3600.0, 2, "i", "192.0.2.1") == 0
    assert "dave" not in windows
    clock.advance(1)
    store.close()
