"""The redis backend's two ways of running its Lua code: a library of
functions (FCALL, Redis 7 and later) and a script (EVALSHA, older
servers), on throwaway redis-server processes.

Each test that runs both takes the `functions` parameter, and compares
values, not only that no error was raised.
"""

import pytest

import mqs
from mqs.broker import _redis

redis = pytest.importorskip("redis")

BOTH_WAYS = pytest.mark.parametrize("functions", [True, False],
                                    ids=["fcall", "evalsha"])


def _exceed_maxmemory(admin):
    """Set the maxmemory of the server of client `admin` to half its used
    memory, with the noeviction policy, so that the server rejects every
    command that can add data."""
    admin.config_set("maxmemory-policy", "noeviction")
    used = admin.info("memory")["used_memory"]
    admin.config_set("maxmemory", used // 2)


@BOTH_WAYS
def test_declare_existing_topic_out_of_memory(redis_server_factory,
                                              monkeypatch, functions):
    """Declaring an existing topic only reads its stored settings, so a
    server above its maxmemory still runs it. Declaring a new topic, or
    replacing the settings, fails with BackendOutOfMemory."""
    monkeypatch.setattr(_redis.RedisBackend, "_use_functions", functions)
    server = redis_server_factory()
    broker = mqs.Broker(backend="redis", url=server.url, retry_timeout=2)
    admin = redis.Redis.from_url(server.url)
    try:
        declared = broker.declare_topic("t", max_attempts=4)
        _exceed_maxmemory(admin)
        again = broker.declare_topic("t", max_attempts=4)
        assert again == declared
        assert again.max_attempts == 4
        with pytest.raises(mqs.TopicConfigError):
            broker.declare_topic("t", max_attempts=5)
        with pytest.raises(mqs.BackendOutOfMemory):
            broker.declare_topic("t", max_attempts=5, replace=True)
        with pytest.raises(mqs.BackendOutOfMemory):
            broker.declare_topic("new")
        assert not broker.backend.has_topic("new")
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
        broker.close()

