"""Running a server in the foreground: reactor, logging, signals, exit status.

``policyd serve`` and ``policyd milter`` run the same way: install the
asyncio reactor, read the configuration, start, reload on SIGHUP (one that
arrives while starting is applied once running), drain and stop on
SIGTERM, and turn a start-up failure into one line and a non-zero exit.
Under systemd (``Type=notify``) they tell the service manager when they
listen, when they start draining, and that the reactor is alive
(:class:`ServiceManager`).
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable, MutableMapping
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall

from policyd import config as configuration
from policyd import logs
from policyd.config import Config
from policyd.config.files import check_files
from policyd.errors import PolicydError

#: Longest wait for in-flight requests or messages at shutdown; Postfix waits
#: longer for a reply (100 s for a policy, 300 s for a milter), but a stop must
#: not hang.
DRAIN_BOUND = 10.0

#: Longest wait, after the drain, for replies to leave before connections are
#: cut, and for the store to close (a hung Redis must not hold the exit).
CLOSE_BOUND = 2.0

#: Descriptors a server needs beside its policy or milter clients: up to 256
#: HTTP clients (:data:`policyd.web.limits.CONNECTIONS_AT_MOST`), and the
#: store, the log, DNS, the listeners and threads.
SPARE_DESCRIPTORS = 512


def open_files_for(connections: int, log: logging.Logger) -> int:
    """Make room for ``connections`` clients in ``RLIMIT_NOFILE``; the soft limit now.

    A server started from a shell inherits its soft limit (often 1,024),
    while ``limits.max_connections`` allows 1,000 clients on top of what the
    server itself opens: past the limit, ``accept`` fails and Postfix sees
    refused connections.  The soft limit is raised toward the hard one
    (which any process may do); when even that is too low, one warning says
    so at start-up rather than refusals under load.
    """
    needed = connections + SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            log.debug("cannot raise the open-file limit to %d: %s", target, error)
    if soft < needed:
        log.warning(
            "limits.max_connections is %d but this process may open only %d files (hard limit %s): "
            "clients past about %d connections will be refused; raise LimitNOFILE (ulimit -n) "
            "or lower limits.max_connections",
            connections, soft, "unlimited" if hard == resource.RLIM_INFINITY else hard,
            max(soft - SPARE_DESCRIPTORS, 0),
        )
    return soft


class ServiceManager:
    """The service manager's notification socket, spoken to as sd_notify(3) does.

    systemd passes the socket's address in ``$NOTIFY_SOCKET`` (a path, or
    an abstract-namespace name when it starts with ``@``); each notification
    is one datagram of ``KEY=VALUE`` lines.  Without the variable (started
    by hand, by a test, by another supervisor) every call does nothing.

    :param address: the value of ``$NOTIFY_SOCKET``, or None.
    :param watchdog: the watchdog period in seconds (``$WATCHDOG_USEC``), or None.
    :param log: where a failure to notify is reported (once).
    """

    def __init__(self, address: str | None, watchdog: float | None, log: logging.Logger) -> None:
        self.address = address
        self.watchdog = watchdog
        self.log = log
        self._failed = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str], log: logging.Logger) -> ServiceManager:
        """Read, and remove, the variables systemd set for this process.

        They are removed, as sd_notify(3)'s ``unset_environment`` does, so a
        program this process starts never speaks for it.
        """
        address = environ.pop("NOTIFY_SOCKET", None) or None
        usec = environ.pop("WATCHDOG_USEC", None)
        pid = environ.pop("WATCHDOG_PID", None)
        watchdog = None
        # WATCHDOG_PID, when set, names the process the watchdog is for.
        if usec and usec.isdigit() and int(usec) > 0 and pid in (None, "", str(os.getpid())):
            watchdog = int(usec) / 1e6
        return cls(address, watchdog, log)

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``READY=1``, ``STOPPING=1``, ...) as one notification; True when sent."""
        if self.address is None:
            return False
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]  # Linux abstract namespace
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(fields).encode(), target)
        except OSError as error:
            # Worth one line: under Type=notify systemd would time the start out.
            if not self._failed:
                self.log.warning("cannot notify the service manager at %s: %s", self.address, error)
                self._failed = True
            return False
        return True


class Daemon(Protocol):
    """What a foreground server offers the runner."""

    def start(self) -> Any:
        """Listen; a Deferred that fails when the server cannot start."""

    def stop(self) -> Any:
        """Drain and close; a Deferred."""

    def reload(self) -> bool:
        """Re-read the configuration; a bad one is refused and the old one kept."""


class Drainable(Protocol):
    """A server factory that can say when its in-flight work is done."""

    def drained(self) -> Deferred[None]:
        """Fires once nothing is in flight."""


class BaseServer:
    """What both daemons share: listening, housekeeping loops, reload, drain.

    A subclass builds its parts complete in its constructor, registers its
    loops with :meth:`every`, applies a reloaded configuration in
    :meth:`configure`, and writes its own ``start`` and ``stop`` from
    :meth:`listen`, :meth:`start_loops`, :meth:`stop_loops` and :meth:`drain`.

    :param reactor: the reactor (asyncio reactor in production).
    :param config: the validated configuration.
    :param path: the configuration file, re-read on SIGHUP.
    :param log: the daemon's logger (``policyd.server``, ``policyd.milter``).
    """

    def __init__(self, reactor: Any, config: Config, path: str | None, log: logging.Logger) -> None:
        self.reactor = reactor
        self.config = config
        self.path = path
        self.log = log
        self._loops: list[tuple[LoopingCall, float, bool]] = []

    def every(self, seconds: float, work: Callable[[], object], now: bool = False) -> None:
        """Run ``work`` every ``seconds`` once started (at once too when ``now``)."""
        loop = LoopingCall(work)
        loop.clock = self.reactor
        self._loops.append((loop, seconds, now))

    def start_loops(self) -> None:
        """Start the housekeeping loops."""
        for loop, seconds, now in self._loops:
            loop.start(seconds, now=now)

    def stop_loops(self) -> None:
        """Stop the housekeeping loops (a run in progress finishes)."""
        for loop, _, _ in self._loops:
            if loop.running:
                loop.stop()

    @inlineCallbacks
    def listen(self, key: str, where: str, factory: Any) -> Any:
        """Listen on the endpoint ``where`` (the value of config key ``key``); fires with the port.

        :raises PolicydError: naming the key, when the endpoint is wrong or busy.
        """
        try:
            endpoint = serverFromString(self.reactor, where)
        except (KeyError, IndexError, ValueError) as error:
            detail = "no socket was passed by systemd" if where.startswith("systemd:") else str(error)
            raise PolicydError(f"{key}: cannot use {where}: {detail}") from None
        try:
            port: IListeningPort = yield endpoint.listen(factory)
        except Exception as error:
            raise PolicydError(f"{key}: cannot listen on {where}: {error}") from None
        return port

    def configure(self, config: Config) -> None:
        """Apply a reloaded configuration to the parts, all of it or none.

        :raises PolicydError: when part of it cannot be applied; the running
            configuration then stays.
        """
        raise NotImplementedError

    def reload(self) -> bool:
        """Re-read the configuration; a bad one is refused and the old one kept.

        A file the new configuration names must be readable, as at start-up.
        ``store.url`` and ``listen.*`` need a restart: their running values
        stay.  ``log.*`` changes apply with the rest.
        """
        # Compared with what ran before: configure() may set self.config itself.
        old = self.config
        try:
            new = configuration.load(self.path)
            check_files(new)
            if new.store.url != old.store.url or new.listen != old.listen:
                self.log.warning("reload: store.url and listen.* changes need a restart; kept the old values")
                new = attrs.evolve(new, store=old.store, listen=old.listen)
            self.configure(new)
        except PolicydError as error:
            self.config = old
            self.log.error("reload refused, keeping the running configuration: %s", error)
            return False
        if new.log != old.log:
            self._relog(new, old)
        if new.limits.max_connections > old.limits.max_connections:
            open_files_for(new.limits.max_connections, self.log)
        self.config = new
        self.log.info("configuration reloaded from %s", self.path)
        return True

    def _relog(self, new: Config, old: Config) -> None:
        """Apply a changed ``log`` section; when it cannot be (syslog), the old logging stays."""
        try:
            logs.setup(new.log)
        except PolicydError as error:
            self.log.error("reload: %s; kept the running log settings", error)
            return
        for component in old.log.components.keys() - new.log.components.keys():
            logging.getLogger(f"policyd.{component}").setLevel(logging.NOTSET)

    def close_store(self, store: Any) -> Deferred[Any]:
        """Close ``store``, waiting at most :data:`CLOSE_BOUND` seconds for it."""
        closing = store.close()
        closing.addTimeout(CLOSE_BOUND, self.reactor)
        return DeferredList([closing], consumeErrors=True)

    @inlineCallbacks
    def drain(self, factory: Drainable, what: str) -> Any:
        """Wait, at most :data:`DRAIN_BOUND` seconds, until ``factory`` has nothing in flight."""
        drained = factory.drained()
        drained.addTimeout(DRAIN_BOUND, self.reactor)
        try:
            yield drained
        except Exception:
            self.log.warning("shutdown: %s still in flight after %ss; closing anyway", what, DRAIN_BOUND)


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
    open_files_for(config.limits.max_connections, logging.getLogger("policyd.daemon"))
    server = build(reactor, config, configuration.config_path(path))
    manager = ServiceManager.from_environment(os.environ, logging.getLogger("policyd.daemon"))
    failure: list[BaseException] = []

    def started() -> None:
        def failed(f: Any) -> None:
            failure.append(f.value)
            reactor.stop()

        server.start().addCallbacks(lambda _: ready(), failed)

    def ready() -> None:
        # Every listener accepts now: Postfix (ordered after the units) may connect.
        manager.notify("READY=1")
        if manager.watchdog:
            # Sent from the reactor loop, so a stuck reactor stops sending and
            # systemd restarts the service; twice per period, as sd_watchdog_enabled(3) advises.
            heartbeat = LoopingCall(manager.notify, "WATCHDOG=1")
            heartbeat.clock = reactor
            heartbeat.start(manager.watchdog / 2, now=False)

    # Everything loaded so far lives as long as the process: keep the cyclic
    # garbage collector from walking it again and again under load.
    gc.collect()
    gc.freeze()
    if threads:
        reactor.suggestThreadPoolSize(threads)
    reactor.callWhenRunning(started)
    # Registered first, so systemd hears of the drain before it starts.
    reactor.addSystemEventTrigger("before", "shutdown", manager.notify, "STOPPING=1")
    reactor.addSystemEventTrigger("before", "shutdown", server.stop)
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(server.reload))
    if early:
        reactor.callWhenRunning(server.reload)
    reactor.run()
    if failure:
        raise failure[0] if isinstance(failure[0], PolicydError) else PolicydError(str(failure[0]))
