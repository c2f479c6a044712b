"""Test harness: real Postfix, Redis, DNS zone, SMTP sink and browser, started and stopped by the tests."""
