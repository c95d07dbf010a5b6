"""The redis backend's two ways of running its Lua code: a library of
functions (FCALL, Redis 7 and later) and a script (EVALSHA, older
servers), on throwaway redis-server processes.

Each test that runs both takes the `functions` parameter, and compares
values, not only that no error was raised.
"""

import logging
import time

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


def _library_names(admin):
    """Return the names of the libraries loaded on the server, as str."""
    names = []
    for entry in admin.function_list():
        if not isinstance(entry, dict):
            # RESP2: a flat list of names and values.
            entry = dict(zip(entry[::2], entry[1::2]))
        name = entry.get(b"library_name", entry.get("library_name"))
        names.append(name.decode() if isinstance(name, bytes) else name)
    return names


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


@BOTH_WAYS
def test_broker_opens_while_out_of_memory(redis_server_factory,
                                          monkeypatch, functions):
    """A broker made while the server is above its maxmemory uses the
    library that the server has, and its consumers drain the topic."""
    monkeypatch.setattr(_redis.RedisBackend, "_use_functions", functions)
    server = redis_server_factory()
    first = mqs.Broker(backend="redis", url=server.url, retry_timeout=2)
    admin = redis.Redis.from_url(server.url)
    second = None
    try:
        first.declare_topic("t")
        first.consume("t", "g")
        first.publish_many("t", [b"a", b"b", b"c"])
        _exceed_maxmemory(admin)

        second = mqs.Broker(backend="redis", url=server.url,
                            retry_timeout=2)
        assert second.backend._library == first.backend._library
        assert second.declare_topic("t").name == "t"
        consumer = second.consume("t", "g", prefetch=10)
        messages = consumer.get_many(10, timeout=5)
        assert [message.body for message in messages] == [b"a", b"b", b"c"]
        assert consumer.ack_many(messages) == 3
        assert second.stats("t")["acked"] == 3
        with pytest.raises(mqs.BackendOutOfMemory):
            second.publish("t", b"d")
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
        first.close()
        if second is not None:
            second.close()


def test_library_lost_while_out_of_memory(redis_server_factory,
                                          monkeypatch, caplog):
    """A library lost while the server is above its maxmemory cannot be
    loaded again, because FUNCTION LOAD adds data. The broker then runs
    EVALSHA and logs it, and loads the library again once memory is
    back."""
    monkeypatch.setattr(_redis, "_LIBRARY_RETRY_S", 0.5)
    server = redis_server_factory()
    broker = mqs.Broker(backend="redis", url=server.url, retry_timeout=2)
    admin = redis.Redis.from_url(server.url)
    try:
        library = broker.backend._library
        assert library is not None
        consumer = broker.consume("t", "g", prefetch=10)
        broker.publish_many("t", [b"a", b"b"])
        _exceed_maxmemory(admin)
        admin.function_flush()
        caplog.set_level(logging.WARNING, logger="mqs.broker._redis")

        message = consumer.get(timeout=5)
        assert message.body == b"a"
        assert message.ack()
        assert broker.backend._library is None
        assert _library_names(admin) == []
        records = [record for record in caplog.records
                   if "rejected FUNCTION LOAD" in record.getMessage()]
        assert len(records) == 1
        assert "EVALSHA" in records[0].getMessage()

        admin.config_set("maxmemory", 0)
        time.sleep(0.6)
        admin.config_resetstat()
        message = consumer.get(timeout=5)
        assert message.body == b"b"
        assert message.ack()
        assert broker.backend._library == library
        assert _library_names(admin) == [library]
        calls = admin.info("commandstats")
        assert calls["cmdstat_fcall"]["calls"] >= 2
        assert "cmdstat_evalsha" not in calls
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
        broker.close()
