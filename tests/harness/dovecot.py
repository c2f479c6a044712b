"""A private, real Dovecot IMAP server with policyd's IMAPSieve recipe (``etc/dovecot/``).

:class:`DovecotInstance` writes a ``dovecot.conf`` of its own under a fresh
temporary directory and runs ``dovecot -F -c CONF`` (foreground, our child,
its own session).  Nothing of the system's Dovecot is used or touched:

- ``base_dir`` (its sockets and pid file), ``state_dir``, the log file, the
  users' homes and Maildirs are all under the temporary directory, and
  ``instance_name`` is its own, so ``doveadm``/``doveconf`` never mix the two;
- IMAP listens on 127.0.0.1 only, on a port nobody held when it was chosen
  (the system's Dovecot, which the Debian package enables, listens on 143
  and 993 with ``base_dir = /run/dovecot``); ``imaps`` is off;
- the passdb is a ``passwd-file`` of its own (``{PLAIN}`` passwords; ``ssl =
  no`` and ``disable_plaintext_auth = no`` because it is loopback only), the
  userdb is ``static``: every user's mail processes run as ``nobody``
  (Dovecot refuses uid 0 for mail), their Maildirs under the instance's
  ``home``.

When the harness installs the Debian packages itself it stops and disables
the system service they bring; ``make test-deps`` installs them as Debian
does, and that Dovecot may run beside the tests, unused.

The recipe: ``etc/dovecot/90-policyd-imapsieve.conf`` is included as
shipped except for three things: ``/etc/dovecot/sieve`` becomes the
instance's own ``sieve`` directory, the socket's ``user = vmail`` the mail
user ``nobody``, and the service's ``user = policyd`` the user running the
tests (root: this venv's interpreter may live where no other user can run
it, such as root's pyenv).  The two Sieve scripts are copied unchanged and
compiled with ``sievec``; ``policyd-learn`` is copied with its two settings
(``POLICYD``, ``CONFIG``) set to this venv's ``policyd`` and the test's
configuration.

A Dovecot that does not greet on its port within :data:`START_TIMEOUT`
fails the test (never skips), with the end of its log.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.debian import apt_install, stop_services
from tests.harness.postfix import free_ports
from tests.harness.servers import POLICYD

DOVECOT = "/usr/sbin/dovecot"
SIEVEC = "/usr/bin/sievec"
#: Debian packages the harness needs (``TEST_DEBS`` in the Makefile).
DEBIAN_PACKAGES = ("dovecot-imapd", "dovecot-sieve")
#: The recipe shipped in the repository.
RECIPE = Path(__file__).resolve().parents[2] / "etc" / "dovecot"
#: The directory the shipped recipe names for its scripts.
SHIPPED_SIEVE_DIR = "/etc/dovecot/sieve"
#: The user every mail process of the instance runs as (the shipped snippet's ``vmail``).
MAIL_USER = "nobody"
#: How long Dovecot may take to greet on its IMAP port.
START_TIMEOUT = 30.0
#: How long Dovecot may take to exit after SIGTERM.
STOP_TIMEOUT = 15.0
#: Longest IMAP command of a test client (a pipe to ``policyd learn`` runs inside MOVE).
IMAP_TIMEOUT = 120.0

_install_lock = threading.Lock()


class DovecotError(AssertionError):
    """Dovecot could not be installed, configured or started."""


def _missing() -> list[str]:
    needed = [DOVECOT, SIEVEC, "/usr/lib/dovecot/imap", "/usr/lib/dovecot/modules/lib95_imap_sieve_plugin.so",
              "/usr/lib/dovecot/modules/sieve/lib90_sieve_extprograms_plugin.so"]
    return [path for path in needed if not os.path.exists(path)]


def ensure_dovecot() -> None:
    """Install Dovecot IMAP and Sieve when missing (as root), stopping the system service they bring.

    :raises DovecotError: when they are missing and cannot be installed.
    """
    with _install_lock:
        if not _missing():
            return
        if os.geteuid() != 0:
            raise DovecotError(
                f"missing {', '.join(_missing())}; install {' '.join(DEBIAN_PACKAGES)} (make test-deps)"
            )
        apt_install(DEBIAN_PACKAGES, _missing, DovecotError)
        stop_services("dovecot.socket", "dovecot.service")


def learn_script(policyd: str, config: Path) -> str:
    """The shipped ``policyd-learn`` with its two settings replaced.

    :raises DovecotError: when the shipped script no longer has them.
    """
    text = (RECIPE / "policyd-learn").read_text(encoding="utf-8")
    for name, value in (("POLICYD", policyd), ("CONFIG", str(config))):
        text, count = re.subn(rf"^{name}=.*$", f"{name}={value}", text, count=1, flags=re.MULTILINE)
        if count != 1:
            raise DovecotError(f"etc/dovecot/policyd-learn has no {name}= line")
    return text


def recipe_conf(sieve_dir: Path, mail_user: str, learn_user: str) -> str:
    """The shipped configuration snippet with the instance's sieve directory and users.

    :raises DovecotError: when the snippet no longer has what is replaced.
    """
    text = (RECIPE / "90-policyd-imapsieve.conf").read_text(encoding="utf-8")
    for shipped, used in ((SHIPPED_SIEVE_DIR, str(sieve_dir)), ("user = vmail", f"user = {mail_user}"),
                          ("user = policyd", f"user = {learn_user}")):
        if shipped not in text:
            raise DovecotError(f"etc/dovecot/90-policyd-imapsieve.conf has no {shipped!r}")
        text = text.replace(shipped, used)
    return text


class DovecotInstance:
    """A private Dovecot: IMAP on a loopback port, passwd-file users, Maildirs, the IMAPSieve recipe.

    :param root: an empty directory of its own.
    :param users: login -> password.
    :param policyd_config: the configuration ``policyd-learn`` passes to ``policyd learn -c``.
    """

    def __init__(self, root: Path, users: dict[str, str], policyd_config: Path) -> None:
        self.root = root
        self.users = dict(users)
        self.policyd_config = policyd_config
        self.conf = root / "dovecot.conf"
        self.base_dir = root / "run"
        self.state_dir = root / "state"
        self.homes = root / "home"
        self.sieve_dir = root / "sieve"
        self.log = root / "dovecot.log"
        self.port = 0
        self.instance_name = f"policyd-test-{root.name}"
        self.process: subprocess.Popen[bytes] | None = None

    # --- configuration ---------------------------------------------------

    def dovecot_conf(self) -> str:
        """The whole ``dovecot.conf`` (the recipe is included from the sieve directory)."""
        return f"""\
instance_name = {self.instance_name}
base_dir = {self.base_dir}
state_dir = {self.state_dir}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
log_path = {self.log}
info_log_path = {self.log}
mail_location = maildir:~/Maildir
default_internal_user = dovecot
default_login_user = dovenull

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {self.root}/passwd
}}
userdb {{
  driver = static
  args = uid={MAIL_USER} gid={self._mail_group()} home={self.homes}/%n
}}

service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}

namespace inbox {{
  inbox = yes
  separator = /
  mailbox Junk {{
    special_use = \\Junk
    auto = subscribe
  }}
  mailbox Trash {{
    special_use = \\Trash
    auto = subscribe
  }}
}}

!include {self.sieve_dir}/90-policyd-imapsieve.conf
"""

    @staticmethod
    def _mail_group() -> int:
        return pwd.getpwnam(MAIL_USER).pw_gid

    def _write_config(self) -> None:
        owner = pwd.getpwnam(MAIL_USER)
        for directory in (self.base_dir, self.state_dir, self.homes, self.sieve_dir):
            directory.mkdir(parents=True, exist_ok=True)
        os.chown(self.homes, owner.pw_uid, owner.pw_gid)
        self.conf.write_text(self.dovecot_conf(), encoding="utf-8")
        (self.root / "passwd").write_text(
            "".join(f"{login}:{{PLAIN}}{password}::::::\n" for login, password in self.users.items()),
            encoding="utf-8",
        )
        (self.sieve_dir / "90-policyd-imapsieve.conf").write_text(
            recipe_conf(self.sieve_dir, MAIL_USER, pwd.getpwuid(os.geteuid()).pw_name), encoding="utf-8"
        )
        for name in ("report-spam.sieve", "report-ham.sieve"):
            shutil.copyfile(RECIPE / name, self.sieve_dir / name)
            self._sievec(self.sieve_dir / name)
        script = self.sieve_dir / "policyd-learn"
        script.write_text(learn_script(POLICYD, self.policyd_config), encoding="utf-8")
        script.chmod(0o755)

    def _sievec(self, script: Path) -> None:
        """Compile a Sieve script as the recipe says (errors fail the test with sievec's words)."""
        done = subprocess.run([SIEVEC, "-c", str(self.conf), str(script)], capture_output=True, text=True,
                              timeout=60)
        if done.returncode != 0:
            raise DovecotError(f"sievec {script.name} failed: {(done.stdout + done.stderr).strip()}")

    # --- running ---------------------------------------------------------

    def start(self, attempts: int = 3) -> DovecotInstance:
        """Configure, start, and wait until IMAP greets on the chosen port.

        :raises DovecotError: when Dovecot does not come up.
        """
        ensure_dovecot()
        self.root.chmod(0o755)  # the login and mail processes (dovenull, nobody) pass through it
        for attempt in range(attempts):
            (self.port,) = free_ports(1)
            self._write_config()
            try:
                self._start_master()
                return self
            except DovecotError as error:
                self.stop()
                # Another process took the port between the choice and the bind: new ports.
                if attempt + 1 == attempts or "Address already in use" not in str(error):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _start_master(self) -> None:
        with open(self.root / "dovecot.out", "ab") as out:
            self.process = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(self.conf)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DovecotError(f"dovecot exited with {self.process.returncode}\n{self.log_tail()}")
            if self._greets():
                return
            time.sleep(0.1)
        raise DovecotError(f"dovecot did not greet on port {self.port} in {START_TIMEOUT}s\n{self.log_tail()}")

    def _greets(self) -> bool:
        try:
            with imaplib.IMAP4("127.0.0.1", self.port, timeout=2.0) as client:
                return client.welcome.startswith(b"* OK")
        except (OSError, imaplib.IMAP4.error):
            return False

    def stop(self) -> None:
        """SIGTERM the master, wait, then SIGKILL whatever of its session is left."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        # Its children are in the session (and process group) it was started in.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    # --- using -----------------------------------------------------------

    def login(self, user: str) -> imaplib.IMAP4:
        """An IMAP session logged in as ``user``."""
        client = imaplib.IMAP4("127.0.0.1", self.port, timeout=IMAP_TIMEOUT)
        try:
            client.login(user, self.users[user])
        except BaseException:
            client.logout()
            raise
        return client

    def doveconf(self, *names: str) -> str:
        """``doveconf -c CONF -h NAMES``: the settings as this instance reads them."""
        done = subprocess.run(["doveconf", "-c", str(self.conf), "-h", *names], capture_output=True,
                              text=True, timeout=60)
        if done.returncode != 0:
            raise DovecotError(f"doveconf failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def log_tail(self, lines: int = 60) -> str:
        """The end of Dovecot's log (and of what it printed), for assertion messages."""
        parts = []
        for path in (self.log, self.root / "dovecot.out"):
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = ""
            parts.append(f"--- {path} ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)


@pytest.fixture
def dovecot_factory() -> Iterator[Callable[..., DovecotInstance]]:
    """Start private Dovecot instances (:class:`DovecotInstance`'s arguments but ``root``); stopped at teardown."""
    started: list[DovecotInstance] = []

    def start(**options: Any) -> DovecotInstance:
        root = Path(tempfile.mkdtemp(prefix="policyd-dovecot-"))
        instance = DovecotInstance(root, **options)
        started.append(instance)
        return instance.start()

    try:
        yield start
    finally:
        for instance in started:
            instance.stop()
            shutil.rmtree(instance.root, ignore_errors=True)
