"""policyd's own CPU per policy request, in process, without sockets or an event loop.

The throughput rows of ``make bench`` swing with whatever else the machine
runs; this measures only what policyd itself does for one request: the
protocol's parsing and reply, the policy and its check, the quota's
accounting in the SQLite store's windows in memory, and the batched writes
of the counted recipients to the file (the store's commit every 10 ms is
run on a clock that moves 50 µs per request, as at 20,000 req/s).

    python -m tests.bench.cpu [--requests N] [--rounds R] [--store sqlite|memory] [--profile]

It prints the CPU microseconds per request of each round after a warm-up
round (process time, so other processes on the machine do not count) and
their minimum.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from policyd import config as configuration
from policyd.metrics import Metrics
from policyd.netlists import NetworkSet
from policyd.policy import PolicyService
from policyd.protocols.policy import PolicyFactory
from policyd.store import open_store
from tests.bench.load import requests

#: Simulated time between two requests (20,000 req/s).
STEP = 0.00005


class _Pool:
    """A thread pool that runs its work at once (the store's checkpoints)."""

    def callInThreadWithCallback(self, on_result: Callable[..., Any], work: Callable[..., Any], *args: Any) -> None:
        try:
            result = work(*args)
        except Exception as error:  # pragma: no cover - reported as the pool would
            on_result(False, error)
        else:
            on_result(True, result)


class FakeReactor(Clock):
    """A clock that also runs thread-pool work and callFromThread at once."""

    def getThreadPool(self) -> _Pool:
        return _Pool()

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


def build(directory: Path, store_name: str) -> tuple[FakeReactor, Any, Any]:
    """A policy service and one protocol connection on a fake transport, as the bench's server has them."""
    url = f"sqlite:///{directory}/state.db" if store_name == "sqlite" else "memory://"
    config = configuration.load_text(
        'listen:\n  policy: "tcp:0:interface=127.0.0.1"\n'
        f'store:\n  url: "{url}"\n'
        "local_domains: [example.org]\noutbound:\n  limit: 5000\nlog:\n  decisions: false\n",
        "bench.yaml",
    )
    reactor = FakeReactor()
    reactor.advance(time.time())
    store = open_store(url, 0.5, reactor)
    metrics = Metrics()
    service = PolicyService(config, store, reactor, metrics=metrics)
    factory = PolicyFactory(service.decide, config.limits, NetworkSet(config.allowed_clients),
                            on_failure=service.quota.on_error, on_close=service.connection_closed)
    protocol = factory.buildProtocol(None)
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    return reactor, protocol, transport


def run(count: int, rounds: int, store_name: str, profile: bool) -> list[float]:
    """CPU µs per request of each round."""
    figures = []
    with tempfile.TemporaryDirectory() as directory:
        reactor, protocol, transport = build(Path(directory), store_name)
        data = requests()
        sent = 0
        profiler = cProfile.Profile() if profile else None
        for round_ in range(rounds + 1):
            # The first round is a warm-up, not counted: every account is
            # noted in the store once, as a server does in its first hour.
            if profiler is not None and round_:
                profiler.enable()
            started = time.process_time()
            for n in range(count):
                protocol.dataReceived(data[sent % len(data)])
                sent += 1
                reactor.advance(STEP)
                if n % 64 == 0:
                    transport.clear()
            if round_:
                figures.append((time.process_time() - started) / count * 1e6)
            if profiler is not None:
                profiler.disable()
        replies = transport.value()
        if replies and not replies.startswith(b"action="):
            raise SystemExit(f"unexpected reply: {replies[:80]!r}")
        if profiler is not None:
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per round (default 20000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--store", choices=("sqlite", "memory"), default="sqlite")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the rounds")
    args = parser.parse_args(argv)
    figures = run(args.requests, args.rounds, args.store, args.profile)
    rounds = " ".join(f"{f:.2f}" for f in figures)
    print(f"policyd quota, {args.store}: CPU µs per request {min(figures):.2f} (rounds: {rounds})")


if __name__ == "__main__":
    main()
