"""DMARC (RFC 7489): the policy record, the organisational domain, identifier alignment, the result.

The organisational domain (RFC 7489 section 3.2) is the registrable part
of a name under the Public Suffix List: ``mail.example.co.uk`` belongs to
``example.co.uk``.  The list comes from the ``publicsuffixlist`` package
(PyPI), which ships a copy of the list in each release and is released
again as the list changes: it installs with policyd itself, needs no
network at run time and reads both the ICANN and the private sections.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import attrs

from policyd.forwarding.lookups import DnsTempError, Lookup

#: Policies a record may ask for.
POLICIES = ("none", "quarantine", "reject")


@attrs.frozen
class Policy:
    """A DMARC record, as far as a receiver needs it.

    :ivar domain: where the record was found (the From domain, or its organisational domain).
    :ivar p: the policy for the domain.
    :ivar sp: the policy for its subdomains (defaults to ``p``).
    :ivar adkim: DKIM alignment, ``r`` (relaxed) or ``s`` (strict).
    :ivar aspf: SPF alignment, ``r`` or ``s``.
    :ivar pct: percentage of failing mail the policy applies to.
    """

    domain: str
    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


@attrs.frozen
class Dmarc:
    """The DMARC result of one message.

    :ivar result: ``pass``, ``fail``, ``none``, ``temperror`` or ``permerror``.
    :ivar header_from: the RFC5322.From domain (empty when there is none to check).
    :ivar policy: the policy that applies to the From domain (empty without a record).
    :ivar reason: why, for the result's comment (empty when it says nothing more).
    """

    result: str
    header_from: str = ""
    policy: str = ""
    reason: str = ""


@functools.cache
def _suffixes() -> object:
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def org_domain(domain: str) -> str:
    """The organisational domain of ``domain`` (RFC 7489 section 3.2), lower case, no final dot.

    >>> org_domain("Mail.Example.COM.")
    'example.com'

    A public suffix itself, or a name the list does not know, is its own organisational domain.
    """
    name = domain.lower().rstrip(".")
    private = _suffixes().privatesuffix(name)  # type: ignore[attr-defined]
    return str(private) if private else name


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """Whether an authenticated domain aligns with the From domain: equal (``s``) or same organisation (``r``)."""
    a, b = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if not a or not b:
        return False
    if a == b:
        return True
    return mode != "s" and org_domain(a) == org_domain(b)


def parse_record(text: str, domain: str) -> Policy | None:
    """A DMARC record (``v=DMARC1; p=reject; ...``) found at ``_dmarc.DOMAIN``, or None when it is not one.

    Unknown tags are ignored; a bad ``p`` makes the record none (RFC 7489
    section 6.6.3, simplified); bad values of other tags take their default.
    """
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, equals, value = part.partition("=")
        if equals:
            tags.setdefault(name.strip().lower(), value.strip())
    first = text.split(";", 1)[0].replace(" ", "")
    if first != "v=DMARC1":
        return None
    p = tags.get("p", "").lower()
    if p not in POLICIES:
        return None
    sp = tags.get("sp", "").lower()
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    try:
        pct = min(max(int(tags.get("pct", "100")), 0), 100)
    except ValueError:
        pct = 100
    return Policy(
        domain=domain.lower().rstrip("."),
        p=p,
        sp=sp if sp in POLICIES else p,
        adkim=adkim if adkim in ("r", "s") else "r",
        aspf=aspf if aspf in ("r", "s") else "r",
        pct=pct,
    )


def _record_at(domain: str, lookup: Lookup) -> Policy | None:
    """The one DMARC record at ``_dmarc.DOMAIN`` (none when there are none or several)."""
    found = []
    for strings in lookup(f"_dmarc.{domain}", "TXT"):
        text = b"".join(strings).decode("utf-8", "replace")
        policy = parse_record(text, domain)
        if policy is not None:
            found.append(policy)
    return found[0] if len(found) == 1 else None


def find_policy(from_domain: str, lookup: Lookup) -> Policy | None:
    """The DMARC record for ``from_domain``: its own, else its organisational domain's (RFC 7489 section 6.6.3).

    :raises DnsTempError: when a look-up got no answer.
    """
    domain = from_domain.lower().rstrip(".")
    policy = _record_at(domain, lookup)
    if policy is None:
        organisation = org_domain(domain)
        if organisation != domain:
            policy = _record_at(organisation, lookup)
    return policy


def evaluate(
    from_domain: str,
    spf: tuple[str, str],
    dkim: Sequence[tuple[str, str]],
    lookup: Lookup,
) -> Dmarc:
    """The DMARC result of a message.

    :param from_domain: the RFC5322.From domain ("" when the message has no single From address).
    :param spf: (result, domain) of the SPF check of MAIL FROM (the HELO name's when MAIL FROM was empty).
    :param dkim: (result, d=) of each DKIM signature.
    :param lookup: how the records are asked for.
    """
    if not from_domain:
        return Dmarc("permerror", reason="no single From domain")
    domain = from_domain.lower().rstrip(".")
    try:
        policy = find_policy(domain, lookup)
    except DnsTempError:
        return Dmarc("temperror", domain, reason="policy look-up failed")
    if policy is None:
        return Dmarc("none", domain)
    applied = policy.p if policy.domain == domain else policy.sp
    spf_result, spf_domain = spf
    if spf_result == "pass" and aligned(spf_domain, domain, policy.aspf):
        return Dmarc("pass", domain, applied)
    if any(result == "pass" and aligned(d, domain, policy.adkim) for result, d in dkim):
        return Dmarc("pass", domain, applied)
    # An identifier that would have aligned but could not be checked: try again later.
    unsure = (spf_result == "temperror" and aligned(spf_domain, domain, policy.aspf)) or any(
        result == "temperror" and aligned(d, domain, policy.adkim) for result, d in dkim
    )
    if unsure:
        return Dmarc("temperror", domain, applied, "an aligned identifier could not be checked")
    return Dmarc("fail", domain, applied)
