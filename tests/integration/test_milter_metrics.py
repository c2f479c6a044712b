"""A real ``policyd milter`` with ``listen.milter_metrics``: its verdict line and its Prometheus metrics."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from policyd import __version__
from policyd.testing import FakeMTA
from tests.harness.servers import PolicydServer, free_port, wait_for_port

packet = FakeMTA.packet


def one_message(port: int) -> bytes:
    """A whole SMTP transaction from an authenticated client, pipelined as an MTA would send it step by step."""
    data = (
        packet(b"O", (6).to_bytes(4, "big") + (0x1FF).to_bytes(4, "big") + (0).to_bytes(4, "big"))
        + packet(b"C", b"mail.example.net\x004" + (4567).to_bytes(2, "big") + b"192.0.2.7\x00")
        + packet(b"D", b"M{auth_authen}\x00lou\x00")
        + packet(b"M", b"<lou@example.org>\x00")
        + packet(b"R", b"<bob@example.net>\x00")
        + packet(b"L", b"Subject\x00Lunch on Friday\x00")
        + packet(b"L", b"Message-ID\x00<lunch.1@example.org>\x00")
        + packet(b"N")
        + packet(b"B", b"Shall we meet at noon at the usual place?\r\n")
        + packet(b"D", b"Ei\x004XyZ1\x00")
        + packet(b"E")
        + packet(b"Q")
    )
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(data)
        replies = b""
        while chunk := conn.recv(65536):
            replies += chunk
    return replies


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The milter's /metrics, by sample name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.headers["content-type"].startswith("text/plain")
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_milter_metrics_and_verdict_line(tmp_path: Path) -> None:
    """listen.milter_metrics serves /metrics (only): the message counted, its scoring time, the version;
    the verdict line names queue id, client, SASL user, sender and recipient, not the content."""
    port, metrics_port = free_port(), free_port()
    config = tmp_path / "policyd.yaml"
    config.write_text(
        f'listen:\n  policy: "tcp:{free_port()}:interface=127.0.0.1"\n'
        f'  milter: "tcp:{port}:interface=127.0.0.1"\n'
        f'  milter_metrics: "tcp:{metrics_port}:interface=127.0.0.1"\n'
        f'store:\n  url: "sqlite:///{tmp_path}/state.db"\nlocal_domains: [example.org]\noutbound:\n  limit: 10\n',
        encoding="utf-8",
    )
    milter = PolicydServer(config, port, "milter").start()
    try:
        wait_for_port(metrics_port, process=milter.process)
        before = scrape(metrics_port)
        assert before[("policyd_build_info", (("version", __version__),))] == 1
        assert before[("policyd_milter_messages_total", (("outcome", "ham"),))] == 0
        replies = one_message(port)
        assert b"a" in replies[-64:] or b"c" in replies[-64:], replies
        after = scrape(metrics_port)
        counted = sum(after[("policyd_milter_messages_total", (("outcome", o),))] for o in ("ham", "spam"))
        assert counted == 1, after
        assert after[("policyd_milter_scoring_seconds_count", ())] == 1
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/api/v1/blocks", timeout=10)
            raise AssertionError("the milter's metrics listener served something else than /metrics")
        except urllib.error.HTTPError as error:
            assert error.code == 404
    finally:
        status = milter.stop()
    output = milter.output()
    assert status == 0, output
    (line,) = [x for x in output.splitlines() if " INFO policyd.milter: milter 4XyZ1 " in x]
    assert "client=192.0.2.7 sasl_username=lou from=<lou@example.org> to=<bob@example.net> score=" in line, line
    assert "Lunch" not in output and "noon" not in output and "lunch.1" not in output
