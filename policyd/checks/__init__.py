"""What every check gives back, and the shape every check has."""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred

from policyd.protocols.policy import DUNNO, Action, Request

#: The answer while the store cannot answer (``store.on_error``), for every check that needs it.
ON_ERROR = {
    "dunno": DUNNO,
    "defer_if_permit": Action("DEFER_IF_PERMIT", "4.3.0 Sending policy temporarily unavailable"),
}


class Verdict:
    """A check's answer: the reply, and what the decision log says of it.

    :ivar action: the reply to Postfix.
    :ivar check: which check decided (``quota``, ``reputation``, ...).
    :ivar subject: the account or client the decision is about.
    :ivar reason: why, in a few words, for the log.
    """

    __slots__ = ("action", "check", "reason", "subject")

    def __init__(self, action: Action, check: str, subject: str, reason: str) -> None:
        self.action = action
        self.check = check
        self.subject = subject
        self.reason = reason

    def __repr__(self) -> str:
        return f"Verdict({self.action!r}, {self.check!r}, {self.subject!r}, {self.reason!r})"


class Check(Protocol):
    """A policy check: one job, one request at a time."""

    name: str

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        """Decide one request: a Verdict when known at once, else a Deferred of it."""
