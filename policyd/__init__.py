"""policyd: a mail-policy service for Postfix.

Outbound quota and blocks for authenticated senders, inbound network
reputation and content scoring, with admin commands to run it all.
"""

__version__ = "0.1.0"
