"""``make bench``: policy-protocol load against policyd and the floor of its stack.

Each target is started as its own process pinned to CPU 0; the load
generator runs here, pinned to CPU 1.  The generator speaks the policy
protocol over many connections with pipelining, sending Postfix's full RCPT
request (about 30 attributes) for 1,000 accounts, and measures each reply's
latency.  Two runs per target: as fast as it answers (req/s), and at a fixed
offered rate (latency percentiles).  Every run is bounded in time and count.

Results go to stdout as a table and to ``bench-results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from policyd.testing import encode, rcpt
from tests.servers import POLICYD, free_port, wait_for_port

ACCOUNTS = 1000

FLOOR = '''
import sys
from twisted.internet import asyncioreactor
asyncioreactor.install()
from twisted.internet import reactor, protocol

class Dunno(protocol.Protocol):
    """Answers DUNNO to every request: the floor of a Twisted policy server."""
    buffer = b""
    def dataReceived(self, data):
        buffer = self.buffer + data
        count = buffer.count(b"\\n\\n")
        if count:
            self.transport.write(b"action=DUNNO\\n\\n" * count)
            buffer = buffer[buffer.rfind(b"\\n\\n") + 2:]
        self.buffer = buffer

factory = protocol.Factory.forProtocol(Dunno)
factory.noisy = False
reactor.listenTCP(int(sys.argv[1]), factory, interface="127.0.0.1")
reactor.run()
'''


def requests() -> list[bytes]:
    """Full RCPT requests for ACCOUNTS accounts, to external recipients."""
    return [
        encode(rcpt(recipient=f"friend{n}@example.net", sasl_username=f"user{n}@example.org",
                    client_address=f"198.51.100.{n % 250}", instance=f"{n:x}.{n:08x}.0"))
        for n in range(ACCOUNTS)
    ]


class Load:
    """Counts replies and latencies over many pipelined connections."""

    def __init__(self, port: int, connections: int, depth: int, rate: float | None, seconds: float,
                 limit: int) -> None:
        self.port = port
        self.connections = connections
        self.depth = depth
        self.rate = rate
        self.seconds = seconds
        self.limit = limit
        self.requests = requests()
        self.latencies: list[float] = []
        self.sent = 0
        self.replies = 0
        self.bad = 0
        self.actions: dict[str, int] = {}

    async def run(self) -> dict[str, Any]:
        """Run the load; return the figures."""
        self.stop_at = time.perf_counter() + self.seconds
        started = time.perf_counter()
        await asyncio.gather(*(self.connection(i) for i in range(self.connections)))
        elapsed = time.perf_counter() - started
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(len(lat) * p))] * 1000, 3) if lat else 0.0

        return {
            "requests": self.replies,
            "seconds": round(elapsed, 2),
            "rps": round(self.replies / elapsed),
            "p50_ms": pct(0.50),
            "p95_ms": pct(0.95),
            "p99_ms": pct(0.99),
            "lost": self.sent - self.replies,
            "malformed": self.bad,
            "actions": self.actions,
        }

    async def connection(self, index: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        sent_at: deque[float] = deque()
        n = index
        interval = self.connections / self.rate if self.rate else 0.0
        next_send = time.perf_counter() + (index * interval / self.connections if interval else 0)
        buffer = b""
        done = False
        while not done or sent_at:
            now = time.perf_counter()
            if not done and (now >= self.stop_at or self.sent >= self.limit):
                done = True
            while not done and len(sent_at) < self.depth and (not interval or now >= next_send):
                writer.write(self.requests[n % ACCOUNTS])
                n += self.connections
                sent_at.append(time.perf_counter())
                self.sent += 1
                next_send += interval
                if interval:
                    break
            if not sent_at:
                if interval and not done:
                    await asyncio.sleep(max(0.0, next_send - time.perf_counter()))
                continue
            try:
                wait = None if not interval else max(0.0005, next_send - time.perf_counter())
                chunk = await asyncio.wait_for(reader.read(65536), timeout=wait if not done else 10)
            except TimeoutError:
                if done:
                    break
                continue
            if not chunk:
                break
            buffer += chunk
            while b"\n\n" in buffer:
                reply, buffer = buffer.split(b"\n\n", 1)
                received = time.perf_counter()
                self.latencies.append(received - sent_at.popleft())
                self.replies += 1
                if not reply.startswith(b"action="):
                    self.bad += 1
                word = reply[7:].split(b" ", 1)[0].decode("ascii", "replace")
                self.actions[word] = self.actions.get(word, 0) + 1
        writer.close()


def rss_kb(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@contextmanager
def process(command: list[str], port: int, log: Path, cpu: int = 0) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server pinned to one CPU, wait for its port, stop it afterwards."""
    with open(log, "ab") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                 preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    try:
        wait_for_port(port, 20, child)
        yield child
    finally:
        child.terminate()
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def policyd_config(directory: Path, port: int, store_url: str) -> Path:
    path = directory / f"policyd-{port}.yaml"
    path.write_text(
        f'listen:\n  policy: "tcp:{port}:interface=127.0.0.1"\nstore:\n  url: "{store_url}"\n'
        "local_domains: [example.org]\noutbound:\n  limit: 5000\nlog:\n  decisions: false\n",
        encoding="utf-8",
    )
    return path


def measure(name: str, start: Callable[[int], Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run both loads against one target."""
    port = free_port()
    with start(port) as child:
        flat_out = asyncio.run(Load(port, args.connections, args.depth, None, args.seconds, args.max_requests).run())
        paced = asyncio.run(Load(port, args.connections, 1, args.rate, args.seconds, args.max_requests).run())
        rss = rss_kb(child.pid)
    return {"target": name, "throughput": flat_out, "paced": paced, "rss_kb": rss}


def redis_server(directory: Path) -> Callable[[], Any]:
    """A context manager factory for a scratch redis-server, if installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed: run `make test-deps` first")
    port = free_port()

    @contextmanager
    def running() -> Iterator[int]:
        with process([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                      "--appendonly", "no", "--dir", str(directory)], port, directory / "redis.log", cpu=1):
            yield port

    return running


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--depth", type=int, default=4, help="pipelined requests per connection")
    parser.add_argument("--rate", type=float, default=2000.0, help="offered req/s of the paced run")
    parser.add_argument("--max-requests", type=int, default=400_000)
    parser.add_argument("--json", default="bench-results.json")
    parser.add_argument("--only", action="append", help="run only these targets")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    work = Path(tempfile.mkdtemp(prefix="policyd-bench-"))
    results: list[dict[str, Any]] = []

    def floor(port: int) -> Any:
        return process([sys.executable, "-c", FLOOR, str(port)], port, work / "floor.log")

    def policyd(url: str) -> Callable[[int], Any]:
        return lambda port: process([POLICYD, "serve", "-c", str(policyd_config(work, port, url))],
                                    port, work / "policyd.log")

    targets: list[tuple[str, Callable[[int], Any]]] = [
        ("twisted floor (DUNNO)", floor),
        ("policyd quota, memory", policyd("memory://")),
        ("policyd quota, sqlite", policyd(f"sqlite:///{work}/state.db")),
    ]
    redis = None
    if not args.only or any("redis" in o for o in args.only):
        redis = redis_server(work)
    try:
        if redis is not None:
            with redis() as redis_port:
                for name, start in targets:
                    if not args.only or any(o in name for o in args.only):
                        results.append(measure(name, start, args))
                name = "policyd quota, redis"
                if not args.only or any(o in name for o in args.only):
                    results.append(measure(name, policyd(f"redis://127.0.0.1:{redis_port}/0"), args))
        else:
            for name, start in targets:
                if not args.only or any(o in name for o in args.only):
                    results.append(measure(name, start, args))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.connections} connections, depth {args.depth}, {ACCOUNTS} accounts, "
          f"full RCPT requests; paced run at {args.rate:g} req/s\n")
    header = f"{'target':28} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} | {'paced p50':>9} {'p95':>7} {'p99':>7} | {'RSS MiB':>7} {'lost':>5}"
    print(header)
    print("-" * len(header))
    for r in results:
        t, p = r["throughput"], r["paced"]
        print(f"{r['target']:28} {t['rps']:>8} {t['p50_ms']:>8} {t['p99_ms']:>8} | "
              f"{p['p50_ms']:>9} {p['p95_ms']:>7} {p['p99_ms']:>7} | {r['rss_kb'] / 1024:>7.1f} "
              f"{t['lost'] + p['lost'] + t['malformed'] + p['malformed']:>5}")
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nfull results in {args.json}")


if __name__ == "__main__":
    main()
