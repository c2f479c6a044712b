"""Test fixtures shared by every test module.

pytest-twisted installs the asyncio reactor (``--reactor=asyncio`` in
pyproject.toml) before any test imports Twisted's reactor.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from policyd import config as configuration
from tests.harness.postfix import postfix_factory, smtp_sink  # noqa: F401  (fixtures for every test module)


@pytest.fixture
def write_config(tmp_path: Path) -> Iterator[object]:
    """Write a configuration file from text and return its path."""

    def write(text: str, name: str = "policyd.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    yield write


def make_config(text: str = "") -> configuration.Config:
    """A validated configuration from YAML text."""
    return configuration.load_text(text, "test.yaml")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under ``tests/integration/`` as ``integration``, so ``-m "not integration"`` is the fast half."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)
