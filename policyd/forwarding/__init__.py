"""Forwarding that keeps the service trusted: which recipients forward, spam held, checks on arrival, ARC seals.

- :mod:`policyd.forwarding.aliases`: ``forwarding.aliases`` (a virtual(5)
  file or a Postfix table), resolved through nested aliases into outside
  and local targets; a forwarding recipient has at least one outside one.
- :mod:`policyd.tables`: asking a Postfix table with ``postmap -q``.
- :mod:`policyd.forwarding.arc`: ARC keys and seals (dkimpy).
- :mod:`policyd.forwarding.sealing`: the milter's ARC step.
- :mod:`policyd.forwarding.authentication`: SPF, DKIM and DMARC checked on
  arrival, told in Authentication-Results (and in the ARC set);
  :mod:`policyd.forwarding.dmarc` (policy, organisational domain,
  alignment) and :mod:`policyd.forwarding.lookups` (cached twisted.names
  look-ups within one deadline) serve it.
"""
