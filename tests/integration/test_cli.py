"""The policyd command: real server processes and the admin commands against them."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from policyd.testing import rcpt
from tests.harness.servers import PolicydServer, ask, free_port, policyd


def write(path: Path, port: int, limit: int = 3, extra: str = "") -> Path:
    path.write_text(
        f'listen:\n  policy: "tcp:{port}:interface=127.0.0.1"\n'
        f'store:\n  url: "sqlite:///{path.parent}/state.db"\n'
        f"local_domains: [example.org]\noutbound:\n  limit: {limit}\n{extra}",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def running(tmp_path: Path) -> Iterator[PolicydServer]:
    """A policyd serve process with limit 3 on a SQLite store."""
    port = free_port()
    server = PolicydServer(write(tmp_path / "policyd.yaml", port), port).start()
    yield server
    assert server.stop() == 0, server.output()


def send(server: PolicydServer, account: str = "alice", to: str = "x@gmail.com") -> str:
    return ask(server.port, rcpt(sasl_username=account, recipient=to)).split()[0]


def test_block_survives_restart_and_unblock_takes_effect_at_once(running: PolicydServer) -> None:
    """Block persists across a restart; policyd unblock (server running) lets mail flow, burst not re-blocking."""
    assert [send(running) for _ in range(4)] == ["DUNNO"] * 3 + ["REJECT"]
    assert running.stop() == 0
    running.start()
    assert send(running) == "REJECT"
    config = str(running.config)
    result = policyd("unblock", "alice", "--reason", "password changed", "-c", config)
    assert result.returncode == 0, result.stderr
    assert "alice unblocked" in result.stdout
    assert [send(running) for _ in range(4)] == ["DUNNO"] * 3 + ["REJECT"]


def test_admin_commands_and_json(running: PolicydServer) -> None:
    """blocks, status and audit print tables and compact JSON lines."""
    for _ in range(4):
        send(running, "Bob")
    send(running, "carol")
    config = str(running.config)
    blocks = policyd("blocks", "--json", "-c", config)
    assert blocks.returncode == 0, blocks.stderr
    (line,) = blocks.stdout.splitlines()
    block = json.loads(line)
    assert block["account"] == "bob" and block["count"] == 3 and block["clients"] == ["192.0.2.10"]
    table = policyd("blocks", "-c", config)
    assert "bob" in table.stdout and "ACCOUNT" in table.stdout
    status = policyd("status", "carol", "--json", "-c", config)
    assert json.loads(status.stdout) == {
        "account": "carol", "count": 1, "limit": 3, "window": "1h", "blocked": False, "block": None,
    }
    busiest = policyd("status", "-c", config).stdout.splitlines()
    assert busiest[1].split()[:3] == ["bob", "3", "3"]
    manual = policyd("block", "carol", "--reason", "phished", "--for", "2h", "--by", "jane", "-c", config)
    assert manual.returncode == 0, manual.stderr
    assert send(running, "carol") == "REJECT"
    audit = [json.loads(x) for x in policyd("audit", "--json", "-c", config).stdout.splitlines()]
    assert [(a["action"], a["subject"], a["who"]) for a in audit] == [
        ("block", "bob", "policyd"),
        ("block", "carol", "jane"),
    ]


def test_check_command_sends_one_request(running: PolicydServer) -> None:
    """policyd check prints the server's action, from flags or from stdin."""
    config = str(running.config)
    result = policyd("check", "--sasl-username", "dora", "--recipient", "x@gmail.com", "-c", config)
    assert result.returncode == 0 and result.stdout.strip() == "DUNNO"
    stdin = "sasl_username=dora\nrecipient=y@gmail.com\nprotocol_state=RCPT\n"
    result = policyd("check", "--stdin", "--json", "-c", config, input=stdin)
    assert json.loads(result.stdout) == {"action": "DUNNO", "text": ""}


def test_sighup_reloads_and_bad_config_keeps_the_old(running: PolicydServer) -> None:
    """SIGHUP with a broken file keeps the old limit; with a valid one the new limit applies."""
    config = running.config
    good = config.read_text(encoding="utf-8")
    config.write_text(good + "bogus: key\n", encoding="utf-8")
    running.signal(signal.SIGHUP)
    time.sleep(1)
    assert [send(running, "erin") for _ in range(4)] == ["DUNNO"] * 3 + ["REJECT"]
    assert "reload refused" in running.output() and "bogus: unknown key" in running.output()
    config.write_text(good.replace("limit: 3", "limit: 5"), encoding="utf-8")
    running.signal(signal.SIGHUP)
    time.sleep(1)
    assert [send(running, "fred") for _ in range(6)] == ["DUNNO"] * 5 + ["REJECT"]


def test_sigterm_exits_zero(tmp_path: Path) -> None:
    """kill -TERM stops the server with exit status 0."""
    port = free_port()
    server = PolicydServer(write(tmp_path / "c.yaml", port), port).start()
    send(server)
    assert server.stop() == 0
    assert "policyd stopped" in server.output()


def test_config_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    """A bad config: exit 2, one line naming file, line and key, no traceback."""
    path = tmp_path / "bad.yaml"
    path.write_text("outbound:\n  limit: 10\n  block_for: 5d\n", encoding="utf-8")
    for command in (["config", "check"], ["serve"], ["blocks"]):
        result = policyd(*command, "-c", str(path))
        assert result.returncode == 2, command
        assert result.stderr.strip() == f"policyd: error: {path}:3: outbound.block_for: must be at most 72h (got '5d')"
        assert "Traceback" not in result.stderr + result.stdout


def test_config_check_accepts_valid_file_and_env(tmp_path: Path) -> None:
    """config check says OK; $POLICYD_CONFIG is used without -c; -c works before the command."""
    path = write(tmp_path / "ok.yaml", free_port())
    assert policyd("-c", str(path), "config", "check").stdout.strip() == f"{path}: configuration OK"
    import os

    env = dict(os.environ, POLICYD_CONFIG=str(path))
    assert policyd("config", "check", env=env).returncode == 0


def test_errors_for_admin_mistakes(tmp_path: Path) -> None:
    """Unknown account, empty reason, dead server and missing config are clear one-liners."""
    path = write(tmp_path / "c.yaml", free_port())
    cases = [
        (["unblock", "nobody", "--reason", "x"], 2, "account nobody is not blocked"),
        (["unblock", "alice", "--reason", "  "], 2, "--reason must say why"),
        (["block", "alice", "--reason", "x", "--for", "9d"], 2, "--for must be between"),
        (["check", "--sasl-username", "a"], 1, "Connection refused"),
        (["check", "--server", "nonsense"], 2, "expected HOST:PORT"),
    ]
    for args, code, message in cases:
        result = policyd(*args, "-c", str(path))
        assert result.returncode == code, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    missing = policyd("blocks", "-c", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2 and "configuration file not found" in missing.stderr


def test_serve_reports_a_busy_port(tmp_path: Path, running: PolicydServer) -> None:
    """A listen address already in use is one clear line and a non-zero exit."""
    path = write(tmp_path / "other.yaml", running.port)
    result = policyd("serve", "-c", str(path))
    assert result.returncode == 1
    assert "cannot listen on" in result.stderr and "Traceback" not in result.stderr + result.stdout


def test_version() -> None:
    """policyd --version prints the version."""
    result = policyd("--version")
    assert result.returncode == 0 and result.stdout.startswith("policyd, version ")
