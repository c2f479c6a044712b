"""Times as administrators see and type them: one zone, the server's, always said.

The commands, the notices, the web pages and ``quarantine.digest_at`` all
speak the server's time zone (``TZ``, else ``/etc/localtime``), as the
mail log beside them does.  A command shows a time in ISO 8601 with its
offset (``2026-12-03T15:00:00+01:00``), one word that can be typed back as
it is; a notice writes it for people with the zone's name
(``2026-12-03 15:00 CET (UTC+01:00)``).  A time typed without a zone
(``--from 2026-12-03T15:00``) is read in that same zone.  JSON gives each
time twice: epoch seconds under the field's own name, as it always did,
and ISO 8601 in UTC under the same name with ``_iso`` added
(``"since_iso": "2026-12-03T14:00:00Z"``).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Any

from policyd.config import parse_duration
from policyd.errors import UsageError

#: The names of the time fields (epoch seconds) of what the commands print as JSON.
TIME_FIELDS = frozenset(
    {"at", "since", "until", "start", "end", "requested_at", "decided_at", "created", "sent", "expires"}
)

#: What ``--from``, ``--until`` and ``--since`` say about the times they take.
WHEN_HELP = (
    "now, +DURATION (+1h, +2d), or ISO 8601 such as 2026-12-03T15:00 "
    "(in the server's time zone unless it gives one, e.g. 2026-12-03T14:00Z)"
)


def show_time(timestamp: float) -> str:
    """A time for a command's output: ISO 8601 in the server's zone, with its offset
    (``2026-12-03T15:00:00+01:00``)."""
    moment = datetime.datetime.fromtimestamp(timestamp).astimezone()
    return moment.isoformat(timespec="seconds")


def zone_name(timestamp: float) -> str:
    """The server's time zone at ``timestamp``, as people read it: ``CET (UTC+01:00)``, or ``UTC``."""
    moment = datetime.datetime.fromtimestamp(timestamp).astimezone()
    offset = moment.strftime("%z")
    utc = f"UTC{offset[:3]}:{offset[3:]}" if offset and offset != "+0000" else "UTC"
    name = moment.strftime("%Z")
    return utc if name in ("UTC", utc, "") else f"{name} ({utc})"


def say_time(timestamp: float) -> str:
    """A time for a mail to people: ``2026-12-03 15:00 CET (UTC+01:00)``, the zone named."""
    moment = datetime.datetime.fromtimestamp(timestamp).astimezone()
    return f"{moment.strftime('%Y-%m-%d %H:%M')} {zone_name(timestamp)}"


def iso_time(timestamp: float) -> str:
    """A time for programs: ISO 8601 in UTC, ``2026-12-03T14:00:00Z`` (fractions of a second dropped)."""
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_when(text: str, now: float) -> float:
    """``now``, ``+1h`` (from now), or an ISO 8601 time, in the server's zone when it names none.

    :raises UsageError: when the text is none of these.
    """
    text = text.strip()
    wrong = f"{text!r}: expected {WHEN_HELP}"
    if text == "now":
        return now
    if text.startswith("+"):
        try:
            return now + parse_duration(text[1:])
        except ValueError:
            raise UsageError(wrong) from None
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(wrong) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # the server's zone, as shown
    return moment.timestamp()


def with_iso(data: Any, fields: Iterable[str] = TIME_FIELDS) -> Any:
    """``data`` (a dict, or a list of them, nested too) with ``NAME_iso`` added beside
    each time field ``NAME``; None for a time not set (0 or None).  Nothing is removed."""
    names = frozenset(fields)
    if isinstance(data, list):
        return [with_iso(item, names) for item in data]
    if not isinstance(data, dict):
        return data
    result: dict[str, Any] = {}
    for key, value in data.items():
        result[key] = with_iso(value, names)
        if key in names and (value is None or (isinstance(value, int | float) and not isinstance(value, bool))):
            result[f"{key}_iso"] = iso_time(float(value)) if value else None
    return result
