"""Unit tests of :mod:`policyd.quarantine`."""
