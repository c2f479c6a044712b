"""The policyd command: real server processes and the admin commands against them."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from policyd.testing import rcpt
from tests.harness.servers import POLICYD, PolicydServer, ask, free_port, policyd


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


def run_bytes(*args: str | bytes, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run one ``policyd`` command with arguments that may be any bytes, its output kept as bytes."""
    return subprocess.run([POLICYD, *args], capture_output=True, timeout=60, input=input)


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
    """Nothing to do or no such object exits 1; a usage or config error 2; each one clear line."""
    path = write(tmp_path / "c.yaml", free_port())
    cases = [
        (["unblock", "nobody", "--reason", "x"], 1, "account nobody is not blocked"),
        (["exemption", "approve", "42"], 1, "no exemption #42"),
        (["exemption", "deny", "42", "--reason", "x"], 1, "no exemption #42"),
        (["exemption", "revoke", "42", "--reason", "x"], 1, "no exemption #42"),
        (["quarantine", "show", "42"], 1, "no quarantined message #42"),
        (["quarantine", "release", "42"], 1, "no quarantined message #42"),
        (["quarantine", "delete", "42"], 1, "no quarantined message #42"),
        (["audit", "--since", "yesterday"], 2, "'yesterday': expected now, +DURATION"),
        (["audit", "--since", "+1h", "--until", "now"], 2, "--until must be after --since"),
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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["status", b"\xff"], "ACCOUNT: '\\xff' is not UTF-8 text"),
        (["unblock", "eve\x9b2j", "--reason", "x"], "ACCOUNT: 'eve\\x9b2j' is not an account name"),
        (["block", "a\x1b[2J", "--reason", "x"], "'a\\x1b[2j' is not an account name"),
        (["block", "alice", "--reason", b"caf\xe9"], "--reason: 'caf\\xe9' is not UTF-8 text"),
        (["block", "alice", "--reason", "x", "--by", b"\xff"], "--by: '\\xff' is not UTF-8 text"),
        (["exemption", "approve", "99999999999999999999999"], "ID: expected a whole number from 1 to"),
        (["exemption", "deny", "0", "--reason", "x"], "ID: expected a whole number from 1 to"),
        (["exemption", "revoke", "1_000", "--reason", "x"], "ID: expected a whole number from 1 to"),
        (["quarantine", "show", str(2**70)], "ID: expected a whole number from 1 to"),
        (["quarantine", "release", str(2**63)], "ID: expected a whole number from 1 to"),
        (["quarantine", "delete", "abc"], "ID: expected a whole number from 1 to"),
        (["audit", "--limit", "-5"], "--limit: expected a whole number from 1 to"),
        (["audit", "--limit", "9" * 5000], "--limit: expected a whole number from 1 to"),
        (["quarantine", "list", "--limit", "0"], "--limit: expected a whole number from 1 to"),
        (["exemption", "request", "alice", "--limit", str(2**64), "--from", "now", "--until", "+1h",
          "--reason", "x"], "--limit: expected a whole number from 1 to"),
        (["score", "--top", "-1", "x.eml"], "--top: expected a whole number from 0 to"),
        (["prefs", "set", b"\xff@example.org", "--spam", "inbox"], "ADDRESS: '\\xff@example.org' is not UTF-8"),
        (["check", "--sasl-username", b"\xff"], "--sasl-username: '\\xff' is not UTF-8 text"),
        (["exemption", "list", "--status", "\x1b[2J"], "Invalid value for '--status': '\\x1b[2J' is not one of"),
        (["quarantine", "bogus"], "No such command 'bogus'. (see policyd quarantine --help)"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(tmp_path: Path, args: list[str | bytes], message: str) -> None:
    """Undecodable bytes, control characters, ids beyond 64 bits and negative limits: exit 2, one line."""
    path = write(tmp_path / "c.yaml", free_port())
    result = run_bytes(*args, "-c", str(path))
    errors = result.stderr.decode()
    assert result.returncode == 2, errors
    assert errors.startswith("policyd: error: ") and message in errors, errors
    assert len(errors.splitlines()) == 1 and result.stdout == b""


def test_stdin_that_is_not_utf8_is_a_usage_error(tmp_path: Path) -> None:
    """policyd check --stdin with bytes that are not UTF-8: exit 2, one line, nothing sent."""
    path = write(tmp_path / "c.yaml", free_port())
    result = run_bytes("check", "--stdin", "-c", str(path), input=b"sasl_username=\xff\n")
    assert result.returncode == 2
    assert result.stderr.decode().strip() == "policyd: error: standard input is not UTF-8 text (invalid start byte at byte 14)"


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


# --- text from outside, shown to a terminal ------------------------------------------

#: What an outsider can put in a subject, a sender, a reason or an organisation:
#: an OSC 52 clipboard write, a screen clear (7-bit and C1), CR and backspace
#: that overwrite what was shown, and a bidi override that reorders the line.
HOSTILE = "\x1b]52;c;cm0gLXJmIH4=\x07\x1b[2J\x9b2J\r\x08\u202eevil"
#: An account name a policy request can carry (the protocol refuses C0 controls).
HOSTILE_ACCOUNT = "eve\x9b2j\u202e"
#: Bytes of those characters (UTF-8) that must never reach a terminal.
ACTIVE = [b"\x1b", b"\x07", b"\r", b"\x08", "\x9b".encode(), "\u202e".encode()]
#: A held message whose headers and text carry escapes.
HOSTILE_MESSAGE = (
    b"Subject: " + HOSTILE.encode() + b"\r\nFrom: <x@example.net>\r\n\r\n"
    b"hello \x1b[2J there\r\nsecond line\x1b]52;c;YQ==\x07\r\n"
)


def hold_hostile_text(path: Path) -> None:
    """Write a held message, an exemption, an audit entry and a block, each carrying HOSTILE."""
    from policyd.store import AuditEntry, Exemption, Quarantined
    from policyd.store.sqlite import SQLiteStore

    store = SQLiteStore(str(path))
    now = time.time()
    entry = Quarantined(0, "bob@example.org", f"x{HOSTILE}@example.net", HOSTILE, 12.0, now, now + 3600,
                        len(HOSTILE_MESSAGE), "192.0.2.7", "4Q" + HOSTILE, (HOSTILE,))
    store.quarantine(entry, HOSTILE_MESSAGE)
    store.save_exemption(Exemption(0, "alice", 500, now, now + 3600, f"{HOSTILE} (organisation: {HOSTILE})",
                                   HOSTILE, now))
    store.record(AuditEntry(now, HOSTILE, "exemption-request", "exemption #1 (alice, 500/h)", HOSTILE))
    store.close()


def on_terminal(*args: str) -> bytes:
    """What one ``policyd`` command writes when its standard output is a terminal (raw mode)."""
    primary, secondary = pty.openpty()
    tty.setraw(secondary)  # no CR added before each LF: the bytes as the command wrote them
    process = subprocess.Popen([POLICYD, *args], stdout=secondary, stderr=subprocess.PIPE)
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the command closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(primary)
    _, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors
    return output


def test_outside_text_reaches_the_terminal_escaped(running: PolicydServer) -> None:
    """Every listing and show command writes controls and bidi overrides from outside as \\x{..}, JSON too."""
    for _ in range(4):
        send(running, HOSTILE_ACCOUNT)
    hold_hostile_text(running.config.parent / "state.db")
    config = str(running.config)
    commands = [["quarantine", "list"], ["quarantine", "show", "1"], ["exemption", "list"], ["audit"],
                ["blocks"], ["status"]]
    for command in commands:
        for json_flag in ([], ["--json"]):
            result = run_bytes(*command, *json_flag, "-c", config)
            assert result.returncode == 0, (command, result.stderr)
            for active in ACTIVE:
                assert active not in result.stdout + result.stderr, (command, json_flag, active)
            if json_flag:
                for line in result.stdout.splitlines():
                    json.loads(line)  # still one JSON object per line, the text escaped inside it
            else:
                assert b"\\x{1b}" in result.stdout or b"\\x{9b}" in result.stdout, command
    listed = json.loads(run_bytes("quarantine", "list", "--json", "-c", config).stdout)
    assert listed["subject"] == HOSTILE and listed["reasons"] == [HOSTILE]
    (blocked,) = [json.loads(x) for x in run_bytes("blocks", "--json", "-c", config).stdout.splitlines()]
    assert blocked["account"] == HOSTILE_ACCOUNT
    shown = run_bytes("quarantine", "show", "1", "-c", config).stdout.decode()
    assert "Subject: \\x{1b}]52;c;cm0gLXJmIH4=\\x{7}\\x{1b}[2J\\x{9b}2J \\x{8}\\x{202e}evil" in shown  # (a CR read as a space)
    assert "hello \\x{1b}[2j there" in shown  # the start of its text (as the scorer reads it)


def test_raw_message_is_escaped_on_a_terminal_and_exact_in_a_pipe(tmp_path: Path) -> None:
    """quarantine show --raw keeps the message byte for byte in a pipe, and escapes it on a terminal."""
    config = write(tmp_path / "c.yaml", free_port())
    hold_hostile_text(tmp_path / "state.db")
    piped = run_bytes("quarantine", "show", "1", "--raw", "-c", str(config))
    assert piped.returncode == 0 and piped.stdout == HOSTILE_MESSAGE
    shown = on_terminal("quarantine", "show", "1", "--raw", "-c", str(config))
    for active in ACTIVE:
        assert active not in shown, active
    assert b"\nhello \\x{1b}[2J there\nsecond line" in shown
