"""Several real ``policyd serve`` processes sharing one real Redis, end to end.

What SPEC 4 promises for a shared store: processes sharing one Redis never
let an account past its limit, whatever the concurrency; when Redis dies each
process still answers in time and keeps the quota in memory; blocks survive a
Redis restart.  Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from policyd.testing import encode, rcpt
from tests.harness.redis_server import RedisServer, running_redis
from tests.harness.servers import PolicydServer, free_port, policyd

#: store.deadline of the servers under test.
DEADLINE = 0.5
#: Allowance on top of the deadline for a reply: generous, this is no benchmark.
MARGIN = 2.5
#: Longest any socket operation of the test clients may wait.
SOCKET_TIMEOUT = 15.0


def write_config(path: Path, port: int, redis_url: str, limit: int, on_error: str) -> Path:
    """A minimal configuration on the shared Redis."""
    path.write_text(
        f'listen:\n  policy: "tcp:{port}:interface=127.0.0.1"\n'
        f'store:\n  url: "{redis_url}"\n  deadline: {DEADLINE}s\n  on_error: {on_error}\n'
        f"local_domains: [example.org]\n"
        f"outbound:\n  limit: {limit}\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server of its own, stopped at the end whatever happens."""
    with running_redis() as server:
        yield server


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., PolicydServer]]:
    """Starts ``policyd serve`` processes; each is stopped (SIGTERM, then SIGKILL) at teardown."""
    started: list[PolicydServer] = []

    def start(redis: RedisServer, limit: int, on_error: str = "dunno") -> PolicydServer:
        port = free_port()
        config = write_config(tmp_path / f"policyd-{port}.yaml", port, redis.url, limit, on_error)
        server = PolicydServer(config, port)
        started.append(server)
        return server.start()

    yield start
    problems = []
    for server in started:
        try:
            status = server.stop()
        except AssertionError as error:  # it needed SIGKILL: report, after stopping the others
            problems.append(f"{server.config.name}: {error}\n{server.output()[-2000:]}")
        else:
            if status != 0:
                problems.append(f"{server.config.name}: exit {status} after SIGTERM\n{server.output()[-2000:]}")
    assert not problems, "\n".join(problems)


class Connection:
    """One policy client connection, as one Postfix smtpd process keeps it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
        self.buffer = b""

    def ask(self, attributes: dict[str, str]) -> str:
        """Send one request and return the reply's action (``DUNNO``, ``REJECT 5.7.1 …``)."""
        self.sock.sendall(encode(attributes))
        while b"\n\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError("the server closed the connection without a reply")
            self.buffer += chunk
        reply, self.buffer = self.buffer.split(b"\n\n", 1)
        text = reply.decode()
        assert text.startswith("action="), text
        return text[len("action=") :]

    def close(self) -> None:
        """Hang up."""
        self.sock.close()


def run_clients(count: int, work: Callable[[int], None], timeout: float = 120.0) -> None:
    """Run ``work(n)`` for n in range(count) in threads started together; re-raise the first error."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run(n: int) -> None:
        try:
            barrier.wait(timeout=30)
            work(n)
        except BaseException as error:  # handed to the test thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"clients still running after {timeout}s"
    if errors:
        raise errors[0]


def admin_json(server: PolicydServer, *args: str) -> list[dict[str, object]]:
    """Run an admin command with --json against the server's configuration."""
    result = policyd(*args, "--json", "-c", str(server.config))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_three_servers_never_let_one_more_through(
    redis_server: RedisServer, start_server: Callable[..., PolicydServer]
) -> None:
    """400 concurrent recipients of one account over 30 connections to 3 servers: exactly limit pass."""
    limit, connections, requests = 50, 30, 400
    servers = [start_server(redis_server, limit, on_error="defer_if_permit") for _ in range(3)]
    actions: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        connection = Connection(servers[n % 3].port)
        try:
            for k in range(n, requests, connections):
                action = connection.ask(
                    rcpt(
                        recipient=f"x{k}@gmail.com",
                        sasl_username="alice",
                        client_address=f"192.0.2.{n + 1}",
                        instance=f"{n}.{k}",
                    )
                )
                with lock:
                    actions.append(action)
        finally:
            connection.close()

    run_clients(connections, client)
    words = Counter(action.split()[0] for action in actions)
    assert len(actions) == requests
    assert words == {"DUNNO": limit, "REJECT": requests - limit}, words
    assert all("blocked" in a for a in actions if a.startswith("REJECT"))
    (status,) = admin_json(servers[0], "status", "alice")
    assert status["count"] == limit and status["blocked"] is True
    (block,) = admin_json(servers[1], "blocks")
    assert block["account"] == "alice" and block["count"] == limit
    assert 0 < len(block["clients"]) <= 20  # type: ignore[arg-type]


def test_redis_outage_mid_load(redis_server: RedisServer, start_server: Callable[..., PolicydServer]) -> None:
    """Redis killed mid-load: every request answered in time, the in-memory limiter holds the
    limit, and once Redis is back (same directory) a block made before the outage is still there."""
    limit, clients, per_client, accounts = 20, 8, 60, 8
    server = start_server(redis_server, limit, on_error="dunno")
    before = Connection(server.port)
    made = [before.ask(rcpt(recipient="y@gmail.com", sasl_username="mallory")).split()[0] for _ in range(limit + 1)]
    before.close()
    assert made == ["DUNNO"] * limit + ["REJECT"]
    assert [b["account"] for b in admin_json(server, "blocks")] == ["mallory"]

    # (sent at, seconds to reply, account, action word) of every request of the load
    replies: list[tuple[float, float, str, str]] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        connection = Connection(server.port)
        try:
            for k in range(per_client):
                account = f"user{(n + k) % accounts}"
                sent = time.monotonic()
                action = connection.ask(rcpt(recipient="z@gmail.com", sasl_username=account, instance=f"{n}.{k}"))
                with lock:
                    replies.append((sent, time.monotonic() - sent, account, action.split()[0]))
                time.sleep(0.01)
        finally:
            connection.close()

    killed_at: list[float] = []

    def kill_when_loaded() -> None:
        deadline = time.monotonic() + 30
        while len(replies) < 40 and time.monotonic() < deadline:
            time.sleep(0.005)
        redis_server.kill()
        killed_at.append(time.monotonic())

    killer = threading.Thread(target=kill_when_loaded, daemon=True)
    killer.start()
    run_clients(clients, client)
    killer.join(35)
    assert killed_at and not redis_server.running

    assert len(replies) == clients * per_client
    slowest = max(seconds for _, seconds, _, _ in replies)
    assert slowest < DEADLINE + MARGIN, f"a reply took {slowest:.2f}s"
    during = [(account, word) for sent, _, account, word in replies if sent > killed_at[0]]
    assert len(during) > clients * per_client // 2, "the outage came too late to test anything"
    passed_during = Counter(account for account, word in during if word == "DUNNO")
    passed_overall = Counter(account for _, _, account, word in replies if word == "DUNNO")
    assert passed_during and max(passed_during.values()) <= limit, passed_during
    assert max(passed_overall.values()) <= limit, passed_overall
    assert any(word == "DEFER" for _, word in during), "the fallback limiter never refused"
    assert "store error" in server.output()

    redis_server.start()
    assert [b["account"] for b in admin_json(server, "blocks")] == ["mallory"]
    after = Connection(server.port)
    try:
        # Answered by Redis again: the fallback limiter would have said DEFER.
        assert after.ask(rcpt(recipient="y@gmail.com", sasl_username="mallory")).startswith("REJECT 5.7.1")
        assert after.ask(rcpt(recipient="y@gmail.com", sasl_username="zoe")) == "DUNNO"
    finally:
        after.close()
    (zoe,) = admin_json(server, "status", "zoe")
    assert zoe["count"] == 1


def test_hung_redis_answers_at_the_deadline(
    redis_server: RedisServer, start_server: Callable[..., PolicydServer]
) -> None:
    """Redis frozen (SIGSTOP, it accepts but never answers): replies come at the deadline, the
    in-memory limiter holds the limit, and the server uses Redis again once it thaws."""
    limit, clients, per_client = 5, 4, 3
    server = start_server(redis_server, limit, on_error="dunno")
    warm = Connection(server.port)
    assert warm.ask(rcpt(recipient="w@gmail.com", sasl_username="walt")) == "DUNNO"
    warm.close()
    replies: list[tuple[float, str]] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        connection = Connection(server.port)
        try:
            for k in range(per_client):
                sent = time.monotonic()
                action = connection.ask(rcpt(recipient="w@gmail.com", sasl_username="walt", instance=f"{n}.{k}"))
                with lock:
                    replies.append((time.monotonic() - sent, action.split()[0]))
        finally:
            connection.close()

    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        run_clients(clients, client)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    assert len(replies) == clients * per_client
    seconds = [s for s, _ in replies]
    assert DEADLINE * 0.8 <= min(seconds) and max(seconds) < DEADLINE + MARGIN, seconds
    words = Counter(word for _, word in replies)
    assert words == {"DUNNO": limit - 1, "DEFER": clients * per_client - (limit - 1)}, words
    again = Connection(server.port)
    try:
        started = time.monotonic()
        assert again.ask(rcpt(recipient="w@gmail.com", sasl_username="thawed")) == "DUNNO"
        assert time.monotonic() - started < DEADLINE
    finally:
        again.close()
    (thawed,) = admin_json(server, "status", "thawed")
    assert thawed["count"] == 1
