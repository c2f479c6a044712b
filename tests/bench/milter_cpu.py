"""``policyd milter``'s own CPU per message, in process, without sockets or an event loop.

The bench's Postfix rows swing with whatever else the machine runs; this
measures only what the milter itself does for one message of the bench's
shape (a 2 KB plain message, one recipient, Postfix's macros, 20 messages
per SMTP session): the conversation, the filter and its score, the verdict
log line (written to a discarded stream) and the metrics.

    python -m tests.bench.milter_cpu [--messages N] [--rounds R] [--without-model] [--profile]

It prints the CPU microseconds per message of each round after a warm-up
round (process time, so other processes on the machine do not count) and
their minimum.  ``--without-model`` scores the first message only and gives
its score to every other: what remains is the milter's work around the model.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from policyd import config as configuration
from policyd import logs
from policyd.servers.milter import MilterServer
from policyd.testing import FakeMTA
from tests.bench.cpu import STEP, FakeReactor
from tests.bench.postfix import BODY

#: Messages per SMTP session, as the bench's clients send them.
PER_SESSION = 20

packet = FakeMTA.packet


def macros(stage: bytes, **values: str) -> bytes:
    """A macro packet as Postfix sends it."""
    data = b"".join((k if len(k) == 1 else f"{{{k}}}").encode() + b"\0" + v.encode() + b"\0"
                    for k, v in values.items())
    return packet(b"D", stage + data)


def session(count: int, first: int) -> bytes:
    """One SMTP session of ``count`` messages as Postfix's packets (from connect to QUIT_NC)."""
    out = [
        macros(b"C", j="mx.example.org", _="client.example.net [192.0.2.7]", daemon_name="smtpd",
               client_addr="192.0.2.7", client_name="client.example.net"),
        packet(b"C", b"client.example.net\0" + b"4" + (4567).to_bytes(2, "big") + b"192.0.2.7\0"),
        macros(b"H", tls_version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384"),
        packet(b"H", b"client.example.net\0"),
    ]
    for n in range(first, first + count):
        sender = "news.lou@example.net"
        recipient = f"bench.{n}@example.org"
        message_body = BODY.replace("\n", "\r\n").encode()
        out += [
            macros(b"M", i=f"4Xy{n:06X}", auth_type="", auth_authen="", mail_addr=sender),
            packet(b"M", f"<{sender}>\0".encode()),
            macros(b"R", rcpt_addr=recipient, rcpt_host="", rcpt_mailer="local"),
            packet(b"R", f"<{recipient}>\0".encode()),
            macros(b"T"),
            packet(b"L", f"Received\0from client.example.net (client.example.net [192.0.2.7])\r\n\tby "
                         f"mx.example.org (Postfix) with ESMTP id 4Xy{n:06X}\r\n\tfor <{recipient}>; "
                         "Thu,  3 Dec 2026 16:00:00 +0000 (UTC)\0".encode()),
            packet(b"L", f"From\0{sender}\0".encode()),
            packet(b"L", b"To\0someone@example.org\0"),
            packet(b"L", f"Subject\0bench {n}\0".encode()),
            packet(b"L", f"Message-Id\0<{n}.bench@example.net>\0".encode()),
            packet(b"L", b"Date\0Thu,  3 Dec 2026 16:00:00 +0000 (UTC)\0"),
            packet(b"B", message_body),
            macros(b"E", i=f"4Xy{n:06X}"),
            packet(b"E"),
        ]
    out.append(packet(b"K"))
    return b"".join(out)


def build(directory: Path) -> tuple[FakeReactor, MilterServer]:
    """A ``policyd milter`` server as the bench runs it, with a memory store, on a fake clock."""
    config = configuration.load_text(
        'listen:\n  milter: "tcp:0:interface=127.0.0.1"\n'
        'store:\n  url: "memory://"\n'
        "local_domains: [example.org]\n",
        "bench.yaml",
    )
    reactor = FakeReactor()
    reactor.advance(time.time())
    return reactor, MilterServer(reactor, config)


def run(count: int, rounds: int, profile: bool, without_model: bool = False) -> list[float]:
    """CPU µs per message of each round."""
    figures = []
    logs.setup(configuration.load_text('listen:\n  milter: "tcp:0"\n', "bench.yaml").log, stream=io.StringIO())
    with tempfile.TemporaryDirectory() as directory:
        reactor, server = build(Path(directory))
        if without_model:
            score = server.scorer.score_message
            first: list[Any] = []

            def scored_once(*work: Any) -> Any:
                if not first:
                    first.append(score(*work))
                return first[0]

            server.scorer.score_message = scored_once  # type: ignore[method-assign]
        protocol = server.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 54321))
        assert protocol is not None
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 54321))
        protocol.makeConnection(transport)
        protocol.dataReceived(packet(b"O", (6).to_bytes(4, "big") + (0x1FF).to_bytes(4, "big")
                                     + (0x1FFFFF).to_bytes(4, "big")))
        sessions = [session(PER_SESSION, n * PER_SESSION) for n in range(max(1, count // PER_SESSION))]
        per_round = len(sessions) * PER_SESSION
        profiler = cProfile.Profile() if profile else None
        for round_ in range(rounds + 1):
            if profiler is not None and round_:
                profiler.enable()
            started = time.process_time()
            for data in sessions:
                for start in range(0, len(data), 4096):
                    protocol.dataReceived(data[start : start + 4096])
                reactor.advance(STEP * PER_SESSION)
                transport.clear()
                logs.flush()
            if round_:
                figures.append((time.process_time() - started) / per_round * 1e6)
            if profiler is not None:
                profiler.disable()
        protocol.dataReceived(session(1, 0))
        replies = transport.value()
        if b"\x00\x00\x00\x01a" not in replies:
            raise SystemExit(f"no accept in the replies: {replies[-80:]!r}")
        if profiler is not None:
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(30)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.milter_cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=4000, help="messages per round (default 4000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--without-model", action="store_true", help="score only the first message")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the rounds")
    args = parser.parse_args(argv)
    figures = run(args.messages, args.rounds, args.profile, args.without_model)
    rounds = " ".join(f"{f:.1f}" for f in figures)
    what = "policyd milter without the model" if args.without_model else "policyd milter"
    print(f"{what}: CPU µs per message {min(figures):.1f} (rounds: {rounds})")


if __name__ == "__main__":
    main()
