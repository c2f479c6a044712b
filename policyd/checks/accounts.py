"""Which accounts are valid: a file, a Postfix lookup table, or accounts seen sending."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool

from policyd.errors import ConfigError, PolicydError
from policyd.store import Counts
from policyd.tables import is_table


class Accounts:
    """Answers "is this a valid account?" for exemption requests.

    :param source: ``accounts`` from the configuration: a file of one account
        per line (``#`` comments), a Postfix table ``type:name`` read with
        ``postmap -q``, or None for the accounts that have authenticated.
    :param store: the state store (for accounts seen authenticating).
    :param reactor: a server's reactor: ``postmap`` then runs in its thread
        pool; without it (admin commands) it runs in place.
    """

    def __init__(self, source: str | None, store: Counts, reactor: Any = None) -> None:
        self.source = source
        self.store = store
        self.reactor = reactor

    async def valid(self, account: str) -> bool:
        """Whether ``account`` (lower-cased) is a valid account.

        :raises PolicydError: when the source cannot be read.
        """
        account = account.lower()
        if self.source is None:
            return bool(await self.store.account_seen(account))
        if is_table(self.source):
            if self.reactor is not None and IReactorThreads.providedBy(self.reactor):
                # postmap takes a second or two to fail on a broken table:
                # never on the reactor thread of a server.
                found: bool = await deferToThreadPool(
                    self.reactor, self.reactor.getThreadPool(), self._postmap, account
                )
                return found
            return self._postmap(account)
        return account in self._file()

    def _file(self) -> set[str]:
        try:
            lines = Path(str(self.source)).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ConfigError(f"accounts: cannot read {self.source}: {error.strerror}") from None
        return {line.split("#", 1)[0].strip().lower() for line in lines} - {""}

    def _postmap(self, account: str) -> bool:
        postmap = shutil.which("postmap") or ("/usr/sbin/postmap" if Path("/usr/sbin/postmap").exists() else None)
        if postmap is None:
            raise PolicydError(f"accounts: {self.source} is a Postfix table but postmap is not installed")
        try:
            done = subprocess.run(  # noqa: S603 - fixed program, no shell
                [postmap, "-q", account, str(self.source)], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise PolicydError(f"accounts: postmap -q on {self.source} failed: {error}") from None
        if done.returncode == 0:
            return True
        if done.returncode == 1 and not done.stderr.strip():
            return False
        message = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise PolicydError(f"accounts: postmap -q on {self.source} failed: {message}")
