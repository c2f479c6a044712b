"""``policyd train`` and ``score``: the content classifier."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from policyd.cli.common import (
    WholeNumber,
    cli,
    config_option,
    json_option,
    load_config,
    print_json,
    say,
    show,
)
from policyd.content import classifier
from policyd.content import features as content
from policyd.content.scorer import ContentScorer, header_secret, load_model, model_path
from policyd.errors import PolicydError, UsageError


def _mail_paths(paths: Sequence[str], option: str) -> list[Any]:

    found = []
    for path in paths:
        candidate = Path(path)
        if not candidate.exists():
            raise UsageError(f"{option} {path}: no such file or directory")
        found.append(candidate)
    return found


@cli.command()
@config_option
@click.option("--ham", "ham", multiple=True, required=True, metavar="PATH",
              help="Good mail: a Maildir, a directory of message files, or an mbox (repeatable).")
@click.option("--spam", "spam", multiple=True, required=True, metavar="PATH",
              help="Spam: a Maildir, a directory of message files, or an mbox (repeatable).")
@click.option("--passes", type=WholeNumber(1, 50), default=None, help="Passes over the mail (default 8).")
@json_option
def train(ham: tuple[str, ...], spam: tuple[str, ...], passes: int | None, as_json: bool) -> None:
    """Train the content classifier and replace the model the milter and score use."""
    import time


    config = load_config()
    sources = [(p, False) for p in _mail_paths(ham, "--ham")] + [(p, True) for p in _mail_paths(spam, "--spam")]
    max_bytes = config.content.max_body
    unreadable: list[str] = []

    def examples() -> Any:
        for path, is_spam in sources:
            try:
                for _where, raw in content.read_mail(path):
                    yield content.extract(raw, max_bytes), is_spam
            except OSError as error:
                unreadable.append(f"{path}: {error.strerror or error}")

    started = time.monotonic()
    try:
        model = classifier.train(examples(), passes=passes or classifier.PASSES)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if unreadable:
        raise PolicydError("cannot read " + "; ".join(unreadable))
    target = model_path(config)
    model.info["sources"] = [str(p) for p, _ in sources]
    try:
        model.save(target)
    except OSError as error:
        raise PolicydError(f"cannot write the model {target}: {error.strerror or error}") from None
    seconds = time.monotonic() - started
    show(as_json, {"model": str(target), "ham": model.info["ham"], "spam": model.info["spam"], "seconds": round(seconds, 1)}, f"trained on {model.info['ham']} ham and {model.info['spam']} spam in {seconds:.1f}s; " f"model written to {target}")


def _messages_to_score(paths: Sequence[str]) -> Any:
    """(shown path, file) for every message named: a file is one message; a directory holds many."""
    import os


    for given in paths:
        path = Path(given)
        if path.is_dir():
            for file in content.message_files(path):
                yield os.path.join(given, os.path.relpath(file, path)), file
        else:
            yield given, path


@cli.command()
@config_option
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--top", type=WholeNumber(0), default=8, show_default=True, help="How many reasons to give.")
@json_option
def score(paths: tuple[str, ...], top: int, as_json: bool) -> None:
    """Score messages (files, Maildirs, directories of files) and explain each score.

    With --json, one line per message: {"path", "score", "spam", "content",
    "network", "reasons"}.  spam is score >= content.tag_at.
    """

    config = load_config()
    model, source = load_model(config)
    scorer = ContentScorer(model, header_secret(config, create=False), config.content.max_body)
    tag_at = config.content.tag_at
    failed = 0
    for shown, file in _messages_to_score(paths):
        try:
            raw = content.strip_from_line(file.read_bytes())
        except OSError as error:
            say(f"policyd: error: {shown}: {error.strerror or error}", err=True)
            failed += 1
            continue
        result = scorer.score(raw, explain=top)
        spam = result.points >= tag_at
        if as_json:
            print_json(
                {
                    "path": shown,
                    "score": result.points,
                    "spam": spam,
                    "content": result.content,
                    "network": result.network,
                    "reasons": [r.as_dict() for r in result.reasons],
                }
            )
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
