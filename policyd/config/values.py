"""Configuration values: durations, times of day, and the checks each key's value must pass."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

import attrs

from policyd.netlists import parse_code_filter

#: Where commands look for the configuration when neither ``-c`` nor
#: ``$POLICYD_CONFIG`` names one.
DEFAULT_PATH = "/etc/policyd/policyd.yaml"

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str | float) -> float:
    """Read ``90s``, ``15m``, ``1h``, ``3d`` (or a bare number of seconds).

    :raises ValueError: when the text is not a duration.
    """
    if isinstance(text, bool):
        raise ValueError("expected a duration such as 90s, 15m, 1h or 3d")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        match = _DURATION.match(str(text))
        if not match:
            raise ValueError("expected a duration such as 90s, 15m, 1h or 3d")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """Write seconds back in the largest exact unit (``259200`` -> ``3d``)."""
    for unit in ("d", "h", "m"):
        if seconds and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"


class Duration(float):
    """Seconds, written in the file as ``90s``, ``15m``, ``1h`` or ``3d``."""


# --- value checks -----------------------------------------------------------


def _at_least(minimum: float) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value < minimum:
            raise ValueError(f"must be at least {minimum:g}")

    return check


def _at_most(maximum: float, shown: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value > maximum:
            raise ValueError(f"must be at most {shown}")

    return check


def _one_of(*choices: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value not in choices:
            raise ValueError("must be one of " + ", ".join(choices))

    return check


def _levels(value: Any) -> None:
    for component, level in value.items():
        if level not in ("debug", "info", "warning", "error"):
            raise ValueError(f"{component}: must be one of debug, info, warning, error")


def _endpoint(value: Any) -> None:
    if value is None:
        return
    kind = str(value).split(":", 1)[0]
    if kind not in {"tcp", "tcp6", "unix", "systemd", "ssl"} or ":" not in str(value):
        raise ValueError(
            "must be a Twisted endpoint such as tcp:10040:interface=127.0.0.1, "
            "unix:/run/policyd/policy.sock or systemd:domain=INET:index=0"
        )


def _networks(value: Any) -> None:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network (CIDR)") from None


def _hostport(value: Any) -> None:
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be host:port, e.g. 127.0.0.1:25")


def _store_url(value: Any) -> None:
    if not re.match(r"^(sqlite:///.+|memory://.*|rediss?://.+|redis\+sentinel://.+|unix://.+)$", value):
        raise ValueError(
            "must be sqlite:///path, redis://host:port/db, rediss://…, "
            "redis+sentinel://…, unix:///path/redis.sock or memory://"
        )


def _nameservers(value: Any) -> None:
    from policyd.checks.resolver import parse_nameserver

    for item in value:
        parse_nameserver(item)


def _codes(value: Any) -> None:
    if value is None:
        return
    parse_code_filter(value)


def _time_text(value: Any) -> str | None:
    """A time of day as text: YAML reads an unquoted ``10:30`` as 630 (base 60)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value // 60:02d}:{value % 60:02d}"
    return None if value is None else str(value)


def _time_of_day(value: Any) -> None:
    if value is None:
        return
    if parse_time_of_day(_time_text(value) or "") is None:
        raise ValueError("must be a time of day HH:MM, e.g. 08:00")


def parse_time_of_day(text: str) -> tuple[int, int] | None:
    """``08:00`` -> (8, 0); None when it is not a time of day."""
    match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*", text)
    if not match:
        return None
    hour, minute = int(match.group(1)), int(match.group(2))
    if hour > 23 or minute > 59:
        return None
    return hour, minute


def _base_url(value: Any) -> None:
    if value is None:
        return
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", str(value)):
        raise ValueError("must be an http:// or https:// URL without query, e.g. https://mail.example.org/policyd")


def _languages(value: Any) -> None:
    if value is None:
        return
    if not value:
        raise ValueError("must name at least one language")
    for language in value:
        if language not in ("en", "fr"):
            raise ValueError(f"{language!r}: must be en or fr")
    if len(set(value)) != len(value):
        raise ValueError("names a language twice")


def _nonempty(value: Any) -> None:
    if not str(value).strip():
        raise ValueError("must not be empty")


def _field(default: Any, doc: str, check: Callable[[Any], None] | None = None) -> Any:
    """An attrs field with its documentation and an optional value check."""
    metadata = {"doc": doc, "check": check}
    if isinstance(default, list | dict):
        return attrs.field(factory=lambda: type(default)(default), metadata=metadata)
    return attrs.field(default=default, metadata=metadata)


