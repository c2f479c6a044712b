"""The HTTP listener: Prometheus metrics, the JSON admin API, the exemption pages."""

from __future__ import annotations

import base64
import html
import json
import re
import select
import socket
import time
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
from policyd.web import limits as httplimits
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


def basic(user: str, password: str) -> dict[str, str]:
    """An HTTP Basic Authorization header."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


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
    assert status == 201 and b"Your request for alice@example.org (9000 external recipients per hour" in page
    bad = form.replace(csrf.encode(), b"1.forged")
    status, _, page = await get(f"{base(server)}/exemption", data=bad)
    assert b"The form has expired" in page
    status, _, _ = await get(f"{base(server)}/admin")
    assert status == 401
    auth = basic("jane", token(server))
    status, _, page = await get(f"{base(server)}/admin", headers=auth)
    assert status == 200 and b"yearly customer mailing (organisation: Sales)" in page
    admin_csrf = form_fields(page.decode())["csrf"]
    decision = urllib.parse.urlencode({"id": "1", "action": "approve", "reason": "ok", "csrf": admin_csrf}).encode()
    status, _, page = await get(f"{base(server)}/admin", data=decision, headers=auth)
    assert b"Request 1 for alice@example.org: approved." in page
    _, listed = await api(server, "GET", "exemptions")
    assert listed[0]["status"] == "approved" and listed[0]["decided_by"] == "web admin, claiming jane"


# --- what a client may cost: through the real listener --------------------------------


def talk(port: int, pieces: list[bytes], pause: float = 0.0, wait: float = 5.0) -> bytes:
    """Send ``pieces`` (``pause`` seconds apart) until the server answers, then read until it closes.

    Blocking: run it in a thread.  Returns what the server sent (empty when it
    said nothing within ``wait`` seconds of the last piece).
    """
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        for piece in pieces:
            try:
                sock.sendall(piece)
            except OSError:
                break  # the server closed: read what it said
            if select.select([sock], [], [], pause)[0]:
                break
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except OSError:
            pass
    return received


async def raw(server: PolicyServer, pieces: list[bytes], pause: float = 0.0, wait: float = 5.0) -> bytes:
    assert server.http_port is not None
    return await deferToThread(talk, server.http_port.getHost().port, pieces, pause, wait)


def answer_status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


@pytest_twisted.async_yield_fixture
async def impatient(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[PolicyServer]:
    """A server whose HTTP listener gives a request 1 s to arrive and an idle connection 2 s."""
    monkeypatch.setattr(httplimits, "REQUEST_TIME", 1.0)
    monkeypatch.setattr(httplimits, "IDLE_TIME", 2.0)
    running = await start_http_server(tmp_path, "alice@example.org")
    yield running
    await running.stop()


@pytest.mark.parametrize("path", ["/exemption", "/admin", "/api/v1/unblock", "/self-service/release/x", "/nowhere"])
@pytest_twisted.ensureDeferred
async def test_a_big_declared_body_is_refused_before_it_is_sent(server: PolicyServer, path: str) -> None:
    """Content-Length of 300 MB on any path: 413 right after the headers, without waiting for one byte of it."""
    started = time.monotonic()
    answer = await raw(server, [
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        f"Authorization: Bearer {token(server)}\r\nContent-Length: {300 * 1024 * 1024}\r\n\r\n".encode(),
    ])
    assert answer_status(answer) == 413 and b"request body larger than 65536 bytes" in answer
    assert time.monotonic() - started < 3
    assert await send(server, "alice@example.org", 1) == ["DUNNO"]


@pytest_twisted.ensureDeferred
async def test_a_big_chunked_body_is_refused_once_past_the_limit(server: PolicyServer) -> None:
    """A chunked body of 20 MB of ``a=&``: 413 once 64 KiB have arrived; the rest is never taken."""
    chunk = b"a=&" * 5000
    pieces = [b"POST /exemption HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n"]
    pieces += [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (20 * 1024 * 1024 // len(chunk))
    answer = await raw(server, pieces, pause=0.001)
    assert answer_status(answer) == 413 and answer.endswith(b"request body larger than 65536 bytes\n")
    assert await send(server, "alice@example.org", 1) == ["DUNNO"]


@pytest_twisted.ensureDeferred
async def test_a_body_within_the_limit_still_works(server: PolicyServer) -> None:
    """A chunked API call under the limit is answered as before."""
    body = json.dumps({"account": "alice@example.org", "reason": "manual"}).encode()
    answer = await raw(server, [
        f"POST /api/v1/block HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token(server)}\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode(),
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
    ])
    assert answer_status(answer) == 200 and b'"account":"alice@example.org"' in answer


@pytest_twisted.ensureDeferred
async def test_a_trickled_request_is_cut_and_an_idle_connection_closed(impatient: PolicyServer) -> None:
    """One header byte every 50 ms does not hold a connection past its deadline (408); silence is closed too."""
    started = time.monotonic()
    trickle = [b"GET /metrics HTTP/1.1\r\n"] + [b"X"] * 400
    answer = await raw(impatient, trickle, pause=0.05)
    assert answer_status(answer) == 408 and 0.9 < time.monotonic() - started < 4
    started = time.monotonic()
    assert await raw(impatient, [b""], wait=10) == b""
    assert 1.9 < time.monotonic() - started < 6
    answer = await raw(impatient, [b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"])
    assert answer_status(answer) == 200


@pytest_twisted.ensureDeferred
async def test_headers_and_url_are_bounded(server: PolicyServer) -> None:
    """Over 100 headers: 400; a URL over 8 KiB: 414; a header line over 8 KiB: 431."""
    many = b"".join(b"X-H%d: 1\r\n" % n for n in range(150))
    assert answer_status(await raw(server, [b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n"])) == 400
    assert answer_status(await raw(server, [b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"])) == 414
    assert answer_status(await raw(server, [b"GET / HTTP/1.1\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n"])) == 431


@pytest_twisted.ensureDeferred
async def test_credentials_in_any_bytes_are_just_wrong(server: PolicyServer) -> None:
    """Non-ASCII or undecodable Basic and Bearer credentials are 401, like any wrong token, never 500."""
    for authorization in (
        "Bearer été".encode(), b"Bearer \xff\xfe", b"bearer", b"Basic " + base64.b64encode("jane:été".encode()),
        b"Basic " + base64.b64encode(b"jane:\xff\xfe"), b"Basic \xff", b"Basic %%%",
    ):
        for path in (b"/api/v1/blocks", b"/admin"):
            answer = await raw(server, [b"GET %s HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\nConnection: close\r\n\r\n"
                                        % (path, authorization)])
            assert answer_status(answer) == 401, (path, authorization, answer)
    # Other headers in odd bytes are taken as they are.
    answer = await raw(server, [b"GET /api/v1/blocks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                                b"X-Policyd-By: \xff\x1b[2J\r\nAccept-Language: \xff\r\nConnection: close\r\n\r\n"
                                % token(server).encode()])
    assert answer_status(answer) == 200
    assert answer_status(await raw(server, [b"GET /self-service/release/x HTTP/1.1\r\nHost: x\r\n"
                                            b"Accept-Language: \xff\xfe\r\nConnection: close\r\n\r\n"])) == 403


@pytest_twisted.ensureDeferred
async def test_api_numbers_are_checked(server: PolicyServer) -> None:
    """Query and path numbers, JSON numbers and deep JSON: 400 with a reason, never 500."""
    for query in ("abc", "-5", "0", "1.5", "99999999999999999999", "", "²"):
        status, body = await api(server, "GET", f"audit?limit={urllib.parse.quote(query)}")
        assert status == 400 and "limit must be a whole number from 1 to 10000" in body["error"], query
    status, body = await api(server, "GET", "audit?limit=5&other=x")
    assert status == 200
    for ident in ("²", "٣", "99999999999999999999", "0", "-1"):
        status, body = await api(server, "POST", f"exemptions/{urllib.parse.quote(ident)}/approve", {})
        assert status == 400 and "exemption id must be a whole number" in body["error"], ident
    status, body = await api(server, "POST", "exemptions/123/approve", {})
    assert status == 400 and body["error"] == "no exemption #123"
    for limit in (1.5, True, "1e3", [1]):
        status, body = await api(server, "POST", "exemptions", {
            "account": "alice@example.org", "limit": limit, "from": "now", "until": "+1h", "reason": "r"})
        assert status == 400 and body["error"] == "field 'limit' must be a whole number", limit
    status, body = await api(server, "POST", "exemptions", {
        "account": "alice@example.org", "limit": 5, "from": "now", "until": "9999-12-31T23:59:59-12:00", "reason": "r"})
    assert status == 400
    headers = {"Authorization": f"Bearer {token(server)}"}
    status, _, raw_body = await get(f"{base(server)}/api/v1/block", data=b"[" * 60000, headers=headers)
    assert status == 400 and json.loads(raw_body) == {"error": "request body is not JSON"}


@pytest_twisted.ensureDeferred
async def test_form_tokens_are_bound_to_their_purpose_and_user(server: PolicyServer) -> None:
    """The public form's token, or another admin user's, decides nothing on /admin (403, still pending)."""
    _, _, page = await get(f"{base(server)}/exemption")
    public = form_fields(page.decode())["csrf"]
    ident = await request_alice(server, public)
    jane, bob = basic("jane", token(server)), basic("bob", token(server))
    _, _, page = await get(f"{base(server)}/admin", headers=jane)
    janes = form_fields(page.decode())["csrf"]
    for csrf, auth in ((public, jane), (janes, bob), ("", jane), (f"{int(time.time())}.{'0' * 32}", jane)):
        decision = urllib.parse.urlencode({"id": ident, "action": "approve", "reason": "ok", "csrf": csrf}).encode()
        status, _, page = await get(f"{base(server)}/admin", data=decision, headers=auth)
        assert status == 403 and b"The page had expired; nothing was changed." in page
    # The admin page's token is no good on the public form either.
    status, _, page = await get(f"{base(server)}/exemption", data=alice_form(janes))
    assert b"The form has expired" in page
    _, listed = await api(server, "GET", "exemptions")
    assert [e["status"] for e in listed] == ["pending"]
    decision = urllib.parse.urlencode({"id": ident, "action": "approve", "reason": "ok", "csrf": janes}).encode()
    status, _, page = await get(f"{base(server)}/admin", data=decision, headers=jane)
    assert status == 200 and b"approved." in page


def alice_form(csrf: str, account: str = "alice@example.org") -> bytes:
    return urllib.parse.urlencode({
        "account": account, "organisation": "Sales", "start": "2030-01-10T08:00",
        "end": "2030-01-10T18:00", "limit": "9000", "reason": "yearly customer mailing", "csrf": csrf,
    }).encode()


async def request_alice(server: PolicyServer, csrf: str, account: str = "alice@example.org") -> str:
    status, _, _ = await get(f"{base(server)}/exemption", data=alice_form(csrf, account))
    assert status == 201
    _, listed = await api(server, "GET", "exemptions")
    return str(listed[-1]["id"])


@pytest_twisted.ensureDeferred
async def test_admin_decisions_must_come_from_the_admin_page(server: PolicyServer) -> None:
    """A foreign or opaque Origin (or foreign Referer) is 403 and changes nothing; this site's origin works."""
    _, _, page = await get(f"{base(server)}/exemption")
    ident = await request_alice(server, form_fields(page.decode())["csrf"])
    auth = basic("jane", token(server))
    _, _, page = await get(f"{base(server)}/admin", headers=auth)
    csrf = form_fields(page.decode())["csrf"]
    decision = urllib.parse.urlencode({"id": ident, "action": "deny", "reason": "no", "csrf": csrf}).encode()
    here = base(server)
    for foreign in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                    {"Origin": here.replace("127.0.0.1", "localhost")},
                    {"Origin": f"{here}0"}, {"Referer": "https://evil.example/admin"},
                    {"Origin": "https://evil.example", "Referer": f"{here}/admin"}):
        status, kind, page = await get(f"{here}/admin", data=decision, headers={**auth, **foreign})
        assert status == 403 and kind.startswith("text/html"), foreign
        assert b"This request came from another site; nothing was changed." in page
    _, listed = await api(server, "GET", "exemptions")
    assert [e["status"] for e in listed] == ["pending"]
    # Behind a proxy that rewrites Host, X-Forwarded-Host names the public host.
    proxied = {**auth, "Origin": "https://policyd.example.org", "X-Forwarded-Host": "policyd.example.org"}
    status, _, page = await get(f"{here}/admin", data=decision, headers=proxied)
    assert status == 200 and b"denied." in page


@pytest_twisted.ensureDeferred
async def test_no_answer_can_be_framed(server: PolicyServer) -> None:
    """Every page, error and API answer forbids framing (X-Frame-Options and CSP frame-ancestors)."""
    for path, headers in (("/", {}), ("/exemption", {}), ("/admin", {}), ("/admin", basic("jane", token(server))),
                          ("/metrics", {}), ("/api/v1/blocks", {}), ("/self-service/release/x", {}), ("/none", {})):
        request = urllib.request.Request(f"{base(server)}{path}", headers=headers)
        try:
            response = await deferToThread(urllib.request.urlopen, request, timeout=10)
        except urllib.error.HTTPError as error:
            response = error
        assert response.headers["x-frame-options"] == "DENY", path
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"], path
        assert response.headers["x-content-type-options"] == "nosniff", path
        response.close()


@pytest_twisted.ensureDeferred
async def test_the_public_form_is_rate_limited_per_client(server: PolicyServer) -> None:
    """Five requests, then 429 with Retry-After and nothing recorded; a client behind the local proxy counts alone."""
    _, _, page = await get(f"{base(server)}/exemption")
    csrf = form_fields(page.decode())["csrf"]
    for _ in range(5):
        status, _, _ = await get(f"{base(server)}/exemption", data=alice_form(csrf))
        assert status == 201
    request = urllib.request.Request(f"{base(server)}/exemption", data=alice_form(csrf))
    with pytest.raises(urllib.error.HTTPError) as refused:
        await deferToThread(urllib.request.urlopen, request, timeout=10)
    assert refused.value.code == 429 and refused.value.headers["retry-after"] == "60"
    assert b"Please try again in 1 minute" in refused.value.read()
    _, listed = await api(server, "GET", "exemptions")
    assert len(listed) == 5
    status, _, _ = await get(f"{base(server)}/exemption", data=alice_form(csrf),
                             headers={"X-Forwarded-For": "203.0.113.5, 198.51.100.7"})
    assert status == 201
    status, _, _ = await get(f"{base(server)}/exemption")
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_the_form_does_not_tell_which_accounts_exist(server: PolicyServer) -> None:
    """An unknown account gets the very page a known one gets; nothing is pending, the audit log has it."""
    _, _, page = await get(f"{base(server)}/exemption")
    csrf = form_fields(page.decode())["csrf"]
    known = await get(f"{base(server)}/exemption", data=alice_form(csrf, "bob@example.org"))
    unknown = await get(f"{base(server)}/exemption", data=alice_form(csrf, "mallory@example.org"))
    assert known[:2] == unknown[:2] == (201, "text/html; charset=utf-8")
    assert known[2].replace(b"bob@", b"mallory@") == unknown[2]
    _, listed = await api(server, "GET", "exemptions")
    assert [e["account"] for e in listed] == ["bob@example.org"]
    _, audit = await api(server, "GET", "audit")
    assert [(a["action"], a["subject"], a["who"]) for a in audit][-1] == (
        "exemption-refused", "mallory@example.org", "web, claiming mallory@example.org")
    # A wrong field is named alike for both.
    bad = [alice_form(csrf, account).replace(b"limit=9000", b"limit=0") for account in ("bob@example.org", "x@example.org")]
    pages = [(await get(f"{base(server)}/exemption", data=form))[2] for form in bad]
    assert b"Enter a whole number from 4 to 100000." in pages[0]
    assert pages[0].replace(b"bob@", b"x@") == pages[1]


def request_with(headers: dict[bytes, bytes], peer: Any = None) -> Any:
    """An in-memory request carrying ``headers``, from ``peer``."""
    from twisted.web.test.requesthelper import DummyRequest

    request = DummyRequest([b""])
    for name, value in headers.items():
        request.requestHeaders.addRawHeader(name, value)
    if peer is not None:
        request.client = peer
    return request


@pytest.mark.parametrize(("headers", "same"), [
    ({b"host": b"policyd.example.org", b"origin": b"https://policyd.example.org"}, True),
    ({b"host": b"policyd.example.org", b"origin": b"http://policyd.example.org"}, True),
    ({b"host": b"policyd.example.org:443", b"origin": b"https://policyd.example.org"}, True),
    ({b"host": b"127.0.0.1:8080", b"origin": b"http://127.0.0.1:8080"}, True),
    ({b"host": b"[::1]:8080", b"origin": b"http://[::1]:8080"}, True),
    ({b"host": b"POLICYD.example.org", b"origin": b"https://policyd.EXAMPLE.org"}, True),
    ({b"host": b"policyd.example.org"}, True),
    ({b"host": b"policyd.example.org", b"referer": b"https://policyd.example.org/admin"}, True),
    ({b"host": b"127.0.0.1:8080", b"origin": b"https://a.example", b"x-forwarded-host": b"b.example, a.example"}, True),
    ({b"host": b"policyd.example.org", b"origin": b"https://policyd.example.org:8443"}, False),
    ({b"host": b"127.0.0.1:8080", b"origin": b"http://127.0.0.1:8081"}, False),
    ({b"host": b"policyd.example.org", b"origin": b"https://policyd.example.org.evil.example"}, False),
    ({b"host": b"policyd.example.org", b"origin": b"null"}, False),
    ({b"host": b"policyd.example.org", b"origin": b"https://\xc3\xa9.example"}, False),
    ({b"host": b"policyd.example.org", b"origin": b"https://policyd.example.org:99999"}, False),
    ({b"host": b"policyd.example.org", b"referer": b"https://evil.example/policyd.example.org"}, False),
    ({b"origin": b"https://policyd.example.org"}, False),
])
def test_same_origin_compares_host_and_port(headers: dict[bytes, bytes], same: bool) -> None:
    """Origin (or Referer) must name the requested host and port; the scheme may differ behind a proxy."""
    from policyd.web.pages import same_origin

    assert same_origin(request_with(headers)) is same


def test_the_form_counts_the_address_a_local_proxy_saw() -> None:
    """X-Forwarded-For counts only from loopback, by its last address; elsewhere the peer counts."""
    from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

    from policyd.web.pages import client_address

    forwarded = {b"x-forwarded-for": b"203.0.113.9, 2001:db8:5:6::7"}
    assert client_address(request_with(forwarded, IPv4Address("TCP", "127.0.0.1", 1))) == "2001:db8:5:6::/64"
    assert client_address(request_with(forwarded, IPv6Address("TCP", "::1", 1))) == "2001:db8:5:6::/64"
    assert client_address(request_with(forwarded, UNIXAddress(None))) == "2001:db8:5:6::/64"
    assert client_address(request_with(forwarded, IPv4Address("TCP", "192.0.2.1", 1))) == "192.0.2.1"
    assert client_address(request_with({b"x-forwarded-for": b"junk"}, IPv4Address("TCP", "127.0.0.1", 1))) == "127.0.0.1"
    assert client_address(request_with({}, IPv4Address("TCP", "127.0.0.1", 1))) == "127.0.0.1"


@pytest_twisted.ensureDeferred
async def test_a_refused_decision_is_said_in_the_page_language(server: PolicyServer) -> None:
    """Deciding twice, deciding on a request that does not exist, or on one another admin decided: each
    refusal is one sentence in the page's language, and nothing changes."""
    _, _, page = await get(f"{base(server)}/exemption")
    ident = await request_alice(server, form_fields(page.decode())["csrf"])
    status, _ = await api(server, "POST", f"exemptions/{ident}/approve", {"reason": "ok"})
    assert status == 200
    # One request stays pending, so the admin page has its form (and a form token).
    _, _, page = await get(f"{base(server)}/exemption")
    await request_alice(server, form_fields(page.decode())["csrf"], "bob@example.org")
    auth = basic("jane", token(server))
    french = {**auth, "Accept-Language": "fr-FR,fr;q=0.9"}
    cases = [
        ("approve", ident, "la demande n° {id} est déjà acceptée.", "request #{id} is approved already."),
        ("deny", ident, "la demande n° {id} est acceptée, et non en attente.", "request #{id} is approved, not pending."),
        ("approve", "999", "il n'y a pas de demande n° 999.", "there is no request #999."),
    ]
    for action, number, in_french, in_english in cases:
        for headers, prefix, said in ((french, "Rien n'a été modifié : ", in_french),
                                      (auth, "Nothing was changed: ", in_english)):
            _, _, page = await get(f"{base(server)}/admin", headers=headers)
            csrf = form_fields(page.decode())["csrf"]
            decision = urllib.parse.urlencode({"id": number, "action": action, "reason": "x", "csrf": csrf}).encode()
            status, _, page = await get(f"{base(server)}/admin", data=decision, headers=headers)
            shown = html.unescape(page.decode())
            assert status == 200 and prefix + said.format(id=ident) in shown, (action, number, shown[-1500:])
    _, listed = await api(server, "GET", "exemptions")
    assert [(e["status"], e["decided_by"]) for e in listed] == [("approved", "api:admin"), ("pending", "")]
