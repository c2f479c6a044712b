"""CPU per message of the checks on arrival (SPF, DKIM, DMARC) and of the ARC seal, for ``make bench``.

The milter protocol is driven in memory (:class:`policyd.testing.FakeMTA`),
one connection, ``count`` messages of about 2 KB, DKIM-signed (RSA 2048) by
the sender, on one CPU of this process:

- the milter protocol with a filter that accepts everything (its floor);
- policyd's filter (scoring a small word model, X-Spam-* handling);
- the same with the checks on arrival (SPF for MAIL FROM and HELO, the
  DKIM signature, DMARC): what ``forwarding.authenticate`` adds;
- the same, the message going to a forwarding alias and sealed with ARC
  (RSA 2048): what ``forwarding.arc`` adds.

DNS answers come from memory, as from a warm cache: the time spent waiting
for a resolver is not CPU and is bounded by ``dns.deadline``; the hops to
the thread pool are not counted either.  Bounded: ``count`` messages per row.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]
from twisted.internet.defer import succeed
from twisted.internet.task import Clock

from policyd.config import load_text
from policyd.config.sections import Arc
from policyd.content.scorer import ContentScorer
from policyd.content.spamfilter import SpamFilter
from policyd.forwarding.aliases import Aliases
from policyd.forwarding.arc import (
    generate_key,
    key_record,
    message_bytes,
    public_key_of,
    zone_lookup,
)
from policyd.forwarding.authentication import Authenticator
from policyd.forwarding.lookups import memory_lookup
from policyd.forwarding.sealing import ArcSealer
from policyd.protocols.milter import ACCEPT_UNCHANGED
from policyd.protocols.milter_session import MilterProtocol
from policyd.reactor import inline
from policyd.store.memory import MemoryStore
from policyd.testing import FakeMTA
from tests.unit.quarantine.test_held import SECRET, WordModel

FLOOR_ROW = "milter protocol, accept all (floor)"
FILTER_ROW = "policyd filter"
AUTH_ROW = "policyd filter + SPF, DKIM, DMARC"
SEAL_ROW = "policyd filter + checks + ARC seal (forwarded)"

BODY = "".join(f"Line {n} of a plain message of about two kilobytes, as mail usually is.\r\n"
               for n in range(28)).encode()


def _signed(key: bytes) -> list[tuple[str, str]]:
    headers = [("From", "Ann <ann@example.com>"), ("To", "fwd@example.org"), ("Subject", "Meeting notes"),
               ("Date", "Thu, 03 Dec 2026 10:00:00 +0000"), ("Message-ID", "<bench@example.com>")]
    signature = dkim.sign(message_bytes(headers, BODY), b"sel", b"example.com", key,
                          include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    name, _, value = signature.decode().partition(":")
    return [(name, value.strip().replace("\r\n", "\n")), *headers]


def _run(filter_: Any, clock: Clock, recipient: str, headers: list[tuple[str, str]], count: int) -> float:
    """CPU milliseconds per message for ``count`` messages on one milter connection."""
    mta = FakeMTA(MilterProtocol(filter_, clock))
    mta.negotiate()
    mta.connect(hostname="mail.example.com", address="192.0.2.7")
    mta.command(b"H", b"mail.example.com\0")
    started = time.process_time()
    for _ in range(count):
        replies = mta.message("ann@example.com", [recipient], headers, BODY)
        assert replies and replies[-1].command == b"a", replies
    return (time.process_time() - started) * 1000 / count


def measure(count: int = 300) -> list[dict[str, Any]]:
    """One row per configuration: CPU ms per message, and what it adds to the row before."""
    sender_key, arc_key = generate_key()[0], generate_key()[0]
    headers = _signed(sender_key)
    zone = memory_lookup({
        ("example.com", "TXT"): [(b"v=spf1 ip4:192.0.2.0/24 -all",)],
        ("mail.example.com", "TXT"): [(b"v=spf1 ip4:192.0.2.0/24 -all",)],
        ("_dmarc.example.com", "TXT"): [(b"v=DMARC1; p=reject",)],
        ("sel._domainkey.example.com", "TXT"): [(key_record(public_key_of(sender_key)).encode(),)],
    })
    clock = Clock()
    with tempfile.TemporaryDirectory(prefix="policyd-bench-auth-") as directory:
        aliases_file = Path(directory) / "virtual"
        aliases_file.write_text("fwd@example.org  someone@example.net\n", encoding="utf-8")
        config = load_text(f"local_domains: [example.org]\nforwarding:\n  aliases: {aliases_file}\n", "bench.yaml")
        aliases = Aliases(str(aliases_file), frozenset({"example.org"}), clock)

        def spam_filter(checks: bool = False, seal: bool = False) -> SpamFilter:
            authenticator = Authenticator("mx.example.org", lambda deadline: zone, inline, clock, 5.0)
            keys = zone_lookup({"arc1._domainkey.example.org": key_record(public_key_of(arc_key))})
            sealer = ArcSealer(Arc("example.org", "arc1", "-"), arc_key, aliases, keys, inline, clock,
                               authserv_id="mx.example.org")
            return SpamFilter(config, MemoryStore(), clock, ContentScorer(WordModel(), SECRET), aliases=aliases,
                              authenticator=authenticator if checks else None, sealer=sealer if seal else None)

        cases = [
            (FLOOR_ROW, lambda message: succeed(ACCEPT_UNCHANGED), "bob@example.org"),
            (FILTER_ROW, spam_filter(), "bob@example.org"),
            (AUTH_ROW, spam_filter(checks=True), "bob@example.org"),
            (SEAL_ROW, spam_filter(checks=True, seal=True), "fwd@example.org"),
        ]
        rows: list[dict[str, Any]] = []
        for name, filter_, recipient in cases:
            _run(filter_, clock, recipient, headers, min(count, 20))  # warm up
            cpu = _run(filter_, clock, recipient, headers, count)
            added = round(cpu - rows[-1]["cpu_ms_per_msg"], 3) if rows else None
            rows.append({"target": name, "messages": count, "cpu_ms_per_msg": round(cpu, 3), "adds_ms": added})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as text."""
    lines = ["Checks on arrival and ARC seal, in memory (CPU ms per message; DNS from a warm cache)",
             f"{'configuration':<50} {'cpu ms':>8} {'adds ms':>8}"]
    for row in rows:
        added = "" if row["adds_ms"] is None else f"{row['adds_ms']:.3f}"
        lines.append(f"{row['target']:<50} {row['cpu_ms_per_msg']:>8.3f} {added:>8}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(measure()))
