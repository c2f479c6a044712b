"""Reactor installation: Twisted on asyncio, so redis.asyncio runs beside it."""

from __future__ import annotations

import asyncio
import sys
from typing import Any


def install_reactor() -> Any:
    """Install Twisted's asyncio reactor (once) and return the running reactor.

    Must run before anything imports ``twisted.internet.reactor``.
    """
    if "twisted.internet.reactor" not in sys.modules:
        from twisted.internet import asyncioreactor

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        asyncioreactor.install(loop)
    from twisted.internet import reactor

    return reactor
