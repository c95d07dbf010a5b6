"""The redis backend's two ways of running its Lua code: a library of
functions (FCALL, Redis 7 and later) and a script (EVALSHA, older
servers), on throwaway redis-server processes.

Each test that runs both takes the `functions` parameter, and compares
values, not only that no error was raised.
"""

import logging
import os
import re
import time
import uuid

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

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


def test_library_lost_while_out_of_memory(redis_server_factory, caplog):
    """A library lost while the server is above its maxmemory cannot be
    loaded again, because FUNCTION LOAD adds data. The broker then runs
    EVALSHA and logs it, and loads the library again once memory is
    back."""
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
        assert broker.backend._library_retry_at > time.monotonic() + 20

        admin.config_set("maxmemory", 0)
        # The retry period (30 s) passed.
        broker.backend._library_retry_at = time.monotonic()
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


def test_library_lost_again_after_reload(redis_server_factory,
                                         monkeypatch):
    """A library removed again between its reload and the call (two
    FUNCTION FLUSH or restarts close together) is loaded once more, and
    the operation succeeds. One that keeps going away fails the
    operation with the server's error."""
    server = redis_server_factory()
    broker = mqs.Broker(backend="redis", url=server.url, retry_timeout=2)
    admin = redis.Redis.from_url(server.url)
    backend = broker.backend
    load = backend._load_library
    loads = []

    def load_then_flush(flushes):
        def run():
            load()
            loads.append(True)
            if len(loads) <= flushes:
                admin.function_flush()
        return run

    try:
        consumer = broker.consume("t", "g")
        broker.publish("t", b"one")
        admin.function_flush()
        monkeypatch.setattr(backend, "_load_library", load_then_flush(2))
        message = consumer.get(timeout=5)
        assert message.body == b"one"
        assert message.ack()
        assert len(loads) == 3
        assert _library_names(admin) == [backend._library]

        loads.clear()
        admin.function_flush()
        monkeypatch.setattr(backend, "_load_library", load_then_flush(10))
        with pytest.raises(redis.ResponseError, match="Function not found"):
            broker.publish("t", b"two")
        assert len(loads) == 3
        monkeypatch.setattr(backend, "_load_library", load)
    finally:
        admin.close()
        broker.close()


def test_failed_library_retry_keeps_evalsha(redis_server_factory,
                                            monkeypatch, caplog):
    """A retry of FUNCTION LOAD that fails with an error other than OOM
    leaves the operation running through EVALSHA, logs the error and is
    tried again after another period, which then loads the library."""
    server = redis_server_factory()
    broker = mqs.Broker(backend="redis", url=server.url, retry_timeout=2)
    admin = redis.Redis.from_url(server.url)
    try:
        library = broker.backend._library
        consumer = broker.consume("t", "g", prefetch=10)
        broker.publish_many("t", [b"a", b"b", b"c"])
        _exceed_maxmemory(admin)
        admin.function_flush()
        message = consumer.get(timeout=5)
        assert message.body == b"a"
        assert message.ack()
        assert broker.backend._library is None
        admin.config_set("maxmemory", 0)

        client = broker.backend._client
        load = client.function_load
        failures = []

        def fail_once(code):
            if not failures:
                failures.append(code)
                raise redis.ResponseError("ERR simulated failure")
            return load(code)

        monkeypatch.setattr(client, "function_load", fail_once)
        caplog.set_level(logging.WARNING, logger="mqs.broker._redis")
        broker.backend._library_retry_at = time.monotonic()
        message = consumer.get(timeout=5)
        assert message.body == b"b"
        assert message.ack()
        assert len(failures) == 1
        assert broker.backend._library is None
        assert "simulated failure" in caplog.text

        broker.backend._library_retry_at = time.monotonic()
        message = consumer.get(timeout=5)
        assert message.body == b"c"
        assert message.ack()
        assert broker.backend._library == library
        assert _library_names(admin) == [library]
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
        broker.close()

@pytest.mark.parametrize("denied, reason", [
    ("-function", "does not take FUNCTION LOAD"),
    ("-fcall", "denies FCALL")], ids=["function", "fcall"])
def test_denied_acl_uses_evalsha(redis_server_factory, caplog, denied,
                                 reason):
    """A user whose ACL denies FUNCTION, or allows FUNCTION LOAD but
    denies FCALL, gets every operation through EVALSHA, with the reason
    logged once at INFO."""
    server = redis_server_factory()
    admin = redis.Redis.from_url(server.url)
    admin.acl_setuser("limited", enabled=True, passwords=["+secret"],
                      keys=["*"], channels=["*"],
                      commands=["+@all", denied])
    url = server.url.replace("redis://", "redis://limited:secret@", 1)
    caplog.set_level(logging.INFO, logger="mqs.broker._redis")
    broker = mqs.Broker(backend="redis", url=url)
    try:
        consumer = broker.consume("t", "g")
        admin.config_resetstat()
        broker.publish_many("t", [b"one", b"two"])
        for body in (b"one", b"two"):
            message = consumer.get(timeout=5)
            assert message.body == body
            assert message.ack()
        assert broker.backend._library is None
        records = [record for record in caplog.records
                   if reason in record.getMessage()]
        assert len(records) == 1
        assert records[0].levelno == logging.INFO
        assert "cmdstat_evalsha" in admin.info("commandstats")
        assert broker.stats("t")["acked"] == 2
    finally:
        admin.close()
        broker.close()


def test_library_reloaded_after_function_flush(redis_server_factory):
    """Operations run as FCALL of the library that the broker loaded, and
    a server that lost the library (FUNCTION FLUSH, or a restart without
    persistence) gets it again at the next call, which then succeeds."""
    server = redis_server_factory()
    broker = mqs.Broker(backend="redis", url=server.url)
    admin = redis.Redis.from_url(server.url)
    try:
        library = broker.backend._library
        assert library is not None and library.startswith("mqs_")
        consumer = broker.consume("t", "g")
        admin.config_resetstat()
        broker.publish("t", b"one")
        calls = admin.info("commandstats")
        assert calls["cmdstat_fcall"]["calls"] == 1
        assert "cmdstat_evalsha" not in calls

        admin.function_flush()
        assert _library_names(admin) == []
        broker.publish("t", b"two")
        assert _library_names(admin) == [library]
        for body in (b"one", b"two"):
            message = consumer.get(timeout=5)
            assert message.body == body
            assert message.ack()
    finally:
        admin.close()
        broker.close()


def test_allow_oom_ops_match_script():
    """The client's list of operations that a server above its
    maxmemory runs is the script's MAY_EXCEED_MAXMEMORY table."""
    source = _redis._load_script()
    table = re.search(r"local MAY_EXCEED_MAXMEMORY = \{(.*?)\}", source,
                      re.S).group(1)
    names = set(re.findall(r"(\w+) = true", table))
    assert names == set(_redis._MAY_EXCEED_MAXMEMORY)


# The registration of another mqs version: the same Lua body, but its
# allow-oom function lacks the flag.
_OTHER_FUNCTIONS = (
    "redis.register_function{{function_name='{name}', "
    "callback=function(keys, args) "
    "return run_call(keys, args, false) end}}\n"
    "redis.register_function{{function_name='{name}_oom', "
    "callback=function(keys, args) "
    "return run_call(keys, args, true) end}}\n")


def test_library_name_covers_registration(redis_server_factory,
                                          monkeypatch):
    """A library with the same Lua body but other functions or flags, as
    another mqs version may register, gets a name of its own. A broker
    never calls the other's functions: here the other's allow-oom
    function has no flag, so its gets would fail above maxmemory."""
    server = redis_server_factory()
    admin = redis.Redis.from_url(server.url)
    with monkeypatch.context() as patch:
        patch.setattr(_redis, "_LIBRARY_FUNCTIONS", _OTHER_FUNCTIONS,
                      raising=False)
        other = mqs.Broker(backend="redis", url=server.url,
                           retry_timeout=2)
    broker = mqs.Broker(backend="redis", url=server.url, retry_timeout=2)
    try:
        assert broker.backend._library != other.backend._library
        assert sorted(_library_names(admin)) == sorted(
            [broker.backend._library, other.backend._library])
        consumer = broker.consume("t", "g")
        broker.publish("t", b"one")
        _exceed_maxmemory(admin)
        message = consumer.get(timeout=5)
        assert message.body == b"one"
        assert message.ack()
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
        broker.close()
        other.close()

# FCALL against EVALSHA. A library function keeps the file's upvalues
# between calls, and begin_call resets the per-call state. A reset it
# misses would carry one call's buffers or caches into the next call,
# which may be of another topic or group, or come after an error.

_TOPICS = ("t0", "t1")
_GROUPS = ("g", "h")
_COMPARED = ("published", "delivered", "acked", "nacked", "redelivered",
             "late_acks", "dead_lettered", "redriven", "stored", "ready",
             "in_flight", "dlq", "groups")

_steps = st.lists(st.one_of(
    st.tuples(st.just("publish"), st.sampled_from(_TOPICS),
              st.integers(0, 9), st.sampled_from([None, None, "a", "b"]),
              st.integers(1, 3)),
    st.tuples(st.just("fetch"), st.integers(0, 3), st.integers(1, 5)),
    st.tuples(st.just("ack"), st.integers(0, 30)),
    st.tuples(st.just("nack"), st.integers(0, 30), st.booleans()),
    st.tuples(st.just("release"), st.integers(0, 30)),
    st.tuples(st.just("close"), st.integers(0, 3)),
    st.tuples(st.just("redrive"), st.sampled_from(_TOPICS)),
    st.tuples(st.just("replace"), st.sampled_from(_TOPICS),
              st.integers(1, 4)),
    st.tuples(st.just("error"), st.integers(0, 4),
              st.sampled_from(_TOPICS)),
    st.tuples(st.just("missing"),),
    st.tuples(st.just("stats"), st.sampled_from(_TOPICS)),
), min_size=10, max_size=40)


class _Side:
    """One broker, in its own namespace, with a consumer per topic and
    group and the messages that they got and did not settle."""

    def __init__(self, broker):
        self.broker = broker
        for topic in _TOPICS:
            broker.declare_topic(topic, weights={9: 3, 4: 2, 0: 1},
                                 max_attempts=3)
        self.consumers = [self._open(topic, group)
                          for topic in _TOPICS for group in _GROUPS]
        self.unsettled = []
        self.serial = 0

    def _open(self, topic, group):
        return self.broker.consume(topic, group, prefetch=4,
                                   ack_timeout=600)

    def _error(self, kind, topic):
        """Run a call that the script rejects, and return the error's
        type: an unknown operation, bad arguments (MQS_BUG), a Lua runtime
        error, or a consumer the server does not know."""
        backend = self.broker.backend
        consumer = self.consumers[_TOPICS.index(topic) * len(_GROUPS)]
        calls = [
            ("nosuch", "g"),
            ("ack_many", "g", 3, "1-1:1", "0"),
            # Lua runtime errors after the timers fired: a nil command
            # argument, and math.min of a nil limit.
            ("release", "g", 2, "1-1", "1"),
            ("fetch", "g", consumer._id, "x", 1000, 0, 0, "", ""),
            ("fetch", "g", "unknown", 5, 1000, 0, 0, "", ""),
        ]
        try:
            backend._run(topic, *calls[kind])
        except Exception as exc:
            return type(exc).__name__
        return None

    def apply(self, step):
        kind = step[0]
        broker = self.broker
        if kind == "publish":
            bodies = []
            for _ in range(step[4]):
                self.serial += 1
                bodies.append(b"%d" % self.serial)
            broker.publish_many(step[1], bodies, priority=step[2],
                                key=step[3])
            return None

        if kind == "fetch":
            consumer = self.consumers[step[1]]
            try:
                got = consumer.get_many(step[2], timeout=0)
            except mqs.Empty:
                return []
            self.unsettled += got
            return [(message.topic, message.group, message.body,
                     message.attempts) for message in got]

        if kind in ("ack", "nack", "release"):
            if not self.unsettled:
                return None
            message = self.unsettled.pop(step[1] % len(self.unsettled))
            if kind == "ack":
                return message.ack()
            if kind == "nack":
                return message.nack(requeue=step[2], delay=0)
            return broker.backend.release(message.topic,
                                          message._consumer.group,
                                          [message._delivery.tag])

        if kind == "close":
            consumer = self.consumers[step[1]]
            self.unsettled = [message for message in self.unsettled
                              if message._consumer is not consumer]
            returned = consumer.close(drain=False)
            self.consumers[step[1]] = self._open(consumer.topic,
                                                 consumer.group)
            return returned

        if kind == "redrive":
            return broker.dlq_redrive(step[1])

        if kind == "replace":
            broker.declare_topic(step[1], weights={9: 3, 4: 2, 0: 1},
                                 max_attempts=step[2], replace=True)
            return None

        if kind == "error":
            return self._error(step[1], step[2])

        if kind == "missing":
            with pytest.raises(mqs.UnknownTopic):
                broker.stats("missing")
            return None

        stats = broker.stats(step[1])
        return {name: stats[name] for name in _COMPARED}


@settings(max_examples=int(25 * float(os.environ.get("MQS_TEST_SCALE",
                                                     "1"))),
          deadline=None,
          suppress_health_check=[HealthCheck.too_slow,
                                 HealthCheck.function_scoped_fixture])
@given(_steps)
def test_fcall_matches_evalsha(redis_url, steps):
    """Random operations on two topics with two groups each, with calls
    that the script rejects between them, return the same values through
    the library as through EVALSHA, and leave the same counters."""
    namespaces = [f"mqs-test-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    sides = []
    try:
        for functions, namespace in zip((True, False), namespaces):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(_redis.RedisBackend, "_use_functions",
                              functions)
                broker = mqs.Broker(backend="redis", url=redis_url,
                                    namespace=namespace)
            sides.append(broker)
            assert (broker.backend._library is not None) is functions
        sides = [_Side(broker) for broker in sides]
        library, script = sides
        for index, step in enumerate(steps):
            expected = script.apply(step)
            got = library.apply(step)
            assert got == expected, (index, step)
        for topic in _TOPICS:
            assert library.apply(("stats", topic)) \
                == script.apply(("stats", topic))
    finally:
        client = redis.Redis.from_url(redis_url)
        for side in sides:
            broker = side.broker if isinstance(side, _Side) else side
            broker.close()
        for namespace in namespaces:
            keys = list(client.scan_iter(match=f"{{{namespace}:*"))
            if keys:
                client.unlink(*keys)
        client.close()
