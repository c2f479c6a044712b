"""Unit tests of :mod:`policyd.checks`."""
