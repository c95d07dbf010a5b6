"""Fixtures of the broker tests: one factory per backend.

The contract suite (test_broker_contract.py) runs once per entry of
`BACKEND_FACTORIES`. A new backend joins it by adding a factory that
returns a fresh, empty `mqs.Broker` and cleans up after the test.
"""

import contextlib

import pytest

import mqs


@contextlib.contextmanager
def _memory_broker(tmp_path):
    broker = mqs.Broker(backend="memory")
    try:
        yield broker
    finally:
        broker.close()


@contextlib.contextmanager
def _log_broker(tmp_path):
    # Small segments: every test opens a log, and each preallocates one.
    broker = mqs.Broker(backend="log", path=tmp_path / "broker",
                        segment_bytes=1 << 20)
    try:
        yield broker
    finally:
        broker.close()


# name -> context manager factory taking pytest's tmp_path.
BACKEND_FACTORIES = {
    "memory": _memory_broker,
    "log": _log_broker,
}


@pytest.fixture(params=sorted(BACKEND_FACTORIES))
def broker(request, tmp_path):
    """Return a fresh broker on each backend of `BACKEND_FACTORIES`."""
    with BACKEND_FACTORIES[request.param](tmp_path) as fresh:
        yield fresh
