"""ARC: keys made for policyd arc keygen, and seals that dkimpy's arc_verify passes against an in-memory zone."""

from __future__ import annotations

import stat
from pathlib import Path

import dkim  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives import serialization
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from policyd.config.sections import Arc
from policyd.errors import ConfigError
from policyd.forwarding.arc import (
    dns_record,
    generate_key,
    key_record,
    message_bytes,
    public_key_of,
    read_key,
    seal,
    seal_in_thread,
    write_key,
    zone_lookup,
)
from policyd.reactor import inline

HEADERS = [
    ("From", "Ann <ann@example.net>"),
    ("To", "fwd@example.org"),
    ("Subject", "Minutes of\n the meeting"),
    ("Date", "Thu, 03 Dec 2026 10:00:00 +0000"),
    ("Message-ID", "<m1@example.net>"),
]
BODY = b"See you at the meeting tomorrow.\r\n"


@pytest.fixture(scope="module")
def keys() -> dict[str, bytes]:
    """One RSA key for the forwarder and one for the first hop of a chain (2048 bits take a moment)."""
    return {"forwarder": generate_key()[0], "first": generate_key(1024)[0]}


def zone(keys: dict[str, bytes]) -> dict[str, str]:
    """The TXT records publishing both keys."""
    return {
        "arc1._domainkey.example.org": key_record(public_key_of(keys["forwarder"])),
        "hop._domainkey.example.com": key_record(public_key_of(keys["first"])),
    }


def verify(headers: list[tuple[str, str]], keys: dict[str, bytes]) -> tuple[str, str]:
    """dkimpy's arc_verify of the message with those headers on top: (result, reason)."""
    result, _, reason = dkim.arc_verify(message_bytes(headers + HEADERS, BODY), dnsfunc=zone_lookup(zone(keys)))
    return result.decode(), reason


def test_sealed_message_verifies(keys: dict[str, bytes]) -> None:
    """A message sealed by the forwarder passes arc_verify; the AAR states what was checked on arrival."""
    arc = Arc(domain="example.org", selector="arc1", key="-")
    added = seal(HEADERS, BODY, arc, keys["forwarder"], ["spf=pass smtp.mailfrom=example.net",
                                                          "dkim=pass header.d=example.net"],
                 zone_lookup(zone(keys)))
    names = sorted(name for name, _ in added)
    assert names == ["ARC-Authentication-Results", "ARC-Message-Signature", "ARC-Seal"]
    results = dict(added)["ARC-Authentication-Results"]
    assert results.startswith("i=1; example.org;") and "spf=pass" in results and "dkim=pass" in results
    assert "cv=none" in dict(added)["ARC-Seal"]
    assert verify(added, keys) == ("pass", "success")


def test_incoming_chain_is_continued(keys: dict[str, bytes]) -> None:
    """A message that arrived with a valid ARC set gets i=2 with cv=pass, and the whole chain passes."""
    first = seal(HEADERS, BODY, Arc("example.com", "hop", "-"), keys["first"], ["spf=pass smtp.mailfrom=example.net"],
                 zone_lookup(zone(keys)))
    arrived = first + HEADERS
    added = seal(arrived, BODY, Arc("example.org", "arc1", "-"), keys["forwarder"], ["dkim=none"],
                 zone_lookup(zone(keys)))
    assert "i=2" in dict(added)["ARC-Seal"] and "cv=pass" in dict(added)["ARC-Seal"]
    assert "arc=pass" in dict(added)["ARC-Authentication-Results"]
    assert verify(added + first, keys)[0] == "pass"


def test_broken_incoming_chain_is_sealed_as_failed(keys: dict[str, bytes]) -> None:
    """A chain changed after its seal is continued with cv=fail: receivers see the chain ended here (dkimpy: None)."""
    first = seal(HEADERS, BODY, Arc("example.com", "hop", "-"), keys["first"], ["spf=pass smtp.mailfrom=example.net"],
                 zone_lookup(zone(keys)))
    tampered = [*first, *HEADERS[:2], ("Subject", "changed on the way"), *HEADERS[3:]]
    added = seal(tampered, BODY, Arc("example.org", "arc1", "-"), keys["forwarder"], [], zone_lookup(zone(keys)))
    assert "cv=fail" in dict(added)["ARC-Seal"]
    result, _, reason = dkim.arc_verify(message_bytes(added + tampered, BODY), dnsfunc=zone_lookup(zone(keys)))
    assert result is None and "ARC-Seal[2] reported failure" in reason


def test_seal_past_its_deadline_is_left_out(keys: dict[str, bytes]) -> None:
    """A seal that does not come within the deadline gives no headers: the message is never held for it."""
    clock = Clock()
    pending: Deferred[list[tuple[str, str]]] = Deferred()
    found: list[list[tuple[str, str]]] = []
    seal_in_thread(lambda *a, **k: pending, clock, 5.0, HEADERS, BODY).addCallback(found.append)
    clock.advance(5.1)
    assert found == [[]]
    done = seal_in_thread(inline, clock, 5.0, HEADERS, BODY, Arc("example.org", "arc1", "-"), keys["forwarder"],
                          [], zone_lookup(zone(keys)))
    done.addCallback(found.append)
    assert len(found[1]) == 3


def test_keygen_parts(tmp_path: Path, keys: dict[str, bytes]) -> None:
    """A written key is 0600 and never overwrites; the DNS record publishes its public half in 255-byte strings."""
    path = tmp_path / "arc.key"
    write_key(path, keys["forwarder"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_key(path, keys["first"])
    public = public_key_of(path.read_bytes())
    record = dns_record("example.org", "arc1", public)
    assert record.startswith('arc1._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=')
    assert "".join(record.split(" IN TXT ", 1)[1].split('"')[1::2]) == key_record(public)
    assert read_key(Arc("example.org", "arc1", str(path))) == keys["forwarder"]


def test_pkcs1_key_is_read_and_a_wrong_one_refused(tmp_path: Path, keys: dict[str, bytes]) -> None:
    """forwarding.arc.key may be PKCS#1 PEM; a file that is no RSA key is a ConfigError naming the key."""
    pkcs1 = serialization.load_pem_private_key(keys["first"], None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    path = tmp_path / "pkcs1.key"
    path.write_bytes(pkcs1)
    assert public_key_of(read_key(Arc("example.com", "hop", str(path)))) == public_key_of(keys["first"])
    path.write_text("not a key\n")
    with pytest.raises(ConfigError, match="forwarding.arc.key: .* is not an RSA private key"):
        read_key(Arc("example.com", "hop", str(path)))
