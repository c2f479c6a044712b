"""A private, real postsrsd (Debian's 1.x) for the SRS tests of forwarded mail.

:class:`Postsrsd` runs ``postsrsd`` in the foreground (no ``-D``) as our
child, with its own secret file under a temporary directory, the SRS domain
the test gives (the local domain), and its two TCP lookup tables on
127.0.0.1 ports chosen at start::

    postsrsd -s SECRET -d example.org -l 127.0.0.1 -f FORWARD -r REVERSE -u postsrsd

``-f`` answers the forward lookup (``get ann@example.net`` ->
``200 SRS0=HHHH=TT=example.net=ann@example.org``), ``-r`` the reverse one
(``get SRS0=...@example.org`` -> ``200 ann@example.net``); an address of
the SRS domain is left as it is.  :meth:`Postsrsd.main_cf` gives the
Postfix parameters that use them, as Debian's README recommends (its
``main.cf.ex``).

The Debian package enables a system ``postsrsd`` on the default ports
10001 and 10002 with ``/etc/postsrsd.secret``.  It does not interfere: this
instance reads only its own secret and listens only on ports that nobody
held when they were chosen, so a test's Postfix can reach no other
postsrsd; when the harness installs the package itself it also stops and
disables the system service it brought in (``make test-deps`` installs it
as Debian does, and it may run beside the tests, unused).

A postsrsd that does not answer on both ports within :data:`START_TIMEOUT`
fails the test (never skips), with what it printed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.debian import apt_install, stop_services
from tests.harness.postfix import free_ports

POSTSRSD = "/usr/sbin/postsrsd"
#: The Debian package (``TEST_DEBS`` in the Makefile).
DEBIAN_PACKAGE = "postsrsd"
#: The user postsrsd drops to after binding (Debian's ``RUN_AS``), when it exists.
RUN_AS = "postsrsd"
#: How long postsrsd may take to answer on both ports.
START_TIMEOUT = 15.0
#: How long a lookup may take.
LOOKUP_TIMEOUT = 10.0

_install_lock = threading.Lock()


class PostsrsdError(AssertionError):
    """postsrsd could not be installed, started or asked."""


def _missing() -> list[str]:
    return [] if os.access(POSTSRSD, os.X_OK) else [POSTSRSD]


def ensure_postsrsd() -> None:
    """Install postsrsd when missing (as root) and stop the system service that brings; else fail loudly.

    :raises PostsrsdError: when it is missing and cannot be installed.
    """
    with _install_lock:
        if not _missing():
            return
        if os.geteuid() != 0:
            raise PostsrsdError(f"{POSTSRSD} is missing; install the Debian package {DEBIAN_PACKAGE} (make test-deps)")
        apt_install([DEBIAN_PACKAGE], _missing, PostsrsdError)
        # The package starts its own on 10001/10002: not ours to keep running.
        stop_services("postsrsd")


def lookup(port: int, address: str, timeout: float = LOOKUP_TIMEOUT) -> tuple[int, str]:
    """Ask one postsrsd table (Postfix's tcp_table protocol): ``(code, text)`` of ``get ADDRESS``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(f"get {address}\n".encode())
        answer = b""
        while not answer.endswith(b"\n") and len(answer) < 4096:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    code, _, text = answer.decode("utf-8", "replace").strip().partition(" ")
    if not code.isdigit():
        raise PostsrsdError(f"postsrsd on port {port} answered {answer!r} to get {address}")
    return int(code), text


class Postsrsd:
    """A private postsrsd: its own secret, SRS domain ``domain``, two loopback ports.

    :param root: a directory of its own (the secret and its output go there).
    :param domain: the SRS domain (rewritten senders are in it; its own senders are kept).
    """

    def __init__(self, root: Path, domain: str) -> None:
        self.root = root
        self.domain = domain
        self.secret = root / "postsrsd.secret"
        self.output = root / "postsrsd.out"
        self.forward_port = 0
        self.reverse_port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def main_cf(self) -> dict[str, str]:
        """The ``main.cf`` parameters that make Postfix use this postsrsd (Debian's README)."""
        return {
            "sender_canonical_maps": f"tcp:127.0.0.1:{self.forward_port}",
            "sender_canonical_classes": "envelope_sender",
            "recipient_canonical_maps": f"tcp:127.0.0.1:{self.reverse_port}",
            "recipient_canonical_classes": "envelope_recipient, header_recipient",
        }

    def argv(self) -> list[str]:
        """The command line: foreground, loopback, our secret, domain and ports."""
        argv = [
            POSTSRSD, f"-s{self.secret}", f"-d{self.domain}", "-l127.0.0.1",
            f"-f{self.forward_port}", f"-r{self.reverse_port}",
        ]
        with contextlib.suppress(KeyError):
            pwd.getpwnam(RUN_AS)
            argv.append(f"-u{RUN_AS}")
        return argv

    def start(self) -> Postsrsd:
        """Write a new secret, start postsrsd and wait until both tables answer.

        :raises PostsrsdError: when it exits or does not answer in time.
        """
        ensure_postsrsd()
        self.secret.write_text(secrets.token_urlsafe(32) + "\n", encoding="ascii")
        self.secret.chmod(0o600)  # read as root, before postsrsd drops to its user
        self.forward_port, self.reverse_port = free_ports(2)
        with open(self.output, "ab") as out:
            self.process = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        waiting = [self.forward_port, self.reverse_port]
        while waiting and time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PostsrsdError(
                    f"postsrsd exited with {self.process.returncode}: {' '.join(self.argv())}\n{self.printed()}"
                )
            waiting = [port for port in waiting if not self._answers(port)]
            if waiting:
                time.sleep(0.1)
        if waiting:
            self.stop()
            raise PostsrsdError(f"postsrsd did not answer on {waiting} in {START_TIMEOUT}s\n{self.printed()}")
        return self

    def _answers(self, port: int) -> bool:
        try:
            lookup(port, f"postmaster@{self.domain}", timeout=1.0)
        except OSError:
            return False
        return True

    def forward(self, address: str) -> tuple[int, str]:
        """The forward table's answer for a sender address."""
        return lookup(self.forward_port, address)

    def reverse(self, address: str) -> tuple[int, str]:
        """The reverse table's answer for a recipient address."""
        return lookup(self.reverse_port, address)

    def printed(self) -> str:
        """What postsrsd printed (it logs to syslog; only start-up errors show here)."""
        try:
            return self.output.read_text(encoding="utf-8", errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if it hangs."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture
def postsrsd() -> Iterator[Postsrsd]:
    """A started postsrsd for ``example.org`` (the tests' local domain), stopped at teardown."""
    root = Path(tempfile.mkdtemp(prefix="policyd-postsrsd-"))
    instance = Postsrsd(root, "example.org")
    try:
        yield instance.start()
    finally:
        instance.stop()
        shutil.rmtree(root, ignore_errors=True)
