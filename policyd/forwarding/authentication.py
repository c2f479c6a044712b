"""Authentication on arrival: SPF (RFC 7208), DKIM (RFC 6376), DMARC (RFC 7489), told in Authentication-Results (RFC 8601).

Every message the milter accepts, whoever sent it (loopback included), is
checked once on arrival:

- SPF of the client address for the HELO name and for MAIL FROM (the HELO
  name's ``postmaster`` when MAIL FROM is empty), with pyspf;
- every DKIM signature (at most :data:`MAX_SIGNATURES`), with dkimpy;
- DMARC for the From domain (:mod:`policyd.forwarding.dmarc`);
- an incoming ARC chain, when the message carries one.

The results go into an ``Authentication-Results`` header added on top of
the message, and into the ARC-Authentication-Results of the seal
(:mod:`policyd.forwarding.sealing`).  pyspf and dkimpy are synchronous:
:class:`Authenticator` runs them in the milter's thread pool, their DNS
going through twisted.names and a cache (:mod:`policyd.forwarding.lookups`),
all of one message within one deadline; a message whose checks are late
gets ``temperror`` results and flows on.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable, Sequence
from email.utils import getaddresses
from typing import Any

import attrs
import authres  # type: ignore[import-untyped]  # authres ships no type hints
import dkim  # type: ignore[import-untyped]  # dkimpy ships no type hints
import spf  # type: ignore[import-untyped]  # pyspf ships no type hints
from authres.arc import ARCAuthenticationResult  # type: ignore[import-untyped]
from authres.dmarc import DMARCAuthenticationResult  # type: ignore[import-untyped]
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from policyd.forwarding import dmarc as dmarc_
from policyd.forwarding.arc import chain_status, message_bytes
from policyd.forwarding.lookups import (
    Answer,
    Deadline,
    DnsTempError,
    Known,
    Lookup,
    txt_lookup,
    with_known,
)
from policyd.protocols.milter import ACCEPT, REJECT, Verdict, change_header, insert_header
from policyd.protocols.milter_message import MilterMessage
from policyd.reactor import RunBlocking

log = logging.getLogger("policyd.forwarding")

#: The header this module writes.
HEADER = "Authentication-Results"

#: DKIM signatures checked per message, at most: each costs a key look-up and
#: a hash of the body; real mail carries one to three.  Further ones are not reported.
MAX_SIGNATURES = 10

#: Incoming Authentication-Results claiming our authserv-id removed from one
#: message, at most (each is a search of the header block by the MTA); a
#: message with more is refused, as one with too many X-Spam-* copies is.
MAX_CLAIMED = 100

#: The reply to a message with more than :data:`MAX_CLAIMED` such headers.
TOO_MANY_CLAIMS = "554 5.6.0 Too many Authentication-Results header fields to be checked"

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")

# The authserv-id of an Authentication-Results value: after optional comments, up to ";", space or "(".
_AUTHSERV = re.compile(r"^\s*(?:\([^)]*\)\s*)*\"?([^\s;(\"]*)")


# What may stand unquoted in a result's property: a value from the sender
# (MAIL FROM, d=, s=) with anything else is left out, so it can never add a
# clause of its own ("x@y; dkim=pass") to the header.
_ADDRESS_VALUE = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~@-]{1,254}")
_NAME_VALUE = re.compile(r"[A-Za-z0-9._-]{1,253}")


def _safe(value: str, pattern: re.Pattern[str] = _NAME_VALUE) -> str | None:
    """``value`` when it is safe to write as a property value, else None (left out)."""
    return value if value and pattern.fullmatch(value) else None


def valid_authserv_id(value: str) -> bool:
    """Whether ``value`` is a host name usable as our authserv-id (letters, digits, hyphens, dots)."""
    return bool(_HOSTNAME.match(value.lower().rstrip(".")))


def default_authserv_id() -> str:
    """This host's fully qualified name, lower case: the authserv-id when ``forwarding.authserv_id`` is unset."""
    name = socket.getfqdn().lower().rstrip(".")
    return name if valid_authserv_id(name) else "localhost"


def authserv_id_of(value: str) -> str:
    """The authserv-id an Authentication-Results value claims, lower case ("" when there is none)."""
    found = _AUTHSERV.match(value.replace("\r", " ").replace("\n", " "))
    return found.group(1).lower().rstrip(".") if found else ""


def _bare(address: str) -> str:
    address = address.strip()
    return address[1:-1].strip() if address.startswith("<") and address.endswith(">") else address


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""


def from_domain(headers: Sequence[tuple[str, str]]) -> str:
    """The RFC5322.From domain: "" unless there is exactly one From field with exactly one address."""
    values = [value for name, value in headers if name.lower() == "from"]
    if len(values) != 1:
        return ""
    addresses = [address for _, address in getaddresses([values[0]]) if address]
    return _domain(addresses[0]) if len(addresses) == 1 else ""


# --- results ------------------------------------------------------------------------


@attrs.frozen
class SpfResult:
    """One SPF check: ``scope`` ``mailfrom`` or ``helo``, the ``identity`` checked, its ``domain``."""

    result: str
    scope: str
    identity: str
    domain: str

    def clause(self) -> Any:
        """The RFC 8601 result (authres)."""
        if self.scope == "helo":
            return authres.SPFAuthenticationResult(result=self.result, smtp_helo=_safe(self.identity))
        identity = _safe(self.identity, _ADDRESS_VALUE) or _safe(self.domain)
        return authres.SPFAuthenticationResult(result=self.result, smtp_mailfrom=identity)


@attrs.frozen
class DkimResult:
    """One DKIM signature: its result, ``d=``, ``s=``, ``a=``, why (for the comment) and the fields it signs."""

    result: str
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    reason: str = ""
    signed: tuple[str, ...] = ()

    def clause(self) -> Any:
        """The RFC 8601 result (authres)."""
        return authres.DKIMAuthenticationResult(
            result=self.result,
            result_comment=self.reason or None,
            header_d=_safe(self.domain),
            header_s=_safe(self.selector),
            header_a=_safe(self.algorithm),
        )


@attrs.frozen
class Results:
    """What was found on arrival.

    :ivar spf: the MAIL FROM check, then the HELO check (when the HELO name is a domain).
    :ivar dkim: one per signature, in header order (none: no signature).
    :ivar dmarc: the DMARC result.
    :ivar arc: the incoming ARC chain: ``none``, ``pass`` or ``fail``; "" when not checked.
    """

    spf: tuple[SpfResult, ...]
    dkim: tuple[DkimResult, ...]
    dmarc: dmarc_.Dmarc
    arc: str = ""

    def clauses(self) -> list[Any]:
        """The SPF, DKIM and DMARC results (authres objects), in that order; ``dkim=none`` without signatures."""
        found: list[Any] = [s.clause() for s in self.spf]
        found += [d.clause() for d in self.dkim] or [authres.DKIMAuthenticationResult(result="none")]
        d = self.dmarc
        found.append(DMARCAuthenticationResult(
            result=d.result, result_comment=d.reason or None, header_from=_safe(d.header_from),
            policy=d.policy or None,
        ))
        return found

    def texts(self) -> list[str]:
        """The results as RFC 8601 writes them (``spf=pass smtp.mailfrom=a@example.net``), for the ARC set."""
        return [str(clause) for clause in self.clauses()]

    def header_value(self, authserv_id: str) -> str:
        """The value of our Authentication-Results header (the incoming ARC chain's result first, when there is one)."""
        results = self.clauses()
        if self.arc in ("pass", "fail"):
            results.insert(0, ARCAuthenticationResult(result=self.arc))
        return str(authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results).header_value())

    @property
    def signs_authentication_results(self) -> bool:
        """Whether a DKIM signature that passed covers Authentication-Results fields (removing one would break it)."""
        return any(d.result == "pass" and HEADER.lower() in d.signed for d in self.dkim)

    @property
    def spf_for_dmarc(self) -> tuple[str, str]:
        """(result, domain) of the SPF identity DMARC aligns: MAIL FROM's (the HELO name's for an empty one)."""
        for result in self.spf:
            if result.scope == "mailfrom":
                return result.result, result.domain
        return "none", ""


@attrs.frozen
class Arrival:
    """What the checks need of a message, copied off the milter connection for the thread pool."""

    client_address: str
    helo: str
    sender: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    complete: bool

    @classmethod
    def of(cls, message: MilterMessage) -> Arrival:
        """The arrival of a message received by the milter."""
        address = message.client_address
        if address[:5].lower() == "ipv6:":
            address = address[5:]
        return cls(
            client_address=address,
            helo=message.helo,
            sender=_bare(message.sender),
            headers=tuple(message.headers),
            body=message.body(),
            complete=message.complete,
        )


# --- SPF ----------------------------------------------------------------------------


class _SpfQuery(spf.query):
    """pyspf's evaluation, its DNS asked through a :data:`~policyd.forwarding.lookups.Lookup`."""

    def __init__(self, lookup: Lookup, client: str, sender: str, helo: str, receiver: str) -> None:
        super().__init__(i=client, s=sender, h=helo, receiver=receiver, strict=True)
        self._lookup = lookup

    def dns(self, name: Any, qtype: str, cnames: Any = None, ignore_void: bool = False) -> Answer:
        """The records pyspf asks for (its own resolver code is never used)."""
        text = str(name).rstrip(".").lower()
        if not text or not all(0 < len(label) < 64 for label in text.split(".")):
            return []
        if qtype == "SPF":  # type 99 is obsolete (RFC 7208 section 3.1)
            return []
        try:
            values = self._lookup(text, qtype)
        except DnsTempError as failure:
            raise spf.TempError(f"DNS {failure}") from None
        if not values and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return values


def _spf(lookup: Lookup, client: str, sender: str, helo: str, receiver: str) -> str:
    try:
        result = _SpfQuery(lookup, client, sender, helo, receiver).check()[0]
    except Exception as failure:  # a library fault is an error result, never a crash
        log.info("SPF: check of %s failed: %s", sender or helo, failure)
        return "permerror"
    return str(result)


def check_spf(client: str, sender: str, helo: str, lookup: Lookup, receiver: str = "unknown") -> tuple[SpfResult, ...]:
    """SPF of the client address for MAIL FROM and for the HELO name (RFC 7208 section 2.3)."""
    helo_name = helo.strip().rstrip(".").lower()
    helo_domain = helo_name if "." in helo_name and valid_authserv_id(helo_name) else ""
    if not client:
        return (SpfResult("none", "mailfrom", sender, _domain(sender)),)
    helo_result = _spf(lookup, client, "", helo_domain, receiver) if helo_domain else "none"
    if sender:
        found = SpfResult(_spf(lookup, client, sender, helo_domain, receiver), "mailfrom", sender, _domain(sender))
    else:
        # An empty MAIL FROM: the HELO identity stands for it (postmaster@HELO).
        identity = f"postmaster@{helo_domain}" if helo_domain else ""
        found = SpfResult(helo_result, "mailfrom", identity, helo_domain)
    if not helo_domain:
        return (found,)
    return found, SpfResult(helo_result, "helo", helo_domain, helo_domain)


# --- DKIM ---------------------------------------------------------------------------


class _Quiet:
    """dkimpy's logger: its error lines (a missing key, a bad signature) are results here, logged at debug only."""

    def _say(self, message: Any, *args: Any, **kwargs: Any) -> None:
        log.debug("dkim: " + str(message), *args)

    debug = info = warning = error = exception = _say


def _tags(value: str) -> dict[str, str]:
    """The tags of a DKIM-Signature value ({} when it does not parse)."""
    from dkim.util import parse_tag_value  # type: ignore[import-untyped]

    try:
        parsed = parse_tag_value(value.encode("utf-8", "surrogateescape"))
    except Exception:
        return {}
    return {k.decode("ascii", "replace").lower(): v.decode("utf-8", "replace") for k, v in parsed.items()}


def check_dkim(headers: Sequence[tuple[str, str]], message: bytes, complete: bool, lookup: Lookup) -> tuple[DkimResult, ...]:
    """Every DKIM signature of the message (the first :data:`MAX_SIGNATURES`), each with its result.

    ``temperror``: the key's look-up got no answer; ``permerror``: no key
    published, a key or signature that cannot be used; ``fail``: the
    signature does not match; ``policy``: the body was too large to be kept
    whole, so it could not be checked.
    """
    values = [value for name, value in headers if name.lower() == "dkim-signature"][:MAX_SIGNATURES]
    if not values:
        return ()
    verifier = dkim.DKIM(message, logger=_Quiet(), minkey=1024)
    found = []
    for index, value in enumerate(values):
        tags = _tags(value)
        signed = tuple(name.strip().lower() for name in re.sub(r"\s+", "", tags.get("h", "")).split(":") if name)
        known = {"domain": tags.get("d", "").lower(), "selector": tags.get("s", ""), "algorithm": tags.get("a", "")}
        if not complete:
            found.append(DkimResult("policy", reason="message too large to check", signed=signed, **known))
            continue
        found.append(_verify(verifier, index, lookup, signed, known))
    return tuple(found)


def _verify(verifier: Any, index: int, lookup: Lookup, signed: tuple[str, ...], known: dict[str, str]) -> DkimResult:
    """One signature's result."""
    key: dict[str, Any] = {}
    dnsfunc = txt_lookup(lookup)

    def keyfunc(name: bytes | str, timeout: float = 5.0) -> bytes | None:
        try:
            record = dnsfunc(name, timeout)
        except dkim.DnsTimeoutError:
            key["temporary"] = True
            raise
        key["record"] = record
        return record

    try:
        passed = verifier.verify(idx=index, dnsfunc=keyfunc)
    except dkim.ValidationError as failure:
        if "body hash" in str(failure):
            return DkimResult("fail", reason="body hash mismatch", signed=signed, **known)
        return DkimResult("permerror", reason=_short(failure), signed=signed, **known)
    except dkim.DKIMException as failure:
        return DkimResult("permerror", reason=_short(failure), signed=signed, **known)
    except Exception as failure:  # a library fault is an error result, never a crash
        log.info("DKIM: signature %d could not be checked: %s", index + 1, failure)
        return DkimResult("permerror", reason="signature could not be checked", signed=signed, **known)
    if passed:
        return DkimResult("pass", signed=signed, **known)
    if key.get("temporary"):
        return DkimResult("temperror", reason="key look-up failed", signed=signed, **known)
    if "record" in key and not key["record"]:
        return DkimResult("permerror", reason="no key", signed=signed, **known)
    if "record" in key:
        try:
            dkim.evaluate_pk(b"key", key["record"])
        except Exception:
            return DkimResult("permerror", reason="bad key", signed=signed, **known)
    return DkimResult("fail", reason="bad signature", signed=signed, **known)


def _short(failure: Exception) -> str:
    """An exception's text fit for a result comment: printable, no parentheses, at most 60 characters."""
    return re.sub(r"[^\x20-\x7e]|[()]", "", str(failure))[:60] or type(failure).__name__


# --- the whole check ----------------------------------------------------------------


def authenticate(arrival: Arrival, lookup: Lookup, receiver: str = "unknown") -> Results:
    """SPF, DKIM, DMARC and the incoming ARC chain of one message (blocking: run it in a thread)."""
    spf_results = check_spf(arrival.client_address, arrival.sender, arrival.helo, lookup, receiver)
    message = message_bytes(arrival.headers, arrival.body)
    dkim_results = check_dkim(arrival.headers, message, arrival.complete, lookup)
    first = Results(spf_results, dkim_results, dmarc_.Dmarc("none"))
    found = dmarc_.evaluate(
        from_domain(arrival.headers), first.spf_for_dmarc, [(d.result, d.domain) for d in dkim_results], lookup
    )
    arc = chain_status(message, txt_lookup(lookup)) if arrival.complete else ""
    return Results(spf_results, dkim_results, found, arc)


def names_to_ask(arrival: Arrival) -> list[tuple[str, str]]:
    """The (name, kind) look-ups every check of this message starts with: the SPF records of MAIL FROM
    and HELO, the DMARC record of the From domain, the key of each DKIM signature."""
    names = []
    helo = arrival.helo.strip().rstrip(".").lower()
    if arrival.client_address:
        for domain in (_domain(arrival.sender), helo if "." in helo else ""):
            if _safe(domain):
                names.append((domain, "TXT"))
    domain = from_domain(arrival.headers)
    if _safe(domain):
        names.append((f"_dmarc.{domain}", "TXT"))
    for value in [v for n, v in arrival.headers if n.lower() == "dkim-signature"][:MAX_SIGNATURES]:
        tags = _tags(value)
        d, s = tags.get("d", "").lower(), tags.get("s", "")
        if _safe(d) and _safe(s):
            names.append((f"{s}._domainkey.{d}", "TXT"))
    return list(dict.fromkeys(names))


def unchecked(arrival: Arrival) -> Results:
    """The results of a message whose checks did not finish in time: every one ``temperror``."""
    spf_results = [SpfResult("temperror", "mailfrom", arrival.sender, _domain(arrival.sender))]
    helo = arrival.helo.strip().rstrip(".").lower()
    if "." in helo and valid_authserv_id(helo):
        spf_results.append(SpfResult("temperror", "helo", helo, helo))
    signatures = [_tags(v) for n, v in arrival.headers if n.lower() == "dkim-signature"][:MAX_SIGNATURES]
    dkim_results = tuple(
        DkimResult("temperror", t.get("d", "").lower(), t.get("s", ""), t.get("a", ""), "not checked in time")
        for t in signatures
    )
    domain = from_domain(arrival.headers)
    found = dmarc_.Dmarc("temperror", domain, reason="not checked in time") if domain else dmarc_.Dmarc(
        "permerror", reason="no single From domain")
    return Results(tuple(spf_results), dkim_results, found, "")


class Authenticator:
    """The milter's checks on arrival, and the Authentication-Results header they give.

    :param authserv_id: who checks: the first word of our header (a host name, lower case).
    :param lookups: a message's :data:`~policyd.forwarding.lookups.Lookup` from its deadline
        (:meth:`policyd.forwarding.lookups.BlockingDns.bound` in the milter).
    :param run_blocking: where the checks run (the thread pool in the milter).
    :param clock: for the deadline.
    :param deadline: seconds the checks of one message may take (``dns.deadline``).
    :param prefetch: asks the names every message needs at once before the checks
        start (:meth:`policyd.forwarding.lookups.BlockingDns.prefetch`); None: the
        checks ask for each in turn.
    """

    def __init__(
        self,
        authserv_id: str,
        lookups: Callable[[Deadline], Lookup],
        run_blocking: RunBlocking,
        clock: IReactorTime,
        deadline: float,
        prefetch: Callable[[Sequence[tuple[str, str]], Deadline], Deferred[Known]] | None = None,
    ) -> None:
        self.prefetch = prefetch
        self.authserv_id = authserv_id.lower().rstrip(".")
        self.lookups = lookups
        self.run_blocking = run_blocking
        self.clock = clock
        self.deadline = deadline

    def check(self, message: MilterMessage) -> Deferred[Results]:
        """The message's results; never fails: late or failing checks give :func:`unchecked` results."""
        arrival = Arrival.of(message)
        # The look-ups stop a little before the deadline, so what was found in time is reported.
        margin = min(0.5, self.deadline / 4)
        deadline = Deadline(self.deadline - margin)
        lookup = self.lookups(deadline)
        done: Deferred[Results]
        if self.prefetch is None:
            done = self.run_blocking(authenticate, arrival, lookup, self.authserv_id)
        else:
            done = self.prefetch(names_to_ask(arrival), deadline).addCallback(
                lambda known: self.run_blocking(authenticate, arrival, with_known(lookup, known), self.authserv_id)
            )
        done.addTimeout(self.deadline, self.clock)

        def late(failure: Any) -> Results:
            why = "late" if failure.check(defer.TimeoutError) else f"failed ({failure.getErrorMessage()})"
            log.warning("milter %s: authentication checks %s: results temperror", message.queue_id or "-", why)
            return unchecked(arrival)

        return done.addErrback(late)

    def stamp(self, verdict: Verdict, message: MilterMessage, results: Results) -> Verdict:
        """The verdict with our Authentication-Results on top, incoming ones claiming our authserv-id removed.

        An incoming header claiming our authserv-id is a forgery (RFC 8601
        section 5) and is removed, except when a DKIM signature that passed
        covers Authentication-Results fields: removing one would break the
        sender's signature (forwarded mail must keep it).  Such headers
        stay below ours, which is the topmost.
        """
        if verdict.reply != ACCEPT:
            return verdict
        changes = []
        if not results.signs_authentication_results:
            claimed = [
                index
                for index, (_, value) in enumerate(
                    [(n, v) for n, v in message.headers if n.lower() == HEADER.lower()], 1
                )
                if authserv_id_of(value) == self.authserv_id
            ]
            if len(claimed) > MAX_CLAIMED:
                log.warning("milter %s: %d Authentication-Results claiming %s: refused",
                            message.queue_id or "-", len(claimed), self.authserv_id)
                return Verdict((), REJECT, TOO_MANY_CLAIMS)
            # From the last to the first, so each index still means what it meant.
            changes += [change_header(HEADER, "", index) for index in reversed(claimed)]
        changes.append(insert_header(HEADER, results.header_value(self.authserv_id)))
        return Verdict(tuple(verdict.modifications) + tuple(changes), verdict.reply, verdict.smtp_reply)


def authenticator(config: Any, reactor: Any, run_blocking: RunBlocking) -> Authenticator | None:
    """The milter's :class:`Authenticator` for the configuration (None when the checks are off).

    On with ``forwarding.authenticate: true``; unset, on exactly when
    ``forwarding.arc`` is set (its ARC-Authentication-Results carry the results).
    """
    from policyd.checks.resolver import make_resolver
    from policyd.forwarding.lookups import BlockingDns, DnsCache

    if not authentication_on(config):
        return None
    dns = config.dns
    resolver = make_resolver(dns.nameservers, reactor, float(dns.timeout))
    cache = DnsCache(resolver, reactor, dns.cache_size, float(dns.cache_ttl))
    blocking = BlockingDns(cache, reactor, float(dns.timeout))
    return Authenticator(
        authserv_id(config), blocking.bound, run_blocking, reactor, float(dns.deadline), prefetch=blocking.prefetch
    )


def authentication_on(config: Any) -> bool:
    """Whether the checks on arrival run: ``forwarding.authenticate``, or unset, whether ``forwarding.arc`` is set."""
    chosen = config.forwarding.authenticate
    return bool(chosen) if chosen is not None else config.forwarding.arc is not None


def authserv_id(config: Any) -> str:
    """Our authserv-id: ``forwarding.authserv_id``, else this host's name."""
    chosen = config.forwarding.authserv_id
    return str(chosen).lower().rstrip(".") if chosen else default_authserv_id()
