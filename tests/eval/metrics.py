"""The TREC spam track's figures: ROC area, spam caught at a ham false-positive rate."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve: the chance a spam scores above a ham (ties count one half)."""
    values = np.asarray(scores, dtype=np.float64)
    spam = np.asarray(labels, dtype=bool)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    # Average ranks over ties.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    average = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(average, ends - starts)
    positives = int(spam.sum())
    negatives = len(values) - positives
    return float((ranks[spam].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def caught_at(scores: Sequence[float], labels: Sequence[bool], fpr: float) -> float:
    """Share of spam scoring above the threshold that flags at most ``fpr`` of ham."""
    hams = sorted((s for s, y in zip(scores, labels, strict=True) if not y), reverse=True)
    allowed = int(math.floor(fpr * len(hams)))
    threshold = hams[allowed] if allowed < len(hams) else -math.inf
    spams = [s for s, y in zip(scores, labels, strict=True) if y]
    return sum(1 for s in spams if s > threshold) / len(spams)


def errors_at(scores: Sequence[float], labels: Sequence[bool], threshold: float) -> tuple[int, int]:
    """(ham flagged, spam missed) when ``score >= threshold`` is the verdict."""
    false_positives = sum(1 for s, y in zip(scores, labels, strict=True) if s >= threshold and not y)
    false_negatives = sum(1 for s, y in zip(scores, labels, strict=True) if s < threshold and y)
    return false_positives, false_negatives
