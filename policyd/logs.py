"""Logging to stdout (journald under systemd): text or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import cast

from policyd.config import Log


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


def setup(config: Log, stream: object = None) -> None:
    """Send policyd's logs to stdout in the configured format and level."""
    handler = logging.StreamHandler(stream or sys.stdout)  # type: ignore[arg-type]
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    root = logging.getLogger("policyd")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    root.propagate = False
    logging.getLogger("policyd.decision").disabled = not config.decisions
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
