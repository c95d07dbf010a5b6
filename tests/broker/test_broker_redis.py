"""The redis backend against real redis-server processes.

The contract suite runs on it through conftest.py. These tests cover
what only Redis has: bodies as bytes, passwords, other processes,
server restarts, trimmed streams and dropped connections. Tests that
kill or restart a server start their own with `redis_server_factory`.
"""

import concurrent.futures
import asyncio
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import mqs
from mqs.broker import _redis
from loop_ticks import ticking
from test_broker_contract import FRAGILE, Fragile

redis = pytest.importorskip("redis")


@pytest.fixture
def namespace(redis_namespace):
    return redis_namespace


@pytest.fixture
def open_broker(redis_url, namespace):
    """Return a function that opens brokers on `redis_url` in the test's
    namespace; all are closed after the test."""
    brokers = []

    def open_one(url=None, **options):
        options.setdefault("namespace", namespace)
        broker = mqs.Broker(backend="redis", url=url or redis_url, **options)
        brokers.append(broker)
        return broker

    yield open_one
    for broker in brokers:
        broker.close()


def test_given_client_is_used(redis_url, namespace):
    client = redis.Redis.from_url(redis_url)
    broker = mqs.Broker(backend="redis", client=client, namespace=namespace)
    try:
        broker.publish("t", b"through the given client")
        message = broker.consume("t", "g").get(timeout=5)
        assert message.body == b"through the given client"
        message.ack()
    finally:
        broker.close()
        client.close()


def test_decoding_client_is_rejected(redis_url, namespace):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(ValueError,
                           match="decode_responses=False") as raised:
            mqs.Broker(backend="redis", client=client, namespace=namespace)
        assert "decodes replies to str" in str(raised.value)
    finally:
        client.close()


def test_client_with_url_is_rejected(redis_url, namespace):
    client = redis.Redis.from_url(redis_url)
    try:
        with pytest.raises(ValueError, match="not both") as raised:
            mqs.Broker(backend="redis", client=client, namespace=namespace,
                       url="redis://user:secret@127.0.0.1:1/0")
        message = str(raised.value)
        assert "url=" in message
        assert "client=" in message
        assert "secret" not in message
    finally:
        client.close()


# The min idle time of the backend's XAUTOCLAIM (CLAIM_IDLE_MS in
# _redis.lua): a delivery's PEL idle time reaches it at the ack deadline.
CLAIM_IDLE_MS = 10 ** 12


def lane_stream(namespace, topic, lane):
    return f"{{{namespace}:{topic}}}:s:{lane}"


# Bodies.

@pytest.mark.parametrize("body, expected", [
    (b"raw", b"raw"),
    (bytearray(b"array"), b"array"),
    (memoryview(b"view"), b"view"),
    ("text \u00e9", "text \u00e9"),
    (b"", b""),
])
def test_bodies_travel_as_bytes_or_str(open_broker, body, expected):
    broker = open_broker()
    broker.publish("t", body, headers={"n": 1}, key="k")
    message = broker.consume("t", "g").get(timeout=5)
    assert message.body == expected
    assert type(message.body) is type(expected)
    assert message.headers == {"n": 1}
    assert message.key == "k"


def test_object_body_needs_pickle_serializer(open_broker):
    broker = open_broker()
    with pytest.raises(TypeError, match="serializer='pickle'"):
        broker.publish("t", {"id": 1})
    with pytest.raises(TypeError, match="key must be a str, bytes or int"):
        broker.publish("t", b"x", key=("a", 1))


@pytest.mark.parametrize("field", ["body", "key", "dedup_id"])
def test_surrogate_str_raises_without_pickle(open_broker, field):
    broker = open_broker()
    broker.declare_topic("t")
    text = os.fsdecode(b"file-\xff")
    options = {"body": b"x", field: text}
    with pytest.raises(ValueError, match="lone surrogate at index 5") \
            as raised:
        broker.publish("t", **options)
    assert repr(text) in str(raised.value)
    assert "serializer='pickle'" in str(raised.value)
    assert broker.stats("t")["published"] == 0


def test_surrogate_str_pickled_with_pickle(open_broker):
    broker = open_broker(serializer="pickle")
    text = os.fsdecode(b"file-\xff") + "\ud800"
    broker.publish("t", text, key=text, dedup_id=text)
    broker.publish("t", text, key=text, dedup_id=text)
    message = broker.consume("t", "g").get(timeout=5)
    assert message.body == text
    assert message.key == text
    assert broker.stats("t")["published"] == 1
    assert broker.stats("t")["deduplicated"] == 1


@pytest.mark.parametrize("headers, named", [
    ({1: 2}, "the int key 1"),
    ({"outer": {("a", 1): "x"}}, "the tuple key ('a', 1)"),
    ({"pair": (1, 2)}, "headers['pair'] is a tuple"),
    ({"list": [1, {2.5}]}, "headers['list'][1] is a set"),
    ({"blob": b"raw"}, "headers['blob'] is a bytes"),
])
def test_headers_that_json_would_change_raise(open_broker, headers, named):
    """Without pickle, headers travel as JSON, which would turn an int key
    into a str and a tuple into a list: such headers raise TypeError
    naming the part, and nothing is published."""
    broker = open_broker()
    broker.declare_topic("t")
    with pytest.raises(TypeError, match=re.escape(named)) as raised:
        broker.publish("t", b"x", headers=headers)
    assert "serializer='pickle'" in str(raised.value)
    assert broker.stats("t")["published"] == 0
    exact = {"s": "x", "i": 1, "f": 2.5, "b": True, "n": None,
             "l": [1, "two", [3.0]], "d": {"k": {"deep": False}}}
    broker.publish("t", b"y", headers=exact)
    message = broker.consume("t", "g").get(timeout=5)
    assert message.headers == exact
    assert type(message.headers["l"]) is list


class _PickleFails:
    def __reduce__(self):
        raise RuntimeError("no pickle")


def test_pickle_error_in_second_chunk(open_broker):
    # 1000 messages fit in one script call, so the bad body is in the
    # second call's chunk.
    broker = open_broker(serializer="pickle")
    broker.declare_topic("t")
    with pytest.raises(TypeError, match="body of a message"):
        broker.publish_many("t", [*range(1000), _PickleFails()])
    assert broker.stats("t")["published"] == 0
    producer = broker.producer("t", linger=60, batch_size=2000)
    for body in [*range(1000), _PickleFails(), 1000]:
        producer.publish(body)
    assert len(producer.flush()) == 1001
    producer.close()
    assert producer.dropped == 1
    assert broker.stats("t")["published"] == 1001


def test_pickled_body_is_never_unpickled_without_option(open_broker):
    writer = open_broker(serializer="pickle")
    reader = open_broker()
    writer.publish("t", {"id": 1})
    message = reader.consume("t", "g").get(timeout=5)
    assert isinstance(message.body, bytes)
    assert message.ack()


def test_raw_pickled_body_warnings_rate_limited(open_broker, caplog):
    writer = open_broker(serializer="pickle")
    reader = open_broker()
    for number in range(12):
        writer.publish("t", {"id": number})
    consumer = reader.consume("t", "g", prefetch=12)
    with caplog.at_level("WARNING", logger="mqs.broker._redis"):
        messages = consumer.get_many(12, timeout=5)
    assert len(messages) == 12
    warnings = [record.getMessage() for record in caplog.records
                if "has a pickled body" in record.getMessage()]
    # The 1st and the 10th such body.
    assert len(warnings) == 2
    assert "(1 such bodies so far)" in warnings[0]
    assert "(10 such bodies so far)" in warnings[1]


def test_int_and_bytes_keys_round_trip(open_broker):
    broker = open_broker()
    broker.publish("t", b"a", key=7)
    broker.publish("t", b"b", key=b"\x00raw")
    consumer = broker.consume("t", "g", prefetch=2)
    keys = [message.key for message in consumer.get_many(2, timeout=5)]
    assert keys == [7, b"\x00raw"]


def test_topic_with_braces_rejected(open_broker):
    broker = open_broker()
    with pytest.raises(ValueError, match="braces"):
        broker.publish("a{b}", b"x")


def test_url_is_required():
    with pytest.raises(ValueError, match="needs url="):
        mqs.Broker(backend="redis")
    with pytest.raises(ValueError, match="non-empty str.*got int 5"):
        mqs.Broker(backend="redis", url=5)


@pytest.mark.parametrize("url, shown", [
    ("localhost:6379", "'localhost:6379'"),
    ("http://cache:6379/0", "'http://cache:6379/0'"),
    ("redis://cache:port/0", "'redis://cache:port/0'"),
    ("redis://app:secret@cache:70000/0", "'redis://app:***@cache:70000/0'"),
])
def test_invalid_url_names_url_and_form(url, shown):
    with pytest.raises(ValueError) as raised:
        mqs.Broker(backend="redis", url=url)
    message = str(raised.value)
    assert f"invalid Redis URL {shown}" in message
    assert "redis://[user:password@]host:port/db" in message
    assert "secret" not in message


@pytest.mark.parametrize("path", ["/abc", "/0x1", "/1.5"])
def test_url_path_must_be_database_number(path):
    url = f"redis://app:secret@cache:6379{path}"
    with pytest.raises(ValueError) as raised:
        mqs.Broker(backend="redis", url=url)
    message = str(raised.value)
    assert f"the path {path!r} is not a database number" in message
    assert "'redis://app:***@cache:6379" in message
    assert "secret" not in message


def test_url_database_out_of_range_named(redis_url):
    if not redis_url.startswith(("redis://", "rediss://")):
        pytest.skip("the test sets the database as the URL's path, which "
                    "a unix:// URL gives with ?db= instead")
    url = redis_url.rsplit("/", 1)[0] + "/99"
    with pytest.raises(ValueError) as raised:
        mqs.Broker(backend="redis", url=url)
    message = str(raised.value)
    assert "the server has no database 99" in message
    assert "'databases' setting" in message


@pytest.mark.parametrize("socket_timeout", [0, -1, float("nan"), "5", True])
def test_socket_timeout_checked(redis_url, socket_timeout):
    with pytest.raises(ValueError, match=(
            f"socket_timeout must be above 0 seconds, got "
            f"{re.escape(repr(socket_timeout))}")):
        mqs.Broker(backend="redis", url=redis_url,
                   socket_timeout=socket_timeout)


@pytest.mark.parametrize("retry_timeout", [-1, float("nan"), "30", True])
def test_retry_timeout_checked(retry_timeout):
    # Without a url: the check must come before the url check, and no
    # connection is tried.
    with pytest.raises(ValueError, match=(
            f"retry_timeout must be 0 or more seconds.*got "
            f"{re.escape(repr(retry_timeout))}")):
        mqs.Broker(backend="redis", retry_timeout=retry_timeout)


# Sharing between clients and processes.

def test_two_brokers_share_one_rate_limit(open_broker):
    first = open_broker()
    second = open_broker()
    # A token every 10 s: none comes back during the test.
    first.declare_topic("t", rate=mqs.Rate(0.1, burst=3))
    first.publish_many("t", [b"%d" % i for i in range(10)])
    one = first.consume("t", "g", auto_ack=True)
    two = second.consume("t", "g", auto_ack=True)
    got = one.get_many(2, timeout=0)
    got += two.get_many(10, timeout=0)
    assert len(got) == 3
    with pytest.raises(mqs.Empty):
        one.get(timeout=0)


_HOLDER = textwrap.dedent("""
    import sys, time
    import mqs
    url, namespace = sys.argv[1], sys.argv[2]
    broker = mqs.Broker(backend="redis", url=url, namespace=namespace)
    consumer = broker.consume("t", "g", prefetch=5, ack_timeout=1.0)
    got = consumer.get_many(5, timeout=30)
    print(" ".join(m.body.decode() for m in got), flush=True)
    time.sleep(600)
""")


def test_sigkilled_consumer_messages_redelivered(open_broker, redis_url,
                                                 namespace):
    broker = open_broker()
    broker.publish_many("t", [b"%d" % i for i in range(5)])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, redis_url, namespace],
        stdout=subprocess.PIPE, env=env)
    try:
        line = child.stdout.readline().decode().split()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert sorted(line) == ["0", "1", "2", "3", "4"]
    admin = redis.Redis.from_url(redis_url)
    lane = lane_stream(namespace, "t", 0)
    # The dead consumer still owns the entries, each delivered once, with
    # a PEL idle time that reaches CLAIM_IDLE_MS at its ack deadline.
    held = admin.xpending_range(lane, "g", "-", "+", 10)
    assert len(held) == 5
    assert {entry["times_delivered"] for entry in held} == {1}
    for entry in held:
        assert CLAIM_IDLE_MS - 1000 <= entry["time_since_delivered"] \
            <= CLAIM_IDLE_MS + 60_000
    claims_before = _command_calls(admin, "xautoclaim")
    consumer = broker.consume("t", "g", prefetch=5)
    got = []
    deadline = time.monotonic() + 30
    while len(got) < 5 and time.monotonic() < deadline:
        try:
            got += consumer.get_many(5, timeout=1)
        except mqs.Empty:
            pass
    assert sorted(m.body for m in got) == [b"%d" % i for i in range(5)]
    assert {m.attempts for m in got} == {2}
    # XAUTOCLAIM took them back; the delivery count is the attempts.
    assert _command_calls(admin, "xautoclaim") > claims_before
    again = admin.xpending_range(lane, "g", "-", "+", 10)
    assert {entry["consumer"].decode() for entry in again} == {consumer._id}
    assert {entry["times_delivered"] for entry in again} == {2}
    for message in got:
        assert message.ack()
    assert admin.xpending(lane, "g")["pending"] == 0
    admin.close()
    stats = broker.stats("t")
    assert stats["redelivered"] == 5
    assert stats["stored"] == 0


def test_extend_moves_pel_deadline(open_broker, redis_url, namespace):
    broker = open_broker()
    consumer = broker.consume("t", "g", prefetch=2, ack_timeout=0.3)
    broker.publish_many("t", [b"kept", b"lost"])
    kept, lost = consumer.get_many(2, timeout=5)
    assert kept.extend(60)
    time.sleep(0.5)
    other = broker.consume("t", "g")
    again = other.get(timeout=5)
    assert again.body == b"lost"
    assert again.attempts == 2
    admin = redis.Redis.from_url(redis_url)
    lane = lane_stream(namespace, "t", 0)
    (entry,) = [e for e in admin.xpending_range(lane, "g", "-", "+", 10)
                if e["message_id"].decode() == kept.id]
    assert entry["consumer"].decode() == consumer._id
    assert entry["times_delivered"] == 1
    # About 60 s left of CLAIM_IDLE_MS.
    left = CLAIM_IDLE_MS - entry["time_since_delivered"]
    assert 30_000 < left <= 60_000
    admin.close()
    assert kept.ack()
    assert again.ack()
    with pytest.raises(mqs.Empty):
        other.get(timeout=0.2)


def _command_calls(client, name):
    return client.info("commandstats").get(f"cmdstat_{name}",
                                           {}).get("calls", 0)


_WORKER = textwrap.dedent("""
    import sys, time
    import mqs
    url, namespace = sys.argv[1], sys.argv[2]
    broker = mqs.Broker(backend="redis", url=url, namespace=namespace)
    consumer = broker.consume("t", "g", prefetch=16, ack_timeout=1.0)
    print(consumer._id, flush=True)
    idle = 0
    while idle < 6:
        try:
            batch = consumer.get_many(16, timeout=0.5)
        except mqs.Empty:
            idle += 1
            continue
        idle = 0
        for message in batch:
            time.sleep(0.002)  # work, so that kills find messages held
            if message.ack():
                print(message.body.decode(), flush=True)
""")


class _Worker:
    """A consumer process of `_WORKER`; a thread collects its output."""

    def __init__(self, redis_url, namespace):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER, redis_url, namespace],
            stdout=subprocess.PIPE, env=env)
        self.lines = []
        self.reader = threading.Thread(target=self._read)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.decode().strip())

    @property
    def consumer(self):
        return self.lines[0] if self.lines else None

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.reader.join(30)
        self.process.stdout.close()


@pytest.mark.stress
def test_consumer_processes_killed_at_random(open_broker, redis_url,
                                             namespace, scale):
    """Consumer processes are SIGKILLed while they hold messages; every
    message is still acked exactly once, as the broker counts it."""
    import random

    total = int(3000 * scale)
    broker = open_broker()
    broker.publish_many("t", [b"%d" % i for i in range(total)])
    admin = redis.Redis.from_url(redis_url)
    held_key = f"{{{namespace}:t}}:g:g\x00inf"
    rng = random.Random(7)
    workers = [_Worker(redis_url, namespace) for _ in range(3)]
    finished = []
    kills = 0
    try:
        for _ in range(int(4 * scale)):
            time.sleep(rng.uniform(0.2, 0.5))
            # Kill a worker whose consumer holds messages now.
            holding = []
            deadline = time.monotonic() + 20
            while not holding and time.monotonic() < deadline:
                held = admin.hgetall(held_key)
                holding = [worker for worker in workers
                           if worker.consumer is not None
                           and int(held.get(worker.consumer.encode(), 0))]
                time.sleep(0.01)
            if not holding:
                break
            victim = rng.choice(holding)
            workers.remove(victim)
            victim.process.send_signal(signal.SIGKILL)
            kills += 1
            finished.append(victim)
            workers.append(_Worker(redis_url, namespace))
        for worker in workers:
            worker.process.wait(120)
    finally:
        for worker in finished + workers:
            worker.stop()
        admin.close()
    printed = [int(line) for worker in finished + workers
               for line in worker.lines[1:]]
    assert kills >= 1
    assert len(printed) == len(set(printed))
    assert set(printed) <= set(range(total))
    stats = broker.stats("t")
    assert stats["acked"] == total
    assert stats["stored"] == 0
    assert stats["in_flight"] == 0
    assert stats["dead_lettered"] == 0
    assert stats["redelivered"] >= 1


# Server restarts: no acknowledged publish is lost.

def _publish_through_restart(server, restart, scale):
    total = int(800 * scale)
    broker = mqs.Broker(backend="redis", url=server.url, retry_timeout=60,
                        socket_timeout=2)
    broker.declare_topic("t")
    consumer = broker.consume("t", "g", prefetch=100)
    acknowledged = []
    errors = []

    def produce():
        try:
            for i in range(total):
                broker.publish("t", b"%d" % i)
                acknowledged.append(i)
        except Exception as exc:  # reported by the assert below
            errors.append(exc)

    producer = threading.Thread(target=produce)
    producer.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < total // 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    restart()
    stopped_at = len(acknowledged)
    producer.join(120)
    assert not producer.is_alive()
    assert stopped_at < total
    assert errors == []
    assert len(acknowledged) == total
    seen = set()
    while True:
        try:
            batch = consumer.get_many(100, timeout=1)
        except mqs.Empty:
            break
        for message in batch:
            seen.add(int(message.body))
            assert message.ack()
    broker.close()
    return set(acknowledged), seen


def test_graceful_restart_loses_no_publish(redis_server_factory, scale,
                                           caplog):
    caplog.set_level(logging.WARNING, logger="mqs.broker._redis")
    server = redis_server_factory(appendfsync="always")
    acknowledged, seen = _publish_through_restart(server, server.restart,
                                                  scale)
    assert acknowledged - seen == set()
    assert "retry 1" in caplog.text


def test_killed_server_loses_no_acknowledged_publish(redis_server_factory,
                                                     scale, caplog):
    caplog.set_level(logging.WARNING, logger="mqs.broker._redis")
    server = redis_server_factory(appendfsync="always")

    def crash():
        server.kill()
        time.sleep(0.3)
        server.restart()

    acknowledged, seen = _publish_through_restart(server, crash, scale)
    assert acknowledged - seen == set()
    assert "retry 1" in caplog.text


def test_fetch_retry_returns_lost_reply_messages(open_broker, monkeypatch):
    # The connection drops after the fetch script ran and took the one
    # message, so its reply never arrives. The retry must deliver that
    # message now, not after its ack deadline with attempts 2.
    broker = open_broker()
    consumer = broker.consume("t", "g", prefetch=1, ack_timeout=60)
    broker.publish("t", b"only")
    backend = broker.backend
    invoke = backend._invoke
    lost = []

    def lose_first_fetch_reply(keys, args, allow_oom):
        reply = invoke(keys, args, allow_oom)
        if args[0] == "fetch" and not lost:
            lost.append(reply)
            raise redis.ConnectionError("reply lost after the script ran")
        return reply

    monkeypatch.setattr(backend, "_invoke", lose_first_fetch_reply)
    message = consumer.get(timeout=5)
    assert len(lost[0][2]) == 1
    assert message.body == b"only"
    assert message.attempts == 1
    assert message.ack()
    assert consumer.in_flight == 0


@pytest.mark.parametrize("settle", ["ack", "ack_many", "nack"])
def test_settle_retry_after_lost_reply_is_true(open_broker, monkeypatch,
                                               settle):
    # The connection drops after the ack or nack script ran, so its reply
    # never arrives and the retry finds the message settled.
    broker = open_broker()
    consumer = broker.consume("t", "g", ack_timeout=60)
    broker.publish("t", b"only")
    message = consumer.get(timeout=5)
    backend = broker.backend
    invoke = backend._invoke
    lost = []

    def lose_first_settle_reply(keys, args, allow_oom):
        reply = invoke(keys, args, allow_oom)
        if args[0] == settle and not lost:
            lost.append(reply)
            raise redis.ConnectionError("reply lost after the script ran")
        return reply

    monkeypatch.setattr(backend, "_invoke", lose_first_settle_reply)
    if settle == "ack_many":
        assert consumer.ack_many([message]) == 1
    elif settle == "ack":
        assert message.ack() is True
    else:
        assert message.nack() is True
    assert len(lost) == 1
    stats = broker.stats("t")
    assert stats["late_acks"] == 0
    if settle == "nack":
        assert stats["nacked"] == 1
        assert consumer.get(timeout=5).attempts == 2
    else:
        assert stats["acked"] == 1


@pytest.mark.parametrize("settle", ["ack", "nack"])
def test_settle_retry_of_redelivered_message_is_late(open_broker,
                                                     monkeypatch, settle):
    # The first attempt never reached the server, and the message was
    # redelivered meanwhile: the retry is a late ack.
    broker = open_broker()
    consumer = broker.consume("t", "g", ack_timeout=0.2, prefetch=2)
    broker.publish("t", b"only")
    message = consumer.get(timeout=5)
    time.sleep(0.4)
    again = consumer.get(timeout=5)
    backend = broker.backend
    invoke = backend._invoke
    failed = []

    def fail_first_settle(keys, args, allow_oom):
        if args[0] == settle and not failed:
            failed.append(True)
            raise redis.ConnectionError("lost before the script ran")
        return invoke(keys, args, allow_oom)

    monkeypatch.setattr(backend, "_invoke", fail_first_settle)
    if settle == "ack":
        assert message.ack() is False
    else:
        assert message.nack() is False
    assert again.ack() is True
    assert broker.stats("t")["late_acks"] == 1


def test_failed_ack_succeeds_after_restart(redis_server_factory, caplog):
    caplog.set_level(logging.WARNING, logger="mqs.broker._redis")
    server = redis_server_factory(appendfsync="always")
    broker = mqs.Broker(backend="redis", url=server.url, retry_timeout=0.5)
    try:
        consumer = broker.consume("t", "g", ack_timeout=60)
        broker.publish("t", "held")
        message = consumer.get(timeout=5)
        server.kill()
        with pytest.raises(mqs.BackendConnectionError):
            message.ack()
        server.restart()
        # The failed ack settled nothing, so the retry acks the message.
        assert message.ack() is True
        stats = broker.stats("t")
        assert stats["acked"] == 1
        assert stats["in_flight"] == 0
    finally:
        broker.close()


# Connections.

def test_connection_killed_during_blocking_get(redis_server_factory,
                                               caplog):
    server = redis_server_factory()
    broker = mqs.Broker(backend="redis", url=server.url)
    consumer = broker.consume("t", "g")
    results = []

    def wait():
        try:
            results.append(consumer.get(timeout=30).body)
        except Exception as exc:  # reported by the assert below
            results.append(exc)

    caplog.set_level(logging.WARNING, logger="mqs.broker._redis")
    waiter = threading.Thread(target=wait)
    waiter.start()
    admin = redis.Redis.from_url(server.url)
    blocked = []
    deadline = time.monotonic() + 20
    while not blocked and time.monotonic() < deadline:
        blocked = [client for client in admin.client_list()
                   if client.get("cmd") == "xread"]
        time.sleep(0.01)
    assert blocked
    assert admin.client_kill_filter(_id=blocked[0]["id"]) == 1
    time.sleep(0.3)
    broker.publish("t", b"after")
    waiter.join(30)
    admin.close()
    broker.close()
    assert results == [b"after"]
    assert "the wait for a change of topic 't' ended early" in caplog.text


def test_blocking_get_stays_within_socket_timeout(open_broker, caplog):
    broker = open_broker(socket_timeout=1.0)
    consumer = broker.consume("t", "g")
    caplog.set_level(logging.WARNING, logger="mqs.broker._redis")
    started = time.monotonic()
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=2.5)
    assert time.monotonic() - started >= 2.5
    assert "retry" not in caplog.text


@pytest.fixture
def stalled_broker(redis_server_factory):
    """Yield a broker on a new server and a function that stops that
    server with SIGSTOP, so that it hangs without closing connections.

    The broker has retry_timeout=1 and socket_timeout=8, so a call that
    waits a whole socket timeout shows. The server gets SIGCONT after the
    test, and the factory then stops it by its pid.
    """
    server = redis_server_factory()
    broker = mqs.Broker(backend="redis", url=server.url, retry_timeout=1.0,
                        socket_timeout=8.0)
    stopped = []

    def stall():
        os.kill(server.pid, signal.SIGSTOP)
        stopped.append(server.pid)

    yield broker, stall
    for pid in stopped:
        os.kill(pid, signal.SIGCONT)
    broker.close()


def test_stalled_server_fails_calls_quickly(stalled_broker):
    broker, stall = stalled_broker
    consumer = broker.consume("t", "g")
    broker.publish("t", b"held")
    message = consumer.get(timeout=5)
    stall()
    calls = {
        "publish": lambda: broker.publish("t", b"more"),
        "get": lambda: consumer.get(timeout=0.5),
        "ack": message.ack,
        "stats": lambda: broker.stats("t"),
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(mqs.BackendConnectionError,
                           match="unreachable"):
            call()
        elapsed = time.monotonic() - started
        # retry_timeout (1 s) plus the last attempt's reply wait (1 s),
        # with room for a loaded machine; far below socket_timeout (8 s).
        assert elapsed >= 0.9, name
        assert elapsed < 5.0, name


def test_waiting_get_raises_when_server_stalls(stalled_broker):
    broker, stall = stalled_broker
    consumer = broker.consume("t", "g")
    outcome = []

    def wait():
        try:
            outcome.append(consumer.get(timeout=60))
        except Exception as exc:  # checked by the asserts below
            outcome.append(exc)
        outcome.append(time.monotonic())

    waiter = threading.Thread(target=wait)
    waiter.start()
    # Let the consumer reach its blocking XREAD before the stop.
    time.sleep(0.5)
    stall()
    stopped_at = time.monotonic()
    waiter.join(30)

    assert not waiter.is_alive()
    error, ended_at = outcome
    assert isinstance(error, mqs.BackendConnectionError)
    # The block (at most 1 s), retry_timeout (1 s) and the last attempt's
    # reply wait (1 s), with room for a loaded machine.
    assert ended_at - stopped_at < 7.0


def test_stalled_server_close_async_keeps_loop_running(stalled_broker):
    broker, stall = stalled_broker
    consumer = broker.consume("t", "g")

    async def main():
        gaps = []

        async def ticker():
            while True:
                before = time.monotonic()
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - before)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.1)
        stall()
        with pytest.raises(mqs.BackendConnectionError, match="unreachable"):
            await consumer.close_async()
        task.cancel()
        return gaps

    gaps = asyncio.run(main())
    # The close fails after about 2 s: retry_timeout (1 s) and the last
    # attempt's reply wait (1 s). The loop ticks every 10 ms meanwhile.
    assert len(gaps) >= 20
    assert max(gaps) < 0.5


# Runs for ARGV[1] ms, as a long script of another client would.
BUSY_SCRIPT = """
local start = redis.call('TIME')
while true do
  local now = redis.call('TIME')
  if (now[1] - start[1]) * 1000 + (now[2] - start[2]) / 1000
      > tonumber(ARGV[1]) then
    return 1
  end
end
"""


def test_busy_server_is_retried(redis_server_factory, caplog):
    # Past lua-time-limit, a server that runs a script replies BUSY to
    # every other command until the script ends.
    server = redis_server_factory(config={"lua-time-limit": "100"})
    broker = mqs.Broker(backend="redis", url=server.url, retry_timeout=30)
    try:
        consumer = broker.consume("t", "g")
        other = redis.Redis.from_url(server.url)
        busy = threading.Thread(target=other.eval,
                                args=(BUSY_SCRIPT, 0, 1500))
        caplog.set_level(logging.WARNING, logger="mqs.broker._redis")
        busy.start()
        time.sleep(0.5)
        broker.publish("t", b"during")
        busy.join()
        other.close()
        assert "BUSY" in caplog.text
        assert consumer.get(timeout=5).body == b"during"
    finally:
        broker.close()


def test_busy_server_error_names_cause(redis_server_factory):
    server = redis_server_factory(config={"lua-time-limit": "100"})
    broker = mqs.Broker(backend="redis", url=server.url, retry_timeout=0.5)
    try:
        broker.declare_topic("t")
        other = redis.Redis.from_url(server.url)
        busy = threading.Thread(target=other.eval,
                                args=(BUSY_SCRIPT, 0, 3000))
        busy.start()
        time.sleep(0.5)
        with pytest.raises(mqs.BackendConnectionError) as raised:
            broker.publish("t", b"during")
        busy.join()
        other.close()
        message = str(raised.value)
        assert "stayed busy running a script for 0.5 s" in message
        assert "SLOWLOG GET" in message
        assert "raise retry_timeout" in message
    finally:
        broker.close()


def test_blocking_get_survives_frequent_connection_kills(
        redis_server_factory):
    # Each blocking wait (up to 1 s) loses its connection within 0.3 s,
    # for longer than retry_timeout. The get keeps waiting, since every
    # script call in between succeeds.
    server = redis_server_factory()
    broker = mqs.Broker(backend="redis", url=server.url, retry_timeout=1.0)
    admin = redis.Redis.from_url(server.url)
    stop = threading.Event()

    def kill_connections():
        while not stop.wait(0.3):
            admin.client_kill_filter(_type="normal", skipme=True)

    killer = threading.Thread(target=kill_connections)
    try:
        consumer = broker.consume("t", "g")
        killer.start()
        with pytest.raises(mqs.Empty):
            consumer.get(timeout=3)
        stop.set()
        killer.join()
        broker.publish("t", b"after")
        assert consumer.get(timeout=5).body == b"after"
    finally:
        stop.set()
        if killer.is_alive():
            killer.join()
        admin.close()
        broker.close()


def test_blocking_get_survives_short_retry_timeout(open_broker, caplog):
    broker = open_broker(socket_timeout=0.5, retry_timeout=0.1)
    consumer = broker.consume("t", "g")
    caplog.set_level(logging.WARNING, logger="mqs.broker._redis")
    started = time.monotonic()
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=2.0)
    assert time.monotonic() - started >= 2.0
    assert "retry" not in caplog.text
    broker.publish("t", b"late")
    assert consumer.get(timeout=5).body == b"late"


def test_password_required_and_checked(redis_server_factory):
    server = redis_server_factory(password="pw-right-1")
    broker = mqs.Broker(backend="redis", url=server.url)
    broker.publish("t", b"x")
    assert broker.consume("t", "g").get(timeout=5).body == b"x"
    broker.close()
    wrong = f"redis://:pw-wrong-2@127.0.0.1:{server.port}/0"
    with pytest.raises(mqs.BackendConnectionError,
                       match="rejected the credentials") as info:
        mqs.Broker(backend="redis", url=wrong)
    assert "pw-wrong-2" not in str(info.value)
    missing = f"redis://127.0.0.1:{server.port}/0"
    with pytest.raises(mqs.BackendConnectionError, match="credentials"):
        mqs.Broker(backend="redis", url=missing)


def test_unreachable_server_raises_after_retries(caplog):
    # A port that was free a moment ago: nothing listens there.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    caplog.set_level(logging.WARNING, logger="mqs.broker._redis")
    with pytest.raises(mqs.BackendConnectionError, match="unreachable"):
        mqs.Broker(backend="redis", url=f"redis://127.0.0.1:{port}/0",
                   retry_timeout=0.5)
    assert "retry 1" in caplog.text


def test_connect_retry_timeout_fails_fast():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(mqs.BackendConnectionError,
                       match="raise connect_retry_timeout"):
        mqs.Broker(backend="redis", url=f"redis://127.0.0.1:{port}/0",
                   retry_timeout=600, connect_retry_timeout=0.2)
    # Far below retry_timeout, with room for a loaded machine.
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("value", [-1, float("nan"), "3", True])
def test_connect_retry_timeout_checked(value):
    # Without a url, as in test_retry_timeout_checked: nothing connects.
    with pytest.raises(ValueError, match="connect_retry_timeout must be"):
        mqs.Broker(backend="redis", connect_retry_timeout=value)


def test_missing_redis_py_is_backend_unavailable(monkeypatch):
    # None in sys.modules makes `import redis` raise ImportError.
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(mqs.BackendUnavailable,
                       match="needs redis-py, which is not installed"):
        mqs.Broker(backend="redis", url="redis://127.0.0.1:1/0")


# Drops.

def _drop_warnings(caplog, topic):
    """Return the drop warnings of `topic` that caplog captured."""
    return [record.getMessage() for record in caplog.records
            if record.levelno == logging.WARNING
            and record.getMessage().startswith(f"topic {topic!r}: messages ")]


def test_every_drop_cause_logged(open_broker, caplog):
    caplog.set_level(logging.WARNING, logger="mqs.broker._redis")
    broker = open_broker()

    broker.declare_topic("ttl", ttl=0.05)
    ttl_consumer = broker.consume("ttl", "g")
    broker.publish("ttl", b"stale")
    time.sleep(0.2)
    with pytest.raises(mqs.Empty):
        ttl_consumer.get(timeout=0.1)

    broker.declare_topic("full", maxsize=1, when_full="drop_oldest")
    broker.consume("full", "g")
    broker.publish("full", b"first")
    broker.publish("full", b"second")

    broker.publish("dedup", b"once", dedup_id="d1")
    broker.publish("dedup", b"twice", dedup_id="d1")

    dead_consumer = broker.consume("dead", "g")
    broker.publish("dead", b"rejected")
    dead_consumer.get(timeout=5).nack(requeue=False)
    assert broker.dlq_purge("dead") == 1

    broker.publish("late", b"before any group")
    broker.consume("late", "g", start="latest")
    broker.publish("late", b"after")

    assert _drop_warnings(caplog, "ttl") == [
        "topic 'ttl': messages dropped because their ttl passed so far: 1"]
    assert _drop_warnings(caplog, "full") == [
        "topic 'full': messages dropped to make room "
        "(when_full='drop_oldest') so far: 1"]
    assert _drop_warnings(caplog, "dedup") == [
        "topic 'dedup': messages dropped as duplicates (dedup_id seen) "
        "so far: 1"]
    assert sorted(_drop_warnings(caplog, "dead")) == [
        "topic 'dead': messages moved to the dead-letter queue so far: 1",
        "topic 'dead': messages purged from the dead-letter queue so far: 1",
    ]
    assert _drop_warnings(caplog, "late") == [
        "topic 'late': messages dropped because the topic's first group "
        "started at 'latest' so far: 1"]
    stats = broker.stats("late")
    assert stats["dropped_unsubscribed"] == 1


def test_drop_warnings_rate_limited_across_brokers(open_broker, caplog):
    caplog.set_level(logging.WARNING, logger="mqs.broker._redis")
    first = open_broker()
    second = open_broker()
    first.publish("t", b"kept", dedup_id="same")

    # Duplicates 1 to 11 come from two brokers that share the server's
    # count, so only the 1st and the 10th log a warning.
    for attempt in range(11):
        broker = first if attempt % 2 else second
        broker.publish("t", b"again", dedup_id="same")

    assert first.stats("t")["deduplicated"] == 11
    assert _drop_warnings(caplog, "t") == [
        "topic 't': messages dropped as duplicates (dedup_id seen) so far: 1",
        "topic 't': messages dropped as duplicates (dedup_id seen) so far: "
        "10",
    ]


# Dead letters with parts that fail to unpickle.

def test_dlq_list_keeps_undecodable_key_and_headers(open_broker,
                                                    monkeypatch):
    broker = open_broker(serializer="pickle")
    broker.publish("t", "plain", key="k", headers={"trace": "t0"})
    broker.publish("t", "bad key", key=Fragile(1))
    broker.publish("t", "bad headers", headers={"obj": Fragile(2)})
    broker.publish("t", Fragile(3), key=Fragile(4),
                   headers={"obj": Fragile(5)})
    consumer = broker.consume("t", "g", prefetch=4)
    for message in consumer.get_many(4, timeout=5):
        message.nack(requeue=False)
    monkeypatch.setitem(FRAGILE, "broken", True)

    plain, bad_key, bad_headers, all_bad = broker.dlq_list("t")

    assert plain.key == "k"
    assert plain.headers["trace"] == "t0"
    assert plain.decode_error is None
    assert plain.raw_key is None
    assert plain.raw_headers is None

    assert bad_key.body == "bad key"
    assert bad_key.key is None
    assert bad_key.decode_error == "key: RuntimeError: cannot rebuild " \
                                   "Fragile(1) here"
    assert bad_key.raw_headers is None
    assert bad_key.headers["mqs.dead_letter_reason"] == "rejected"

    assert bad_headers.body == "bad headers"
    assert bad_headers.decode_error == "headers: RuntimeError: cannot " \
                                       "rebuild Fragile(2) here"
    assert "obj" not in bad_headers.headers
    assert bad_headers.headers["mqs.attempts"] == 1
    assert bad_headers.raw_key is None

    assert all_bad.body is None
    assert all_bad.key is None
    assert all_bad.decode_error == (
        "RuntimeError: cannot rebuild Fragile(3) here; "
        "key: RuntimeError: cannot rebuild Fragile(4) here; "
        "headers: RuntimeError: cannot rebuild Fragile(5) here")

    monkeypatch.setitem(FRAGILE, "broken", False)
    assert pickle.loads(bad_key.raw_key).value == 1
    assert pickle.loads(bad_headers.raw_headers)["obj"].value == 2
    assert pickle.loads(all_bad.raw_body).value == 3
    assert pickle.loads(all_bad.raw_key).value == 4
    assert pickle.loads(all_bad.raw_headers)["obj"].value == 5


def test_dlq_redrive_and_purge_undecodable_key(open_broker, monkeypatch):
    broker = open_broker(serializer="pickle")
    broker.publish("t", "bad key", key=Fragile(1),
                   headers={"obj": Fragile(2)})
    broker.publish("t", "other")
    consumer = broker.consume("t", "g", prefetch=2)
    for message in consumer.get_many(2, timeout=5):
        message.nack(requeue=False)
    monkeypatch.setitem(FRAGILE, "broken", True)
    broken, other = broker.dlq_list("t")

    assert broker.dlq_redrive("t", [broken.id]) == 1
    assert broker.dlq_purge("t") == 1

    assert broker.dlq_list("t") == []
    monkeypatch.setitem(FRAGILE, "broken", False)
    again = consumer.get(timeout=5)
    assert again.id == broken.id
    assert again.key.value == 1
    assert again.headers["obj"].value == 2
    assert again.ack()


# Trimmed streams.

@pytest.mark.parametrize("options", [
    {"ttl": 0.2},
    {"delay": 600},
])
def test_fetch_bounds_entries_skipped_per_call(open_broker, options):
    # Redis runs no other command while a script runs, so one fetch
    # expires or parks at most 1000 entries (FETCH_WORK in _redis.lua),
    # then returns and is called again.
    broker = open_broker()
    consumer = broker.consume("t", "g")
    broker.publish_many("t", [b"skipped"] * 2500, **options)
    broker.publish("t", b"live")
    time.sleep(0.3)
    backend = broker.backend
    found, wait_ms, _ = backend._fetch_once("t", "g", consumer._id, 1, 30,
                                            False)
    assert found == []
    assert wait_ms == 0
    message = consumer.get(timeout=10)
    assert message.body == b"live"
    assert message.ack()
    stats = broker.stats("t")
    if "ttl" in options:
        assert stats["expired"] == 2500
    else:
        assert stats["delayed"] == 2500


def _trim_in_flight(broker, consumer, redis_url, namespace, **options):
    """Publish b"gone" to topic "t" and get it with `consumer`, whose ack
    timeout is short. Then trim it from its stream, wait until its ack
    deadline dead-letters it, and return the message."""
    broker.publish("t", b"gone", **options)
    message = consumer.get(timeout=5)
    admin = redis.Redis.from_url(redis_url)
    assert admin.xtrim(lane_stream(namespace, "t", 0), maxlen=0) == 1
    admin.close()
    deadline = time.monotonic() + 20
    while not broker.dlq_list("t") and time.monotonic() < deadline:
        with pytest.raises(mqs.Empty):
            consumer.get(timeout=0.1)
    return message


def test_entry_trimmed_while_pending_dead_letters(open_broker, redis_url,
                                                  namespace):
    broker = open_broker()
    consumer = broker.consume("t", "g", ack_timeout=0.2)
    message = _trim_in_flight(broker, consumer, redis_url, namespace,
                              headers={"trace": "t1"})
    (letter,) = broker.dlq_list("t")
    assert letter.id == message.id
    assert letter.reason == "trimmed"
    assert letter.body == b""
    assert letter.headers["mqs.dead_letter_reason"] == "trimmed"
    stats = broker.stats("t")
    assert stats["dead_lettered.trimmed"] == 1
    assert stats["in_flight"] == 0
    assert not message.ack()
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0.2)


def test_trimmed_dead_letter_not_redriven(open_broker, redis_url,
                                          namespace):
    """A dead letter whose entry was trimmed contains no message, so a
    redrive leaves it in the dead-letter queue and redrives the others.
    Redriven, it would be a message without fields, which fails to decode
    at every delivery."""
    broker = open_broker()
    consumer = broker.consume("t", "g", prefetch=10, ack_timeout=0.2)
    message = _trim_in_flight(broker, consumer, redis_url, namespace)
    # Far from its ack deadline, so that the acks below are in time.
    steady = broker.consume("t", "g", prefetch=10, ack_timeout=60)
    broker.publish("t", b"kept")
    kept = steady.get(timeout=5)
    assert kept.body == b"kept"
    assert kept.nack(requeue=False)
    assert [letter.reason for letter in broker.dlq_list("t")] \
        == ["trimmed", "rejected"]

    assert broker.dlq_redrive("t", [message.id]) == 0
    assert broker.dlq_redrive("t") == 1
    (letter,) = broker.dlq_list("t")
    assert letter.id == message.id
    assert letter.reason == "trimmed"
    again = steady.get(timeout=5)
    assert again.body == b"kept"
    assert again.ack()
    with pytest.raises(mqs.Empty):
        steady.get(timeout=0.2)
    stats = broker.stats("t")
    assert stats["redriven"] == 1
    assert stats["dlq"] == 1
    assert stats["stored"] == 0


def test_ack_of_trimmed_pending_entry(open_broker, redis_url, namespace):
    broker = open_broker()
    consumer = broker.consume("t", "g")
    broker.publish_many("t", [b"a", b"b"])
    message = consumer.get(timeout=5)
    admin = redis.Redis.from_url(redis_url)
    admin.xtrim(lane_stream(namespace, "t", 0), maxlen=0)
    admin.close()
    assert message.ack()
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0.1)
    assert broker.stats("t")["stored"] == 0


def test_large_batches_split_into_script_calls(open_broker):
    broker = open_broker()
    total = 2500  # three script calls of at most 1000 messages
    ids = broker.publish_many("t", [b"%d" % i for i in range(total)])
    assert len(ids) == total
    assert len(set(ids)) == total
    consumer = broker.consume("t", "g", prefetch=total)
    got = []
    while len(got) < total:
        got += consumer.get_many(total, timeout=5)
    assert [m.body for m in got] == [b"%d" % i for i in range(total)]
    assert consumer.ack_many(got) == total
    assert broker.stats("t")["acked"] == total


def test_batch_split_below_server_bulk_limit(redis_server_factory):
    # A publish joins a run's bodies into one argument. Five bodies of
    # 300 kB each fit a server that takes 1 MiB per argument, but their
    # join does not.
    server = redis_server_factory(config={"proto-max-bulk-len": "1mb"})
    broker = mqs.Broker(backend="redis", url=server.url, retry_timeout=5)
    try:
        bodies = [bytes([n]) * 300_000 for n in range(5)]
        assert len(broker.publish_many("t", bodies)) == 5
        consumer = broker.consume("t", "g", prefetch=5)
        got = consumer.get_many(5, timeout=5)
        assert [m.body for m in got] == bodies
        assert consumer.ack_many(got) == 5
    finally:
        broker.close()


def test_body_over_server_bulk_limit_too_large(redis_server_factory):
    server = redis_server_factory(config={"proto-max-bulk-len": "1mb"})
    broker = mqs.Broker(backend="redis", url=server.url, retry_timeout=5)
    try:
        size = 2 << 20
        with pytest.raises(mqs.MessageTooLarge) as caught:
            broker.publish("t", b"x" * size)
        text = str(caught.value)
        assert f"{size} bytes" in text
        assert "proto-max-bulk-len" in text
        assert "0 of 1 messages were published" in text
        # The batch keeps the messages before the one that cannot fit.
        with pytest.raises(mqs.MessageTooLarge,
                           match="2 of 3 messages were published"):
            broker.publish_many("t", [b"a", b"b", b"x" * size])
        assert broker.stats("t")["published"] == 2
        assert broker.publish("t", b"small")
    finally:
        broker.close()


def test_stream_maxlen_caps_stored_entries(open_broker):
    broker = open_broker(stream_maxlen=100)
    broker.publish_many("t", [b"x"] * 2000)
    stored = broker.stats("t")["stored"]
    # MAXLEN ~ trims whole stream nodes, so a few hundred may stay.
    assert 100 <= stored < 1000


# Reference counts and dedup keys.

def test_second_group_from_earliest_keeps_entries(open_broker, redis_url,
                                                   namespace):
    # Entries published to one group store no reference count; a group
    # that starts at "earliest" later must still get every stored entry.
    broker = open_broker()
    first = broker.consume("t", "g1", prefetch=10)
    broker.publish_many("t", [b"a", b"b", b"c", b"d"])
    done = first.get(timeout=5)
    assert done.body == b"a"
    assert done.ack()
    held = first.get(timeout=5)
    assert held.body == b"b"
    admin = redis.Redis.from_url(redis_url)
    assert admin.hlen(f"{{{namespace}:t}}:refs") == 0
    second = broker.consume("t", "g2", start="earliest", prefetch=10)
    assert held.ack()
    rest = first.get_many(10, timeout=5)
    assert [m.body for m in rest] == [b"c", b"d"]
    assert first.ack_many(rest) == 2
    got = second.get_many(10, timeout=5)
    assert [m.body for m in got] == [b"b", b"c", b"d"]
    assert second.ack_many(got) == 3
    assert broker.stats("t")["stored"] == 0
    assert admin.hlen(f"{{{namespace}:t}}:refs") == 0
    admin.close()


def test_dedup_key_set_with_nx_and_px(open_broker, redis_url, namespace):
    broker = open_broker()
    broker.declare_topic("t", dedup_window=0.5)
    first = broker.publish("t", b"x", dedup_id="order-1")
    assert broker.publish("t", b"y", dedup_id="order-1") == first
    admin = redis.Redis.from_url(redis_url)
    key = f"{{{namespace}:t}}:dd:s:order-1"
    assert admin.get(key) == first.encode()
    # PX keeps a sub-second window: EX could not store 0.5 s.
    assert 0 < admin.pttl(key) <= 500
    deadline = time.monotonic() + 10
    while admin.exists(key) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not admin.exists(key)
    second = broker.publish("t", b"z", dedup_id="order-1")
    assert second != first
    assert broker.stats("t")["deduplicated"] == 1
    admin.close()


def test_dedup_id_released_when_topic_full(open_broker, redis_url,
                                           namespace):
    broker = open_broker()
    broker.declare_topic("t", maxsize=1, when_full="raise")
    broker.consume("t", "g").close()
    broker.publish("t", b"a")
    with pytest.raises(mqs.Full):
        broker.publish("t", b"b", dedup_id="d1")
    admin = redis.Redis.from_url(redis_url)
    assert not admin.exists(f"{{{namespace}:t}}:dd:s:d1")
    admin.close()


# Redis Cluster slots.

def test_every_topic_key_in_one_slot(open_broker, redis_url, namespace):
    # Redis Cluster runs a script only on keys of one slot: every key the
    # backend creates for a topic must carry the topic's hash tag.
    from redis.crc import key_slot

    broker = open_broker()
    broker.declare_topic("t", dedup_window=60, retention=60,
                         weights={0: 1, 5: 2})
    consumer = broker.consume("t", "g", prefetch=10, ack_timeout=30)
    other = broker.consume("t", "g2", prefetch=10)
    broker.publish("t", b"a", key="k", dedup_id="d")
    broker.publish("t", b"b", key="k", priority=5)
    broker.publish("t", b"c", delay=30)
    message = consumer.get(timeout=5)
    assert message.nack(requeue=False)
    broker.dlq_redrive("t")
    assert consumer.get(timeout=5).nack(delay=30, error="later")
    assert len(other.get_many(10, timeout=5)) >= 1
    admin = redis.Redis.from_url(redis_url)
    keys = list(admin.scan_iter(match=f"*{namespace}*", count=1000))
    admin.close()
    kinds = {key.decode().split("}:", 1)[1].split(":")[0].split("\0")[0]
             for key in keys}
    # The stream of each lane, the group's records, timers, dedup ids,
    # dead letters, redriven copies and retention all exist by now.
    for kind in ("meta", "s", "g", "tm", "dl", "dd", "dlq", "groups",
                 "refs", "ret", "wake"):
        assert kind in kinds, kind
    slots = {key_slot(key) for key in keys}
    assert slots == {key_slot(f"{{{namespace}:t}}".encode())}
    assert all(key.startswith(f"{{{namespace}:t}}:".encode())
               for key in keys)


def test_publish_skips_topic_check_round_trip(open_broker,
                                              redis_server_factory):
    # A server of its own, whose command counts no other test moves.
    url = redis_server_factory().url
    broker = open_broker(url=url)
    broker.declare_topic("t")
    admin = redis.Redis.from_url(url)
    checks_before = _command_calls(admin, "hexists")
    broker.publish("t", b"one")
    broker.publish_many("t", [b"two", b"three"])
    assert _command_calls(admin, "hexists") == checks_before
    admin.close()


def test_publish_declares_deleted_topic_again(open_broker):
    broker = open_broker()
    broker.publish("t", b"old")
    broker.delete_topic("t")
    ids = broker.publish_many("t", [b"a", b"b"])
    assert len(ids) == 2
    consumer = broker.consume("t", "g", start="earliest")
    first = consumer.get(timeout=1)
    assert first.body == b"a"
    assert first.ack()
    second = consumer.get(timeout=1)
    assert second.body == b"b"


def test_publish_without_auto_declare_raises(open_broker):
    broker = open_broker(auto_declare=False)
    with pytest.raises(mqs.UnknownTopic, match="auto_declare=True"):
        broker.publish("missing", b"x")
    with pytest.raises(mqs.UnknownTopic, match="auto_declare=True"):
        broker.publish_many("missing", [b"x"])
    with pytest.raises(mqs.UnknownTopic):
        broker.topic_config("missing")


# Namespaces.

def test_namespace_with_colon_rejected(redis_url):
    # Topic names may contain colons, so namespace "a:b" would share the
    # keys of namespace "a" (topic "b:c" and topic "c" both map to
    # {a:b:c}) and show up in its topics().
    with pytest.raises(ValueError, match="namespace cannot contain ':'.*"
                                         "'mqs-test.sub'"):
        mqs.Broker(backend="redis", url=redis_url,
                   namespace="mqs-test:sub")


def test_topics_only_of_own_namespace(open_broker, namespace):
    mine = open_broker()
    other = open_broker(namespace=namespace + ".sub")
    mine.declare_topic("orders:eu")
    other.declare_topic("billing")
    try:
        assert mine.topics() == ["orders:eu"]
        assert other.topics() == ["billing"]
    finally:
        other.delete_topic("billing")


# asyncio.

def _script_calls(url):
    """Return how many script calls the server at `url` got: FCALL of the
    library and EVALSHA, with those it rejected before running them (a
    server above its maxmemory rejects an FCALL of a function without the
    allow-oom flag)."""
    admin = redis.Redis.from_url(url)
    try:
        stats = admin.info("commandstats")
    finally:
        admin.close()
    total = 0
    for name in ("cmdstat_fcall", "cmdstat_evalsha"):
        counts = stats.get(name, {})
        total += counts.get("calls", 0) + counts.get("rejected_calls", 0)
    return total


def test_idle_get_async_does_not_poll(redis_server_factory):
    server = redis_server_factory()
    broker = mqs.Broker(backend="redis", url=server.url)
    try:
        consumer = broker.consume("t", "g")
        before = _script_calls(server.url)

        async def main():
            with pytest.raises(mqs.Empty):
                await consumer.get_async(timeout=0.8)

        asyncio.run(main())
        # One fetch at the start, and one more if the wait for a change
        # ended at its 1 s cap. Polling every 10 ms would make about 80.
        calls = _script_calls(server.url) - before
        assert calls >= 1
        assert calls <= 3
    finally:
        broker.close()


def test_get_async_wakes_on_publish(open_broker):
    broker = open_broker()
    consumer = broker.consume("t", "g")

    async def main():
        waiter = asyncio.create_task(consumer.get_async(timeout=10))
        await asyncio.sleep(0.2)
        await broker.publish_async("t", b"late")
        return await waiter

    message = asyncio.run(main())
    assert message.body == b"late"
    message.ack()


# More waiters than redis-py 8.2's default pool of 100 connections.
MANY_WAITERS = 120


def test_many_waiting_gets_leave_room(open_broker):
    """Each waiting get uses a pooled connection for its blocking read,
    so more waiters than a pool of 100 must not starve the publishes."""
    broker = open_broker()
    consumers = [broker.consume(f"t{i}", "g") for i in range(MANY_WAITERS)]
    bodies = [None] * MANY_WAITERS

    def wait(index):
        try:
            message = consumers[index].get(timeout=20)
        except mqs.Empty:
            return
        bodies[index] = message.body
        message.ack()

    threads = [threading.Thread(target=wait, args=(index,))
               for index in range(MANY_WAITERS)]
    for thread in threads:
        thread.start()
    # Let every thread reach its blocking read before the publishes.
    time.sleep(2)
    started = time.monotonic()
    for index in range(MANY_WAITERS):
        broker.publish(f"t{index}", f"body {index}".encode())
    publish_seconds = time.monotonic() - started
    for thread in threads:
        thread.join()
    assert publish_seconds < 5
    assert bodies == [f"body {index}".encode()
                      for index in range(MANY_WAITERS)]


def test_many_awaited_topics_leave_room(open_broker):
    broker = open_broker()
    consumers = [broker.consume(f"t{i}", "g") for i in range(MANY_WAITERS)]

    async def main():
        waiters = [asyncio.create_task(consumer.get_async(timeout=20))
                   for consumer in consumers]
        await asyncio.sleep(2)
        for index in range(MANY_WAITERS):
            await broker.publish_async(f"t{index}", f"body {index}".encode())
        return await asyncio.gather(*waiters)

    messages = asyncio.run(main())
    assert [message.body for message in messages] == [
        f"body {index}".encode() for index in range(MANY_WAITERS)]
    for message in messages:
        message.ack()


def _ticks_during(coroutine_function):
    """Run `coroutine_function()` beside a 10 ms ticker; return (ticks,
    the seconds it took, what it raised)."""

    async def main():
        started = time.monotonic()
        result, ticks = await ticking(coroutine_function(),
                                      errors=(Exception,))
        raised = result if isinstance(result, Exception) else None
        return ticks, time.monotonic() - started, raised

    return asyncio.run(main())


@pytest.mark.parametrize("operation",
                         ["get_async", "publish_async", "request_async"])
def test_async_call_does_not_block_loop_in_outage(redis_server_factory,
                                                  operation):
    server = redis_server_factory()
    broker = mqs.Broker(backend="redis", url=server.url, retry_timeout=1.5)
    try:
        consumer = broker.consume("t", "g")
        server.kill()
        if operation == "get_async":
            call = lambda: consumer.get_async(timeout=30)  # noqa: E731
        elif operation == "publish_async":
            call = lambda: broker.publish_async("t", b"x")  # noqa: E731
        else:
            call = lambda: broker.request_async(  # noqa: E731
                "t", b"x", timeout=30)
        ticks, seconds, raised = _ticks_during(call)
        assert isinstance(raised, mqs.BackendConnectionError), raised
        assert seconds >= 1.5
        # The loop kept running while the calls retried in other threads:
        # 150 ticks at most in 1.5 s, so a third of them leaves room for
        # a busy machine.
        assert ticks >= 50
    finally:
        # Closing the consumer needs the server.
        server.restart()
        broker.close()


@pytest.mark.parametrize("auto_ack", [False, True])
def test_cancelled_get_async_returns_taken_message(open_broker, monkeypatch,
                                                   auto_ack):
    broker = open_broker()
    consumer = broker.consume("t", "g", auto_ack=auto_ack, ack_timeout=60)
    broker.publish("t", b"taken")
    backend = broker._backend
    fetch_ready = backend._fetch_ready

    def slow_fetch_ready(*args):
        # The await is cancelled while this call is on its way.
        time.sleep(0.3)
        return fetch_ready(*args)

    monkeypatch.setattr(backend, "_fetch_ready", slow_fetch_ready)

    async def main():
        task = asyncio.create_task(consumer.get_async(timeout=10))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The fetch in the executor ends after the cancel and takes the
        # message, which the loop then hands back.
        await asyncio.sleep(0.5)

    asyncio.run(main())
    monkeypatch.undo()
    message = consumer.get(timeout=5)
    assert message.body == b"taken"
    # Released messages get their attempt refunded.
    assert message.attempts == 1
    if not auto_ack:
        message.ack()
    stats = broker.stats("t")
    assert stats["in_flight"] == 0
    assert stats["stored"] == 0


def _publish_async_in_child(broker):
    async def main():
        await asyncio.wait_for(broker.publish_async("t", b"from child"), 20)

    asyncio.run(main())


def test_publish_async_in_forked_child(open_broker):
    import multiprocessing

    broker = open_broker()
    consumer = broker.consume("t", "g")
    broker.publish("t", b"first")

    async def first():
        return await consumer.get_async(timeout=5)

    # The parent's executor threads exist before the fork.
    asyncio.run(first()).ack()
    child = multiprocessing.get_context("fork").Process(
        target=_publish_async_in_child, args=(broker,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    message = consumer.get(timeout=5)
    assert message.body == b"from child"
    message.ack()


@pytest.mark.parametrize("use_async", [False, True])
def test_data_loss_during_wait_redeclares(redis_server_factory, use_async):
    server = redis_server_factory()
    broker = mqs.Broker(backend="redis", url=server.url)
    try:
        broker.declare_topic("orders", max_attempts=3)
        consumer = broker.consume("orders", "g")

        def lose_data_then_publish():
            time.sleep(0.5)
            admin = redis.Redis.from_url(server.url)
            # As a restart of a server without persistence loses everything.
            admin.flushall()
            admin.close()
            # Longer than a wait slice of the get, so its next fetch runs
            # while the topic is missing.
            time.sleep(2.0)
            broker.publish("orders", b"after")

        thread = threading.Thread(target=lose_data_then_publish)
        thread.start()
        try:
            if use_async:
                message = asyncio.run(consumer.get_async(timeout=30))
            else:
                message = consumer.get(timeout=30)
        finally:
            thread.join(30)
        # The get declared the topic again, with this broker's settings,
        # in place of raising UnknownTopic.
        assert message.body == b"after"
        assert broker.topic_config("orders").max_attempts == 3
        message.ack()
    finally:
        broker.close()


def test_server_data_loss_keeps_declared_settings(redis_server_factory):
    server = redis_server_factory()
    broker = mqs.Broker(backend="redis", url=server.url)
    try:
        broker.declare_topic("orders", max_attempts=3, weights={9: 5, 0: 1})
        consumer = broker.consume("orders", "g")
        admin = redis.Redis.from_url(server.url)
        # As a restart of a server without persistence loses everything.
        admin.flushall()
        admin.close()
        broker.publish("orders", b"after")
        config = broker.topic_config("orders")
        assert config.max_attempts == 3
        assert dict(config.weights) == {0: 1, 9: 5}
        # The consumer registers again and gets what came after the loss.
        message = consumer.get(timeout=5)
        assert message.body == b"after"
        message.ack()
        assert broker.stats("orders")["acked"] == 1
        consumer.close()
        with pytest.raises(mqs.ShutDown, match="closed"):
            consumer.get(timeout=1)
    finally:
        broker.close()


@pytest.mark.parametrize("use_async", [False, True])
def test_data_loss_ends_blocked_publish(redis_server_factory, use_async):
    """A publish blocked on a full topic whose data the server loses
    raises UnknownTopic marked `deleted`, sync and async alike, and the
    topic stays gone."""
    server = redis_server_factory()
    broker = mqs.Broker(backend="redis", url=server.url)
    try:
        broker.declare_topic("orders", maxsize=1)
        broker.publish("orders", b"first")

        def lose_data():
            time.sleep(0.5)
            admin = redis.Redis.from_url(server.url)
            # As a restart of a server without persistence loses everything.
            admin.flushall()
            admin.close()

        thread = threading.Thread(target=lose_data)
        thread.start()
        try:
            with pytest.raises(mqs.UnknownTopic) as raised:
                if use_async:
                    asyncio.run(broker.publish_async("orders", b"x",
                                                     timeout=30))
                else:
                    broker.publish("orders", b"x", timeout=30)
        finally:
            thread.join(30)
        assert raised.value.deleted is True
        assert raised.value.published == 0
        assert "was deleted while a publish waited" in str(raised.value)
        assert not broker.backend.has_topic("orders")
    finally:
        broker.close()



def _stash_auto_acked(consumer, monkeypatch, ending, count):
    """Make a get_async of `consumer` (auto_ack) take `count` messages
    after its await ended: cancelled (`ending` "cancel") or with its
    event loop closed ("loop_closed"). Wait until the backend stashed
    them for the consumer."""
    backend = consumer._backend
    fetch_ready = backend._fetch_ready
    fetched = threading.Event()

    def slow_fetch_ready(*args):
        # The await ends while this call is on its way.
        time.sleep(0.3)
        try:
            return fetch_ready(*args)
        finally:
            fetched.set()

    monkeypatch.setattr(backend, "_fetch_ready", slow_fetch_ready)

    async def main():
        task = asyncio.create_task(consumer.get_many_async(count,
                                                           timeout=10))
        await asyncio.sleep(0.1)
        if ending == "loop_closed":
            # asyncio.run cancels the task and closes the loop before
            # the fetch returns.
            return
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The loop runs on while the fetch ends and takes the messages.
        await asyncio.sleep(0.5)

    asyncio.run(main())
    assert fetched.wait(10)
    monkeypatch.undo()
    deadline = time.monotonic() + 5
    while not backend._stashed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(backend._stashed[consumer._id]) == count


@pytest.mark.parametrize("close_async", [False, True])
@pytest.mark.parametrize("ending", ["cancel", "loop_closed"])
def test_close_gives_back_auto_acked_stash(open_broker, monkeypatch,
                                            close_async, ending):
    """Messages that a cancelled get_async took under auto_ack go back
    to the group when the consumer closes before another get, also when
    the event loop closed while the fetch ran."""
    broker = open_broker()
    consumer = broker.consume("t", "g", auto_ack=True)
    broker.publish_many("t", [b"first", b"second"])
    _stash_auto_acked(consumer, monkeypatch, ending, 2)
    if close_async:
        returned = asyncio.run(consumer.close_async())
    else:
        returned = consumer.close()
    assert returned == 2
    assert broker.backend.lost_auto_acked == 0
    other = broker.consume("t", "g", auto_ack=True)
    got = other.get_many(2, timeout=5)
    assert [message.body for message in got] == [b"first", b"second"]
    # Given back unseen: the attempt is refunded.
    assert [message.attempts for message in got] == [1, 1]
    stats = broker.stats("t")
    assert stats["stored"] == 0
    assert stats["in_flight"] == 0


def test_close_counts_stash_of_deleted_topic(open_broker, monkeypatch,
                                             caplog):
    broker = open_broker()
    consumer = broker.consume("t", "g", auto_ack=True)
    broker.publish_many("t", [b"first", b"second"])
    _stash_auto_acked(consumer, monkeypatch, "cancel", 2)
    # Deleted by another process: nothing is left to give them back to.
    open_broker().delete_topic("t")
    caplog.set_level(logging.WARNING, logger="mqs.broker._redis")
    assert consumer.close() == 0
    assert broker.backend.lost_auto_acked == 2
    assert "could not be given back" in caplog.text


def test_close_counts_cancelled_give_back(open_broker, caplog):
    """A give-back of auto-acked messages that is still queued in the
    backend's threads when the broker closes is cancelled by the close:
    its messages are counted as lost and named in the log."""
    broker = open_broker()
    backend = broker.backend
    gate = threading.Event()
    # Every worker busy, so the give-back below stays queued.
    busy = [backend._executor().submit(gate.wait, 30)
            for _ in range(_redis._ASYNC_WORKERS)]
    fetched = concurrent.futures.Future()
    found = [(b"1-0", 1, 1, [b"b", b"x"]), (b"2-0", 2, 1, [b"b", b"y"])]
    fetched.set_result((found, 0, None))
    caplog.set_level(logging.WARNING, logger="mqs.broker._redis")
    try:
        # The consumer closed while its fetch ran: the messages go back
        # through the executor.
        backend._give_back("t", "g", "closed-consumer", True, fetched)
        assert backend.lost_auto_acked == 0
        broker.close()
        assert backend.lost_auto_acked == 2
        assert "1-0, 2-0" in caplog.text
    finally:
        gate.set()
        concurrent.futures.wait(busy, timeout=30)



def test_due_timers_fire_2000_per_call(open_broker, redis_url, namespace):
    """Timers that fall due together fire at most 2,000 per script call,
    so that one call does not block the server for long, and a consumer
    still gets every message."""
    broker = open_broker()
    consumer = broker.consume("t", "g", prefetch=10_000)
    bodies = [b"%d" % index for index in range(5000)]
    broker.publish_many("t", bodies, delay=2)
    admin = redis.Redis.from_url(redis_url)
    timers = f"{{{namespace}:t}}:tm"

    def delay_timers():
        return sum(1 for member in admin.zrange(timers, 0, -1)
                   if member.startswith(b"D"))

    try:
        # Fetches park the delayed messages, each on a timer of its own,
        # at most 1,000 per call.
        for _ in range(10):
            with pytest.raises(mqs.Empty):
                consumer.get_many(10, timeout=0.01)
            if delay_timers() == 5000:
                break
        assert delay_timers() == 5000
        time.sleep(2.2)
        assert consumer.in_flight == 0
        assert delay_timers() == 3000
        assert consumer.in_flight == 0
        assert delay_timers() == 1000
    finally:
        admin.close()
    received = []
    deadline = time.monotonic() + 60
    while len(received) < len(bodies) and time.monotonic() < deadline:
        batch = consumer.get_many(1000, timeout=5)
        received += [message.body for message in batch]
        assert consumer.ack_many(batch) == len(batch)
    assert sorted(received) == sorted(bodies)


# Memory.

def _limit_memory(admin, headroom):
    """Set the maxmemory of the server of client `admin` to its used
    memory now plus `headroom` bytes, with the noeviction policy."""
    admin.config_set("maxmemory-policy", "noeviction")
    used = admin.info("memory")["used_memory"]
    admin.config_set("maxmemory", used + headroom)


def _fill_until_out_of_memory(broker, topic, batch, admin):
    """Publish batches of `batch` bodies of 1 KiB until the server runs
    out of memory; return the ids published and the error.

    Then lower maxmemory 256 KiB below the used memory: the server freed
    the rejected call's arguments, which may take it below the limit
    again.
    """
    published = []
    for _ in range(1000):
        try:
            published += broker.publish_many(topic, [b"x" * 1024] * batch)
        except mqs.BackendOutOfMemory as exc:
            used = admin.info("memory")["used_memory"]
            admin.config_set("maxmemory", used - (256 << 10))
            return published, exc
    raise AssertionError("the server never ran out of memory")


@pytest.mark.parametrize("functions", [True, False],
                         ids=["fcall", "evalsha"])
def test_out_of_memory_raises_and_recovers(redis_server_factory,
                                           monkeypatch, functions):
    """A server out of memory fails the calls that store data with
    BackendOutOfMemory, naming the topic and the fixes; consumers still
    get and ack, and once they freed memory publishing works again,
    with nothing lost. Both ways of running the script: library
    functions, and EVALSHA for servers before Redis 7."""
    monkeypatch.setattr(_redis.RedisBackend, "_use_functions", functions)
    server = redis_server_factory()
    broker = mqs.Broker(backend="redis", url=server.url, retry_timeout=2)
    admin = redis.Redis.from_url(server.url)
    try:
        broker.declare_topic("t", maxsize=1_000_000, when_full="block")
        consumer = broker.consume("t", "g", prefetch=10_000)
        broker.declare_topic("other")
        _limit_memory(admin, 2 << 20)
        # 2500 messages take three script calls, so one that fails after
        # the first keeps what that one stored.
        published, error = _fill_until_out_of_memory(broker, "t", 2500,
                                                      admin)
        assert isinstance(error, mqs.Full)
        assert error.topic == "t"
        assert error.accepted % 1000 == 0
        text = str(error)
        for part in ("'t'", "out of memory", "maxmemory", "retention",
                     "ack", "dlq_purge"):
            assert part in text
        assert error.__cause__ is None
        total = len(published) + error.accepted
        assert broker.stats("t")["published"] == total

        # Raised at once although the topic blocks when full.
        started = time.monotonic()
        with pytest.raises(mqs.BackendOutOfMemory):
            broker.publish("t", b"one")
        with pytest.raises(mqs.BackendOutOfMemory):
            asyncio.run(broker.publish_async("t", b"one", timeout=30))
        assert time.monotonic() - started < 10
        producer = broker.producer("t", linger=60, batch_size=100)
        for index in range(5):
            producer.publish(b"buffered %d" % index)
        with pytest.raises(mqs.BackendOutOfMemory):
            producer.flush()
        assert producer.dropped == 0
        unbuffered = broker.producer("t", linger=0)
        with pytest.raises(mqs.BackendOutOfMemory, match="did not keep"):
            unbuffered.publish(b"not kept")
        unbuffered.close()
        # Deleting a topic frees memory, so it works too.
        broker.delete_topic("other")
        assert not broker.backend.has_topic("other")
        with pytest.raises(mqs.BackendOutOfMemory):
            broker.declare_topic("new")
        with pytest.raises(mqs.BackendOutOfMemory):
            broker.request("t", b"question", timeout=1)
        assert not [name for name in broker.topics()
                    if name.startswith("mqs.reply.")]

        # A new group would store its state, so opening it fails.
        with pytest.raises(mqs.BackendOutOfMemory):
            broker.consume("t", "new-group")
        # Consumers keep working: a new one of the group, gets and acks.
        second = broker.consume("t", "g", prefetch=10_000)
        got = 0
        deadline = time.monotonic() + 60
        while got < total and time.monotonic() < deadline:
            batch = second.get_many(5000, timeout=1)
            assert second.ack_many(batch) == len(batch)
            got += len(batch)
        assert got == total
        stats = broker.stats("t")
        assert stats["acked"] == total
        assert stats["stored"] == 0

        # Memory freed: publishing works again.
        broker.publish("t", b"after")
        assert len(producer.flush()) == 5
        producer.close()
        bodies = [message.body for message in consumer.get_many(10,
                                                                 timeout=5)]
        assert bodies == [b"after"] + [b"buffered %d" % index
                                       for index in range(5)]
    finally:
        # No limit, so that the close of a failed test publishes the
        # producer's batch and does not hide the failure.
        admin.config_set("maxmemory", 0)
        admin.close()
        broker.close()



def test_reply_out_of_memory_names_reply_topic(redis_server_factory):
    server = redis_server_factory()
    broker = mqs.Broker(backend="redis", url=server.url, retry_timeout=2)
    admin = redis.Redis.from_url(server.url)
    try:
        broker.declare_topic("replies")
        broker.publish("t", b"question", reply_to="replies",
                       correlation_id="c1")
        request = broker.consume("t", "g").get(timeout=5)
        _limit_memory(admin, 1 << 20)
        _fill_until_out_of_memory(broker, "filler", 100, admin)
        with pytest.raises(mqs.BackendOutOfMemory) as raised:
            request.reply(b"answer")
        assert raised.value.topic == "replies"
        assert "'replies'" in str(raised.value)
        # The responder still settles the request.
        assert request.ack()
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
        broker.close()



def test_producer_backs_off_while_out_of_memory(redis_server_factory):
    """A producer's background send that finds the server out of memory
    tries again every 0.5 s rather than every linger, keeps its batch,
    and sends it once memory is back."""
    server = redis_server_factory()
    broker = mqs.Broker(backend="redis", url=server.url, retry_timeout=2)
    admin = redis.Redis.from_url(server.url)
    try:
        broker.declare_topic("t")
        _limit_memory(admin, 1 << 20)
        _fill_until_out_of_memory(broker, "filler", 100, admin)
        producer = broker.producer("t", linger=0.005, batch_size=100)
        before = _script_calls(server.url)
        # One publish: a second one could come after the first failed
        # send on a busy machine, and raise that send's error.
        producer.publish(b"0")
        time.sleep(1.5)
        # About 3 tries; one every 5 ms linger would make about 300.
        calls = _script_calls(server.url) - before
        assert calls >= 1
        assert calls <= 10
        assert producer.dropped == 0
        admin.config_set("maxmemory", 0)
        deadline = time.monotonic() + 10
        while broker.stats("t")["published"] < 1 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert broker.stats("t")["published"] == 1
        producer.close()
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
        broker.close()


# Consumer leases.

_LEASED_HOLDER = textwrap.dedent("""
    import sys, time
    import mqs
    from mqs.broker import _redis
    # A lease shorter than the default 5 s, but long enough that the
    # test sees the consumer registered after the kill.
    _redis._LEASE_MIN_S = 3.0
    url, namespace = sys.argv[1], sys.argv[2]
    broker = mqs.Broker(backend="redis", url=url, namespace=namespace)
    consumer = broker.consume("t", "g", prefetch=5, ack_timeout=0.3)
    got = consumer.get_many(5, timeout=30)
    print(consumer._id, *(m.body.decode() for m in got), flush=True)
    time.sleep(600)
""")


def _consumer_fields(admin, namespace, topic, group, consumer):
    """Return the names of the group hashes that still have a field of
    `consumer`."""
    prefix = f"{{{namespace}:{topic}}}:g:{group}\0"
    return [name for name in ("cons", "inf", "lf", "ls")
            if admin.hexists(prefix + name, consumer)]


def test_sigkilled_consumer_expires(open_broker, redis_url, namespace):
    """A consumer whose process was killed stops renewing its lease:
    once the lease passed and its messages went back, the next script
    call removes it, its fields and its stream consumer, and counts it."""
    broker = open_broker()
    broker.publish_many("t", [b"%d" % i for i in range(5)])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen(
        [sys.executable, "-c", _LEASED_HOLDER, redis_url, namespace],
        stdout=subprocess.PIPE, env=env)
    try:
        dead, *bodies = child.stdout.readline().decode().split()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert sorted(bodies) == ["0", "1", "2", "3", "4"]
    admin = redis.Redis.from_url(redis_url)
    lane = lane_stream(namespace, "t", 0)
    assert _consumer_fields(admin, namespace, "t", "g", dead) == [
        "cons", "inf", "lf", "ls"]
    assert broker.group_stats("t")[0].consumers == 1

    survivor = broker.consume("t", "g", prefetch=5, ack_timeout=30)
    got = []
    counts = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            got += survivor.get_many(5, timeout=0.2)
        except mqs.Empty:
            pass
        counts.append(broker.group_stats("t")[0].consumers)
        if len(got) == 5 and counts[-1] == 1:
            break
    # Its messages came back after their ack deadline (0.3 s); the lease
    # (3 s) ended later.
    assert sorted(m.body for m in got) == [b"%d" % i for i in range(5)]
    assert {m.attempts for m in got} == {2}
    assert counts[0] == 2
    assert counts[-1] == 1
    assert survivor.ack_many(got) == 5
    assert _consumer_fields(admin, namespace, "t", "g", dead) == []
    names = {entry["name"].decode()
             for entry in admin.xinfo_consumers(lane, "g")}
    assert dead not in names
    assert survivor._id in names
    admin.close()
    stats = broker.stats("t")
    assert stats["consumers_expired"] == 1
    assert stats["redelivered"] == 5
    assert stats["acked"] == 5
    assert stats["stored"] == 0


@pytest.mark.parametrize("use_async", [False, True])
def test_waiting_consumer_keeps_lease(open_broker, monkeypatch, caplog,
                                      use_async):
    """A consumer that waits in get longer than its lease renews it and
    stays registered, while other clients' calls check the leases."""
    monkeypatch.setattr("mqs.broker._redis._LEASE_MIN_S", 2.0)
    broker = open_broker()
    other = open_broker()
    consumer = broker.consume("t", "g", ack_timeout=0.1)
    caplog.set_level(logging.INFO, logger="mqs.broker._redis")
    counts = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            counts.append(other.group_stats("t")[0].consumers)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with pytest.raises(mqs.Empty):
            if use_async:
                asyncio.run(consumer.get_async(timeout=4))
            else:
                consumer.get(timeout=4)
    finally:
        done.set()
        watcher.join(10)
    assert len(counts) > 10
    assert set(counts) == {1}
    assert "registering it again" not in caplog.text
    assert broker.stats("t")["consumers_expired"] == 0


def test_idle_consumer_expires_and_returns(open_broker, monkeypatch,
                                           caplog):
    """A consumer that made no call for longer than its lease is removed,
    and its next get registers it again, logged at INFO."""
    monkeypatch.setattr("mqs.broker._redis._LEASE_MIN_S", 1.0)
    broker = open_broker()
    consumer = broker.consume("t", "g", ack_timeout=0.1)
    time.sleep(1.5)
    assert broker.group_stats("t")[0].consumers == 0
    assert broker.stats("t")["consumers_expired"] == 1
    broker.publish("t", b"later")
    caplog.set_level(logging.INFO, logger="mqs.broker._redis")
    message = consumer.get(timeout=5)
    assert message.body == b"later"
    assert message.ack()
    assert broker.group_stats("t")[0].consumers == 1
    records = [record for record in caplog.records
               if "registering it again" in record.getMessage()]
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    assert "lease" in records[0].getMessage()
