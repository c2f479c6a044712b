"""Forwarding that keeps the service trusted: which recipients forward, spam held, ARC seals.

- :mod:`policyd.forwarding.aliases`: ``forwarding.aliases`` (a virtual(5)
  file or a Postfix table), resolved through nested aliases into outside
  and local targets; a forwarding recipient has at least one outside one.
- :mod:`policyd.tables`: asking a Postfix table with ``postmap -q``.
- :mod:`policyd.forwarding.arc`: ARC keys and seals (dkimpy).
"""
