"""End to end: recipients choose for themselves, through real Postfix and a real browser.

A private Postfix (tests/postfix.py) asks a real ``policyd milter`` about
every message and delivers to the recording SMTP sink; a real
``policyd serve`` sends the digest through that same Postfix and serves the
self-service pages; a real headless Chromium renders the digest, follows
its release link, presses the button (twice), and switches a recipient to
``inbox`` on the preference page.  Carol's choice comes from provisioning:
a Postfix ``hash:`` table read with ``postmap -q``.

The screenshots for the README (``docs/digest.png``, ``docs/release.png``)
are taken here.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.harness.browser import DOCS, chromium, press, shoot
from tests.harness.postfix import PostfixInstance, SmtpSink
from tests.harness.servers import PolicydServer, free_port, policyd, wait_for_port
from tests.harness.smtp_sink import Delivery
from tests.integration.test_postfix_milter import SPAM_BODY, SPAM_SUBJECT
from tests.unit.content.test_classifier import training_mail

pytestmark = pytest.mark.integration

TAGGED = f"*{{spam}}* {SPAM_SUBJECT}"


@dataclass
class Site:
    """The running pieces and how to reach them."""

    root: Path
    config: Path
    mta: PostfixInstance
    sink: SmtpSink
    http_port: int

    def cli(self, *args: str) -> str:
        """``policyd ARGS -c CONFIG``; it must succeed."""
        done = policyd(*args, "-c", str(self.config))
        assert done.returncode == 0, f"policyd {' '.join(args)}: {done.stderr}"
        return done.stdout

    def send_spam(self, recipients: list[str]) -> None:
        """One spammy message from the Internet, accepted by Postfix."""
        sent = self.mta.send(self.mta.inbound_port, "spammer@example.net", recipients,
                             subject=SPAM_SUBJECT, body=SPAM_BODY)
        assert sent.accepted == recipients, self.mta.log_tail()
        assert sent.data_reply is not None and sent.data_reply[0] == 250, sent.data_reply

    def to(self, recipient: str, subject: Callable[[str], bool] = lambda _: True) -> list[Delivery]:
        """Deliveries so far to ``recipient`` whose Subject satisfies ``subject``."""
        return [d for d in self.sink.snapshot() if recipient in d.recipients and subject(d.header("Subject") or "")]

    def wait(self, recipient: str, count: int, subject: Callable[[str], bool] = lambda _: True) -> list[Delivery]:
        """Wait until ``count`` such deliveries arrived (then for Postfix's queue to empty)."""
        self.sink.wait_for(
            lambda found: len([d for d in found if recipient in d.recipients and subject(d.header("Subject") or "")])
            >= count,
            timeout=60,
        )
        self.mta.wait_queue_empty()
        return self.to(recipient, subject)

    def held(self) -> list[dict[str, Any]]:
        """The quarantine, as ``policyd quarantine list --json`` shows it."""
        return [json.loads(line) for line in self.cli("quarantine", "list", "--json").splitlines()]


def write_config(path: Path, root: Path, ports: dict[str, int], inbound: int) -> None:
    path.write_text(
        f"listen:\n  policy: 'tcp:{ports['policy']}:interface=127.0.0.1'\n"
        f"  milter: 'tcp:{ports['milter']}:interface=127.0.0.1'\n"
        f"  http: 'tcp:{ports['http']}:interface=127.0.0.1'\n"
        f"store:\n  url: 'sqlite:///{root}/state.db'\n"
        "local_domains: [example.org]\noutbound:\n  limit: 5000\n"
        # A model trained on 120 messages is cautious: spam starts at 0 points.
        "content:\n  tag_at: 0\n"
        # The same spam is sent again after the release: learning the released copy as ham
        # would let it through untagged (tests/integration/test_feedback.py tests that).
        "  learn_from_release: false\n"
        f"notify:\n  smtp: '127.0.0.1:{inbound}'\n  from: 'policyd@example.org'\n  retry_first: 1s\n"
        "quarantine:\n  default: inbox\n"
        f"  preferences: 'hash:{root}/spam_choices'\n"
        f"  smtp: '127.0.0.1:{inbound}'\n",
        encoding="utf-8",
    )


@pytest.fixture
def site(
    tmp_path: Path,
    postfix_factory: Callable[..., PostfixInstance],
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Site]:
    """Postfix -> policyd milter -> sink, policyd serve (digest, pages); carol provisioned 'quarantine'."""
    # postmap reads a main.cf: give the table readers one (the system's may not exist).
    conf = tmp_path / "postfix-conf"
    conf.mkdir()
    (conf / "main.cf").write_text("compatibility_level = 3.6\n", encoding="utf-8")
    monkeypatch.setenv("MAIL_CONFIG", str(conf))
    choices = tmp_path / "spam_choices"
    choices.write_text("carol@example.org  quarantine\n", encoding="utf-8")
    subprocess.run([shutil.which("postmap") or "/usr/sbin/postmap", f"hash:{choices}"], check=True)
    ports = {"policy": free_port(), "milter": free_port(), "http": free_port()}
    config = tmp_path / "policyd.yaml"
    write_config(config, tmp_path, ports, inbound=25)
    ham, spam = training_mail(tmp_path)
    trained = policyd("train", "--ham", str(ham), "--spam", str(spam), "-c", str(config))
    assert trained.returncode == 0, trained.stderr
    mta = postfix_factory(milters=f"inet:127.0.0.1:{ports['milter']}")
    write_config(config, tmp_path, ports, inbound=mta.inbound_port)
    milter = PolicydServer(config, ports["milter"], "milter").start()
    server = PolicydServer(config, ports["policy"]).start()
    wait_for_port(ports["http"], process=server.process)
    try:
        yield Site(tmp_path, config, mta, smtp_sink, ports["http"])
    finally:
        assert server.stop() == 0, server.output()
        assert milter.stop() == 0, milter.log.read_text(errors="replace")


def digest_parts(delivery: Delivery) -> tuple[EmailMessage, str, str]:
    """The delivered digest, its text and its HTML."""
    message = email.message_from_bytes(delivery.data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    text, markup = message.get_body(("plain",)), message.get_body(("html",))
    assert text is not None and markup is not None
    return message, text.get_content(), markup.get_content()


def release_twice(digest_html: Path, release_link: str) -> dict[str, str]:
    """In one browser: render the digest, follow its release link, press in two tabs; returns what was seen."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    seen: dict[str, str] = {}
    with chromium(headers={"Accept-Language": "en-GB,en;q=0.9"}) as browser:
        browser.get(digest_html.as_uri())
        seen["digest_title"] = browser.find_element(By.TAG_NAME, "h1").text
        shoot(browser, DOCS / "digest.png")
        (link,) = [a for a in browser.find_elements(By.TAG_NAME, "a") if a.text == "Release"]
        seen["href"] = str(link.get_attribute("href"))
        link.click()
        WebDriverWait(browser, 15).until(lambda b: b.current_url.startswith("http://"))
        seen["page_title"] = browser.find_element(By.TAG_NAME, "h1").text
        seen["page"] = browser.find_element(By.TAG_NAME, "main").text
        shoot(browser, DOCS / "release.png")
        first = browser.current_window_handle
        browser.switch_to.new_window("tab")
        browser.get(release_link)  # the same link open twice (a second tab, a double press)
        second = browser.current_window_handle
        browser.switch_to.window(first)
        press(browser)
        seen["first_press"] = browser.find_element(By.CSS_SELECTOR, "[role=status]").text
        browser.switch_to.window(second)
        press(browser)
        seen["second_press"] = browser.find_element(By.TAG_NAME, "h1").text
    return seen


def choose_inbox(preference_link: str) -> tuple[str, str]:
    """Open the preference page, pick 'inbox', save; returns the text before and the confirmation."""
    from selenium.webdriver.common.by import By

    with chromium(headers={"Accept-Language": "en"}) as browser:
        browser.get(preference_link)
        before = str(browser.find_element(By.TAG_NAME, "main").text)
        browser.find_element(By.ID, "spam-inbox").click()
        press(browser)
        return before, str(browser.find_element(By.CSS_SELECTOR, "[role=status]").text)


def test_digest_release_link_and_preference_page(site: Site) -> None:
    """Held by provisioning; one digest; its link in a browser releases once to carol only, tagged; switching to
    inbox delivers the next spam tagged."""
    # 1. Carol's provisioning entry says quarantine: held for her, delivered tagged to bob.
    site.send_spam(["bob@example.org", "carol@example.org"])
    (bob,) = site.wait("bob@example.org", 1)
    assert bob.recipients == ("bob@example.org",) and bob.header("Subject") == TAGGED
    assert site.to("carol@example.org") == []
    (held,) = site.held()
    assert held["recipient"] == "carol@example.org" and held["subject"] == SPAM_SUBJECT

    # 2. The digest job: exactly one digest mail, to carol, through Postfix and the milter, not tagged.
    run = json.loads(site.cli("digest", "send-now", "--json"))
    assert run["queued"] is True and (run["recipients"], run["messages"]) == (1, 1)
    is_digest = lambda subject: subject.startswith("Quarantine:")  # noqa: E731
    (digest,) = site.wait("carol@example.org", 1, is_digest)
    again = json.loads(site.cli("digest", "send-now", "--json"))
    assert again["queued"] is True and again["recipients"] == 0
    time.sleep(3)  # the server polls its outbox every second: anything more would be here by now
    site.mta.wait_queue_empty()
    assert len(site.to("carol@example.org", is_digest)) == 1
    assert [d for d in site.sink.snapshot() if is_digest(d.header("Subject") or "")] == [digest]
    message, text, markup = digest_parts(digest)
    assert message["Subject"] == "Quarantine: 1 message held for you" and digest.recipients == ("carol@example.org",)
    assert message["X-Policyd-Digest"] is None and message["X-Spam-Flag"] is None
    assert f"Subject: {SPAM_SUBJECT}" in text and "from spammer@example.net" in text
    base = f"http://127.0.0.1:{site.http_port}/self-service"
    (release_link,) = re.findall(rf"Release: ({re.escape(base)}/release/\S+)", text)
    (preference_link,) = re.findall(rf"{re.escape(base)}/preference/\S+", text)
    page = site.root / "digest.html"
    page.write_text(markup, encoding="utf-8")

    # 3. In the browser: the digest's link opens the release page; pressed twice, delivered once, to carol only.
    seen = release_twice(page, release_link)
    assert seen["digest_title"] == "Quarantine: 1 message held for you"
    assert seen["href"] == release_link and seen["page_title"] == "A message held for you"
    assert TAGGED in seen["page"] and "spammer@example.net" in seen["page"]
    assert seen["first_press"].startswith("The message is on its way to your inbox (carol@example.org)")
    assert seen["second_press"] == "This message is no longer in quarantine"
    is_spam = lambda subject: subject == TAGGED  # noqa: E731
    (released,) = site.wait("carol@example.org", 1, is_spam)
    time.sleep(2)
    site.mta.wait_queue_empty()
    assert site.to("carol@example.org", is_spam) == [released]
    assert released.recipients == ("carol@example.org",) and released.header("X-Spam-Flag") == "YES"
    assert released.header("X-Policyd-Release") is None
    assert len(site.to("bob@example.org")) == 1 and site.held() == []

    # 4. The preference page: carol switches to inbox; her next spam arrives tagged, nothing held.
    before, saved = choose_inbox(preference_link)
    assert "kept in quarantine (set for your account by your organisation)" in before
    assert saved == "Saved: for carol@example.org, spam is now delivered to the inbox, tagged *{spam}*."
    site.send_spam(["carol@example.org"])
    tagged = site.wait("carol@example.org", 2, is_spam)
    assert len(tagged) == 2 and tagged[-1].recipients == ("carol@example.org",)
    assert site.held() == []

    # 5. Both actions are in the audit log, by "self-service", after the milter's hold
    #    (and after the training that set the model up).
    audit = [json.loads(line) for line in site.cli("audit", "--json").splitlines()]
    assert [a["action"] for a in audit][:1] == ["model-train"]
    assert [(a["who"], a["action"], a["subject"]) for a in audit[1:]] == [
        ("milter", "quarantine-hold", f"quarantine #{held['id']} for carol@example.org"),
        ("self-service", "release", f"quarantine #{held['id']} for carol@example.org"),
        ("self-service", "prefs", "carol@example.org"),
    ]
    assert (DOCS / "digest.png").stat().st_size > 5000 and (DOCS / "release.png").stat().st_size > 5000
