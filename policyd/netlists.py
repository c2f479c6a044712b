"""Sets of IP networks (allowed clients, trusted networks, CIDR files)."""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from pathlib import Path

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class NetworkSet:
    """Answers "is this address in one of these networks?" quickly.

    Networks are grouped by prefix length, so a look-up costs one masked
    dictionary probe per distinct prefix length, whatever the number of
    networks.
    """

    def __init__(self, networks: Iterable[str | IPNetwork]) -> None:
        self.networks: list[IPNetwork] = [
            n if not isinstance(n, str) else ipaddress.ip_network(n, strict=False) for n in networks
        ]
        self._by_length: dict[tuple[int, int], set[int]] = {}
        for network in self.networks:
            key = (network.version, network.prefixlen)
            self._by_length.setdefault(key, set()).add(int(network.network_address))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: object) -> bool:
        if isinstance(address, str):
            parsed = parse_address(address)
            if parsed is None:
                return False
            address = parsed
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        value = int(address)
        bits = 32 if address.version == 4 else 128
        for (version, length), starts in self._by_length.items():
            if version != address.version:
                continue
            if (value >> (bits - length) << (bits - length)) in starts:
                return True
        return False


def parse_address(text: str) -> IPAddress | None:
    """Parse a client address as Postfix writes it (IPv6 without brackets).

    An IPv4-mapped IPv6 address is read as the IPv4 address it carries.
    Recent answers are remembered: the same clients come back for every
    recipient, and ``ipaddress`` is slow to parse (slower still to refuse a
    HELO name).  Text too long to be an address is not (so the memory is
    bounded whatever clients send).
    """
    if len(text) > _LONGEST_ADDRESS:
        return None
    return _parse_address(text)


#: Longer than any address Postfix writes (an IPv6 address is at most 45 characters).
_LONGEST_ADDRESS = 100


@functools.lru_cache(maxsize=4096)
def _parse_address(text: str) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def read_cidr_file(path: str | Path) -> list[IPNetwork]:
    """Read one network per line; ``#`` starts a comment anywhere on a line.

    :raises ValueError: naming the line of the first entry that is not a network.
    """
    networks: list[IPNetwork] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{path}:{number}: {entry!r} is not an IP network") from None
    return networks


_OCTET = re.compile(r"^(\d+|\[[\d.;]+\])$")


def parse_code_filter(text: str) -> list[set[int]]:
    """Parse a postscreen-style return-code filter such as ``127.0.0.[2..11]``.

    Each of the four octets is a number, or brackets holding numbers and
    ``a..b`` ranges separated by ``;``.  Returns the allowed values per octet.

    :raises ValueError: when the filter cannot be read.
    """
    octets = text.strip().split(".") if "[" not in text else _split_octets(text.strip())
    if len(octets) != 4:
        raise ValueError(f"return-code filter {text!r} must have four octets")
    allowed: list[set[int]] = []
    for octet in octets:
        if not _OCTET.match(octet):
            raise ValueError(f"return-code filter {text!r}: cannot read {octet!r}")
        values: set[int] = set()
        for part in octet.strip("[]").split(";"):
            low, _, high = part.partition("..")
            start, end = int(low), int(high or low)
            if not 0 <= start <= end <= 255:
                raise ValueError(f"return-code filter {text!r}: bad range {part!r}")
            values.update(range(start, end + 1))
        allowed.append(values)
    return allowed


def _split_octets(text: str) -> list[str]:
    octets, depth, current = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "." and depth == 0:
            octets.append(current)
            current = ""
        else:
            current += char
    octets.append(current)
    return octets
