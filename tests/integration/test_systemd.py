"""The systemd units: ``systemd-analyze verify`` and ``security``, and socket activation.

The units name ``/opt/policyd/bin/policyd``; the tests copy them to a
temporary directory with that path pointed at this test install, so
``verify`` checks a unit that could really start.  Socket activation is
exercised the way systemd does it: a listening socket as file descriptor 3,
``LISTEN_FDS=1``, ``LISTEN_PID`` set to the server's own pid (by a wrapper
that then execs ``policyd serve``) and ``LISTEN_FDNAMES`` from the socket
unit's ``FileDescriptorName=``.

``systemd-analyze`` comes with Debian's ``systemd`` package (``make test``
installs it); when it is missing the tests fail, never skip.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from policyd.testing import encode, rcpt
from tests.harness.servers import POLICYD

UNITS = Path(__file__).resolve().parents[2] / "systemd"

#: Where the units expect the installed program (README, Operations).
INSTALLED = "/opt/policyd/bin/policyd"

#: ``systemd-analyze security --offline=yes`` rates policyd.service 1.2 ("OK")
#: with systemd 252 (Debian 12); any loosening of the hardening fails here.
MAX_EXPOSURE = 1.2

#: Settings the operations issue asks for, as ``systemd-analyze security`` names them.
REQUIRED_HARDENING = (
    "User=/DynamicUser=",
    "NoNewPrivileges=",
    "ProtectSystem=",
    "ProtectHome=",
    "PrivateTmp=",
    "PrivateDevices=",
    "RestrictAddressFamilies=~AF_PACKET",
    "RestrictAddressFamilies=~AF_NETLINK",
    "SystemCallFilter=~@privileged",
    "SystemCallFilter=~@mount",
    "CapabilityBoundingSet=~CAP_SYS_ADMIN",
    "MemoryDenyWriteExecute=",
)

#: What ``systemd`` does before exec'ing a socket-activated service: the
#: socket becomes fd 3 and LISTEN_PID names the process that will use it.
ACTIVATE = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def systemd_analyze() -> str:
    """The path of ``systemd-analyze``; fails the test when it is missing."""
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail(
            "systemd-analyze is not installed: run `make test-deps` (or: apt-get install systemd)",
            pytrace=False,
        )
    return found


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``systemd-analyze`` without colours or a pager."""
    env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="", LC_ALL="C.UTF-8")
    return subprocess.run(
        [systemd_analyze(), *args], capture_output=True, text=True, timeout=60, env=env
    )


def unit(name: str) -> configparser.RawConfigParser:
    """A unit file's sections and keys (the last value of a repeated key)."""
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name, encoding="utf-8")
    return parser


@pytest.fixture
def installed_units(tmp_path: Path) -> Iterator[Path]:
    """The units in a temporary directory, running this test install's policyd."""
    directory = tmp_path / "units"
    directory.mkdir()
    for source in sorted(UNITS.iterdir()):
        text = source.read_text(encoding="utf-8")
        if source.suffix == ".service":
            assert f"ExecStart={INSTALLED} " in text, f"{source.name}: ExecStart is not {INSTALLED}"
        (directory / source.name).write_text(text.replace(INSTALLED, POLICYD), encoding="utf-8")
    yield directory


def test_units_pass_systemd_analyze_verify(installed_units: Path) -> None:
    """systemd-analyze verify accepts every unit, with no warning at all."""
    names = sorted(p.name for p in installed_units.iterdir())
    assert {"policyd.service", "policyd.socket", "policyd-milter.service"} <= set(names)
    result = analyze("verify", *(str(installed_units / n) for n in names))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == "", result.stdout + result.stderr


def test_verify_would_catch_a_broken_unit(installed_units: Path) -> None:
    """The verify check bites: a misspelt key is reported and a missing program fails."""
    service = installed_units / "policyd.service"
    text = service.read_text(encoding="utf-8")
    service.write_text(
        text.replace("ProtectHome=yes", "ProtectHom=yes").replace(POLICYD, "/nonexistent/policyd"),
        encoding="utf-8",
    )
    result = analyze("verify", str(service))
    assert result.returncode != 0
    assert "Unknown key 'ProtectHom'" in result.stderr
    assert "/nonexistent/policyd is not executable" in result.stderr


@pytest.mark.parametrize("name", ["policyd.service", "policyd-milter.service"])
def test_service_exposure_score(installed_units: Path, name: str) -> None:
    """systemd-analyze security rates each service at most MAX_EXPOSURE, with the required settings."""
    service = str(installed_units / name)
    threshold = str(round(MAX_EXPOSURE * 10))  # --threshold is on the 0..100 scale
    result = analyze("security", "--offline=yes", f"--threshold={threshold}", service)
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(rf"Overall exposure level for {re.escape(name)}: (\d+\.\d) (\w+)", result.stdout)
    assert found, result.stdout
    score, verdict = float(found.group(1)), found.group(2)
    assert score <= MAX_EXPOSURE and verdict in ("SAFE", "OK"), found.group(0)
    rated = {line.split()[1]: line.split()[0] for line in result.stdout.splitlines() if line.startswith(("✓", "✗"))}
    for setting in REQUIRED_HARDENING:
        assert rated.get(setting) == "✓", f"{setting} is not set: {result.stdout}"


def test_units_agree_on_the_socket() -> None:
    """The socket unit listens where Postfix's snippets point, named as the docs say, for policyd.service."""
    socket_unit = unit("policyd.socket")
    assert socket_unit["Socket"]["ListenStream"] == "127.0.0.1:10040"
    assert socket_unit["Socket"]["FileDescriptorName"] == "policy"
    assert socket_unit["Socket"]["Service"] == "policyd.service"
    assert socket_unit["Install"]["WantedBy"] == "sockets.target"
    service = unit("policyd.service")["Service"]
    assert service["User"] == "policyd" and service["ProtectSystem"] == "strict"
    documented = (UNITS / "policyd.socket").read_text(encoding="utf-8")
    assert 'policy: "systemd:domain=INET:name=policy"' in documented
    snippets = (UNITS.parent / "etc" / "postfix" / "main.cf.snippet").read_text(encoding="utf-8")
    assert "inet:127.0.0.1:10040" in snippets


def activated(listener: socket.socket, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``policyd serve`` started as systemd starts a socket-activated service."""
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="policy")
    env.pop("LISTEN_PID", None)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", ACTIVATE, str(listener.fileno()), POLICYD, "serve", "-c", str(config)],
            pass_fds=(listener.fileno(),),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def exchange(conn: socket.socket, attributes: dict[str, str]) -> str:
    """Send one request on an open connection and read its reply."""
    conn.sendall(encode(attributes))
    reply = b""
    while not reply.endswith(b"\n\n"):
        chunk = conn.recv(4096)
        assert chunk, f"connection closed after {reply!r}"
        reply += chunk
    return reply.decode()


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM and the exit status (killed and failed when it hangs)."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError("policyd did not exit after SIGTERM") from None


@pytest.mark.parametrize("endpoint", ["systemd:domain=INET:name=policy", "systemd:domain=INET:index=0"])
def test_socket_activation_serves_through_the_inherited_socket(tmp_path: Path, endpoint: str) -> None:
    """A client that connects before policyd starts is answered through the socket systemd passed, across a restart."""
    config = tmp_path / "policyd.yaml"
    config.write_text(
        f'listen:\n  policy: "{endpoint}"\nstore:\n  url: "memory://"\n'
        "local_domains: [example.org]\noutbound:\n  limit: 1\n",
        encoding="utf-8",
    )
    log = tmp_path / "policyd.log"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        # As under systemd: the first client connects before the service runs.
        with socket.create_connection(("127.0.0.1", port), timeout=20) as early:
            server = activated(listener, config, log)
            try:
                first = exchange(early, rcpt(sasl_username="ann", recipient="x@gmail.com"))
                second = exchange(early, rcpt(sasl_username="ann", recipient="y@gmail.com"))
            finally:
                status = stop(server)
        assert first == "action=DUNNO\n\n"
        assert second.startswith("action=REJECT 5.7.1 Account ann is blocked"), second
        assert status == 0, log.read_text()
        # systemd keeps the socket while the service restarts: nothing is refused.
        with socket.create_connection(("127.0.0.1", port), timeout=20) as waiting:
            server = activated(listener, config, log)
            try:
                again = exchange(waiting, rcpt(sasl_username="bea", recipient="x@gmail.com"))
            finally:
                status = stop(server)
        assert again == "action=DUNNO\n\n"
        assert status == 0, log.read_text()
    output = log.read_text(encoding="utf-8")
    assert output.count(f"serving policy requests on {endpoint}") == 2, output
    assert "Traceback" not in output


def test_systemd_endpoint_without_a_socket_fails_cleanly(tmp_path: Path) -> None:
    """listen.policy systemd:... started without socket activation exits non-zero with one error line."""
    config = tmp_path / "policyd.yaml"
    config.write_text(
        'listen:\n  policy: "systemd:domain=INET:name=policy"\nstore:\n  url: "memory://"\n',
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    result = subprocess.run(
        [POLICYD, "serve", "-c", str(config)], capture_output=True, text=True, timeout=30, env=env
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("policyd: error: ")
