"""Messages per second through a real Postfix, with and without policyd, for ``make bench``.

Each configuration is a private Postfix (:class:`tests.harness.postfix.PostfixInstance`)
delivering to its own recording :class:`~tests.harness.smtp_sink.SmtpSink`.  Postfix
(and policyd, when it is asked) run pinned to CPU 0, like the targets of
the policy-protocol load; the SMTP clients and the sink run here, on CPU 1.

One batch: ``clients`` threads submit ``messages`` messages in all to the
submission port, each with SASL AUTH, ``per_session`` messages per SMTP
session and one external recipient per message; the batch's time runs from
the first connection until the sink holds every accepted message.  Batches
of the configurations take turns, ``rounds`` times, so a load that comes
and goes on the machine touches them alike; the figure is the median.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import smtplib
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.postfix import PostfixInstance
from tests.harness.servers import cpu_seconds
from tests.harness.smtp_sink import SmtpSink

PASSWORD = "bench-secret"
#: Names of the configurations the requirements compare.
FLOOR_POLICY_ROW = "postfix + twisted floor as policy"
FLOOR_MILTER_ROW = "postfix + twisted floor as milter"
#: The raw Twisted policy responder and the raw Twisted milter together: the floor of policy + milter.
FLOOR_PAIR_ROW = "postfix + twisted floor pair"
FULL_ROW = "postfix + policyd policy + milter"
INBOUND_ALONE_ROW = "postfix port 25 alone"
INBOUND_FULL_ROW = "port 25 + policyd policy + milter"
#: Longest a batch may take from first connection to last delivery.
BATCH_TIMEOUT = 120.0
BODY = "".join(f"Line {n} of a plain message of about two kilobytes, as mail usually is.\n"
               for n in range(28))


@contextlib.contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """Run the calling thread (and what it starts) on ``cpu``; restore its CPUs afterwards."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@dataclass
class Setup:
    """One configuration under test: a Postfix and its sink, maybe a policy server."""

    name: str
    mta: PostfixInstance
    sink: SmtpSink
    batches: list[dict[str, Any]] = field(default_factory=list)
    #: Mail from the Internet to our users on port 25 (no AUTH), not submission.
    inbound: bool = False


def _client(mta: PostfixInstance, login: str, count: int, per_session: int, tag: str,
            outcome: dict[str, Any], lock: threading.Lock, inbound: bool = False) -> None:
    """Submit ``count`` messages as ``login``, ``per_session`` per SMTP session.

    ``inbound``: send from outside to our users on port 25 instead, without AUTH.
    """
    sender, domain = (f"news.{login}", "example.org") if inbound else (login, "example.net")
    message = (f"From: {sender}\r\nTo: someone@{domain}\r\nSubject: bench {tag}\r\n\r\n"
               + BODY.replace("\n", "\r\n")).encode()
    port, auth = (mta.inbound_port, None) if inbound else (mta.submission_port, (login, PASSWORD))
    sent = 0
    while sent < count:
        try:
            with mta.connect(port, auth) as client:
                for _ in range(min(per_session, count - sent)):
                    recipient = f"{tag}.{sent}@{domain}"
                    sent += 1
                    try:
                        client.sendmail(sender, [recipient], message)
                    except smtplib.SMTPRecipientsRefused as error:
                        with lock:
                            outcome["refused"] += 1
                            outcome.setdefault("example", str(error.recipients)[:200])
                        continue
                    with lock:
                        outcome["accepted"] += 1
        except (OSError, smtplib.SMTPException) as error:
            with lock:
                outcome["errors"] += 1
                outcome.setdefault("example", repr(error)[:200])
            sent += 1


def _cpu_ticks(cpu: int) -> list[int]:
    """The /proc/stat counters of CPU ``cpu``: user nice system idle iowait irq softirq steal ..."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            return [int(v) for v in line.split()[1:]]
    return [0] * 8


def cpu_busy(cpu: int) -> float:
    """Seconds CPU ``cpu`` has spent busy (not idle, not waiting for I/O) since boot."""
    ticks = _cpu_ticks(cpu)
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def cpu_steal(cpu: int) -> float:
    """Seconds the hypervisor has taken CPU ``cpu`` away from this machine since boot."""
    return _cpu_ticks(cpu)[7] / os.sysconf("SC_CLK_TCK")


def batch(setup: Setup, messages: int, clients: int, per_session: int, tag: str,
          server_cpu: int = 0, watched: dict[str, int] | None = None) -> dict[str, Any]:
    """Submit one batch and wait until the sink has every accepted message.

    Besides msg/s it reports the CPU time per delivered message spent on the
    server CPU (Postfix and whatever runs beside it) and by each ``watched``
    process (name: pid), so a cost shows even where msg/s is noisy.
    """
    watched = watched or {}
    busy_before = cpu_busy(server_cpu)
    processes_before = {name: cpu_seconds(pid) for name, pid in watched.items()}
    before = len(setup.sink.snapshot())
    outcome: dict[str, Any] = {"accepted": 0, "refused": 0, "errors": 0}
    lock = threading.Lock()
    shares = [messages // clients + (1 if i < messages % clients else 0) for i in range(clients)]
    threads = [
        threading.Thread(target=_client, name=f"bench-smtp-{i}", daemon=True,
                         args=(setup.mta, f"sender{i}@example.org", share, per_session,
                               f"{tag}-{i}", outcome, lock, setup.inbound))
        for i, share in enumerate(shares)
    ]
    started, cpu_before = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(BATCH_TIMEOUT)
    submitted = time.perf_counter() - started
    expected = before + outcome["accepted"]
    left = max(1.0, BATCH_TIMEOUT - submitted)
    delivered = len(setup.sink.wait_for(lambda d: len(d) >= expected, timeout=left)) - before
    elapsed = time.perf_counter() - started
    per_message = 1000 / max(1, delivered)
    cpu_ms = {name: round((cpu_seconds(pid) - processes_before[name]) * per_message, 3)
              for name, pid in watched.items()}
    return {
        "messages": messages,
        "accepted": outcome["accepted"],
        "refused": outcome["refused"],
        "errors": outcome["errors"],
        "delivered": delivered,
        "lost": outcome["accepted"] - delivered,
        "submit_seconds": round(submitted, 3),
        "seconds": round(elapsed, 3),
        "msg_per_s": round(delivered / elapsed, 1) if elapsed > 0 else 0.0,
        # Clients and sink share one CPU (and the GIL): near 1.0, they were the limit.
        "client_cpu": round((time.process_time() - cpu_before) / elapsed, 2) if elapsed > 0 else 0.0,
        "server_cpu_ms_per_msg": round((cpu_busy(server_cpu) - busy_before) * per_message, 3),
        "cpu_ms_per_msg": cpu_ms,
        **({"example": outcome["example"]} if "example" in outcome else {}),
    }


def summary(setup: Setup) -> dict[str, Any]:
    """Median msg/s over the batches, and every batch's verdicts added up."""
    rates = [b["msg_per_s"] for b in setup.batches]
    total = {key: sum(b[key] for b in setup.batches)
             for key in ("messages", "accepted", "refused", "errors", "delivered", "lost")}
    try:
        log = setup.mta.maillog.read_text(encoding="utf-8", errors="replace")
    except OSError:
        log = ""
    # With milter_default_action=accept a failing milter would let mail
    # through unscored and look fast: its warnings are counted.
    milter_warnings = [line for line in log.splitlines() if "milter" in line and
                       ("warning:" in line or "error:" in line)]
    return {
        "target": setup.name,
        "milter_warnings": len(milter_warnings),
        **({"milter_warning": milter_warnings[0][-300:]} if milter_warnings else {}),
        "msg_per_s": round(statistics.median(rates), 1) if rates else 0.0,
        "server_cpu_ms_per_msg": round(statistics.median(
            b["server_cpu_ms_per_msg"] for b in setup.batches), 3) if rates else 0.0,
        "cpu_ms_per_msg": {name: round(statistics.median(b["cpu_ms_per_msg"][name] for b in setup.batches), 3)
                           for name in (setup.batches[0]["cpu_ms_per_msg"] if setup.batches else {})},
        "msg_per_s_runs": rates,
        **total,
        "batches": setup.batches,
    }


def measure(policy_server: Callable[[], AbstractContextManager[int]], *, messages: int = 1000,
            clients: int = 10, per_session: int = 10, rounds: int = 3,
            milter: Callable[[], AbstractContextManager[str]] | None = None,
            floor: Callable[[], AbstractContextManager[int]] | None = None,
            floor_milter: Callable[[], AbstractContextManager[str]] | None = None,
            server_cpu: int = 0, watched: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """msg/s for Postfix alone, with the policy check, and (given ``milter``) with the milter too.

    With the milter, two more configurations take mail from the Internet on
    port 25 (no AUTH, to our users), where the recommended configuration puts
    the milter: Postfix alone, and with the reputation check and the milter.

    :param policy_server: starts ``policyd serve`` (pinned to ``server_cpu``);
        yields its port.  It scores port-25 clients too.
    :param milter: starts ``policyd milter``; yields the ``smtpd_milters``
        value.  None when there is no milter to measure.
    :param floor: starts the raw Twisted responder that answers DUNNO to
        every policy request; yields its port.  With it, a configuration
        shows what any Twisted policy server costs Postfix.
    :param floor_milter: starts the raw Twisted milter that accepts every
        message; yields the ``smtpd_milters`` value.  With it (and no policy
        server), a configuration shows what any milter on Twisted costs
        Postfix, its own milter handling included.
    :param watched: processes (name: pid, filled in as they start) whose CPU
        time per message each batch reports.
    """
    users = {f"sender{i}@example.org": PASSWORD for i in range(clients)}
    roots: list[Path] = []
    setups: list[Setup] = []
    summaries: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:

        def postfix(name: str, inbound: bool = False, **options: Any) -> None:
            sink = SmtpSink().start()
            stack.callback(sink.stop)
            root = Path(tempfile.mkdtemp(prefix="policyd-bench-postfix-"))
            roots.append(root)
            mta = PostfixInstance(root, sink_port=sink.port, users=users, **options)
            stack.callback(mta.stop)
            with pinned(server_cpu):
                mta.start()
            setups.append(Setup(name, mta, sink, inbound=inbound))

        try:
            postfix("postfix alone")
            floor_port = None
            if floor is not None:
                floor_port = stack.enter_context(floor())
                postfix(FLOOR_POLICY_ROW, policy_port=floor_port)
            port = stack.enter_context(policy_server())
            postfix("postfix + policyd policy", policy_port=port)
            if floor_milter is not None:
                floor_milters = stack.enter_context(floor_milter())
                postfix(FLOOR_MILTER_ROW, milters=floor_milters)
                if floor_port is not None:
                    postfix(FLOOR_PAIR_ROW, policy_port=floor_port, milters=floor_milters)
            if milter is not None:
                milters = stack.enter_context(milter())
                postfix(FULL_ROW, policy_port=port, milters=milters)
                postfix(INBOUND_ALONE_ROW, inbound=True)
                postfix(INBOUND_FULL_ROW, inbound=True, policy_port=port, milters=milters)
            for number in range(rounds):
                for setup in setups:
                    setup.batches.append(batch(setup, messages, clients, per_session,
                                               f"r{number}", server_cpu, watched))
            summaries = [summary(setup) for setup in setups]
        finally:
            stack.close()
            for root in roots:
                shutil.rmtree(root, ignore_errors=True)
    return summaries
