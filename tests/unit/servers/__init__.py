"""Unit tests of :mod:`policyd.servers`."""
