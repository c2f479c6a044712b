"""``python -m tests.eval [--cache DIR] [--save PATH]``: print the evaluation table.

For every stream (:mod:`tests.eval.corpus`), in time order: the first
:data:`TRAINED` of the mail is the past, the rest the future that is scored
and never trained on.  Two protocols:

- **full**: policyd's classifier trained on all the past (as ``policyd
  train``), the baseline learning it online, one pass;
- **feedback 10%**: both learn only every tenth message of the past (what
  users report); policyd also as ``policyd learn`` of them onto the
  shipped model (which was trained on the same corpus whole, so that row
  is only a check that learning runs, not a measure).

For each: (1-ROCA)%, spam caught at 0.1% and 1% ham false positives, ham
flagged and spam missed at each one's own verdict (policyd: ``content.tag_at``
5 points; baseline: even odds), and training and scoring speed in messages
per second of CPU time on one core (policyd scores as ``policyd score
--json`` does: MIME parsing, features and score, messages in batches).

``--save PATH`` first trains on every stream whole and writes the model
there (that is how ``policyd/models/default.model`` is made).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from policyd.cli.content import BATCH
from policyd.content import classifier, training
from policyd.content import features as content
from policyd.content.classifier import Model
from policyd.content.scorer import ContentScorer, shipped_model
from tests.eval import corpus, metrics
from tests.eval.baseline import ByteFourGrams

DEFAULT_CACHE = Path(os.environ.get("POLICYD_EVAL_CACHE", Path.home() / ".cache" / "policyd-eval"))
#: Share of a stream (its start) that is the past, trained on.
TRAINED = 0.8
#: The feedback protocol learns one message in this many.
FEEDBACK = 10
#: policyd's verdict: ``content.tag_at``'s default.
TAG_AT = 5.0

T = TypeVar("T")


def timed(work: Callable[[], T]) -> tuple[T, float]:
    """Result and CPU seconds of one call."""
    started = time.process_time()
    result = work()
    return result, max(time.process_time() - started, 1e-9)


def score_as_the_command(scorer: ContentScorer, test: Sequence[corpus.Message]) -> list[float]:
    """The points of ``test`` as ``policyd score --json`` gives them (no reasons, scored in batches)."""
    batch = BATCH
    return [s.points for start in range(0, len(test), batch)
            for s in scorer.score_many([m.raw for m in test[start : start + batch]])]


def policyd_run(train: Sequence[corpus.Message], test: Sequence[corpus.Message]) -> dict[str, object]:
    """Train policyd's classifier on ``train`` as ``policyd train`` does; score ``test`` as ``score --json``."""
    model, train_seconds = timed(
        lambda: classifier.train((content.extract(m.raw), m.spam) for m in train)
    )
    scores, score_seconds = timed(lambda: score_as_the_command(ContentScorer(model, None), test))
    return {"scores": scores, "threshold": TAG_AT, "train": len(train) / train_seconds,
            "score": len(test) / score_seconds, "model": model}


def learned_run(train: Sequence[corpus.Message], test: Sequence[corpus.Message]) -> dict[str, object]:
    """The shipped model learning ``train`` as ``policyd learn`` does; score ``test`` as ``score --json``."""
    shipped = Model.load(shipped_model())
    model, train_seconds = timed(
        lambda: training.learn(shipped, ((content.extract(m.raw), m.spam) for m in train))
    )
    scores, score_seconds = timed(lambda: score_as_the_command(ContentScorer(model, None), test))
    return {"scores": scores, "threshold": TAG_AT, "train": len(train) / train_seconds,
            "score": len(test) / score_seconds, "model": model}


def baseline_run(train: Sequence[corpus.Message], test: Sequence[corpus.Message]) -> dict[str, object]:
    """The byte 4-gram baseline learning ``train`` online, one pass, then scoring ``test``."""
    learner = ByteFourGrams()

    def learn() -> None:
        for message in train:
            learner.learn(message.raw, message.spam)

    _, train_seconds = timed(learn)
    scores, score_seconds = timed(lambda: [learner.score(m.raw) for m in test])
    return {"scores": scores, "threshold": 0.0, "train": len(train) / train_seconds,
            "score": len(test) / score_seconds}


def rows(result: dict[str, object], labels: Sequence[bool]) -> list[str]:
    """The table's cells for one learner."""
    scores = result["scores"]
    assert isinstance(scores, list)
    threshold = result["threshold"]
    assert isinstance(threshold, float)
    fp, fn = metrics.errors_at(scores, labels, threshold)
    hams, spams = len(labels) - sum(labels), sum(labels)
    return [
        f"{100 * (1 - metrics.roc_auc(scores, labels)):.4f}",
        f"{100 * metrics.caught_at(scores, labels, 0.001):.2f}%",
        f"{100 * metrics.caught_at(scores, labels, 0.01):.2f}%",
        f"{fp} ({100 * fp / hams:.2f}%)",
        f"{fn} ({100 * fn / spams:.2f}%)",
        f"{result['train']:.0f}",
        f"{result['score']:.0f}",
    ]


TITLES = (
    "(1-ROCA)%",
    "spam caught at 0.1% ham FP",
    "spam caught at 1% ham FP",
    "ham flagged at the verdict",
    "spam missed at the verdict",
    "train msg/s (CPU)",
    "score msg/s (CPU)",
)


def evaluate(stream: corpus.Stream) -> None:
    """Print both protocols for one stream."""
    messages = stream.messages
    split = int(TRAINED * len(messages))
    past, future = messages[:split], messages[split:]
    labels = [m.spam for m in future]
    day = time.strftime
    print(f"\n{stream.title} ({stream.licence}): {len(messages)} distinct messages in time order")
    print(f"  past (trained): {len(past)}, {sum(m.spam for m in past)} spam, "
          f"to {day('%Y-%m-%d', time.gmtime(past[-1].at))}")
    print(f"  future (scored): {len(future)}, {sum(labels)} spam, "
          f"{day('%Y-%m-%d', time.gmtime(future[0].at))} to {day('%Y-%m-%d', time.gmtime(future[-1].at))}")
    for protocol, trained in (("full", past), (f"feedback 1/{FEEDBACK}", past[FEEDBACK - 1 :: FEEDBACK])):
        ours = policyd_run(trained, future)
        theirs = baseline_run(trained, future)
        print(f"\n  {protocol}: {len(trained)} trained ({sum(m.spam for m in trained)} spam)")
        print(f"  {'':<30}{'policyd':>16}{'byte 4-gram LR':>16}")
        for title, mine, base in zip(TITLES, rows(ours, labels), rows(theirs, labels), strict=True):
            print(f"  {title:<30}{mine:>16}{base:>16}")
        if protocol != "full":
            learned = learned_run(trained, future)
            print(f"  {'policyd learn onto the shipped model':<46}")
            for title, mine in zip(TITLES, rows(learned, labels), strict=True):
                print(f"  {title:<30}{mine:>16}")
        if protocol == "full":
            rate = ours["train"]
            assert isinstance(rate, float)
            print(f"  {'policyd: 30,000 trained in':<30}{30000 / rate:>15.0f}s")


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate; print the table; write a model with ``--save``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the corpora are installed")
    parser.add_argument("--save", type=Path, help="train on every stream whole and write the model here")
    options = parser.parse_args(argv)

    streams = corpus.streams(options.cache)
    if options.save is not None:
        # Written first: the feedback protocol's "learn onto the shipped model" row then uses it.
        everything = [m for s in streams for m in s.messages]
        final = classifier.train((content.extract(m.raw), m.spam) for m in everything)
        final.info["corpus"] = "; ".join(f"{s.title} (all of it)" for s in streams)
        final.save(options.save)
        print(f"wrote {options.save} ({options.save.stat().st_size // 1024} KB), "
              f"trained on {len(everything)} messages")
    for stream in streams:
        evaluate(stream)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
