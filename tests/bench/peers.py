"""The peers ``make bench`` measures policyd against, installed and run at bench time.

- **policyd-rate-limit 1.2.0** (PyPI), in its own venv under
  ``~/.cache/policyd-bench/prl`` (``$XDG_CACHE_HOME`` honoured; never in the
  repository), with its SQLite backend and the same quota as policyd: 5000
  recipients per rolling hour per ``sasl_username``.  It counts at RCPT with
  ``count_mode: 0`` (its historical mode, the one that matches a
  ``check_policy_service`` in ``smtpd_recipient_restrictions``; it logs a
  deprecation warning once a minute for it).  It is a single-threaded
  ``select()`` loop that commits one SQLite transaction per request, and it
  reads one request per ``recv()``: it cannot answer pipelined requests (it
  answers the first of a batch only), so it is measured the way Postfix
  talks to it, one request outstanding per connection.
- **postfwd 1.35** (Debian package ``postfwd``, installed with apt-get when
  missing): ``postfwd1``, the single-process ``Net::Server::Multiplex``
  version (the package also ships the pre-forking ``postfwd2``), with one
  rule: at RCPT, for an authenticated sender and a recipient outside
  ``example.org``, ``rate(sasl_username/5000/3600/REJECT ...)``.  Its rate
  counters live in memory (a fixed window renewed an hour after its first
  hit), so it does less than policyd or policyd-rate-limit: no store, no
  rolling window.  Its request cache is turned off (``--cache=0``): the bench
  repeats the same 1,000 requests, which real traffic (a new recipient on
  every RCPT) does not, and the rate counter runs before the cache anyway.

Both run as ``nobody`` (they drop privileges themselves when started as
root, as in production), on a loopback port chosen at run time, pinned to a
given CPU, and are stopped (SIGTERM, then SIGKILL) by their process id.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.harness.servers import wait_for_port

PRL_VERSION = "1.2.0"
POSTFWD_PACKAGE = "postfwd"
POSTFWD1 = "/usr/sbin/postfwd1"
#: The quota every target enforces: recipients per hour per sasl_username.
LIMIT = 5000
WINDOW = 3600


class PeerUnavailable(RuntimeError):
    """A peer could not be installed or started; the bench reports why and goes on."""


def cache_dir() -> Path:
    """Where bench-time installs live (outside the repository)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "policyd-bench"


def _pinned(cpu: int) -> Callable[[], None]:
    """A ``preexec_fn`` that pins the child to one CPU."""
    return lambda: os.sched_setaffinity(0, {cpu})


def _stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM ``pid``, wait until it is gone, SIGKILL it if it hangs."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    """The command line of a running process (empty when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _private_dir(path: Path) -> Path:
    """A fresh directory the ``nobody`` user can enter (the peers drop to it)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    return path


# --- policyd-rate-limit -------------------------------------------------------


def install_policyd_rate_limit() -> Path:
    """The ``policyd-rate-limit`` script of a venv holding version 1.2.0 (installed when missing).

    :raises PeerUnavailable: when the venv or the package cannot be installed.
    """
    venv = cache_dir() / "prl"
    script = venv / "bin" / "policyd-rate-limit"
    marker = venv / f".installed-{PRL_VERSION}"
    if script.exists() and marker.exists():
        return script
    try:
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                           capture_output=True, timeout=300)
        # Only an sdist exists; built as root its setup.py asks for /etc files,
        # which a wheel build keeps inside the venv.
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                        f"policyd-rate-limit=={PRL_VERSION}"],
                       check=True, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or ""
        raise PeerUnavailable(f"cannot install policyd-rate-limit {PRL_VERSION} into {venv}: "
                              f"{error} {detail[-500:]}") from error
    marker.touch()
    return script


def policyd_rate_limit_config(directory: Path, port: int) -> Path:
    """Its YAML: SQLite backend, 5000/hour per sasl_username counted at RCPT, loopback TCP."""
    path = directory / "policyd-rate-limit.yaml"
    path.write_text(
        "debug: false\n"
        "user: nobody\n"
        "group: nogroup\n"
        f'pidfile: "{directory}/run/policyd-rate-limit.pid"\n'
        "backend: 0\n"
        f'sqlite_config:\n  database: "{directory}/db/db.sqlite3"\n'
        f'SOCKET: ["127.0.0.1", {port}]\n'
        f"limits:\n  - [{LIMIT}, {WINDOW}]\n"
        "limits_by_id: {}\n"
        # Read unconditionally at start-up although not in its built-in defaults.
        'sql_limits_by_id: ""\n'
        "limit_by_sasl: true\n"
        "limit_by_sender: false\n"
        "limit_by_ip: false\n"
        "limited_networks: []\n"
        'success_action: "dunno"\n'
        'fail_action: "REJECT 5.7.1 rate limit reached"\n'
        'db_error_action: "dunno"\n'
        "report: false\n"
        "delay_to_close: 600\n"
        "count_mode: 0\n",
        encoding="utf-8",
    )
    return path


@contextlib.contextmanager
def policyd_rate_limit(directory: Path, port: int, cpu: int = 0) -> Iterator[int]:
    """Run policyd-rate-limit on 127.0.0.1:``port`` pinned to ``cpu``; yields its pid."""
    script = install_policyd_rate_limit()
    directory = _private_dir(directory)
    config = policyd_rate_limit_config(directory, port)
    with open(directory / "policyd-rate-limit.log", "ab") as log:
        child = subprocess.Popen([str(script), "-f", str(config)], stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 preexec_fn=_pinned(cpu))
    try:
        try:
            wait_for_port(port, 20, child)
        except AssertionError as error:
            log_text = (directory / "policyd-rate-limit.log").read_text(errors="replace")
            raise PeerUnavailable(f"policyd-rate-limit did not start: {error}: "
                                  f"{log_text[-500:]}") from error
        yield child.pid
    finally:
        _stop_pid(child.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(5)


# --- postfwd ------------------------------------------------------------------


def install_postfwd() -> str:
    """``/usr/sbin/postfwd1``, installing the Debian package ``postfwd`` when missing.

    :raises PeerUnavailable: when it is missing and cannot be installed.
    """
    if os.access(POSTFWD1, os.X_OK):
        return POSTFWD1
    if os.geteuid() != 0:
        raise PeerUnavailable(f"{POSTFWD1} missing: apt-get install {POSTFWD_PACKAGE}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", POSTFWD_PACKAGE]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if not os.access(POSTFWD1, os.X_OK):
        raise PeerUnavailable(f"cannot install {POSTFWD_PACKAGE}: {result.stderr.strip()[-500:]}")
    return POSTFWD1


def postfwd_rules(directory: Path) -> Path:
    """One rule: the same quota as policyd, counted per RCPT to an external recipient."""
    path = directory / "postfwd.cf"
    path.write_text(
        "id=QUOTA; protocol_state==RCPT; sasl_username=~.+; "
        r"recipient_domain!~(.*\.)?example\.org; "
        f"action=rate(sasl_username/{LIMIT}/{WINDOW}/REJECT 5.7.1 $$sasl_username is blocked: "
        f"more than {LIMIT} recipients per hour)\n",
        encoding="utf-8",
    )
    return path


@contextlib.contextmanager
def postfwd(directory: Path, port: int, cpu: int = 0) -> Iterator[int]:
    """Run ``postfwd1`` on 127.0.0.1:``port`` pinned to ``cpu``; yields its pid.

    ``postfwd1 -d`` always detaches (Net::Server ``setsid``), so it is
    found and stopped through its pidfile.
    """
    binary = install_postfwd()
    directory = _private_dir(directory)
    rules = postfwd_rules(directory)
    pidfile = directory / "postfwd.pid"
    command = [binary, "--daemon", "--file", str(rules), "--interface", "127.0.0.1",
               "--port", str(port), "--user", "nobody", "--group", "nogroup",
               "--pidfile", str(pidfile), "--cache=0", "--perfmon", "--norulelog"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL, preexec_fn=_pinned(cpu))
    pid = 0
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not pid:
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().strip())
            if not pid:
                time.sleep(0.05)
        if pid and "postfwd" not in _cmdline(pid):
            pid = 0
        if not pid:
            raise PeerUnavailable(f"postfwd1 wrote no pidfile (exit {result.returncode}): "
                                  f"{(result.stdout + result.stderr).strip()[-500:]}")
        try:
            wait_for_port(port, 20)
        except AssertionError as error:
            raise PeerUnavailable(f"postfwd1 does not listen: {error}") from error
        yield pid
    finally:
        if pid:
            _stop_pid(pid)
