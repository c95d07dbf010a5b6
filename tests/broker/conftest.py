"""Fixtures of the broker tests: one factory per backend.

The contract suite (test_broker_contract.py) runs once per entry of
`BACKEND_FACTORIES`. A new backend joins it by adding a factory that
returns a fresh, empty `mqs.Broker` and cleans up after the test.
"""

import contextlib
import os
import uuid

import pytest

import mqs
from mqs.broker._redis import RedisBackend


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


@contextlib.contextmanager
def _shm_broker(tmp_path):
    # A name of its own per test; a small journal, so that tests wrap it.
    name = f"test-{os.getpid()}-{tmp_path.name}"
    mqs.Broker.unlink(name)
    broker = mqs.Broker(backend="shm", name=name, journal_bytes=1 << 20)
    try:
        yield broker
    finally:
        broker.close()
        mqs.Broker.unlink(name)


@contextlib.contextmanager
def _redis_broker(tmp_path, request, functions=True):
    # The suite's bodies are ints, tuples and objects, so the broker
    # pickles them.
    url = request.getfixturevalue("redis_url")
    namespace = request.getfixturevalue("redis_namespace")
    if not functions:
        # The EVALSHA path of servers before Redis 7.
        monkeypatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setattr(RedisBackend, "_use_functions", False)
    broker = mqs.Broker(backend="redis", url=url, serializer="pickle",
                        namespace=namespace)
    assert (broker.backend._library is None) is (not functions)
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def redis_namespace(redis_url):
    """Return a redis broker namespace unique to the test; its keys on
    `redis_url` are deleted after the test."""
    import redis

    namespace = f"mqs-test-{uuid.uuid4().hex[:12]}"
    yield namespace
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{{{namespace}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.unlink(*keys[start:start + 500])
    finally:
        client.close()


# name -> context manager factory taking pytest's tmp_path and request.
BACKEND_FACTORIES = {
    "memory": lambda tmp_path, request: _memory_broker(tmp_path),
    "log": lambda tmp_path, request: _log_broker(tmp_path),
    "redis": _redis_broker,
    "redis-eval": lambda tmp_path, request: _redis_broker(
        tmp_path, request, functions=False),
    "shm": lambda tmp_path, request: _shm_broker(tmp_path),
}


@pytest.fixture(params=sorted(BACKEND_FACTORIES))
def broker(request, tmp_path):
    """Return a fresh broker on each backend of `BACKEND_FACTORIES`."""
    with BACKEND_FACTORIES[request.param](tmp_path, request) as fresh:
        yield fresh


@pytest.fixture(params=["log", "shm"])
def core_broker(request, tmp_path):
    """Return a fresh broker on each backend with topic cores."""
    with BACKEND_FACTORIES[request.param](tmp_path, request) as fresh:
        yield fresh
