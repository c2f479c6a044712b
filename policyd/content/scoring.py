"""Content scoring: the score of a message, and what the milter does with it.

- :class:`ContentScorer` gives a message's :class:`Score`: network points
  from the ``X-Policyd-Network`` header that Postfix added (only a copy
  whose token verifies with the install's secret, made for this client,
  and above the first ``Received`` header) plus content points from the
  classifier (:mod:`policyd.content.classifier`).
- :class:`SpamFilter` is the milter's filter (:data:`policyd.protocols.milter_session.Filter`):
  at ``content.tag_at`` and above it tags the Subject ``*{spam}* ...``
  (once), sets ``X-Spam-Flag``, ``X-Spam-Score`` and ``X-Spam-Status``,
  and applies each recipient's choice: ``inbox`` recipients get the tagged
  message, ``quarantine`` recipients are removed from delivery and their
  copy is held (:mod:`policyd.quarantine.held`).  Incoming ``X-Spam-*`` copies
  are always removed, so users' rules only ever see ours.  The header block
  is judged whole: every Subject is tagged and every copy removed, however
  many headers come before them; a block beyond the milter's bounds, or one
  that would take more than :data:`MAX_HEADER_CHANGES` changes, is refused
  at end of DATA rather than delivered half-changed.
- :class:`MilterServer` and :func:`run` are ``policyd milter``.

The model is read from :func:`model_path` (``content.model``, else
``content.model`` beside the SQLite store, else
``/var/lib/policyd/content.model``), or, before any ``policyd train``, the
model shipped with policyd.  A running milter picks up a retrained model by
itself within :data:`MODEL_CHECK` seconds.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.task import LoopingCall

from policyd import config as configuration
from policyd import logs
from policyd.config import Config
from policyd.content import features as content
from policyd.content.classifier import Model, ModelError, Reason
from policyd.errors import PolicydError
from policyd.netlists import NetworkSet
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
    TEMPFAIL,
    Modification,
    Verdict,
    add_header,
    change_header,
    delete_recipient,
)
from policyd.protocols.milter_message import MilterMessage
from policyd.protocols.milter_session import MilterFactory
from policyd.quarantine.held import (
    DIGEST_HEADER,
    RELEASE_HEADER,
    digest_for,
    normalise_address,
    released_for,
)
from policyd.quarantine.preferences import Preferences
from policyd.store import Quarantined, Store, open_store

log = logging.getLogger("policyd.milter")

T = TypeVar("T")

#: File name of a trained model beside the SQLite store (or in /var/lib/policyd).
MODEL_NAME = "content.model"

#: How often a running milter looks whether the model file changed.
MODEL_CHECK = 5.0

#: How often held mail past its retention is removed.
EXPIRE_EVERY = 600.0

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

#: Longest wait for in-flight messages at shutdown.
DRAIN_BOUND = 10.0

#: Messages up to this size (header fields and kept body) are scored on the
#: reactor thread: typical mail takes a fraction of a millisecond there, less
#: than the hop to the thread pool and back costs under load (a thread
#: wake-up, GIL hand-overs, a wake-up of the reactor).  Larger ones go to the
#: thread pool, so a big message never holds up the other connections for
#: long.
INLINE_BYTES = 64 * 1024

#: Reasons worked out for a spam score (kept with held mail, see :meth:`Score.summary`).
SUMMARY_REASONS = 8


def model_path(config: Config) -> Path:
    """Where ``policyd train`` writes the model and the milter and ``policyd score`` read it."""
    from policyd.statefiles import state_file

    return state_file(config, MODEL_NAME, config.content.model)


def shipped_model() -> Path:
    """The model that comes with policyd (trained on the SpamAssassin public corpus)."""
    return Path(str(importlib.resources.files("policyd") / "models" / "default.model"))


def load_model(config: Config) -> tuple[Model, Path]:
    """The trained model, else the shipped one; and the file it came from.

    :raises PolicydError: when the file exists but cannot be used.
    """
    path = model_path(config)
    if not path.exists():
        path = shipped_model()
    try:
        return Model.load(path), path
    except ModelError as error:
        raise PolicydError(f"content model: {error}") from None


def header_secret(config: Config, create: bool) -> bytes | None:
    """The install's header secret (:mod:`policyd.checks.reputation`), or None when unusable.

    :param create: create it when missing (the milter does; ``policyd score`` only reads).
    """
    from policyd.checks.network_header import header_secret_path, load_header_secret

    path = header_secret_path(config)
    if path is None:
        return None
    if not create and not path.exists():
        return None
    try:
        return load_header_secret(path)
    except (OSError, ValueError) as problem:
        log.error("header secret %s unusable (%s): network points and releases are not trusted", path, problem)
        return None


@attrs.frozen
class Score:
    """A message's score and why.

    :ivar points: network + content points, compared with ``content.tag_at``.
    :ivar content: the classifier's points.
    :ivar network: points of the trusted ``X-Policyd-Network`` header (0 without one).
    :ivar network_reasons: that header's reasons (empty without one).
    :ivar reasons: the features that weigh most, strongest first.
    :ivar subject: the decoded Subject.
    """

    points: float
    content: float
    network: float = 0.0
    network_reasons: str = ""
    reasons: tuple[Reason, ...] = ()
    subject: str = ""

    def summary(self, top: int = 5) -> tuple[str, ...]:
        """Short reasons for headers and the quarantine list."""
        found = [f"network:{self.network_reasons}"] if self.network else []
        found += [r.feature for r in self.reasons if r.points > 0][:top]
        return tuple(found)


class ContentScorer:
    """Scores messages: network points of the trusted header + content points.

    :param model: the classifier.
    :param secret: the header secret; None: no header is trusted.
    :param max_bytes: bytes of a message scored (``content.max_body``).
    """

    def __init__(self, model: Model, secret: bytes | None, max_bytes: int = 1024 * 1024) -> None:
        self.model = model
        self.secret = secret
        self.max_bytes = max_bytes

    def network_points(
        self, headers: Sequence[tuple[str, str]], client: str | None = None
    ) -> tuple[float, str]:
        """Points and reasons of the first genuine ``X-Policyd-Network`` header above any ``Received``.

        Postfix puts the header it was told to PREPEND on top of the message;
        a copy the sender wrote comes below Postfix's own ``Received``
        header and, lacking the secret, never verifies anyway.
        """
        from policyd.checks.network_header import HEADER, parse_header, verify_header

        if self.secret is None:
            return 0.0, ""
        for name, value in headers:
            lower = name.lower()
            if lower == "received":
                break
            if lower != HEADER.lower():
                continue
            points = verify_header(value, self.secret, client=client or None)
            if points is not None:
                return points, parse_header(value).get("reasons", "")
        return 0.0, ""

    def score(
        self,
        raw: bytes,
        client: str | None = None,
        headers: Sequence[tuple[str, str]] | None = None,
        explain: int = 8,
    ) -> Score:
        """The score of a message as bytes (its first ``max_bytes``).

        :param client: the SMTP client address, which a trusted header must name.
        :param headers: the headers as the MTA gave them (else those of ``raw``).
        :param explain: how many reasons to give.
        """
        found, body = content.split_message(raw[: self.max_bytes])
        return self.score_message(found if headers is None else headers, body, client, explain)

    def score_message(
        self,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        client: str | None = None,
        explain: int = 8,
        explain_at: float | None = None,
    ) -> Score:
        """The score of a message as the milter has it: header fields, then the body (its first ``max_bytes``).

        :param client: the SMTP client address, which a trusted header must name.
        :param explain: how many reasons to give.
        :param explain_at: give reasons only to a score this high (None: always);
            the milter only needs them for the mail it may quarantine.
        """
        features = content.message_features(headers, body[: self.max_bytes])
        network, network_reasons = self.network_points(headers, client)
        threshold = None if explain_at is None else explain_at - network
        points, reasons = self.model.assess(features, explain, threshold)
        return Score(
            round(points + network, 3), round(points, 3), network, network_reasons, tuple(reasons), features.subject
        )


# --- what the milter does with a score --------------------------------------------------


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
    )
    changes += [
        add_header("X-Spam-Flag", "YES"),
        add_header("X-Spam-Score", f"{score.points:.1f}"),
        add_header("X-Spam-Status", status),
    ]
    return changes


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


def in_thread(reactor: Any) -> Callable[..., Deferred[Any]]:
    """Run CPU work (parsing, scoring) in the reactor's thread pool, off the event loop."""
    from twisted.internet.threads import deferToThreadPool

    def run(work: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), work, *args, **kwargs)

    return run


def inline(work: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
    """Run work at once (tests, and callers already off the event loop)."""
    return succeed(work(*args, **kwargs))


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
    ) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.scorer = scorer
        self.run_cpu = run_cpu
        self.inline_bytes = inline_bytes
        self.preferences = preferences or Preferences(config, store, clock, run_cpu)

    def __call__(self, message: MilterMessage) -> Deferred[Verdict]:
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
        if self._our_digest(message):
            # Our digest lists spam subjects: scoring it could hold it in the quarantine it describes.
            changes = header_changes(message.headers, None, self.config)
            log.info("milter %s client=%s policyd digest, not scored", message.queue_id or "-",
                     message.client_address or "-")
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
        return succeed(self._verdict(message, score, changes, [], started))

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
        if log.isEnabledFor(logging.INFO):
            logs.decisions.info(
                log,
                f"milter {message.queue_id or '-'} client={message.client_address or '-'} score={score.points:.2f} "
                f"content={score.content:.2f} network={score.network:g} {outcome} "
                f"latency={(time.monotonic() - started) * 1000:.1f}ms",
            )
        return verdict if (verdict.modifications or verdict.reply != ACCEPT) else ACCEPT_UNCHANGED

    def _refused(self, message: MilterMessage, reply: str, why: str) -> Verdict:
        """Refuse a message at end of DATA with ``reply`` (logged with ``why``)."""
        log.warning(
            "milter %s client=%s refused (%s): %s",
            message.queue_id or "-",
            message.client_address or "-",
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
            return []
        wanted = [r for r, a in addresses.items() if chosen.get(a) == "quarantine" and a not in released]
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
                await self.store.quarantine(entry, copy)
            except Exception as error:
                log.error("cannot hold a message for %s (%s): delivered tagged instead", addresses[recipient], error)
                continue
            held.append(recipient)
        return held


# --- the server ---------------------------------------------------------------------


class MilterServer:
    """A running ``policyd milter``: listener, filter, model reloads, quarantine expiry.

    :param reactor: the reactor.
    :param config: the validated configuration.
    :param path: the configuration file, re-read on SIGHUP.
    """

    def __init__(self, reactor: Any, config: Config, path: str | None = None) -> None:
        self.reactor = reactor
        self.config = config
        self.path = path
        model, self.model_file = load_model(config)
        self._model_stamp = self._stamp()
        self.store: Store = open_store(config.store.url, float(config.store.deadline), reactor)
        self.scorer = ContentScorer(model, header_secret(config, create=True), config.content.max_body)
        self.filter = SpamFilter(
            config,
            self.store,
            reactor,
            self.scorer,
            in_thread(reactor),
            Preferences(config, self.store, reactor, in_thread(reactor)),
        )
        self.factory = MilterFactory(
            self.filter,
            reactor,
            NetworkSet(config.allowed_clients),
            config.limits.max_connections,
            memory_limit=config.content.max_body,
            keep_limit=config.quarantine.max_size,
            idle_timeout=float(config.limits.idle_timeout),
            on_error=TEMPFAIL if config.content.on_error == "tempfail" else ACCEPT,
        )
        self.port: IListeningPort | None = None
        # Verdict lines are buffered (logs.decisions): pushed out every FLUSH_EVERY.
        self._loops = [LoopingCall(self.check_model), LoopingCall(self.expire), LoopingCall(logs.flush)]
        for loop in self._loops:
            loop.clock = reactor

    def _stamp(self) -> tuple[float, int] | None:
        try:
            stat = os.stat(model_path(self.config))
        except OSError:
            return None
        return stat.st_mtime, stat.st_size

    @inlineCallbacks
    def start(self) -> Any:
        """Listen; fires with the listening port."""
        endpoint = serverFromString(self.reactor, self.config.listen.milter)
        try:
            self.port = yield endpoint.listen(self.factory)
        except Exception as error:
            raise PolicydError(f"listen.milter: cannot listen on {self.config.listen.milter}: {error}") from None
        self._loops[0].start(MODEL_CHECK, now=False)
        self._loops[1].start(EXPIRE_EVERY, now=True)
        self._loops[2].start(logs.FLUSH_EVERY, now=False)
        log.info(
            "policyd milter listening on %s (model %s, tag_at %g, spam default %s)",
            self.config.listen.milter,
            self.model_file,
            self.config.content.tag_at,
            self.config.quarantine.default,
        )
        return self.port

    def check_model(self) -> None:
        """Load the model again when ``policyd train`` replaced it."""
        stamp = self._stamp()
        if stamp == self._model_stamp:
            return
        self._model_stamp = stamp
        try:
            model, self.model_file = load_model(self.config)
        except PolicydError as error:
            log.error("%s: keeping the running model", error)
            return
        self.scorer.model = model
        log.info("content model loaded from %s", self.model_file)

    def expire(self) -> Deferred[Any]:
        """Forget held mail past its retention."""

        def expired(count: int) -> None:
            if count:
                log.info("quarantine: %d expired message(s) removed", count)

        done = self.store.quarantine_expire(now=self.reactor.seconds()).addCallback(expired)
        return done.addErrback(lambda f: log.error("quarantine expiry failed: %s", f.getErrorMessage()))

    def reload(self) -> bool:
        """Re-read the configuration and the model; a bad configuration is refused."""
        try:
            new = configuration.load(self.path)
        except PolicydError as error:
            log.error("reload refused, keeping the running configuration: %s", error)
            return False
        if new.store.url != self.config.store.url or new.listen != self.config.listen:
            log.warning("reload: store.url and listen.* changes need a restart; kept the old values")
            new = attrs.evolve(new, store=self.config.store, listen=self.config.listen)
        self.config = new
        self.filter.config = new
        self.filter.preferences.configure(new)
        self.scorer.max_bytes = new.content.max_body
        self._model_stamp = None
        self.check_model()
        log.info("configuration reloaded from %s", self.path)
        return True

    @inlineCallbacks
    def stop(self) -> Any:
        """Stop accepting, answer the messages being scored (bounded), close the store."""
        for loop in self._loops:
            if loop.running:
                loop.stop()
        if self.port is not None:
            yield self.port.stopListening()
        drained = self.factory.drained()
        drained.addTimeout(DRAIN_BOUND, self.reactor)
        try:
            yield drained
        except Exception:
            log.warning("shutdown: messages still being scored after %ss; closing anyway", DRAIN_BOUND)
        for connection in list(self.factory.connections):
            connection.transport.loseConnection()
        yield DeferredList([self.store.close()], consumeErrors=True)
        log.info("policyd milter stopped")
        logs.flush()


def run(path: str | None) -> None:
    """Run the milter in the foreground until SIGTERM or SIGINT.

    :raises PolicydError: when the configuration, model, store or listener fails.
    """
    from policyd.daemon import run_daemon

    run_daemon(path, MilterServer, threads=4)

