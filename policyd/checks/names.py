"""The client's names: HELO and reverse-DNS heuristics."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from policyd.addresses import normalise_domain
from policyd.netlists import (
    IPAddress,
    parse_address,
)

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


def is_fqdn(name: str) -> bool:
    """A fully qualified host name: two labels or more, letters-digits-hyphens, a non-numeric TLD."""
    return len(name) <= 253 and _is_fqdn(name)


@functools.lru_cache(maxsize=4096)
def _is_fqdn(name: str) -> bool:
    # Remembered: the same HELO names come back for every recipient.
    labels = name.rstrip(".").lower().split(".")
    if len(labels) < 2:
        return False
    if not all(_LABEL.match(label) for label in labels):
        return False
    return not labels[-1].isdigit()


class NamePatterns:
    """Host names, exact (``mail.example.org``) or by suffix (``.example.org``)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.exact: set[str] = set()
        self.suffixes: list[str] = []
        for name in names:
            name = name.strip()
            if not name:
                continue
            if name.startswith("."):
                self.suffixes.append("." + normalise_domain(name[1:]))
            else:
                self.exact.add(normalise_domain(name))

    def __bool__(self) -> bool:
        return bool(self.exact or self.suffixes)

    def match(self, name: str) -> str | None:
        """The pattern ``name`` matches, if any."""
        name = normalise_domain(name)
        if not name:
            return None
        if name in self.exact:
            return name
        for suffix in self.suffixes:
            if name.endswith(suffix):
                return suffix
        return None


def helo_findings(helo: str, ours: NamePatterns, server_address: str = "") -> list[tuple[str, str]]:
    """What is wrong with a HELO name: ``(heuristic, detail)`` pairs."""
    helo = helo.strip()
    if not helo:
        return [("helo_not_fqdn", "no HELO given")]
    findings = []
    literal: IPAddress | None = None
    if helo.startswith("[") and helo.endswith("]"):
        inside = helo[1:-1]
        if inside[:5].lower() == "ipv6:":
            inside = inside[5:]
        literal = parse_address(inside)
        if literal is None:
            findings.append(("helo_not_fqdn", f"malformed address literal {helo}"))
        else:
            findings.append(("helo_bare_ip", f"address literal {helo}"))
    elif (literal := parse_address(helo)) is not None:
        findings.append(("helo_bare_ip", f"bare IP address {helo}"))
    elif not is_fqdn(helo):
        findings.append(("helo_not_fqdn", f"{helo} is not a fully qualified name"))
    if literal is not None:
        if server_address and literal == parse_address(server_address):
            findings.append(("helo_claims_us", f"{helo} is our address"))
    elif ours.match(helo):
        findings.append(("helo_claims_us", f"{helo} is one of our names"))
    return findings


# --- the check ------------------------------------------------------------------------
