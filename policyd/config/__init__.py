"""Configuration: one YAML file, validated once, mapped onto typed classes.

The loader keeps the line of every key and refuses duplicate keys, so each
error names the key and the line: ``policyd.yaml:12: outbound.block_for:
must be at most 72h (got '100h')``.  Every default below says why it is what
it is.
"""

from __future__ import annotations

import ipaddress
import os
import re
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import attrs
import yaml

from policyd.errors import ConfigError

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
    from policyd.checks.dnsbl import parse_nameserver

    for item in value:
        parse_nameserver(item)


def _codes(value: Any) -> None:
    if value is None:
        return
    from policyd.netlists import parse_code_filter

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


# --- sections ---------------------------------------------------------------


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
    #: File the configuration was read from (not a key of the file).
    source: str = attrs.field(default="<defaults>", metadata={"internal": True})


# --- loading ----------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """A safe loader whose mappings refuse duplicate keys."""


def _yaml_key(name: str) -> str:
    return "from" if name == "from_" else name


def _where(source: str, node: yaml.Node) -> str:
    return f"{source}:{node.start_mark.line + 1}"


class _Builder:
    """Walks composed YAML nodes into the attrs classes above."""

    def __init__(self, source: str, loader: _Loader) -> None:
        self.source = source
        self.loader = loader

    def fail(self, node: yaml.Node, key: str, message: str) -> ConfigError:
        return ConfigError(f"{_where(self.source, node)}: {key}: {message}")

    def scalar(self, node: yaml.Node, key: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, key, "expected a single value, not a list or mapping")
        return self.loader.construct_object(node, deep=True)

    def build(self, cls: type, node: yaml.Node, prefix: str) -> Any:
        if not isinstance(node, yaml.MappingNode):
            if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
                return cls()
            raise self.fail(node, prefix or "(top level)", "expected a mapping of keys")
        fields = {_yaml_key(f.name): f for f in attrs.fields(cls) if not f.metadata.get("internal")}
        hints = typing.get_type_hints(cls)
        hints.update({f.name: f.metadata["type"] for f in attrs.fields(cls) if "type" in f.metadata})
        values: dict[str, Any] = {}
        seen: set[str] = set()
        for key_node, value_node in node.value:
            name = str(self.scalar(key_node, prefix or "(top level)"))
            key = f"{prefix}.{name}" if prefix else name
            if name in seen:
                raise self.fail(key_node, key, "duplicate key")
            seen.add(name)
            field = fields.get(name)
            if field is None:
                raise self.fail(key_node, key, "unknown key")
            value = self.value(hints[field.name], value_node, key)
            check = field.metadata.get("check")
            if check is not None and value is not None:
                try:
                    check(value)
                except ValueError as error:
                    raise self.fail(value_node, key, f"{error} (got {self.shown(value_node)})") from None
            values[field.name] = value
        return cls(**values)

    def shown(self, node: yaml.Node) -> str:
        if isinstance(node, yaml.ScalarNode):
            return repr(node.value)
        return "a " + ("list" if isinstance(node, yaml.SequenceNode) else "mapping")

    def value(self, hint: Any, node: yaml.Node, key: str) -> Any:
        origin = typing.get_origin(hint)
        if origin in (Union, types.UnionType):
            options = typing.get_args(hint)
            if type(None) in options and isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
                return None
            errors = []
            for option in options:
                if option is type(None):
                    continue
                try:
                    return self.value(option, node, key)
                except ConfigError as error:
                    errors.append(str(error).rsplit(": ", 1)[-1])
            raise self.fail(node, key, " or ".join(errors))
        if origin is list:
            if not isinstance(node, yaml.SequenceNode):
                raise self.fail(node, key, "expected a list")
            (item,) = typing.get_args(hint)
            return [self.value(item, child, f"{key}[{i}]") for i, child in enumerate(node.value)]
        if origin is dict:
            if not isinstance(node, yaml.MappingNode):
                raise self.fail(node, key, "expected a mapping")
            _, item = typing.get_args(hint)
            result: dict[str, Any] = {}
            for key_node, value_node in node.value:
                name = str(self.scalar(key_node, key))
                if name in result:
                    raise self.fail(key_node, f"{key}.{name}", "duplicate key")
                result[name] = self.value(item, value_node, f"{key}.{name}")
            return result
        if attrs.has(hint):
            return self.build(hint, node, key)
        raw = self.scalar(node, key)
        if hint is Duration:
            try:
                return Duration(parse_duration(raw))
            except ValueError as error:
                raise self.fail(node, key, f"{error} (got {raw!r})") from None
        if hint is bool:
            if not isinstance(raw, bool):
                raise self.fail(node, key, f"expected true or false (got {raw!r})")
            return raw
        if hint is int:
            if isinstance(raw, bool) or not isinstance(raw, int):
                raise self.fail(node, key, f"expected a whole number (got {raw!r})")
            return raw
        if hint is float:
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise self.fail(node, key, f"expected a number (got {raw!r})")
            return float(raw)
        if hint is str:
            if not isinstance(raw, str):
                raise self.fail(node, key, f"expected a text value (got {raw!r})")
            return raw
        raise self.fail(node, key, f"unsupported type {hint!r}")  # pragma: no cover


def _compose(text: str, source: str) -> tuple[yaml.Node | None, _Loader]:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark else "?"
        raise ConfigError(f"{source}:{line}: not valid YAML: {error.problem or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    return node, loader


def load_text(text: str, source: str = "<config>") -> Config:
    """Parse and validate configuration text.

    :raises ConfigError: naming the file, line and key of the first problem.
    """
    node, loader = _compose(text, source)
    try:
        if node is None:
            config = Config()
        else:
            config = _Builder(source, loader).build(Config, node, "")
    finally:
        loader.dispose()
    config = attrs.evolve(config, source=source)
    _cross_check(config, node)
    return config


def _cross_check(config: Config, node: yaml.Node | None) -> None:
    """Checks that involve several keys."""
    where = f"{config.source}:{node.start_mark.line + 1 if node else 1}"
    if config.inbound.tag_at > config.inbound.reject_at:
        raise ConfigError(f"{where}: inbound.tag_at: must not be above inbound.reject_at")
    for account, limit in config.outbound.overrides.items():
        if limit < 1:
            raise ConfigError(f"{where}: outbound.overrides.{account}: must be at least 1")
    read_domain_list(config.local_domains, where)
    for zone in config.inbound.dnsbl:
        if not zone.zone:
            raise ConfigError(f"{where}: inbound.dnsbl: every entry needs a zone")
    for network in config.inbound.networks:
        if not network.file:
            raise ConfigError(f"{where}: inbound.networks: every entry needs a file")
    if config.quarantine.digest_at and not (config.listen.http or config.quarantine.base_url):
        raise ConfigError(
            f"{where}: quarantine.digest_at: the digest's links need the self-service pages: "
            "set listen.http (or quarantine.base_url when another host serves them)"
        )
    if config.quarantine.digest_at and not config.quarantine.base_url and config.listen.http:
        if not config.listen.http.startswith(("tcp:", "tcp6:", "ssl:")):
            raise ConfigError(
                f"{where}: quarantine.base_url: needed when listen.http is not a TCP port "
                "(the address users open the digest's links at)"
            )


def config_path(path: str | None) -> str:
    """The file to read: ``-c``, else ``$POLICYD_CONFIG``, else the default."""
    return path or os.environ.get("POLICYD_CONFIG") or DEFAULT_PATH


def load(path: str | None = None) -> Config:
    """Read and validate the configuration file.

    :raises ConfigError: when the file cannot be read or is invalid.
    """
    chosen = config_path(path)
    try:
        text = Path(chosen).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{chosen}: configuration file not found (use -c FILE or $POLICYD_CONFIG)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{chosen}: cannot read configuration: {error}") from None
    return load_text(text, chosen)


def read_domain_list(value: Sequence[str] | str, source: str) -> frozenset[str]:
    """Local domains from a list or from a file of one domain per line.

    :raises ConfigError: when the file cannot be read.
    """
    from policyd.addresses import normalise_domain

    if isinstance(value, str):
        try:
            lines = Path(value).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ConfigError(f"{source}: local_domains: cannot read {value}: {error.strerror}") from None
        value = [line.split("#", 1)[0].strip() for line in lines]
    return frozenset(normalise_domain(d) for d in value if d.strip())
