"""The open-file limit of a real ``policyd serve`` leaves room for ``limits.max_connections``.

A server started from a shell inherits a soft ``RLIMIT_NOFILE`` of 1,024
or less, below what 1,000 policy clients and the server's own files need:
it raises the soft limit toward the hard one, and says so in one warning
when even the hard limit is too low.  Each test starts the server with a
given limit (set in the child before exec) and reads the result from
``/proc``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from policyd.daemon import SPARE_DESCRIPTORS
from policyd.testing import rcpt
from tests.harness.servers import PolicydServer, ask, free_port

WARNING = "this process may open only"


@contextmanager
def server(
    tmp_path: Path, nofile: tuple[int, int], max_connections: int = 1000, command: str = "serve"
) -> Iterator[PolicydServer]:
    """``policyd serve`` (or ``milter``) with ``limits.max_connections`` started under ``nofile``; stopped cleanly after."""
    port = free_port()
    (tmp_path / "accounts").write_text("alice@example.org\n", encoding="utf-8")
    config = tmp_path / "policyd.yaml"
    key = "policy" if command == "serve" else "milter"
    config.write_text(
        f'listen:\n  {key}: "tcp:{port}:interface=127.0.0.1"\n'
        f'store:\n  url: "sqlite:///{tmp_path}/state.db"\n'
        f"accounts: {tmp_path / 'accounts'}\nlocal_domains: [example.org]\n"
        f"limits:\n  max_connections: {max_connections}\n",
        encoding="utf-8",
    )
    running = PolicydServer(config, port, command, nofile=nofile).start()
    try:
        yield running
    finally:
        assert running.stop() == 0, running.output()


def answers(running: PolicydServer) -> None:
    assert ask(running.port, rcpt(sasl_username="alice@example.org", recipient="x@gmail.com")) == "DUNNO"


def test_a_low_soft_limit_is_raised_toward_the_hard_one(tmp_path: Path) -> None:
    with server(tmp_path, (512, 8192)) as running:
        answers(running)
        assert running.open_files() == (1000 + SPARE_DESCRIPTORS, 8192)
        assert WARNING not in running.output()


def test_the_soft_limit_stops_at_the_hard_one_with_one_warning(tmp_path: Path) -> None:
    with server(tmp_path, (256, 900)) as running:
        answers(running)
        assert running.open_files() == (900, 900)
        warnings = [line for line in running.output().splitlines() if WARNING in line]
        assert len(warnings) == 1, running.output()
        assert "limits.max_connections is 1000" in warnings[0]
        assert "900 files" in warnings[0] and "LimitNOFILE" in warnings[0]
        assert "Traceback" not in running.output()


def test_a_limit_with_room_is_left_as_it_is(tmp_path: Path) -> None:
    with server(tmp_path, (700, 700), max_connections=100) as running:
        answers(running)
        assert running.open_files() == (700, 700)
        assert WARNING not in running.output()


@pytest.mark.parametrize("command", ["serve", "milter"])
def test_a_reload_that_allows_more_connections_raises_the_limit(tmp_path: Path, command: str) -> None:
    with server(tmp_path, (700, 8192), max_connections=100, command=command) as running:
        assert running.open_files() == (700, 8192)
        config = running.config.read_text(encoding="utf-8")
        running.config.write_text(config.replace("max_connections: 100", "max_connections: 3000"), encoding="utf-8")
        running.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while running.open_files()[0] == 700 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running.open_files() == (3000 + SPARE_DESCRIPTORS, 8192), running.output()
        if command == "serve":
            answers(running)
