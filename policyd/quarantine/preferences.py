"""Each recipient's spam choice: their own, else provisioning's, else the default.

Three sources, strongest first:

1. **Their own choice**, recorded in the store by ``policyd prefs set`` or on
   the self-service preference page.
2. **Provisioning** (``quarantine.preferences``): what the account system
   says, either a file of ``address  inbox|quarantine`` lines or a Postfix
   lookup table (``hash:/etc/postfix/spam``, ``ldap:...``) read with
   ``postmap -q``.  A key ``@example.org`` covers every address of that
   domain (as in Postfix's virtual(5)).  The file or table is read again
   when it changes (looked at once a second), on SIGHUP, and, for tables
   without a file (LDAP, SQL), every :data:`TABLE_TTL` seconds.
3. ``quarantine.default``.

A provisioning source that cannot be read is logged and counts as empty:
mail keeps flowing by the other two.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from policyd.config import Config
from policyd.reactor import RunBlocking, inline
from policyd.store import SPAM_CHOICES, Choices
from policyd.tables import TableError, is_table, postmap_query, source_stamp

log = logging.getLogger("policyd.preferences")

#: Where a choice came from.
OWN = "own"
PROVISIONED = "provisioned"
DEFAULT = "default"

#: How often the provisioning file (or a table's files) is looked at for changes.
RECHECK = 1.0

#: Longest a Postfix table answer is reused: tables without a file of their
#: own (LDAP, SQL) show their changes after this.
TABLE_TTL = 60.0

#: Addresses whose table answer is remembered; beyond it the memory starts afresh.
TABLE_CACHE = 50_000

#: Longest one ``postmap -q`` may take.
POSTMAP_TIMEOUT = 10.0

#: After ``postmap`` failed, how long it is left alone: a broken table (postmap
#: takes a second to fail) must not cost every message that second.
TABLE_BACKOFF = 30.0

@attrs.frozen
class Choice:
    """An address's spam choice and where it came from (:data:`OWN`, :data:`PROVISIONED`, :data:`DEFAULT`)."""

    spam: str
    source: str


def lookup_keys(address: str) -> tuple[str, str | None]:
    """The keys a provisioning source is asked for: the address, then ``@domain``."""
    _, at, domain = address.rpartition("@")
    return address, (f"@{domain}" if at and domain else None)


def _clean_choice(value: str) -> str | None:
    word = value.strip().split()[0].lower() if value.strip() else ""
    return word if word in SPAM_CHOICES else None


class ProvisionedChoices:
    """The choices of ``quarantine.preferences``, a file or a Postfix table.

    :param source: the file's path or ``type:name``.
    :param clock: time source (when to look for changes).
    :param run_blocking: how file reads and ``postmap`` run: in a thread in
        the servers (:func:`policyd.reactor.in_thread`), at once otherwise.
    """

    def __init__(self, source: str, clock: IReactorTime, run_blocking: RunBlocking = inline) -> None:
        self.source = source
        self.clock = clock
        self.run_blocking = run_blocking
        self.table = is_table(source)
        self._entries: dict[str, str] = {}
        self._stamp: object = None
        self._checked = -RECHECK
        self._answers: dict[str, tuple[str | None, float]] = {}
        self._complained: set[str] = set()
        self._resting_until = 0.0

    # --- changes ---------------------------------------------------------------

    def _current_stamp(self) -> object:
        return source_stamp(self.source)

    def reload(self) -> None:
        """Forget what was read (SIGHUP): the next look-up reads the source again."""
        self._stamp = None
        self._checked = -RECHECK
        self._answers.clear()
        self._resting_until = 0.0

    # --- look-ups --------------------------------------------------------------

    def lookup(self, addresses: Sequence[str]) -> Deferred[dict[str, str]]:
        """The provisioned choice of each (normalised) address that has one."""
        wanted = list(dict.fromkeys(addresses))
        if not wanted:
            return succeed({})
        now = self.clock.seconds()
        if now - self._checked >= RECHECK or now < self._checked:
            self._checked = now
            return self.run_blocking(self._refresh_and_lookup, wanted, now)
        if self.table:
            return self.run_blocking(self._table_lookup, wanted, now)
        return succeed(self._file_lookup(wanted))

    def _refresh_and_lookup(self, wanted: list[str], now: float) -> dict[str, str]:
        stamp = self._current_stamp()
        if stamp != self._stamp:
            if self.table:
                self._answers.clear()
            elif not self._read_file():
                return self._file_lookup(wanted)  # unreadable: keep the old entries, look again later
            self._stamp = stamp
        return self._table_lookup(wanted, now) if self.table else self._file_lookup(wanted)

    def _read_file(self) -> bool:
        try:
            text = Path(self.source).read_text(encoding="utf-8")
        except FileNotFoundError:
            if self._entries or self._stamp is None:
                log.warning("quarantine.preferences: %s does not exist: no provisioned choices", self.source)
            self._entries = {}
            return True
        except (OSError, UnicodeDecodeError) as error:
            log.error("quarantine.preferences: cannot read %s (%s): keeping the choices read before",
                      self.source, error)
            return False
        entries: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            key, *value = line.split(None, 1)
            choice = _clean_choice(value[0] if value else "")
            if choice is None:
                log.warning("quarantine.preferences: %s:%d: %r is not 'ADDRESS inbox|quarantine': ignored",
                            self.source, number, line[:100])
                continue
            entries[key.strip().lower()] = choice
        self._entries = entries
        log.info("quarantine.preferences: %d provisioned choices read from %s", len(entries), self.source)
        return True

    def _file_lookup(self, wanted: list[str]) -> dict[str, str]:
        found = {}
        for address in wanted:
            key, domain = lookup_keys(address)
            choice = self._entries.get(key) or (self._entries.get(domain) if domain else None)
            if choice is not None:
                found[address] = choice
        return found

    def _table_lookup(self, wanted: list[str], now: float) -> dict[str, str]:
        keys: list[str] = []
        for address in wanted:
            keys += [k for k in lookup_keys(address) if k is not None]
        missing = [k for k in dict.fromkeys(keys) if not self._fresh(k, now)]
        if missing and now >= self._resting_until:
            answers = self._postmap(missing)
            if answers is None:
                self._resting_until = now + TABLE_BACKOFF
            else:
                if len(self._answers) + len(missing) > TABLE_CACHE:
                    self._answers.clear()
                for key in missing:
                    self._answers[key] = (answers.get(key), now)
        found = {}
        for address in wanted:
            key, domain = lookup_keys(address)
            choice = self._cached(key) or (self._cached(domain) if domain else None)
            if choice is not None:
                found[address] = choice
        return found

    def _fresh(self, key: str, now: float) -> bool:
        cached = self._answers.get(key)
        return cached is not None and 0 <= now - cached[1] < TABLE_TTL

    def _cached(self, key: str) -> str | None:
        cached = self._answers.get(key)
        return None if cached is None else cached[0]

    def _postmap(self, keys: list[str]) -> dict[str, str] | None:
        """``postmap -q - TABLE`` with the keys on its input; None when it failed (logged)."""
        started = time.monotonic()
        try:
            found = postmap_query(self.source, keys, POSTMAP_TIMEOUT)
        except TableError as error:
            self._complain(str(error))
            return None
        self._complained.clear()
        answers: dict[str, str] = {}
        for key, value in found.items():
            choice = _clean_choice(value)
            if choice is not None:
                answers[key] = choice
            else:
                self._complain(f"{key!r} has {value[:40]!r}, not inbox or quarantine")
        log.debug("postmap -q on %s: %d keys in %.1f ms", self.source, len(keys), (time.monotonic() - started) * 1000)
        return answers

    def _complain(self, problem: str) -> None:
        # Once per problem until the table answers again: not one line per message.
        if problem not in self._complained:
            self._complained.add(problem)
            log.error("quarantine.preferences: %s: %s (those addresses get the other choices)", self.source, problem)


class Preferences:
    """Resolves spam choices: own (store) > provisioned > ``quarantine.default``.

    :param config: the configuration (``quarantine.default``, ``quarantine.preferences``).
    :param store: where own choices are recorded.
    :param clock: time source.
    :param run_blocking: how provisioning is read (a thread in the servers).
    """

    def __init__(self, config: Config, store: Choices, clock: IReactorTime, run_blocking: RunBlocking = inline) -> None:
        self.store = store
        self.clock = clock
        self.run_blocking = run_blocking
        self.provisioned: ProvisionedChoices | None = None
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Apply a (re)loaded configuration; provisioning is read again (SIGHUP)."""
        self.config = config
        source = config.quarantine.preferences
        if source is None:
            self.provisioned = None
        elif self.provisioned is not None and self.provisioned.source == source:
            self.provisioned.reload()
        else:
            self.provisioned = ProvisionedChoices(source, self.clock, self.run_blocking)

    async def choices(self, addresses: Sequence[str]) -> dict[str, Choice]:
        """The choice of each normalised address, and where it came from.

        :raises StoreError: when the store cannot say (provisioning problems are only logged).
        """
        wanted = list(dict.fromkeys(addresses))
        own = await self.store.preferences(wanted)
        rest = [a for a in wanted if a not in own]
        provisioned: dict[str, str] = {}
        if rest and self.provisioned is not None:
            try:
                provisioned = await self.provisioned.lookup(rest)
            except Exception as error:  # never let provisioning stop mail
                log.error("quarantine.preferences: look-up failed: %s", error)
        result = {}
        for address in wanted:
            if address in own:
                result[address] = Choice(own[address], OWN)
            elif address in provisioned:
                result[address] = Choice(provisioned[address], PROVISIONED)
            else:
                result[address] = Choice(self.config.quarantine.default, DEFAULT)
        return result

    async def spam(self, addresses: Sequence[str]) -> dict[str, str]:
        """The choice (``inbox`` or ``quarantine``) of each normalised address."""
        return {a: c.spam for a, c in (await self.choices(addresses)).items()}
