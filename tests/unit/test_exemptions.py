"""Bulk-send exemptions: requested with a reason, decided one at a time, applied in their window only."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from policyd.admin import Admin, parse_when
from policyd.errors import NoSuchObject, NothingToDo, UsageError
from policyd.policy import PolicyService
from policyd.store import Exemption
from policyd.store.memory import MemoryStore
from policyd.testing import rcpt, request
from policyd.times import show_time
from tests.conftest import make_config
from tests.harness.servers import PolicydServer, ask, free_port, policyd

T0 = 1_700_000_000.0
HOUR = 3600.0


def run(deferred: Any) -> Any:
    """The result of an already-fired coroutine or Deferred (memory store: no waiting)."""
    result = Deferred.fromCoroutine(deferred) if not isinstance(deferred, Deferred) else deferred
    out: list[Any] = []
    result.addBoth(out.append)
    assert out, "did not complete synchronously"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def admin(tmp_path: Path, extra: str = "") -> tuple[Admin, MemoryStore, Clock]:
    accounts = tmp_path / "accounts"
    accounts.write_text("alice@example.org\n# former staff\nBob@Example.org  # sales\n", encoding="utf-8")
    config = make_config(f"accounts: {accounts}\nlocal_domains: [example.org]\noutbound:\n  limit: 5\n{extra}")
    clock = Clock()
    clock.advance(T0)
    store = MemoryStore()
    return Admin(config, store, clock), store, clock


def request_one(adm: Admin, account: str = "alice@example.org", limit: int = 8, start: float = T0,
                end: float = T0 + HOUR, reason: str = "spring newsletter") -> Exemption:
    return run(adm.request_exemption(account, limit, start, end, reason, "jane"))


def test_request_is_pending_and_audited(tmp_path: Path) -> None:
    """A valid request is stored pending, with who asked and why, and audited."""
    adm, store, _ = admin(tmp_path)
    made = request_one(adm, "BOB@example.org")
    assert made.id == 1 and made.status == "pending" and made.account == "bob@example.org"
    assert made.requested_by == "jane" and made.reason == "spring newsletter"
    assert [(e.action, e.who) for e in store.entries] == [("exemption-request", "jane")]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"account": "mallory@example.org"}, "mallory@example.org is not a valid account"),
        ({"reason": "   "}, "--reason must give the business reason"),
        ({"end": T0 + 8 * 86400}, "longer than exemptions.max_window (7d)"),
        ({"end": T0 - 1}, "--until must be after --from"),
        ({"start": T0 - 2 * HOUR, "end": T0 - HOUR}, "the window has already ended"),
        ({"limit": 0}, "--limit must be between 1 and exemptions.max_limit"),
        ({"limit": 10**9}, "--limit must be between 1 and exemptions.max_limit"),
    ],
)
def test_invalid_requests_are_refused(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    """Invalid account, empty reason, bad or too long window, absurd limit: refused, nothing stored."""
    adm, store, _ = admin(tmp_path)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        request_one(adm, **kwargs)
    assert store.exempt == {} and store.entries == []


def test_accounts_seen_authenticating_when_no_list(tmp_path: Path) -> None:
    """Without an accounts source, an account is valid once it has authenticated."""
    config = make_config("local_domains: [example.org]\n")
    clock = Clock()
    clock.advance(T0)
    store = MemoryStore()
    service = PolicyService(config, store, clock)
    adm = Admin(config, store, clock)
    with pytest.raises(UsageError, match="not a valid account"):
        request_one(adm, "carol@example.org", limit=8000)
    maybeDeferred(service.decide, request(rcpt(sasl_username="Carol@example.org", recipient="x@example.org")))
    assert request_one(adm, "carol@example.org", limit=8000).status == "pending"


def test_decisions_are_one_at_a_time(tmp_path: Path) -> None:
    """Approve, deny and revoke each act once, on the right state, and are audited."""
    adm, store, _ = admin(tmp_path)
    first, second = request_one(adm), request_one(adm, "bob@example.org")
    assert run(adm.approve(first.id, "root", "ok")).status == "approved"
    with pytest.raises(NothingToDo, match="is approved already"):
        run(adm.approve(first.id, "root"))
    assert run(adm.deny(second.id, "root", "no business need")).status == "denied"
    with pytest.raises(UsageError, match="is denied, not approved"):
        run(adm.revoke(second.id, "root", "x"))
    assert run(adm.revoke(first.id, "root", "campaign cancelled")).status == "revoked"
    with pytest.raises(UsageError, match="no exemption #99"):
        run(adm.approve(99, "root"))
    actions = [e.action for e in store.entries]
    assert actions == ["exemption-request", "exemption-request", "exemption-approve",
                       "exemption-deny", "exemption-revoke"]


def test_overlapping_approvals_are_refused(tmp_path: Path) -> None:
    """One approved exemption per account at a time: an overlapping one cannot be approved."""
    adm, _, _ = admin(tmp_path)
    first = request_one(adm)
    overlapping = request_one(adm, start=T0 + 1800, end=T0 + 2 * HOUR)
    later = request_one(adm, start=T0 + HOUR, end=T0 + 2 * HOUR)
    run(adm.approve(first.id, "root"))
    with pytest.raises(UsageError, match="already has approved exemption #1"):
        run(adm.approve(overlapping.id, "root"))
    assert run(adm.approve(later.id, "root")).status == "approved"


def test_expired_request_cannot_be_approved(tmp_path: Path) -> None:
    """A request whose window passed before anyone decided cannot be approved; listing says expired."""
    adm, _, clock = admin(tmp_path)
    made = request_one(adm, end=T0 + 60)
    clock.advance(61)
    with pytest.raises(UsageError, match="already ended"):
        run(adm.approve(made.id, "root"))


def decide(service: PolicyService, times: int) -> list[str]:
    words = []
    for _ in range(times):
        out: list[Any] = []
        maybeDeferred(service.decide, request(rcpt(sasl_username="alice@example.org", recipient="x@gmail.com"))).addCallback(out.append)
        words.append(out[0].word)
    return words


def test_approved_exemption_applies_inside_its_window_only(tmp_path: Path) -> None:
    """Inside the window the exemption's limit applies; before approval and after the window, the normal one."""
    adm, store, clock = admin(tmp_path)
    config = adm.config
    service = PolicyService(config, store, clock)
    made = request_one(adm, limit=8, start=T0 + 100, end=T0 + 100 + HOUR)
    run(adm.approve(made.id, "root"))
    assert decide(service, 5) == ["DUNNO"] * 5  # before the window: limit 5 ...
    store.unblock("alice@example.org", now=clock.seconds())
    clock.advance(100)
    assert decide(service, 9) == ["DUNNO"] * 8 + ["REJECT"]  # ... inside: 8
    store.unblock("alice@example.org", now=clock.seconds())
    clock.advance(HOUR)
    assert decide(service, 6) == ["DUNNO"] * 5 + ["REJECT"]  # after: 5 again, never renewed


def test_an_exemption_at_or_below_the_limit_is_refused(tmp_path: Path) -> None:
    """A request at or below the account's limit (outbound.limit, or its override) is refused, saying why."""
    adm, store, clock = admin(tmp_path, "  overrides:\n    bob@example.org: 20\n")
    for limit in (2, 5):
        with pytest.raises(UsageError, match=rf"--limit {limit} is not above the current limit of 5 .*outbound.limit"):
            request_one(adm, limit=limit)
    with pytest.raises(UsageError, match="--limit 20 is not above the current limit of 20 .*overrides"):
        request_one(adm, "bob@example.org", limit=20)
    with pytest.raises(UsageError, match="mallory@example.org is not a valid account"):
        request_one(adm, "mallory@example.org", limit=20)  # the override of a valid account is never told
    assert store.exempt == {} and store.entries == []
    service = PolicyService(adm.config, store, clock)
    assert decide(service, 6) == ["DUNNO"] * 5 + ["REJECT"]


def test_decisions_already_made_are_nothing_to_do(tmp_path: Path) -> None:
    """Approving an approved exemption, denying a denied one, revoking a revoked or expired one: NothingToDo (exit 1)."""
    adm, _, clock = admin(tmp_path)
    approved = request_one(adm)
    run(adm.approve(approved.id, "root"))
    with pytest.raises(NothingToDo, match="is approved already"):
        run(adm.approve(approved.id, "root"))
    denied = request_one(adm, start=T0 + 2 * HOUR, end=T0 + 3 * HOUR)
    run(adm.deny(denied.id, "root", "no"))
    with pytest.raises(NothingToDo, match="is denied already"):
        run(adm.deny(denied.id, "root", "no"))
    clock.advance(2 * HOUR)
    with pytest.raises(NothingToDo, match="is expired already"):
        run(adm.revoke(approved.id, "root", "over"))
    with pytest.raises(NoSuchObject, match="no exemption #99"):
        run(adm.approve(99, "root"))
    assert NothingToDo.exit_code == NoSuchObject.exit_code == 1


def test_parse_when(monkeypatch: pytest.MonkeyPatch) -> None:
    """WHEN reads now, +DURATION and ISO 8601; without a zone, in the server's time zone."""
    monkeypatch.setenv("TZ", "Europe/Paris")
    time.tzset()
    try:
        assert parse_when("now", T0) == T0
        assert parse_when("+1h", T0) == T0 + HOUR
        assert parse_when("2026-11-25T10:00:00+00:00", T0) == 1795600800.0
        assert parse_when("2026-11-25T10:00:00Z", T0) == 1795600800.0
        assert parse_when("2026-11-25T11:00", T0) == 1795600800.0  # Paris is UTC+1 in November
        assert show_time(1795600800.0) == "2026-11-25T11:00:00+01:00"
        with pytest.raises(UsageError, match="expected now"):
            parse_when("tomorrow", T0)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_cli_contract_request_approve_apply(tmp_path: Path) -> None:
    """The CLI contract: request --json prints {"id": ...}, approve ID, and a running server applies it."""
    port = free_port()
    accounts = tmp_path / "accounts"
    accounts.write_text("alice@example.org\n", encoding="utf-8")
    config = tmp_path / "policyd.yaml"
    config.write_text(
        f'listen:\n  policy: "tcp:{port}:interface=127.0.0.1"\n'
        f'store:\n  url: "sqlite:///{tmp_path}/state.db"\n'
        f"local_domains: [example.org]\naccounts: {accounts}\noutbound:\n  limit: 3\n",
        encoding="utf-8",
    )
    server = PolicydServer(config, port).start()
    try:
        refused = policyd("exemption", "request", "mallory@example.org", "--limit", "6", "--from", "now",
                          "--until", "+1h", "--reason", "launch", "-c", str(config), "--json")
        assert refused.returncode == 2 and "not a valid account" in refused.stderr and refused.stdout == ""
        made = policyd("exemption", "request", "alice@example.org", "--limit", "6", "--from", "now",
                       "--until", "+1h", "--reason", "product launch mailing", "-c", str(config), "--json")
        assert made.returncode == 0, made.stderr
        ident = json.loads(made.stdout)["id"]
        approved = policyd("exemption", "approve", str(ident), "-c", str(config))
        assert approved.returncode == 0, approved.stderr
        listed = [json.loads(x) for x in policyd("exemption", "list", "--json", "-c", str(config)).stdout.splitlines()]
        assert [(e["id"], e["status"], e["limit"]) for e in listed] == [(ident, "approved", 6)]
        time.sleep(2.5)  # the server reloads approved exemptions every 2 s
        words = [ask(port, rcpt(sasl_username="alice@example.org", recipient="x@gmail.com")).split()[0]
                 for _ in range(7)]
        assert words == ["DUNNO"] * 6 + ["REJECT"]
        audit = policyd("audit", "--json", "-c", str(config)).stdout
        assert "exemption-request" in audit and "exemption-approve" in audit
    finally:
        assert server.stop() == 0


def test_accounts_from_a_postfix_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """accounts: hash:FILE is read with the real postmap -q; a broken table is a clear error."""
    import shutil
    import subprocess

    from policyd.checks.accounts import Accounts
    from policyd.errors import PolicydError

    # postmap reads Postfix's main.cf: give it one of its own (the system's may not exist).
    (tmp_path / "main.cf").write_text("compatibility_level = 3.6\n", encoding="utf-8")
    monkeypatch.setenv("MAIL_CONFIG", str(tmp_path))
    postmap = shutil.which("postmap") or "/usr/sbin/postmap"
    source = tmp_path / "accounts"
    source.write_text("alice@example.org OK\nbob@example.org OK\n", encoding="utf-8")
    subprocess.run([postmap, f"hash:{source}"], check=True)
    accounts = Accounts(f"hash:{source}", MemoryStore())
    assert run(accounts.valid("Alice@example.org"))
    assert not run(accounts.valid("mallory@example.org"))
    with pytest.raises(PolicydError, match=r"accounts: postmap -q on hash:.*missing failed"):
        run(Accounts(f"hash:{tmp_path}/missing", MemoryStore()).valid("alice@example.org"))
