"""Start and stop real ``policyd`` processes for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

POLICYD = str(Path(sys.executable).with_name("policyd"))


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0, process: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until something accepts on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def policyd(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one ``policyd`` command and capture its output."""
    return subprocess.run(
        [POLICYD, *args], capture_output=True, text=True, timeout=60, input=input, env=env
    )


class PolicydServer:
    """``policyd serve -c CONFIG`` (or ``policyd milter``) as a child process.

    :param config: path of the configuration file.
    :param port: the TCP port that configuration listens on.
    :param command: ``serve`` or ``milter``.
    :param nofile: the soft and hard ``RLIMIT_NOFILE`` to start it with (None: this process's).
    """

    def __init__(self, config: Path, port: int, command: str = "serve", nofile: tuple[int, int] | None = None) -> None:
        self.config = config
        self.port = port
        self.command = command
        self.nofile = nofile
        self.log = config.with_suffix(".log") if command == "serve" else config.with_name(f"{command}.log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> PolicydServer:
        """Start and wait until it listens."""
        command = [POLICYD, self.command, "-c", str(self.config)]
        if self.nofile is not None:
            # setrlimit then exec in the child itself: no preexec_fn in a threaded test process.
            launcher = (
                "import os, resource, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, {self.nofile!r}); "
                "os.execv(sys.argv[1], sys.argv[1:])"
            )
            command = [sys.executable, "-c", launcher, *command]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, timeout=10.0, process=self.process)
        return self

    def open_files(self) -> tuple[int, int]:
        """The running server's soft and hard limit of open files."""
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/limits", encoding="ascii") as limits:
            for line in limits:
                if line.startswith("Max open files"):
                    soft, hard = line.split()[3:5]
                    return int(soft), int(hard)
        raise AssertionError("no open-file limit in /proc")

    def signal(self, number: int) -> None:
        """Send a signal to the server."""
        assert self.process is not None
        os.kill(self.process.pid, number)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, and return the exit status (SIGKILL if it hangs)."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"policyd {self.command} did not exit after SIGTERM") from None

    def output(self) -> str:
        """Everything the server logged so far."""
        return self.log.read_text(encoding="utf-8", errors="replace")


def ask(port: int, attributes: dict[str, str], timeout: float = 10.0) -> str:
    """One request over a fresh connection; returns the action text."""
    from policyd.testing import encode

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(encode(attributes))
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    text = reply.decode()
    assert text.startswith("action="), f"malformed reply {text!r}"
    return text[len("action=") :].strip()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process (all its threads) has used; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
