"""Configuration: the SPEC's contract forms load; every error names the key and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyd import config as configuration
from policyd.errors import ConfigError
from tests.conftest import make_config

CONTRACT = """
listen:
  policy: "tcp:10040:interface=127.0.0.1"
  milter: "tcp:10041:interface=127.0.0.1"
store:
  url: "sqlite:////var/lib/policyd/state.db"
local_domains: [example.org]
outbound:
  limit: 5000
inbound:
  reject_at: 10
  tag_at: 5
  dnsbl:
    - zone: zen.spamhaus.org
      weight: 10
      codes: "127.0.0.[2..11]"
    - zone: list.dnswl.org
      weight: -5
  networks:
    - file: /etc/policyd/deny.cidr   # one CIDR per line, # comments
      weight: 10
    - file: /etc/policyd/allow.cidr
      allow: true
dns:
  nameservers: ["127.0.0.1:53"]
accounts: /etc/policyd/accounts
notify:
  smtp: "127.0.0.1:25"
  from: "policyd@example.org"
  helpdesk: ["helpdesk@example.org"]
  contacts:
    example.org: "it-support@example.org"
content:
  tag_at: 5
  tag: "*{spam}*"
"""


def test_contract_configuration_loads() -> None:
    """The SPEC's contract example is a valid configuration."""
    config = make_config(CONTRACT)
    assert config.outbound.limit == 5000
    assert config.inbound.dnsbl[0].codes == "127.0.0.[2..11]"
    assert config.inbound.networks[1].allow is True
    assert config.notify.from_ == "policyd@example.org"
    assert config.notify.contacts == {"example.org": "it-support@example.org"}
    assert config.content.tag == "*{spam}*"


def test_minimal_configuration_and_defaults() -> None:
    """Only listen.policy, store.url, local_domains and outbound.limit: the rest defaults."""
    config = make_config(
        'listen:\n  policy: "unix:/run/policyd/policy.sock"\nstore:\n  url: "memory://"\n'
        "local_domains: [example.org]\noutbound:\n  limit: 10\n"
    )
    assert config.outbound.window == 3600
    assert config.outbound.block_for == 72 * 3600
    assert config.store.on_error == "dunno"
    assert config.allowed_clients == ["127.0.0.0/8", "::1/128"]
    assert config.trusted_networks == []
    assert config.listen.http is None


def test_empty_file_is_all_defaults() -> None:
    """An empty file is valid: every key has a default."""
    assert make_config("").outbound.limit == 5000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", 90),
        ("15m", 900),
        ("1h", 3600),
        ("3d", 259200),
        ("2.5s", 2.5),
        (45, 45),
    ],
)
def test_durations(text: str | int, expected: float) -> None:
    """Durations read as 90s, 15m, 1h, 3d (or seconds)."""
    assert configuration.parse_duration(text) == expected


def test_format_duration_round_trips() -> None:
    """Durations print in their largest exact unit."""
    assert [configuration.format_duration(s) for s in (259200, 3600, 900, 90)] == ["3d", "1h", "15m", "90s"]


ERRORS = [
    ("outbound:\n  limit: lots\n", "test.yaml:2: outbound.limit: expected a whole number"),
    ("outbound:\n  limit: 0\n", "test.yaml:2: outbound.limit: must be at least 1"),
    ("outbound:\n  block_for: 4d\n", "test.yaml:2: outbound.block_for: must be at most 72h"),
    ("outbound:\n  window: 1y\n", "test.yaml:2: outbound.window: expected a duration"),
    ("outbound:\n  limti: 5\n", "test.yaml:2: outbound.limti: unknown key"),
    ("\n\nbogus: 1\n", "test.yaml:3: bogus: unknown key"),
    ("outbound:\n  limit: 5\n  limit: 6\n", "test.yaml:3: outbound.limit: duplicate key"),
    ("store:\n  on_error: maybe\n", "test.yaml:2: store.on_error: must be one of dunno, defer_if_permit"),
    ("store:\n  url: mysql://x\n", "test.yaml:2: store.url: must be sqlite:///path"),
    ("listen:\n  policy: 10040\n", "test.yaml:2: listen.policy: expected a text value"),
    ("listen:\n  policy: 'localhost:10040'\n", "test.yaml:2: listen.policy: must be a Twisted endpoint"),
    ("allowed_clients: [127.0.0.1/8, nonsense]\n", "test.yaml:1: allowed_clients: 'nonsense' is not an IP network"),
    ("trusted_networks: 10.0.0.0/8\n", "test.yaml:1: trusted_networks: expected a list"),
    ("outbound: [1, 2]\n", "test.yaml:1: outbound: expected a mapping of keys"),
    ("outbound:\n  give_back: yes please\n", "test.yaml:2: outbound.give_back: expected true or false"),
    ("outbound:\n  overrides:\n    a: x\n", "test.yaml:3: outbound.overrides.a: expected a whole number"),
    ("inbound:\n  dnsbl:\n    - zone: z\n      codes: '127.0.0.[9..2]'\n", "test.yaml:4: inbound.dnsbl[0].codes:"),
    ("inbound:\n  tag_at: 20\n", "inbound.tag_at: must not be above inbound.reject_at"),
    ("language: de\n", "test.yaml:1: language: must be one of en, fr"),
    ("local_domains: /nonexistent/domains\n", "local_domains: cannot read /nonexistent/domains"),
    ("outbound:\n  limit: [\n", "test.yaml:3: not valid YAML"),
    ("- a\n- b\n", "test.yaml:1: (top level): expected a mapping of keys"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS, ids=[e[1].split(": ")[1] for e in ERRORS])
def test_errors_name_key_and_line(text: str, message: str) -> None:
    """Each invalid configuration is one ConfigError naming file, line and key."""
    with pytest.raises(ConfigError) as caught:
        make_config(text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_local_domains_from_a_file(tmp_path: Path) -> None:
    """local_domains may name a file with one domain per line and # comments."""
    domains = tmp_path / "domains"
    domains.write_text("Example.org   # main\n\n# none\nexämple.fr\n", encoding="utf-8")
    config = make_config(f"local_domains: {domains}\n")
    assert configuration.read_domain_list(config.local_domains, "x") == {"example.org", "xn--exmple-cua.fr"}


def test_load_reads_policyd_config_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$POLICYD_CONFIG names the file when -c is not given."""
    path = tmp_path / "p.yaml"
    path.write_text("outbound:\n  limit: 7\n", encoding="utf-8")
    monkeypatch.setenv("POLICYD_CONFIG", str(path))
    assert configuration.load(None).outbound.limit == 7


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    """A missing file says so and how to name another."""
    with pytest.raises(ConfigError, match="configuration file not found"):
        configuration.load(str(tmp_path / "absent.yaml"))


def test_sample_configuration_is_valid() -> None:
    """etc/policyd.yaml, the documented sample, loads as it is shipped."""
    sample = Path(__file__).parents[2] / "etc" / "policyd.yaml"
    config = configuration.load_text(sample.read_text(encoding="utf-8"), str(sample))
    assert config.outbound.limit == 5000


def test_table_file_is_the_file_postfix_reads() -> None:
    """A source's file: a path as it is, hash:/x as /x.db, proxy: unwrapped; tables without a file give None."""
    from policyd.config.files import table_file

    assert table_file("/etc/policyd/accounts") == "/etc/policyd/accounts"
    assert table_file("hash:/etc/postfix/accounts") == "/etc/postfix/accounts.db"
    assert table_file("lmdb:/etc/postfix/accounts") == "/etc/postfix/accounts.lmdb"
    assert table_file("proxy:cdb:/etc/postfix/accounts") == "/etc/postfix/accounts.cdb"
    assert table_file("texthash:/etc/postfix/accounts") == "/etc/postfix/accounts"
    assert table_file("ldap:/etc/postfix/ldap-accounts.cf") == "/etc/postfix/ldap-accounts.cf"
    assert table_file("ldap:accounts") is None and table_file("tcp:127.0.0.1:2001") is None
    assert table_file("static:OK") is None


def test_every_referenced_file_is_checked(tmp_path: Path) -> None:
    """check_files passes when every named file is there, and names key and file of the first one missing."""
    from policyd.config.files import check_files

    for name in ("deny.cidr", "accounts.db", "spam", "domains", "content.model"):
        (tmp_path / name).write_text("x\n", encoding="utf-8")
    (tmp_path / "templates").mkdir()
    text = (
        f"local_domains: {tmp_path}/domains\naccounts: hash:{tmp_path}/accounts\ntemplates: {tmp_path}/templates\n"
        f"inbound:\n  networks:\n    - file: {tmp_path}/deny.cidr\n      weight: 10\n"
        f"  header_secret: {tmp_path}/header.secret\n"
        f"quarantine:\n  preferences: {tmp_path}/spam\ncontent:\n  model: {tmp_path}/content.model\n"
    )
    check_files(make_config(text))
    (tmp_path / "accounts.db").unlink()
    with pytest.raises(ConfigError) as raised:
        check_files(make_config(text))
    assert str(raised.value) == f"test.yaml: accounts: cannot read {tmp_path}/accounts.db: No such file or directory"
    check_files(make_config(f"inbound:\n  header_secret: {tmp_path}/none/h.secret\n"))  # made on first use
    (tmp_path / "h.secret").mkdir()
    with pytest.raises(ConfigError, match=r"inbound.header_secret: cannot read .*/h.secret: Is a directory"):
        check_files(make_config(f"inbound:\n  header_secret: {tmp_path}/h.secret\n"))
    check_files(make_config(""))  # the defaults name no file
