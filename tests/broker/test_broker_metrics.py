"""Group metrics of the broker: counters, lag and sampled latencies.

The scripted runs check that `Broker.group_stats` and `Broker.stats`
agree with what the test did, on every backend of conftest.py; the
crash test kills a real process that holds a log broker.
"""

import json
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import mqs
from mqs import metrics
from mqs.broker import Backend, GroupStats
from mqs.broker._memory import MemoryBackend


@pytest.fixture(autouse=True)
def sample_every_delivery():
    """Brokers made in a test sample every delivery."""
    previous = metrics.default_sample_every()
    metrics.set_default_sample_every(1)
    yield
    metrics.set_default_sample_every(previous)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def broker(broker):
    """The contract fixture's broker, skipped for a backend that keeps
    the default `Backend.group_stats` (it reports no group metrics)."""
    if type(broker.backend).group_stats is Backend.group_stats:
        pytest.skip(f"backend {broker.backend.name!r} has no group_stats")
    return broker


def only_group(broker, topic):
    groups = broker.group_stats(topic)
    assert len(groups) == 1
    return groups[0]


def test_group_stats_count_scripted_run(broker):
    broker.declare_topic("t", max_attempts=2)
    broker.publish_many("t", range(20))
    consumer = broker.consume("t", "g", prefetch=20, ack_timeout=0.2)
    messages = consumer.get_many(20, timeout=5)
    assert len(messages) == 20
    for message in messages[:10]:
        assert message.ack()
    for message in messages[10:13]:
        assert message.nack(delay=0)
    for message in messages[13:15]:
        assert message.nack(requeue=False)
    # messages[15:] miss their ack deadline and come back once.
    time.sleep(0.3)
    again = consumer.get_many(20, timeout=5)
    assert sorted(m.body for m in again) \
        == list(range(10, 13)) + list(range(15, 20))
    for message in again:
        assert message.ack()

    stats = only_group(broker, "t")
    assert isinstance(stats, GroupStats)
    assert stats.topic == "t"
    assert stats.group == "g"
    assert stats.consumers == 1
    assert stats.delivered == 28
    assert stats.acked == 18
    assert stats.nacked == 5
    assert stats.redelivered == 8  # 3 requeued nacks, 5 missed deadlines
    assert stats.dead_lettered == 2
    assert stats.errors == 5
    assert stats.error_ratio == pytest.approx(5 / 28)
    assert stats.lag_messages == 0
    assert stats.lag_seconds == 0.0
    assert stats.in_flight == 0
    assert stats.sample_every == 1
    assert stats.enqueue_to_deliver.count == 28
    assert stats.deliver_to_ack.count == 18
    topic = broker.stats("t")
    assert topic["delivered"] == stats.delivered
    assert topic["acked"] == stats.acked
    assert topic["nacked"] == stats.nacked
    assert topic["dead_lettered"] == stats.dead_lettered


def test_group_stats_deliver_to_ack_covers_handling_time(broker):
    broker.publish_many("t", range(3))
    consumer = broker.consume("t", "g", prefetch=3)
    messages = consumer.get_many(3, timeout=5)
    time.sleep(0.05)
    for message in messages:
        message.ack()
    latency = only_group(broker, "t").deliver_to_ack
    assert latency.count == 3
    assert latency.p50_s >= 0.05
    assert latency.max_s < 30
    assert latency.buckets[-1][1] == 3


def test_group_stats_lag_seconds_grows_with_wait(broker):
    broker.publish_many("t", range(5))
    consumer = broker.consume("t", "g")
    time.sleep(0.1)
    stats = only_group(broker, "t")
    assert stats.lag_messages == 5
    assert 0.1 <= stats.lag_seconds < 30
    consumer.get(timeout=5).ack()
    assert only_group(broker, "t").lag_messages == 4


def test_group_stats_error_counts_dead_letters_once(broker):
    broker.declare_topic("t", max_attempts=1)
    broker.publish_many("t", range(2))
    consumer = broker.consume("t", "g", prefetch=2, ack_timeout=0.1)
    first, second = consumer.get_many(2, timeout=5)
    assert first.nack()  # dead-letters at max_attempts=1
    time.sleep(0.2)  # second misses its deadline: dead-lettered
    stats = only_group(broker, "t")
    assert stats.dead_lettered == 2
    assert stats.nacked == 1
    assert stats.errors == 2
    assert stats.error_ratio == 1.0


def test_group_stats_per_group(broker):
    broker.publish_many("t", range(4))
    fast = broker.consume("t", "fast", auto_ack=True)
    slow = broker.consume("t", "slow")
    assert len(fast.get_many(4, timeout=5)) == 4
    by_name = {stats.group: stats for stats in broker.group_stats("t")}
    assert set(by_name) == {"fast", "slow"}
    assert by_name["fast"].lag_messages == 0
    assert by_name["fast"].acked == 4
    assert by_name["fast"].deliver_to_ack.count == 0
    assert by_name["slow"].lag_messages == 4
    assert by_name["slow"].delivered == 0
    slow.close()


def test_group_stats_unknown_topic_raises(broker):
    with pytest.raises(mqs.UnknownTopic, match="nope"):
        broker.group_stats("nope")


def test_lag_seconds_follows_simulated_clock():
    clock = FakeClock()
    broker = mqs.Broker(MemoryBackend(clock=clock))
    broker.publish("t", "a")
    broker.publish("t", "b", delay=10)
    consumer = broker.consume("t", "g", prefetch=2)
    clock.now += 4
    stats = only_group(broker, "t")
    assert stats.lag_messages == 1
    assert stats.delayed == 1
    assert stats.lag_seconds == pytest.approx(4)
    message = consumer.get(timeout=0)
    clock.now += 1
    assert only_group(broker, "t").lag_seconds == 0.0
    # Returned by a closing consumer: ready again from the close on.
    consumer.close(drain=False)
    consumer = broker.consume("t", "g", prefetch=2)
    assert message.body == "a"
    assert only_group(broker, "t").lag_seconds == 0.0
    clock.now += 3
    assert only_group(broker, "t").lag_seconds == pytest.approx(3)
    # "b" is due at 1010 and ready from then on.
    clock.now = 1012
    assert consumer.get(timeout=0).ack()
    stats = only_group(broker, "t")
    assert stats.lag_messages == 1
    assert stats.lag_seconds == pytest.approx(2)
    assert stats.enqueue_to_deliver.count == 2
    # "a" waited 4 s before its first delivery and 7 s before its second.
    assert stats.enqueue_to_deliver.max_s == pytest.approx(7, rel=0.04)


def test_enqueue_to_deliver_uses_simulated_clock():
    clock = FakeClock()
    broker = mqs.Broker(MemoryBackend(clock=clock))
    broker.publish_many("t", range(4))
    consumer = broker.consume("t", "g", prefetch=4)
    clock.now += 2
    for message in consumer.get_many(4, timeout=0):
        clock.now += 1
        message.ack()
    stats = only_group(broker, "t")
    assert stats.enqueue_to_deliver.count == 4
    assert stats.enqueue_to_deliver.p50_s == pytest.approx(2, rel=0.04)
    assert stats.deliver_to_ack.count == 4
    assert stats.deliver_to_ack.max_s == pytest.approx(4, rel=0.04)
    assert stats.deliver_to_ack.sum_s == pytest.approx(1 + 2 + 3 + 4)


def test_sampling_one_in_n_deliveries():
    broker = mqs.Broker("memory", sample_every=10)
    broker.publish_many("t", range(100))
    consumer = broker.consume("t", "g", auto_ack=True)
    assert len(consumer.get_many(100, timeout=0)) == 100
    stats = only_group(broker, "t")
    assert stats.sample_every == 10
    assert stats.enqueue_to_deliver.count == 10
    assert stats.delivered == 100


def test_sampling_off_reports_no_latency():
    broker = mqs.Broker("memory", sample_every=None)
    broker.publish_many("t", range(5))
    consumer = broker.consume("t", "g", prefetch=5)
    for message in consumer.get_many(5, timeout=0):
        message.ack()
    stats = only_group(broker, "t")
    assert stats.sample_every is None
    assert stats.enqueue_to_deliver is None
    assert stats.deliver_to_ack is None
    assert stats.acked == 5


@pytest.mark.parametrize("value, error, match", [
    (0, ValueError, "sample_every must be at least 1"),
    ("often", TypeError, "sample_every must be an int, got str 'often'"),
])
def test_sample_every_rejects_bad_value(value, error, match):
    with pytest.raises(error, match=match):
        mqs.Broker("memory", sample_every=value)


def test_log_broker_keeps_group_stats_across_restart(tmp_path):
    path = tmp_path / "broker"
    with mqs.Broker("log", path=path, segment_bytes=1 << 20) as broker:
        broker.publish_many("t", range(6))
        consumer = broker.consume("t", "g", prefetch=6)
        messages = consumer.get_many(6, timeout=5)
        for message in messages[:4]:
            message.ack()
        messages[4].nack(requeue=False)
        before = only_group(broker, "t")
        consumer.close(drain=False)
    with mqs.Broker("log", path=path, segment_bytes=1 << 20) as broker:
        after = only_group(broker, "t")
    assert after.delivered == before.delivered == 6
    assert after.acked == before.acked == 4
    assert after.errors == before.errors == 1
    assert after.enqueue_to_deliver.count == 6
    assert after.deliver_to_ack.count == 4
    assert after.deliver_to_ack.sum_s \
        == pytest.approx(before.deliver_to_ack.sum_s)
    assert after.lag_messages == 1


# The child opens the log broker, publishes, acks and nacks, reports
# and then holds 3 messages in flight until it is killed.
_CONSUMER = """
import json, sys, time
import mqs
from mqs import metrics
metrics.set_default_sample_every(1)
broker = mqs.Broker("log", path=sys.argv[1], segment_bytes=1 << 20)
broker.declare_topic("t", max_attempts=5)
broker.publish_many("t", range(12))
consumer = broker.consume("t", "g", prefetch=12)
messages = consumer.get_many(12, timeout=5)
for message in messages[:6]:
    message.ack()
for message in messages[6:9]:
    message.nack(delay=0)
print(json.dumps({"held": len(messages) - 9}), flush=True)
time.sleep(600)
"""


def test_group_stats_after_consumer_process_killed(tmp_path):
    path = tmp_path / "broker"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CONSUMER), str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line, child.stderr.read()
        assert json.loads(line) == {"held": 3}
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        child.stdout.close()
        child.stderr.close()
    metrics.set_default_sample_every(1)
    with mqs.Broker("log", path=path, segment_bytes=1 << 20) as broker:
        stats = only_group(broker, "t")
        # The killed process's consumer is closed on open: its 3 in-flight
        # messages are ready again, next to the 3 nacked ones.
        assert stats.delivered == 12
        assert stats.acked == 6
        assert stats.nacked == 3
        assert stats.errors == 3
        assert stats.in_flight == 0
        assert stats.lag_messages == 6
        assert stats.consumers == 0
        assert stats.enqueue_to_deliver.count == 12
        assert stats.deliver_to_ack.count == 6
        consumer = broker.consume("t", "g", prefetch=6)
        again = consumer.get_many(6, timeout=5)
        assert sorted(m.body for m in again) == list(range(6, 12))
        for message in again:
            message.ack()
        stats = only_group(broker, "t")
        topic = broker.stats("t")
        consumer.close()
    assert stats.delivered == topic["delivered"] == 18
    assert stats.acked == topic["acked"] == 12
    assert stats.lag_messages == 0
    assert topic["stored"] == 0


def test_exporter_serves_group_metrics(tmp_path):
    registry = metrics.MetricsRegistry()
    broker = mqs.Broker("log", path=tmp_path / "broker",
                        segment_bytes=1 << 20)
    broker.publish_many("orders", range(5))
    consumer = broker.consume("orders", "billing", prefetch=5)
    messages = consumer.get_many(5, timeout=5)
    for message in messages[:3]:
        message.ack()
    messages[3].nack(requeue=False)
    handle = metrics.register_broker(broker, ["orders"], name="main",
                                     registry=registry)
    from mqs.exporter import MqsCollector
    from prometheus_client import CollectorRegistry, start_http_server
    prometheus = CollectorRegistry(auto_describe=False)
    prometheus.register(MqsCollector(registry, scan_shared=False))
    server, thread = start_http_server(0, addr="127.0.0.1",
                                       registry=prometheus)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
        handle.remove()
        consumer.close(drain=False)
        broker.close()
    families = {family.name: family
                for family in text_string_to_metric_families(text)}
    labels = {"broker": "main", "topic": "orders", "group": "billing"}

    def value(name, **extra):
        wanted = {**labels, **extra}
        found = [sample.value for family in families.values()
                 for sample in family.samples
                 if sample.name == name and sample.labels == wanted]
        assert len(found) == 1, (name, wanted)
        return found[0]

    assert value("mqs_topic_consumer_lag_messages") == 0
    assert value("mqs_topic_consumer_lag_seconds") == 0
    assert value("mqs_topic_group_in_flight_messages") == 1
    assert value("mqs_topic_group_consumers") == 1
    assert value("mqs_topic_group_messages_total", event="delivered") == 5
    assert value("mqs_topic_group_messages_total", event="acked") == 3
    assert value("mqs_topic_group_messages_total",
                 event="dead_lettered") == 1
    assert value("mqs_topic_group_errors_total") == 1
    assert value("mqs_topic_group_error_ratio") == pytest.approx(0.2)
    assert value("mqs_topic_latency_seconds_count",
                 stage="enqueue_to_deliver") == 5
    assert value("mqs_topic_latency_seconds_count",
                 stage="deliver_to_ack") == 3
    assert value("mqs_topic_latency_seconds_bucket",
                 stage="deliver_to_ack", le="+Inf") == 3
    assert families["mqs_topic_latency_seconds"].type == "histogram"
    assert families["mqs_topic_consumer_lag_seconds"].type == "gauge"
    assert families["mqs_topic_group_errors"].type == "counter"


def test_register_broker_skips_groups_of_backend_without_them():
    class TopicsOnly(MemoryBackend):
        name = "topics-only"

        def group_stats(self, topic):
            raise NotImplementedError("no group stats here")

    registry = metrics.MetricsRegistry()
    broker = mqs.Broker(TopicsOnly())
    broker.publish("t", 1)
    handle = metrics.register_broker(broker, ["t"], registry=registry)
    names = {sample.metric.name
             for sample in registry.collect(scan_shared=False)}
    handle.remove()
    assert "mqs_topic_messages" in names
    assert "mqs_topic_consumer_lag_seconds" not in names
