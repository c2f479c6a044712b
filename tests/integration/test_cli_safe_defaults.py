"""The admin commands through the real ``policyd``: exit codes, re-blocks, audit searches, times, file checks."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import pytest

from tests.harness.servers import policyd


def write(path: Path, extra: str = "") -> Path:
    """A valid configuration on a SQLite store beside ``path``, plus ``extra``."""
    path.write_text(
        'listen:\n  policy: "tcp:10040:interface=127.0.0.1"\n'
        f'store:\n  url: "sqlite:///{path.parent}/state.db"\n'
        f"local_domains: [example.org]\noutbound:\n  limit: 5\n{extra}",
        encoding="utf-8",
    )
    return path


def run_json(*args: str) -> list[dict[str, object]]:
    """One command's ``--json`` lines, each read back (the command must succeed)."""
    result = policyd(*args, "--json")
    assert result.returncode == 0, (args, result.stderr)
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_reblock_says_what_it_changes(tmp_path: Path) -> None:
    """Blocking a blocked account keeps its start, replaces end and reason, says both old and new, and audits the old."""
    config = str(write(tmp_path / "c.yaml"))
    (first,) = run_json("block", "carol", "--reason", "phished", "--for", "2h", "-c", config)
    assert first["replaced"] is None
    again = policyd("block", "carol", "--reason", "still sending", "--for", "1h", "-c", config)
    assert again.returncode == 0, again.stderr
    assert "carol was blocked already" in again.stdout
    assert "reason 'phished' -> 'still sending'" in again.stdout and "until " in again.stdout
    (third,) = run_json("block", "carol", "--reason", "last word", "-c", config)
    assert third["since"] == first["since"] and third["replaced"]["reason"] == "still sending"
    (block,) = run_json("blocks", "-c", config)
    assert block["reason"] == "last word" and block["since"] == first["since"]
    audit = run_json("audit", "--account", "carol", "-c", config)
    assert [a["reason"] for a in audit][1].startswith("still sending (was: until ")


def test_unblock_twice_exits_1(tmp_path: Path) -> None:
    """The first unblock exits 0, the second (nothing to do) exits 1 with one line."""
    config = str(write(tmp_path / "c.yaml"))
    assert policyd("block", "dave", "--reason", "x", "-c", config).returncode == 0
    assert policyd("unblock", "dave", "--reason", "fixed", "-c", config).returncode == 0
    again = policyd("unblock", "dave", "--reason", "fixed", "-c", config)
    assert again.returncode == 1
    assert again.stderr == "policyd: error: account dave is not blocked\n" and again.stdout == ""


def test_exemption_decisions_exit_codes_and_limit_below_current(tmp_path: Path) -> None:
    """An exemption at or below the limit is refused (2) saying why; approving twice, denying twice exit 1."""
    accounts = tmp_path / "accounts"
    accounts.write_text("alice@example.org\nbob@example.org\n", encoding="utf-8")
    config = str(write(tmp_path / "c.yaml", f"accounts: {accounts}\n"))
    low = policyd("exemption", "request", "alice@example.org", "--limit", "5", "--from", "now", "--until", "+1h",
                  "--reason", "newsletter", "-c", config)
    assert low.returncode == 2
    assert "--limit 5 is not above the current limit of 5 external recipients per hour" in low.stderr
    (made,) = run_json("exemption", "request", "alice@example.org", "--limit", "50", "--from", "now",
                       "--until", "+1h", "--reason", "newsletter", "-c", config)
    ident = str(made["id"])
    assert policyd("exemption", "approve", ident, "-c", config).returncode == 0
    twice = policyd("exemption", "approve", ident, "-c", config)
    assert twice.returncode == 1 and f"exemption #{ident} is approved already" in twice.stderr
    assert policyd("exemption", "revoke", ident, "--reason", "over", "-c", config).returncode == 0
    again = policyd("exemption", "revoke", ident, "--reason", "over", "-c", config)
    assert again.returncode == 1 and "revoked already" in again.stderr
    denied = policyd("exemption", "approve", ident, "-c", config)
    assert denied.returncode == 2 and "is revoked, not pending" in denied.stderr


def test_the_exemption_example_of_the_docs_works(tmp_path: Path) -> None:
    """The admin guide's exemption example, dates and all, requests and approves as written."""
    accounts = tmp_path / "accounts"
    accounts.write_text("newsletter@example.org\n", encoding="utf-8")
    config = str(write(tmp_path / "c.yaml", f"accounts: {accounts}\n"))
    tomorrow = (datetime.date.today() + datetime.timedelta(days=1)).isoformat()
    made = policyd(
        "exemption", "request", "newsletter@example.org", "--limit", "20000",
        "--from", f"{tomorrow}T08:00", "--until", f"{tomorrow}T18:00",
        "--reason", "spring campaign, ticket 4521", "-c", config, "--json",
    )
    assert made.returncode == 0, made.stderr
    ident = json.loads(made.stdout)["id"]
    approved = policyd("exemption", "approve", str(ident), "--reason", "checked with sales", "-c", config)
    assert approved.returncode == 0, approved.stderr
    (listed,) = run_json("exemption", "list", "-c", config)
    start = datetime.datetime.fromisoformat(f"{tomorrow}T08:00").astimezone()
    assert listed["start"] == start.timestamp() and listed["status"] == "approved"


def test_times_one_zone_shown_and_json_iso_beside_seconds(tmp_path: Path) -> None:
    """Tables show times with the server's offset; WHEN without a zone is that zone; JSON adds FIELD_iso in UTC."""
    accounts = tmp_path / "accounts"
    accounts.write_text("alice@example.org\n", encoding="utf-8")
    config = str(write(tmp_path / "c.yaml", f"accounts: {accounts}\n"))
    env = dict(os.environ, TZ="Europe/Paris")
    made = policyd("exemption", "request", "alice@example.org", "--limit", "50", "--from", "2030-01-15T09:00",
                   "--until", "2030-01-15T10:00", "--reason", "x", "-c", config, "--json", env=env)
    assert made.returncode == 0, made.stderr
    listed = policyd("exemption", "list", "-c", config, env=env)
    assert "2030-01-15T09:00:00+01:00" in listed.stdout and "2030-01-15T10:00:00+01:00" in listed.stdout
    (item,) = run_json("exemption", "list", "-c", config)
    assert item["start"] == 1894694400.0 and item["start_iso"] == "2030-01-15T08:00:00Z"
    assert item["end_iso"] == "2030-01-15T09:00:00Z" and item["decided_at_iso"] is None
    assert policyd("block", "erin", "--reason", "x", "-c", config).returncode == 0
    (block,) = run_json("blocks", "-c", config)
    assert block["since_iso"].endswith("Z") and block["until_iso"].endswith("Z")
    audit = run_json("audit", "-c", config)
    assert all(a["at_iso"].endswith("Z") for a in audit)
    helped = policyd("exemption", "request", "--help")
    assert "server's time zone" in " ".join(helped.stdout.split())


def test_audit_search_by_account_and_period(tmp_path: Path) -> None:
    """audit --account A --since T --until T lists that account's entries of the period, with --limit."""
    config = str(write(tmp_path / "c.yaml"))
    for account in ("frank", "gina", "frank", "frankie"):
        assert policyd("block", account, "--reason", f"for {account}", "-c", config).returncode == 0
    frank = run_json("audit", "--account", "Frank", "-c", config)
    assert [(a["subject"], a["action"]) for a in frank] == [("frank", "block"), ("frank", "block")]
    assert len(run_json("audit", "--account", "frank", "--limit", "1", "-c", config)) == 1
    assert run_json("audit", "--account", "frank", "--since", "+1h", "-c", config) == []
    assert len(run_json("audit", "--since", "2000-01-01T00:00Z", "--until", "+1m", "-c", config)) == 4
    none = policyd("audit", "--account", "nobody", "-c", config)
    assert none.returncode == 0 and none.stdout.strip() == "no audit entry matches"


@pytest.mark.parametrize(
    ("extra", "key", "named"),
    [
        ("inbound:\n  networks:\n    - file: {d}/deny.cidrr\n      weight: 10\n", "inbound.networks[0].file",
         "{d}/deny.cidrr"),
        ("accounts: {d}/acounts\n", "accounts", "{d}/acounts"),
        ("accounts: hash:{d}/accounts\n", "accounts", "{d}/accounts.db"),
        ("quarantine:\n  preferences: {d}/spam\n", "quarantine.preferences", "{d}/spam"),
        ("content:\n  model: {d}/content.modle\n", "content.model", "{d}/content.modle"),
        ("templates: {d}/templatez\n", "templates", "{d}/templatez"),
        ("http:\n  token_file: {d}\n", "http.token_file", "{d}: Is a directory"),
    ],
)
def test_missing_referenced_file_fails_check_and_start(tmp_path: Path, extra: str, key: str, named: str) -> None:
    """A file the configuration names that is missing: config check and serve exit 2, one line naming key and file."""
    (tmp_path / "deny.cidr").write_text("192.0.2.0/24\n", encoding="utf-8")
    path = write(tmp_path / "c.yaml", extra.format(d=tmp_path))
    for command in (["config", "check"], ["serve"], ["milter"]):
        result = policyd(*command, "-c", str(path))
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.startswith(f"policyd: error: {path}: {key}: ")
        assert named.format(d=tmp_path) in result.stderr and len(result.stderr.splitlines()) == 1
        assert "Traceback" not in result.stderr + result.stdout


def test_unreadable_referenced_file_fails_check(tmp_path: Path) -> None:
    """A network list path that cannot be read as a file (a directory): config check exits 2 naming it."""
    cidr = tmp_path / "deny.cidr"
    cidr.write_text("192.0.2.0/24\n", encoding="utf-8")
    path = write(tmp_path / "c.yaml", f"inbound:\n  networks:\n    - file: {cidr}\n      weight: 10\n")
    assert policyd("config", "check", "-c", str(path)).returncode == 0
    cidr.unlink()
    cidr.mkdir()
    result = policyd("config", "check", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr == f"policyd: error: {path}: inbound.networks[0].file: cannot read {cidr}: Is a directory\n"
