"""The configuration's sections: typed, documented attrs classes, one per YAML section.

Every default says why it is what it is.
"""

from __future__ import annotations

import attrs

from policyd.addresses import domain_of
from policyd.config.values import (
    Duration,
    _at_least,
    _at_most,
    _base_url,
    _codes,
    _endpoint,
    _field,
    _hostport,
    _languages,
    _levels,
    _nameservers,
    _networks,
    _nonempty,
    _one_of,
    _store_url,
    _time_of_day,
    _time_text,
)

# --- sections ---------------------------------------------------------------


def _syslog_target(value: object) -> None:
    """``log.syslog``: true, false or the absolute path of a syslog socket."""
    if isinstance(value, str) and not value.startswith("/"):
        raise ValueError("must be true, false or the path of the syslog socket (/dev/log)")


@attrs.frozen
class Listen:
    """Where the servers listen (Twisted endpoint strings)."""

    policy: str = _field(
        "tcp:10040:interface=127.0.0.1",
        "Policy server; loopback by default so only the local Postfix reaches it.",
        _endpoint,
    )
    milter: str = _field(
        "tcp:10041:interface=127.0.0.1", "Content-scoring milter; loopback by default.", _endpoint
    )
    http: str | None = _field(
        None, "Metrics and admin API; off unless set, as it exposes admin actions.", _endpoint
    )
    milter_metrics: str | None = _field(
        None,
        "Prometheus metrics of the milter at /metrics (the milter has no other HTTP "
        "listener); off unless set. Nothing but the metrics is served: bind it to loopback "
        "or a private network.",
        _endpoint,
    )


@attrs.frozen
class Limits:
    """Bounds on what one policy client may send (SPEC 3)."""

    max_line: int = _field(8192, "Longest attribute line; Postfix lines are far shorter.", _at_least(64))
    max_attributes: int = _field(
        256, "Attributes per request; Postfix sends about 30.", _at_least(8)
    )
    max_request: int = _field(65536, "Bytes per request.", _at_least(1024))
    max_connections: int = _field(
        1000, "Connections at once; one per smtpd process, so far above Postfix's process limit.",
        _at_least(1),
    )
    idle_timeout: Duration = _field(
        Duration(600),
        "Idle connections are closed after this; longer than Postfix's own 300s "
        "smtpd_policy_service_max_idle so Postfix always closes first.",
        _at_least(1),
    )
    max_pending: int = _field(
        64, "Pipelined requests in flight per connection before reading pauses.", _at_least(1)
    )


@attrs.frozen
class Store:
    """Where state lives."""

    url: str = _field(
        "sqlite:////var/lib/policyd/state.db",
        "SQLite for one host; redis:// when several Postfix hosts share the quota.",
        _store_url,
    )
    on_error: str = _field(
        "dunno",
        "Reply when the store cannot answer in time: dunno keeps mail flowing "
        "(the in-process limiter still applies the quota), defer_if_permit holds it.",
        _one_of("dunno", "defer_if_permit"),
    )
    deadline: Duration = _field(
        Duration(0.5),
        "Longest wait for the store before replying per on_error; well under "
        "Postfix's policy time limit so Postfix never gives up first.",
        _at_least(0.001),
    )


@attrs.frozen
class Outbound:
    """Quota on what authenticated accounts send to external recipients (SPEC 4)."""

    limit: int = _field(5000, "External recipients per account per window.", _at_least(1))
    window: Duration = _field(Duration(3600), "Rolling window of the limit.", _at_least(1))
    block_for: Duration = _field(
        Duration(72 * 3600),
        "How long a block lasts unless an admin unblocks first; at most 72h.",
        _at_most(72 * 3600, "72h"),
    )
    overrides: dict[str, int] = _field(
        {}, "Per-account limits, keyed by account (lower case).", None
    )
    blocked_action: str = _field(
        "reject",
        "Reply while blocked: reject (5.7.1, the client sees it now) or defer (4.7.1).",
        _one_of("reject", "defer"),
    )
    give_back: bool = _field(
        False,
        "Give back recipients of transactions that never reached END-OF-MESSAGE; "
        "needs the policy check in smtpd_end_of_data_restrictions too.",
    )


@attrs.frozen
class DnsblZone:
    """One DNSBL/DNSWL zone and its weight (postscreen_dnsbl_sites style)."""

    zone: str = _field("", "DNS zone queried with the reversed client address.")
    weight: float = _field(1.0, "Points when listed; negative for allowlists.")
    codes: str | None = _field(None, "Return codes that count, e.g. 127.0.0.[2..11].", _codes)


@attrs.frozen
class NetworkList:
    """A local file of networks (one CIDR per line, ``#`` comments)."""

    file: str = _field("", "Path of the CIDR file.")
    weight: float = _field(0.0, "Points for a client in one of these networks.")
    allow: bool = _field(False, "An allowlist: its clients are never refused or tagged.")


@attrs.frozen
class Heuristics:
    """Points for suspicious client names; each 0 unless configured."""

    no_reverse_dns: float = _field(0.0, "Client address has no PTR record.")
    reverse_dns_mismatch: float = _field(0.0, "Forward-confirmed reverse DNS fails.")
    helo_bare_ip: float = _field(0.0, "HELO is an address literal or a bare IP.")
    helo_not_fqdn: float = _field(0.0, "HELO is not a fully qualified name.")
    helo_claims_us: float = _field(0.0, "HELO claims to be one of our names.")


@attrs.frozen
class Inbound:
    """Network reputation of unauthenticated clients (SPEC 5)."""

    tag_at: float = _field(5.0, "Score from which a header tags the message (level 1).")
    reject_at: float = _field(10.0, "Score from which the RCPT is refused (level 2).")
    dnsbl: list[DnsblZone] = _field([], "DNSBL and DNSWL zones.")
    networks: list[NetworkList] = _field([], "Local network lists.")
    heuristics: Heuristics = attrs.field(factory=Heuristics, metadata={"doc": "Heuristics."})
    allow_names: list[str] = _field([], "Client names (or .suffixes) never refused or tagged.")
    our_names: list[str] = _field([], "Names a foreign HELO must not claim.")
    header_secret: str | None = _field(
        None,
        "File of the secret that signs X-Policyd-Network headers, so the milter trusts "
        "only the copy Postfix added; created on first use (mode 0600). Default: "
        "header.secret beside the SQLite store, else /var/lib/policyd/header.secret.",
    )


@attrs.frozen
class Dns:
    """Resolvers for reputation look-ups."""

    nameservers: list[str] = _field(
        [], "host:port resolvers; empty means /etc/resolv.conf.", _nameservers
    )
    timeout: Duration = _field(Duration(2), "Per look-up timeout.", _at_least(0.01))
    deadline: Duration = _field(Duration(5), "All look-ups for one client.", _at_least(0.01))
    cache_ttl: Duration = _field(Duration(300), "Longest a result is cached.", _at_least(0))
    cache_size: int = _field(
        10000,
        "Client addresses (IPv6: /64 networks) whose answers are cached; beyond it the "
        "oldest are dropped, so a flood of new clients cannot grow memory.",
        _at_least(0),
    )
    breaker_failures: int = _field(
        5,
        "Consecutive timeouts or errors after which a zone is skipped (circuit breaker), "
        "so a dead list does not cost every client the full timeout.",
        _at_least(1),
    )
    breaker_cooldown: Duration = _field(
        Duration(60),
        "How long a failing zone is skipped before one trial look-up tests it again.",
        _at_least(0.01),
    )


@attrs.frozen
class Notify:
    """Who hears about blocks."""

    smtp: str = _field("127.0.0.1:25", "host:port of the relay that sends notifications.", _hostport)
    from_: str = _field("policyd@localhost", "Envelope and header sender.")
    starttls: bool = _field(False, "Require STARTTLS with the relay.")
    username: str | None = _field(None, "AUTH user, if the relay wants one.")
    password: str | None = _field(None, "AUTH password (keep the file mode 0640).")
    helpdesk: list[str] = _field([], "Service-desk addresses told of every block.")
    contacts: dict[str, str] = _field({}, "IT contact by account domain; 'default' for others.")
    notify_user: bool = _field(False, "Also tell the blocked user.")
    retry_first: Duration = _field(
        Duration(30), "Wait before retrying a notice the relay did not take; doubles each time.",
        _at_least(0.1),
    )
    retry_max: Duration = _field(Duration(3600), "Longest wait between retries.", _at_least(1))

    def recipients(self, account: str) -> tuple[str, ...]:
        """Who hears of a block of ``account``: the help desk, the IT contact of its
        domain (or ``default``), and the user when ``notify_user`` is set."""
        contacts = {k.lower(): v for k, v in self.contacts.items()}
        domain = domain_of(account) or ""
        contact = contacts.get(domain) or contacts.get("default")
        chosen = [*self.helpdesk, *([contact] if contact else [])]
        if self.notify_user and "@" in account:
            chosen.append(account)
        return tuple(dict.fromkeys(a.strip() for a in chosen if a.strip()))


def _report_addresses(value: object) -> None:
    """``content.report_spam`` and ``report_ham``: one address or a list of them, each local@domain."""
    for address in [value] if isinstance(value, str) else list(value):  # type: ignore[call-overload]
        local, at, domain = str(address).strip().rpartition("@")
        if not at or not local or not domain or any(c.isspace() for c in str(address).strip()):
            raise ValueError(f"{address!r} is not a mail address (local@domain)")


@attrs.frozen
class Content:
    """Content scoring by the milter (SPEC 6)."""

    tag_at: float = _field(
        5.0,
        "Score (network + content points) from which a message is spam: Subject tagged, "
        "X-Spam-* set, quarantine choices applied.  Content points are log2-odds: 5 is 32 to 1.",
    )
    tag: str = _field("*{spam}*", "Subject prefix of tagged mail.", _nonempty)
    model: str | None = _field(
        None,
        "Model file written by policyd train and read by the milter and policyd score; default "
        "content.model beside the SQLite store, else /var/lib/policyd/content.model.",
    )
    max_body: int = _field(
        1024 * 1024,
        "Bytes of a message scored (and kept in memory); a larger one is judged on its start, "
        "which says what it is.",
        _at_least(1024),
    )
    on_error: str = _field(
        "accept",
        "Milter reply when scoring fails: accept (mail flows unscored) or tempfail (the client retries).",
        _one_of("accept", "tempfail"),
    )
    learn_from_release: bool = _field(
        True,
        "Learn a message released from the quarantine (by an admin or its recipient) as ham "
        "onto the model in use, once per message: a release is a user saying the verdict was wrong.",
    )
    report_spam: str | list[str] = _field(
        [],
        "Address(es) to which local users forward missed spam as an attachment "
        "(e.g. spam-report@example.org): the milter learns the attached messages as spam and "
        "discards the report.  Only reports of SASL-authenticated senders count.  Default: none.",
        _report_addresses,
    )
    report_ham: str | list[str] = _field(
        [],
        "Address(es) to which local users forward wrongly tagged mail as an attachment "
        "(e.g. ham-report@example.org): learned as ham, the report discarded.  Default: none.",
        _report_addresses,
    )

    def report_addresses(self) -> dict[str, bool]:
        """Each report address (lower case) and whether what it receives is spam."""
        found = {a.strip().lower(): False for a in _listed(self.report_ham)}
        found.update({a.strip().lower(): True for a in _listed(self.report_spam)})
        return found


def _listed(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


@attrs.frozen
class Quarantine:
    """Where held mail waits."""

    default: str = _field("inbox", "Choice of recipients without one.", _one_of("inbox", "quarantine"))
    retention: Duration = _field(Duration(30 * 86400), "How long held mail is kept.", _at_least(60))
    smtp: str = _field("127.0.0.1:25", "host:port where released mail is re-injected.", _hostport)
    max_size: int = _field(
        32 * 1024 * 1024,
        "Largest message the milter keeps for the quarantine (beyond: on disk, never in memory); "
        "a larger spam is delivered tagged.  Above Postfix's 10 MB message_size_limit.",
        _at_least(1024),
    )
    preferences: str | None = _field(
        None,
        "Choices from provisioning: a file of 'address inbox|quarantine' lines (# comments, "
        "@domain for every address of a domain) or a Postfix table (hash:/etc/postfix/spam) "
        "read with postmap -q.  A choice made with policyd prefs set or on the preference "
        "page wins; addresses in neither get quarantine.default.  Re-read when it changes "
        "and on SIGHUP.",
    )
    digest_at: str | None = attrs.field(
        default=None,
        converter=_time_text,
        metadata={
            "doc": "Time of the daily quarantine digest, HH:MM in the server's time zone: one "
            "mail to each recipient with mail held since the last digest.  Unset: no digest.",
            "check": _time_of_day,
            # YAML 1.1 reads an unquoted 10:30 as the number 630 (base 60): take it too.
            "type": str | int | None,
        },
    )
    link_ttl: Duration = _field(
        Duration(7 * 86400),
        "How long the links of a digest (release, preference page) work: long enough for a "
        "week away, short enough that an old forwarded digest stops working.",
        _at_least(60),
    )
    base_url: str | None = _field(
        None,
        "The self-service pages' address as users reach them (a reverse proxy in front of "
        "listen.http), e.g. https://mail.example.org/policyd; digest links start with it.  "
        "Default: http:// on listen.http's address and port.",
        _base_url,
    )
    link_secret: str | None = _field(
        None,
        "File of the secret that signs digest links (HMAC-SHA-256); created on first use "
        "(mode 0600).  Hosts sharing one Redis need the same file.  Default: link.secret "
        "beside the SQLite store, else /var/lib/policyd/link.secret.",
    )
    digest_languages: list[str] | None = _field(
        None,
        "Languages of the digest, in order (en, fr): [fr, en] sends both in one mail.  "
        "Default: language.",
        _languages,
    )
    digest_max: int = _field(
        100,
        "Entries listed in one digest (newest first); the others are counted, so one wave "
        "of spam cannot make a mail of megabytes.",
        _at_least(1),
    )


@attrs.frozen
class Exemptions:
    """Bounds on bulk-send exemption requests."""

    max_window: Duration = _field(
        Duration(7 * 86400),
        "Longest window one exemption may cover: an occasion, not a standing permission.",
        _at_least(60),
    )
    max_limit: int = _field(100000, "Highest hourly limit an exemption may ask for.", _at_least(1))


@attrs.frozen
class Http:
    """The HTTP listener (``listen.http``): metrics, admin API, request form."""

    token_file: str | None = _field(
        None,
        "File holding the admin token (API Bearer token, admin page password); created "
        "with a random token on first start (mode 0600). Default: http.token beside the "
        "SQLite store, else /var/lib/policyd/http.token.",
    )
    user_header: str | None = _field(
        None,
        "Request header in which a reverse proxy that authenticates users names the user "
        "(e.g. X-Remote-User); trusted only on requests from this host (loopback or a local "
        "socket), so the proxy must run here and replace any value a client sends.  The "
        "exemption form then records requests as sent by that user, and the admin page its "
        "decisions.  Default: none; the form records who the requester claims to be.",
    )


@attrs.frozen
class Arc:
    """The key that seals forwarded mail with ARC (RFC 8617)."""

    domain: str = _field("", "Domain of the seal (d=): one of ours, where the key is published.", _nonempty)
    selector: str = _field("", "Selector (s=): the key is published at SELECTOR._domainkey.DOMAIN.", _nonempty)
    key: str = _field(
        "", "Path of the RSA private key in PEM (PKCS#1 or PKCS#8), made by policyd arc keygen.", _nonempty
    )


def _host_name(value: object) -> None:
    """``forwarding.authserv_id``: a host name (letters, digits, hyphens, dots)."""
    from policyd.forwarding.authentication import valid_authserv_id

    if not isinstance(value, str) or not valid_authserv_id(value):
        raise ValueError("must be a host name such as mx.example.org")


@attrs.frozen
class Forwarding:
    """Mail forwarded to outside addresses (aliases), so receivers keep trusting this service."""

    aliases: str | None = _field(
        None,
        "The aliases that forward: a file in virtual(5) format ('alias target, target' lines, "
        "# comments) or a Postfix table (hash:/etc/postfix/virtual) read with postmap -q; "
        "normally the same map as Postfix's virtual_alias_maps.  Unset: no recipient is "
        "treated as forwarding.",
    )
    spam: str = _field(
        "tag",
        "Level-1 mail for a forwarding recipient: tag forwards it tagged (the mail flows as "
        "for any recipient); hold never forwards it, holding it in the quarantine under the "
        "alias instead (receivers block servers that forward spam).",
        _one_of("tag", "hold"),
    )
    authenticate: bool | None = _field(
        None,
        "Check SPF, DKIM and DMARC of every message on arrival (no client exempt) and add an "
        "Authentication-Results header.  Unset: on exactly when arc is set (its "
        "ARC-Authentication-Results carry the results); off otherwise, as the checks cost DNS "
        "look-ups for every message (dns.nameservers, dns.timeout each, dns.deadline in all).",
    )
    authserv_id: str | None = _field(
        None,
        "Who checked: the first word of Authentication-Results (and of ARC-Authentication-"
        "Results), a host name; incoming headers claiming it are removed.  Unset: this host's "
        "fully qualified name.",
        _host_name,
    )
    arc: Arc | None = attrs.field(
        default=None,
        metadata={
            "doc": "Seal mail to forwarding recipients with ARC: {domain, selector, key}.  Unset: no seal.",
            "check": None,
            # Read as the mapping it must be, so an error inside it names its key.
            "type": Arc,
        },
    )


@attrs.frozen
class Log:
    """Logging."""

    level: str = _field("info", "debug, info, warning or error.", _one_of("debug", "info", "warning", "error"))
    format: str = _field("text", "text for people, json for journald and collectors.", _one_of("text", "json"))
    decisions: bool = _field(True, "One line per policy decision.")
    components: dict[str, str] = _field(
        {},
        "Level per component, overriding log.level: quota, reputation, dns, notify, "
        "protocol, milter, http, ... (the part after 'policyd.' in a line's logger name).",
        _levels,
    )
    syslog: bool | str = _field(
        False,
        "Also send every line to syslog, facility mail, so it lands in mail.log beside "
        "Postfix's: true for /dev/log, or the path of the syslog socket. Off by default: "
        "under systemd, journald already keeps stdout.",
        _syslog_target,
    )


@attrs.frozen
class Config:
    """The whole configuration."""

    listen: Listen = attrs.field(factory=Listen, metadata={"doc": "Listeners."})
    allowed_clients: list[str] = _field(
        ["127.0.0.0/8", "::1/128"], "Networks that may connect; loopback by default.", _networks
    )
    trusted_networks: list[str] = _field(
        [], "Clients whose unauthenticated mail counts as outbound (webmail).", _networks
    )
    store: Store = attrs.field(factory=Store, metadata={"doc": "State store."})
    local_domains: list[str] | str = _field(
        [], "Our domains (a list, or a file with one per line); other domains are external."
    )
    accounts: str | None = _field(None, "File or Postfix table of valid accounts.")
    language: str = _field("en", "Language of reply texts: en or fr.", _one_of("en", "fr"))
    templates: str | None = _field(None, "Directory of text templates overriding the shipped ones.")
    limits: Limits = attrs.field(factory=Limits, metadata={"doc": "Protocol bounds."})
    outbound: Outbound = attrs.field(factory=Outbound, metadata={"doc": "Outbound quota."})
    inbound: Inbound = attrs.field(factory=Inbound, metadata={"doc": "Inbound reputation."})
    dns: Dns = attrs.field(factory=Dns, metadata={"doc": "DNS."})
    notify: Notify = attrs.field(factory=Notify, metadata={"doc": "Notifications."})
    content: Content = attrs.field(factory=Content, metadata={"doc": "Content scoring."})
    quarantine: Quarantine = attrs.field(factory=Quarantine, metadata={"doc": "Quarantine."})
    exemptions: Exemptions = attrs.field(factory=Exemptions, metadata={"doc": "Exemptions."})
    http: Http = attrs.field(factory=Http, metadata={"doc": "HTTP admin API."})
    log: Log = attrs.field(factory=Log, metadata={"doc": "Logging."})
    forwarding: Forwarding = attrs.field(factory=Forwarding, metadata={"doc": "Forwarding."})
    #: File the configuration was read from (not a key of the file).
    source: str = attrs.field(default="<defaults>", metadata={"internal": True})


