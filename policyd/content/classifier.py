"""The statistical spam classifier: logistic regression over hashed features.

The method is the one that won the TREC spam-filter evaluations (Goodman and
Yih 2006; Sculley and Wachman 2007): a linear model over a very large,
binary feature space, trained online.

- **Features.**  Every token of :class:`~policyd.content.features.Features` (words,
  word pairs, header words, URL domains, structure facts) and every
  character 4-gram of its text (in UTF-8 bytes) is hashed into one of
  ``2**bits`` weights (the "hashing trick": no vocabulary to keep, new
  words need no retraining).  A feature counts once per message and the
  vector is scaled to unit length, so long mail does not weigh more.
- **Training.**  Stochastic gradient descent on the logistic loss, several
  shuffled passes with a decreasing rate.  A message already classified
  with a wide margin moves the weights by almost nothing, so in effect the
  model learns from its errors and near-misses.
- **Points.**  The model's margin is turned into *points*: the base-2
  logarithm of the odds that the message is spam, calibrated by Platt
  scaling on a part of the training mail held out for it.  0 points is
  even odds, +5 is 32 to 1 for spam, -5 is 32 to 1 for ham.  Points add to the network points of the reputation
  header and are compared with ``content.tag_at``.

Scoring is a handful of numpy operations on the whole vector (no loop over
features in Python): a fraction of a millisecond for typical mail.
A model file is a compressed ``.npz`` (weights in float16, a few MB).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from policyd.content.features import Features

#: Format of the model file; a newer format is refused with a clear message.
FORMAT = 1

#: Hashed feature space: 2**20 weights.  Collisions cost little at this size
#: for a few hundred thousand distinct features, and the file stays small.
BITS = 20

#: Character n-gram length: 4 bytes is the best single length in the TREC
#: results (3 is too common, 5 too rare).
NGRAM = 4

#: The n-gram lengths used (3+4, 4+5 and 4+6 did no better on the eval corpus).
NGRAMS = (NGRAM,)

#: Passes over the training mail and the learning rate of the first pass.
PASSES = 6
RATE = 16.0

#: Feature indices of a message (at most 2**32 weights).
Indices = npt.NDArray[np.uint32]
#: A message's features kept for training (the same type: 4 bytes an index).
Stored = Indices

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_GOLDEN32 = np.uint32(0x9E3779B1)


def hash_tokens(tokens: Sequence[str], bits: int = BITS) -> Indices:
    """Feature indices of tokens (CRC-32, stable across processes and versions)."""
    try:
        encoded = list(map(str.encode, tokens))
    except UnicodeEncodeError:
        # Header bytes that were not UTF-8 come as surrogate escapes.
        encoded = [t.encode("utf-8", "surrogatepass") for t in tokens]
    hashes = np.fromiter(map(zlib.crc32, encoded), dtype=np.uint32, count=len(encoded))
    hashes &= np.uint32((1 << bits) - 1)
    return hashes


def hash_ngrams(text: str, n: int = NGRAM, bits: int = BITS) -> Indices:
    """Feature indices of the byte n-grams of ``text`` (n at most 8).

    Fibonacci hashing: an n-gram read as an integer, times the golden ratio;
    the top bits of the product mix every byte.  4-grams, the ones used,
    are read as 32-bit integers and multiplied modulo 2**32, in three
    operations on the whole text.
    """
    data = text.encode("utf-8", "surrogatepass")
    if len(data) < n:
        return np.zeros(0, dtype=np.uint32)
    windows = len(data) - n + 1
    if n == 4:
        grams: npt.NDArray[np.uint32] = np.ndarray((windows,), dtype="<u4", buffer=data, strides=(1,)) + np.uint32(n)
        grams *= _GOLDEN32
        grams >>= np.uint32(32 - bits)
        return grams
    octets = np.frombuffer(data, dtype=np.uint8)
    wide = np.zeros(windows, dtype=np.uint64)
    for i in range(n):
        wide |= octets[i : i + windows].astype(np.uint64) << np.uint64(8 * i)
    wide += np.uint64(n)
    wide *= _GOLDEN
    wide >>= np.uint64(64 - bits)
    return wide.astype(np.uint32)


def distinct(indices: Indices) -> Indices:
    """The sorted distinct values of ``indices`` (numpy's unique, without its overhead on small arrays)."""
    ordered = np.sort(indices)
    if len(ordered) < 2:
        return ordered
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def vectorize(features: Features, bits: int = BITS) -> Indices:
    """The sorted, distinct feature indices of a message (its binary vector)."""
    return _vector(hash_tokens(features.tokens, bits), features, bits)


def _vector(tokens: Indices, features: Features, bits: int) -> Indices:
    return distinct(np.concatenate([tokens] + [hash_ngrams(features.text, n, bits) for n in NGRAMS]))


def _sigmoid(margin: float) -> float:
    if margin >= 0:
        return 1.0 / (1.0 + math.exp(-margin))
    odds = math.exp(margin)
    return odds / (1.0 + odds)


@attrs.frozen
class Reason:
    """One feature's part in a score: what it is and the points it adds."""

    feature: str
    points: float

    def as_dict(self) -> dict[str, Any]:
        """For ``--json``."""
        return {"feature": self.feature, "points": round(self.points, 3)}


class ModelError(Exception):
    """A model file that cannot be used."""


class Model:
    """A trained classifier.

    :param weights: one weight per hashed feature.
    :param bias: the intercept.
    :param scale: Platt scale from margin to points (log2-odds).
    :param offset: Platt offset from margin to points.
    :param info: how it was trained (counts, date), for people.
    """

    def __init__(
        self,
        weights: npt.NDArray[np.float32],
        bias: float = 0.0,
        scale: float = 1.0,
        offset: float = 0.0,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.weights = weights
        self.bits = int(len(weights)).bit_length() - 1
        self.bias = bias
        self.scale = scale
        self.offset = offset
        self.info = dict(info or {})

    @classmethod
    def empty(cls, bits: int = BITS) -> Model:
        """A model that knows nothing (every message scores 0 points)."""
        return cls(np.zeros(1 << bits, dtype=np.float32))

    # --- scoring ------------------------------------------------------------

    def margin(self, indices: Indices) -> float:
        """The raw linear score of a vector."""
        if not len(indices):
            return self.bias
        return float(self.weights[indices].sum()) / math.sqrt(len(indices)) + self.bias

    def points(self, features: Features) -> float:
        """Content points of a message: calibrated log2-odds of spam."""
        return self.to_points(self.margin(vectorize(features, self.bits)))

    def to_points(self, margin: float) -> float:
        """Points for a raw margin."""
        return self.scale * margin + self.offset

    def assess(self, features: Features, top: int = 10, explain_at: float | None = None) -> tuple[float, list[Reason]]:
        """Points of a message and, as :meth:`explain` gives them, the ``top`` reasons (features hashed once).

        :param explain_at: give reasons only when the points reach this (None: always).
        """
        tokens = hash_tokens(features.tokens, self.bits)
        indices = _vector(tokens, features, self.bits)
        points = self.to_points(self.margin(indices))
        if not top or (explain_at is not None and points < explain_at):
            return points, []
        return points, self._reasons(features, tokens, indices, top)

    def explain(self, features: Features, top: int = 10) -> list[Reason]:
        """The tokens that weigh most in this message's score, strongest first.

        Character n-grams are summed into one reason (``text n-grams``):
        single n-grams mean nothing to people.
        """
        tokens = hash_tokens(features.tokens, self.bits)
        return self._reasons(features, tokens, _vector(tokens, features, self.bits), top)

    def _reasons(self, features: Features, tokens: Indices, indices: Indices, top: int) -> list[Reason]:
        if not len(indices):
            return []
        norm = self.scale / math.sqrt(len(indices))
        # Only the first token with a given index counts: the vector is binary.
        _, first = np.unique(tokens, return_index=True)
        first.sort()
        points = self.weights[tokens[first]].astype(np.float64) * norm
        text_points = float(self.weights[indices].sum()) * norm - float(points.sum())
        # Strongest first, equal ones in token order, the n-grams after the tokens.
        strength = np.append(points, text_points)
        strongest = np.argsort(-np.abs(strength), kind="stable")[:top].tolist()
        names = [features.tokens[p] for p in first.tolist()] + ["text n-grams"]
        values = strength.tolist()
        return [Reason(names[i], values[i]) for i in strongest]

    # --- files --------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the model atomically (a reader sees the old file or the new one)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "bias": self.bias,
            "scale": self.scale,
            "offset": self.offset,
            "info": self.info,
        }
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer,
            weights=self.weights.astype(np.float16),
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        )
        descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(buffer.getvalue())
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o644)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Model:
        """Read a model file.

        :raises ModelError: when the file is missing, damaged or of another format.
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                if meta.get("format") != FORMAT:
                    raise ModelError(f"{path}: model format {meta.get('format')!r}, expected {FORMAT}")
                weights = data["weights"].astype(np.float32)
        except FileNotFoundError:
            raise ModelError(f"{path}: no such model file") from None
        except (OSError, ValueError, KeyError, zlib.error) as error:
            raise ModelError(f"{path}: not a policyd model ({error})") from None
        if len(weights) & (len(weights) - 1) or len(weights) < 2:
            raise ModelError(f"{path}: not a policyd model (bad weight count)")
        return cls(weights, float(meta["bias"]), float(meta["scale"]), float(meta["offset"]), meta.get("info"))


# --- training ---------------------------------------------------------------------


def _sgd(
    vectors: Sequence[Stored],
    labels: Sequence[int],
    bits: int,
    passes: int,
    rate: float,
    seed: int,
) -> tuple[npt.NDArray[np.float32], float]:
    """Logistic regression by SGD; returns weights and bias."""
    weights = np.zeros(1 << bits, dtype=np.float32)
    bias = 0.0
    order = list(range(len(vectors)))
    shuffle = random.Random(seed).shuffle
    norms = [1.0 / math.sqrt(len(v)) if len(v) else 0.0 for v in vectors]
    for epoch in range(passes):
        shuffle(order)
        step = rate / (1.0 + epoch)
        for i in order:
            indices = vectors[i]
            norm = norms[i]
            margin = float(weights[indices].sum()) * norm + bias
            error = labels[i] - _sigmoid(margin)
            if abs(error) < 1e-4:
                continue
            weights[indices] += np.float32(step * error * norm)
            bias += 0.1 * step * error
    return weights, bias


def _platt(margins: Sequence[float], labels: Sequence[int]) -> tuple[float, float]:
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


def train(
    examples: Iterable[tuple[Features, bool]],
    *,
    bits: int = BITS,
    passes: int = PASSES,
    rate: float = RATE,
    calibration: float = 0.1,
    seed: int = 1,
    progress: Callable[[int], None] | None = None,
) -> Model:
    """Train a model on ``(features, is_spam)`` pairs.

    A share ``calibration`` of the mail (chosen at random, at least one of
    each class) is held out to fit the points scale on mail the model did
    not see; then the model is trained again on everything.

    :raises ValueError: without at least one ham and one spam.
    """
    started = time.monotonic()
    vectors: list[Stored] = []
    labels: list[int] = []
    for features, spam in examples:
        vectors.append(vectorize(features, bits))
        labels.append(1 if spam else 0)
        if progress is not None and len(labels) % 1000 == 0:
            progress(len(labels))
    spam_count = sum(labels)
    if not spam_count or spam_count == len(labels):
        raise ValueError(f"training needs ham and spam (got {len(labels) - spam_count} ham, {spam_count} spam)")
    scale, offset = 1.0, 0.0
    picker = random.Random(seed)
    held = {i for i in range(len(labels)) if picker.random() < calibration}
    held_labels = [labels[i] for i in sorted(held)]
    if 0 < sum(held_labels) < len(held_labels):
        kept = [i for i in range(len(labels)) if i not in held]
        weights, bias = _sgd([vectors[i] for i in kept], [labels[i] for i in kept], bits, passes, rate, seed)
        trial = Model(weights, bias)
        scale, offset = _platt([trial.margin(vectors[i]) for i in sorted(held)], held_labels)
        # Natural log-odds to log2-odds ("bits of evidence").
        scale, offset = scale / math.log(2), offset / math.log(2)
    weights, bias = _sgd(vectors, labels, bits, passes, rate, seed)
    info = {
        "ham": len(labels) - spam_count,
        "spam": spam_count,
        "trained_at": int(time.time()),
        "seconds": round(time.monotonic() - started, 1),
        "passes": passes,
        "bits": bits,
    }
    return Model(weights, bias, scale, offset, info)
