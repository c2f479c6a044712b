"""Which audit entries a search asks for: one account's, in a period.

Every back end filters with :func:`matches`, so ``policyd audit --account A
--since T --until T`` finds the same entries whatever the store.
"""

from __future__ import annotations

import re

from policyd.store.records import AuditEntry

#: What may sit just before or after an account named in a subject: the
#: subjects are ``alice@example.org``, ``exemption #3 (alice@example.org,
#: 9000/h)``, ``quarantine #7 for alice@example.org``, so an account ends at a
#: space, a comma, a parenthesis or the end, and ``al`` never finds ``alice``.
_EDGE = r"[\s,;()<>\[\]\"']"


def names_account(subject: str, account: str) -> bool:
    """Whether an audit subject names ``account`` (compared without case) as a whole word."""
    pattern = rf"(?:^|{_EDGE}){re.escape(account.lower())}(?:$|{_EDGE})"
    return re.search(pattern, subject.lower()) is not None


def matches(entry: AuditEntry, account: str | None, since: float | None, until: float | None) -> bool:
    """Whether ``entry`` is one a search asks for.

    :param account: only entries whose subject names this account (None: all).
    :param since: only entries made at or after this time (None: from the start).
    :param until: only entries made before this time (None: up to now).
    """
    if since is not None and entry.at < since:
        return False
    if until is not None and entry.at >= until:
        return False
    return account is None or names_account(entry.subject, account)
