"""Robustness of a running ``policyd milter``: 100,000 hostile milter packets, bounded memory."""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.servers import POLICYD, free_port, wait_for_port

#: Packets thrown, at least.
PACKETS = 100_000
#: Hard stop for the whole throw, whatever the machine's load.
SECONDS = 150.0
#: Fewest packets that still make a meaningful throw (a tenth of the aim).
MIN_PACKETS = PACKETS // 10


def packet(command: bytes, data: bytes = b"") -> bytes:
    return (len(data) + 1).to_bytes(4, "big") + command + data


NEGOTIATE = packet(b"O", (6).to_bytes(4, "big") + (0x1FF).to_bytes(4, "big") + (0x1FFFFF).to_bytes(4, "big"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def milter(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """``policyd milter`` on a free loopback port with a SQLite store."""
    port = free_port()
    config = tmp_path / "policyd.yaml"
    config.write_text(
        f'listen:\n  milter: "tcp:{port}:interface=127.0.0.1"\n'
        f'store:\n  url: "sqlite:///{tmp_path}/state.db"\nlocal_domains: [example.org]\n',
        encoding="utf-8",
    )
    log = tmp_path / "milter.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([POLICYD, "milter", "-c", str(config)], stdout=out, stderr=subprocess.STDOUT)
    wait_for_port(port, 20, process)
    yield process, port, log
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(20)


def hostile(rng: random.Random) -> tuple[bytes, bool]:
    """One hostile packet, and whether it should end the connection."""
    shape = rng.randrange(10)
    if shape == 0:
        return rng.randbytes(rng.randrange(1, 64)), True  # raw garbage
    if shape == 1:
        # An absurd length: closes, except on a header, which is read past
        # (and swallows the rest of the batch).
        return (0x7FFFFFFF).to_bytes(4, "big") + rng.choice([b"B", b"L"]), True
    if shape == 2:
        return (0).to_bytes(4, "big"), True  # empty packet
    if shape == 3:
        return packet(bytes([rng.randrange(256)]), rng.randbytes(rng.randrange(32))), True  # unknown command
    # Legal commands with hostile contents keep the connection open.
    command = rng.choice([b"D", b"L", b"B", b"H", b"M", b"R", b"N", b"A"])
    if command == b"D":
        data = rng.choice([b"C", b"M", b"R", b"L", b"E"]) + rng.randbytes(rng.randrange(48))
    elif command == b"L":
        data = rng.randbytes(rng.randrange(1, 40)).replace(b"\0", b"x") + b"\0" + rng.randbytes(rng.randrange(200)) + b"\0"
    elif command == b"B":
        data = rng.randbytes(rng.randrange(2000))
    elif command in (b"M", b"R"):
        data = b"<" + rng.randbytes(rng.randrange(60)).replace(b"\0", b"") + b">\0"
    elif command == b"H":
        data = rng.randbytes(rng.randrange(80)).replace(b"\0", b"") + b"\0"
    else:
        data = b""
    return packet(command, data), False


def drain(sock: socket.socket) -> bool:
    """Read what the milter wrote; False once it closed."""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def negotiates(port: int) -> bool:
    """A well-behaved MTA's negotiation gets its reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(NEGOTIATE)
        reply = b""
        while len(reply) < 5 or len(reply) < 4 + int.from_bytes(reply[:4], "big"):
            chunk = sock.recv(4096)
            if not chunk:
                return False
            reply += chunk
        return reply[4:5] == b"O"


def test_hundred_thousand_hostile_packets(milter: tuple[subprocess.Popen[bytes], int, Path]) -> None:
    """Garbage, absurd lengths, unknown commands and hostile contents: no crash, memory bounded, others served."""
    process, port, log = milter
    rng = random.Random(20261125)
    assert negotiates(port)
    before = rss_kib(process.pid)
    thrown = connections = 0
    started = time.monotonic()
    while thrown < PACKETS and time.monotonic() - started < SECONDS:
        connections += 1
        batch = [NEGOTIATE]
        for _ in range(rng.randrange(50, 400)):
            data, closes = hostile(rng)
            batch.append(data)
            if closes:
                break
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            try:
                sock.sendall(b"".join(batch))
                thrown += len(batch) - 1
            except OSError:
                pass  # closed on a hostile packet while the rest was still going out
            sock.setblocking(False)
            drain(sock)
        if connections % 100 == 0:
            assert process.poll() is None, log.read_text()[-3000:]
            assert negotiates(port), "a well-behaved MTA was not served during the fuzzing"
    # The throw stops at PACKETS or at SECONDS, whichever comes first: how many
    # a loaded machine manages is no concern here, only that it was a real throw.
    assert thrown >= MIN_PACKETS, f"only {thrown} packets in {SECONDS}s"
    assert process.poll() is None, log.read_text()[-3000:]
    assert negotiates(port)
    after = rss_kib(process.pid)
    assert after - before < 30 * 1024, (before, after)
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0
    assert "Traceback" not in log.read_text()
