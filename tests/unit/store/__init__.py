"""Unit tests of :mod:`policyd.store`."""
