"""The systemd units: ``systemd-analyze verify`` and ``security``, and socket activation.

The units name ``/opt/policyd/bin/policyd``; the tests copy them to a
temporary directory with that path pointed at this test install, so
``verify`` checks a unit that could really start.  Socket activation is
exercised the way systemd does it: a listening socket as file descriptor 3,
``LISTEN_FDS=1``, ``LISTEN_PID`` set to the server's own pid (by a wrapper
that then execs ``policyd serve``) and ``LISTEN_FDNAMES`` from the socket
unit's ``FileDescriptorName=``.  Readiness likewise: the test binds the
datagram socket systemd would, passes it in ``$NOTIFY_SOCKET``, and reads
what ``policyd serve`` and ``policyd milter`` send there, with the sender's
pid as the kernel reports it (``NotifyAccess=main`` only trusts that one).

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
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from policyd.testing import encode, rcpt
from tests.harness.servers import POLICYD, free_port

UNITS = Path(__file__).resolve().parents[2] / "systemd"
DOCS = UNITS.parent / "docs"

#: The two services and the command each runs.
SERVICES = {"policyd.service": "serve", "policyd-milter.service": "milter"}

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


def test_each_service_has_its_own_runtime_directory_and_header() -> None:
    """Stopping one service cannot remove the other's runtime directory, and each unit's header names its own daemon."""
    directories = {name: unit(name)["Service"]["RuntimeDirectory"] for name in SERVICES}
    assert directories == {"policyd.service": "policyd", "policyd-milter.service": "policyd-milter"}
    for name, command in SERVICES.items():
        text = (UNITS / name).read_text(encoding="utf-8")
        first = text.splitlines()[0]
        assert first.startswith("# policyd " + ("policy server" if command == "serve" else "content-scoring milter")), first
        assert f"/run/{directories[name]}/" in text, f"{name} does not say where its sockets go"


def test_services_are_type_notify_and_refuse_to_start_without_a_config() -> None:
    """Both services wait for READY=1, trust only their main process, and need the file their ExecStart names."""
    for name, command in SERVICES.items():
        section = unit(name)["Service"]
        assert section["Type"] == "notify" and section["NotifyAccess"] == "main", name
        assert section["WatchdogSec"] == "30s", name
        assert section["RestartPreventExitStatus"] == "2", name
        config = section["ExecStart"].split(" -c ", 1)[1].strip()
        assert section["ExecStart"] == f"{INSTALLED} {command} -c {config}", name
        assert unit(name)["Unit"]["AssertPathExists"] == config, name


def install_block() -> str:
    """The shell commands of docs/systemd.md's install section."""
    text = (DOCS / "systemd.md").read_text(encoding="utf-8")
    found = re.search(r"^## Install\b.*?```sh\n(.*?)```", text, re.DOTALL | re.MULTILINE)
    assert found, "docs/systemd.md has no ## Install section with a sh block"
    return found.group(1)


def test_documentation_links_exist_after_the_documented_install(tmp_path: Path) -> None:
    """Every Documentation= of every unit names a file the documented install steps put there."""
    steps = [line for line in install_block().splitlines() if "/usr/share/doc/policyd" in line]
    assert steps, "the install steps do not install the documentation"
    root = tmp_path / "root"
    for step in steps:
        command = step.split("#", 1)[0].replace("/usr/share/doc/policyd", f"{root}/usr/share/doc/policyd")
        subprocess.run(["sh", "-ec", command], cwd=UNITS.parent, check=True, timeout=30)
    links = []
    for source in sorted(UNITS.iterdir()):
        for line in source.read_text(encoding="utf-8").splitlines():
            if line.startswith("Documentation="):
                links.extend(line.split("=", 1)[1].split())
    assert links
    for link in links:
        assert link.startswith("file:///usr/share/doc/policyd/"), link
        assert (root / link[len("file:///") :]).is_file(), f"{link} is not installed by docs/systemd.md"


def test_install_steps_enable_the_services_only_after_the_config_is_checked() -> None:
    """The documented install edits and checks /etc/policyd/policyd.yaml before any systemctl enable or start."""
    lines = [line.split("#", 1)[0].strip() for line in install_block().splitlines()]
    lines = [line for line in lines if line]
    check = next(i for i, line in enumerate(lines) if line.startswith("/opt/policyd/bin/policyd config check"))
    starts = [i for i, line in enumerate(lines) if re.match(r"systemctl (enable|start|restart)", line)]
    assert starts and min(starts) > check, lines
    assert any("policyd.yaml" in line for line in lines[:check]), lines


class NotifySocket:
    """The datagram socket a service manager listens on, as ``$NOTIFY_SOCKET`` names it.

    :param address: a file system path, or ``@name`` for the abstract namespace.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        # As systemd does: the kernel then says which process sent each datagram.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def receive(self, timeout: float) -> tuple[str, int]:
        """The next notification and its sender's pid; fails after ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        except TimeoutError:
            raise AssertionError(f"no notification within {timeout}s") from None
        pids = [
            struct.unpack("3i", payload)[0]
            for level, kind, payload in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        ]
        assert pids, "no sender credentials"
        return data.decode(), pids[0]

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    """A notification socket at a path, or in the abstract namespace as systemd's own is."""
    address = str(tmp_path / "notify") if request.param == "path" else f"@policyd-test-{uuid.uuid4().hex}"
    listener = NotifySocket(address)
    yield listener
    listener.close()


def daemon_config(tmp_path: Path, command: str, port: int) -> Path:
    """A minimal configuration for ``command`` listening on ``port``."""
    key = "policy" if command == "serve" else "milter"
    config = tmp_path / f"{command}.yaml"
    config.write_text(
        f'listen:\n  {key}: "tcp:{port}:interface=127.0.0.1"\n'
        f'store:\n  url: "sqlite:///{tmp_path}/state.db"\nlocal_domains: [example.org]\n',
        encoding="utf-8",
    )
    return config


def start_notifying(command: str, config: Path, address: str, log: Path, **extra: str) -> subprocess.Popen[bytes]:
    """``policyd COMMAND -c CONFIG`` with ``NOTIFY_SOCKET`` set, as systemd starts a Type=notify service."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_", "LISTEN_"))}
    env.update(NOTIFY_SOCKET=address, **extra)
    with open(log, "ab") as out:
        return subprocess.Popen([POLICYD, command, "-c", str(config)], env=env, stdout=out, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("command", ["serve", "milter"])
def test_ready_once_listening_and_stopping_on_sigterm(
    tmp_path: Path, notify_socket: NotifySocket, command: str
) -> None:
    """READY=1 comes from the main process when the port already accepts; STOPPING=1 follows SIGTERM, then exit 0."""
    port = free_port()
    log = tmp_path / "daemon.log"
    server = start_notifying(command, daemon_config(tmp_path, command, port), notify_socket.address, log)
    try:
        message, sender = notify_socket.receive(timeout=20)
        # No retry: at the moment systemd hears READY=1, Postfix may connect.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        assert message == "READY=1", message
        assert sender == server.pid
        assert server.poll() is None
        server.send_signal(signal.SIGTERM)
        message, sender = notify_socket.receive(timeout=10)
        assert (message, sender) == ("STOPPING=1", server.pid)
        assert server.wait(15) == 0, log.read_text()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    output = log.read_text(encoding="utf-8")
    assert "Traceback" not in output and "cannot notify" not in output, output


@pytest.mark.parametrize("command", ["serve", "milter"])
def test_no_ready_when_the_port_is_taken(tmp_path: Path, command: str) -> None:
    """A daemon that cannot listen never says READY=1: systemd sees the start fail, with the one-line error."""
    listener = NotifySocket(str(tmp_path / "notify"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        log = tmp_path / "daemon.log"
        server = start_notifying(command, daemon_config(tmp_path, command, port), listener.address, log)
        try:
            status = server.wait(30)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    listener.sock.setblocking(False)
    try:
        sent = listener.sock.recv(4096).decode()
    except BlockingIOError:
        sent = ""
    listener.close()
    assert "READY=1" not in sent, sent
    assert status == 1, log.read_text()
    assert "policyd: error: listen." in log.read_text(encoding="utf-8")


def test_watchdog_is_fed_from_the_running_server(tmp_path: Path) -> None:
    """With WATCHDOG_USEC set, WATCHDOG=1 arrives about twice per period after READY=1; not for another WATCHDOG_PID."""
    config = daemon_config(tmp_path, "serve", free_port())
    log = tmp_path / "daemon.log"
    listener = NotifySocket(str(tmp_path / "notify"))
    server = start_notifying("serve", config, listener.address, log, WATCHDOG_USEC="400000")
    try:
        assert listener.receive(timeout=20) == ("READY=1", server.pid)
        started = time.monotonic()
        beats = [listener.receive(timeout=2) for _ in range(4)]
        elapsed = time.monotonic() - started
    finally:
        assert stop(server) == 0, log.read_text()
        listener.close()
    assert beats == [("WATCHDOG=1", server.pid)] * 4
    assert 0.6 <= elapsed <= 2.0, elapsed  # one every 0.2 s
    # systemd names another process as the watchdog's: this one sends nothing.
    listener = NotifySocket(str(tmp_path / "notify-other"))
    server = start_notifying(
        "serve", config, listener.address, log, WATCHDOG_USEC="100000", WATCHDOG_PID=str(os.getpid())
    )
    try:
        assert listener.receive(timeout=20) == ("READY=1", server.pid)
        listener.sock.settimeout(0.6)
        with pytest.raises(TimeoutError):
            listener.sock.recv(4096)
    finally:
        assert stop(server) == 0, log.read_text()
        listener.close()


def postconf(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``postconf -c DIRECTORY``; fails the test when Postfix is not installed."""
    found = shutil.which("postconf") or shutil.which("postconf", path="/usr/sbin:/sbin")
    if found is None:
        pytest.fail("postconf is not installed: run `make test-deps` (or: apt-get install postfix)", pytrace=False)
    return subprocess.run([found, "-c", str(directory), *args], capture_output=True, text=True, timeout=30)


def test_postfix_snippets_fit_debians_chrooted_master_cf(tmp_path: Path) -> None:
    """The snippets on Debian's master.cf: postconf warns of nothing, smtpd stays chrooted, policyd is reached over loopback TCP."""
    snippets = UNITS.parent / "etc" / "postfix"
    directory = tmp_path / "postfix"
    directory.mkdir()
    (directory / "main.cf").write_text((snippets / "main.cf.snippet").read_text(encoding="utf-8"), encoding="utf-8")
    master = Path("/usr/share/postfix/master.cf.dist").read_text(encoding="utf-8")
    (directory / "master.cf").write_text(
        master + "\n" + (snippets / "master.cf.snippet").read_text(encoding="utf-8"), encoding="utf-8"
    )
    settings = postconf(directory, "-n")
    assert settings.returncode == 0 and settings.stderr == "", settings.stderr
    for service in ("smtp/inet", "submission/inet", "submissions/inet"):
        line = postconf(directory, "-M", service).stdout.split()
        assert line[4] == "y", f"{service} is not chrooted: {line}"
    recipients = postconf(directory, "-P", "submission/inet/smtpd_recipient_restrictions").stdout
    assert recipients.rstrip().endswith("$policyd_submission"), recipients
    # A chrooted smtpd reaches TCP on loopback; a unix socket outside the spool it cannot.
    found = re.findall(r"\b(?:inet|unix):[^\s,}]+", settings.stdout)
    assert set(found) == {"inet:127.0.0.1:10040", "inet:127.0.0.1:10041"}, found
