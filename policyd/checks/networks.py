"""Local network lists (``inbound.networks``): CIDR files, re-read when they change."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from twisted.internet.interfaces import IReactorTime

from policyd.config import NetworkList
from policyd.errors import ConfigError
from policyd.netlists import (
    IPAddress,
    IPNetwork,
    NetworkSet,
    read_cidr_file,
)

log = logging.getLogger("policyd.reputation")
#: How often a CIDR file's modification time is looked at: a stat() per
#: second is nothing, and an edited list applies within a second.
RECHECK_LISTS = 1.0

class WatchedNetworks:
    """A CIDR file of ``inbound.networks``, re-read when it changes.

    A missing file is an empty list (it is picked up when it appears); a file
    that cannot be read keeps the previous list and says so in the log.

    :param entry: the configuration entry.
    :param clock: time source, to look at the file at most once a second.
    :param previous: the same file's list before a reload, whose content is
        kept unless the file changed since.
    :raises ConfigError: when the file exists but holds a line that is not a network.
    """

    def __init__(self, entry: NetworkList, clock: IReactorTime, previous: WatchedNetworks | None = None) -> None:
        self.path = Path(entry.file)
        self.name = self.path.name
        self.weight = entry.weight
        self.allow = entry.allow
        self.clock = clock
        self.networks: list[IPNetwork] = []
        self._set = NetworkSet([])
        self._stamp: tuple[int, int, int] | None = None
        if previous is not None and previous.path == self.path:
            self.networks, self._set, self._stamp = previous.networks, previous._set, previous._stamp
        self._checked = clock.seconds()
        self.load(strict=True)

    def load(self, strict: bool = False) -> None:
        """(Re-)read the file if it changed since the last read."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            if self._stamp != (-1, -1, -1):
                log.warning("network list %s not found: treated as empty until it appears", self.path)
            self._stamp = (-1, -1, -1)
            self.networks, self._set = [], NetworkSet([])
            return
        except OSError as problem:
            if strict:
                raise ConfigError(f"inbound.networks: cannot read {self.path}: {problem.strerror}") from None
            log.error("network list %s: cannot read it (%s): keeping the previous list", self.path, problem.strerror)
            return
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp == self._stamp:
            return
        try:
            networks = read_cidr_file(self.path)
        except (OSError, UnicodeDecodeError, ValueError) as problem:
            if strict:
                raise ConfigError(f"inbound.networks: {problem}") from None
            log.error("network list %s: %s: keeping the previous list", self.path, problem)
            self._stamp = stamp
            return
        self.networks, self._set, self._stamp = networks, NetworkSet(networks), stamp
        log.info("network list %s: %d networks", self.path, len(networks))

    def refresh(self) -> None:
        """Re-read the file if it changed, looking at most once per second."""
        now = self.clock.seconds()
        if now - self._checked >= RECHECK_LISTS:
            self._checked = now
            self.load()

    def match(self, address: IPAddress) -> IPNetwork | None:
        """The network of this list that holds ``address``, if any."""
        if address not in self._set:
            return None
        matching = [n for n in self.networks if address in n]
        return max(matching, key=lambda n: n.prefixlen) if matching else None


# --- once per message ---------------------------------------------------------------
