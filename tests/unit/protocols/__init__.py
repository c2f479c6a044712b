"""Unit tests of :mod:`policyd.protocols`."""
