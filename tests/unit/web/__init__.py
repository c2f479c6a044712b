"""Unit tests of :mod:`policyd.web`."""
