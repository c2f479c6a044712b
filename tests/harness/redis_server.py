"""A real ``redis-server`` for integration tests, on a free loopback port.

:func:`running_redis` starts one and always stops it, even when the test
fails.  The server keeps an append-only file in its own directory, so
:meth:`RedisServer.kill` (SIGKILL, an outage) followed by
:meth:`RedisServer.start` brings back the same data on the same port.
:func:`running_sentinel` starts a Sentinel watching a server.

When ``redis-server`` is not installed the test fails, loudly: these tests
prove what the product promises about Redis and must never be skipped
silently (``make test`` installs the package).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Debian's package may run a system Redis there; tests never touch it.
SYSTEM_PORT = 6379

#: Longest wait for a server to answer PING after it was started.
START_TIMEOUT = 15.0

#: Longest wait for a server to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0


def redis_server_binary() -> str:
    """The path of ``redis-server``; fails the test when it is missing."""
    found = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.fail(
            "redis-server is not installed: the Redis tests need a real server. "
            "Run `make test-deps` (or: apt-get install redis-server).",
            pytrace=False,
        )
    return found


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (never Redis's default 6379)."""
    for _ in range(20):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != SYSTEM_PORT:
            return port
    raise AssertionError("no free loopback port found")


def ping(port: int, password: str | None = None, timeout: float = 0.5) -> bool:
    """Whether a Redis server answers PING on 127.0.0.1:port."""
    command = b"PING\r\n"
    if password is not None:
        command = f"AUTH {password}\r\n".encode() + command
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(command)
            reply = b""
            deadline = time.monotonic() + timeout
            while b"PONG" not in reply and time.monotonic() < deadline:
                chunk = sock.recv(1024)
                if not chunk:
                    break
                reply += chunk
            return b"+PONG" in reply
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process, restartable on the same port and directory.

    :param directory: where it keeps its append-only file and log.
    :param port: TCP port on 127.0.0.1 (a free one by default).
    :param password: ``requirepass``, if any.
    :param extra: more ``--option value`` arguments.
    """

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        password: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.password = password
        self.extra = extra
        self.log = directory / "redis.log"
        self.socket = directory / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://`` URL of database 0 (with the password, if any)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def arguments(self) -> list[str]:
        """The command line."""
        arguments = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes",
            "--daemonize", "no",
            "--logfile", str(self.log),
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
        ]  # fmt: skip
        if self.password:
            arguments += ["--requirepass", self.password]
        return arguments + list(self.extra)

    def start(self) -> RedisServer:
        """Start (or restart) the server and wait until it answers PING."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.arguments(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"redis-server exited with {self.process.returncode} at start:\n{self.tail()}"
                )
            if ping(self.port, self.password):
                return self
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"redis-server on port {self.port} did not answer PING in {START_TIMEOUT}s")

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: an outage, as when the host or the process dies."""
        if self.running:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM (Redis flushes its append-only file), then SIGKILL if it lingers."""
        if not self.running:
            return
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, lines: int = 20) -> str:
        """The end of the server's log, for failure messages."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def running_redis(password: str | None = None, extra: tuple[str, ...] = ()) -> Iterator[RedisServer]:
    """A started server in a fresh directory; stopped and removed afterwards, whatever happens."""
    # A short directory under /tmp: a unix socket path must stay under 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="policyd-redis-"))
    server = RedisServer(directory, password=password, extra=extra)
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def running_sentinel(master: RedisServer, service: str = "policyd") -> Iterator[RedisServer]:
    """A Sentinel (``redis-server --sentinel``) that monitors ``master`` as ``service``."""
    directory = Path(tempfile.mkdtemp(prefix="policyd-sentinel-"))
    config = directory / "sentinel.conf"
    auth = f"sentinel auth-pass {service} {master.password}\n" if master.password else ""
    # Sentinel rewrites its configuration file, so it gets its own.
    config.write_text(
        f"sentinel monitor {service} 127.0.0.1 {master.port} 1\n{auth}", encoding="utf-8"
    )
    sentinel = _Sentinel(directory, config)
    try:
        yield sentinel.start()
    finally:
        sentinel.stop()
        shutil.rmtree(directory, ignore_errors=True)


class _Sentinel(RedisServer):
    """``redis-server CONFIG --sentinel``: same start and stop, other arguments."""

    def __init__(self, directory: Path, config: Path) -> None:
        super().__init__(directory)
        self.config = config

    def arguments(self) -> list[str]:
        """Sentinel mode; no data, so no append-only file."""
        return [
            redis_server_binary(), str(self.config), "--sentinel",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--logfile", str(self.log),
        ]  # fmt: skip
