"""Logs of a real ``policyd serve`` process: one line per decision, text or JSON, and the switches.

Each test starts the server, sends requests over the wire, stops it (so
everything is flushed) and reads what it wrote on stdout.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from policyd.testing import encode, rcpt
from tests.harness.servers import POLICYD, PolicydServer, free_port

#: Fields every JSON decision line carries (docs/operations.md, Logs).
DECISION_FIELDS = {
    "check", "subject", "client", "state", "action", "reason", "latency_ms",
    "queue_id", "sasl_username", "sender", "recipient",
}

#: Attributes that are no decision's business, each marked SECRET: none may reach the log.
SECRETS = {
    "helo_name": "helo-SECRET1.example",
    "ccert_subject": "CN=SECRET3",
    "x_message_body": "SECRET4 Dear customer, your invoice",
    "x_subject": "Subject: SECRET5 win big",
}

TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def start(tmp_path: Path, log: str) -> PolicydServer:
    """A server on a memory store, limit 2, with the given ``log:`` section."""
    port = free_port()
    config = tmp_path / "policyd.yaml"
    config.write_text(
        f'listen:\n  policy: "tcp:{port}:interface=127.0.0.1"\nstore:\n  url: "memory://"\n'
        f"local_domains: [example.org]\noutbound:\n  limit: 2\nlog:\n{log}",
        encoding="utf-8",
    )
    return PolicydServer(config, port).start()


def converse(port: int, requests: list[dict[str, str]]) -> list[str]:
    """Send requests pipelined on one connection; their replies' actions, in order."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"".join(encode(r) for r in requests))
        data = b""
        while data.count(b"\n\n") < len(requests):
            chunk = conn.recv(65536)
            assert chunk, f"closed after {data!r}"
            data += chunk
    return [r.decode().removeprefix("action=") for r in data.split(b"\n\n")[:-1]]


def send_garbage(port: int) -> None:
    """A request line without '=': the server logs a warning and closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"this is not a policy request\n\n")
        assert conn.recv(100) == b""


def traffic(account: str = "lou") -> list[dict[str, str]]:
    """Three external recipients (limit 2: DUNNO, DUNNO, REJECT) and a DATA stage, with secrets attached."""
    extra = dict(SECRETS, sender="lou@example.org", queue_id="4XyZ1")
    return [
        rcpt(sasl_username=account, recipient="a@gmail.com", **extra),
        rcpt(sasl_username=account, recipient="b@gmail.com", **extra),
        rcpt(sasl_username=account, recipient="c@gmail.com", **extra),
        rcpt(sasl_username=account, recipient="c@gmail.com", **dict(extra, protocol_state="DATA")),
    ]


def run_traffic(server: PolicydServer, requests: list[dict[str, str]]) -> tuple[list[str], str]:
    """Send the requests and some garbage, stop the server; its replies and its whole log."""
    try:
        replies = converse(server.port, requests)
        send_garbage(server.port)
    finally:
        status = server.stop()
    output = server.output()
    assert status == 0, output
    return replies, output


def test_json_log_one_object_per_decision_without_content(tmp_path: Path) -> None:
    """log.format json: every line is a JSON object; each decision one line with its fields, no message data."""
    server = start(tmp_path, "  format: json\n")
    replies, output = run_traffic(server, traffic())
    assert replies[:2] == ["DUNNO", "DUNNO"] and replies[2].startswith("REJECT 5.7.1 Account lou is blocked")
    lines = output.splitlines()
    records = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) and {"time", "level", "logger", "message"} <= r.keys() for r in records)
    decisions = [r for r in records if r["logger"] == "policyd.decision"]
    assert len(decisions) == 4, output
    for record in decisions:
        assert DECISION_FIELDS <= record.keys(), record
        assert record["level"] == "info"
        assert (record["check"], record["subject"], record["client"]) == ("quota", "lou", "192.0.2.10")
        assert (record["queue_id"], record["sasl_username"], record["sender"]) == ("4XyZ1", "lou", "lou@example.org")
        assert isinstance(record["latency_ms"], float) and 0 <= record["latency_ms"] < 5000
    assert [d["recipient"] for d in decisions] == ["a@gmail.com", "b@gmail.com", "c@gmail.com", "c@gmail.com"]
    assert [(d["state"], d["action"].split()[0], d["reason"]) for d in decisions] == [
        ("RCPT", "DUNNO", "1/2"),
        ("RCPT", "DUNNO", "2/2"),
        ("RCPT", "REJECT", "over limit: blocked"),
        ("DATA", "DUNNO", "not counted at DATA"),
    ]
    assert decisions[2]["action"] == replies[2]
    bad = [r for r in records if r["level"] == "warning" and "bad policy request" in r["message"]]
    assert len(bad) == 1 and "127.0.0.1:" in bad[0]["message"], output
    assert "SECRET" not in output, output


def test_text_log_one_compact_line_per_decision(tmp_path: Path) -> None:
    """log.format text: one timestamped line per decision, even when the account name carries line separators."""
    server = start(tmp_path, "  format: text\n")
    hostile = "m\u2028x\u0085y\u2029z"
    replies, output = run_traffic(server, [*traffic(), rcpt(sasl_username=hostile, recipient="a@gmail.com")])
    assert replies[-1] == "DUNNO"
    raw = server.log.read_bytes()
    lines = raw.decode("utf-8").split("\n")
    assert lines[-1] == ""
    assert all(re.match(TIMESTAMP + r" (DEBUG|INFO|WARNING|ERROR|CRITICAL) policyd\.", line) for line in lines[:-1]), output
    decisions = [line for line in lines if " INFO policyd.decision: " in line]
    assert len(decisions) == 5, output
    assert re.fullmatch(
        TIMESTAMP + r" INFO policyd\.decision: quota lou queue_id=4XyZ1 client=192\.0\.2\.10 sasl_username=lou "
        r"from=<lou@example\.org> to=<a@gmail\.com> state=RCPT action='DUNNO' reason='1/2' latency=\d+\.\d\dms",
        decisions[0],
    ), decisions[0]
    # Postfix sends no queue id before the queue file exists: the field is left out, not empty.
    assert " quota m\\x{2028}x\\x{85}y\\x{2029}z client=192.0.2.10 sasl_username=m\\x{2028}" in decisions[4]
    assert "action='REJECT 5.7.1 Account lou is blocked" in decisions[2]
    assert " state=DATA action='DUNNO' reason='not counted at DATA' " in decisions[3]
    assert len(decisions[0]) < 250
    assert "SECRET" not in output, output


@pytest.mark.parametrize(
    ("log", "shown", "hidden"),
    [
        ("  level: warning\n", ["WARNING policyd.quota: account lou blocked", "bad policy request"],
         ["policyd.decision", "INFO"]),
        ("  decisions: false\n", ["INFO policyd.server: policyd serving", "account lou blocked", "bad policy request"],
         ["policyd.decision"]),
    ],
    ids=["level-warning", "decisions-false"],
)  # fmt: skip
def test_decision_lines_can_be_turned_off(tmp_path: Path, log: str, shown: list[str], hidden: list[str]) -> None:
    """log.level warning and log.decisions false hide decision lines; warnings (blocks, bad input) stay."""
    server = start(tmp_path, log)
    replies, output = run_traffic(server, traffic())
    assert replies[2].startswith("REJECT 5.7.1 Account lou is blocked")
    for text in shown:
        assert text in output, (text, output)
    for text in hidden:
        assert text not in output, (text, output)


def test_level_per_component() -> None:
    """log.components sets one component's level; 'decision: warning' silences decision lines."""
    import io
    import logging

    from policyd import logs
    from tests.conftest import make_config

    stream = io.StringIO()
    config = make_config("log:\n  level: warning\n  components:\n    quota: debug\n    decision: warning\n")
    logs.setup(config.log, stream=stream)
    try:
        logging.getLogger("policyd.quota").debug("quota detail")
        logging.getLogger("policyd.notify").info("notify chatter")
        assert not logs.decisions.enabled
        logs.flush()
        assert "quota detail" in stream.getvalue() and "notify chatter" not in stream.getvalue()
    finally:
        logging.getLogger("policyd.quota").setLevel(logging.NOTSET)
        logs.setup(make_config("").log, stream=io.StringIO())


def test_component_levels_are_validated() -> None:
    """An unknown level for a component is a config error naming the key."""
    from policyd.errors import ConfigError
    from tests.conftest import make_config

    with pytest.raises(ConfigError, match="log.components: quota: must be one of"):
        make_config("log:\n  components:\n    quota: loud\n")


@pytest.mark.parametrize("format", ["text", "json"])
def test_hot_path_info_lines_look_like_every_other_line(format: str) -> None:
    """decisions.info writes the milter's verdict lines cheaply, in the configured shape, at its level."""
    import io
    import logging

    from policyd import logs
    from tests.conftest import make_config

    stream = io.StringIO()
    logs.setup(make_config(f"log:\n  format: {format}\n").log, stream=stream)
    milter_log = logging.getLogger("policyd.milter")
    try:
        logs.decisions.info(milter_log, "milter 4XyZ1 client=192.0.2.7 score=-2.50 ham\u2028")
        milter_log.setLevel(logging.WARNING)
        logs.decisions.info(milter_log, "not written")
        lines = [line for line in stream.getvalue().split("\n") if "policyd.milter" in line]
        assert len(lines) == 1
        if format == "json":
            line = json.loads(lines[0])
            assert line["logger"] == "policyd.milter" and line["level"] == "info"
            assert line["message"].startswith("milter 4XyZ1 client=192.0.2.7")
        else:
            assert re.fullmatch(TIMESTAMP + r" INFO policyd\.milter: milter 4XyZ1 client=192\.0\.2\.7 score=-2\.50 "
                                r"ham\\x\{2028\}", lines[0]), lines[0]
    finally:
        milter_log.setLevel(logging.NOTSET)
        logs.setup(make_config("").log, stream=io.StringIO())


def test_score_ip_says_which_dns_server_did_not_answer(tmp_path: Path) -> None:
    """policyd score-ip against a name server that never answers names it and the time, not a Query repr."""
    from tests.harness.servers import policyd

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        nameserver = f"127.0.0.1:{silent.getsockname()[1]}"
        config = tmp_path / "policyd.yaml"
        config.write_text(
            f'listen:\n  policy: "tcp:{free_port()}:interface=127.0.0.1"\nstore:\n  url: "memory://"\n'
            "local_domains: [example.org]\noutbound:\n  limit: 2\n"
            "inbound:\n  heuristics:\n    no_reverse_dns: 2\n  dnsbl:\n    - zone: bl.test\n      weight: 10\n"
            f'dns:\n  nameservers: ["{nameserver}"]\n  timeout: 1s\n  deadline: 3s\n',
            encoding="utf-8",
        )
        result = policyd("score-ip", "192.0.2.66", "--json", "-c", str(config))
    assert result.returncode == 0, result.stderr
    sources = {s["source"]: s["detail"] for s in json.loads(result.stdout)["sources"]}
    assert sources["bl.test"] == f"timeout: DNS server {nameserver} did not answer within 1s", sources
    assert f"DNS server {nameserver} did not answer within 1s" in sources["reverse_dns"], sources
    assert f"DNS zone bl.test: timeout: DNS server {nameserver} did not answer within 1s" in result.stderr
    assert "Query(" not in result.stdout + result.stderr


#: Loaded into ``policyd serve`` through PYTHONPATH: on SIGUSR1 a library warns, and Twisted logs a
#: warning and a failure with a traceback, the way third-party code does.
NOISY_LIBRARY = '''
import signal, warnings

def _noise(*_):
    from twisted.logger import Logger
    from twisted.python import log
    warnings.warn("library says hello", UserWarning)
    Logger(namespace="somelib").warn("twisted says {what}", what="hi")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.err(None, "legacy failure")

signal.signal(signal.SIGUSR1, _noise)
'''


def serve_on_a_pipe(tmp_path: Path, journal_stream: str | None) -> tuple[list[str], int]:
    """Run ``policyd serve`` with a pipe as stdout and stderr; send traffic and SIGUSR1; its lines."""
    import os
    import signal
    import subprocess
    import threading
    import time

    from tests.harness.servers import POLICYD, wait_for_port

    port = free_port()
    config = tmp_path / "policyd.yaml"
    config.write_text(
        f'listen:\n  policy: "tcp:{port}:interface=127.0.0.1"\nstore:\n  url: "memory://"\n'
        "local_domains: [example.org]\noutbound:\n  limit: 2\n",
        encoding="utf-8",
    )
    (tmp_path / "sitecustomize.py").write_text(NOISY_LIBRARY, encoding="utf-8")
    read, write = os.pipe()
    status = os.fstat(write)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env["JOURNAL_STREAM"] = journal_stream or f"{status.st_dev}:{status.st_ino}"
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read, 65536), b"")))
    reader.start()
    process = subprocess.Popen([POLICYD, "serve", "-c", str(config)], stdout=write, stderr=write, env=env)
    os.close(write)
    try:
        wait_for_port(port, process=process)
        converse(port, traffic())
        process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while b"legacy failure" not in b"".join(chunks) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        code = process.wait(15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(10)
        os.close(read)
    return b"".join(chunks).decode("utf-8").splitlines(), code


def test_under_journald_every_line_starts_with_its_priority(tmp_path: Path) -> None:
    """With JOURNAL_STREAM naming its stdout, every line of policyd serve, library warnings, Twisted's
    events and a traceback's lines included, starts with its sd-daemon <N> priority."""
    lines, code = serve_on_a_pipe(tmp_path, None)
    text = "\n".join(lines)
    assert code == 0, text
    assert lines and all(re.match(r"<[2-7]>", line) for line in lines), text
    decisions = [line for line in lines if " INFO policyd.decision: " in line]
    assert len(decisions) == 4 and all(line.startswith("<6>") for line in decisions), text
    assert any(re.match(r"<4>.* WARNING policyd\.quota: account lou blocked", line) for line in lines), text
    assert any(
        re.match(r"<4>.* WARNING policyd\.warnings: UserWarning: library says hello \(sitecustomize\.py:\d+\)$", line)
        for line in lines
    ), text
    assert any(re.match(r"<4>.* WARNING policyd\.twisted: twisted says hi$", line) for line in lines), text
    failure = [n for n, line in enumerate(lines) if "legacy failure" in line]
    assert failure and re.match(r"<[23]>", lines[failure[0]]), text
    assert any(re.match(r"<[23]>.*RuntimeError: boom", line) for line in lines[failure[0]:]), text


def test_journal_stream_of_another_file_leaves_lines_unprefixed(tmp_path: Path) -> None:
    """JOURNAL_STREAM inherited from a unit but naming another stream (output piped elsewhere): no prefixes."""
    other = os.stat(tmp_path)
    lines, code = serve_on_a_pipe(tmp_path, f"{other.st_dev}:{other.st_ino}")
    text = "\n".join(lines)
    assert code == 0, text
    assert lines and not any(re.match(r"<\d>", line) for line in lines), text
    assert all(re.match(TIMESTAMP + " ", line) or line.startswith(("Traceback", " ", "builtins.", "RuntimeError"))
               for line in lines), text
    assert any("policyd.warnings: UserWarning: library says hello" in line for line in lines), text


def test_syslog_gets_every_line_with_facility_mail(tmp_path: Path) -> None:
    """log.syslog sends decisions and warnings to the syslog socket, facility mail, as policyd[PID]."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="syslog", dir="/tmp")  # a socket path must be short
    try:
        path = f"{folder}/log"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as syslogd:
            syslogd.bind(path)
            server = start(tmp_path, f"  syslog: {path}\n")
            run_traffic(server, traffic())
            syslogd.settimeout(0.5)
            datagrams = []
            try:
                while True:
                    datagrams.append(syslogd.recv(65536).decode())
            except TimeoutError:
                pass
    finally:
        shutil.rmtree(folder)
    assert server.process is not None
    ident = f"policyd[{server.process.pid}]: "
    decisions = [d for d in datagrams if "policyd.decision:" in d]
    assert len(decisions) == 4, datagrams
    # Facility mail (2) * 8 + info (6) = 22; a warning (4) is 20.
    assert decisions[0].startswith(f"<22>{ident}INFO policyd.decision: quota lou queue_id=4XyZ1 "), decisions[0]
    assert any(d.startswith(f"<20>{ident}WARNING policyd.quota: account lou blocked") for d in datagrams), datagrams
    assert "SECRET" not in "".join(datagrams)


def test_an_unreachable_syslog_socket_stops_the_start_with_one_line(tmp_path: Path) -> None:
    """log.syslog naming a socket nobody listens on: policyd serve exits 2 with one line naming the key."""
    from tests.harness.servers import policyd

    config = tmp_path / "policyd.yaml"
    config.write_text(
        f'listen:\n  policy: "tcp:{free_port()}:interface=127.0.0.1"\nstore:\n  url: "memory://"\n'
        f"local_domains: [example.org]\noutbound:\n  limit: 2\nlog:\n  syslog: {tmp_path}/no-such-socket\n",
        encoding="utf-8",
    )
    result = policyd("serve", "-c", str(config))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"log.syslog: cannot send to {tmp_path}/no-such-socket" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_start_up_error_under_journald_is_filed_as_an_error(tmp_path: Path) -> None:
    """A daemon that cannot start writes its one-line error with <3>, so journalctl -p err shows it."""
    read, write = os.pipe()
    status = os.fstat(write)
    env = {**os.environ, "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
    broken = tmp_path / "broken.yaml"
    broken.write_text("listen:\n  policy: [not, an, endpoint]\n", encoding="utf-8")
    try:
        code = subprocess.call([POLICYD, "serve", "-c", str(broken)], stdout=subprocess.DEVNULL, stderr=write,
                               env=env, timeout=60)
    finally:
        os.close(write)
    with os.fdopen(read, "rb") as stream:
        lines = stream.read().decode("utf-8").splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("<3>policyd: error: "), lines
