"""Scales every test's time limit by ``OFFLOAD_DIST_TEST_TIME_SCALE`` (see dist_harness.time_scale).

A test's limit is its ``@pytest.mark.timeout`` (or the ``timeout`` in pyproject.toml), times
the factor; slow or loaded machines set a larger one instead of editing tests.
"""

from __future__ import annotations

import pytest

from dist_harness import scaled


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Replaces each test's timeout by the scaled one (the closest marker, else the ini default)."""
    default = float(config.getini("timeout") or 0)
    for item in items:
        marker = item.get_closest_marker("timeout")
        base = float(marker.args[0]) if marker is not None and marker.args else default
        if base > 0:
            item.add_marker(pytest.mark.timeout(scaled(base)), append=False)
