"""``policyd learn`` and ``policyd model list|rollback``: the content model learns the organisation's own mail.

``learn`` goes on from the model in use with the messages given (users'
reports: ham and spam, in file-name order, ``-`` for one message on
standard input) and puts the new model in use at once; the previous one is
kept (:mod:`policyd.content.models`).  A new model that does worse than the
one in use on mail held back from what it learned is refused unless
``--force``.  Every change of model is written to the audit log with its
counts, and to syslog when ``log.syslog`` is set.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from policyd.cli.common import (
    by_option,
    cli,
    config_option,
    json_option,
    load_config,
    run_async,
    say,
    show,
    show_list,
    when,
    who,
)
from policyd.config import Config
from policyd.content import corpus, training
from policyd.content.classifier import Model
from policyd.content.features import Features
from policyd.content.models import ModelFiles, Refused
from policyd.content.scorer import model_path, shipped_model
from policyd.content.training import Check
from policyd.errors import PolicydError, UsageError

log = logging.getLogger("policyd.content")


def model_files(config: Config) -> ModelFiles:
    """The model in use for ``config`` and the ones kept beside it."""
    return ModelFiles(model_path(config), shipped_model())


def record_change(config: Config, by: str, action: str, reason: str) -> None:
    """Log a change of model and write it to the audit log (a store that cannot be reached is a warning).

    ``policyd train`` calls this too, with action ``model-train``.
    """
    from policyd.logs import syslog_handler
    from policyd.store import AuditEntry, open_store

    subject = str(model_path(config))
    handler = syslog_handler(config.log.syslog)
    if handler is not None:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        log.info("content model %s: %s by %s: %s", subject, action, by, reason)
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()

    async def write(_reactor: Any) -> None:
        store = open_store(config.store.url, float(config.store.deadline))
        try:
            await store.record(AuditEntry(time.time(), by, action, subject, reason))
        finally:
            await store.close()

    try:
        run_async(write)
    except PolicydError as error:
        say(f"policyd: warning: the model is in use but the audit log was not written: {error}", err=True)


def read_mail(ham: Sequence[str], spam: Sequence[str]) -> list[corpus.LabelledMessage]:
    """The messages of the ``--ham`` and ``--spam`` PATHs in file-name order, ham and spam interleaved.

    :raises UsageError: for a PATH that does not exist, or ``-`` given twice.
    :raises PolicydError: when a directory or mbox cannot be read.
    """
    try:
        return corpus.labelled_mail(ham, spam)
    except corpus.MailError as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        raise PolicydError(f"cannot read the mail: {error.strerror or error}") from None


def checker(force: bool, seen: list[Check]) -> training.Checker:
    """What ``train`` and ``learn`` do with the held-back check: refuse a clearly worse model unless ``force``.

    :param seen: receives the check, for the output and the audit log.
    """

    def check(result: Check) -> None:
        seen.append(result)
        reason = result.worse()
        if reason is not None and not force:
            raise Refused(f"refused: {reason}; the model in use is unchanged (--force to use the new one anyway)")

    return check


ModelBuilder = Callable[[Model, Path, Iterator[tuple[Features, bool]], training.Checker], Model]


def put_in_use(
    config: Config,
    messages: Sequence[corpus.LabelledMessage],
    build: ModelBuilder,
    made: str,
    verb: str,
    force: bool,
    by: str | None,
    as_json: bool,
    started: float,
    skip_learned: bool = False,
) -> None:
    """Make a model from ``messages`` and put it in use: what ``train`` and ``learn`` share.

    With the model lock held, ``build(current model, its file, the messages'
    features, the held-back check)`` makes the new model, which then replaces
    the current one (kept); the change is logged, audited (``model-MADE``) and shown.
    The messages the new model learned are remembered beside it
    (:class:`~policyd.content.feedback.NewMessages`).

    :param skip_learned: leave out the messages the model in use learned
        before with the same label (``learn``; ``train`` starts afresh).
    :raises PolicydError: when a message cannot be read (nothing is changed then).
    :raises Refused: when every message was learned before (``skip_learned``).
    """
    from policyd.content.feedback import NewMessages, learned_of

    files = model_files(config)
    checks: list[Check] = []
    unreadable: list[str] = []
    with files.locked():
        memory = learned_of(files)
        seen = NewMessages(memory.read() if skip_learned else {}, skip=skip_learned)
        current, source = files.current()
        try:
            new = build(current, source, corpus.features_of(messages, config.content.max_body, unreadable, seen),
                        checker(force, checks))
        except Refused:
            if seen.skipped and not seen.learning and not unreadable:
                raise Refused(f"nothing new to learn: the {seen.skipped} messages given were learned before "
                              "with the same labels; the model in use is unchanged") from None
            raise
        if unreadable:
            raise PolicydError("cannot read " + "; ".join(unreadable[:5]))
        kept = files.swap(new, made)
        try:
            memory.write(seen.remembered(), at_least=len(seen.fresh))
        except PolicydError as error:
            say(f"policyd: warning: the model is in use, but {error}: these messages may be learned again",
                err=True)
    seconds = time.monotonic() - started
    ham_count, spam_count = int(new.info["ham"]), int(new.info["spam"])
    check = checks[0] if checks else None
    reason = f"{verb} {ham_count} ham and {spam_count} spam"
    if seen.skipped:
        reason += f" ({seen.skipped} learned before, left out)"
    if check is not None:
        reason += f"; {check.summary()}" + ("; forced" if force and check.worse() else "")
    record_change(config, who(by), f"model-{made}", reason)
    show(
        as_json,
        {"model": str(files.path), "ham": ham_count, "spam": spam_count, "skipped": seen.skipped,
         "seconds": round(seconds, 1), "previous": str(kept), "check": check.as_dict() if check else None},
        f"{reason} in {seconds:.1f}s; model {files.path} in use (previous kept as {kept})",
    )


@cli.command()
@config_option
@click.option("--ham", "ham", multiple=True, metavar="PATH",
              help="Good mail: a Maildir, a directory of message files, an mbox, or - for one message on stdin.")
@click.option("--spam", "spam", multiple=True, metavar="PATH",
              help="Spam: a Maildir, a directory of message files, an mbox, or - for one message on stdin.")
@click.option("--force", is_flag=True, help="Use the new model even when it does worse on the held-back mail.")
@by_option
@json_option
def learn(ham: tuple[str, ...], spam: tuple[str, ...], force: bool, by: str | None, as_json: bool) -> None:
    """Learn messages on top of the content model in use and put the new model in use."""
    if not ham and not spam:
        raise UsageError("give the mail to learn: --ham PATH and/or --spam PATH")
    config = load_config()
    started = time.monotonic()
    if (ham, spam) in ((("-",), ()), ((), ("-",))):
        learn_one(config, sys.stdin.buffer.read(), bool(spam), by, as_json, started)
        return
    messages = read_mail(ham, spam)
    if not messages:
        raise Refused("nothing to learn: no message found in the PATHs given")

    def build(
        current: Model, source: Path, examples: Iterator[tuple[Features, bool]], check: training.Checker
    ) -> Model:
        try:
            new = training.learn(current, examples, threshold=config.content.tag_at, check=check)
        except ValueError as error:
            raise Refused(str(error)) from None
        new.info["learned_onto"] = str(source)
        return new

    put_in_use(config, messages, build, "learn", "learned", force, by, as_json, started, skip_learned=True)


def learn_one(config: Config, raw: bytes, spam: bool, by: str | None, as_json: bool, started: float) -> None:
    """Learn the one message of ``-`` as a user's report: once, however often it is reported.

    A message already learned with this label (its Message-ID, else its
    body, :func:`policyd.content.feedback.message_key`) is not learned again:
    moving it into Junk twice counts once.

    :raises Refused: when it was learned with this label before (exit 1).
    """
    from policyd.content.feedback import learn_message

    if not raw.strip():
        raise UsageError("nothing to learn: standard input is empty")
    label = "spam" if spam else "ham"
    files = model_files(config)
    outcome = learn_message(config, raw, spam, files)
    ids = f"Message-ID {outcome.message_id or '(none)'}"
    if not outcome.learned:
        raise Refused(f"already learned as {label} ({ids}): the model in use is unchanged")
    seconds = time.monotonic() - started
    reason = f"learned 1 {label}: reported ({ids})"
    record_change(config, who(by), "model-learn", reason)
    show(
        as_json,
        {"model": str(files.path), "ham": int(not spam), "spam": int(spam), "skipped": 0, "seconds": round(seconds, 1),
         "previous": str(outcome.previous), "check": None},
        f"{reason} in {seconds:.1f}s; model {files.path} in use (previous kept as {outcome.previous})",
    )


@cli.group()
@config_option
def model() -> None:
    """The content model in use and the previous ones kept beside it."""


@model.command("list")
@config_option
@json_option
def model_list(as_json: bool) -> None:
    """The model in use and the kept ones, newest first: when, how it was made, its ham and spam."""
    kept = model_files(load_config()).listing()
    show_list(
        as_json,
        kept,
        lambda k: k.as_dict(),
        ("IN USE", "WHEN", "MADE BY", "HAM", "SPAM", "FILE"),
        lambda k: ("*" if k.in_use else "", when(k.at) if k.at else "-", k.made, k.ham, k.spam, k.path),
    )


@model.command("rollback")
@config_option
@by_option
@json_option
def model_rollback(by: str | None, as_json: bool) -> None:
    """Put the previous model back in use (the one in use is forgotten); exit 1 when none is kept."""
    from policyd.content.feedback import learned_of

    config = load_config()
    files = model_files(config)
    with files.locked():
        restored = files.rollback()
        # What the forgotten model learned is not known of the one restored: forget it too,
        # so that mail reported again is learned again rather than passed over.
        learned_of(files).forget()
    reason = f"back to the model made by {restored.made} at {when(restored.at)}" if restored.at else "back"
    restored_info = restored.as_dict()
    record_change(config, who(by), "model-rollback", f"{reason}, {restored.ham} ham and {restored.spam} spam")
    show(as_json, restored_info, f"{reason}; model {files.path} in use")
