"""Report addresses: users forward a message as an attachment and the milter learns it.

``content.report_spam`` and ``content.report_ham`` name addresses (e.g.
``spam-report@example.org``, ``ham-report@example.org``).  A message whose
every recipient is a report address is a report, and is never delivered:
the milter discards it (the user gets no bounce, as with a "Report spam"
button), and:

- sent by a SASL-authenticated user (Postfix's ``{auth_authen}`` macro,
  which Postfix sends in ``milter_mail_macros`` by default), each message
  attached to it (a ``message/rfc822`` part, or an ``.eml`` file) is learned
  as spam or ham by the address (:mod:`policyd.content.feedback`: once per
  message, audited ``model-learn`` by that user);
- from anyone else it is ignored ("report from an unauthenticated sender
  ignored"): outsiders could otherwise teach the filter their spam is ham;
- without an attached message, or sent to spam and ham addresses at once,
  it is ignored; each case is one log line.

Finding the attachments and learning run off the reactor thread, after the
verdict: the report is discarded at once.
"""

from __future__ import annotations

import email
import email.message
import logging
from typing import Any

from twisted.internet.defer import Deferred

from policyd.config import Config
from policyd.content.feedback import Feedback
from policyd.protocols.milter import DISCARD, Verdict
from policyd.protocols.milter_message import MilterMessage
from policyd.quarantine.held import normalise_address
from policyd.reactor import RunBlocking
from policyd.texts import printable

log = logging.getLogger("policyd.milter")

#: Messages learned from one report, at most: a user reports a few at a time.
MAX_ATTACHED = 20

#: The verdict for a report: not delivered, no bounce.
REPORT_VERDICT = Verdict((), DISCARD)


def attached_messages(raw: bytes, limit: int = MAX_ATTACHED) -> list[bytes]:
    """The messages attached to ``raw``: each ``message/rfc822`` part, and each ``.eml`` file, in order."""
    found: list[bytes] = []
    report = email.message_from_bytes(raw)
    for part in report.walk():
        if len(found) >= limit:
            break
        kind = part.get_content_type()
        if kind == "message/rfc822":
            inner = part.get_payload()
            if isinstance(inner, list) and inner and isinstance(inner[0], email.message.Message):
                found.append(inner[0].as_bytes())
            continue
        name = (part.get_filename() or "").lower()
        if name.endswith(".eml") and not part.is_multipart():
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes) and payload.strip():
                found.append(payload)
    return found


class Reports:
    """Takes reports out of the mail stream and learns what they carry.

    :param feedback: learns each attached message (and audits it).
    :param run_cpu: where attachments are looked for (:func:`policyd.reactor.in_thread` in the milter).
    """

    def __init__(self, feedback: Feedback, run_cpu: RunBlocking) -> None:
        self.feedback = feedback
        self.run_cpu = run_cpu
        # Reports being learned (tests and a draining milter wait for them).
        self.pending: set[Deferred[Any]] = set()

    def take(self, message: MilterMessage, config: Config) -> Verdict | None:
        """The verdict for a report (it is discarded and learned), or None when ``message`` is not one."""
        if not (config.content.report_spam or config.content.report_ham):
            return None
        addresses = config.content.report_addresses()
        if not message.recipients or not message.recipients_complete:
            return None
        recipients = {normalise_address(r) for r in message.recipients}
        if not recipients <= addresses.keys():
            return None
        from policyd.content.spamfilter import envelope_text, message_bytes

        described = f"{printable(message.queue_id or '-')} {envelope_text(message)}"
        user = message.macros.get("auth_authen", "").strip()
        if not user:
            log.warning("milter %s: report from an unauthenticated sender ignored (discarded)", described)
            return REPORT_VERDICT
        kinds = {addresses[r] for r in recipients}
        if len(kinds) > 1:
            log.warning("milter %s: report to both spam and ham addresses ignored (discarded)", described)
            return REPORT_VERDICT
        raw = message_bytes(message.headers, message.body())
        address = sorted(recipients)[0]
        learning = Deferred.fromCoroutine(self._learn(config, raw, kinds.pop(), printable(user), address, described))
        self.pending.add(learning)

        def done(result: object) -> object:
            self.pending.discard(learning)
            return result

        learning.addBoth(done)
        return REPORT_VERDICT

    async def _learn(self, config: Config, raw: bytes, spam: bool, user: str, address: str, described: str) -> None:
        try:
            found: list[bytes] = await self.run_cpu(attached_messages, raw)
        except Exception as error:
            log.error("milter %s: report not read: %s", described, error)
            return
        if not found:
            log.warning("milter %s: report with no attached message ignored (discarded)", described)
            return
        log.info("milter %s: report of %d message(s) as %s, learning", described, len(found),
                 "spam" if spam else "ham")
        for attached in found:
            await self.feedback.learn(config, attached, spam, user, f"reported to {address}")
