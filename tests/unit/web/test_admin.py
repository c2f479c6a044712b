"""The HTTP listener: Prometheus metrics, the JSON admin API, the exemption pages."""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.threads import deferToThread

from policyd.admin import Admin
from policyd.servers.policy import PolicyServer
from policyd.testing import PolicyClient, rcpt
from tests.conftest import make_config

reactor: Any = _reactor


async def start_http_server(tmp_path: Path, *accounts: str) -> PolicyServer:
    """A started policy server (limit 3) with its HTTP listener on free loopback ports."""
    listed = tmp_path / "accounts"
    listed.write_text("".join(f"{a}\n" for a in accounts), encoding="utf-8")
    config = make_config(
        'listen:\n  policy: "tcp:0:interface=127.0.0.1"\n  http: "tcp:0:interface=127.0.0.1"\n'
        f'store:\n  url: "sqlite:///{tmp_path}/state.db"\n'
        f"accounts: {listed}\nlocal_domains: [example.org]\noutbound:\n  limit: 3\n"
    )
    running = PolicyServer(reactor, config)
    await running.start()
    return running


@pytest_twisted.async_yield_fixture
async def server(tmp_path: Path) -> AsyncIterator[PolicyServer]:
    """A policy server with the HTTP listener on free loopback ports."""
    running = await start_http_server(tmp_path, "alice@example.org", "bob@example.org")
    yield running
    await running.stop()


def base(server: PolicyServer) -> str:
    assert server.http_port is not None
    return f"http://127.0.0.1:{server.http_port.getHost().port}"


def token(server: PolicyServer) -> str:
    return (Path(server.config.store.url[len("sqlite:///"):]).parent / "http.token").read_text().strip()


def fetch(url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
          method: str | None = None) -> tuple[int, str, bytes]:
    """A blocking HTTP request (run it in a thread); returns status, content type and body."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get("content-type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("content-type", ""), error.read()


async def get(url: str, **kwargs: Any) -> tuple[int, str, bytes]:
    return await deferToThread(fetch, url, **kwargs)


async def api(server: PolicyServer, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token(server)}", "Content-Type": "application/json"}
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    status, _, raw = await get(f"{base(server)}/api/v1/{path}", data=data, headers=headers, method=method)
    return status, json.loads(raw)


async def send(server: PolicyServer, account: str, times: int) -> list[str]:
    assert server.port is not None
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", server.port.getHost().port)
    conn = await connectProtocol(endpoint, PolicyClient())
    words = [(await conn.ask(rcpt(sasl_username=account, recipient="x@gmail.com"))).split()[0] for _ in range(times)]
    conn.transport.loseConnection()
    return words


@pytest_twisted.ensureDeferred
async def test_metrics_parse_and_count(server: PolicyServer) -> None:
    """/metrics parses with prometheus_client and counts decisions, blocks and bad requests."""
    await send(server, "alice@example.org", 5)
    await server.refresh_gauges()
    status, kind, body = await get(f"{base(server)}/metrics")
    assert status == 200 and kind.startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert samples[("policyd_requests_total", (("action", "DUNNO"), ("check", "quota")))] == 3
    assert samples[("policyd_requests_total", (("action", "REJECT"), ("check", "quota")))] == 2
    assert samples[("policyd_decision_seconds_count", (("check", "quota"),))] == 5
    assert samples[("policyd_blocks_total", ())] == 1
    assert samples[("policyd_blocks_active", ())] == 1
    assert samples[("policyd_notifications_pending", ())] == 0
    assert ("policyd_store_errors_total", ()) in samples


@pytest_twisted.ensureDeferred
async def test_api_needs_the_token(server: PolicyServer) -> None:
    """Without the Bearer token every API call is 401 and changes nothing."""
    status, _, body = await get(f"{base(server)}/api/v1/blocks")
    assert status == 401 and json.loads(body) == {"error": "missing or wrong Bearer token"}
    status, _, _ = await get(f"{base(server)}/api/v1/unblock", data=b"{}", headers={"Authorization": "Bearer nope"})
    assert status == 401


@pytest_twisted.ensureDeferred
async def test_api_blocks_unblock_and_audit(server: PolicyServer) -> None:
    """The API lists blocks, unblocks with a reason, and the audit log says who."""
    await send(server, "bob@example.org", 4)
    status, blocks = await api(server, "GET", "blocks")
    assert status == 200 and [b["account"] for b in blocks] == ["bob@example.org"]
    status, answer = await api(server, "POST", "unblock", {"account": "bob@example.org", "reason": "cleaned"})
    assert status == 200 and answer == {"account": "bob@example.org", "unblocked": True}
    assert await send(server, "bob@example.org", 1) == ["DUNNO"]
    status, answer = await api(server, "POST", "unblock", {"account": "bob@example.org", "reason": "again"})
    assert status == 400 and "is not blocked" in answer["error"]
    status, answer = await api(server, "POST", "unblock", {"account": "bob@example.org"})
    assert status == 400 and answer == {"error": "missing field 'reason'"}
    _, audit = await api(server, "GET", "audit")
    assert [(a["action"], a["who"]) for a in audit] == [("block", "policyd"), ("unblock", "api:admin")]
    status, answer = await api(server, "GET", "nothing/here")
    assert status == 404


@pytest_twisted.ensureDeferred
async def test_api_exemption_lifecycle(server: PolicyServer) -> None:
    """Request, approve and list exemptions through the API; invalid requests are 400."""
    status, answer = await api(server, "POST", "exemptions", {
        "account": "alice@example.org", "limit": 10, "from": "now", "until": "+1h", "reason": "gala invitations",
    })
    assert status == 201 and answer["status"] == "pending"
    ident = answer["id"]
    status, answer = await api(server, "POST", f"exemptions/{ident}/approve", {})
    assert status == 200 and answer["status"] == "approved"
    status, answer = await api(server, "POST", "exemptions", {
        "account": "eve@example.org", "limit": 10, "from": "now", "until": "+1h", "reason": "x",
    })
    assert status == 400 and "not a valid account" in answer["error"]
    _, listed = await api(server, "GET", "exemptions")
    assert [(e["id"], e["status"]) for e in listed] == [(ident, "approved")]


def form_fields(page: str) -> dict[str, str]:
    return dict(re.findall(r'name="(csrf)" value="([^"]+)"', page))


@pytest_twisted.ensureDeferred
@pytest_twisted.ensureDeferred
async def test_the_pages_show_an_unexpected_failure_as_a_page(
    server: PolicyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure the form did not expect is a page for people (and a log line), not JSON; the API stays JSON."""
    status, _, page = await get(f"{base(server)}/exemption")
    csrf = form_fields(page.decode())["csrf"]

    async def broken(*args: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Admin, "request_exemption", broken)
    form = urllib.parse.urlencode({
        "account": "alice@example.org", "organisation": "Sales", "start": "2030-01-10T08:00",
        "end": "2030-01-10T18:00", "limit": "9000", "reason": "yearly customer mailing", "csrf": csrf,
    }).encode()
    status, kind, page = await get(f"{base(server)}/exemption", data=form)
    assert status == 500 and kind.startswith("text/html")
    assert b"Something went wrong" in page and b"try again in a few minutes" in page
    assert b"disk on fire" not in page and b"RuntimeError" not in page
    status, body = await api(server, "POST", "exemptions", {
        "account": "alice@example.org", "limit": 10, "from": "now", "until": "+1h", "reason": "gala invitations",
    })
    assert status == 500 and body == {"error": "internal error: RuntimeError"}


@pytest_twisted.ensureDeferred
async def test_request_form_and_admin_page(server: PolicyServer) -> None:
    """A user submits the form; the admin page (token as password) lists and approves it."""
    status, kind, page = await get(f"{base(server)}/exemption")
    assert status == 200 and kind.startswith("text/html") and b'<label for="reason">' in page
    csrf = form_fields(page.decode())["csrf"]
    form = urllib.parse.urlencode({
        "account": "alice@example.org", "organisation": "Sales", "start": "2030-01-10T08:00",
        "end": "2030-01-10T18:00", "limit": "9000", "reason": "yearly customer mailing", "csrf": csrf,
    }).encode()
    status, _, page = await get(f"{base(server)}/exemption", data=form)
    assert status == 201 and b"Your request number <strong>1</strong>" in page
    bad = form.replace(csrf.encode(), b"1.forged")
    status, _, page = await get(f"{base(server)}/exemption", data=bad)
    assert b"The form has expired" in page
    status, _, _ = await get(f"{base(server)}/admin")
    assert status == 401
    auth = {"Authorization": "Basic " + base64.b64encode(f"jane:{token(server)}".encode()).decode()}
    status, _, page = await get(f"{base(server)}/admin", headers=auth)
    assert status == 200 and b"yearly customer mailing (organisation: Sales)" in page
    decision = urllib.parse.urlencode({"id": "1", "action": "approve", "reason": "ok", "csrf": csrf}).encode()
    status, _, page = await get(f"{base(server)}/admin", data=decision, headers=auth)
    assert b"Request 1 for alice@example.org: approved." in page
    _, listed = await api(server, "GET", "exemptions")
    assert listed[0]["status"] == "approved" and listed[0]["decided_by"] == "web:jane"
