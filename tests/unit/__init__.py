"""Unit tests, in memory, mirroring the package layout."""
