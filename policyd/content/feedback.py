"""What users say of single messages, learned onto the model in use: released mail is ham, reports are what they say.

Two ways feed it without an admin: a message released from the quarantine
(by an admin or by its recipient) is learned as ham
(``content.learn_from_release``), and a message a local user forwards as an
attachment to a report address is learned as spam or ham
(:mod:`policyd.content.reports`).  Each is learned as ``policyd learn`` does
(:func:`policyd.content.training.learn` onto the model in use, the swap and
the kept models of :class:`policyd.content.models.ModelFiles`, an audit entry
``model-learn``), one message at a time; a single message is below the
held-back check's size, so none applies.

A message counts once: its key (the hash of its Message-ID, else of its
body) and its label are remembered in ``<model>.learned`` beside the model,
the latest :data:`REMEMBERED` of them.  Learning the same message again with
the same label does nothing; with the other label (released, then reported
as spam) it is learned again, as a correction.

:class:`Feedback` runs the learning off the reactor thread and never fails:
whoever asked (a release, the milter) has finished already, so an error is
one line in the log.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from policyd.config import Config
from policyd.content import features as content
from policyd.content import training
from policyd.content.models import ModelFiles
from policyd.content.scorer import model_path, shipped_model
from policyd.errors import PolicydError
from policyd.reactor import RunBlocking
from policyd.statefiles import private_directory
from policyd.store import AuditEntry, Store

log = logging.getLogger("policyd.content")

#: Learned messages remembered, so a repeated report counts once: far more
#: than a week of reports of a large organisation, about 600 KB of file.
REMEMBERED = 10_000

#: The audit action of a change of model.
ACTION = "model-learn"


def message_key(raw: bytes) -> str:
    """What identifies a message however often it is forwarded or released: its Message-ID, else its body.

    The copies of one message differ in their top headers (each recipient's
    ``Delivered-To``, our tag), not in these.  Hashed, so the file beside the
    model holds nothing of the mail.
    """
    headers, body = content.split_message(raw)
    found = ""
    for name, value in headers:
        if name.lower() == "message-id":
            found = " ".join(value.split()).lower()
            break
    source = b"id:" + found.encode("utf-8", "surrogateescape") if found else b"body:" + body.replace(b"\r\n", b"\n").strip()
    return hashlib.sha256(source).hexdigest()[:32]


def untagged(headers: Sequence[tuple[str, str]], tag: str) -> list[tuple[str, str]]:
    """The header fields with our Subject tag taken off: a held or reported copy carries it, the mail did not."""
    result = []
    for name, value in headers:
        if name.lower() == "subject" and value.lstrip().startswith(tag):
            value = value.lstrip()[len(tag):].lstrip(" ")
        result.append((name, value))
    return result


class Learned:
    """The keys of learned messages and their labels, in the file ``path`` (0600), the latest :data:`REMEMBERED`.

    Read and written only under the model's lock.
    """

    def __init__(self, path: Path, remembered: int = REMEMBERED) -> None:
        self.path = path
        self.remembered = remembered

    def read(self) -> dict[str, str]:
        """Key -> ``ham`` or ``spam``, oldest first (a missing file: none)."""
        try:
            text = self.path.read_text("ascii", "replace")
        except FileNotFoundError:
            return {}
        except OSError as error:
            raise PolicydError(f"cannot read {self.path}: {error.strerror or error}") from None
        found: dict[str, str] = {}
        for line in text.splitlines():
            key, _, label = line.partition(" ")
            if key and label in ("ham", "spam"):
                found.pop(key, None)
                found[key] = label
        return found

    def write(self, learned: dict[str, str], at_least: int = 0) -> None:
        """Replace the file with the latest :attr:`remembered` of ``learned`` (by a rename: never half written).

        :param at_least: keep this many even past :attr:`remembered` (every
            message of a ``learn`` run, so running it again skips them all).
        """
        latest = list(learned.items())[-max(self.remembered, at_least):]
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            private_directory(self.path.parent)
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(descriptor, "w", encoding="ascii") as stream:
                stream.writelines(f"{key} {label}\n" for key, label in latest)
            os.replace(temporary, self.path)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise PolicydError(f"cannot write {self.path}: {error.strerror or error}") from None

    def forget(self) -> None:
        """Forget every learned message (the model they went into is no longer in use)."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError as error:
            raise PolicydError(f"cannot remove {self.path}: {error.strerror or error}") from None


def learned_of(files: ModelFiles) -> Learned:
    """The learned messages of the model in ``files`` (the file beside it)."""
    return Learned(files.path.with_name(files.path.name + ".learned"))


class NewMessages:
    """Which messages of a batch to learn: those the model has not learned with the same label.

    A filter for :func:`policyd.content.corpus.features_of`, called with each
    message read: a message learned before with this label, or given twice
    with it, is left out (a Junk folder learned every night counts each
    message once); one whose label changed is learned.

    :param learned: key -> label of what the model learned (:meth:`Learned.read`).
    :param skip: leave out what was learned; False keeps every message
        (``train``: a new model knows nothing) and only notes the keys.
    """

    def __init__(self, learned: dict[str, str], skip: bool = True) -> None:
        self.learned = learned
        self.skip = skip
        self.fresh: dict[str, str] = {}
        self.skipped = 0
        self.learning = 0

    def __call__(self, raw: bytes, spam: bool) -> bool:
        return self.take(message_key(raw), spam)

    def take(self, key: str, spam: bool) -> bool:
        """Whether to learn the message of ``key`` with this label (False: learned before); noted either way."""
        label = "spam" if spam else "ham"
        skipped = self.skip and self.fresh.get(key, self.learned.get(key)) == label
        # Either way the key becomes one of the newest, so the memory's bound
        # forgets the messages no longer given, not those given every time.
        self.fresh.pop(key, None)
        self.fresh[key] = label
        if skipped:
            self.skipped += 1
        else:
            self.learning += 1
        return not skipped

    def remembered(self) -> dict[str, str]:
        """What the model knows once it has learned the messages let through, oldest first."""
        merged = dict(self.learned)
        for key, label in self.fresh.items():
            merged.pop(key, None)
            merged[key] = label
        return merged


@attrs.frozen
class Outcome:
    """What became of one message given to learn.

    :ivar learned: whether the model learned it (False: learned with this label before).
    :ivar spam: its label.
    :ivar key: its key (:func:`message_key`).
    :ivar message_id: its Message-ID, for the audit log ("" without one).
    :ivar previous: where the model it replaced is kept (None when nothing was learned).
    """

    learned: bool
    spam: bool
    key: str
    message_id: str
    previous: Path | None = None


def learn_message(config: Config, raw: bytes, spam: bool, files: ModelFiles | None = None) -> Outcome:
    """Learn one message onto the model in use and put the new model in use (blocking; a thread's work).

    :param raw: the message as delivered (our Subject tag is taken off).
    :param files: the model files (default: ``config``'s).
    :raises PolicydError: when the model cannot be read or written.
    """
    from policyd.quarantine.held import message_id

    files = files or ModelFiles(model_path(config), shipped_model())
    key = message_key(raw)
    found_id = message_id(raw)
    memory = learned_of(files)
    headers, body = content.split_message(raw[: config.content.max_body])
    features = content.message_features(untagged(headers, config.content.tag), body)
    with files.locked():
        seen = NewMessages(memory.read())
        if not seen.take(key, spam):
            return Outcome(False, spam, key, found_id)
        model, source = files.current()
        new = training.learn(model, [(features, spam)], threshold=config.content.tag_at)
        new.info["learned_onto"] = str(source)
        kept = files.swap(new, "learn")
        memory.write(seen.remembered())
    return Outcome(True, spam, key, found_id, kept)


class Feedback:
    """Learns single messages off the reactor thread, audits each change, and never fails.

    :param store: where the audit entries go.
    :param run_blocking: how the learning runs (:func:`policyd.reactor.in_thread` in a server).
    :param clock: the audit entries' time (``seconds()``); default the wall clock.
    :param learn: the blocking learner (tests inject one).
    """

    def __init__(
        self,
        store: Store,
        run_blocking: RunBlocking,
        clock: Any = None,
        learn: Callable[[Config, bytes, bool], Outcome] = learn_message,
    ) -> None:
        self.store = store
        self.run_blocking = run_blocking
        self.clock = clock
        self.learn_message = learn

    def learn(self, config: Config, raw: bytes, spam: bool, by: str, why: str) -> Deferred[Outcome | None]:
        """Learn ``raw`` as spam or ham for ``by`` (``why``: what it was, for the log and audit).

        Fires with the outcome, or None when learning failed (logged in one line).
        """
        return Deferred.fromCoroutine(self._learn(config, raw, spam, by, why))

    async def _learn(self, config: Config, raw: bytes, spam: bool, by: str, why: str) -> Outcome | None:
        label = "spam" if spam else "ham"
        try:
            outcome: Outcome = await self.run_blocking(self.learn_message, config, raw, spam)
        except Exception as error:
            log.error("content model: %s not learned as %s: %s", why, label, error)
            return None
        ids = f"Message-ID {outcome.message_id or '(none)'}"
        if not outcome.learned:
            log.info("content model: %s already learned as %s (%s), not learned again", why, label, ids)
            return outcome
        reason = f"learned 1 {label}: {why} ({ids})"
        log.info("content model %s: %s by %s: %s", model_path(config), ACTION, by, reason)
        now = self.clock.seconds() if self.clock is not None else time.time()
        try:
            await self.store.record(AuditEntry(now, by, ACTION, str(model_path(config)), reason))
        except Exception as error:
            log.error("content model learned %s but not audited: %s", why, error)
        return outcome
