"""A real SMTP server on a loopback port that records every message it gets.

It runs in threads of the test process, so it works beside blocking SMTP
clients (smtplib driving Postfix) and beside the reactor alike.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Delivery:
    """One message as Postfix delivered it to the sink."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes

    def header(self, name: str) -> str | None:
        """The first header ``name`` of the raw message (unfolded), if any."""
        from email import message_from_bytes, policy

        value = message_from_bytes(self.data, policy=policy.default).get(name)
        return None if value is None else str(value)


def _address(argument: str) -> str:
    """``<a@b> SIZE=1`` -> ``a@b``."""
    start, end = argument.find("<"), argument.find(">")
    if start >= 0 and end > start:
        return argument[start + 1 : end]
    return argument.split()[0] if argument.split() else ""


class _SinkHandler(socketserver.StreamRequestHandler):
    """One SMTP connection to the sink: accepts every message and records it."""

    server: _SinkServer
    timeout = 120

    def reply(self, text: str) -> None:
        self.wfile.write(text.encode("ascii") + b"\r\n")

    def handle(self) -> None:
        sink = self.server.sink
        sink._opened(self.connection)
        try:
            self._dialogue(sink)
        except OSError:
            pass
        finally:
            sink._closed(self.connection)

    def _dialogue(self, sink: SmtpSink) -> None:
        self.reply("220 sink.policyd.test ESMTP recording sink")
        sender: str | None = None
        recipients: list[str] = []
        while True:
            line = self.rfile.readline(65536)
            if not line:
                return
            command = line.rstrip(b"\r\n").decode("utf-8", "replace")
            verb, _, argument = command.partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                self.reply(
                    "250-sink.policyd.test\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES"
                )
            elif verb == "HELO":
                self.reply("250 sink.policyd.test")
            elif verb == "MAIL":
                sender, recipients = _address(argument.partition(":")[2]), []
                self.reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                if sender is None:
                    self.reply("503 5.5.1 MAIL first")
                    continue
                recipients.append(_address(argument.partition(":")[2]))
                self.reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if sender is None or not recipients:
                    self.reply("503 5.5.1 RCPT first")
                    continue
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                data = self._data()
                if data is None:
                    return
                number = sink._record(Delivery(sender, tuple(recipients), data))
                self.reply(f"250 2.0.0 Ok: queued as sink-{number}")
                sender, recipients = None, []
            elif verb == "RSET":
                sender, recipients = None, []
                self.reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                self.reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:
                self.reply("502 5.5.2 Command not implemented")

    def _data(self) -> bytes | None:
        lines: list[bytes] = []
        while True:
            line = self.rfile.readline(1 << 20)
            if not line:
                return None
            if line in (b".\r\n", b".\n"):
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b".") else line)


class _SinkServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    sink: SmtpSink

    def handle_error(self, request: object, client_address: object) -> None:
        """Keep going: a broken client connection is not the sink's failure."""


class SmtpSink:
    """An SMTP server on 127.0.0.1 (port chosen at start) that records what it gets.

    It runs in threads of the test process, independent of the reactor, and
    accepts every message.  ``deliveries`` grows as Postfix delivers.
    """

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self._lock = threading.Condition()
        self._connections: set[socket.socket] = set()
        self._server: _SinkServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self, port: int = 0) -> SmtpSink:
        """Listen (on ``port``, or a free one) and serve in a background thread."""
        server = _SinkServer(("127.0.0.1", port), _SinkHandler)
        server.sink = self
        self._server = server
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="smtp-sink",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is None:
            return
        self._server.shutdown()
        with self._lock:
            open_now = list(self._connections)
        for connection in open_now:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 5
        with self._lock:
            while self._connections and time.monotonic() < deadline:
                self._lock.wait(0.1)
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = None

    def _opened(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def _closed(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)
            self._lock.notify_all()

    def _record(self, delivery: Delivery) -> int:
        with self._lock:
            self.deliveries.append(delivery)
            self._lock.notify_all()
            return len(self.deliveries)

    def snapshot(self) -> list[Delivery]:
        """The deliveries so far."""
        with self._lock:
            return list(self.deliveries)

    def recipients(self, where: Callable[[Delivery], bool] | None = None) -> Counter[str]:
        """How many times each recipient was delivered (of deliveries matching ``where``)."""
        counted: Counter[str] = Counter()
        for delivery in self.snapshot():
            if where is None or where(delivery):
                counted.update(delivery.recipients)
        return counted

    def wait_for(
        self, done: Callable[[list[Delivery]], bool], timeout: float = 30.0
    ) -> list[Delivery]:
        """Wait until ``done(deliveries)`` holds; return the deliveries either way."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not done(list(self.deliveries)):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(min(left, 0.2))
            return list(self.deliveries)
