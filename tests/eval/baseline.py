"""The baseline to beat: online logistic regression over hashed byte 4-grams.

The simple learner of the TREC spam tracks (Goodman and Yih 2006; Cormack's
"logistic regression on byte 4-grams" baseline): the first 2,500 bytes of
the raw message, headers included, as a binary vector of hashed 4-grams;
one pass of online gradient descent on the logistic loss in the order the
mail came, learning rate 0.002.  Nothing about mail is known to it.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

#: Bytes of the raw message looked at.
PREFIX = 2500
#: Hashed feature space.
BITS = 22
#: Learning rate of the published recipe.
RATE = 0.002

_GOLDEN32 = np.uint32(0x9E3779B1)


class ByteFourGrams:
    """Online logistic regression over the hashed byte 4-grams of a message's start."""

    def __init__(self, bits: int = BITS, rate: float = RATE) -> None:
        self.bits = bits
        self.rate = rate
        self.weights = np.zeros(1 << bits, dtype=np.float32)

    def vector(self, raw: bytes) -> npt.NDArray[np.uint32]:
        """The distinct feature indices of a message."""
        data = raw[:PREFIX]
        if len(data) < 4:
            return np.zeros(0, dtype=np.uint32)
        grams = np.ndarray((len(data) - 3,), dtype="<u4", buffer=data, strides=(1,)) * _GOLDEN32
        return np.unique(grams >> np.uint32(32 - self.bits))

    def score(self, raw: bytes) -> float:
        """The margin (log-odds of spam; above 0 is spam)."""
        return float(self.weights[self.vector(raw)].sum())

    def learn(self, raw: bytes, spam: bool) -> None:
        """One step of gradient descent on one message."""
        indices = self.vector(raw)
        margin = float(self.weights[indices].sum())
        probability = 1.0 / (1.0 + math.exp(-margin)) if margin > -30 else 0.0
        self.weights[indices] += np.float32(self.rate * ((1.0 if spam else 0.0) - probability))
