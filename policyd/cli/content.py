"""``policyd train`` and ``score``: the content classifier."""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from policyd.cli.common import (
    WholeNumber,
    by_option,
    cli,
    config_option,
    json_line,
    json_option,
    load_config,
    say,
)
from policyd.content import classifier
from policyd.content import features as content
from policyd.errors import UsageError

if TYPE_CHECKING:
    from policyd.content.classifier import Model
    from policyd.content.features import Features
    from policyd.content.training import Checker

# Training's modules are imported by train itself: policyd score, run by scripts
# over thousands of files, starts without them (see policyd.cli.load_commands).


@cli.command()
@config_option
@click.option("--ham", "ham", multiple=True, required=True, metavar="PATH",
              help="Good mail: a Maildir, a directory of message files, or an mbox (repeatable).")
@click.option("--spam", "spam", multiple=True, required=True, metavar="PATH",
              help="Spam: a Maildir, a directory of message files, or an mbox (repeatable).")
@click.option("--passes", type=WholeNumber(1, 50), default=None,
              help=f"Passes over the mail (default {classifier.PASSES}).")
@click.option("--force", is_flag=True,
              help="Use the new model even with little mail, or when it does worse on the held-back mail.")
@by_option
@json_option
def train(
    ham: tuple[str, ...], spam: tuple[str, ...], passes: int | None, force: bool, by: str | None, as_json: bool
) -> None:
    """Train the content classifier anew and put the model in use (the previous one is kept).

    The files of all PATHs are learned as one sequence ordered by file name,
    ham and spam interleaved.
    """
    from policyd.cli.learning import put_in_use, read_mail
    from policyd.content import training
    from policyd.content.models import Refused

    config = load_config()
    started = time.monotonic()
    messages = read_mail(ham, spam)
    spam_count = sum(1 for m in messages if m.spam)
    ham_count = len(messages) - spam_count
    if not ham_count or not spam_count:
        raise UsageError(f"training needs ham and spam (got {ham_count} ham, {spam_count} spam)")
    if min(ham_count, spam_count) < training.MIN_TRAIN and not force:
        raise Refused(
            f"refused: {ham_count} ham and {spam_count} spam is too little to train a model on "
            f"(at least {training.MIN_TRAIN} of each; --force to train anyway)"
        )

    def build(current: Model, _source: Path, examples: Iterator[tuple[Features, bool]], check: Checker) -> Model:
        try:
            model = training.train(
                examples, passes=passes or classifier.PASSES, current=current, threshold=config.content.tag_at,
                check=check,
            )
        except ValueError as error:
            raise UsageError(str(error)) from None
        model.info["sources"] = [*ham, *spam]
        return model

    put_in_use(config, messages, build, "train", "trained on", force, by, as_json, started)


#: Messages that ``policyd score --json`` scores together: numpy hashes their features at once.
BATCH = 64


def _messages_to_score(paths: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(shown path, file) for every message named: a file is one message; a directory holds many."""
    for given in paths:
        if os.path.isdir(given):
            # Walked from the path as given, so each file's path is shown as the path given, then the file's.
            yield from ((file, file) for file in content.message_paths(given))
        else:
            yield given, given


def _json_path(path: str) -> str:
    """A path as a JSON string, as :func:`json_line` writes it; a plain ASCII one without the json module."""
    if path.isascii() and path.isprintable() and '"' not in path and "\\" not in path:
        return f'"{path}"'
    return json_line(path)


#: Bytes of a message file read by one system call; a larger file is read on to its end.
READ_FIRST = 1 << 16


def _read(shown: str, file: str) -> bytes | None:
    """A message file's bytes without an mbox ``From`` line; None (the error said) when it cannot be read.

    Read by descriptor, not through a file object: most mail fits in one
    read of :data:`READ_FIRST` bytes, and a file object cost as much again.
    """
    try:
        descriptor = os.open(file, os.O_RDONLY)
        try:
            raw = os.read(descriptor, READ_FIRST)
            if len(raw) == READ_FIRST:
                with os.fdopen(descriptor, "rb", closefd=False) as stream:
                    raw += stream.read()
        finally:
            os.close(descriptor)
        return content.strip_from_line(raw)
    except OSError as error:
        say(f"policyd: error: {shown}: {error.strerror or error}", err=True)
        return None


@cli.command()
@config_option
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--top", type=WholeNumber(0), default=None,
              help="How many reasons to give (default 8; with --json 0, for speed).")
@json_option
def score(paths: tuple[str, ...], top: int | None, as_json: bool) -> None:
    """Score messages (files, Maildirs, directories of files) and explain each score.

    With --json, one line per message: {"path", "score", "spam", "content",
    "network", "reasons"}; spam is score >= content.tag_at; reasons are
    listed with --top N.
    """
    from policyd.content.scorer import ContentScorer, header_secret, load_model

    explain = top if top is not None else (0 if as_json else 8)

    config = load_config()
    model, source = load_model(config)
    scorer = ContentScorer(model, header_secret(config, create=False), config.content.max_body)
    tag_at = config.content.tag_at
    failed = 0
    if as_json and not explain:
        # Only scores: read and scored BATCH at a time, one JSON line each, written straight out.
        write = sys.stdout.write
        files = _messages_to_score(paths)
        while batch := list(itertools.islice(files, BATCH)):
            names, raws = [], []
            for name, file in batch:
                raw = _read(name, file)
                if raw is None:
                    failed += 1
                    continue
                names.append(name)
                raws.append(raw)
            for name, result in zip(names, scorer.score_many(raws), strict=True):
                # json_line's object, keys in its order, written without building it (floats as repr, as json).
                verdict = "true" if result.points >= tag_at else "false"
                write(f'{{"content":{result.content!r},"network":{result.network!r},"path":{_json_path(name)},'
                      f'"reasons":[],"score":{result.points!r},"spam":{verdict}}}\n')
        sys.stdout.flush()
    for shown, file in () if as_json and not explain else _messages_to_score(paths):
        raw = _read(shown, file)
        if raw is None:
            failed += 1
            continue
        result = scorer.score(raw, explain=explain)
        spam = result.points >= tag_at
        if as_json:
            # Written directly: a line has no times to add.
            click.echo(json_line({
                "path": shown,
                "score": result.points,
                "spam": spam,
                "content": result.content,
                "network": result.network,
                "reasons": [r.as_dict() for r in result.reasons],
            }))
            continue
        verdict = "SPAM" if spam else "not spam"
        say(
            f"{shown}: score {result.points:.2f} -> {verdict} (tag_at {tag_at:g}; "
            f"content {result.content:.2f}, network {result.network:g})"
        )
        if result.subject:
            say(f"  subject: {result.subject[:100]}")
        if result.network:
            say(f"  network: +{result.network:g} from X-Policyd-Network ({result.network_reasons})")
        for reason in result.reasons:
            say(f"  {reason.points:+7.2f}  {reason.feature[:80]}")
    if not as_json:
        say(f"(model {source})", err=True)
    if failed:
        sys.exit(1)
