"""What the milter does with a score: tag, set the X-Spam headers, apply each recipient's choice.

:class:`SpamFilter` is the milter's filter (:data:`policyd.protocols.milter_session.Filter`):
at ``content.tag_at`` and above it tags the Subject ``*{spam}* ...``
(once), sets ``X-Spam-Flag``, ``X-Spam-Score`` and ``X-Spam-Status``, and
applies each recipient's choice: ``inbox`` recipients get the tagged
message, ``quarantine`` recipients are removed from delivery and their copy
is held (:mod:`policyd.quarantine.held`).  Incoming ``X-Spam-*`` copies are
removed, so users' rules only ever see ours, except from clean mail that goes
to a forwarding recipient: that keeps every header as it came (SPEC 6.2).  The header block is
judged whole: every Subject is tagged and every copy removed, however many
headers come before them; a block beyond the milter's bounds, or one that
would take more than :data:`MAX_HEADER_CHANGES` changes, is refused at end
of DATA rather than delivered half-changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from policyd import logs
from policyd.config import Config
from policyd.content import features as content
from policyd.content.feedback import Feedback
from policyd.content.reports import Reports
from policyd.content.scorer import SUMMARY_REASONS, ContentScorer, Score
from policyd.forwarding.aliases import Aliases
from policyd.forwarding.authentication import Authenticator, Results
from policyd.forwarding.sealing import ArcSealer
from policyd.metrics import MilterMetrics
from policyd.protocols.milter import (
    ACCEPT,
    ACCEPT_UNCHANGED,
    ADDHEADER,
    CHGHEADER,
    DISCARD,
    INSHEADER,
    MAX_HEADER_COUNT,
    MAX_HEADERS,
    REJECT,
    Modification,
    Verdict,
    add_header,
    change_header,
    delete_recipient,
)
from policyd.protocols.milter_message import MilterMessage
from policyd.quarantine.held import (
    DIGEST_HEADER,
    RELEASE_HEADER,
    digest_for,
    held_audit,
    message_id,
    normalise_address,
    released_for,
)
from policyd.quarantine.preferences import Preferences
from policyd.reactor import inline
from policyd.store import Quarantined, Store
from policyd.texts import printable

log = logging.getLogger("policyd.milter")


#: Headers a sender may not set: ours, replaced on every message.
SPAM_HEADERS = ("X-Spam-Flag", "X-Spam-Score", "X-Spam-Status")

_DIGEST = DIGEST_HEADER.lower()

# Headers removed from every message, by their lower-case names.
_REMOVED = {name.lower(): name for name in (*SPAM_HEADERS, RELEASE_HEADER, DIGEST_HEADER)}

#: Existing headers changed or removed in one message, at most.  RFC 5322
#: allows one Subject, and real mail carries a few X-Spam-* copies; Postfix
#: finds each header it changes by reading the header block from its top,
#: so thousands of changes to a block of thousands of headers would hold a
#: cleanup process for minutes.  A message that needs more is refused.
MAX_HEADER_CHANGES = 100

#: The reply to a message whose header block the milter cannot keep whole
#: (:data:`policyd.protocols.milter.MAX_HEADERS`, :data:`policyd.protocols.milter.MAX_HEADER_COUNT`).
HEADERS_TOO_LARGE = (
    f"552 5.6.0 Message header too large to be checked (at most {MAX_HEADERS // 1024} KiB "
    f"in {MAX_HEADER_COUNT} fields)"
)

#: The reply to a message that needs more than :data:`MAX_HEADER_CHANGES` header changes.
TOO_MANY_COPIES = "554 5.6.0 Too many Subject or X-Spam-* header fields to be checked"


#: Messages up to this size (header fields and kept body) are scored on the
#: reactor thread: typical mail takes a fraction of a millisecond there, less
#: than the hop to the thread pool and back costs under load (a thread
#: wake-up, GIL hand-overs, a wake-up of the reactor).  Larger ones go to the
#: thread pool, so a big message never holds up the other connections for
#: long.
INLINE_BYTES = 64 * 1024


#: Recipients a verdict line names, at most: the line stays one short line;
#: Postfix's own delivery lines name every recipient.
LOGGED_RECIPIENTS = 10


def _bare(address: str) -> str:
    """An envelope address as the MTA gave it, without its angle brackets."""
    address = address.strip()
    return address[1:-1] if address.startswith("<") and address.endswith(">") else address


def envelope_text(message: MilterMessage) -> str:
    """``client=A sasl_username=U from=<S> to=<R1>,<R2>``, in Postfix's words, control characters escaped.

    The SASL user is Postfix's ``{auth_authen}`` macro (sent by default with
    MAIL FROM), left out when the client did not authenticate.
    """
    text = f"client={message.client_address or '-'}"
    sasl = message.macro("auth_authen")
    if sasl:
        text += f" sasl_username={sasl}"
    text += f" from=<{_bare(message.sender)}> to="
    text += ",".join(f"<{_bare(r)}>" for r in message.recipients[:LOGGED_RECIPIENTS])
    if message.recipient_count > LOGGED_RECIPIENTS:
        text += f" (+{message.recipient_count - LOGGED_RECIPIENTS} more)"
    return printable(text)


def tagged_subject(value: str | None, tag: str) -> str | None:
    """The new Subject value with ``tag`` in front, or None when it already has it.

    The original (possibly RFC 2047 encoded, possibly folded) value is kept
    as it is after the tag and a space, so encoded words stay valid.
    """
    if value is None or not value.strip():
        return tag
    if content.decode_header(value).startswith(tag):
        return None
    return f"{tag} {value.lstrip()}"


def header_changes(
    headers: Sequence[tuple[str, str]], score: Score | None, config: Config
) -> list[Modification]:
    """Header changes for a message: incoming X-Spam-*, release and digest headers removed; tags at tag_at.

    ``headers`` must be the whole header block as the MTA sent it: a change
    names a header by its name and its rank among the headers of that name
    (1 for the first), which is how Postfix finds it (not counting its own
    ``Received`` header, which it never shows a milter; names compared
    without regard to case).  Every Subject is tagged, not only the first:
    a reader may show any of them.

    :param score: None for a message that is not tagged.
    """
    counts = dict.fromkeys(_REMOVED, 0)
    subjects: list[str] = []
    for name, value in headers:
        lower = name.lower()
        if lower in counts:
            counts[lower] += 1
        elif lower == "subject":
            subjects.append(value)
    changes: list[Modification] = []
    for lower, count in counts.items():
        # From the last to the first, so each index still means what it meant.
        changes += [change_header(_REMOVED[lower], "", index) for index in range(count, 0, -1)]
    if score is None:
        return changes
    tag = config.content.tag
    if not subjects:
        changes.append(add_header("Subject", tag))
    for index, value in enumerate(subjects, 1):
        subject = tagged_subject(value, tag)
        if subject is not None:
            changes.append(change_header("Subject", subject, index))
    status = (
        f"Yes, score={score.points:.1f} tag_at={config.content.tag_at:g} "
        f"content={score.content:.1f} network={score.network:g}"
    ) + status_reasons(score)
    changes += [
        add_header("X-Spam-Flag", "YES"),
        add_header("X-Spam-Score", f"{score.points:.1f}"),
        add_header("X-Spam-Status", status),
    ]
    return changes


#: Reasons named in X-Spam-Status, and the characters each may take there.
STATUS_REASONS = 5
STATUS_REASON_CHARS = 60


def status_reasons(score: Score) -> str:
    """What weighed most for spam, for X-Spam-Status: `` reasons=+1.5 phrase "cheap pills now"; +0.8 url:x.biz``.

    Each reason is the message's own text (a word, a phrase, a header
    field): on one line, in ASCII (others as ``\\u`` escapes), without the
    ``;`` that separates reasons, and cut to :data:`STATUS_REASON_CHARS`.
    """
    shown = []
    for reason in score.reasons:
        if reason.points <= 0:
            continue
        text = " ".join(reason.feature.split()).replace(";", ",")
        text = text.encode("ascii", "backslashreplace").decode("ascii")
        text = "".join(c if c.isprintable() else "?" for c in text)[:STATUS_REASON_CHARS]
        shown.append(f"{reason.points:+.1f} {text}")
        if len(shown) == STATUS_REASONS:
            break
    return " reasons=" + "; ".join(shown) if shown else ""


def _edits(changes: Sequence[Modification]) -> int:
    """How many existing headers ``changes`` change or remove (each a search of the header block by the MTA)."""
    return sum(1 for change in changes if change.action == CHGHEADER)


def apply_changes(headers: Sequence[tuple[str, str]], changes: Sequence[Modification]) -> list[tuple[str, str]]:
    """The headers after ``changes``, as Postfix applies them (for the quarantined copy).

    A change names the ``index``-th header of that name (names compared
    without regard to case, index 0 taken as 1), counted as the headers are
    at that moment; an empty value deletes it, a change of a header that is
    not there appends it.  Each header's position is looked up once, so a
    block of thousands of headers costs one pass, not one per change.
    """
    names = [name for name, _ in headers]
    values: list[str | None] = [value for _, value in headers]  # None: deleted

    def positions() -> dict[str, list[int]]:
        """Where the live headers of each (lower-case) name are, in order."""
        found: dict[str, list[int]] = {}
        for position, name in enumerate(names):
            if values[position] is not None:
                found.setdefault(name.lower(), []).append(position)
        return found

    places = positions()
    for change in changes:
        same = places.setdefault(change.name.lower(), [])
        index = max(change.index, 1)
        if change.action == CHGHEADER and index <= len(same):
            if change.value:
                values[same[index - 1]] = change.value
            else:
                values[same.pop(index - 1)] = None
        elif change.action == ADDHEADER or (change.action == CHGHEADER and change.value):
            same.append(len(names))
            names.append(change.name)
            values.append(change.value)
        elif change.action == INSHEADER:
            # Never sent by this milter: the simple way is good enough.
            live = [(n, v) for n, v in zip(names, values, strict=True) if v is not None]
            live.insert(min(change.index, len(live)), (change.name, change.value))
            names = [n for n, _ in live]
            values = [v for _, v in live]
            places = positions()
    return [(n, v) for n, v in zip(names, values, strict=True) if v is not None]


def message_bytes(headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    """A message from headers (values as the MTA gives them) and body, CRLF line ends."""
    lines = []
    for name, value in headers:
        lines.append(f"{name}: {value.replace(chr(13) + chr(10), chr(10)).replace(chr(10), chr(13) + chr(10))}\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape") + b"\r\n" + body


class SpamFilter:
    """The milter's decision for each message.

    :param config: the configuration (``content.*``, ``quarantine.*``).
    :param store: where choices and held mail live.
    :param clock: time source.
    :param scorer: gives the score (its model may be replaced while running).
    :param run_cpu: how scoring is run (:func:`in_thread` in the server).
    :param preferences: resolves each recipient's choice (own, provisioned,
        default); made from ``config`` and ``store`` when not given.
    :param inline_bytes: messages up to this size are scored at once, on
        the calling (reactor) thread; larger ones through ``run_cpu``.
    :param metrics: the milter's Prometheus metrics; None keeps none.
    :param aliases: ``forwarding.aliases``, which recipients forward (with
        ``forwarding.spam: hold`` their spam is held, never forwarded); None: none does.
    :param sealer: adds an ARC set to mail still going to a forwarding
        recipient, after every other change (``forwarding.arc``); None: no seal.
    :param authenticator: checks SPF, DKIM and DMARC on arrival, alongside the
        scoring, and adds their Authentication-Results (``forwarding.authenticate``);
        None: no checks.
    """

    def __init__(
        self,
        config: Config,
        store: Store,
        clock: IReactorTime,
        scorer: ContentScorer,
        run_cpu: Callable[..., Deferred[Any]] = inline,
        preferences: Preferences | None = None,
        inline_bytes: int = INLINE_BYTES,
        metrics: MilterMetrics | None = None,
        aliases: Aliases | None = None,
        sealer: ArcSealer | None = None,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.scorer = scorer
        self.run_cpu = run_cpu
        self.inline_bytes = inline_bytes
        self.preferences = preferences or Preferences(config, store, clock, run_cpu)
        self.metrics = metrics
        # The per-message counters, looked up by label once (a labels() call takes a lock and a
        # dictionary look-up for every message).
        self._outcomes = None if metrics is None else (metrics.messages.labels("ham"), metrics.messages.labels("spam"))
        # Mail to content.report_spam / report_ham is learned, never delivered.
        self.reports = Reports(Feedback(store, run_cpu, clock), run_cpu)
        self.aliases = aliases
        self.sealer = sealer
        self.authenticator = authenticator

    def __call__(self, message: MilterMessage) -> Deferred[Verdict]:
        """Decide one message (see :meth:`decide`), add the checks' results, then seal it for
        forwarding recipients (``forwarding.arc``)."""
        if self.authenticator is None:
            decided = self._counted(message)
            return decided if self.sealer is None else decided.addCallback(self.sealer, message)
        # The checks' DNS look-ups run while the message is scored.
        checked = self.authenticator.check(message)
        return Deferred.fromCoroutine(self._authenticated(message, self._counted(message), checked))

    async def _authenticated(
        self, message: MilterMessage, decided: Deferred[Verdict], checked: Deferred[Results]
    ) -> Verdict:
        assert self.authenticator is not None
        verdict = await decided
        results = await checked
        try:
            verdict = self.authenticator.stamp(verdict, message, results)
        except Exception as error:  # the results are never worth a message
            log.error("milter %s: no Authentication-Results: %s", message.queue_id or "-", error)
        return verdict if self.sealer is None else await self.sealer(verdict, message, results)

    def _counted(self, message: MilterMessage) -> Deferred[Verdict]:
        """Decide one message (see :meth:`decide`), counting a failure in the metrics."""
        if self.metrics is None:
            return self.decide(message)
        try:
            decided = self.decide(message)
        except Exception:
            self.metrics.errors.labels("filter").inc()
            raise
        if decided.called and not decided.paused and not isinstance(decided.result, Failure):
            return decided  # decided at once: nothing left to count
        return decided.addErrback(self._failed)

    def _failed(self, failure: Any) -> Any:
        """Count a filter failure (the milter answers ``content.on_error``), then pass it on."""
        if self.metrics is not None:
            self.metrics.errors.labels("filter").inc()
        return failure

    def decide(self, message: MilterMessage) -> Deferred[Verdict]:
        """Decide one message (the :data:`policyd.protocols.milter_session.Filter` interface): score, tag, apply each choice.

        A message up to ``inline_bytes`` is scored at once, and unless it is
        spam for someone who may have chosen the quarantine, the returned
        Deferred already has the verdict: most mail never waits.  A message
        whose header block the MTA connection could not keep whole is
        refused unscored: its Subject and X-Spam-* copies cannot all be
        found, whatever its score.
        """
        started = time.monotonic()
        if not message.headers_complete:
            return succeed(
                self._refused(
                    message,
                    HEADERS_TOO_LARGE,
                    f"header block of {message.header_count} fields, {message.header_size} bytes",
                )
            )
        report = self.reports.take(message, self.config)
        if report is not None:
            return succeed(report)
        if self._our_digest(message):
            # Our digest lists spam subjects: scoring it could hold it in the quarantine it describes.
            changes = header_changes(message.headers, None, self.config)
            log.info("milter %s %s policyd digest, not scored", printable(message.queue_id or "-"),
                     envelope_text(message))
            if self.metrics is not None:
                self.metrics.messages.labels("digest").inc()
            if _edits(changes) > MAX_HEADER_CHANGES:
                return succeed(self._refused(message, TOO_MANY_COPIES, f"{_edits(changes)} header changes"))
            return succeed(Verdict(tuple(changes), ACCEPT) if changes else ACCEPT_UNCHANGED)
        body = message.body(self.config.content.max_body)
        # Reasons are only kept with held mail, so only spam needs them.
        work = (message.headers, body, message.client_address, SUMMARY_REASONS, self.config.content.tag_at)
        if message.header_bytes + len(body) <= self.inline_bytes:
            return self._scored(message, self.scorer.score_message(*work), started)
        scored: Deferred[Score] = self.run_cpu(self.scorer.score_message, *work)
        return scored.addCallback(lambda score: self._scored(message, score, started))

    def _scored(self, message: MilterMessage, score: Score, started: float) -> Deferred[Verdict]:
        """The verdict for a scored message, once the quarantine took what it holds."""
        spam = score.points >= self.config.content.tag_at
        changes = header_changes(message.headers, score if spam else None, self.config)
        if _edits(changes) > MAX_HEADER_CHANGES:
            return succeed(
                self._refused(message, TOO_MANY_COPIES, f"score={score.points:.2f}, {_edits(changes)} header changes")
            )
        if spam and message.recipients:
            return Deferred.fromCoroutine(self._spam(message, score, changes, started))
        if changes and self.aliases is not None and message.recipients:
            return Deferred.fromCoroutine(self._clean(message, score, changes, started))
        return succeed(self._verdict(message, score, changes, [], started))

    async def _clean(
        self, message: MilterMessage, score: Score, changes: list[Modification], started: float
    ) -> Verdict:
        """Clean mail that goes to a forwarding recipient keeps every header as it came (SPEC 6.2):
        removing a sender's X-Spam-* copy could break its DKIM signature at the destination."""
        try:
            found = await self.aliases.forwarding_targets(message.recipients) if self.aliases else {}
        except Exception as error:  # never let the aliases stop mail
            log.error("forwarding.aliases: look-up failed (%s): incoming X-Spam-* copies removed", error)
            found = {}
        forwards = any(targets.forwards for targets in found.values())
        return self._verdict(message, score, [] if forwards else changes, [], started)

    async def _spam(
        self, message: MilterMessage, score: Score, changes: list[Modification], started: float
    ) -> Verdict:
        held = await self._hold(message, score, changes)
        return self._verdict(message, score, changes, held, started)

    def _verdict(
        self, message: MilterMessage, score: Score, changes: list[Modification], held: list[str], started: float
    ) -> Verdict:
        """Header changes and removed recipients, or a discard when every recipient's copy is held; logged."""
        spam = score.points >= self.config.content.tag_at
        outcome = "spam" if spam else "ham"
        # Recipients beyond those the MTA connection kept are not held: they
        # get the tagged message, so it is discarded only when held for all.
        if held and len(held) == message.recipient_count:
            verdict = Verdict((), DISCARD)
            outcome = "spam, held for every recipient"
        else:
            verdict = Verdict(tuple(changes) + tuple(delete_recipient(r) for r in held), ACCEPT)
            if held:
                outcome = f"spam, held for {len(held)} of {len(message.recipients)} recipients"
        # info() checks the level too, but only after the line is made: its
        # parts (the queue id reads the macros) cost more than the check.
        seconds = time.monotonic() - started
        if self.metrics is not None and self._outcomes is not None:
            metrics = self.metrics
            self._outcomes[spam].inc()
            metrics.scoring.observe(seconds)
            if held:
                metrics.held.inc(len(held))
            if spam and verdict.reply != DISCARD:
                metrics.tagged.inc()
        if log.isEnabledFor(logging.INFO):
            logs.decisions.info(
                log,
                f"milter {message.queue_id or '-'} {envelope_text(message)} score={score.points:.2f} "
                f"content={score.content:.2f} network={score.network:g} {outcome} "
                f"latency={seconds * 1000:.1f}ms",
            )
        return verdict if (verdict.modifications or verdict.reply != ACCEPT) else ACCEPT_UNCHANGED

    def _refused(self, message: MilterMessage, reply: str, why: str) -> Verdict:
        """Refuse a message at end of DATA with ``reply`` (logged with ``why``)."""
        if self.metrics is not None:
            self.metrics.messages.labels("refused").inc()
        log.warning(
            "milter %s %s refused (%s): %s",
            printable(message.queue_id or "-"),
            envelope_text(message),
            why,
            reply,
        )
        return Verdict((), REJECT, reply)

    def _our_digest(self, message: MilterMessage) -> bool:
        """Whether the message is policyd's digest to its (only) recipient, signed with our secret."""
        secret = self.scorer.secret
        if secret is None or not message.recipients:
            return False
        digests = [value for name, value in message.headers if name.lower() == _DIGEST]
        if not digests:
            return False
        now = self.clock.seconds()
        named = {digest_for(value, secret, now) for value in digests}
        return {normalise_address(r) for r in message.recipients} <= named

    async def _hold(self, message: MilterMessage, score: Score, changes: list[Modification]) -> list[str]:
        """Hold the message for the recipients who chose the quarantine; returns them (as the MTA gave them)."""
        addresses = {r: normalise_address(r) for r in message.recipients}
        released = set()
        if self.scorer.secret is not None:
            for name, value in message.headers:
                if name.lower() == RELEASE_HEADER.lower():
                    recipient = released_for(value, self.scorer.secret)
                    if recipient is not None:
                        released.add(recipient)
        try:
            chosen = await self.preferences.spam(list(dict.fromkeys(addresses.values())))
        except Exception as error:
            log.error("spam choices unavailable (%s): delivering to every inbox", error)
            if self.metrics is not None:
                self.metrics.errors.labels("choices").inc()
            return []
        forwarding = await self._forwarding_held(list(addresses))
        wanted = [
            r for r, a in addresses.items() if (chosen.get(a) == "quarantine" or r in forwarding) and a not in released
        ]
        if not wanted:
            return []
        if not message.complete:
            log.warning(
                "milter %s: message larger than the %d bytes kept: delivered tagged instead of held",
                message.queue_id or "-",
                message.keep_limit,
            )
            return []
        copy = message_bytes(apply_changes(message.headers, changes), message.body())
        now = self.clock.seconds()
        found_id = message_id(message.headers)
        held = []
        for recipient in wanted:
            entry = Quarantined(
                id=0,
                recipient=addresses[recipient],
                sender=normalise_address(message.sender),
                subject=score.subject[:500],
                score=score.points,
                at=now,
                until=now + float(self.config.quarantine.retention),
                size=len(copy),
                client=message.client_address,
                queue_id=message.queue_id,
                reasons=score.summary(),
            )
            try:
                stored = await self.store.quarantine(entry, copy)
            except Exception as error:
                log.error("cannot hold a message for %s (%s): delivered tagged instead", addresses[recipient], error)
                if self.metrics is not None:
                    self.metrics.errors.labels("hold").inc()
                continue
            held.append(recipient)
            self._audit_held(stored, found_id)
        return held

    async def _forwarding_held(self, recipients: list[str]) -> set[str]:
        """The forwarding recipients (as the MTA gave them) whose spam is held: ``forwarding.spam: hold``.

        Receivers block servers that forward spam, so such a recipient's copy
        is held whatever their own choice.  Postfix expands aliases after the
        milter, so the recipient seen here is the alias itself: removing it
        from delivery removes every copy it would have forwarded.
        """
        if self.aliases is None or self.config.forwarding.spam != "hold":
            return set()
        try:
            found = await self.aliases.forwarding_targets(recipients)
        except Exception as error:  # never let the aliases stop mail
            log.error("forwarding.aliases: look-up failed (%s): forwarding recipients get the tagged message", error)
            return set()
        return {r for r, targets in found.items() if targets.forwards}

    def _audit_held(self, entry: Quarantined, found_id: str) -> None:
        """Audit a held copy (``quarantine-hold``, by ``milter``) with its Message-ID and queue id.

        The verdict does not wait for it: the copy is held whatever becomes of its audit line.
        """
        audit = held_audit(entry, found_id, "milter", "quarantine-hold", f"score {entry.score:.1f}", entry.at)
        self.store.record(audit).addErrback(
            lambda f: log.error("could not audit held message #%d: %s", entry.id, f.getErrorMessage())
        )
