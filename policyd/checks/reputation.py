"""Inbound network reputation: points for the client's address and names (SPEC 5).

A client's score is the sum of

- DNSBL/DNSWL zones (``inbound.dnsbl``), postscreen style: one look-up per
  zone, and each entry (zone, optional return-code filter, weight) adds its
  weight once, however many of the zone's A records match it;
- local network lists (``inbound.networks``), CIDR files re-read on SIGHUP
  and when they change on disk;
- heuristics (``inbound.heuristics``): no reverse DNS, reverse DNS not
  forward-confirmed, HELO a bare IP or address literal, HELO not a fully
  qualified name, HELO one of our names; each 0 points unless configured.

Allowlists win over everything: a client in an ``allow: true`` network list
or whose forward-confirmed name matches ``inbound.allow_names`` gets DUNNO
without any look-up.  Otherwise, at RCPT:

- score >= ``inbound.reject_at``: ``REJECT 5.7.1`` naming the lists;
- score >= ``inbound.tag_at``: ``PREPEND X-Policyd-Network: ...`` at the first
  RCPT of each message (``instance``) only;
- else DUNNO.

The header carries a token, an HMAC over its fields with a per-install
secret, so the milter can tell the copy Postfix added from one the sender
wrote: see :func:`sign_header` and :func:`verify_header`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.python.failure import Failure

from policyd.checks import ON_ERROR, Verdict
from policyd.checks.dnsbl import DnsblClient, ReverseDns, Status, ZoneAnswer
from policyd.checks.names import NamePatterns, helo_findings
from policyd.checks.network_header import (
    HEADER,
    header_secret_path,
    load_header_secret,
    points_text,
    safe_reason,
    sign_header,
)
from policyd.checks.networks import WatchedNetworks
from policyd.checks.resolver import make_resolver, within
from policyd.config import Config, Dns, read_domain_list
from policyd.netlists import (
    IPAddress,
    NetworkSet,
    parse_address,
    parse_code_filter,
)
from policyd.protocols.policy import DUNNO, Action, Request
from policyd.statefiles import process_secret
from policyd.texts import Texts

if TYPE_CHECKING:
    from policyd.metrics import Metrics

log = logging.getLogger("policyd.reputation")

#: How long the instances already tagged are remembered: far longer than one
#: SMTP transaction (Postfix's smtpd_timeout is 300s per command).
TAG_MEMORY = 3600.0

#: Instances remembered at most; beyond it the oldest are forgotten, so
#: memory stays bounded whatever the traffic (about 100 bytes each).
TAG_MEMORY_SIZE = 100_000



@attrs.frozen
class Points:
    """One source's contribution to a score.

    :ivar source: the zone, the network file's name, or the heuristic.
    :ivar kind: ``dnsbl``, ``dnswl``, ``network``, ``heuristic`` or ``allowlist``.
    :ivar points: what it adds (0 for a source that only explains).
    :ivar detail: what was found (codes, network, name), for people.
    """

    source: str
    kind: str
    points: float
    detail: str

    def as_dict(self) -> dict[str, Any]:
        """For ``--json``."""
        return {"source": self.source, "kind": self.kind, "points": self.points, "detail": self.detail}


@attrs.frozen
class Assessment:
    """Everything known about one client's reputation.

    :ivar address: the client address.
    :ivar sources: every zone, list and heuristic looked at, with its points.
    :ivar allowed_by: the allowlist that matched, if any (score is then 0).
    :ivar dns_failed: zones were configured and none of them answered.
    """

    address: IPAddress
    sources: tuple[Points, ...] = ()
    allowed_by: str | None = None
    dns_failed: bool = False

    @property
    def score(self) -> float:
        """The total of points (0 for an allowlisted client)."""
        if self.allowed_by is not None:
            return 0.0
        return float(sum(p.points for p in self.sources))

    @property
    def reasons(self) -> list[str]:
        """Sources that add points, largest first, each once."""
        scoring = sorted((p for p in self.sources if p.points), key=lambda p: -p.points)
        return list(dict.fromkeys(safe_reason(p.source) for p in scoring))

    def summary(self) -> str:
        """``score=12 (zen.spamhaus.org=10, no_reverse_dns=2)`` for the log."""
        parts = ", ".join(f"{p.source}={points_text(p.points)}" for p in self.sources if p.points)
        return f"score={points_text(self.score)}" + (f" ({parts})" if parts else "")


# --- the header and its token --------------------------------------------------


class TaggedInstances:
    """Remembers which messages (Postfix ``instance``) already got the header.

    Bounded in time (:data:`TAG_MEMORY`) and size (:data:`TAG_MEMORY_SIZE`).
    """

    def __init__(self, clock: IReactorTime, ttl: float = TAG_MEMORY, size: int = TAG_MEMORY_SIZE) -> None:
        self.clock = clock
        self.ttl = ttl
        self.size = size
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def first(self, instance: str) -> bool:
        """True the first time an instance is seen (which is then remembered)."""
        now = self.clock.seconds()
        seen = self._seen
        while seen:
            oldest, expires = next(iter(seen.items()))
            if expires > now and len(seen) < self.size:
                break
            del seen[oldest]
        known = seen.get(instance)
        if known is not None and known > now:
            return False
        seen[instance] = now + self.ttl
        seen.move_to_end(instance)
        return True


# --- names ---------------------------------------------------------------------------


@attrs.frozen
class _Entry:
    """One ``inbound.dnsbl`` entry, its filter parsed."""

    zone: str
    weight: float
    codes: list[set[int]] | None

    def accepts(self, code: str) -> bool:
        """Whether a return code passes this entry's filter."""
        if self.codes is None:
            return True
        try:
            octets = [int(x) for x in code.split(".")]
        except ValueError:
            return False
        return len(octets) == 4 and all(o in allowed for o, allowed in zip(octets, self.codes, strict=True))


class NetworkReputation:
    """Scores unauthenticated clients from DNS lists, local lists and heuristics.

    :param config: the configuration in force; :meth:`configure` replaces it.
    :param clock: the reactor (which also carries the DNS queries), or a fake
        clock in tests together with ``resolver``.
    :param resolver: an ``IResolver`` to use instead of ``dns.nameservers``.
    :param metrics: the server's Prometheus metrics (DNS problems by zone); None keeps none.
    """

    name = "reputation"

    def __init__(
        self, config: Config, clock: IReactorTime, resolver: IResolver | None = None, metrics: Metrics | None = None
    ) -> None:
        self.clock = clock
        self._resolver = resolver
        self.tagged = TaggedInstances(clock)
        self.lists: list[WatchedNetworks] = []
        self.metrics = metrics
        self.dns: DnsblClient | None = None
        self._dns_config: Dns | None = None
        self._secret: bytes | None = None
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Apply a (re)loaded configuration and re-read the network lists.

        :raises ConfigError: when a network list holds a line that is not a
            network (a reload is then refused and the old lists kept).
        """
        inbound = config.inbound
        before = {str(w.path): w for w in self.lists}
        lists = [WatchedNetworks(e, self.clock, before.get(str(Path(e.file)))) for e in inbound.networks]
        zones: dict[str, list[_Entry]] = {}
        for item in inbound.dnsbl:
            zone = item.zone.strip(".").lower()
            codes = parse_code_filter(item.codes) if item.codes else None
            zones.setdefault(zone, []).append(_Entry(zone, item.weight, codes))
        texts = Texts(config.language, config.templates)
        texts.template("network_rejected")
        ours = NamePatterns([*inbound.our_names, *read_domain_list(config.local_domains, config.source)])
        # Everything is built: apply it at once.
        self.config = config
        self.lists = lists
        self.zones = zones
        self.texts = texts
        self.ours = ours
        self.allow_names = NamePatterns(inbound.allow_names)
        self.heuristics = inbound.heuristics
        self.trusted = NetworkSet(config.trusted_networks)
        self.tag_at = inbound.tag_at
        self.reject_at = inbound.reject_at
        self.deadline = float(config.dns.deadline)
        self.on_error = ON_ERROR[config.store.on_error]
        self.secret_path = header_secret_path(config)
        self._secret = None
        if self.dns is None or config.dns != self._dns_config:
            self.dns = self._dns_client(config.dns)
            self._dns_config = config.dns

    def _dns_client(self, settings: Dns) -> DnsblClient:
        timeout = float(settings.timeout)
        servers = max(len(settings.nameservers), 1)
        resolver = self._resolver
        if resolver is None:
            resolver = make_resolver(settings.nameservers, self.clock, timeout / servers)
        client = DnsblClient(
            resolver,
            self.clock,
            timeout=timeout,
            cache_ttl=float(settings.cache_ttl),
            cache_size=settings.cache_size,
            breaker_failures=settings.breaker_failures,
            breaker_cooldown=float(settings.breaker_cooldown),
            per_server_timeout=timeout / servers,
        )
        client.on_problem = self._dns_problem
        return client

    def _dns_problem(self, zone: str, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.dns_errors.labels(zone, kind).inc()

    # --- deciding a request ------------------------------------------------

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        """Decide one request of an unauthenticated client; never fails.

        Only RCPT is decided; every other stage gets DUNNO (the header is
        never added at END-OF-MESSAGE, where Postfix cannot add it).  A
        client whose zone answers are all cached is decided at once, without
        a Deferred; the others once their look-ups are answered.
        """
        state = request.get("protocol_state").upper()
        client = request.get("client_address")
        if state != "RCPT":
            return Verdict(DUNNO, self.name, client or "-", f"not decided at {state or '?'}")
        try:
            decided = self._decide(request)
        except Exception:
            return self._failed(Failure(), client)
        if isinstance(decided, Deferred):
            return decided.addErrback(self._failed, client)
        return decided

    def _decide(self, request: Request) -> Verdict | Deferred[Verdict]:
        client = request.get("client_address")
        address = parse_address(client)
        if address is None:
            return Verdict(DUNNO, self.name, client or "-", "no usable client address")
        if address in self.trusted:
            return Verdict(DUNNO, self.name, str(address), "trusted network")
        assessed = self._assess(
            address,
            helo=request.get("helo_name"),
            client_name=request.get("client_name", None),
            reverse_name=request.get("reverse_client_name", None),
            server_address=request.get("server_address"),
        )
        instance = request.get("instance")
        if isinstance(assessed, Deferred):
            return assessed.addCallback(self.verdict, instance)
        return self.verdict(assessed, instance)

    def _failed(self, failure: Failure, client: str) -> Verdict:
        log.error("reputation check of %s failed, mail flows: %s", client or "-", failure.getErrorMessage())
        return Verdict(DUNNO, self.name, client or "-", f"reputation check failed: {failure.getErrorMessage()}")

    def verdict(self, assessment: Assessment, instance: str = "") -> Verdict:
        """The reply for an assessment (at RCPT)."""
        subject = str(assessment.address)
        if assessment.allowed_by is not None:
            return Verdict(DUNNO, self.name, subject, f"allowlisted by {assessment.allowed_by}")
        score = assessment.score
        summary = assessment.summary()
        if score >= self.reject_at:
            return Verdict(self.refusal(assessment), self.name, subject, f"level 2: {summary}")
        if score >= self.tag_at:
            if instance and not self.tagged.first(instance):
                return Verdict(DUNNO, self.name, subject, f"level 1, message already tagged: {summary}")
            return Verdict(Action("PREPEND", self.header(assessment)), self.name, subject, f"level 1: {summary}")
        if assessment.dns_failed:
            failed = ", ".join(self.zones)
            return Verdict(self.on_error, self.name, subject, f"DNS unavailable ({failed}): {summary}")
        return Verdict(DUNNO, self.name, subject, summary)

    def decision(self, assessment: Assessment) -> Action:
        """The reply to the first RCPT of a message, the header shown unsigned (for people)."""
        if assessment.allowed_by is None and assessment.score >= self.reject_at:
            return self.refusal(assessment)
        if assessment.allowed_by is None and assessment.score >= self.tag_at:
            reasons = ",".join(assessment.reasons) or "-"
            return Action("PREPEND", f"{HEADER}: score={points_text(assessment.score)}; reasons={reasons}")
        if assessment.allowed_by is None and assessment.dns_failed:
            return self.on_error
        return DUNNO

    def refusal(self, assessment: Assessment) -> Action:
        """``REJECT 5.7.1`` naming what made the score."""
        positive = sorted((p for p in assessment.sources if p.points > 0), key=lambda p: -p.points)
        reasons = ", ".join(dict.fromkeys(p.source for p in positive)) or "score"
        text = self.texts.render(
            "network_rejected", client=assessment.address, reasons=reasons, score=points_text(assessment.score)
        )
        return Action("REJECT", f"5.7.1 {text}")

    def header(self, assessment: Assessment) -> str:
        """The ``X-Policyd-Network`` header line for a level-1 client, signed."""
        value = sign_header(
            assessment.score, assessment.reasons, str(assessment.address), self.clock.seconds(), self.secret()
        )
        return f"{HEADER}: {value}"

    def secret(self) -> bytes:
        """The header secret, read (or created) on first use."""
        if self._secret is None:
            path = self.secret_path
            if path is None:
                log.warning(
                    "store.url is memory:// and inbound.header_secret is not set: headers are signed "
                    "with a secret of this process only, which the milter cannot verify"
                )
                self._secret = process_secret()
            else:
                try:
                    self._secret = load_header_secret(path)
                except (OSError, ValueError) as problem:
                    log.error(
                        "header secret %s unusable (%s): signing with a secret of this process only, "
                        "which the milter cannot verify; set inbound.header_secret",
                        path,
                        problem,
                    )
                    self._secret = process_secret()
        return self._secret

    # --- scoring ------------------------------------------------------------

    def assess(
        self,
        address: IPAddress | str,
        helo: str | None = None,
        client_name: str | None = None,
        reverse_name: str | None = None,
        server_address: str = "",
    ) -> Deferred[Assessment]:
        """Score a client; every zone, list and heuristic is in the result.

        :param helo: the HELO name; None skips the HELO heuristics.
        :param client_name: Postfix's ``client_name`` (forward-confirmed, or
            ``unknown``); with ``reverse_name`` None too, reverse DNS is
            looked up here.
        :param reverse_name: Postfix's ``reverse_client_name`` (the PTR name,
            or ``unknown``).
        :param server_address: our address the client connected to.
        :raises ValueError: when ``address`` is not an IP address.
        """
        if isinstance(address, str):
            parsed = parse_address(address)
            if parsed is None:
                raise ValueError(f"{address!r} is not an IP address")
            address = parsed
        try:
            assessed = self._assess(address, helo, client_name, reverse_name, server_address)
        except Exception:
            return fail()
        return assessed if isinstance(assessed, Deferred) else succeed(assessed)

    def _assess(
        self,
        address: IPAddress,
        helo: str | None,
        client_name: str | None,
        reverse_name: str | None,
        server_address: str,
    ) -> Assessment | Deferred[Assessment]:
        """The assessment at once when it needs no look-up or every answer is cached; else later."""
        for watched in self.lists:
            watched.refresh()
        for watched in self.lists:
            if watched.allow and (network := watched.match(address)) is not None:
                found = Points(watched.name, "allowlist", 0.0, f"in {network}")
                return Assessment(address, (found,), allowed_by=watched.name)
        if client_name and client_name != "unknown" and (pattern := self.allow_names.match(client_name)):
            found = Points(client_name, "allowlist", 0.0, f"client name matches {pattern}")
            return Assessment(address, (found,), allowed_by=client_name)

        sources: list[Points] = []
        for watched in self.lists:
            if not watched.allow and (network := watched.match(address)) is not None:
                sources.append(Points(watched.name, "network", watched.weight, f"in {network}"))
        heuristics = self.heuristics
        if helo is not None:
            for key, detail in helo_findings(helo, self.ours, server_address):
                sources.append(Points(key, "heuristic", getattr(heuristics, key), detail))

        assert self.dns is not None
        look_up_names = client_name is None and reverse_name is None
        reverse_wanted = look_up_names and bool(
            heuristics.no_reverse_dns or heuristics.reverse_dns_mismatch or self.allow_names
        )
        if not reverse_wanted:
            cached = self.dns.cached_listings(address, self.zones)
            if cached is not None:
                return self._assessed(address, sources, cached, False, client_name, reverse_name)
        lookups: dict[str, Deferred[Any]] = {f"zone:{z}": self.dns.listing(address, z) for z in self.zones}
        if reverse_wanted:
            lookups["reverse-dns"] = self.dns.reverse_dns(address)
        answered = within(self.clock, self.deadline, lookups)
        return answered.addCallback(
            lambda results: self._assessed(address, sources, results, reverse_wanted, client_name, reverse_name)
        )

    def _assessed(
        self,
        address: IPAddress,
        sources: list[Points],
        results: dict[str, Any],
        reverse_wanted: bool,
        client_name: str | None,
        reverse_name: str | None,
    ) -> Assessment:
        """The assessment once the look-ups are answered (or the deadline passed)."""
        if client_name is None and reverse_name is None:  # Postfix did not say: our own look-ups
            reverse: ReverseDns = results.get(
                "reverse-dns", ReverseDns("unknown", detail="no answer within dns.deadline")
            )
            if reverse_wanted:
                if reverse.verified and (pattern := self.allow_names.match(reverse.verified)):
                    found = Points(reverse.verified, "allowlist", 0.0, f"client name matches {pattern}")
                    return Assessment(address, (found,), allowed_by=reverse.verified)
                sources.extend(self._reverse_points(reverse))
        else:
            sources.extend(self._postfix_name_points(client_name, reverse_name))

        answered = 0
        for zone, entries in self.zones.items():
            answer: ZoneAnswer = results.get(
                f"zone:{zone}", ZoneAnswer(zone, Status.TIMEOUT, (), "no answer within dns.deadline")
            )
            answered += answer.status.answered
            sources.extend(_zone_points(answer, entries))
        return Assessment(address, tuple(sources), dns_failed=bool(self.zones) and not answered)

    def _postfix_name_points(self, client_name: str | None, reverse_name: str | None) -> list[Points]:
        """Reverse DNS heuristics from what Postfix found (``unknown`` when it failed)."""
        heuristics = self.heuristics
        if reverse_name is not None:
            if reverse_name == "unknown":
                return [Points("no_reverse_dns", "heuristic", heuristics.no_reverse_dns, "no PTR name")]
            if client_name == "unknown":
                detail = f"{reverse_name} does not resolve back to the client"
                return [Points("reverse_dns_mismatch", "heuristic", heuristics.reverse_dns_mismatch, detail)]
            return []
        if client_name == "unknown":
            return [Points("no_reverse_dns", "heuristic", heuristics.no_reverse_dns, "client name unknown")]
        return []

    def _reverse_points(self, reverse: ReverseDns) -> list[Points]:
        """Reverse DNS heuristics from our own look-ups (no Postfix attributes)."""
        heuristics = self.heuristics
        if reverse.status == "none":
            return [Points("no_reverse_dns", "heuristic", heuristics.no_reverse_dns, reverse.detail)]
        if reverse.status == "mismatch":
            detail = f"{', '.join(reverse.names)}: {reverse.detail}"
            return [Points("reverse_dns_mismatch", "heuristic", heuristics.reverse_dns_mismatch, detail)]
        if reverse.status == "unknown":
            return [Points("reverse_dns", "heuristic", 0.0, f"unknown: {reverse.detail}")]
        return [Points("reverse_dns", "heuristic", 0.0, f"{reverse.verified} (forward-confirmed)")]


def _zone_points(answer: ZoneAnswer, entries: list[_Entry]) -> list[Points]:
    """Each entry of a zone adds its weight once when one of the zone's codes matches it."""
    zone = answer.zone
    if answer.status is not Status.LISTED:
        detail = answer.status.value + (f": {answer.detail}" if answer.detail else "")
        return [Points(zone, "dnsbl", 0.0, detail)]
    points = []
    for entry in entries:
        matched = [code for code in answer.codes if entry.accepts(code)]
        if matched:
            kind = "dnswl" if entry.weight < 0 else "dnsbl"
            points.append(Points(zone, kind, entry.weight, "listed " + ",".join(matched)))
    if not points:
        detail = f"listed {','.join(answer.codes)}, no code counted by the filters"
        points.append(Points(zone, "dnsbl", 0.0, detail))
    return points

