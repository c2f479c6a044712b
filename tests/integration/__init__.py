"""Integration tests: real Postfix, Redis, DNS, SMTP sink, browser and policyd processes on loopback."""
