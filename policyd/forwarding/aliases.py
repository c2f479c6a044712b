"""Which recipients forward: ``forwarding.aliases`` resolved into outside and local targets.

The source is normally the map Postfix itself expands (``virtual_alias_maps``):

- a file in virtual(5) source format: ``alias  target[, target]...`` per
  logical line, ``#`` comments, a line starting with white space continuing
  the one before (as ``postmap`` reads it); or
- a Postfix table (``hash:/etc/postfix/virtual``, ``ldap:...``) read with
  ``postmap -q`` (:mod:`policyd.tables`).

What is supported, as Postfix's virtual(5) does it:

- keys ``user@domain`` and the catch-all ``@domain`` (used only when the
  address has no entry of its own); keys and targets compared without
  regard to case;
- a target ``@otherdomain`` means the same user in ``otherdomain``;
- nested aliases: each target is looked up again, at most
  :data:`MAX_DEPTH` levels and :data:`MAX_ADDRESSES` addresses; a target
  that is its own alias (``a@x  a@x, b@y``) or one already on the path
  (a loop) is kept as a final address, not expanded again.

Not supported (an address in such an entry is not seen as forwarding):
bare ``user`` keys, address extensions (``user+ext@domain`` looked up as
``user@domain``), regexp or pcre tables read from a file path (name them
as a ``type:name`` table, then ``postmap -q`` reads them).

A forwarding recipient is an address the aliases map, directly or through
other aliases, to at least one address outside ``local_domains``.  The file
(or a table's files) is looked at for changes once a second, read again on
SIGHUP (:meth:`Aliases.reload`); table answers are reused for
:data:`TABLE_TTL` seconds.  A source that cannot be read is logged and
counts as empty (mail keeps flowing, no recipient treated as forwarding).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from policyd.config import Config, read_domain_list
from policyd.reactor import RunBlocking, inline
from policyd.tables import TableError, is_table, postmap_query, source_stamp

log = logging.getLogger("policyd.forwarding")

#: Alias levels followed, at most; Postfix's virtual_alias_recursion_limit is
#: 1000, but real alias chains are two or three deep.
MAX_DEPTH = 20

#: Addresses one recipient expands to, at most (Postfix's virtual_alias_address_length_limit is 1000).
MAX_ADDRESSES = 1000

#: How often the file (or a table's files) is looked at for changes.
RECHECK = 1.0

#: Longest a table answer is reused: tables without a file (LDAP, SQL) show changes after this.
TABLE_TTL = 60.0

#: Keys whose table answer is remembered; beyond it the memory starts afresh.
TABLE_CACHE = 50_000

#: After ``postmap`` failed, how long the table is left alone (a broken table must not cost every message).
TABLE_BACKOFF = 30.0

#: Targets are separated by commas and/or white space (virtual(5)).
_SEPARATORS = re.compile(r"[\s,]+")

#: Looks keys up: each found key (lower case) with its targets.
Lookup = Callable[[list[str]], Mapping[str, tuple[str, ...]]]


@attrs.frozen
class Targets:
    """Where one recipient's mail goes after alias expansion.

    :ivar outside: final addresses outside ``local_domains`` (forwarded).
    :ivar local: final addresses in ``local_domains`` (delivered here).
    """

    outside: tuple[str, ...] = ()
    local: tuple[str, ...] = ()

    @property
    def forwards(self) -> bool:
        """Whether the recipient is a forwarding recipient (at least one outside target)."""
        return bool(self.outside)


def normalise(address: str) -> str:
    """An address as keys are compared: no ``<>``, no surrounding space, lower case."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address.strip().lower()


def split_targets(value: str) -> tuple[str, ...]:
    """The targets of a virtual(5) result: ``a@x, b@y`` or ``a@x b@y``."""
    return tuple(normalise(t) for t in _SEPARATORS.split(value) if t.strip())


def parse_virtual(text: str, source: str = "<aliases>") -> dict[str, tuple[str, ...]]:
    """The entries of a virtual(5) source file, keys lower case.

    A line starting with white space continues the logical line before it;
    a key without targets is logged and skipped; a later entry for the same
    key replaces the earlier (postmap warns and keeps the first: the
    warning is logged here too).
    """
    logical: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[:1].isspace() and logical:
            logical[-1] = (logical[-1][0], logical[-1][1] + " " + line.strip())
        else:
            logical.append((number, line.strip()))
    entries: dict[str, tuple[str, ...]] = {}
    for number, line in logical:
        key, _, value = line.partition(" ") if " " in line else line.partition("\t")
        key, targets = normalise(key), split_targets(value)
        if not targets:
            log.warning("forwarding.aliases: %s:%d: %r has no target: ignored", source, number, key[:100])
            continue
        if key in entries:
            log.warning("forwarding.aliases: %s:%d: %s listed again: the first entry is kept", source, number, key)
            continue
        entries[key] = targets
    return entries


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


def _keys(address: str) -> list[str]:
    """The keys an address is looked up by: itself, then its domain's catch-all."""
    local, at, domain = address.rpartition("@")
    return [address, f"@{domain}"] if at and local and domain else [address]


def _rewrite(target: str, address: str) -> str:
    """``@otherdomain`` is the same user in ``otherdomain``."""
    if target.startswith("@"):
        return f"{address.rpartition('@')[0]}{target}"
    return target


def expand(address: str, lookup: Lookup, local_domains: frozenset[str]) -> Targets:
    """The final targets of ``address`` (normalised), split into outside and local.

    An address the aliases do not map is no forwarding recipient: both
    parts empty.  Each level of nesting is one call of ``lookup`` (one
    ``postmap`` for a table), for all addresses of that level at once.
    """
    final: list[str] = []
    frontier: list[tuple[str, frozenset[str]]] = [(address, frozenset())]
    mapped = False
    for _ in range(MAX_DEPTH):
        if not frontier:
            break
        found = lookup(list(dict.fromkeys(k for a, _ in frontier for k in _keys(a))))
        following: list[tuple[str, frozenset[str]]] = []
        for current, path in frontier:
            keys = _keys(current)
            targets = found.get(keys[0]) or (found.get(keys[1]) if len(keys) > 1 else None)
            if targets is None:
                final.append(current)
                continue
            mapped = mapped or current == address
            for target in (_rewrite(t, current) for t in targets):
                if target == current or target in path:
                    final.append(target)  # delivered as it is, as Postfix does: not a loop
                else:
                    following.append((target, path | {current}))
        frontier = following
        if len(final) + len(frontier) > MAX_ADDRESSES:
            log.warning("forwarding.aliases: %s expands to more than %d addresses: the rest ignored",
                        address, MAX_ADDRESSES)
            frontier = frontier[: max(0, MAX_ADDRESSES - len(final))]
    if frontier:
        log.warning("forwarding.aliases: %s nests deeper than %d aliases: not followed further", address, MAX_DEPTH)
        final += [a for a, _ in frontier]
    if not mapped:
        return Targets()
    unique = list(dict.fromkeys(final))
    return Targets(
        outside=tuple(a for a in unique if _domain(a) not in local_domains),
        local=tuple(a for a in unique if _domain(a) in local_domains),
    )


class Aliases:
    """``forwarding.aliases``, a virtual(5) file or a Postfix table, as forwarding targets.

    :param source: the file's path or ``type:name``.
    :param local_domains: our domains (lower case); other domains are outside.
    :param clock: time source (when to look for changes, table answers' age).
    :param run_blocking: how file reads and ``postmap`` run: in a thread in the
        milter (:func:`policyd.reactor.in_thread`), at once otherwise.
    :param query: asks a table (``postmap -q``); replaced in tests.
    """

    def __init__(
        self,
        source: str,
        local_domains: frozenset[str],
        clock: IReactorTime,
        run_blocking: RunBlocking = inline,
        query: Callable[[str, list[str]], dict[str, str]] = postmap_query,
    ) -> None:
        self.source = source
        self.local_domains = frozenset(d.lower() for d in local_domains)
        self.clock = clock
        self.run_blocking = run_blocking
        self.query = query
        self.table = is_table(source)
        self._entries: dict[str, tuple[str, ...]] = {}
        self._stamp: object = None
        self._checked = -RECHECK
        self._answers: dict[str, tuple[tuple[str, ...] | None, float]] = {}
        self._resting_until = 0.0
        self._complained: set[str] = set()

    def reload(self) -> None:
        """Forget what was read (SIGHUP): the next look-up reads the source again."""
        self._stamp = None
        self._checked = -RECHECK
        self._answers.clear()
        self._resting_until = 0.0

    def forwarding_targets(self, recipients: Sequence[str]) -> Deferred[dict[str, Targets]]:
        """The targets of each recipient (as given) that the aliases map; others are left out.

        Never fails: a source that cannot be read counts as empty (logged).
        """
        wanted = list(dict.fromkeys(recipients))
        if not wanted:
            return succeed({})
        return self.run_blocking(self._resolve, wanted, self.clock.seconds())

    def _resolve(self, recipients: list[str], now: float) -> dict[str, Targets]:
        if now - self._checked >= RECHECK or now < self._checked:
            self._checked = now
            self._refresh()
        lookup: Lookup = (lambda keys: self._table_lookup(keys, now)) if self.table else self._file_lookup
        result = {}
        for recipient in recipients:
            targets = expand(normalise(recipient), lookup, self.local_domains)
            if targets.outside or targets.local:
                result[recipient] = targets
        return result

    # --- the source --------------------------------------------------------------

    def _current_stamp(self) -> object:
        return source_stamp(self.source)

    def _refresh(self) -> None:
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return
        if self.table:
            self._answers.clear()
        elif not self._read_file():
            return  # unreadable: keep what was read before, look again later
        self._stamp = stamp

    def _read_file(self) -> bool:
        try:
            text = Path(self.source).read_text(encoding="utf-8")
        except FileNotFoundError:
            if self._entries or self._stamp is None:
                log.warning("forwarding.aliases: %s does not exist: no recipient is forwarding", self.source)
            self._entries = {}
            return True
        except (OSError, UnicodeDecodeError) as error:
            log.error("forwarding.aliases: cannot read %s (%s): keeping the aliases read before", self.source, error)
            return False
        self._entries = parse_virtual(text, self.source)
        log.info("forwarding.aliases: %d aliases read from %s", len(self._entries), self.source)
        return True

    def _file_lookup(self, keys: list[str]) -> dict[str, tuple[str, ...]]:
        return {k: self._entries[k] for k in keys if k in self._entries}

    def _table_lookup(self, keys: list[str], now: float) -> dict[str, tuple[str, ...]]:
        missing = [k for k in keys if not self._fresh(k, now)]
        if missing and now >= self._resting_until:
            try:
                answers = self.query(self.source, missing)
            except TableError as error:
                self._complain(str(error))
                self._resting_until = now + TABLE_BACKOFF
            else:
                self._complained.clear()
                if len(self._answers) + len(missing) > TABLE_CACHE:
                    self._answers.clear()
                for key in missing:
                    value = answers.get(key)
                    self._answers[key] = (split_targets(value) if value else None, now)
        found = {}
        for key in keys:
            cached = self._answers.get(key)
            if cached is not None and cached[0]:
                found[key] = cached[0]
        return found

    def _fresh(self, key: str, now: float) -> bool:
        cached = self._answers.get(key)
        return cached is not None and 0 <= now - cached[1] < TABLE_TTL

    def _complain(self, problem: str) -> None:
        # Once per problem until the table answers again: not one line per message.
        if problem not in self._complained:
            self._complained.add(problem)
            log.error("forwarding.aliases: %s: %s (no recipient treated as forwarding)", self.source, problem)


def aliases_from_config(config: Config, clock: IReactorTime, run_blocking: RunBlocking = inline) -> Aliases | None:
    """The ``forwarding.aliases`` of a configuration, or None when it names none."""
    source = config.forwarding.aliases
    if source is None:
        return None
    return Aliases(source, read_domain_list(config.local_domains, config.source), clock, run_blocking)
