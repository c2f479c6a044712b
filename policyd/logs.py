"""Logging to stdout (journald under systemd): text or one JSON object per line."""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from typing import Any, cast

from policyd.config import Log
from policyd.texts import printable as _printable


class JsonFormatter(logging.Formatter):
    """One compact JSON object per record; fields passed as ``extra=`` are kept."""

    _RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}

    def format(self, record: logging.LogRecord) -> str:
        """Serialise a record."""
        data: dict[str, object] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._RESERVED:
                data[key] = value
        return json.dumps(data, separators=(",", ":"), default=str)


class TextFormatter(logging.Formatter):
    """``2026-11-25T20:01:02Z level logger: message``, in UTC."""

    converter = time.gmtime  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%SZ")


#: Seconds a decision line may wait in the output buffer (see :func:`flush`).
FLUSH_EVERY = 0.25


class _LazyFlushHandler(logging.StreamHandler):
    """Writes every record but flushes at once only for warnings and worse.

    A flush is a write system call: once per decision it cost more than the
    decision itself.  Decision lines leave with the next warning or the
    server's periodic :func:`flush`, at most FLUSH_EVERY later.
    """

    def emit(self, record: logging.LogRecord) -> None:
        """Write one record; flush only when it matters now."""
        try:
            self.stream.write(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING:
                self.flush()
        except Exception:
            self.handleError(record)


def flush() -> None:
    """Push buffered log lines out (the server calls it every FLUSH_EVERY seconds)."""
    for handler in logging.getLogger("policyd").handlers:
        handler.flush()


class DecisionLog:
    """One line per policy decision, written straight to the log stream.

    Decisions are the hot path: a ``logging`` record (caller lookup, record
    object, formatter) cost more than the decision itself, so these lines
    are built here, in the same text or JSON shape as every other line.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.json = False
        self.stream: Any = None
        self._second = -1
        self._stamp = ""

    def configure(self, config: Log, stream: Any) -> None:
        """Follow the configuration: format, level, ``log.decisions``."""
        level = config.components.get("decision", config.level)
        self.enabled = config.decisions and logging.INFO >= logging.getLevelName(level.upper())
        self.json = config.format == "json"
        self.stream = stream

    def write(
        self, check: str, subject: str, client: str, state: str, action: str, reason: str, latency_ms: float
    ) -> None:
        """Write one decision line."""
        now = time.time()
        if self.json:
            message = (
                f"{check} {subject or '-'} client={client or '-'} state={state or '-'} "
                f"action={action!r} reason={reason!r} latency={latency_ms:.2f}ms"
            )
            line = json.dumps(
                {
                    "time": round(now, 6), "level": "info", "logger": "policyd.decision", "message": message,
                    "check": check, "subject": subject, "client": client, "state": state,
                    "action": action, "reason": reason, "latency_ms": round(latency_ms, 3),
                },
                separators=(",", ":"),
            )
        else:
            subject, client, reason = _printable(subject), _printable(client), _printable(reason)
            line = (
                f"{self._stamp_of(now)} INFO policyd.decision: {check} {subject or '-'} client={client or '-'} "
                f"state={state or '-'} action={action!r} reason={reason!r} latency={latency_ms:.2f}ms"
            )
        self._write(line)

    def info(self, logger: logging.Logger, message: str) -> None:
        """One info line of another hot path (the milter's verdicts), written the same cheap way.

        Before :func:`setup` (tests, commands) it goes through ``logger``.
        """
        if not logger.isEnabledFor(logging.INFO):
            return
        if self.stream is None:
            logger.info("%s", message)
            return
        now = time.time()
        if self.json:
            fields = {"time": round(now, 6), "level": "info", "logger": logger.name, "message": message}
            self._write(json.dumps(fields, separators=(",", ":")))
        else:
            self._write(f"{self._stamp_of(now)} INFO {logger.name}: {_printable(message)}")

    def _stamp_of(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        return self._stamp

    def _write(self, line: str) -> None:
        try:
            self.stream.write(line + "\n")
        except (OSError, ValueError):
            pass  # stdout gone (closed pipe): decisions still go to Postfix


#: The decision log of this process, configured by :func:`setup`.
decisions = DecisionLog()


def setup(config: Log, stream: object = None) -> None:
    """Send policyd's logs to stdout in the configured format and level."""
    if stream is None and isinstance(sys.stdout, io.TextIOWrapper):
        # Never drop a line for a byte the locale cannot write.
        sys.stdout.reconfigure(errors="backslashreplace")
    handler = _LazyFlushHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    root = logging.getLogger("policyd")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    root.propagate = False
    logging.getLogger("policyd.decision").disabled = not config.decisions
    for component, level in config.components.items():
        logging.getLogger(f"policyd.{component}").setLevel(level.upper())
    decisions.configure(config, handler.stream)
    _route_twisted_logs()


def _route_twisted_logs() -> None:
    """Make Twisted's own log events go through the same handler."""
    from twisted.logger import (
        FilteringLogObserver,
        ILogFilterPredicate,
        STDLibLogObserver,
        globalLogBeginner,
    )

    predicate = cast(ILogFilterPredicate, _not_chatter)
    observer = FilteringLogObserver(STDLibLogObserver(name="policyd.twisted"), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False, discardBuffer=True)


#: Twisted's per-connection chatter: factory start and stop, SMTP client
#: retries, and what twisted.names logs for every DNS query (it opens a UDP
#: port per query).
_CHATTER = (
    "Starting factory",
    "Stopping factory",
    "SMTP Client retrying",
    "(UDP Port ",
    "DNSDatagramProtocol starting on",
    "Starting protocol <twisted.names.dns.DNSDatagramProtocol",
    "Stopping protocol <twisted.names.dns.DNSDatagramProtocol",
)


def _not_chatter(event: dict[str, object]) -> object:
    """Drop Twisted's per-connection chatter (factory start and stop, SMTP client
    retries, a DNS query's UDP port): one line per outgoing mail says nothing that
    policyd's own notification log lines do not say better."""
    from twisted.logger import PredicateResult

    # New-style events carry their words in log_format; legacy log.msg()
    # events (SMTP retries, UDP ports) have log_format "{log_text}".
    text = str(event.get("log_format") or "")
    legacy = str(event.get("log_text") or "")
    if text.startswith(_CHATTER) or legacy.startswith(_CHATTER):
        return PredicateResult.no
    return PredicateResult.maybe
