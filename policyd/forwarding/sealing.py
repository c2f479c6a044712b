"""The milter's ARC step: one seal on mail that leaves for a forwarding recipient.

:class:`ArcSealer` takes the verdict the filter reached and, when the
message still goes to at least one forwarding recipient, adds the three
ARC headers computed on the message as it will leave (the verdict's header
changes applied).  Everything else passes through unchanged: mail for local
recipients only, discarded or refused mail, and mail whose body was not
kept whole (the signature would not match what leaves).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from policyd.config import Config
from policyd.config.sections import Arc
from policyd.forwarding.aliases import Aliases
from policyd.forwarding.arc import SEAL_DEADLINE, DnsFunc, seal_in_thread
from policyd.forwarding.authentication import Results
from policyd.protocols.milter import (
    ACCEPT,
    ADDHEADER,
    CHGHEADER,
    DELRCPT,
    INSHEADER,
    Verdict,
    insert_header,
)
from policyd.protocols.milter_message import MilterMessage
from policyd.reactor import RunBlocking

log = logging.getLogger("policyd.forwarding")

_HEADER_ACTIONS = (ADDHEADER, CHGHEADER, INSHEADER)


def _apply(headers: Sequence[tuple[str, str]], verdict: Verdict) -> list[tuple[str, str]]:
    """The header block as it leaves after the verdict's header changes."""
    from policyd.content.spamfilter import apply_changes

    return apply_changes(headers, [m for m in verdict.modifications if m.action in _HEADER_ACTIONS])


class ArcSealer:
    """Adds one ARC set to a verdict for mail that still goes to a forwarding recipient.

    :param arc: ``forwarding.arc`` (domain, selector).
    :param key: its private key in PEM (:func:`policyd.forwarding.arc.read_key`).
    :param aliases: which recipients forward.
    :param dnsfunc: how an incoming chain's keys are looked up (twisted.names in the milter).
    :param run_blocking: where dkimpy runs (the thread pool in the milter).
    :param clock: for the deadline.
    :param deadline: seconds a seal may take before the message leaves without one.
    :param authserv_id: who checked, the first word of ARC-Authentication-Results
        (default: the ARC domain).
    """

    def __init__(
        self,
        arc: Arc,
        key: bytes,
        aliases: Aliases,
        dnsfunc: DnsFunc,
        run_blocking: RunBlocking,
        clock: IReactorTime,
        deadline: float = SEAL_DEADLINE,
        authserv_id: str | None = None,
    ) -> None:
        self.arc = arc
        self.authserv_id = authserv_id
        self.key = key
        self.aliases = aliases
        self.dnsfunc = dnsfunc
        self.run_blocking = run_blocking
        self.clock = clock
        self.deadline = deadline

    def __call__(self, verdict: Verdict, message: MilterMessage, checked: Results | None = None) -> Deferred[Verdict]:
        """The verdict, with the ARC set added when the message still goes to a forwarding recipient.

        :param checked: what the checks on arrival found (none: the set says only the chain's result).
        """
        if verdict.reply != ACCEPT or not message.recipients or not message.complete:
            return succeed(verdict)
        return Deferred.fromCoroutine(self._sealed(verdict, message, checked))

    async def _sealed(self, verdict: Verdict, message: MilterMessage, checked: Results | None) -> Verdict:
        removed = {m.name for m in verdict.modifications if m.action == DELRCPT}
        staying = [r for r in message.recipients if r not in removed]
        try:
            found = await self.aliases.forwarding_targets(staying)
        except Exception as error:  # never let the aliases stop mail
            log.error("forwarding.aliases: look-up failed (%s): no ARC seal", error)
            return verdict
        if not any(targets.forwards for targets in found.values()):
            return verdict
        headers = _apply(message.headers, verdict)
        added: list[tuple[str, str]] = await seal_in_thread(
            self.run_blocking, self.clock, self.deadline,
            headers, message.body(), self.arc, self.key, results(checked), self.dnsfunc,
            authserv_id=self.authserv_id, cv=checked.arc if checked is not None else "",
        )
        if not added:
            return verdict
        # Unfolded: relaxed canonicalisation (what the seal signs) reads them the
        # same, and a milter header value needs no line ends.  On top, as RFC 8617 orders them.
        seal = [insert_header(name, value.replace("\r\n", "")) for name, value in added]
        return Verdict(tuple(verdict.modifications) + tuple(seal), verdict.reply, verdict.smtp_reply)


def results(checked: Results | None) -> list[str]:
    """The authentication results checked on arrival (SPF, DKIM, DMARC), for ARC-Authentication-Results.

    Without the checks (``forwarding.authenticate: false``) the set says
    what the chain's verification found, nothing more.
    """
    return [] if checked is None else checked.texts()


def arc_sealer(config: Config, aliases: Aliases | None, reactor: Any, run_blocking: RunBlocking) -> ArcSealer | None:
    """The milter's sealer for ``forwarding.arc`` (None when it or the aliases are not set).

    Keys of an incoming chain are looked up through twisted.names with
    ``dns.nameservers``.

    :raises ConfigError: when the key cannot be read or is no RSA key.
    """
    from policyd.checks.resolver import make_resolver
    from policyd.forwarding.arc import LOOKUP_TIMEOUT, blocking_lookup, read_key
    from policyd.forwarding.authentication import authserv_id

    arc = config.forwarding.arc
    if arc is None or aliases is None:
        return None
    resolver = make_resolver(config.dns.nameservers, reactor, LOOKUP_TIMEOUT)
    return ArcSealer(arc, read_key(arc), aliases, blocking_lookup(resolver, reactor), run_blocking, reactor,
                     authserv_id=authserv_id(config))
