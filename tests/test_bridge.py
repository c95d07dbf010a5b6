"""Tests of `mqs.bridge` and `mqs bridge` with log brokers and real Redis."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import mqs
from mqs import bridge
from mqs.broker._policy import MAX_TOPIC_BYTES

redis = pytest.importorskip("redis")


@pytest.fixture
def redis_endpoint_url(redis_url):
    """Return `redis_url`; redis brokers opened by the test use the
    namespace ``mqs`` on it, so its keys are deleted after the test."""
    client = redis.Redis.from_url(redis_url)
    yield redis_url
    keys = list(client.scan_iter(match="{mqs:bridge-*", count=1000))
    if keys:
        client.unlink(*keys)
    client.close()


@pytest.mark.parametrize("spec, expected", [
    ("redis://127.0.0.1:1/0#orders",
     bridge.Endpoint("redis", "redis://127.0.0.1:1/0", "orders")),
    ("rediss://u:p@h:2/0#a#b", bridge.Endpoint("redis", "rediss://u:p@h:2/0#a",
                                              "b")),
    ("log:/tmp/dir#t", bridge.Endpoint("log", "/tmp/dir", "t")),
    ("shm:orders#t", bridge.Endpoint("shm", "orders", "t")),
])
def test_parse_endpoint(spec, expected):
    assert bridge.parse_endpoint(spec) == expected


@pytest.mark.parametrize("spec, match", [
    ("redis://127.0.0.1:1/0", "add the topic after '#'"),
    ("mem:q#t", "must start with redis://"),
    ("log:#t", "must start with redis://"),
])
def test_parse_endpoint_rejects(spec, match):
    with pytest.raises(ValueError, match=match):
        bridge.parse_endpoint(spec)


@pytest.mark.parametrize("idle_timeout", [-1, float("nan"), float("inf"),
                                          "1", True])
def test_forward_rejects_bad_idle_timeout(idle_timeout):
    broker = mqs.Broker(backend="memory")
    broker.publish("t", b"x")
    with pytest.raises(ValueError, match="idle_timeout must be a finite"):
        bridge.forward(broker, "t", broker, "u", idle_timeout=idle_timeout)
    assert broker.stats("t")["acked"] == 0
    broker.close()


@pytest.mark.parametrize("value", ["no", 0, None])
def test_bridge_bool_options_reject_non_bool(value, tmp_path):
    broker = mqs.Broker(backend="memory")
    broker.publish("t", b"x")
    with pytest.raises(TypeError, match="wait_for_topic must be True or "
                                        "False, got"):
        bridge.forward(broker, "t", broker, "u", wait_for_topic=value)
    assert broker.stats("t")["acked"] == 0
    broker.close()
    endpoint = bridge.parse_endpoint(f"log:{tmp_path / 'b'}#t")
    with pytest.raises(TypeError, match="pickle must be True or False, got"):
        bridge.open_endpoint(endpoint, pickle=value)


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_cli_bridge_rejects_bad_idle_exit(value, tmp_path, capsys):
    from mqs.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(["bridge", f"log:{tmp_path}/in#t", f"log:{tmp_path}/out#t",
              "--idle-exit", value])
    assert exit_info.value.code == 2
    assert "--idle-exit" in capsys.readouterr().err
    assert not (tmp_path / "in").exists()


def test_forward_keeps_message_fields(redis_endpoint_url, tmp_path):
    source = mqs.Broker(backend="log", path=tmp_path / "log")
    destination = mqs.Broker(backend="redis", url=redis_endpoint_url)
    topic = "bridge-fields"
    source.publish("t", b"a", priority=9, key="k", headers={"trace": "x"})
    source.publish("t", "b", correlation_id="c1")
    moved = bridge.forward(source, "t", destination, topic, max_messages=2)
    assert moved == 2
    consumer = destination.consume(topic, "g", prefetch=2)
    got = sorted(consumer.get_many(2, timeout=5),
                 key=lambda message: message.priority, reverse=True)
    assert [m.body for m in got] == [b"a", "b"]
    assert got[0].priority == 9
    assert got[0].key == "k"
    assert got[0].headers["trace"] == "x"
    assert got[0].headers[bridge.SOURCE_HEADER].startswith("t/")
    assert got[1].correlation_id == "c1"
    assert source.stats("t")["acked"] == 2
    source.close()
    destination.close()


def test_forward_shm_to_redis_and_back(redis_endpoint_url):
    import uuid

    name = f"mqs-bridge-test-{uuid.uuid4().hex[:8]}"
    local = mqs.Broker(backend="shm", name=name, journal_bytes=1 << 20)
    remote = mqs.Broker(backend="redis", url=redis_endpoint_url)
    try:
        local.publish_many("out", [b"%d" % i for i in range(50)])
        assert bridge.forward(local, "out", remote, "bridge-shm",
                              max_messages=50) == 50
        assert bridge.forward(remote, "bridge-shm", local, "back",
                              max_messages=50) == 50
        consumer = local.consume("back", "g", prefetch=50, auto_ack=True)
        bodies = [m.body for m in consumer.get_many(50, timeout=5)]
        assert sorted(bodies, key=int) == [b"%d" % i for i in range(50)]
    finally:
        remote.close()
        local.close()
        mqs.Broker.unlink(name)


def test_forward_drops_second_copy_at_destination(redis_endpoint_url,
                                                  tmp_path):
    source = mqs.Broker(backend="log", path=tmp_path / "log")
    destination = mqs.Broker(backend="redis", url=redis_endpoint_url)
    topic = "bridge-dup"
    source.publish("t", b"once")
    message = source.consume("t", "mqs.bridge", ack_timeout=0.1).get(
        timeout=5)
    # A forwarder that published this message and died before its ack.
    destination.publish(topic, b"once",
                        dedup_id=f"mqs.bridge:t:{message.id}")
    assert bridge.forward(source, "t", destination, topic,
                          idle_timeout=1.0) == 1
    consumer = destination.consume(topic, "g")
    assert consumer.get(timeout=5).body == b"once"
    with pytest.raises(mqs.Empty):
        consumer.get(timeout=0.2)
    assert destination.stats(topic)["deduplicated"] == 1
    source.close()
    destination.close()


def _bridge_process(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-m", "mqs", "bridge", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)


def test_cli_bridge_survives_sigkill_and_comes_back(redis_endpoint_url,
                                                    tmp_path, scale):
    total = int(3000 * scale)
    log_dir = tmp_path / "out"
    source = mqs.Broker(backend="log", path=log_dir)
    source.publish_many("t", [b"%d" % i for i in range(total)])
    source.close()
    redis_end = f"{redis_endpoint_url}#bridge-cli"
    watcher = mqs.Broker(backend="redis", url=redis_endpoint_url)
    watcher.declare_topic("bridge-cli")

    # Out to Redis, killed part way.
    first = _bridge_process(f"log:{log_dir}#t", redis_end, "--batch", "50")
    deadline = time.monotonic() + 60
    while watcher.stats("bridge-cli")["published"] < total // 4 \
            and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert watcher.stats("bridge-cli")["published"] < total

    # A second run forwards the rest, and the redelivered part once.
    second = _bridge_process(f"log:{log_dir}#t", redis_end,
                             "--idle-exit", "1")
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err.decode()
    stats = watcher.stats("bridge-cli")
    assert stats["published"] == total
    watcher.close()

    # And back from Redis into another log.
    back_dir = tmp_path / "back"
    third = _bridge_process(redis_end, f"log:{back_dir}#t",
                            "--max-messages", str(total))
    out, err = third.communicate(timeout=120)
    assert third.returncode == 0, err.decode()
    assert out.decode().strip() == f"forwarded {total} messages"
    back = mqs.Broker(backend="log", path=back_dir)
    consumer = back.consume("t", "g", prefetch=500, auto_ack=True)
    bodies = []
    while True:
        try:
            bodies += [m.body for m in consumer.get_many(500, timeout=0)]
        except mqs.Empty:
            break
    back.close()
    assert sorted(bodies, key=int) == [b"%d" % i for i in range(total)]


def test_cli_bridge_reports_bad_endpoint(tmp_path):
    process = _bridge_process("nowhere", f"log:{tmp_path}#t")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "invalid endpoint 'nowhere'" in err.decode()


@pytest.mark.parametrize("source, text, fix", [
    ("log:{tmp}/missing#t", "log broker directory '{tmp}/missing' not found",
     "check the path, or create the broker first by opening "
     "mqs.Broker(backend='log', path='{tmp}/missing')"),
    ("shm:mqs-test-no-such-broker#t",
     "shm broker 'mqs-test-no-such-broker' not found",
     "check the name, or create the broker first by opening "
     "mqs.Broker(backend='shm', name='mqs-test-no-such-broker')"),
])
def test_cli_bridge_refuses_a_missing_source(tmp_path, source, text, fix):
    process = _bridge_process(source.format(tmp=tmp_path),
                              f"log:{tmp_path}/out#t")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert text.format(tmp=tmp_path) in err.decode()
    assert fix.format(tmp=tmp_path) in err.decode()
    assert "Traceback" not in err.decode()
    # Nothing was created in place of the missing source.
    assert not (tmp_path / "missing").exists()
    assert not os.path.exists("/dev/shm/mqs.broker.mqs-test-no-such-broker")


def test_forward_rejects_same_topic():
    broker = mqs.Broker(backend="memory")
    broker.declare_topic("t")
    broker.publish("t", b"x")
    with pytest.raises(ValueError, match="same topic 't'"):
        bridge.forward(broker, "t", broker, "t", idle_timeout=0.1,
                       max_messages=50)
    assert broker.stats("t")["published"] == 1
    broker.close()


@pytest.mark.parametrize("first, second, same", [
    ("log:d#t", "log:./d#t", True),
    ("log:d#t", "log:d#u", False),
    ("log:d#t", "shm:d#t", False),
    ("shm:b#t", "shm:b#t", True),
    ("redis://127.0.0.1:7000/0#t", "redis://127.0.0.1:7000/1#t", False),
])
def test_same_topic(first, second, same):
    assert bridge.same_topic(bridge.parse_endpoint(first),
                             bridge.parse_endpoint(second)) is same


def test_cli_bridge_rejects_same_topic(tmp_path):
    path = tmp_path / "broker"
    broker = mqs.Broker(backend="log", path=str(path))
    broker.declare_topic("t")
    broker.publish("t", b"x")
    broker.close()
    process = _bridge_process(f"log:{path}#t", f"log:{path}/../broker#t",
                              "--idle-exit", "1", "--max-messages", "50")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "are the same topic" in err.decode()
    assert "Traceback" not in err.decode()
    reopened = mqs.Broker(backend="log", path=str(path))
    assert reopened.stats("t")["published"] == 1
    reopened.close()


def test_forward_rejects_missing_source_topic():
    source = mqs.Broker(backend="memory")
    destination = mqs.Broker(backend="memory")
    with pytest.raises(mqs.UnknownTopic,
                       match="source topic 'orders' does not exist") as info:
        bridge.forward(source, "orders", destination, "copy",
                       idle_timeout=30)
    assert info.value.topic == "orders"
    assert "pass wait_for_topic=True to wait" in str(info.value)
    # Nothing was declared in place of the missing topic.
    assert not source.backend.has_topic("orders")


def test_forward_waits_for_topic_when_asked(tmp_path):
    source = mqs.Broker(backend="log", path=tmp_path / "source")
    destination = mqs.Broker(backend="memory")

    def produce_later():
        time.sleep(0.5)
        source.declare_topic("orders")
        source.publish("orders", b"late")

    producer = threading.Thread(target=produce_later)
    producer.start()
    try:
        moved = bridge.forward(source, "orders", destination, "copy",
                               max_messages=1, wait_for_topic=True)
    finally:
        producer.join(30)
    assert moved == 1
    message = destination.consume("copy", "g").get(timeout=5)
    assert message.body == b"late"
    source.close()


def test_forward_topic_wait_ends_on_idle_timeout():
    source = mqs.Broker(backend="memory")
    destination = mqs.Broker(backend="memory")
    moved = bridge.forward(source, "orders", destination, "copy",
                           idle_timeout=0.3, wait_for_topic=True)
    assert moved == 0
    assert not source.backend.has_topic("orders")


def test_cli_bridge_rejects_missing_source_topic(tmp_path):
    source = mqs.Broker(backend="log", path=tmp_path / "in")
    source.declare_topic("other")
    source.close()
    process = _bridge_process(f"log:{tmp_path}/in#orders",
                              f"log:{tmp_path}/out#t", "--idle-exit", "30")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "source topic 'orders' does not exist" in err.decode()
    assert "rerun mqs bridge with --wait-for-topic to wait" in err.decode()
    assert "wait_for_topic" not in err.decode()
    assert "Traceback" not in err.decode()
    # The failed start created no destination broker.
    assert not (tmp_path / "out").exists()


def test_cli_bridge_missing_shm_topic_creates_nothing(tmp_path):
    name = f"mqs-test-bridge-{os.getpid()}"
    source = mqs.Broker(backend="shm", name=name)
    try:
        source.publish("orders", "x")
        process = _bridge_process(f"shm:{name}#nosuch",
                                  f"log:{tmp_path}/x#y")
        out, err = process.communicate(timeout=60)
    finally:
        source.close()
        mqs.Broker.unlink(name)
    assert process.returncode == 1
    assert "source topic 'nosuch' does not exist" in err.decode()
    assert not (tmp_path / "x").exists()


def test_cli_bridge_bad_topic_creates_nothing(tmp_path):
    source = mqs.Broker(backend="log", path=tmp_path / "in")
    source.declare_topic("orders")
    source.close()
    too_long = "t" * (MAX_TOPIC_BYTES + 1)
    process = _bridge_process(f"log:{tmp_path}/in#orders",
                              f"log:{tmp_path}/out#{too_long}")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert f"topic must be at most {MAX_TOPIC_BYTES} bytes" in err.decode()
    assert not (tmp_path / "out").exists()


def test_cli_bridge_wait_for_topic_idle_exit(tmp_path):
    source = mqs.Broker(backend="log", path=tmp_path / "in")
    source.declare_topic("other")
    source.close()
    process = _bridge_process(f"log:{tmp_path}/in#orders",
                              f"log:{tmp_path}/out#t", "--wait-for-topic",
                              "--idle-exit", "0.5")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err.decode()
    assert out.decode().strip() == "forwarded 0 messages"
    # The source topic never appeared, so no destination was created.
    assert not (tmp_path / "out").exists()


def test_cli_bridge_names_pickle_option(redis_endpoint_url, tmp_path):
    source = mqs.Broker(backend="log", path=tmp_path / "in")
    source.publish("t", {"order": 1})
    source.close()
    process = _bridge_process(f"log:{tmp_path}/in#t",
                              f"{redis_endpoint_url}#bridge-dict",
                              "--max-messages", "1", "--idle-exit", "30")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "got dict" in err.decode()
    assert "rerun mqs bridge with --pickle" in err.decode()
    assert "serializer=" not in err.decode()
    assert "Traceback" not in err.decode()

    process = _bridge_process(f"log:{tmp_path}/in#t",
                              f"{redis_endpoint_url}#bridge-dict",
                              "--max-messages", "1", "--idle-exit", "30",
                              "--pickle")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err.decode()
    assert out.decode().strip() == "forwarded 1 messages"


def test_cli_bridge_unreachable_redis_fails_fast(tmp_path):
    from test_cli_ops import closed_redis_url

    source = mqs.Broker(backend="log", path=tmp_path / "in")
    source.declare_topic("t")
    source.close()
    process = _bridge_process(f"log:{tmp_path}/in#t",
                              f"{closed_redis_url()}#t", "--retry-timeout",
                              "0.5")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "unreachable for 0.5 s" in err.decode()
    assert "raise --retry-timeout" in err.decode()
    assert "Traceback" not in err.decode()


def test_cli_bridge_lost_redis_names_flag(redis_server_factory, tmp_path):
    server = redis_server_factory()
    watcher = mqs.Broker(backend="redis", url=server.url)
    watcher.publish("bridge-lost", b"first")
    process = _bridge_process(f"{server.url}#bridge-lost",
                              f"log:{tmp_path}/out#t", "--retry-timeout", "1")
    try:
        deadline = time.monotonic() + 60
        while watcher.stats("bridge-lost")["acked"] < 1 \
                and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert watcher.stats("bridge-lost")["acked"] == 1
        watcher.close()

        stopped = time.monotonic()
        server.stop()
        out, err = process.communicate(timeout=60)
        elapsed = time.monotonic() - stopped
    finally:
        watcher.close()
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 1
    error = err.decode()
    assert "Traceback" not in error
    assert "unreachable for 1.0 s" in error
    assert "raise --retry-timeout" in error
    assert "retry_timeout" not in error
    # The running bridge used the flag's 1 s, not the 30 s default.
    assert elapsed < 20
    # One series of retries: closing the consumer did not retry again.
    assert error.count("retry 1 in") == 1, error


def test_cli_bridge_retry_timeout_defaults_documented():
    from mqs.broker._redis import DEFAULT_RETRY_TIMEOUT_S
    from mqs.cli_broker import RETRY_TIMEOUT_S

    process = _bridge_process("--help")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err.decode()
    help_text = " ".join(out.decode().split())
    assert (f"default: {RETRY_TIMEOUT_S:g} at start-up, "
            f"{DEFAULT_RETRY_TIMEOUT_S:g} while running") in help_text
    readme_path = os.path.join(os.path.dirname(__file__), os.pardir,
                               "README.md")
    with open(readme_path, encoding="utf-8") as readme_file:
        readme = " ".join(readme_file.read().split())
    assert (f"the bridge retries for {RETRY_TIMEOUT_S:g} s at start-up "
            f"and for {DEFAULT_RETRY_TIMEOUT_S:g} s while running") in readme
