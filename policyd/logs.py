"""Logging to stdout (journald under systemd), text or one JSON object per line, and optionally to syslog.

Under journald (``JOURNAL_STREAM`` naming the stream written to, as
systemd.exec(5) sets it) every line starts with its sd-daemon(3) priority,
``<4>`` for a warning, so ``journalctl -p warning`` shows warnings and
worse.  Python warnings (``warnings.warn`` in a library) and Twisted's own
log events go through the same handler, so they are shaped and prefixed like
every other line.  ``log.syslog`` also sends every line to syslog, facility
``mail``, so they land in mail.log beside Postfix's.
"""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import os
import socket
import sys
import time
import warnings
from typing import Any, TextIO, cast

from policyd.config import Log
from policyd.errors import ConfigError
from policyd.texts import printable as _printable

#: Where ``log.syslog: true`` sends lines: the local syslog daemon's socket.
SYSLOG_SOCKET = "/dev/log"


def priority(level: int) -> int:
    """The sd-daemon(3) / syslog priority of a logging level (``<3>`` error ... ``<7>`` debug)."""
    if level >= logging.CRITICAL:
        return 2
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    if level >= logging.INFO:
        return 6
    return 7


def under_journald(stream: object, environ: dict[str, str] | None = None) -> bool:
    """Whether ``stream`` is the stream journald connected (``JOURNAL_STREAM``, systemd.exec(5)).

    systemd sets ``JOURNAL_STREAM=DEVICE:INODE`` of the socket it gives as
    stdout or stderr; a process whose output was redirected since (a shell
    pipe, a file) inherits the variable but no longer writes to journald,
    so the device and inode are compared with the stream's own.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, colon, inode = value.partition(":")
    if not colon or not device.isdigit() or not inode.isdigit():
        return False
    try:
        status = os.fstat(stream.fileno())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False
    return status.st_dev == int(device) and status.st_ino == int(inode)


class JournalFormatter(logging.Formatter):
    """Another formatter's lines, each started with the record's ``<N>`` priority.

    Every line, not only the first: journald reads a traceback's lines as
    entries of their own, each with its own priority.
    """

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        """Format with the inner formatter, then prefix every line."""
        prefix = f"<{priority(record.levelno)}>"
        return prefix + self.inner.format(record).replace("\n", "\n" + prefix)


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

    def format(self, record: logging.LogRecord) -> str:
        """Format a record; a traceback's final newline would be an empty line of its own."""
        return super().format(record).rstrip("\n")


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


#: Postfix's ``queue_id``, ``sasl_username``, ``sender`` and ``recipient`` of a
#: request, each None when it did not send it.
Envelope = tuple[str | None, str | None, str | None, str | None]


def _envelope_text(client: str, envelope: Envelope) -> str:
    """`` queue_id=Q client=A sasl_username=U from=<S> to=<R>``, in Postfix's words, without the parts not sent."""
    queue_id, sasl, sender, recipient = envelope
    text = f" queue_id={queue_id}" if queue_id else ""
    text += f" client={client or '-'}"
    if sasl:
        text += f" sasl_username={sasl}"
    if sender is not None:
        text += f" from=<{sender}>"
    if recipient is not None:
        text += f" to=<{recipient}>"
    return text


class DecisionLog:
    """One line per policy decision, written straight to the log stream.

    Decisions are the hot path: a ``logging`` record (caller lookup, record
    object, formatter) cost more than the decision itself, so these lines
    are built here, in the same text or JSON shape as every other line.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.json = False
        #: Whether lines start with their sd-daemon priority (under journald).
        self.journal = False
        self.stream: Any = None
        #: The syslog handler (``log.syslog``), if any.
        self.syslog: logging.Handler | None = None
        self._second = -1
        self._stamp = ""

    def configure(
        self, config: Log, stream: Any, journal: bool = False, syslog: logging.Handler | None = None
    ) -> None:
        """Follow the configuration: format, level, ``log.decisions``; under journald or not; syslog."""
        level = config.components.get("decision", config.level)
        self.enabled = config.decisions and logging.INFO >= logging.getLevelName(level.upper())
        self.json = config.format == "json"
        self.journal = journal
        self.stream = stream
        self.syslog = syslog

    def write(
        self,
        check: str,
        subject: str,
        client: str,
        state: str,
        action: str,
        reason: str,
        latency_ms: float,
        envelope: Envelope = (None, None, None, None),
    ) -> None:
        """Write one decision line.

        :param envelope: Postfix's ``queue_id``, ``sasl_username``, ``sender``
            and ``recipient``, each None when Postfix did not send it (an
            empty sender is the null sender, ``from=<>``), so the line can be
            matched with Postfix's own (``4XyZ1: ... from=<...>``).
        """
        now = time.time()
        queue_id, sasl, sender, recipient = envelope
        if self.json:
            message = (
                f"{check} {subject or '-'}{_envelope_text(client, envelope)} state={state or '-'} "
                f"action={action!r} reason={reason!r} latency={latency_ms:.2f}ms"
            )
            line = json.dumps(
                {
                    "time": round(now, 6), "level": "info", "logger": "policyd.decision", "message": message,
                    "check": check, "subject": subject, "client": client, "state": state,
                    "action": action, "reason": reason, "latency_ms": round(latency_ms, 3),
                    "queue_id": queue_id or None, "sasl_username": sasl or None,
                    "sender": sender, "recipient": recipient,
                },
                separators=(",", ":"),
            )
        else:
            message = (
                f"{check} {_printable(subject) or '-'}"
                f"{_printable(_envelope_text(client, envelope))} state={_printable(state) or '-'} "
                f"action={action!r} reason={_printable(reason)!r} latency={latency_ms:.2f}ms"
            )
            line = f"{self._stamp_of(now)} INFO policyd.decision: {message}"
        self._write(line, logging.INFO, "policyd.decision", message)

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
            self._write(json.dumps(fields, separators=(",", ":")), logging.INFO, logger.name, message)
        else:
            text = _printable(message)
            self._write(f"{self._stamp_of(now)} INFO {logger.name}: {text}", logging.INFO, logger.name, text)

    def _stamp_of(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        return self._stamp

    def _write(self, line: str, level: int, name: str, message: str) -> None:
        """Write ``line`` (prefixed under journald); hand ``message`` to syslog when it is on."""
        if self.journal:
            line = f"<{priority(level)}>{line}"
        try:
            self.stream.write(line + "\n")
        except (OSError, ValueError):
            pass  # stdout gone (closed pipe): decisions still go to Postfix
        if self.syslog is not None:
            self.syslog.handle(logging.makeLogRecord(
                {"name": name, "levelno": level, "levelname": logging.getLevelName(level), "msg": message}
            ))


#: The decision log of this process, configured by :func:`setup`.
decisions = DecisionLog()


def setup(config: Log, stream: TextIO | None = None) -> None:
    """Send policyd's logs to stdout (or ``stream``) in the configured format and level, and to syslog.

    Library warnings (:mod:`warnings`) and Twisted's log events go the same
    way; under journald every line starts with its ``<N>`` priority.

    :raises ConfigError: naming ``log.syslog`` when the syslog socket cannot be used.
    """
    if stream is None and isinstance(sys.stdout, io.TextIOWrapper):
        # Never drop a line for a byte the locale cannot write.
        sys.stdout.reconfigure(errors="backslashreplace")
    out = stream or sys.stdout
    journal = under_journald(out)
    handler = _LazyFlushHandler(out)
    shape: logging.Formatter = JsonFormatter() if config.format == "json" else TextFormatter()
    handler.setFormatter(JournalFormatter(shape) if journal else shape)
    handlers: list[logging.Handler] = [handler]
    syslog = syslog_handler(config.syslog)
    if syslog is not None:
        handlers.append(syslog)
    root = logging.getLogger("policyd")
    for old in list(root.handlers):
        root.removeHandler(old)
        if old is not handler and isinstance(old, logging.handlers.SysLogHandler):
            old.close()
    for new in handlers:
        root.addHandler(new)
    root.setLevel(config.level.upper())
    root.propagate = False
    logging.getLogger("policyd.decision").disabled = not config.decisions
    for component, level in config.components.items():
        logging.getLogger(f"policyd.{component}").setLevel(level.upper())
    decisions.configure(config, handler.stream, journal, syslog)
    _route_twisted_logs()
    # After Twisted's log beginner, which installs its own showwarning.
    warnings.showwarning = _log_warning


def syslog_handler(target: bool | str) -> logging.Handler | None:
    """A handler to syslog, facility ``mail``, for ``log.syslog`` (None when off).

    Lines read ``policyd[PID]: LEVEL LOGGER: message``, as mail.log's other
    lines name their program and process; the syslog daemon adds the time.

    :raises ConfigError: when the socket cannot be reached.
    """
    if target is False:
        return None
    address = SYSLOG_SOCKET if target is True else str(target)
    problem = _unreachable(address)
    if problem:
        raise ConfigError(f"log.syslog: cannot send to {address}: {problem}")
    handler = _MailSyslog(address=address, facility=logging.handlers.SysLogHandler.LOG_MAIL)
    handler.ident = f"policyd[{os.getpid()}]: "
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    return handler


def _unreachable(address: str) -> str:
    """Why the syslog socket at ``address`` takes no lines ("" when it does): datagram or stream, as syslog daemons offer."""
    problem = ""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(address)
            except OSError as error:
                problem = problem or error.strerror or str(error)
            else:
                return ""
    return problem


class _MailSyslog(logging.handlers.SysLogHandler):
    """The syslog copy of the log: a line it cannot send (the daemon restarting) is dropped.

    It reconnects by itself at the next line; the default, a traceback on
    stderr per line, would bury the log that still goes to stdout.
    """

    def handleError(self, record: logging.LogRecord) -> None:
        """Drop the line: stdout still has it."""


#: Where library warnings are logged.
_warnings_log = logging.getLogger("policyd.warnings")


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Log a :mod:`warnings` warning as one line (``warnings.showwarning``), not on stderr."""
    where = f"{os.path.basename(filename)}:{lineno}"
    _warnings_log.warning("%s: %s (%s)", category.__name__, " ".join(str(message).split()), where)


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
