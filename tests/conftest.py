"""Fixtures shared by the mqs test suite."""

import os

import pytest


@pytest.fixture
def scale():
    """Return the size factor of stress tests, read from MQS_TEST_SCALE.

    The default, 1, sizes them for CI on 2 cores; larger values run more
    items and allow proportionally more time.
    """
    raw = os.environ.get("MQS_TEST_SCALE", "1")
    try:
        value = float(raw)
    except ValueError:
        raise pytest.UsageError(
            f"MQS_TEST_SCALE must be a positive number, got {raw!r}") from None
    if not value > 0:
        raise pytest.UsageError(
            f"MQS_TEST_SCALE must be a positive number, got {raw!r}")
    return value
