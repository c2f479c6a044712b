"""Mail addresses and domains as Postfix hands them to us."""

from __future__ import annotations

import idna

_CONTROL = {c: " " for c in range(0x20)} | {0x7F: " ", 0x2028: " ", 0x2029: " "}
_CONTROL |= {c: " " for c in range(0x80, 0xA0)}


def normalise_domain(domain: str) -> str:
    """Lower-case a domain and write it in IDNA (``Exämple.org`` -> ``xn--exmple-cua.org``).

    A name that IDNA refuses (an underscore, say) is kept lower-cased, so a
    strange recipient still compares equal to itself.
    """
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError:
        return domain


def domain_of(address: str) -> str | None:
    """The normalised domain of an address, or None for a bare local part."""
    _, at, domain = address.rpartition("@")
    if not at or not domain:
        return None
    return normalise_domain(domain)


def sanitise(text: str, limit: int = 400) -> str:
    """Make text safe to put in a reply line.

    Control characters (CR and LF included), C1 controls, Unicode line
    separators and lone surrogates become spaces, so nothing taken from a
    request can start a new reply line; the result is cut to ``limit``.
    """
    clean = text.translate(_CONTROL)
    if not clean.isascii():
        clean = clean.encode("utf-8", "replace").decode("utf-8")
    return clean[:limit]
