"""``policyd quarantine``, ``prefs`` and ``digest``: held mail and each recipient's choice."""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click

from policyd.cli.common import (
    LINES,
    POSITIVE,
    TEXT,
    by_option,
    cli,
    config_option,
    json_option,
    load_config,
    print_json,
    print_table,
    run_async,
    say,
    show,
    show_list,
    when,
    who,
)
from policyd.content import features as content
from policyd.content.feedback import Feedback
from policyd.content.scorer import header_secret
from policyd.quarantine.digest import DigestJob, DigestRun
from policyd.quarantine.held import Quarantine
from policyd.reactor import in_thread
from policyd.store import Quarantined, open_store

T = TypeVar("T")


def with_quarantine(work: Callable[[Any], Coroutine[Any, Any, T]], secret: bool = False) -> T:
    """Open the store, run ``work(quarantine)``, close the store."""

    config = load_config()
    key = header_secret(config, create=True) if secret else None

    async def main(reactor: Any) -> T:
        store = open_store(config.store.url, float(config.store.deadline))
        # Released mail is learned as ham once delivered; the command waits for that before it exits.
        quarantine = Quarantine(config, store, reactor, key, feedback=Feedback(store, in_thread(reactor), reactor))
        try:
            return await work(quarantine)
        finally:
            await quarantine.settled()
            await store.close()

    return run_async(main)


@cli.group("quarantine")
def quarantine_group() -> None:
    """Held spam: list, show, release, delete."""


@quarantine_group.command("list")
@config_option
@click.option("--recipient", type=TEXT, help="Only the mail held for this address.")
@click.option("--limit", type=POSITIVE, default=1000, show_default=True, help="How many entries.")
@json_option
def quarantine_list(recipient: str | None, limit: int, as_json: bool) -> None:
    """List held messages, newest first."""

    async def work(quarantine: Quarantine) -> list[Quarantined]:
        return await quarantine.entries(recipient, limit)

    entries = with_quarantine(work)
    show_list(
        as_json,
        entries,
        Quarantined.as_dict,
        ["ID", "HELD", "EXPIRES", "RECIPIENT", "SENDER", "SCORE", "SUBJECT"],
        lambda e: (e.id, when(e.at), when(e.until), e.recipient, e.sender or "<>", f"{e.score:.1f}", e.subject[:60]),
        empty="the quarantine is empty",
    )


@quarantine_group.command("show")
@config_option
@click.argument("entry_id", metavar="ID", type=POSITIVE)
@click.option("--raw", is_flag=True, help="Print the whole message as it would be delivered.")
@json_option
def quarantine_show(entry_id: int, raw: bool, as_json: bool) -> None:
    """Show held message ID: its details, headers and the start of its text."""

    async def work(quarantine: Quarantine) -> tuple[Quarantined, bytes]:
        return await quarantine.entry(entry_id)

    entry, message = with_quarantine(work)
    if raw:
        if sys.stdout.isatty():
            # Read on a screen, not saved: the message's own escapes must not act.
            text = message.decode("utf-8", "surrogateescape").replace("\r\n", "\n")
            say(text.removesuffix("\n"), keep=LINES)
            return
        sys.stdout.buffer.write(message)
        sys.stdout.buffer.flush()
        return
    headers, _ = content.split_message(message)
    if as_json:
        print_json(entry.as_dict() | {"headers": [[n, content.decode_header(v)] for n, v in headers]})
        return
    print_table(
        ["FIELD", "VALUE"],
        [
            ("id", entry.id),
            ("recipient", entry.recipient),
            ("sender", entry.sender or "<>"),
            ("client", entry.client or "-"),
            ("queue id", entry.queue_id or "-"),
            ("held", when(entry.at)),
            ("expires", when(entry.until)),
            ("score", f"{entry.score:.2f}"),
            ("reasons", ", ".join(entry.reasons) or "-"),
            ("size", entry.size),
        ],
    )
    say("")
    for name, value in headers:
        say(f"{name}: {content.decode_header(value)[:200]}", keep=LINES)
    text = content.extract(message).text
    say("")
    say(text[:800], keep=LINES)


@quarantine_group.command("release")
@config_option
@click.argument("entry_id", metavar="ID", type=POSITIVE)
@click.option("--reason", type=TEXT, default="", help="A note for the audit log.")
@by_option
@json_option
def quarantine_release(entry_id: int, reason: str, by: str | None, as_json: bool) -> None:
    """Deliver held message ID to its recipient (by SMTP through quarantine.smtp), then forget it."""

    async def work(quarantine: Quarantine) -> Quarantined:
        return await quarantine.release(entry_id, who(by), reason)

    entry = with_quarantine(work, secret=True)
    show(as_json, {"id": entry.id, "recipient": entry.recipient, "released": True}, f"quarantine #{entry.id} released to {entry.recipient}")


@quarantine_group.command("delete")
@config_option
@click.argument("entry_id", metavar="ID", type=POSITIVE)
@click.option("--reason", type=TEXT, default="", help="A note for the audit log.")
@by_option
@json_option
def quarantine_delete(entry_id: int, reason: str, by: str | None, as_json: bool) -> None:
    """Forget held message ID without delivering it."""

    async def work(quarantine: Quarantine) -> Quarantined:
        return await quarantine.delete(entry_id, who(by), reason)

    entry = with_quarantine(work)
    show(as_json, {"id": entry.id, "recipient": entry.recipient, "deleted": True}, f"quarantine #{entry.id} for {entry.recipient} deleted")


@cli.group()
def prefs() -> None:
    """Each recipient's choice for spam: inbox (tagged) or quarantine."""


@prefs.command("set")
@config_option
@click.argument("address", type=TEXT)
@click.option("--spam", "choice", required=True, type=click.Choice(["inbox", "quarantine", "default"]),
              help="inbox: delivered tagged; quarantine: held; default: quarantine.default.")
@by_option
@json_option
def prefs_set(address: str, choice: str, by: str | None, as_json: bool) -> None:
    """Choose what happens to spam for ADDRESS."""

    spam = None if choice == "default" else choice

    async def work(quarantine: Quarantine) -> str:
        return await quarantine.set_choice(address, spam, who(by))

    clean = with_quarantine(work)
    show(as_json, {"address": clean, "spam": choice}, f"spam for {clean}: {choice}")


@prefs.command("show")
@config_option
@click.argument("addresses", type=TEXT, nargs=-1, metavar="[ADDRESS]...")
@json_option
def prefs_show(addresses: tuple[str, ...], as_json: bool) -> None:
    """Show the spam choice of ADDRESSes (with the default), or every recorded choice."""

    async def work(quarantine: Quarantine) -> dict[str, str]:
        return await quarantine.choices(list(addresses) if addresses else None)

    choices = with_quarantine(work)
    show_list(
        as_json,
        sorted(choices.items()),
        lambda item: {"address": item[0], "spam": item[1]},
        ["ADDRESS", "SPAM"],
        lambda item: item,
        empty=f"no recorded choice (everyone gets quarantine.default: {load_config().quarantine.default})",
    )


@cli.group("digest")
def digest_group() -> None:
    """The quarantine digest: one mail per recipient with held mail (quarantine.digest_at)."""


@digest_group.command("send-now")
@config_option
@json_option
def digest_send_now(as_json: bool) -> None:
    """Queue the digest now: one mail per recipient with mail held since the last digest.

    The running ``policyd serve`` sends them from the outbox within seconds;
    the next daily digest lists only what is held after this one.
    """

    config = load_config()

    async def work(reactor: Any) -> DigestRun:
        store = open_store(config.store.url, float(config.store.deadline))
        try:
            return await DigestJob(config, store, reactor).run()
        finally:
            await store.close()

    done = run_async(work)
    if as_json:
        print_json(done.as_dict())
    elif not done.queued:
        say("another process queued this digest at the same moment: nothing more queued")
    else:
        period = f"held since {when(done.since)}" if done.since is not None else "everything held so far"
        say(
            f"queued {done.recipients} digest(s) listing {done.messages} message(s) ({period}); "
            "policyd serve sends them"
        )
