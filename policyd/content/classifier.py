"""The statistical spam classifier: logistic regression over hashed features.

The method is the one that won the TREC spam-filter evaluations (Goodman and
Yih 2006; Sculley and Wachman 2007): a linear model over a very large,
binary feature space, trained online.

- **Features.**  Byte 4-grams of the raw header block (the TREC lesson:
  the headers' bytes carry much of the signal), words of the Subject and
  body text with their unaccented forms, byte 4-grams of the start of the
  text, and the named tokens of
  :class:`~policyd.content.features.Features` (header names, sender and URL
  domains, structure facts), each kind keyed apart, are hashed into one of
  ``2**bits`` weights (the "hashing trick": no vocabulary to keep, new
  words need no retraining).  Words and n-grams are found and hashed by
  numpy over the whole text at once, not word by word in Python.  A
  feature counts once per message and the vector is scaled to unit
  length, so long mail does not weigh more.
- **Training.**  Online gradient descent on the logistic loss, a few
  passes over the mail in the order it came, so that the latest mail
  weighs most.  A message already classified with a wide margin moves the
  weights by almost nothing, so in effect the model learns from its errors
  and near-misses.
- **Points.**  The model's margin is turned into *points*: the base-2
  logarithm of the odds that the message is spam, calibrated by Platt
  scaling on a part of the training mail held out for it.  0 points is
  even odds, +5 is 32 to 1 for spam, -5 is 32 to 1 for ham.  Points add to the network points of the reputation
  header and are compared with ``content.tag_at``.

Scoring is a handful of numpy operations on the whole vector (no loop over
features in Python): a fraction of a millisecond for typical mail.
A model file is an uncompressed ``.npz`` (weights in float16, 8 MB): read
without inflating it, which took a sixth of the start-up of ``policyd score``.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import numpy.typing as npt

from policyd.content.features import MAX_WORD, MIN_WORD, WORD_CHARS, Features, unaccented

#: Format of the model file; a newer format is refused with a clear message.
#: 2: header byte 4-grams and vectorised words; 3: byte budgets (the first 3,000 bytes of
#: headers, 6,000 characters of text) and every kind keyed and mixed alike; 4: smaller budgets
#: (1,000 bytes of headers, 3,000 characters of text, 1,500 bytes of text 4-grams) and no word
#: pairs.  Models of an older format are refused (the shipped model is used until policyd
#: train makes a new one).
FORMAT = 4

#: Hashed feature space: 2**22 weights.  Collisions cost little at this size
#: for the few million distinct features of tens of thousands of messages.
BITS = 22

#: Character n-gram length: 4 bytes is the best single length in the TREC
#: results (3 is too common, 5 too rare).
NGRAM = 4

#: Bytes of plain text (Subject, then body) whose 4-grams are features: past
#: the start, they cost scoring time and added nothing in the evaluation.
TEXT_BYTES = 1500

#: Passes over the training mail, in its order, and the learning rate.
PASSES = 8
RATE = 8.0

#: Feature indices of a message (at most 2**32 weights).
Indices = npt.NDArray[np.uint32]
#: A message's features kept for training (the same type: 4 bytes an index).
Stored = Indices

_GOLDEN32 = np.uint32(0x9E3779B1)

# Each kind of feature is hashed with its own key: the same bytes in the
# headers and in the text, or a word and a 4-gram, are different features.
_HEAD_KEY = np.uint32(0x68656164)
_TEXT_KEY = np.uint32(0x74657874)
_WORD_KEY = np.uint32(0x776F7264)

# Bytes that make words in plain text: ASCII letters and digits, and every
# byte of a non-ASCII character (plain text has no non-ASCII character
# outside words; see features.plain_text).
_WORD_BYTES = np.zeros(256, dtype=bool)
_WORD_BYTES[[*range(ord("a"), ord("z") + 1), *range(ord("0"), ord("9") + 1), *range(0x80, 0x100)]] = True
# What a byte adds to the hash of the word it is in: nothing outside words.
_TERMS = (np.arange(1, 257, dtype=np.uint32) * _WORD_BYTES).astype(np.uint32)
# Text longer than this (in UTF-8) is cut: WORD_CHARS characters of 4 bytes at most.
_MAX_TEXT_BYTES = 4 * WORD_CHARS
#: Most text bytes hashed in one buffer (:func:`batch_indices` hashes several messages' text at once).
_BATCH_BYTES = 1 << 18
# Polynomial word hashing modulo 2**32: powers of an odd multiplier and their inverses.
_POLY = 0x01000193
_POWERS = np.empty(_BATCH_BYTES, dtype=np.uint32)
_INVERSES = np.empty(_BATCH_BYTES, dtype=np.uint32)
_POWERS[0] = _INVERSES[0] = 1
_POWERS[1:] = np.uint32(_POLY)
_INVERSES[1:] = np.uint32(pow(_POLY, -1, 1 << 32))
np.multiply.accumulate(_POWERS, out=_POWERS)
np.multiply.accumulate(_INVERSES, out=_INVERSES)


def _mix(values: npt.NDArray[np.uint32], key: np.uint32, bits: int) -> Indices:
    """Indices of 32-bit values: keyed, times the golden ratio, top bits (Fibonacci hashing)."""
    values ^= key
    values *= _GOLDEN32
    values >>= np.uint32(32 - bits)
    return values


@attrs.frozen
class Words:
    """The words of plain text (as :func:`~policyd.content.features.text_words` finds them), hashed.

    :ivar data: the text in UTF-8, with one space before and after.
    :ivar starts: where each word starts in ``data``.
    :ivar ends: where each word ends in ``data``.
    :ivar hashes: a 32-bit hash of each word (not yet an index).
    """

    data: bytes
    starts: npt.NDArray[np.intp]
    ends: npt.NDArray[np.intp]
    hashes: npt.NDArray[np.uint32]

    @classmethod
    def of(cls, text: str | bytes) -> Words:
        """The words of ``text`` (or of its UTF-8), found and hashed with a few numpy operations on the whole text.

        The spaces around the text make every word start and end inside it:
        no special case for a word at either end.
        """
        encoded = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
        data = b" " + encoded[:_MAX_TEXT_BYTES] + b" "
        return cls(data, *_word_hashes(data))

    def word(self, number: int) -> str:
        """Word ``number`` as text."""
        return self.data[self.starts[number] : self.ends[number]].decode("utf-8", "surrogatepass")

    def indices(self, bits: int) -> Indices:
        """Feature indices of the words."""
        return _mix(self.hashes.copy(), _WORD_KEY, bits)


def _bare_words(data: bytes, starts: npt.NDArray[np.intp], ends: npt.NDArray[np.intp]) -> Words | None:
    """The words among ``data[starts:ends]`` that have accents, without them (None: no such word).

    Only words with non-ASCII bytes are folded: the others would give
    indices the words give already (the same key), which count once.
    """
    if not len(starts):
        return None
    octets = np.frombuffer(data, dtype=np.uint8)
    # The largest byte of each word: reduced from each start to its end (the next segment is a gap).
    bounds = np.empty(2 * len(starts), dtype=np.intp)
    bounds[0::2] = starts
    bounds[1::2] = ends
    peaks = np.maximum.reduceat(octets, bounds)[0::2]
    chosen = np.flatnonzero(peaks >= 0x80).tolist()
    if not chosen:
        return None
    accented = b" ".join([data[starts[n] : ends[n]] for n in chosen]).decode("utf-8", "surrogatepass")
    folded = unaccented(accented)
    return None if folded == accented else Words.of(folded)


@attrs.frozen
class Vector:
    """A message's features as indices, section after section (kept to say which weighed most).

    :ivar indices: every index, repeats included, the kinds in :data:`SECTIONS` order.
    :ivar sizes: how many indices of each kind.
    :ivar words: the words of the text.
    :ivar bare: the words of the text without accents (None: no accented word).
    """

    indices: Indices
    sizes: tuple[int, ...]
    words: Words
    bare: Words | None

    def all(self) -> Indices:
        """Every index, repeats included, section after section."""
        return self.indices


#: The kinds of features, in the order of :attr:`Vector.indices` (an index
#: that two kinds share is told as the first).
SECTIONS = ("token", "word", "bare word", "header", "text")
_HEADER = SECTIONS.index("header")
_TEXT = SECTIONS.index("text")
_KEYS = np.array([0, _WORD_KEY, _WORD_KEY, _HEAD_KEY, _TEXT_KEY], dtype=np.uint32)


def message_vector(features: Features, bits: int = BITS) -> Vector:
    """The features of a message as indices, section after section.

    Every kind's 32-bit values go into one array, are keyed by kind and
    mixed into indices there (:func:`_mix`) at once: the cost of a numpy
    call, not the work, is most of the time on common mail.
    """
    encoded = features.text.encode("utf-8", "surrogatepass")
    words = Words.of(encoded)
    bare = None if features.text.isascii() else _bare_words(words.data, words.starts, words.ends)
    head = features.head
    text = encoded[:TEXT_BYTES]
    tokens = features.tokens
    try:
        encoded_tokens = list(map(str.encode, tokens))
    except UnicodeEncodeError:
        # Header bytes that were not UTF-8 come as surrogate escapes.
        encoded_tokens = [t.encode("utf-8", "surrogatepass") for t in tokens]
    heads = max(len(head) - NGRAM + 1, 0)
    texts = max(len(text) - NGRAM + 1, 0)
    sizes = (len(tokens), len(words.hashes), 0 if bare is None else len(bare.hashes), heads, texts)
    values = np.empty(sum(sizes), dtype=np.uint32)
    end = sizes[0]
    values[:end] = np.fromiter(map(zlib.crc32, encoded_tokens), dtype=np.uint32, count=end)
    values[end : end + sizes[1]] = words.hashes
    end += sizes[1]
    if bare is not None:
        values[end : end + sizes[2]] = bare.hashes
        end += sizes[2]
    # The 4-grams of the header block and of the text's start, read as 32-bit integers.
    if heads:
        values[end : end + heads] = np.ndarray((heads,), dtype="<u4", buffer=head, strides=(1,))
    if texts:
        values[end + heads :] = np.ndarray((texts,), dtype="<u4", buffer=text, strides=(1,))
    values ^= np.repeat(_KEYS, sizes)
    values *= _GOLDEN32
    values >>= np.uint32(32 - bits)
    return Vector(values, sizes, words, bare)


def _word_hashes(data: bytes) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.uint32]]:
    """Where the words of ``data`` (text between spaces) start and end, and their hashes (:meth:`Words.of`).

    ``data`` is at most :data:`_BATCH_BYTES` long.
    """
    octets = np.frombuffer(data, dtype=np.uint8)
    # (byte + 1) * P**i for the bytes of words, 0 between them; a word is a run of terms that are not 0.
    terms = _TERMS.take(octets)
    inside = terms != 0
    edges = np.flatnonzero(inside[1:] != inside[:-1])
    edges += 1
    starts, ends = edges[0::2], edges[1::2]
    terms *= _POWERS[: len(octets)]
    # The sum over a word (a difference of running sums), times P**-start: the same for the same word anywhere.
    sums = np.cumsum(terms, dtype=np.uint32)
    hashes = sums.take(ends - 1)
    hashes -= sums.take(starts - 1)
    hashes *= _INVERSES.take(starts)
    lengths = ends - starts
    kept = lengths >= MIN_WORD
    kept &= lengths <= MAX_WORD
    return starts[kept], ends[kept], hashes[kept]


def _batch_grams(pieces: list[bytes], key: np.uint32, bits: int) -> tuple[Indices, list[list[int]]]:
    """The 4-gram indices of pieces of bytes put end to end, and where each piece's own windows are."""
    joined = b"".join(pieces)
    sizes = np.fromiter(map(len, pieces), dtype=np.intp, count=len(pieces))
    ends = np.cumsum(sizes) - (NGRAM - 1)
    starts = ends - np.maximum(sizes - (NGRAM - 1), 0)
    if len(joined) < NGRAM:
        return np.zeros(0, dtype=np.uint32), [[0, 0]] * len(pieces)
    grams = np.ndarray((len(joined) - NGRAM + 1,), dtype="<u4", buffer=joined, strides=(1,)) ^ key
    grams *= _GOLDEN32
    grams >>= np.uint32(32 - bits)
    return grams, np.stack((starts, np.maximum(starts, ends)), axis=1).tolist()


def batch_indices(batch: Sequence[Features], bits: int = BITS) -> list[Indices]:
    """The indices of each message, as :func:`message_vector` gives them (in another order).

    The same features, found and hashed by numpy calls on all the messages
    at once: on common mail the cost of a numpy call, not the work done,
    is most of the time, and a batch pays it once.
    """
    count = len(batch)
    if not count:
        return []
    encoded = [f.text.encode("utf-8", "surrogatepass")[:_MAX_TEXT_BYTES] for f in batch]
    # Every text between spaces, in one buffer, so a word never runs from one message into the next.
    data = b" " + b"  ".join(encoded) + b" "
    if len(data) > _BATCH_BYTES:
        half = count // 2
        if not half:
            return [message_vector(batch[0], bits).indices]
        return batch_indices(batch[:half], bits) + batch_indices(batch[half:], bits)
    lengths = np.fromiter(map(len, encoded), dtype=np.intp, count=count)
    text_ends = np.cumsum(lengths + 2) - 1

    # Words, and where each message's start (the texts' ends are sorted, so are their words).
    all_starts, all_ends, hashes = _word_hashes(data)
    word_offsets = np.searchsorted(all_starts, np.concatenate(([0], text_ends)))
    words = _mix(hashes, _WORD_KEY, bits)

    # The 4-grams of the header blocks, and of the texts' starts, each from one buffer: a message's
    # windows are those that start and end in its piece (its last three bytes start none).
    heads, head_offsets = _batch_grams([f.head for f in batch], _HEAD_KEY, bits)
    texts, text_offsets = _batch_grams([text[:TEXT_BYTES] for text in encoded], _TEXT_KEY, bits)

    # Tokens (CRC-32 of their UTF-8), keyed 0 like message_vector's.
    flat = [token for f in batch for token in f.tokens]
    try:
        encoded_tokens = list(map(str.encode, flat))
    except UnicodeEncodeError:
        encoded_tokens = [t.encode("utf-8", "surrogatepass") for t in flat]
    tokens = np.fromiter(map(zlib.crc32, encoded_tokens), dtype=np.uint32, count=len(flat))
    tokens = _mix(tokens, np.uint32(0), bits)
    token_offsets = list(itertools.accumulate((len(f.tokens) for f in batch), initial=0))

    found = []
    bounds = zip(token_offsets, token_offsets[1:], word_offsets.tolist(), word_offsets[1:].tolist(),
                 head_offsets, text_offsets, strict=False)
    for features, (t0, t1, w0, w1, (h0, h1), (x0, x1)) in zip(batch, bounds, strict=True):
        kinds = [tokens[t0:t1], words[w0:w1], heads[h0:h1], texts[x0:x1]]
        if not features.text.isascii():
            bare = _bare_words(data, all_starts[w0:w1], all_ends[w0:w1])
            if bare is not None:
                kinds.append(bare.indices(bits))
        found.append(np.concatenate(kinds))
    return found


def distinct(indices: Indices) -> Indices:
    """The sorted distinct values of ``indices`` (numpy's unique, without its overhead on small arrays)."""
    ordered = np.sort(indices)
    if len(ordered) < 2:
        return ordered
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def first_of_each(indices: Indices) -> tuple[Indices, npt.NDArray[np.intp]]:
    """The sorted distinct values of ``indices`` and where each first occurs.

    One sort of 64-bit keys (value, then position): twice as fast as a
    stable argsort.
    """
    keys = indices.astype(np.uint64)
    keys <<= np.uint64(32)
    keys |= np.arange(len(indices), dtype=np.uint64)
    keys.sort()
    values = (keys >> np.uint64(32)).astype(np.uint32)
    if len(values) < 2:
        return values, (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)
    keep = np.empty(len(values), dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep], (keys[keep] & np.uint64(0xFFFFFFFF)).astype(np.intp)


def vectorize(features: Features, bits: int = BITS) -> Indices:
    """The sorted, distinct feature indices of a message (its binary vector)."""
    return distinct(message_vector(features, bits).all())


@attrs.frozen
class Reason:
    """One feature's part in a score: what it is and the points it adds."""

    feature: str
    points: float

    def as_dict(self) -> dict[str, Any]:
        """For ``--json``."""
        return {"feature": self.feature, "points": round(self.points, 3)}


#: Words of text whose 4-grams add up to one reason (a phrase) in explanations.
PHRASE_WORDS = 3

_WORD_RUN = re.compile(rb"\S+")


def _phrases(text: bytes) -> list[tuple[int, int]]:
    """Where the phrases of ``text`` start and end: runs of :data:`PHRASE_WORDS` words (one span for no word)."""
    words = [match.span() for match in _WORD_RUN.finditer(text)]
    if not words:
        return [(0, len(text))]
    spans = []
    for first in range(0, len(words), PHRASE_WORDS):
        last = words[min(first + PHRASE_WORDS, len(words)) - 1]
        spans.append((0 if first == 0 else words[first][0], last[1]))
    return spans


class ModelError(Exception):
    """A model file that cannot be used."""


class OldModel(ModelError):
    """A model trained by an earlier policyd, whose features this one no longer computes."""


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
        weights: npt.NDArray[np.floating[Any]],
        bias: float = 0.0,
        scale: float = 1.0,
        offset: float = 0.0,
        info: dict[str, Any] | None = None,
    ) -> None:
        # What scoring reads: the weights as the file holds them (float16) until something needs
        # float32 ones (training, reasons); converting 4 million weights cost a third of the start-up
        # of policyd score.
        self._table: npt.NDArray[np.floating[Any]] = weights
        self._weights: npt.NDArray[np.float32] | None = weights if weights.dtype == np.float32 else None
        self.bits = int(len(weights)).bit_length() - 1
        self.bias = bias
        self.scale = scale
        self.offset = offset
        self.info = dict(info or {})

    @property
    def weights(self) -> npt.NDArray[np.float32]:
        """One weight per hashed feature, as float32 (converted once from the file's float16)."""
        if self._weights is None:
            self._weights = self._table.astype(np.float32)
            self._table = self._weights
        return self._weights

    def _gathered(self, indices: Indices) -> npt.NDArray[np.float32]:
        """The float32 weights of ``indices``, from whichever table the model holds."""
        found = self._table.take(indices)
        return found if found.dtype == np.float32 else found.astype(np.float32)

    @classmethod
    def empty(cls, bits: int = BITS) -> Model:
        """A model that knows nothing (every message scores 0 points)."""
        return cls(np.zeros(1 << bits, dtype=np.float32))

    # --- scoring ------------------------------------------------------------

    def margin(self, indices: Indices) -> float:
        """The raw linear score of a vector."""
        if not len(indices):
            return self.bias
        return float(self._gathered(indices).sum()) / math.sqrt(len(indices)) + self.bias

    def points(self, features: Features) -> float:
        """Content points of a message: calibrated log2-odds of spam."""
        return self.assess(features, 0)[0]

    def margin_of(self, indices: Indices) -> float:
        """:meth:`margin` of the distinct values of ``indices``, without making them.

        The weights of the sorted indices are summed but for repeats (a dot
        product with where each value is new): a boolean selection of the
        distinct ones would cost a quarter of the time of a score.
        """
        return self._sorted_margin(np.sort(indices))

    def _sorted_margin(self, ordered: Indices) -> float:
        """:meth:`margin_of` of indices already sorted."""
        if not len(ordered):
            return self.bias
        new = ordered[1:] != ordered[:-1]
        weights = self._table.take(ordered)
        if weights.dtype != np.float32:
            weights = weights.astype(np.float32)
        total = float(weights[0]) + float(np.dot(weights[1:], new))
        return total / math.sqrt(int(np.count_nonzero(new)) + 1) + self.bias

    def points_many(self, batch: Sequence[Features]) -> list[float]:
        """Content points of several messages (:meth:`points` of each; the features hashed together)."""
        points = []
        for indices in batch_indices(batch, self.bits):
            indices.sort()  # each message's own array: sorted where it is, not copied
            points.append(self.to_points(self._sorted_margin(indices)))
        return points

    def to_points(self, margin: float) -> float:
        """Points for a raw margin."""
        return self.scale * margin + self.offset

    def assess(self, features: Features, top: int = 10, explain_at: float | None = None) -> tuple[float, list[Reason]]:
        """Points of a message and, as :meth:`explain` gives them, the ``top`` reasons (features hashed once).

        :param explain_at: give reasons only when the points reach this (None: always).
        """
        vector = message_vector(features, self.bits)
        every = vector.all()
        points = self.to_points(self.margin_of(every))
        if not top or (explain_at is not None and points < explain_at):
            return points, []
        indices, first = first_of_each(every)
        return points, self._reasons(features, vector, self.weights[indices].astype(np.float64), first, top)

    def explain(self, features: Features, top: int = 10) -> list[Reason]:
        """What weighs most in this message's score, strongest first, in words a person can check.

        Tokens (``url:example.biz``, ``hdr:x-mailer``) and words of the text
        each count as themselves; the byte 4-grams of a header field
        add up to that field (``header X-Mailer: ...``), and those of the
        text to the phrase (:data:`PHRASE_WORDS` words) they start in
        (``phrase "cheap viagra online"``): single n-grams mean nothing to
        people.  An index that several features share counts once, for one
        of them; so all the reasons add up to the margin.
        """
        return self.assess(features, top)[1]

    def _reasons(
        self, features: Features, vector: Vector, weights: npt.NDArray[np.float64], first: npt.NDArray[np.intp],
        top: int,
    ) -> list[Reason]:
        count = len(first)
        if not count:
            return []
        sizes = list(vector.sizes)
        offsets = np.cumsum([0, *sizes[:-1]])
        kind = np.repeat(np.arange(len(sizes), dtype=np.int8), sizes)[first]
        # Every feature is its own reason, but header 4-grams add up by the
        # header field they start in, and text 4-grams by the phrase they start in.
        group = np.arange(count)
        head = np.flatnonzero(kind == _HEADER)
        octets = np.frombuffer(features.head, dtype=np.uint8)
        # A field starts at every line that does not start with a blank (folded lines go on a field).
        starts_field = np.zeros(len(octets), dtype=np.int32)
        starts_field[1:] = (octets[:-1] == 10) & (octets[1:] != 32) & (octets[1:] != 9)
        field_of = np.cumsum(starts_field)
        fields = int(field_of[-1]) + 1 if len(octets) else 0
        group[head] = count + field_of[first[head] - offsets[_HEADER]]
        text = features.text.encode("utf-8", "surrogatepass")[:TEXT_BYTES]
        phrases = _phrases(text)
        grams = np.flatnonzero(kind == _TEXT)
        if len(grams):
            starts = np.array([start for start, _ in phrases], dtype=np.intp)
            where = np.searchsorted(starts, first[grams] - offsets[_TEXT], side="right") - 1
            group[grams] = count + fields + np.maximum(where, 0)
        sums = np.bincount(group, weights=weights, minlength=count + fields + len(phrases)).astype(np.float64)
        strengths = sums * (self.scale / math.sqrt(count))
        magnitude = np.abs(strengths)
        if len(strengths) > top:
            chosen = np.argpartition(-magnitude, top - 1)[:top]
            strongest = chosen[np.argsort(-magnitude[chosen], kind="stable")]
        else:
            strongest = np.argsort(-magnitude, kind="stable")
        field_starts: list[int] | None = None
        reasons = []
        for number in strongest.tolist():
            value = float(strengths[number])
            if not value:
                continue
            if number < count:
                section = int(kind[number])
                name = self._name(features, vector, section, int(first[number] - offsets[section]))
            elif number < count + fields:
                if field_starts is None:
                    field_starts = [0, *np.flatnonzero(starts_field).tolist(), len(octets)]
                field = number - count
                shown = features.head[field_starts[field] : field_starts[field + 1]].decode("utf-8", "replace")
                name = "header " + " ".join(shown.split())[:70]
            else:
                start, end = phrases[number - count - fields]
                name = "phrase \"" + " ".join(text[start:end].decode("utf-8", "replace").split())[:70] + "\""
            reasons.append(Reason(name, value))
        return reasons

    @staticmethod
    def _name(features: Features, vector: Vector, kind: int, place: int) -> str:
        """The readable name of one token or word."""
        section = SECTIONS[kind]
        if section == "token":
            return features.tokens[place]
        if section == "word":
            return vector.words.word(place)
        assert vector.bare is not None
        return vector.bare.word(place)

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
        # Not compressed: inflating 8 MB of weights took longer than reading them.
        np.savez(
            buffer,
            weights=self._table.astype(np.float16, copy=False),
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        )
        descriptor, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(buffer.getvalue())
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o600)  # state files are private to the service
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
                    found = meta.get("format")
                    kind = OldModel if isinstance(found, int) and found < FORMAT else ModelError
                    raise kind(f"{path}: model format {found!r}, expected {FORMAT}")
                weights = data["weights"]
                if weights.dtype != np.float16:
                    weights = weights.astype(np.float32)
        except FileNotFoundError:
            raise ModelError(f"{path}: no such model file") from None
        except (OSError, ValueError, KeyError, zlib.error) as error:
            raise ModelError(f"{path}: not a policyd model ({error})") from None
        if len(weights) & (len(weights) - 1) or len(weights) < 2:
            raise ModelError(f"{path}: not a policyd model (bad weight count)")
        return cls(weights, float(meta["bias"]), float(meta["scale"]), float(meta["offset"]), meta.get("info"))


# --- training ---------------------------------------------------------------------


def train(examples: Iterable[tuple[Features, bool]], **options: Any) -> Model:
    """Train a model on ``(features, is_spam)`` pairs: :func:`policyd.content.training.train`."""
    from policyd.content import training

    return training.train(examples, **options)
