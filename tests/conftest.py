"""Fixtures shared by the mqs test suite."""

import os
import uuid

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


# ---- Redis ------------------------------------------------------------------

def redis_unavailable(reason):
    """Skip the test for lack of Redis, or fail it when CI is set.

    CI must run every Redis test, so there a missing server or client is
    an error of the CI setup, not a reason to skip.
    """
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI is set, so the Redis tests fail instead "
                    f"of being skipped", pytrace=False)
    pytest.skip(reason)


def _redis_module():
    try:
        import redis
    except ImportError:
        redis_unavailable("redis-py is not installed (pip install -e "
                          "'.[test]')")
    return redis


@pytest.fixture(scope="session")
def redis_url():
    """Return the URL of a Redis server the tests may write to.

    MQS_REDIS_URL, when set, names it (.ci/run starts one and sets it).
    Otherwise a throwaway redis-server is started on 127.0.0.1 for the
    session and stopped after it. Without either, the tests that use
    this fixture are skipped (or fail when CI is set). Tests share the
    server: use keys unique to the test (see `redis_key_prefix`).
    """
    url = os.environ.get("MQS_REDIS_URL")
    if url:
        yield url
        return
    from mqs._redis_server import RedisServer, find_redis_server

    if find_redis_server() is None:
        redis_unavailable(
            "no redis-server binary on PATH (Debian: apt-get install "
            "redis-server) and MQS_REDIS_URL is not set")
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def redis_key_prefix():
    """Return a key prefix unique to this test, like ``mqs-test:<id>:``."""
    return f"mqs-test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def redis_client(redis_url, redis_key_prefix):
    """Return a redis-py client of `redis_url`; deletes the test's keys.

    Keys that start with `redis_key_prefix` are deleted after the test.
    """
    redis = _redis_module()
    client = redis.Redis.from_url(redis_url)
    yield client
    keys = list(client.scan_iter(match=f"{redis_key_prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def redis_server_factory():
    """Return a function that starts a throwaway `RedisServer`.

    It takes the keyword arguments of `mqs._redis_server.RedisServer`
    (appendfsync, password, config) and returns the started server,
    which the test may kill, restart or stop; every server it started is
    stopped after the test. Skips (fails under CI) without a
    redis-server binary.
    """
    from mqs._redis_server import RedisServer, find_redis_server

    if find_redis_server() is None:
        redis_unavailable("no redis-server binary on PATH (Debian: apt-get "
                          "install redis-server)")
    servers = []

    def start(**options):
        server = RedisServer(**options)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
