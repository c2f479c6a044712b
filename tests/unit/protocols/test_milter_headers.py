"""The header block is judged whole (SPEC 6, last bullet), driven in memory by a fake MTA.

Whatever the number and size of the headers: every Subject of a tagged
message carries the tag and no incoming ``X-Spam-*`` copy survives, or the
message is refused at end of DATA; a held copy keeps every header.  The
outcome is checked on the headers as Postfix's cleanup would leave them
(:func:`as_postfix_applies`), not only on the replies.
"""

from __future__ import annotations

import email
import email.policy
import random

import pytest

from policyd.content.spamfilter import (
    HEADERS_TOO_LARGE,
    MAX_HEADER_CHANGES,
    TOO_MANY_COPIES,
    apply_changes,
)
from policyd.protocols import milter
from policyd.protocols.milter import add_header, change_header
from policyd.protocols.milter_session import MilterProtocol
from policyd.testing import FakeMTA, MilterReply
from tests.unit.quarantine.test_held import HAMMY, SPAMMY, Site, added, changed, kinds

TAG = "*{spam}*"

#: Names of forged copies, in the case variants a sender may write.
FORGED = ["X-Spam-Flag", "x-spam-flag", "X-SPAM-STATUS", "x-Spam-Score", "X-Spam-status", "X-SPAM-FLAG"]

OURS = {"x-spam-flag", "x-spam-score", "x-spam-status"}


def filler(count: int, size: int = 1) -> list[tuple[str, str]]:
    """``count`` harmless headers with values of ``size`` bytes."""
    return [(f"X-Filler-{n}", "f" * size) for n in range(count)]


def as_postfix_applies(headers: list[tuple[str, str]], replies: list[MilterReply]) -> list[tuple[str, str]]:
    """The headers after the replies, the way Postfix's cleanup edits its queue file.

    A change names the i-th header of that name (compared without case,
    counting the headers as they are at that moment); an empty value deletes
    it; a change of a header that is not there appends it; an added header
    goes last.
    """
    result = list(headers)
    for reply in replies:
        if reply.command == b"h":
            name, value = reply.strings()
            result.append((name, value))
        elif reply.command == b"m":
            name, value = reply.strings()
            found = [p for p, (n, _) in enumerate(result) if n.lower() == name.lower()]
            if reply.index <= len(found):
                position = found[reply.index - 1]
                if value:
                    result[position] = (result[position][0], value)
                else:
                    del result[position]
            elif value:
                result.append((name, value))
    return result


def judged_whole(delivered: list[tuple[str, str]], sent: list[tuple[str, str]]) -> None:
    """Every Subject is tagged, only policyd's X-Spam-* are left, and every other header is there in order."""
    subjects = [v for n, v in delivered if n.lower() == "subject"]
    assert subjects and all(v.startswith(TAG) for v in subjects), subjects
    spam = [(n, v) for n, v in delivered if n.lower().startswith("x-spam-")]
    assert sorted(n.lower() for n, _ in spam) == sorted(OURS), spam
    assert dict(spam)["X-Spam-Flag"] == "YES"
    others = [(n, v) for n, v in sent if n.lower() != "subject" and not n.lower().startswith("x-spam-")]
    assert [(n, v) for n, v in delivered if n.lower() != "subject" and not n.lower().startswith("x-spam-")] == others


def test_a_thousand_headers_before_the_subject() -> None:
    """1,000 headers, then a forged X-Spam-Flag and the Subject: the Subject itself is tagged, the forgery removed."""
    headers = [*filler(1000), ("X-Spam-Flag", "NO"), ("Subject", "Buy now")]
    replies = Site("quarantine:\n  default: inbox\n").send(["bob@example.org"], headers)
    assert changed(replies, "Subject") == [(1, f"{TAG} Buy now")]
    assert changed(replies, "X-Spam-Flag") == [(1, "")]
    assert "Subject" not in added(replies) and kinds(replies)[-1] == b"a"
    judged_whole(as_postfix_applies(headers, replies), headers)


def test_every_subject_is_tagged() -> None:
    """Two (or three) Subject headers: each is tagged once; one already tagged is left alone."""
    headers = [("Subject", "first"), ("From", "x@example.net"), ("subject", f"{TAG} second"), ("SUBJECT", "third")]
    replies = Site().send(["bob@example.org"], headers)
    assert changed(replies, "Subject") == [(1, f"{TAG} first"), (3, f"{TAG} third")]
    delivered = as_postfix_applies(headers, replies)
    judged_whole(delivered, headers)
    assert [v for n, v in delivered if n.lower() == "subject"] == [f"{TAG} first", f"{TAG} second", f"{TAG} third"]


@pytest.mark.parametrize("spam", [True, False], ids=["spam", "ham"])
def test_forged_copies_in_any_case_and_place_are_all_removed(spam: bool) -> None:
    """Forged X-Spam-* copies in six case variants, spread through 3,000 headers, are every one removed."""
    headers = filler(3000)
    for n, name in enumerate(FORGED * 3):
        headers.insert(n * 150 + 7, (name, "NO, score=-100"))
    headers.insert(2500, ("Subject", "Buy now"))
    replies = Site().send(["bob@example.org"], headers, SPAMMY if spam else HAMMY)
    delivered = as_postfix_applies(headers, replies)
    if spam:
        judged_whole(delivered, headers)
    else:
        assert [n for n, _ in delivered if n.lower().startswith("x-spam-")] == []
        assert delivered == [(n, v) for n, v in headers if not n.lower().startswith("x-spam-")]


def test_a_header_block_over_512_kib_is_judged_whole() -> None:
    """700 KiB of headers (700 of 1 KiB), two Subjects and forgeries at the end: all found and changed."""
    headers = [*filler(700, 1024), ("x-spam-status", "No"), ("Subject", "one"), ("Subject", "two"),
               ("X-Spam-Flag", "NO")]
    replies = Site().send(["bob@example.org"], headers)
    judged_whole(as_postfix_applies(headers, replies), headers)


@pytest.mark.parametrize(
    "headers",
    [
        [*filler(milter.MAX_HEADER_COUNT), ("X-Spam-Flag", "NO"), ("Subject", "Buy now")],
        [*filler(20, 60 * 1024), ("X-Spam-Flag", "NO"), ("Subject", "Buy now")],
    ],
    ids=["too many headers", "too many bytes"],
)
@pytest.mark.parametrize("body", [SPAMMY, HAMMY], ids=["spam", "ham"])
def test_a_header_block_beyond_the_bounds_is_refused(headers: list[tuple[str, str]], body: bytes) -> None:
    """A block the milter cannot keep whole is refused at end of DATA with a 5xx reply, spam or ham, nothing held."""
    site = Site("quarantine:\n  default: quarantine\n")
    replies = site.send(["bob@example.org"], headers, body)
    assert [(r.command, r.strings()) for r in replies] == [(b"y", [HEADERS_TOO_LARGE])]
    assert HEADERS_TOO_LARGE.startswith("552 5.6.0 ")
    assert site.held() == []


def test_a_header_longer_than_a_packet_is_refused() -> None:
    """One header beyond what a packet may hold (a raised header_size_limit) means the block was not kept: refused."""
    site = Site()
    mta = site.mta()
    mta.mail("spammer@example.net")
    mta.rcpt("bob@example.org")
    mta.header("X-Spam-Flag", "NO")
    mta.send_raw(FakeMTA.packet(b"L", b"X-Huge\0" + b"h" * (milter.MAX_PACKET + 1) + b"\0"))
    mta.header("Subject", "Buy now")
    mta.body(SPAMMY)
    assert [(r.command, r.strings()) for r in mta.end()] == [(b"y", [HEADERS_TOO_LARGE])]
    assert not mta.closed


def test_more_changes_than_the_bound_are_refused_not_half_made() -> None:
    """Spam needing more than MAX_HEADER_CHANGES changes is refused; ham with the same Subjects needs none and passes."""
    headers = [("Subject", f"copy {n}") for n in range(MAX_HEADER_CHANGES + 1)]
    site = Site()
    replies = site.send(["bob@example.org"], headers)
    assert [(r.command, r.strings()) for r in replies] == [(b"y", [TOO_MANY_COPIES])]
    assert TOO_MANY_COPIES.startswith("554 5.6.0 ")
    assert kinds(site.send(["bob@example.org"], headers, body=HAMMY)) == [b"a"]
    forged = [("X-Spam-Flag", "NO")] * (MAX_HEADER_CHANGES + 1)
    assert [r.command for r in site.send(["bob@example.org"], forged, body=HAMMY)] == [b"y"]
    at_bound = [("Subject", "s"), *[("X-Spam-Flag", "NO")] * (MAX_HEADER_CHANGES - 1)]
    replies = site.send(["bob@example.org"], at_bound)
    judged_whole(as_postfix_applies(at_bound, replies), at_bound)


def test_the_held_copy_keeps_every_header() -> None:
    """A held copy has all 1,000 headers in order, every Subject tagged and only policyd's X-Spam-*."""
    site = Site("quarantine:\n  default: quarantine\n")
    headers = [("Subject", "first"), *filler(1000), ("x-spam-flag", "NO"), ("Subject", "second")]
    replies = site.send(["bob@example.org"], headers)
    assert kinds(replies) == [b"d"]
    ((_, message),) = site.held()
    parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    judged_whole(list(parsed.items()), headers)
    assert [n for n, _ in parsed.items() if n.startswith("X-Filler-")] == [f"X-Filler-{n}" for n in range(1000)]


def test_recipients_beyond_the_kept_ones_get_the_tagged_message() -> None:
    """When not every recipient was kept, holding all the kept ones is no reason to discard the message."""
    site = Site("quarantine:\n  default: quarantine\n")
    mta = FakeMTA(MilterProtocol(site.filter, site.clock))
    mta.negotiate()
    mta.connect()
    recipients = [f"r{n}@example.org" for n in range(milter.MAX_RECIPIENTS + 1)]
    replies = mta.message("spammer@example.net", recipients, [("Subject", "Buy now")], SPAMMY)
    assert b"d" not in kinds(replies) and kinds(replies)[-1] == b"a"
    assert kinds(replies).count(b"-") == milter.MAX_RECIPIENTS
    assert changed(replies, "Subject") == [(1, f"{TAG} Buy now")]


def test_the_held_copy_is_edited_as_postfix_edits_the_delivered_one() -> None:
    """apply_changes gives what Postfix delivers, for random changes, deletions and additions in any case."""
    rng = random.Random(15)
    names = ["Subject", "subject", "X-Spam-Flag", "x-spam-flag", "Received", "X-Other"]
    for _ in range(200):
        headers = [(rng.choice(names), f"v{n}") for n in range(rng.randrange(0, 40))]
        changes = []
        for _ in range(rng.randrange(1, 15)):
            name, index = rng.choice(names), rng.randrange(0, 12)
            value = rng.choice(["", "", "new"])
            changes.append(add_header(name, "added") if rng.random() < 0.2 else change_header(name, value, index))
        replies = [MilterReply(packet[4:5], packet[5:]) for packet in (c.encode() for c in changes)]
        # Postfix reads a change of header 0 as one of header 1.
        expected = as_postfix_applies(
            headers, [MilterReply(r.command, (1).to_bytes(4, "big") + r.data[4:]) if r.command == b"m" and r.index == 0
                      else r for r in replies]
        )
        assert apply_changes(headers, changes) == expected, (headers, changes)


def test_x_spam_status_names_what_weighed_most_in_the_messages_own_words() -> None:
    """X-Spam-Status of tagged mail names up to five reasons for spam, each text found in the message, on one
    ASCII line."""
    headers = [("Subject", "Buy now"), ("From", "promo@example.biz")]
    replies = Site("quarantine:\n  default: inbox\n").send(["bob@example.org"], headers)
    status = added(replies)["X-Spam-Status"]
    assert status.startswith("Yes, score=") and " reasons=+" in status, status
    shown = status.split(" reasons=", 1)[1].split("; ")
    assert 1 <= len(shown) <= 5
    for reason in shown:
        points, text = reason.split(" ", 1)
        assert float(points) > 0 and text
    assert status.isascii() and status.isprintable()


def test_status_reasons_are_one_ascii_line_without_separators() -> None:
    """A reason with a line end, a ';', non-ASCII letters or a control character cannot break the header."""
    from policyd.content.classifier import Reason
    from policyd.content.scorer import Score
    from policyd.content.spamfilter import status_reasons

    score = Score(9.0, 9.0, 0.0, "", reasons=(Reason('phrase "gratuit; offre\r\nX-Evil: 1"', 2.0),
                                      Reason("caf\u00e9\x07", 1.0), Reason("ham-ish", -3.0)))
    text = status_reasons(score)
    assert text == ' reasons=+2.0 phrase "gratuit, offre X-Evil: 1"; +1.0 caf\\xe9?'
