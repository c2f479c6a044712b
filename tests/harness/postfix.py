"""A private, real Postfix for end-to-end tests, and an SMTP sink behind it.

:class:`PostfixInstance` runs Postfix's ``master`` in the foreground with
its own ``config_directory``, ``queue_directory`` and ``data_directory``
under a fresh temporary directory; the system Postfix (if any) is neither
used nor touched.  As root, ``postfix -c DIR`` and ``master -c DIR`` accept
any configuration directory, so no ``alternate_config_directories`` or
``multi_instance_directories`` entry in ``/etc/postfix`` is needed.
``postfix -c DIR check`` creates the queue directories with the ownership
Postfix wants; ``master -c DIR -d`` then runs in the foreground as our child
(its own session and process group), so stopping is ``SIGTERM`` to that pid
and, for anything left over, ``SIGKILL`` to the processes of its group.
Every service runs with ``chroot = n`` so it reaches loopback and the
files of the temporary directory.  Postfix logs to ``DIR/maillog`` through
``postlogd`` (``maillog_file``); :meth:`PostfixInstance.log_tail` puts the
end of it into assertion messages.  (``master``'s own start-up errors go
to syslog only, before ``postlogd`` runs; the harness then says which of
its ports another process holds, and retries on new ports if so.)

Two ``smtpd`` services listen on loopback ports chosen at start:

``inbound_port`` -- the port 25 role.  No AUTH is offered and
``mynetworks`` is not trusted anywhere, so a loopback client is treated
like any Internet client::

    smtpd_relay_restrictions = reject_unauth_destination
    smtpd_recipient_restrictions = check_policy_service { inet:127.0.0.1:PORT,
        timeout=10s, default_action=DUNNO, policy_context=inbound }

``submission_port`` -- the submission role, SASL AUTH (Cyrus: a private
``sasldb2`` filled by ``saslpasswd2``, and a private ``smtpd.conf`` in
``$config_directory/sasl``, where Debian's Postfix looks for it; the
``cyrus_sasl_config_path`` parameter points there too)::

    -o smtpd_sasl_auth_enable=yes
    -o smtpd_relay_restrictions=permit_sasl_authenticated,reject
    -o smtpd_recipient_restrictions=check_policy_service { inet:127.0.0.1:PORT,
        timeout=10s, default_action=DUNNO, policy_context=submission }

Why this order: Postfix evaluates ``smtpd_relay_restrictions`` before
``smtpd_recipient_restrictions``, and a ``permit`` ends only the list it is
in.  So the relay list lets authenticated users through (and refuses
everyone else), and the recipient list -- where the policy check is last
(here: alone) -- is then consulted for *every* recipient of an
authenticated user.  Putting ``check_policy_service`` after
``permit_sasl_authenticated`` in one list would never consult it for the
very users the quota is about.  ``smtpd_tls_auth_only = no`` and
``smtpd_tls_security_level = none`` only because the test has no
certificates; production submission uses ``encrypt``.

Delivery: ``mydestination`` is empty, the local domains are
``relay_domains``, and ``default_transport`` and ``relay_transport`` both
point at ``smtp:[127.0.0.1]:SINKPORT``, so every accepted message, local or
external, ends up in :class:`SmtpSink`, which records envelope sender,
recipients and the raw message.

Use the fixtures from a test module (or list ``tests.postfix`` in
``pytest_plugins`` of the root conftest and drop the import)::

    from tests.harness.postfix import postfix_factory, smtp_sink  # noqa: F401

    def test_x(postfix_factory, smtp_sink):  # noqa: F811
        mta = postfix_factory(policy_port=10040, users={"alice@example.org": "pw"},
                              milters="inet:127.0.0.1:10041")
        sent = mta.send(mta.submission_port, "alice@example.org", ["a@example.net"],
                        login=("alice@example.org", "pw"))
        assert sent.accepted == ["a@example.net"], mta.log_tail()
        smtp_sink.wait_for(lambda deliveries: len(deliveries) == 1)

The harness fails (never skips) when it cannot get Postfix running; when
the Debian packages are missing it installs them first, as ``make
test-deps`` does.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import pty
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest

from tests.harness.debian import apt_install
from tests.harness.smtp_sink import SmtpSink

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
POSTQUEUE = "/usr/sbin/postqueue"
SASLPASSWD2 = "/usr/sbin/saslpasswd2"
#: Debian packages the harness needs (``TEST_DEBS`` in the Makefile).
DEBIAN_PACKAGES = ("postfix", "sasl2-bin", "libsasl2-modules")

#: How long Postfix may take to answer 220 on both ports.
START_TIMEOUT = 30.0
#: How long ``master`` may take to exit after SIGTERM.
STOP_TIMEOUT = 15.0
#: Longest any single SMTP command of a test client may take.
SMTP_TIMEOUT = 60.0

_install_lock = threading.Lock()


class PostfixError(AssertionError):
    """Postfix could not be installed, configured, started or used."""


# --- installation ------------------------------------------------------------


def _sasl_plugins_present() -> bool:
    return bool(glob.glob("/usr/lib/*/sasl2/libplain.so*")) and bool(
        glob.glob("/usr/lib/*/sasl2/libsasldb.so*")
    )


def _missing() -> list[str]:
    missing = [p for p in (POSTFIX, POSTCONF, POSTQUEUE, SASLPASSWD2) if not os.access(p, os.X_OK)]
    if not _sasl_plugins_present():
        missing.append("Cyrus SASL plugins (PLAIN, sasldb)")
    return missing


def ensure_postfix() -> None:
    """Install Postfix and Cyrus SASL when missing (as root), else fail loudly.

    :raises PostfixError: when they are missing and cannot be installed.
    """
    with _install_lock:
        if not _missing():
            return
        if os.geteuid() != 0:
            raise PostfixError(
                f"missing {', '.join(_missing())}; install the Debian packages "
                f"{' '.join(DEBIAN_PACKAGES)} (make test-deps)"
            )
        subprocess.run(
            ["debconf-set-selections"],
            input="postfix postfix/main_mailer_type select No configuration\n",
            text=True,
            check=False,
            timeout=60,
        )
        apt_install(DEBIAN_PACKAGES, _missing, PostfixError)


@functools.cache
def daemon_directory() -> Path:
    """Where ``master`` and the other Postfix daemons live."""
    result = subprocess.run(
        [POSTCONF, "-d", "-h", "daemon_directory"], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        raise PostfixError(f"postconf -d daemon_directory failed: {result.stderr.strip()}")
    return Path(result.stdout.strip())


def run_with_tty_stderr(argv: list[str], input: str | None = None) -> tuple[str, str, int]:
    """Run a command with stderr on a pseudo-terminal; return stdout, stderr, status.

    Postfix commands write their ``fatal:`` messages to stderr only when it
    is a terminal (else to ``maillog_file`` through a ``postlogd`` that does
    not run before ``master`` has started it), so a pipe would show nothing.
    """
    parent, child = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while sum(map(len, chunks)) < 1 << 20:
            try:
                chunk = os.read(parent, 4096)
            except OSError:  # EIO: the child side is closed and drained
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, name="tty-stderr", daemon=True)
    reader.start()
    try:
        result = subprocess.run(
            argv, stdout=subprocess.PIPE, stderr=child, input=input, text=True, timeout=120
        )
    finally:
        os.close(child)
        reader.join(10)
        os.close(parent)
    stderr = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return result.stdout, stderr, result.returncode


# --- ports -------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports nobody listens on right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_taken(port: int) -> bool:
    """Whether some process holds 127.0.0.1:port."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def greets(port: int, timeout: float = 2.0) -> bool:
    """Whether an SMTP server on 127.0.0.1:port answers ``220``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            banner = b""
            while b"\n" not in banner and len(banner) < 1024:
                chunk = sock.recv(1024)
                if not chunk:
                    break
                banner += chunk
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
            return banner.startswith(b"220")
    except OSError:
        return False


# --- the SMTP sink -------------------------------------------------------------


# --- the Postfix instance ------------------------------------------------------


@dataclass
class Transaction:
    """What the SMTP server answered to one message a test client sent."""

    #: (code, text) of MAIL FROM; when not 250, nothing else was sent.
    mail_reply: tuple[int, str] = (0, "")
    accepted: list[str] = field(default_factory=list)
    #: recipient -> (code, text) of each refused RCPT.
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: (code, text) of DATA's final reply; None when no recipient was accepted.
    data_reply: tuple[int, str] | None = None
    #: Message-ID header of the message, to find it in the sink.
    message_id: str = ""


_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixInstance:
    """A private Postfix: two smtpd ports, SASL users, delivery to a sink.

    :param root: an empty directory the postfix user can traverse.
    :param sink_port: where every accepted message is delivered.
    :param policy_port: the policy server on 127.0.0.1 (None: no policy check).
    :param users: SASL login -> password, created in a private sasldb.  A
        login with ``@`` is stored in the realm of its domain.
    :param local_domains: our domains (``relay_domains``); mail to them
        is accepted on the inbound port.
    :param milters: ``smtpd_milters`` of both smtpd services (None: none).
    :param milter_default_action: Postfix's reply when a milter fails.
    :param end_of_data_policy: also consult the policy at END-OF-MESSAGE on
        submission (``smtpd_end_of_data_restrictions``, for give-back).
    :param main_cf: more ``main.cf`` parameters (override the defaults).
    :param policy_timeout: ``timeout`` of ``check_policy_service``.
    :param policy_default_action: Postfix's action when the policy server
        does not answer (``default_action``).
    """

    def __init__(
        self,
        root: Path,
        *,
        sink_port: int,
        policy_port: int | None = None,
        users: Mapping[str, str] | None = None,
        local_domains: Sequence[str] = ("example.org",),
        milters: str | None = None,
        milter_default_action: str = "accept",
        end_of_data_policy: bool = False,
        main_cf: Mapping[str, str] | None = None,
        policy_timeout: str = "10s",
        policy_default_action: str = "DUNNO",
    ) -> None:
        self.root = root
        self.sink_port = sink_port
        self.policy_port = policy_port
        self.users = dict(users or {})
        self.local_domains = list(local_domains)
        self.milters = milters
        self.milter_default_action = milter_default_action
        self.end_of_data_policy = end_of_data_policy
        self.extra_main_cf = dict(main_cf or {})
        self.policy_timeout = policy_timeout
        self.policy_default_action = policy_default_action
        self.config_dir = root / "etc"
        self.queue_dir = root / "queue"
        self.data_dir = root / "data"
        # Debian's Postfix looks for smtpd.conf in $config_directory/sasl
        # whatever cyrus_sasl_config_path says; both point there.
        self.sasl_dir = self.config_dir / "sasl"
        self.maillog = root / "maillog"
        self.inbound_port = 0
        self.submission_port = 0
        self.master: subprocess.Popen[bytes] | None = None
        #: Size of the log when this master started: older lines are not its.
        self._log_start = 0

    # --- configuration ---------------------------------------------------

    def policy_restriction(self, context: str) -> str:
        """The ``check_policy_service`` restriction for one ``policy_context``."""
        return (
            f"check_policy_service {{ inet:127.0.0.1:{self.policy_port}, "
            f"timeout={self.policy_timeout}, default_action={self.policy_default_action}, "
            f"policy_context={context} }}"
        )

    def main_cf(self) -> dict[str, str]:
        """Every ``main.cf`` parameter of this instance."""
        root = str(self.root)
        params = {
            "compatibility_level": "3.6",
            "config_directory": str(self.config_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": root,
            "myhostname": "mx.example.org",
            "mydomain": "example.org",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 no local delivery on this test instance",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            # Not used by any restriction below: a loopback test client on the
            # inbound port is an Internet client like any other.
            "mynetworks": "127.0.0.1/32",
            "relay_domains": ", ".join(self.local_domains),
            "relay_recipient_maps": "",
            "default_transport": f"smtp:[127.0.0.1]:{self.sink_port}",
            "relay_transport": f"smtp:[127.0.0.1]:{self.sink_port}",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "smtp_connect_timeout": "5s",
            "smtpd_banner": "$myhostname ESMTP policyd test instance",
            "biff": "no",
            "append_dot_mydomain": "no",
            "readme_directory": "no",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "in_flow_delay": "0s",
            "smtpd_recipient_limit": "1000",
            "smtpd_error_sleep_time": "0s",
            "smtpd_sasl_auth_enable": "no",
            "smtpd_sasl_type": "cyrus",
            "smtpd_sasl_path": "smtpd",
            "cyrus_sasl_config_path": str(self.sasl_dir),
            "smtpd_sasl_security_options": "noanonymous",
            "broken_sasl_auth_clients": "yes",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions": "$policyd_inbound_restrictions",
            "policyd_inbound_restrictions": "",
            "policyd_submission_restrictions": "",
            "policyd_submission_end_of_data": "",
        }
        if self.policy_port is not None:
            params["policyd_inbound_restrictions"] = self.policy_restriction("inbound")
            params["policyd_submission_restrictions"] = self.policy_restriction("submission")
            if self.end_of_data_policy:
                params["policyd_submission_end_of_data"] = self.policy_restriction("submission")
        if self.milters:
            params["smtpd_milters"] = self.milters
            params["milter_default_action"] = self.milter_default_action
        params.update(self.extra_main_cf)
        return params

    def master_cf(self) -> str:
        """``master.cf``: the two smtpd services, then Postfix's own, none chrooted."""
        return (
            f"127.0.0.1:{self.inbound_port} inet n - n - - smtpd\n"
            "  -o syslog_name=postfix/inbound\n"
            f"127.0.0.1:{self.submission_port} inet n - n - - smtpd\n"
            "  -o syslog_name=postfix/submission\n"
            "  -o smtpd_sasl_auth_enable=yes\n"
            "  -o smtpd_tls_auth_only=no\n"
            "  -o smtpd_client_restrictions=\n"
            "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject\n"
            "  -o smtpd_recipient_restrictions=$policyd_submission_restrictions\n"
            "  -o smtpd_end_of_data_restrictions=$policyd_submission_end_of_data\n"
            "  -o milter_macro_daemon_name=ORIGINATING\n" + _SERVICES
        )

    def _write_config(self) -> None:
        for directory in (self.config_dir, self.queue_dir, self.data_dir, self.sasl_dir):
            directory.mkdir(parents=True, exist_ok=True)
        lines = [f"{name} = {value}".rstrip() for name, value in self.main_cf().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n", encoding="utf-8")
        (self.config_dir / "master.cf").write_text(self.master_cf(), encoding="utf-8")
        sasldb = self.sasl_dir / "sasldb2"
        (self.sasl_dir / "smtpd.conf").write_text(
            "pwcheck_method: auxprop\n"
            "auxprop_plugin: sasldb\n"
            "mech_list: PLAIN LOGIN\n"
            f"sasldb_path: {sasldb}\n",
            encoding="utf-8",
        )
        for login, password in self.users.items():
            self.add_user(login, password)
        shutil.chown(self.data_dir, user="postfix")
        self.maillog.touch()

    def add_user(self, login: str, password: str) -> None:
        """Create (or change) a SASL user; works while Postfix runs."""
        user, at, realm = login.rpartition("@")
        if not at:
            user, realm = login, "mx.example.org"
        sasldb = self.sasl_dir / "sasldb2"
        self._run([SASLPASSWD2, "-f", str(sasldb), "-p", "-c", "-u", realm, user], input=password)
        shutil.chown(sasldb, user="root", group="postfix")
        sasldb.chmod(0o640)
        self.users[login] = password

    def _run(self, argv: list[str], input: str | None = None) -> str:
        """Run a Postfix command; fail with its messages and the log's end."""
        stdout, stderr, code = run_with_tty_stderr(argv, input)
        if code != 0:
            raise PostfixError(
                f"{' '.join(argv)} failed ({code}): {stderr.strip()}\n{self.log_tail()}"
            )
        return stdout

    def postconf(self, *names: str) -> str:
        """``postconf -c DIR NAMES``: the parameters as Postfix reads them."""
        return self._run([POSTCONF, "-c", str(self.config_dir), *names])

    # --- running ---------------------------------------------------------

    def start(self, attempts: int = 3) -> PostfixInstance:
        """Configure, start, and wait until both smtpd ports answer 220.

        Ports are chosen here; if another process takes one between the
        choice and ``master``'s bind, the start is retried on new ports.

        :raises PostfixError: when Postfix does not come up.
        """
        ensure_postfix()
        self.root.chmod(0o755)
        for attempt in range(attempts):
            self.inbound_port, self.submission_port = free_ports(2)
            self._write_config()
            self._run([POSTFIX, "-c", str(self.config_dir), "check"])
            try:
                self._start_master()
                return self
            except PostfixError as error:
                self.stop()
                if attempt + 1 == attempts or "ports taken" not in str(error):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _start_master(self) -> None:
        master = daemon_directory() / "master"
        self._log_start = self.maillog.stat().st_size
        with open(self.root / "master.out", "ab") as out:
            self.master = subprocess.Popen(
                [str(master), "-c", str(self.config_dir), "-d"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        waiting = [self.inbound_port, self.submission_port]
        while waiting and time.monotonic() < deadline:
            if self.master.poll() is not None:
                # master's own start-up errors go to syslog only (/dev/log):
                # say what can be checked from here.
                taken = [p for p in (self.inbound_port, self.submission_port) if port_taken(p)]
                raise PostfixError(
                    f"Postfix master exited with {self.master.returncode}"
                    + (f"; ports taken by another process: {taken}" if taken else "")
                    + f" (master's own errors go to syslog; try {master} -c {self.config_dir} -d"
                    f" under strace)\n{self.log_tail()}"
                )
            fatal = self.fatal_errors()
            if fatal:
                raise PostfixError(f"Postfix failed to start: {fatal[0]}\n{self.log_tail()}")
            waiting = [port for port in waiting if not greets(port)]
            if waiting:
                time.sleep(0.1)
        if waiting:
            raise PostfixError(
                f"Postfix did not answer 220 on {waiting} in {START_TIMEOUT}s\n{self.log_tail()}"
            )

    def _group(self) -> list[int]:
        """Live processes of master's process group (master and its daemons)."""
        if self.master is None:
            return []
        found = []
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                text = Path(stat).read_text()
            except OSError:
                continue
            # After "(comm)": state, ppid, pgrp, ...
            fields = text[text.rfind(")") + 2 :].split()
            if len(fields) < 3 or fields[2] != str(self.master.pid) or fields[0] == "Z":
                continue
            try:
                exe = os.readlink(Path(stat).parent / "exe")
            except OSError:
                continue
            # Only Postfix's own programs: never a stranger that reused the id.
            if exe.startswith(str(daemon_directory())):
                found.append(int(Path(stat).parent.name))
        return found

    def stop(self) -> None:
        """SIGTERM master, wait, then SIGKILL whatever of its group is left."""
        master = self.master
        if master is None:
            return
        if master.poll() is None:
            master.send_signal(signal.SIGTERM)
            try:
                master.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait(STOP_TIMEOUT)
        deadline = time.monotonic() + 5
        while (left := self._group()) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        self.master = None

    @property
    def running(self) -> bool:
        """Whether master is alive."""
        return self.master is not None and self.master.poll() is None

    # --- observing -------------------------------------------------------

    def log_tail(self, lines: int = 80) -> str:
        """The end of Postfix's log, for assertion messages."""
        try:
            text = self.maillog.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        try:
            out = (self.root / "master.out").read_text(encoding="utf-8", errors="replace")
        except OSError:
            out = ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- postfix maillog ({self.maillog}) ---\n{tail}\n--- master output ---\n{out[-2000:]}"

    def fatal_errors(self) -> list[str]:
        """Log lines, since the last start, saying a Postfix program could not run."""
        try:
            with open(self.maillog, "rb") as log:
                log.seek(self._log_start)
                text = log.read().decode("utf-8", "replace")
        except OSError:
            return []
        return [
            line
            for line in text.splitlines()
            if " fatal: " in line or "bad command startup" in line
        ]

    def queue(self) -> str:
        """``postqueue -p`` of this instance."""
        return self._run([POSTQUEUE, "-c", str(self.config_dir), "-p"])

    def flush(self) -> None:
        """``postqueue -f``: retry deferred mail now."""
        self._run([POSTQUEUE, "-c", str(self.config_dir), "-f"])

    def wait_queue_empty(self, timeout: float = 60.0) -> None:
        """Wait until every accepted message has left the queue.

        :raises PostfixError: when mail is still queued after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Mail queue is empty" in self.queue():
                return
            time.sleep(0.2)
        raise PostfixError(
            f"mail still queued after {timeout}s:\n{self.queue()}\n{self.log_tail()}"
        )

    # --- sending ---------------------------------------------------------

    def connect(self, port: int, login: tuple[str, str] | None = None) -> smtplib.SMTP:
        """An SMTP client session on ``port`` (EHLO done, AUTH if ``login``)."""
        client = smtplib.SMTP(
            "127.0.0.1", port, local_hostname="client.example.net", timeout=SMTP_TIMEOUT
        )
        try:
            client.ehlo()
            if login is not None:
                client.login(*login)
        except BaseException:
            client.close()
            raise
        return client

    def send(
        self,
        port: int,
        sender: str,
        recipients: Iterable[str],
        *,
        login: tuple[str, str] | None = None,
        subject: str = "policyd end-to-end test",
        body: str = "Hello.\n",
    ) -> Transaction:
        """Send one message, RCPT by RCPT, and report each answer.

        DATA is sent when at least one recipient was accepted; refused
        recipients are reported, not raised.
        """
        with self.connect(port, login) as client:
            return self.transaction(client, sender, recipients, subject=subject, body=body)

    def transaction(
        self,
        client: smtplib.SMTP,
        sender: str,
        recipients: Iterable[str],
        *,
        subject: str = "policyd end-to-end test",
        body: str = "Hello.\n",
    ) -> Transaction:
        """One MAIL/RCPT.../DATA transaction on an open session."""
        message = EmailMessage()
        message["From"] = sender
        message["To"] = "undisclosed-recipients:;"
        message["Subject"] = subject
        message["Message-ID"] = make_msgid(domain="client.example.net")
        message.set_content(body)
        result = Transaction(message_id=str(message["Message-ID"]))
        code, text = client.mail(sender)
        result.mail_reply = (code, text.decode("utf-8", "replace"))
        if code != 250:
            client.rset()
            return result
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            if code == 250:
                result.accepted.append(recipient)
            else:
                result.refused[recipient] = (code, text.decode("utf-8", "replace"))
        if result.accepted:
            code, text = client.data(message.as_bytes())
            result.data_reply = (code, text.decode("utf-8", "replace"))
        else:
            client.rset()
        return result


# --- fixtures ------------------------------------------------------------------


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A recording SMTP sink on a loopback port."""
    sink = SmtpSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def postfix_factory(smtp_sink: SmtpSink) -> Iterator[Callable[..., PostfixInstance]]:
    """Start private Postfix instances delivering to ``smtp_sink``; all stopped at teardown.

    Call it with :class:`PostfixInstance`'s keyword arguments (``sink_port``
    defaults to the sink's).
    """
    started: list[PostfixInstance] = []
    roots: list[Path] = []

    def start(**options: Any) -> PostfixInstance:
        # pytest's tmp_path is 0700 under /tmp/pytest-of-root: the postfix
        # user could not reach its queue there.
        root = Path(tempfile.mkdtemp(prefix="policyd-postfix-"))
        roots.append(root)
        options.setdefault("sink_port", smtp_sink.port)
        instance = PostfixInstance(root, **options)
        started.append(instance)
        return instance.start()

    try:
        yield start
    finally:
        for instance in started:
            instance.stop()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
