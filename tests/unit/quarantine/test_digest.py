"""The quarantine digest: when it runs, what it lists, how it is written and sent once."""

from __future__ import annotations

import datetime
import email
import email.policy
import re
from email.message import EmailMessage
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from policyd.notify import Notifier
from policyd.quarantine.digest import (
    CHECK_EVERY,
    DigestJob,
    DigestMail,
    default_base_url,
    next_run,
    previous_run,
    show_duration,
)
from policyd.quarantine.held import DIGEST_HEADER, digest_for, digest_header
from policyd.quarantine.links import PREFERENCE, RELEASE, LinkSigner
from policyd.store import Quarantined
from policyd.store.memory import MemoryStore
from tests.conftest import make_config
from tests.unit.quarantine.test_held import SECRET as HEADER_SECRET
from tests.unit.quarantine.test_held import Site, added, kinds
from tests.unit.test_notify import Outgoing

PARIS = ZoneInfo("Europe/Paris")
LINK_SECRET = b"link secret of this test install!"
BASE = "https://mail.example.org/policyd"
CONFIG = (
    "listen:\n  http: 'tcp:10042:interface=127.0.0.1'\n"
    "notify:\n  from: 'policyd@example.org'\n"
    "quarantine:\n  digest_at: '08:00'\n  default: quarantine\n"
)


def paris(year: int, month: int, day: int, hour: int, minute: int = 0) -> float:
    """A Paris wall-clock time as POSIX seconds."""
    return datetime.datetime(year, month, day, hour, minute, tzinfo=PARIS).timestamp()


def clock_at(when: float) -> Clock:
    clock = Clock()
    clock.advance(when)
    return clock


def hold(store: MemoryStore, recipient: str, at: float, subject: str = "Gagnez un iPhone", keep: float = 30 * 86400) -> Quarantined:
    """Put one message in the quarantine as the milter would."""
    entry = Quarantined(0, recipient, "spammer@example.net", subject, 9.25, at, at + keep, 120)
    raw = f"From: Spammer <spammer@example.net>\r\nSubject: *{{spam}}* {subject}\r\n\r\nBuy now\r\n".encode()
    return store.quarantine(entry, raw).result  # type: ignore[attr-defined, no-any-return]


def outbox(store: MemoryStore) -> list[tuple[str, list[int]]]:
    """Digest notices waiting: (recipient, ids listed)."""
    return [
        (q.notice.recipient, q.notice.payload["ids"])
        for q in store.outbox.values()
        if q.notice.kind == "digest" and q.sent is None
    ]


# --- when ----------------------------------------------------------------------------


def test_next_and_previous_run_in_the_servers_time_zone() -> None:
    """digest_at is wall-clock time: 08:00 in Paris stays 08:00 across both DST changes."""
    assert next_run(paris(2026, 11, 24, 7, 59), (8, 0), PARIS) == paris(2026, 11, 24, 8)
    assert next_run(paris(2026, 11, 24, 8), (8, 0), PARIS) == paris(2026, 11, 25, 8)
    assert previous_run(paris(2026, 11, 24, 8), (8, 0), PARIS) == paris(2026, 11, 24, 8)
    assert previous_run(paris(2026, 11, 24, 7), (8, 0), PARIS) == paris(2026, 11, 23, 8)
    # The night clocks go forward (23 h day) and back (25 h day).
    assert next_run(paris(2026, 3, 28, 9), (8, 0), PARIS) - paris(2026, 3, 28, 8) == 23 * 3600
    assert next_run(paris(2026, 10, 24, 9), (8, 0), PARIS) - paris(2026, 10, 24, 8) == 25 * 3600
    # A time that does not exist that night (02:30 on 29 March) still comes once.
    spring = next_run(paris(2026, 3, 29, 0), (2, 30), PARIS)
    assert paris(2026, 3, 29, 0) < spring < paris(2026, 3, 29, 4)
    # Without a time zone: the server's local time.
    now = datetime.datetime(2026, 6, 1, 12, 0).timestamp()
    assert datetime.datetime.fromtimestamp(next_run(now, (8, 15))).strftime("%d %H:%M") == "02 08:15"


def test_default_base_url_from_listen_http() -> None:
    """Links point at listen.http's address and bound port unless quarantine.base_url says otherwise."""
    assert default_base_url("tcp:10042:interface=127.0.0.1") == "http://127.0.0.1:10042"
    assert default_base_url("tcp:0:interface=127.0.0.1", 4711) == "http://127.0.0.1:4711"
    assert default_base_url("tcp6:10042:interface=\\:\\:1".replace("\\", ""), None) is not None
    assert default_base_url("unix:/run/policyd/http.sock") is None
    assert default_base_url(None) is None


def test_show_duration_in_both_languages() -> None:
    """Retention and link lifetime are written for people."""
    assert show_duration(30 * 86400, "en") == "30 days" and show_duration(86400, "fr") == "1 jour"
    assert show_duration(7200, "fr") == "2 heures" and show_duration(90, "en") == "2 minutes"


# --- the job ---------------------------------------------------------------------------


def test_the_job_queues_one_digest_per_recipient_at_digest_at() -> None:
    """At 08:00 each recipient with held mail gets one digest notice, listing only what is new since the last."""
    clock = clock_at(paris(2026, 11, 24, 7))
    store = MemoryStore()
    kicks: list[int] = []
    job = DigestJob(make_config(CONFIG), store, clock, on_queued=lambda: kicks.append(1), tz=PARIS)
    c1 = hold(store, "carol@example.org", paris(2026, 11, 23, 22))
    c2 = hold(store, "carol@example.org", paris(2026, 11, 24, 3))
    d1 = hold(store, "dave@example.org", paris(2026, 11, 24, 6))
    job.start()
    clock.advance(paris(2026, 11, 24, 7, 59) - clock.seconds())
    assert outbox(store) == [] and kicks == []
    clock.advance(60 + CHECK_EVERY)
    assert sorted(outbox(store)) == [("carol@example.org", [c2.id, c1.id]), ("dave@example.org", [d1.id])]
    assert kicks == [1] and store.mark is not None and store.mark >= paris(2026, 11, 24, 8)
    # Nothing more the same day; the next day lists only the new one, for its recipient only.
    for queued in store.outbox.values():
        queued.sent = clock.seconds()
    c3 = hold(store, "carol@example.org", paris(2026, 11, 24, 10))
    clock.advance(paris(2026, 11, 24, 23) - clock.seconds())
    assert outbox(store) == []
    for _ in range(int(10 * 3600 / CHECK_EVERY)):
        clock.advance(CHECK_EVERY)
    assert outbox(store) == [("carol@example.org", [c3.id])]
    # A day with nothing held: no mail at all, and the mark still moves.
    for queued in store.outbox.values():
        queued.sent = clock.seconds()
    clock.advance(paris(2026, 11, 26, 8, 1) - clock.seconds())
    assert outbox(store) == [] and store.mark is not None and store.mark >= paris(2026, 11, 26, 8)
    assert job.stop().called


def test_a_missed_digest_is_sent_at_start() -> None:
    """A server down at 08:00 sends that digest when it starts; a first start sends none early."""
    store = MemoryStore()
    store.mark = paris(2026, 11, 23, 8)
    hold(store, "carol@example.org", paris(2026, 11, 23, 20))
    late = DigestJob(make_config(CONFIG), store, clock_at(paris(2026, 11, 24, 9)), tz=PARIS)
    late.start()
    assert [r for r, _ in outbox(store)] == ["carol@example.org"]
    late.stop()
    fresh = MemoryStore()
    hold(fresh, "carol@example.org", paris(2026, 11, 23, 20))
    first = DigestJob(make_config(CONFIG), fresh, clock_at(paris(2026, 11, 24, 9)), tz=PARIS)
    first.start()
    assert outbox(fresh) == [] and first.next == paris(2026, 11, 25, 8)
    first.stop()


class Racing(MemoryStore):
    """A store whose queue_digest answers only when told: two servers reach it together."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[tuple[dict[str, Any], Deferred[bool]]] = []

    def queue_digest(self, **arguments: Any) -> Deferred[bool]:  # type: ignore[override]
        answer: Deferred[bool] = Deferred()
        self.waiting.append((arguments, answer))
        return answer

    def answer(self) -> None:
        for arguments, answer in self.waiting:
            answer.callback(MemoryStore.queue_digest(self, **arguments).result)  # type: ignore[attr-defined]


def test_two_servers_send_one_digest() -> None:
    """Two servers on one store run the digest at the same moment: each recipient gets one."""
    store = Racing()
    clock = clock_at(paris(2026, 11, 24, 8))
    hold(store, "carol@example.org", paris(2026, 11, 24, 1))
    one = Deferred.fromCoroutine(DigestJob(make_config(CONFIG), store, clock, tz=PARIS).run())
    two = Deferred.fromCoroutine(DigestJob(make_config(CONFIG), store, clock, tz=PARIS).run())
    store.answer()
    results = sorted([one.result.queued, two.result.queued])  # type: ignore[attr-defined]
    assert results == [False, True]
    assert [r for r, _ in outbox(store)] == ["carol@example.org"]


# --- the mail --------------------------------------------------------------------------


def mail_with(config_text: str = CONFIG, now: float | None = None) -> tuple[DigestMail, LinkSigner, Clock]:
    clock = clock_at(now or paris(2026, 11, 24, 8))
    signer = LinkSigner(LINK_SECRET, clock, 7 * 86400)
    return DigestMail(make_config(config_text + f"  base_url: '{BASE}'\n"), signer, None, HEADER_SECRET, PARIS), signer, clock


def parts(raw: bytes) -> tuple[EmailMessage, str, str]:
    """The parsed digest, its text and its HTML."""
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    text = message.get_body(("plain",))
    markup = message.get_body(("html",))
    assert text is not None and markup is not None
    return message, text.get_content(), markup.get_content()


def test_digest_lists_each_message_with_a_signed_release_link() -> None:
    """Date, sender, subject and score of each message; its release link names it; a preference link; our header."""
    mail, signer, clock = mail_with()
    store = MemoryStore()
    first = hold(store, "carol@example.org", paris(2026, 11, 23, 22, 5), subject="Gagnez un <b>iPhone</b>\x07")
    second = hold(store, "carol@example.org", paris(2026, 11, 24, 3, 30), subject="Cheap pills")
    raw = mail.compose("carol@example.org", [second, first], 0, None, clock.seconds())
    message, text, markup = parts(raw)
    assert message["To"] == "carol@example.org" and message["From"] == "policyd@example.org"
    assert message["Subject"] == "Quarantine: 2 messages held for you"
    assert message["Auto-Submitted"] == "auto-generated"
    assert digest_for(str(message[DIGEST_HEADER]), HEADER_SECRET, clock.seconds()) == "carol@example.org"
    assert "2026-11-23 22:05, from spammer@example.net (score 9.2)" in text
    assert "Subject: Gagnez un <b>iPhone</b>\n" in text and "\x07" not in text
    releases = re.findall(rf"Release: ({re.escape(BASE)}/self-service/release/\S+)", text)
    assert len(releases) == 2
    links = [signer.verify(url.rsplit("/", 1)[1], RELEASE) for url in releases]
    assert links[0].names(second) and links[1].names(first)
    (preference,) = re.findall(rf"{re.escape(BASE)}/self-service/preference/\S+", text)
    assert signer.verify(preference.rsplit("/", 1)[1], PREFERENCE).recipient == "carol@example.org"
    # The HTML has the same links, and what came from the spam is escaped.
    assert all(f'href="{url}"' in markup for url in [*releases, preference])
    assert "Gagnez un &lt;b&gt;iPhone&lt;/b&gt;" in markup and "<b>iPhone" not in markup
    assert '<html lang="en">' in markup and 'name="viewport"' in markup
    assert "Links work until 2026-12-01 08:00" in text and "deleted after 30 days" in text


def test_digest_in_french_and_in_both_languages() -> None:
    """digest_languages: [fr] writes French; [fr, en] both, French first."""
    store = MemoryStore()
    entry = hold(store, "carol@example.org", paris(2026, 11, 24, 3, 30))
    french, _, clock = mail_with(CONFIG + "  digest_languages: [fr]\n")
    message, text, markup = parts(french.compose("carol@example.org", [entry], 0, None, clock.seconds()))
    assert message["Subject"] == "Quarantaine : 1 message retenu pour vous"
    assert "24/11/2026 03:30, de spammer@example.net" in text and "Libérer : https://" in text
    assert '<html lang="fr">' in markup and "Libérer</a>" in markup
    both, _, _ = mail_with(CONFIG + "  digest_languages: [fr, en]\n")
    message, text, markup = parts(both.compose("carol@example.org", [entry], 0, None, clock.seconds()))
    # Folded (it is long): Python's parser keeps the folding space in front.
    assert message["Subject"].strip() == "Quarantaine : 1 message retenu pour vous / Quarantine: 1 message held for you"
    assert text.index("Bonjour") < text.index("Hello")
    assert '<div lang="fr">' in markup and '<div lang="en">' in markup


@pytest_twisted.ensureDeferred
async def test_outbox_sends_each_digest_once_with_what_is_still_held() -> None:
    """The notifier writes the digest when it sends it: released messages are left out; nothing left, no mail."""
    clock = clock_at(paris(2026, 11, 24, 8))
    store = MemoryStore()
    config = make_config(CONFIG + f"  base_url: '{BASE}'\n  digest_max: 2\n")
    outgoing = Outgoing()
    mail = DigestMail(config, LinkSigner(LINK_SECRET, clock, 7 * 86400), None, HEADER_SECRET, PARIS)
    notifier = Notifier(config, store, clock, send=outgoing, digest=mail)
    entries = [hold(store, "carol@example.org", paris(2026, 11, 24, hour)) for hour in (1, 2, 3)]
    dave = hold(store, "dave@example.org", paris(2026, 11, 24, 4))
    job = DigestJob(config, store, clock, tz=PARIS)
    assert (await job.run()).recipients == 2
    await store.quarantine_delete(dave.id)  # released by an admin before the digest left
    await notifier.drain()
    await notifier.drain()
    ((sender, recipient, raw),) = outgoing.mails
    assert (sender, recipient) == ("policyd@example.org", "carol@example.org")
    _, text, _ = parts(raw)
    assert text.count("Release: ") == 2 and entries[0].subject in text
    assert "... and 1 more, not listed here" in text
    assert await store.pending_notices() == 0


def test_the_milter_neither_tags_nor_holds_our_digest() -> None:
    """A digest with a genuine X-Policyd-Digest header passes untouched (header removed); a forged one is scored."""
    site = Site("quarantine:\n  default: quarantine\n")
    genuine = digest_header(HEADER_SECRET, "carol@example.org", site.clock.seconds())
    headers = [("From", "policyd@example.org"), ("Subject", "Quarantine: 1 message"), (DIGEST_HEADER, genuine)]
    replies = site.send(["carol@example.org"], headers)
    assert kinds(replies) == [b"m", b"a"] and added(replies) == {}
    assert site.held() == []
    # For another recipient, replayed a week later, or signed with another secret: scored as usual.
    for number, value in enumerate((
        genuine.replace("carol", "dave"),
        digest_header(HEADER_SECRET, "carol@example.org", site.clock.seconds() - 7 * 86400),
        digest_header(b"x" * 64, "carol@example.org", site.clock.seconds()),
    ), 1):
        site.send(["carol@example.org"], headers[:2] + [(DIGEST_HEADER, value)])
        assert len(site.held()) == number
        held = email.message_from_bytes(site.held()[-1][1], policy=email.policy.default)
        assert held[DIGEST_HEADER] is None and str(held["Subject"]).startswith("*{spam}*")


@pytest.mark.parametrize("text", ["08:00", "8:00", "23:59", "'00:00'"])
def test_digest_at_accepts_times_of_day(text: str) -> None:
    """digest_at reads HH:MM (YAML's base-60 reading of 8:00 included)."""
    config = make_config(f"listen:\n  http: 'tcp:1:interface=127.0.0.1'\nquarantine:\n  digest_at: {text}\n")
    assert re.fullmatch(r"\d\d:\d\d", config.quarantine.digest_at or "")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("quarantine:\n  digest_at: '08:00'\n", r"test.yaml:1: quarantine.digest_at: the digest's links need"),
        ("listen:\n  http: 'unix:/run/p.sock'\nquarantine:\n  digest_at: '08:00'\n", r"quarantine.base_url: needed"),
        ("quarantine:\n  digest_at: '24:00'\n", r"test.yaml:2: quarantine.digest_at: must be a time of day"),
        ("quarantine:\n  base_url: 'mail.example.org'\n", r"test.yaml:2: quarantine.base_url: must be an http"),
        ("quarantine:\n  digest_languages: [fr, de]\n", r"quarantine.digest_languages: 'de': must be en or fr"),
        ("quarantine:\n  digest_languages: []\n", r"quarantine.digest_languages: must name at least one"),
        ("quarantine:\n  link_ttl: 10s\n", r"test.yaml:2: quarantine.link_ttl: must be at least 60"),
        ("quarantine:\n  digest_max: 0\n", r"quarantine.digest_max: must be at least 1"),
    ],
)
def test_quarantine_keys_are_checked(text: str, error: str) -> None:
    """Impossible digest and link settings are errors naming the key (and the line)."""
    from policyd.errors import ConfigError

    with pytest.raises(ConfigError, match=error):
        make_config(text)


def test_digest_with_base_url_only_is_valid() -> None:
    """Another host may serve the pages: base_url alone is enough for the digest."""
    config = make_config("quarantine:\n  digest_at: '07:30'\n  base_url: 'https://mail.example.org/q'\n")
    assert config.quarantine.digest_at == "07:30" and config.quarantine.base_url == "https://mail.example.org/q"
