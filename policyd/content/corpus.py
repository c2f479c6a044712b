"""Labelled mail for ``policyd train`` and ``policyd learn``: every message of the PATHs given, in file-name order.

Each PATH is a directory of message files, a Maildir, an mbox, one message
file, or ``-`` (one message on standard input, as a Dovecot IMAPSieve or
Sieve ``pipe`` gives it).  The messages of all the PATHs, ham and spam
alike, make one sequence ordered by file name (the name without its
folder, then the whole path), so a caller that numbers its files in time
order across both folders gets the mail in time order; the messages of an
mbox keep their order, under the mbox's name.  The learner weighs the
latest mail most (:mod:`policyd.content.classifier`), so this order matters.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import attrs

from policyd.content import features as content
from policyd.content.features import Features

#: The PATH that means standard input.
STDIN = "-"


class MailError(Exception):
    """A PATH that does not exist, or a second ``-``."""


@attrs.frozen
class LabelledMessage:
    """One message to learn, before it is read.

    :ivar order: where it goes in the sequence (file name, then whole path, then number in its mbox).
    :ivar where: how errors and logs name it.
    :ivar spam: its label.
    :ivar read: gives its bytes (without an mbox ``From`` line).
    """

    order: tuple[str, str, int]
    where: str
    spam: bool
    read: Callable[[], bytes] = attrs.field(eq=False)


def _file_reader(path: Path) -> Callable[[], bytes]:
    return lambda: content.strip_from_line(path.read_bytes())


def _messages_of(given: str, spam: bool, stdin: BinaryIO | None) -> Iterator[LabelledMessage]:
    if given == STDIN:
        data = content.strip_from_line((stdin or sys.stdin.buffer).read())
        yield LabelledMessage(("", STDIN, 0), STDIN, spam, lambda: data)
        return
    path = Path(given)
    if path.is_dir():
        for file in content.message_files(path):
            yield LabelledMessage((file.name, str(file), 0), str(file), spam, _file_reader(file))
        return
    with open(path, "rb") as stream:
        start = stream.read(5)
    if start != b"From ":
        yield LabelledMessage((path.name, str(path), 0), str(path), spam, _file_reader(path))
        return
    for number, raw in enumerate(content.mbox_messages(path)):
        yield LabelledMessage((path.name, str(path), number), f"{path}#{number + 1}", spam,
                              lambda raw=raw: raw)  # type: ignore[misc]


def labelled_mail(
    ham: Sequence[str], spam: Sequence[str], stdin: BinaryIO | None = None
) -> list[LabelledMessage]:
    """Every message of the ham and spam PATHs, in one sequence ordered by file name.

    Files are listed here and read later, one at a time (:attr:`LabelledMessage.read`);
    an mbox and standard input are read now.

    :param stdin: where ``-`` reads from (default: this process's standard input).
    :raises MailError: when a PATH does not exist or ``-`` is given twice.
    :raises OSError: when a directory or mbox cannot be read.
    """
    named = [(p, False, "--ham") for p in ham] + [(p, True, "--spam") for p in spam]
    if sum(1 for p, _, _ in named if p == STDIN) > 1:
        raise MailError("standard input (-) holds one message: give - once")
    for given, _, option in named:
        if given != STDIN and not os.path.exists(given):
            raise MailError(f"{option} {given}: no such file or directory")
    found = [message for given, is_spam, _ in named for message in _messages_of(given, is_spam, stdin)]
    found.sort(key=lambda m: m.order)
    return found


def features_of(
    messages: Sequence[LabelledMessage],
    max_bytes: int,
    unreadable: list[str],
    wanted: Callable[[bytes, bool], bool] | None = None,
) -> Iterator[tuple[Features, bool]]:
    """``(features, is_spam)`` of each message in turn, read one at a time.

    :param max_bytes: body bytes kept per message (``content.max_body``).
    :param unreadable: receives a line for each message that cannot be read (it is skipped).
    :param wanted: ``wanted(raw, is_spam)`` says whether to learn a message read (None: every one).
    """
    for message in messages:
        try:
            raw = message.read()
        except OSError as error:
            unreadable.append(f"{message.where}: {error.strerror or error}")
            continue
        if wanted is None or wanted(raw, message.spam):
            yield content.extract(raw, max_bytes), message.spam
