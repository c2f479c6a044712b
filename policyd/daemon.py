"""Running a server in the foreground: reactor, logging, signals, exit status.

``policyd serve`` and ``policyd milter`` run the same way: install the
asyncio reactor, read the configuration, start, reload on SIGHUP (one that
arrives while starting is applied once running), drain and stop on
SIGTERM, and turn a start-up failure into one line and a non-zero exit.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Callable
from typing import Any, Protocol

from policyd import config as configuration
from policyd import logs
from policyd.config import Config
from policyd.errors import PolicydError


class Daemon(Protocol):
    """What a foreground server offers the runner."""

    def start(self) -> Any:
        """Listen; a Deferred that fails when the server cannot start."""

    def stop(self) -> Any:
        """Drain and close; a Deferred."""

    def reload(self) -> bool:
        """Re-read the configuration; a bad one is refused and the old one kept."""


def run_daemon(path: str | None, build: Callable[[Any, Config, str], Daemon], threads: int | None = None) -> None:
    """Build and run a server until SIGTERM or SIGINT.

    :param path: the configuration file (``-c``), or None for the default.
    :param build: ``build(reactor, config, path)`` makes the server.
    :param threads: size of the reactor's thread pool, when it needs one.
    :raises PolicydError: when the configuration, the store or a listener fails.
    """
    # A SIGHUP before the reactor runs (systemctl reload right after start)
    # must not kill the process: remember it and reload once running.
    early: list[int] = []
    signal.signal(signal.SIGHUP, lambda number, _: early.append(number))
    from policyd.reactor import install_reactor

    reactor = install_reactor()
    config = configuration.load(path)
    logs.setup(config.log)
    server = build(reactor, config, configuration.config_path(path))
    failure: list[BaseException] = []

    def started() -> None:
        def failed(f: Any) -> None:
            failure.append(f.value)
            reactor.stop()

        server.start().addErrback(failed)

    # Everything loaded so far lives as long as the process: keep the cyclic
    # garbage collector from walking it again and again under load.
    gc.collect()
    gc.freeze()
    if threads:
        reactor.suggestThreadPoolSize(threads)
    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", server.stop)
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(server.reload))
    if early:
        reactor.callWhenRunning(server.reload)
    reactor.run()
    if failure:
        raise failure[0] if isinstance(failure[0], PolicydError) else PolicydError(str(failure[0]))
