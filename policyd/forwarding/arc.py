"""ARC (RFC 8617): the key that seals forwarded mail, and the seal itself (dkimpy).

A receiver that sees mail forwarded by this service cannot check the
original sender's SPF any more (the client is us), and a tagged Subject
breaks the sender's DKIM signature.  One ARC set, added after the milter's
own changes, tells the receiver what was checked on arrival
(ARC-Authentication-Results), signs the message as it leaves
(ARC-Message-Signature) and chains the sets (ARC-Seal).

- :func:`generate_key` / :func:`write_key` / :func:`dns_record`: what
  ``policyd arc keygen`` does: an RSA 2048 key, private (0600), and the
  TXT record to publish at ``SELECTOR._domainkey.DOMAIN``.
- :func:`seal`: the three headers for a message, continuing an incoming
  chain (its ``cv=`` is what :func:`chain_status` found).  dkimpy is
  synchronous and looks keys up through ``dnsfunc``: an in-memory zone in
  tests (:func:`zone_lookup`), twisted.names in the milter
  (:func:`blocking_lookup`), the whole run in the thread pool with a
  deadline (:func:`seal_in_thread`).
"""

from __future__ import annotations

import base64
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]  # dkimpy ships no type hints
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from policyd.config.sections import Arc
from policyd.errors import ConfigError
from policyd.reactor import RunBlocking

log = logging.getLogger("policyd.forwarding")

#: Bits of a key made by ``policyd arc keygen``: what receivers expect of DKIM keys today (RFC 8301: at least 1024).
KEY_BITS = 2048

#: Longest one DNS look-up made while sealing may take.
LOOKUP_TIMEOUT = 2.0

#: Longest a whole seal (chain verification included) may take before the
#: message leaves without one: well under Postfix's milter_content_timeout.
SEAL_DEADLINE = 5.0

#: What dkimpy asks: the TXT record of a name (bytes, no final dot), or None.
DnsFunc = Callable[..., bytes | None]

CRLF = "\r\n"
_FOLD = re.compile(r"\r?\n")

_ARC_HEADERS = ("arc-seal", "arc-message-signature", "arc-authentication-results")


def generate_key(bits: int = KEY_BITS) -> tuple[bytes, str]:
    """A new RSA key: its private half in PEM (PKCS#8) and its public half, base64 DER, for ``p=``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, base64.b64encode(public).decode("ascii")


def public_key_of(private_pem: bytes) -> str:
    """The ``p=`` value (base64 DER) of a PEM private key (PKCS#1 or PKCS#8).

    :raises ValueError: when it is not an unencrypted RSA private key in PEM.
    """
    key = serialization.load_pem_private_key(private_pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(public).decode("ascii")


def key_record(public: str) -> str:
    """The TXT value that publishes a key: ``v=DKIM1; k=rsa; p=...``."""
    return f"v=DKIM1; k=rsa; p={public}"


def dns_record(domain: str, selector: str, public: str) -> str:
    """The zone-file line to publish, long values split in 255-character strings as DNS needs.

    >>> dns_record("example.org", "arc1", "QUJD")
    'arc1._domainkey.example.org. IN TXT "v=DKIM1; k=rsa; p=QUJD"'
    """
    value = key_record(public)
    parts = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return f"{selector}._domainkey.{domain.rstrip('.')}. IN TXT {parts}"


def write_key(path: Path, private_pem: bytes) -> None:
    """Write a private key, readable by its owner only (0600) whatever the umask; never over an existing file.

    :raises FileExistsError: when ``path`` exists (a published key is not replaced by accident).
    """
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        os.write(descriptor, private_pem)
    finally:
        os.close(descriptor)


def read_key(arc: Arc) -> bytes:
    """The private key of ``forwarding.arc``, checked to be an RSA key in PEM.

    :raises ConfigError: naming ``forwarding.arc.key`` when it cannot be read or used.
    """
    try:
        pem = Path(arc.key).read_bytes()
        public_key_of(pem)
    except OSError as error:
        raise ConfigError(f"forwarding.arc.key: cannot read {arc.key}: {error.strerror}") from None
    except (ValueError, TypeError) as error:
        raise ConfigError(f"forwarding.arc.key: {arc.key} is not an RSA private key in PEM: {error}") from None
    return pem


# --- DNS for dkimpy ---------------------------------------------------------------


def zone_lookup(records: Mapping[str, str]) -> DnsFunc:
    """A ``dnsfunc`` answering from a mapping of names to TXT values (tests, and keys known locally)."""
    lowered = {name.lower().rstrip("."): value for name, value in records.items()}

    def lookup(name: bytes | str, timeout: float = LOOKUP_TIMEOUT) -> bytes | None:
        text = name.decode("ascii") if isinstance(name, bytes) else name
        value = lowered.get(text.lower().rstrip("."))
        return None if value is None else value.encode("ascii")

    return lookup


def blocking_lookup(resolver: Any, reactor: Any, timeout: float = LOOKUP_TIMEOUT) -> DnsFunc:
    """A ``dnsfunc`` for code in a thread: asks the twisted.names ``resolver`` on the reactor and waits.

    ``dns.nameservers`` is honoured because the resolver is the one made
    from it (:func:`policyd.checks.resolver.make_resolver`).  A failure or
    a timeout is no record (dkimpy then reports a temporary error for that
    signature, and the message still flows).
    """
    from twisted.internet.threads import blockingCallFromThread

    def lookup(name: bytes | str, timeout: float = timeout) -> bytes | None:
        text = name.decode("ascii") if isinstance(name, bytes) else name
        try:
            answers, _, _ = blockingCallFromThread(reactor, resolver.lookupText, text.rstrip("."), (timeout,))
        except Exception as error:
            log.debug("ARC: TXT look-up of %s failed: %s", text, error)
            return None
        for record in answers:
            payload = getattr(record, "payload", None)
            data = getattr(payload, "data", None)
            if data:
                return b"".join(data)
        return None

    return lookup


# --- the seal ----------------------------------------------------------------------


def message_bytes(headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    """A message from headers (values as the MTA gives them, folded with LF or CRLF) and body, CRLF line ends."""
    lines = [f"{name}: {_FOLD.sub(CRLF, value)}{CRLF}" for name, value in headers]
    return "".join(lines).encode("utf-8", "surrogateescape") + b"\r\n" + body


def chain_status(message: bytes, dnsfunc: DnsFunc) -> str:
    """``none`` without ARC headers, else ``pass`` or ``fail`` as the incoming chain verifies."""
    if not any(line.split(b":", 1)[0].strip().lower().decode("ascii", "replace") in _ARC_HEADERS
               for line in message.split(b"\r\n\r\n", 1)[0].split(b"\r\n")):
        return "none"
    try:
        status, _, reason = dkim.arc_verify(message, dnsfunc=dnsfunc, timeout=LOOKUP_TIMEOUT)
    except Exception as error:
        log.info("ARC: incoming chain cannot be checked (%s): cv=fail", error)
        return "fail"
    result = status.decode("ascii") if isinstance(status, bytes) else str(status)
    if result != "pass":
        log.info("ARC: incoming chain %s: %s", result, reason)
    return "pass" if result == "pass" else "fail"


def seal(
    headers: Sequence[tuple[str, str]],
    body: bytes,
    arc: Arc,
    private_key: bytes,
    results: Sequence[str],
    dnsfunc: DnsFunc,
    authserv_id: str | None = None,
    timestamp: int | None = None,
    cv: str = "",
) -> list[tuple[str, str]]:
    """The ARC set (ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results) to add to a message.

    :param headers: the header block as it leaves, after the milter's own changes.
    :param body: the body as it leaves.
    :param arc: ``forwarding.arc`` (domain, selector).
    :param private_key: the PEM key of ``forwarding.arc.key`` (:func:`read_key`).
    :param results: the authentication results checked on arrival, each as
        RFC 8601 writes it (``spf=pass smtp.mailfrom=example.net``,
        ``dkim=pass header.d=example.net``); the chain's ``arc=`` result is
        added here.
    :param dnsfunc: how keys of the incoming chain are looked up.
    :param authserv_id: who checked (the AAR's first word); default the ARC domain.
    :param timestamp: ``t=`` of the seal (now when None).
    :param cv: the incoming chain's status as verified on arrival (``none``,
        ``pass``, ``fail``); "" verifies it here, on the message as it leaves.
    :returns: (name, value) of each header, value without the name and the
        final line end, folded lines joined by CRLF as the milter sends them.
    """
    server_id = (authserv_id or arc.domain).lower()
    server = server_id.encode("ascii")
    # dkimpy takes the AAR from every Authentication-Results of our authserv-id:
    # ours (added on arrival) would say each result twice.  It never signs them.
    headers = [(n, v) for n, v in headers if n.lower() != "authentication-results" or _claims(v) != server_id]
    message = message_bytes(headers, body)
    cv = cv or chain_status(message, dnsfunc)
    stated = "; ".join([f"arc={cv}", *results]) if cv != "none" else "; ".join(results) or "none"
    # dkimpy takes the AAR's results from an Authentication-Results header of
    # our authserv-id; it is given to dkimpy only (never signed, never added here).
    stamped = b"Authentication-Results: " + server + b"; " + stated.encode("utf-8") + b"\r\n" + message
    lines = dkim.arc_sign(
        stamped,
        arc.selector.encode("ascii"),
        arc.domain.encode("ascii"),
        private_key,
        server,
        timestamp=timestamp,
    )
    sealed = []
    for line in lines:
        name, _, value = line.decode("utf-8", "surrogateescape").partition(":")
        sealed.append((name.strip(), value.strip().replace("\r\n", "\n").replace("\n", "\r\n")))
    return sealed


def _claims(value: str) -> str:
    """The authserv-id an Authentication-Results value claims (lower case)."""
    from policyd.forwarding.authentication import authserv_id_of

    return authserv_id_of(value)


def seal_in_thread(
    run_blocking: RunBlocking,
    clock: IReactorTime,
    deadline: float,
    *args: Any,
    **kwargs: Any,
) -> Deferred[list[tuple[str, str]]]:
    """:func:`seal` off the event loop, within ``deadline`` seconds: no seal (an empty list) when late or failing.

    A message is never held back by its seal: a late or failed seal is
    logged and the message leaves as it would without ``forwarding.arc``.
    """
    done: Deferred[list[tuple[str, str]]] = run_blocking(seal, *args, **kwargs)
    done.addTimeout(deadline, clock)

    def unsealed(failure: Any) -> list[tuple[str, str]]:
        log.error("ARC: no seal added: %s", failure.getErrorMessage() or failure.type.__name__)
        return []

    return done.addErrback(unsealed)
