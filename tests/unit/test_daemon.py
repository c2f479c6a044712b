"""The service manager's notification socket as ``run_daemon`` reads it from the environment."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from policyd.daemon import ServiceManager

log = logging.getLogger("policyd.test")


def test_environment_is_read_once_and_removed() -> None:
    """NOTIFY_SOCKET and the watchdog variables are taken out, so no child process speaks for the daemon."""
    environ = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    manager = ServiceManager.from_environment(environ, log)
    assert (manager.address, manager.watchdog) == ("@x", 30.0)
    assert environ == {"PATH": "/bin"}


def test_watchdog_for_another_process_or_malformed_is_ignored() -> None:
    """A WATCHDOG_PID naming another process, or a WATCHDOG_USEC that is not a positive number, means no watchdog."""
    for usec, pid in (("30000000", "1"), ("0", ""), ("soon", ""), ("", "")):
        manager = ServiceManager.from_environment({"WATCHDOG_USEC": usec, "WATCHDOG_PID": pid}, log)
        assert manager.watchdog is None, (usec, pid)


def test_without_notify_socket_nothing_is_sent() -> None:
    """Started without systemd, notify() does nothing and says so by returning False."""
    assert ServiceManager.from_environment({}, log).notify("READY=1") is False


def test_a_vanished_socket_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A notification socket that is gone costs one warning line, not one per heartbeat."""
    manager = ServiceManager(str(tmp_path / "gone"), None, log)
    with caplog.at_level(logging.WARNING, logger="policyd.test"):
        assert manager.notify("WATCHDOG=1") is False
        assert manager.notify("WATCHDOG=1") is False
    assert len([r for r in caplog.records if "cannot notify" in r.getMessage()]) == 1


def test_datagram_reaches_a_path_socket(tmp_path: Path) -> None:
    """Several fields go out as one datagram, one KEY=VALUE per line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(tmp_path / "notify"))
        assert ServiceManager(str(tmp_path / "notify"), None, log).notify("READY=1", "STATUS=listening")
        assert receiver.recv(100) == b"READY=1\nSTATUS=listening"
