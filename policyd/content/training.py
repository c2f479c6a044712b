"""Training and learning the classifier, and the held-back check that keeps a new model from being worse.

- :func:`train` makes a model from nothing (``policyd train``);
  :func:`learn` goes on from a model with more mail (``policyd learn``).
  Both are online logistic regression, a few passes over the mail in the
  order given, so the latest mail weighs most.
- Both hold back a tenth of the mail first (:func:`learn` every
  :data:`HELD_EVERY`-th message, :func:`train` a random tenth): a model
  trained without it scores it beside the model in use, and the caller's
  ``check`` sees the two side by side (:class:`Check`) before the final
  model (trained on everything) is made, and may refuse it.  :func:`train`
  also fits the points scale on it (Platt scaling); a learned model keeps
  the scale of the model it started from.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from policyd.content.classifier import BITS, PASSES, RATE, Model, Stored, vectorize
from policyd.content.features import Features

#: Fewest ham, and fewest spam, that ``policyd train`` takes without ``--force``: fewer
#: cannot make a model that knows more than the shipped one.
MIN_TRAIN = 20

#: Fewest messages ``policyd learn`` takes: a single report is worth learning.
MIN_LEARN = 1

#: One message in this many is held back for learn's check.
HELD_EVERY = 10

#: The check tolerates this many more errors at the verdict, and :data:`ERROR_SHARE` of the held mail.
ERROR_SLACK = 1
ERROR_SHARE = 0.02

#: The check tolerates a ROC area this much lower (a worse ranking of spam above ham) ...
AUC_SLACK = 0.01
#: ... judged only with at least this many held-back messages of each kind.
AUC_MINIMUM = 5


def _sigmoid(margin: float) -> float:
    if margin >= 0:
        return 1.0 / (1.0 + math.exp(-margin))
    odds = math.exp(margin)
    return odds / (1.0 + odds)


def sgd(
    vectors: Sequence[Stored],
    labels: Sequence[int],
    passes: int,
    rate: float,
    start: tuple[npt.NDArray[np.float32], float],
) -> tuple[npt.NDArray[np.float32], float]:
    """Logistic regression by online gradient descent from ``start`` (weights, bias), passes in the order given.

    The mail is learned in the order it came (the training files' names):
    the last mail learned weighs most, as in the TREC online filters, which
    follows spam as it changes better than a shuffled order does.  The
    starting weights are copied, never changed.
    """
    weights = start[0].copy()
    bias = start[1]
    norms = [1.0 / math.sqrt(len(v)) if len(v) else 0.0 for v in vectors]
    for _ in range(passes):
        for indices, norm, label in zip(vectors, norms, labels, strict=True):
            margin = float(weights[indices].sum()) * norm + bias
            error = label - _sigmoid(margin)
            if abs(error) < 1e-4:
                continue
            weights[indices] += np.float32(rate * error * norm)
            bias += 0.1 * rate * error
    return weights, bias


def platt(margins: Sequence[float], labels: Sequence[int]) -> tuple[float, float]:
    """Fit ``p = sigmoid(a * margin + b)`` (Platt 1999, with his target priors).

    Plain gradient descent with backtracking on the mean log loss: slower
    than Newton's method but it cannot diverge when the held-out mail is
    perfectly separated (then the priors keep ``a`` finite).
    """
    positives = sum(labels)
    negatives = len(labels) - positives
    if not positives or not negatives:
        return 1.0, 0.0
    high = (positives + 1.0) / (positives + 2.0)
    low = 1.0 / (negatives + 2.0)
    targets = np.array([high if y else low for y in labels])
    x = np.array(margins, dtype=np.float64)
    spread = float(np.std(x)) or 1.0
    x = x / spread

    def loss(a: float, b: float) -> float:
        z = a * x + b
        return float(np.mean(np.logaddexp(0.0, z) - targets * z))

    a, b, step = 1.0, 0.0, 1.0
    current = loss(a, b)
    for _ in range(2000):
        p = 0.5 * (1.0 + np.tanh(0.5 * (a * x + b)))
        ga, gb = float(np.mean((p - targets) * x)), float(np.mean(p - targets))
        while step > 1e-12:
            na, nb = a - step * ga, b - step * gb
            candidate = loss(na, nb)
            if candidate <= current:
                break
            step /= 2
        else:
            break
        improvement = current - candidate
        a, b, current = na, nb, candidate
        step *= 2
        if improvement < 1e-12:
            break
    return max(a, 1e-3) / spread, b


def roc_area(scores: Sequence[float], labels: Sequence[int]) -> float:
    """The chance that a spam scores above a ham (ties count one half)."""
    spam = np.array([s for s, y in zip(scores, labels, strict=True) if y], dtype=np.float64)
    ham = np.array([s for s, y in zip(scores, labels, strict=True) if not y], dtype=np.float64)
    if not len(spam) or not len(ham):
        return 1.0
    above = (spam[:, None] > ham[None, :]).sum() + 0.5 * (spam[:, None] == ham[None, :]).sum()
    return float(above) / (len(spam) * len(ham))


@attrs.frozen
class Check:
    """The held-back mail scored by the model in use and by the new one (trained without it).

    :ivar held: messages held back.
    :ivar held_spam: how many of them are spam.
    :ivar old_errors: ham flagged plus spam missed at the verdict by the model in use.
    :ivar new_errors: the same for the new model.
    :ivar old_auc: ROC area of the model in use on them.
    :ivar new_auc: ROC area of the new model on them.
    """

    held: int
    held_spam: int
    old_errors: int
    new_errors: int
    old_auc: float
    new_auc: float

    @property
    def ranked(self) -> bool:
        """Whether enough of each kind was held back for the ROC areas to mean something."""
        return min(self.held_spam, self.held - self.held_spam) >= AUC_MINIMUM

    def worse(self) -> str | None:
        """Why the new model is clearly worse on the held-back mail; None when it is not."""
        slack = max(ERROR_SLACK, math.ceil(ERROR_SHARE * self.held))
        if self.new_errors > self.old_errors + slack:
            return (f"the new model makes {self.new_errors} errors on {self.held} held-back messages "
                    f"where the model in use makes {self.old_errors}")
        if self.ranked and self.new_auc < self.old_auc - AUC_SLACK:
            return (f"the new model ranks {self.held} held-back messages worse than the model in use "
                    f"(ROC area {self.new_auc:.4f} against {self.old_auc:.4f})")
        return None

    def as_dict(self) -> dict[str, object]:
        """For ``--json`` and the audit log."""
        return {"held": self.held, "held_spam": self.held_spam, "old_errors": self.old_errors,
                "new_errors": self.new_errors, "old_auc": round(self.old_auc, 4), "new_auc": round(self.new_auc, 4)}

    def summary(self) -> str:
        """One line for people."""
        return (f"held back {self.held}: errors {self.old_errors} -> {self.new_errors}, "
                f"ROC area {self.old_auc:.4f} -> {self.new_auc:.4f}")


def compare(old: Model, new: Model, vectors: Sequence[Stored], labels: Sequence[int], threshold: float) -> Check:
    """Score the held-back mail with both models; ``score >= threshold`` is the verdict."""
    old_points = [old.to_points(old.margin(v)) for v in vectors]
    new_points = [new.to_points(new.margin(v)) for v in vectors]

    def errors(points: list[float]) -> int:
        return sum(1 for p, y in zip(points, labels, strict=True) if (p >= threshold) != bool(y))

    return Check(len(labels), sum(labels), errors(old_points), errors(new_points),
                 roc_area(old_points, labels), roc_area(new_points, labels))


#: What a caller gives to see the check before the final model is made: it may raise to refuse.
Checker = Callable[[Check], None]


def _held(count: int) -> list[int]:
    """Which messages are held back: every HELD_EVERY-th, the latest of each ten."""
    return list(range(HELD_EVERY - 1, count, HELD_EVERY))


def _vectors(
    examples: Iterable[tuple[Features, bool]], bits: int, progress: Callable[[int], None] | None
) -> tuple[list[Stored], list[int]]:
    vectors: list[Stored] = []
    labels: list[int] = []
    for features, spam in examples:
        vectors.append(vectorize(features, bits))
        labels.append(1 if spam else 0)
        if progress is not None and len(labels) % 1000 == 0:
            progress(len(labels))
    return vectors, labels


def _split(vectors: list[Stored], labels: list[int]) -> tuple[list[int], list[int]]:
    held = _held(len(labels))
    chosen = set(held)
    return held, [i for i in range(len(labels)) if i not in chosen]


def _counts(labels: Sequence[int], started: float, passes: int) -> dict[str, Any]:
    """What a model records of the mail it learned: ham and spam counts, when, how long, how many passes."""
    spam_count = sum(labels)
    return {
        "ham": len(labels) - spam_count,
        "spam": spam_count,
        "trained_at": int(time.time()),
        "seconds": round(time.monotonic() - started, 1),
        "passes": passes,
    }


def train(
    examples: Iterable[tuple[Features, bool]],
    *,
    bits: int = BITS,
    passes: int = PASSES,
    rate: float = RATE,
    current: Model | None = None,
    threshold: float = 5.0,
    check: Checker | None = None,
    calibration: float = 0.1,
    seed: int = 1,
    progress: Callable[[int], None] | None = None,
) -> Model:
    """Train a model on ``(features, is_spam)`` pairs.

    A share ``calibration`` of the mail, chosen at random, is held back: a
    trial model trained on the rest has its points scale fitted on it (mail
    it did not see), and, with ``current`` and ``check``, is compared with
    ``current`` on it; then the model is trained again on everything.

    :param current: the model in use, for the check.
    :param threshold: the verdict's points (``content.tag_at``), for the check.
    :param check: sees the comparison before the final training; may raise to refuse.
    :raises ValueError: without at least one ham and one spam.
    """
    started = time.monotonic()
    vectors, labels = _vectors(examples, bits, progress)
    spam_count = sum(labels)
    if not spam_count or spam_count == len(labels):
        raise ValueError(f"training needs ham and spam (got {len(labels) - spam_count} ham, {spam_count} spam)")
    scale, offset = 1.0, 0.0
    # Training holds back a random tenth (the points scale is fitted on it; a
    # fixed seed gives the same model for the same mail).
    picker = random.Random(seed)
    held = [i for i in range(len(labels)) if picker.random() < calibration]
    chosen = set(held)
    kept = [i for i in range(len(labels)) if i not in chosen]
    held_labels = [labels[i] for i in held]
    empty = (np.zeros(1 << bits, dtype=np.float32), 0.0)
    if 0 < sum(held_labels) < len(held_labels):
        weights, bias = sgd([vectors[i] for i in kept], [labels[i] for i in kept], passes, rate, empty)
        trial = Model(weights, bias)
        scale, offset = platt([trial.margin(vectors[i]) for i in held], held_labels)
        # Natural log-odds to log2-odds ("bits of evidence").
        scale, offset = scale / math.log(2), offset / math.log(2)
        if current is not None and check is not None and current.bits == bits:
            trial = Model(weights, bias, scale, offset)
            check(compare(current, trial, [vectors[i] for i in held], held_labels, threshold))
    weights, bias = sgd(vectors, labels, passes, rate, empty)
    return Model(weights, bias, scale, offset, {**_counts(labels, started, passes), "bits": bits})


def learn(
    model: Model,
    examples: Iterable[tuple[Features, bool]],
    *,
    passes: int = PASSES,
    rate: float = RATE,
    threshold: float = 5.0,
    check: Checker | None = None,
) -> Model:
    """A new model: ``model`` having learned ``(features, is_spam)`` pairs, in their order, on top of what it knew.

    With :data:`HELD_EVERY` messages or more, every HELD_EVERY-th is held
    back first: ``model`` and a trial model that learned the rest score
    them, and ``check`` sees the comparison; then the new model learns
    everything.  The points scale is ``model``'s.

    :param threshold: the verdict's points (``content.tag_at``), for the check.
    :raises ValueError: when there is nothing to learn.
    """
    started = time.monotonic()
    vectors, labels = _vectors(examples, model.bits, None)
    if not labels:
        raise ValueError("nothing to learn: no message found")
    start = (model.weights, model.bias)
    held, kept = _split(vectors, labels)
    if held and check is not None:
        weights, bias = sgd([vectors[i] for i in kept], [labels[i] for i in kept], passes, rate, start)
        trial = Model(weights, bias, model.scale, model.offset)
        check(compare(model, trial, [vectors[i] for i in held], [labels[i] for i in held], threshold))
    weights, bias = sgd(vectors, labels, passes, rate, start)
    info = {**model.info, **_counts(labels, started, passes)}
    return Model(weights, bias, model.scale, model.offset, info)
