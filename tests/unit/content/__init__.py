"""Unit tests of :mod:`policyd.content`."""
