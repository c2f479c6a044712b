"""The milter protocol, driven in memory by a fake MTA (policyd.testing.FakeMTA)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from policyd.protocols import milter
from policyd.protocols.milter import (
    MAX_PACKET,
    Verdict,
    add_header,
    change_header,
    delete_recipient,
    insert_header,
)
from policyd.protocols.milter_message import MilterMessage
from policyd.protocols.milter_session import MilterFactory, MilterProtocol
from policyd.testing import FakeMTA

HEADERS = [("From", "Alice <alice@example.net>"), ("To", "bob@example.org"), ("Subject", "Hello")]


class Recorder:
    """A filter that keeps what it saw of each message and answers a fixed verdict."""

    def __init__(self, verdict: Verdict = milter.ACCEPT_UNCHANGED) -> None:
        self.verdict = verdict
        self.seen: list[dict[str, object]] = []
        self.pending: list[Deferred[Verdict]] = []
        self.hold = False

    def __call__(self, message: MilterMessage) -> Deferred[Verdict]:
        self.seen.append(
            {
                "client": message.client_address,
                "client_name": message.client_name,
                "sender": message.sender,
                "recipients": list(message.recipients),
                "headers": list(message.headers),
                "body": message.body(),
                "body_size": message.body_size,
                "complete": message.complete,
                "queue_id": message.queue_id,
            }
        )
        if self.hold:
            waiting: Deferred[Verdict] = Deferred()
            self.pending.append(waiting)
            return waiting
        return succeed(self.verdict)


def make(
    filter: Callable[[MilterMessage], Deferred[Verdict]] | None = None,
    clock: Clock | None = None,
    **options: object,
) -> tuple[MilterFactory, MilterProtocol]:
    """A factory and one protocol built by it, on a fake clock."""
    factory = MilterFactory(filter or Recorder(), clock or Clock(), **options)  # type: ignore[arg-type]
    protocol = factory.buildProtocol(None)
    assert protocol is not None
    return factory, protocol


def started(filter: Recorder, **options: object) -> FakeMTA:
    """A fake MTA that negotiated and connected."""
    _, protocol = make(filter, **options)
    mta = FakeMTA(protocol)
    mta.negotiate()
    mta.connect()
    return mta


def test_negotiation_asks_only_what_it_needs() -> None:
    """Version 6; add/change headers and delete recipients; skips DATA/EOH; no replies but the verdict."""
    _, protocol = make()
    mta = FakeMTA(protocol)
    reply = mta.negotiate()
    assert reply.command == b"O"
    version, actions, steps = struct.unpack(">III", reply.data[:12])
    assert version == 6
    assert actions == milter.SMFIF_ADDHDRS | milter.SMFIF_CHGHDRS | milter.SMFIF_DELRCPT
    for flag in (milter.SMFIP_NODATA, milter.SMFIP_NOEOH, milter.SMFIP_NOUNKNOWN, milter.SMFIP_NR_HELO,
                 milter.SMFIP_NR_CONN, milter.SMFIP_NR_MAIL, milter.SMFIP_NR_RCPT, milter.SMFIP_NR_HDR,
                 milter.SMFIP_NR_BODY):
        assert steps & flag, hex(flag)
    for flag in (milter.SMFIP_NOHELO, milter.SMFIP_NOCONNECT, milter.SMFIP_NOMAIL, milter.SMFIP_NORCPT, milter.SMFIP_NOHDRS,
                 milter.SMFIP_NOBODY, milter.SMFIP_SKIP):
        assert not steps & flag, hex(flag)


def test_a_whole_message_gets_one_reply() -> None:
    """With Postfix's offer, MAIL, RCPT, headers and body chunks go unanswered: the verdict is the only reply."""
    mta = started(Recorder())
    assert mta.mail("a@example.net") == []
    assert mta.rcpt("b@example.org") == []
    assert mta.header("Subject", "x") == []
    assert mta.body(b"x" * 200_000) == []
    assert [r.command for r in mta.end()] == [b"a"]


def test_an_old_mta_gets_replies_to_every_step() -> None:
    """An MTA offering no skips and no no-reply steps gets 'continue' after each command."""
    filter = Recorder()
    _, protocol = make(filter)
    mta = FakeMTA(protocol, steps=0)
    mta.negotiate(version=2)
    assert protocol.version == 2 and mta.steps == 0
    assert [r.command for r in mta.connect()] == [b"c"]
    assert [r.command for r in mta.mail("a@example.net")] == [b"c"]
    assert [r.command for r in mta.rcpt("b@example.org")] == [b"c"]
    assert [r.command for r in mta.header("Subject", "x")] == [b"c"]
    assert [r.command for r in mta.end_of_headers()] == [b"c"]
    assert [r.command for r in mta.body(b"hello\r\n")] == [b"c"]
    assert [r.command for r in mta.end()] == [b"a"]


def test_one_message_reaches_the_filter_whole() -> None:
    """Client, envelope, headers in order, body chunks and the queue id macro reach the filter."""
    filter = Recorder()
    mta = started(filter)
    body = b"line one\r\n" * 20000  # 200 KB: several 64 KiB chunks
    assert mta.mail("alice@example.net") == []
    assert mta.rcpt("bob@example.org") == []
    assert mta.rcpt("carol@example.org") == []
    replies = mta.message("alice@example.net", ["bob@example.org", "carol@example.org"], HEADERS, body)
    assert [r.command for r in replies] == [b"a"]
    seen = filter.seen[-1]
    assert seen["client"] == "192.0.2.7" and seen["client_name"] == "mail.example.net"
    assert seen["sender"] == "<alice@example.net>"
    assert seen["recipients"] == ["<bob@example.org>", "<carol@example.org>"]
    assert seen["headers"] == HEADERS
    assert seen["body"] == body and seen["complete"] is True
    assert seen["queue_id"] == "4XyZ1"


def test_modifications_are_sent_in_order_before_the_final_reply() -> None:
    """Each change becomes its packet (index, name, value), then the accept."""
    verdict = Verdict(
        (
            change_header("X-Spam-Flag", "", 2),
            change_header("Subject", "*{spam}* Hello", 1),
            add_header("X-Spam-Score", "9.5"),
            insert_header("X-First", "yes", 0),
            delete_recipient("<carol@example.org>"),
        )
    )
    mta = started(Recorder(verdict))
    replies = mta.message("a@example.net", ["bob@example.org", "carol@example.org"], HEADERS, b"hi\r\n")
    assert [r.command for r in replies] == [b"m", b"m", b"h", b"i", b"-", b"a"]
    assert replies[0].index == 2 and replies[0].strings() == ["X-Spam-Flag", ""]
    assert replies[1].index == 1 and replies[1].strings() == ["Subject", "*{spam}* Hello"]
    assert replies[2].strings() == ["X-Spam-Score", "9.5"]
    assert replies[3].index == 0 and replies[3].strings() == ["X-First", "yes"]
    assert replies[4].strings() == ["<carol@example.org>"]


def test_actions_the_mta_refused_are_not_sent() -> None:
    """When the MTA does not allow deleting recipients, that change is left out, the rest goes."""
    verdict = Verdict((add_header("X-Spam-Flag", "YES"), delete_recipient("<bob@example.org>")))
    _, protocol = make(Recorder(verdict))
    mta = FakeMTA(protocol, actions=milter.SMFIF_ADDHDRS)
    mta.negotiate()
    mta.connect()
    replies = mta.message("a@example.net", ["bob@example.org"], HEADERS, b"x\r\n")
    assert [r.command for r in replies] == [b"h", b"a"]


def test_discard_verdict() -> None:
    """A discard verdict is one 'd' reply."""
    mta = started(Recorder(Verdict((), milter.DISCARD)))
    assert [r.command for r in mta.message("a@example.net", ["b@example.org"], HEADERS, b"x")] == [b"d"]


def test_several_messages_and_abort_on_one_connection() -> None:
    """An aborted message is forgotten; the next one has only its own envelope and headers."""
    filter = Recorder()
    mta = started(filter)
    mta.mail("first@example.net")
    mta.rcpt("old@example.org")
    mta.header("Subject", "aborted")
    mta.abort()
    mta.message("second@example.net", ["new@example.org"], [("Subject", "kept")], b"body")
    mta.message("third@example.net", ["other@example.org"], [("Subject", "third")], b"")
    assert [s["recipients"] for s in filter.seen] == [["<new@example.org>"], ["<other@example.org>"]]
    assert [s["headers"] for s in filter.seen] == [[("Subject", "kept")], [("Subject", "third")]]
    assert filter.seen[1]["body"] == b""


def test_body_beyond_the_keep_limit_is_not_kept() -> None:
    """Past keep_limit nothing more of the body is kept: memory stays bounded."""
    filter = Recorder()
    mta = started(filter, memory_limit=1024, keep_limit=100_000)
    mta.mail("a@example.net")
    mta.rcpt("b@example.org")
    assert mta.body(b"x" * 300_000) == []
    mta.end()
    seen = filter.seen[-1]
    assert seen["body_size"] == 300_000
    assert len(seen["body"]) == 100_000  # type: ignore[arg-type]
    assert seen["complete"] is False


def test_an_mta_that_answers_each_chunk_is_told_to_skip_past_the_keep_limit() -> None:
    """Without no-reply for body chunks, past keep_limit the milter answers SKIP (when the MTA offers it)."""
    filter = Recorder()
    _, protocol = make(filter, memory_limit=1024, keep_limit=100_000)
    mta = FakeMTA(protocol, steps=0x1FFFFF & ~milter.SMFIP_NR_BODY)
    mta.negotiate()
    mta.connect()
    assert mta.steps & milter.SMFIP_SKIP and not mta.steps & milter.SMFIP_NR_BODY
    mta.mail("a@example.net")
    mta.rcpt("b@example.org")
    replies = mta.body(b"x" * 300_000)
    assert [r.command for r in replies] == [b"c", b"s", b"s", b"s", b"s"]
    mta.end()
    seen = filter.seen[-1]
    assert seen["body_size"] == 300_000
    assert len(seen["body"]) == 100_000  # type: ignore[arg-type]
    assert seen["complete"] is False


def test_body_is_spooled_to_disk_beyond_the_memory_limit() -> None:
    """The body lives in memory up to memory_limit, then in a temporary file."""
    message = MilterMessage(memory_limit=1000, keep_limit=10_000)
    message.add_body(b"a" * 500)
    message.add_body(b"b" * 400)
    assert not message.spooled
    assert message.body(600) == b"a" * 500 + b"b" * 100
    message.add_body(b"c" * 900)
    assert message.spooled
    assert message.body() == b"a" * 500 + b"b" * 400 + b"c" * 900
    assert message.body(1000) == b"a" * 500 + b"b" * 400 + b"c" * 100
    message.close()
    assert not message.spooled and message.body() == b""


def test_end_of_message_may_carry_the_last_chunk() -> None:
    """Data in SMFIC_BODYEOB is the end of the body."""
    filter = Recorder()
    mta = started(filter)
    mta.mail("a@example.net")
    mta.rcpt("b@example.org")
    mta.body(b"start ")
    mta.command(b"E", b"end")
    assert filter.seen[-1]["body"] == b"start end"


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff garbage",  # a length far beyond the bound
        struct.pack(">I", 0) + b"x",  # a zero length
        struct.pack(">I", MAX_PACKET + 1) + b"B",  # one byte too long, announced before it arrives
        FakeMTA.packet(b"Z", b"what"),  # an unknown command
        FakeMTA.packet(b"D"),  # a macro packet without its stage
        FakeMTA.packet(b"L", b"\0"),  # a header without a name
    ],
)
def test_bad_packets_close_the_connection(garbage: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """Garbage, oversize packets and unknown commands close that connection with a log line naming the peer."""
    filter = Recorder()
    mta = started(filter)
    mta.mail("a@example.net")
    mta.send_raw(garbage)
    assert mta.closed
    assert "bad milter input from 127.0.0.1:54321" in caplog.text
    mta.send_raw(FakeMTA.packet(b"E"))
    assert filter.seen == []


def test_commands_before_negotiation_close_the_connection() -> None:
    """A client that does not start with option negotiation is not an MTA."""
    _, protocol = make()
    mta = FakeMTA(protocol)
    mta.connect()
    assert mta.closed


def test_other_connections_are_not_affected_by_a_bad_one() -> None:
    """One connection's garbage leaves the others working."""
    filter = Recorder()
    factory, first = make(filter)
    second = factory.buildProtocol(None)
    assert second is not None
    good, bad = FakeMTA(first), FakeMTA(second)
    good.negotiate()
    bad.negotiate()
    bad.send_raw(b"\x00\x00\x00\x00")
    assert bad.closed and not good.closed
    good.connect()
    assert [r.command for r in good.message("a@example.net", ["b@example.org"], HEADERS, b"x")] == [b"a"]


def test_a_client_that_disconnects_mid_message() -> None:
    """A connection lost in the middle of a body drops the message: no filter call, file closed, forgotten."""
    filter = Recorder()
    factory, protocol = make(filter, memory_limit=1024)
    mta = FakeMTA(protocol)
    mta.negotiate()
    mta.connect()
    mta.mail("a@example.net")
    mta.rcpt("b@example.org")
    mta.body(b"x" * 5000)
    spool = protocol.message._spool
    assert spool is not None
    mta.send_raw(FakeMTA.packet(b"B", b"half a chunk")[:9])
    protocol.connectionLost()
    assert filter.seen == []
    assert spool.closed
    assert protocol not in factory.connections


def test_a_client_that_disconnects_while_the_filter_works() -> None:
    """The verdict of a message whose MTA went away is dropped quietly."""
    filter = Recorder()
    filter.hold = True
    factory, protocol = make(filter)
    mta = FakeMTA(protocol)
    mta.negotiate()
    mta.connect()
    mta.message("a@example.net", ["b@example.org"], HEADERS, b"x")
    protocol.connectionLost()
    filter.pending[0].callback(milter.ACCEPT_UNCHANGED)
    assert mta.transport.value() == b""
    assert not factory.connections


def test_commands_sent_while_scoring_wait_their_turn() -> None:
    """The next message's commands, pipelined during scoring, are handled after the verdict."""
    filter = Recorder()
    filter.hold = True
    mta = started(filter)
    mta.message("a@example.net", ["b@example.org"], HEADERS, b"first")
    mta.mail("c@example.net")
    mta.rcpt("d@example.org")
    mta.send_raw(FakeMTA.packet(b"E"))
    assert len(filter.seen) == 1
    filter.pending[0].callback(milter.ACCEPT_UNCHANGED)
    assert len(filter.seen) == 2
    assert filter.seen[1]["recipients"] == ["<d@example.org>"]
    filter.pending[1].callback(milter.ACCEPT_UNCHANGED)
    assert [r.command for r in mta.replies()] == [b"a", b"a"]


def test_a_failing_filter_lets_mail_flow(caplog: pytest.LogCaptureFixture) -> None:
    """When scoring fails the message is accepted unchanged and the error logged."""
    mta = started(lambda message: fail(RuntimeError("model exploded")))  # type: ignore[arg-type]
    assert [r.command for r in mta.message("a@example.net", ["b@example.org"], HEADERS, b"x")] == [b"a"]
    assert "model exploded" in caplog.text


def test_a_failing_filter_may_tempfail_when_configured() -> None:
    """on_error=tempfail answers 't' instead."""
    mta = started(lambda message: fail(RuntimeError("x")), on_error=milter.TEMPFAIL)  # type: ignore[arg-type]
    assert [r.command for r in mta.message("a@example.net", ["b@example.org"], HEADERS, b"x")] == [b"t"]


def test_a_filter_that_raises_at_once_lets_mail_flow() -> None:
    """An exception thrown by the filter itself is handled like a failure."""

    def broken(message: MilterMessage) -> Deferred[Verdict]:
        raise ValueError("bug")

    mta = started(broken)  # type: ignore[arg-type]
    assert [r.command for r in mta.message("a@example.net", ["b@example.org"], HEADERS, b"x")] == [b"a"]


def test_a_slow_filter_is_given_up_on() -> None:
    """Past the filter timeout the message is accepted unchanged, before Postfix's own timeout."""
    filter = Recorder()
    filter.hold = True
    clock = Clock()
    mta = started(filter, clock=clock, filter_timeout=30.0)
    assert mta.message("a@example.net", ["b@example.org"], HEADERS, b"x") == []
    clock.advance(30)
    assert [r.command for r in mta.replies()] == [b"a"]


def test_macros_the_latest_value_wins() -> None:
    """Macros of every stage are kept; a name sent again, in any stage, takes its latest value."""
    filter = Recorder()
    mta = started(filter)
    mta.macros(b"C", daemon_name="inbound", j="mx.example.org")
    mta.connect()
    mta.macros(b"M", i="4Q1", auth_authen="alice")
    mta.mail("a@example.net")
    mta.macros(b"R", i="4Q1")
    mta.rcpt("b@example.org")
    mta.header("Subject", "hello")
    mta.macros(b"E", i="4Q2")
    mta.end()
    message = mta.protocol.message
    assert filter.seen[-1]["queue_id"] == "4Q2"
    assert message.macros == {"daemon_name": "inbound", "j": "mx.example.org", "i": "4Q2", "auth_authen": "alice"}
    mta.macros(b"M", i="4Q3")
    assert message.queue_id == "4Q3"
    assert "auth_authen" not in message.macros  # the MAIL stage's macros are this message's now


@pytest.mark.parametrize(
    "packets",
    [
        [b"C{j}\0mx\0i\0c1\0", b"Mi\0m1\0{auth_authen}\0lou\0i\0m2\0"],
        [b"Mi\0m1\0{i}\0m3\0odd", b"E{{i}}\0e\xff\xc3\0auth_authen\0"],
        [b"Ei\0", b"M", b"R\0\0i\0\0", b"Tauth_authen\0\xe2\x82\0x"],
        [b"Ci\0a\0", b"Mj\0b\0", b"Ci\0c\0"],
    ],
)
def test_one_macro_is_what_every_macro_says(packets: list[bytes]) -> None:
    """macro(name), read from the newest packet back, gives what the whole macros dictionary gives."""
    message = MilterMessage(1024, 4096)
    for data in packets:
        message.add_macros(data)
    every = dict(message.macros)
    message._macros = None
    for name in ("i", "j", "auth_authen", "x", ""):
        assert message.macro(name) == every.get(name, "")
    assert message.queue_id == every.get("i", "")
    assert message.macros == every
    assert message.macro("i") == every.get("i", "")


def test_a_verdict_fired_at_once_and_one_fired_later_get_the_same_reply() -> None:
    """The verdict of a filter that answered at once is sent as the one of a filter that waited."""
    verdict = Verdict((add_header("X-Spam-Flag", "YES"), delete_recipient("<b@example.org>")), milter.ACCEPT)
    at_once = started(Recorder(verdict))
    waiting_filter = Recorder(verdict)
    waiting_filter.hold = True
    waiting = started(waiting_filter)
    first = at_once.message("a@example.net", ["b@example.org"], HEADERS, b"x")
    assert waiting.message("a@example.net", ["b@example.org"], HEADERS, b"x") == []
    waiting_filter.pending.pop().callback(verdict)
    later = waiting.replies()
    assert [(r.command, r.data) for r in first] == [(r.command, r.data) for r in later]
    assert [r.command for r in first] == [b"h", b"-", b"a"]
    # And the next message on the connection goes on as before.
    assert [r.command for r in at_once.message("a@example.net", ["c@example.org"], HEADERS, b"y")] == [b"h", b"-", b"a"]


def test_quit_closes_and_quit_nc_keeps_the_socket() -> None:
    """SMFIC_QUIT_NC starts a fresh SMTP session on the same socket; SMFIC_QUIT closes it."""
    filter = Recorder()
    mta = started(filter)
    mta.macros(b"C", daemon_name="inbound")
    mta.command(b"K")
    assert not mta.closed
    mta.connect(address="198.51.100.9")
    mta.message("a@example.net", ["b@example.org"], HEADERS, b"x")
    assert filter.seen[-1]["client"] == "198.51.100.9"
    mta.quit()
    assert mta.closed


def test_idle_connections_are_closed() -> None:
    """A connection silent for idle_timeout is dropped."""
    clock = Clock()
    mta = started(Recorder(), clock=clock, idle_timeout=600.0)
    clock.advance(599)
    assert not mta.transport.disconnecting
    clock.advance(2)
    assert mta.transport.disconnecting


def test_input_keeps_a_connection_alive() -> None:
    """Only silence counts: a packet starts the idle time again."""
    clock = Clock()
    mta = started(Recorder(), clock=clock, idle_timeout=600.0)
    clock.advance(500)
    mta.mail("a@example.net")
    clock.advance(500)
    assert not mta.transport.disconnecting
    clock.advance(101)
    assert mta.transport.disconnecting


def test_a_verdict_given_at_once_sets_no_timer() -> None:
    """A filter that answers at once costs no filter timeout timer; the idle timer is the only one."""
    clock = Clock()
    mta = started(Recorder(), clock=clock)
    assert [r.command for r in mta.message("a@example.net", ["b@example.org"], HEADERS, b"x")] == [b"a"]
    assert len(clock.getDelayedCalls()) == 1


def test_factory_bounds_connections_and_checks_clients() -> None:
    """Beyond max_connections, and from outside allowed_clients, connections are refused."""
    from twisted.internet.address import IPv4Address

    from policyd.netlists import NetworkSet

    factory = MilterFactory(Recorder(), Clock(), NetworkSet(["127.0.0.0/8"]), max_connections=1)
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1)) is None
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)) is not None
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 2)) is None


def test_every_header_within_the_bounds_is_kept_in_order() -> None:
    """Up to MAX_HEADER_COUNT headers and MAX_HEADERS bytes, every header is kept, in order."""
    message = MilterMessage(1024, 4096)
    for n in range(milter.MAX_HEADER_COUNT):
        message.add_header(f"X-{n}", "v")
    assert message.headers_complete and message.header_count == milter.MAX_HEADER_COUNT
    assert message.headers == [(f"X-{n}", "v") for n in range(milter.MAX_HEADER_COUNT)]


@pytest.mark.parametrize(
    "block",
    [
        [(f"X-{n}", "v") for n in range(milter.MAX_HEADER_COUNT)],
        [("X-Big", "v" * (milter.MAX_HEADERS - len("X-Big") - 4))],
    ],
    ids=["as many headers as kept", "as many bytes as kept"],
)
def test_a_header_block_beyond_the_bounds_is_dropped_whole(block: list[tuple[str, str]]) -> None:
    """At a bound the block is kept; one header more and none is kept (a part would pass for the whole)."""
    message = MilterMessage(1024, 4096)
    for name, value in block:
        message.add_header(name, value)
    assert message.headers_complete and len(message.headers) == len(block)
    message.add_header("Subject", "one more")
    assert not message.headers_complete and message.headers == [] and message.header_bytes == 0
    assert message.header_count == len(block) + 1
    message.new_message()
    assert message.headers_complete and message.header_count == message.header_size == 0


def test_a_header_longer_than_a_packet_is_read_past_and_the_message_still_decided() -> None:
    """Postfix may send a header beyond MAX_PACKET: the connection stays, the filter hears the block was not kept."""
    filter = Recorder()
    verdicts: list[bool] = []

    def judge(message: MilterMessage) -> Deferred[Verdict]:
        verdicts.append(message.headers_complete)
        return filter(message)

    _, protocol = make(judge)
    mta = FakeMTA(protocol)
    mta.negotiate()
    mta.connect()
    mta.mail("a@example.net")
    mta.rcpt("b@example.org")
    huge = FakeMTA.packet(b"L", b"X-Huge\0" + b"h" * (MAX_PACKET + 10) + b"\0")
    # In pieces, as a socket delivers it.
    for start in range(0, len(huge), 65536):
        mta.send_raw(huge[start : start + 65536])
    mta.header("Subject", "after it")
    mta.body(b"x")
    assert [r.command for r in mta.end()] == [b"a"]
    assert verdicts == [False] and not mta.closed
    assert filter.seen[0]["headers"] == []
    assert [r.command for r in mta.message("a@example.net", ["b@example.org"], HEADERS, b"x")] == [b"a"]
    assert verdicts == [False, True] and filter.seen[1]["headers"] == HEADERS


def test_an_old_mta_gets_its_reply_to_an_overlong_header_once_read() -> None:
    """An MTA that waits for a reply to each header gets it after the last byte of an overlong one."""
    _, protocol = make(Recorder())
    mta = FakeMTA(protocol, steps=0)
    mta.negotiate()
    mta.connect()
    mta.mail("a@example.net")
    huge = FakeMTA.packet(b"L", b"X-Huge\0" + b"h" * (MAX_PACKET + 10) + b"\0")
    mta.send_raw(huge[:-1])
    assert mta.replies() == []
    mta.send_raw(huge[-1:])
    assert [r.command for r in mta.replies()] == [b"c"]


def test_a_refusal_is_sent_as_the_smtp_reply_it_names() -> None:
    """A REJECT verdict with an SMTP reply goes out as SMFIR_REPLYCODE (NUL-terminated, % doubled)."""
    mta = started(Recorder(Verdict((), milter.REJECT, "554 5.6.0 Too many, 100% sure")))
    (reply,) = mta.message("a@example.net", ["b@example.org"], HEADERS, b"x")
    assert reply.command == b"y" and reply.data == b"554 5.6.0 Too many, 100%% sure\0"
    mta = started(Recorder(Verdict((), milter.REJECT)))
    assert [r.command for r in mta.message("a@example.net", ["b@example.org"], HEADERS, b"x")] == [b"r"]


def test_recipients_beyond_the_bound_are_counted() -> None:
    """Past MAX_RECIPIENTS, recipients are counted but not kept, so a filter knows the list is partial."""
    message = MilterMessage(1024, 4096)
    for n in range(milter.MAX_RECIPIENTS + 2):
        message.add_recipient(f"<r{n}@example.org>")
    assert len(message.recipients) == milter.MAX_RECIPIENTS and message.recipient_count == milter.MAX_RECIPIENTS + 2
    assert not message.recipients_complete


def test_drained_waits_for_messages_being_scored() -> None:
    """Shutdown waits until every message being scored has its answer."""
    filter = Recorder()
    filter.hold = True
    factory, protocol = make(filter)
    mta = FakeMTA(protocol)
    mta.negotiate()
    mta.connect()
    mta.message("a@example.net", ["b@example.org"], HEADERS, b"x")
    drained = factory.drained()
    assert not drained.called
    filter.pending[0].callback(milter.ACCEPT_UNCHANGED)
    assert drained.called


def test_many_messages_in_one_read_are_answered_without_recursion() -> None:
    """Thousands of whole messages in one read, each decided at once, are answered in order."""
    filter = Recorder()
    mta = started(filter)
    one = b"".join([FakeMTA.packet(b"M", b"<a@example.net>\0"), FakeMTA.packet(b"R", b"<b@example.org>\0"),
                    FakeMTA.packet(b"L", b"Subject\0x\0"), FakeMTA.packet(b"B", b"x"), FakeMTA.packet(b"E")])
    mta.send_raw(one * 3000)
    assert [r.command for r in mta.replies()] == [b"a"] * 3000
    assert len(filter.seen) == 3000 and not mta.closed


def test_the_helo_step_is_skipped_when_nothing_needs_it() -> None:
    """Only SPF reads HELO: a milter without it asks the MTA to skip the step, and a HELO sent anyway is read."""
    filter = Recorder()
    _, protocol = make(filter, needs_helo=False)
    mta = FakeMTA(protocol)
    steps = struct.unpack(">III", mta.negotiate().data[:12])[2]
    assert steps & milter.SMFIP_NOHELO
    assert steps & milter.SMFIP_NODATA and steps & milter.SMFIP_NR_BODY
    mta.connect()
    assert mta.command(b"H", b"mx.example.net\0") == []
    mta.mail("a@example.net")
    mta.rcpt("b@example.org")
    assert [r.command for r in mta.end()] == [b"a"] and not mta.closed
    _, protocol = make(needs_helo=True)
    steps = struct.unpack(">III", FakeMTA(protocol).negotiate().data[:12])[2]
    assert not steps & milter.SMFIP_NOHELO
