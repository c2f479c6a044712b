"""``policyd arc keygen|record``: the key that seals forwarded mail, and the DNS record that publishes it."""

from __future__ import annotations

import re
from pathlib import Path

import click

from policyd.cli.common import cli, config_option, json_option, load_config, show
from policyd.errors import UsageError

#: A DNS name of letters, digits, hyphens and underscores, dot-separated (selectors may hold dots too).
_NAME = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?:\.(?!-)[A-Za-z0-9_-]{1,63})*\.?$")


def _dns_name(what: str, value: str) -> str:
    if not _NAME.match(value) or len(value) > 253:
        raise UsageError(f"{what}: {value!r} is not a DNS name")
    return value.rstrip(".").lower()


@cli.group()
def arc() -> None:
    """ARC seals of forwarded mail (forwarding.arc)."""


@arc.command("keygen")
@config_option
@click.option("--domain", required=True, help="Domain of the seal (d=), one of ours.")
@click.option("--selector", required=True, help="Selector (s=): the key is published at SELECTOR._domainkey.DOMAIN.")
@click.option("--key", "key_path", required=True, metavar="PATH", help="Where to write the private key (0600).")
@json_option
def arc_keygen(domain: str, selector: str, key_path: str, as_json: bool) -> None:
    """Write a new RSA 2048 private key and print the DNS TXT record to publish.

    An existing file is never replaced: a published key would stop matching.
    """
    from policyd.forwarding.arc import dns_record, generate_key, write_key

    domain, selector = _dns_name("--domain", domain), _dns_name("--selector", selector)
    path = Path(key_path)
    if path.exists():
        raise UsageError(f"{path}: exists; not replaced (remove it first to make a new key)")
    private, public = generate_key()
    try:
        write_key(path, private)
    except OSError as error:
        raise UsageError(f"{path}: cannot write the key: {error.strerror}") from None
    record = dns_record(domain, selector, public)
    show(as_json, {"key": str(path), "name": f"{selector}._domainkey.{domain}", "record": record}, record)


@arc.command("record")
@config_option
@json_option
def arc_record(as_json: bool) -> None:
    """Print the DNS TXT record of the key named by forwarding.arc in the configuration."""
    from policyd.forwarding.arc import dns_record, public_key_of, read_key

    config = load_config()
    settings = config.forwarding.arc
    if settings is None:
        raise UsageError(f"{config.source}: forwarding.arc is not set")
    record = dns_record(settings.domain, settings.selector, public_key_of(read_key(settings)))
    name = f"{settings.selector}._domainkey.{settings.domain}"
    show(as_json, {"key": settings.key, "name": name, "record": record}, record)
