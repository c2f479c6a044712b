"""``python -m tests.eval.speed [--cache DIR]``: scoring speed as one process over thousands of files.

The contract measured is ``policyd score -c FILE --json PATH...``: one
process, start-up included, one JSON line per message.  The baseline is
measured the same way: a process that loads the byte 4-gram weights
(:mod:`tests.eval.baseline`, trained on the same mail beforehand) and
prints one JSON line per file (:func:`baseline_main`).  Both read the same
files, written once into a temporary folder; the figure is messages per
second of wall-clock time, best of :data:`ROUNDS`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tests.eval import corpus
from tests.eval.baseline import ByteFourGrams

#: Runs of each command; the best is kept (the machine may be busy).
ROUNDS = 3


def baseline_main(weights: str, paths: Sequence[str]) -> None:
    """The baseline as a ``score --json`` process: one JSON line per file."""
    learner = ByteFourGrams()
    learner.weights = np.load(weights)
    write = sys.stdout.write
    for path in paths:
        with open(path, "rb") as file:
            raw = file.read()
        margin = learner.score(raw)
        write(json.dumps({"path": path, "score": margin, "spam": margin >= 0.0}) + "\n")


def _timed(command: Sequence[str], count: int) -> float:
    """Messages per second of the best of :data:`ROUNDS` runs of ``command``."""
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.monotonic()
        done = subprocess.run(command, check=True, stdout=subprocess.PIPE)
        best = min(best, time.monotonic() - started)
        lines = done.stdout.count(b"\n")
        if lines != count:
            raise SystemExit(f"{command[0]}: {lines} lines for {count} messages")
    return count / best


def measure(messages: Sequence[corpus.Message], work: Path, model: Path | None = None) -> tuple[float, float]:
    """(policyd, baseline) messages per second scoring ``messages`` as files."""
    folder = work / "mail"
    folder.mkdir()
    files = []
    for number, message in enumerate(messages):
        path = folder / f"{number:06d}.eml"
        path.write_bytes(message.raw)
        files.append(str(path))
    learner = ByteFourGrams()
    for message in messages:
        learner.learn(message.raw, message.spam)
    weights = work / "baseline.npy"
    np.save(weights, learner.weights)
    config = work / "policyd.yaml"
    extra = f"content:\n  model: '{model}'\n" if model is not None else ""
    config.write_text(
        f"listen:\n  policy: 'tcp:10040:interface=127.0.0.1'\nstore:\n  url: 'sqlite:///{work}/state.db'\n"
        f"local_domains: [example.org]\noutbound:\n  limit: 5000\n{extra}",
        encoding="utf-8",
    )
    policyd = str(Path(sys.executable).with_name("policyd"))
    ours = _timed([policyd, "score", "-c", str(config), "--json", str(folder)], len(files))
    listing = work / "files"
    listing.write_text("\n".join(files), encoding="utf-8")
    theirs = _timed([sys.executable, "-m", "tests.eval.speed", "--baseline", str(weights), str(listing)], len(files))
    return ours, theirs


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print both speeds."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("POLICYD_EVAL_CACHE", "var/eval-cache")))
    parser.add_argument("--baseline", metavar="WEIGHTS", help=argparse.SUPPRESS)
    parser.add_argument("listing", nargs="?", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.baseline:
        baseline_main(options.baseline, Path(options.listing).read_text(encoding="utf-8").split("\n"))
        return 0
    messages = [m for stream in corpus.streams(options.cache) for m in stream.messages]
    with tempfile.TemporaryDirectory() as work:
        ours, theirs = measure(messages, Path(work))
    print(f"score --json over {len(messages)} files, one process, start-up included (msg/s, wall clock):")
    print(f"  policyd score --json   {ours:8.0f}")
    print(f"  byte 4-gram baseline   {theirs:8.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
