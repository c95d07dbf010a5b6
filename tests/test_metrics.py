"""Tests of stats(), latency sampling and the metrics registry."""

import glob
import logging
import multiprocessing
import os
import pickle
import time
import uuid

import pytest

import mqs
from mqs import metrics

SHM_DIR = "/dev/shm"
PAGE = os.sysconf("SC_PAGESIZE")


@pytest.fixture
def shm_name():
    """Return a queue name unique to this test; remove its files after."""
    name = f"test-metrics-{uuid.uuid4().hex[:16]}"
    yield name
    for path in glob.glob(os.path.join(SHM_DIR, f"mqs.{name}*")):
        os.unlink(path)


# ------------------------------------------------------- in-process queues


def test_queue_stats_count_puts_gets_and_depth():
    q = mqs.Queue()
    for i in range(10):
        q.put(i)
    q.put_many(range(5))
    assert q.get() == 0
    assert q.get_many(4) == [1, 2, 3, 4]
    stats = q.stats()
    assert stats.kind == "Queue"
    assert stats.enqueued == 15
    assert stats.dequeued == 5
    assert stats.depth == 10
    assert stats.delayed == 0
    assert stats.unfinished_tasks == 15
    assert dict(stats.dropped) == {"shutdown": 0}


def test_queue_stats_count_delayed_items():
    q = mqs.Queue()
    q.put("later", delay=60)
    q.put("soon", delay=0.01)
    q.put("now")
    time.sleep(0.05)
    stats = q.stats()
    assert stats.enqueued == 3
    assert stats.delayed == 1
    assert stats.depth == 2
    assert stats.dequeued == 0


def test_queue_stats_count_shutdown_drops():
    q = mqs.Queue()
    q.put_many(range(7))
    q.put("later", delay=60)
    assert q.get() == 0
    q.shutdown(immediate=True)
    stats = q.stats()
    assert stats.dropped["shutdown"] == 7
    assert stats.dequeued == 1
    assert stats.depth == 0
    assert stats.delayed == 0
    assert stats.enqueued == stats.dequeued + stats.dropped["shutdown"]


def test_simple_queue_stats_count_puts_gets_and_drops():
    q = mqs.SimpleQueue()
    q.put_many(range(3000))
    q.put("x")
    assert len(q.get_many(2000)) == 2000
    q.get()
    before = q.stats()
    assert before.kind == "SimpleQueue"
    assert before.enqueued == 3001
    assert before.dequeued == 2001
    assert before.depth == 1000
    assert before.unfinished_tasks is None
    q.shutdown(immediate=True)
    after = q.stats()
    assert after.dropped["shutdown"] == 1000
    assert after.dequeued == 2001


def test_stats_is_frozen():
    stats = mqs.Queue().stats()
    with pytest.raises(AttributeError):
        stats.depth = 3


@pytest.mark.parametrize("cls", [mqs.Queue, mqs.SimpleQueue])
def test_latency_sampling_every_message(cls):
    q = cls()
    q.set_latency_sampling(1)
    for i in range(20):
        q.put(i)
    time.sleep(0.02)
    for _ in range(20):
        q.get()
    latency = q.stats().latency
    assert latency.count == 20
    assert latency.sample_every == 1
    # Every item waited at least the 20 ms sleep, and far less than 10 s.
    assert latency.p50_s >= 0.019
    assert latency.max_s < 10
    assert latency.p50_s <= latency.p99_s <= latency.p999_s <= latency.max_s
    assert latency.buckets[-1][1] == 20
    assert latency.sum_s >= 20 * 0.019


def test_latency_sampling_rate_picks_one_in_n():
    q = mqs.SimpleQueue()
    q.set_latency_sampling(100)
    for i in range(1000):
        q.put(i)
    for _ in range(1000):
        q.get()
    assert q.stats().latency.count == 10


def test_latency_sampling_counts_get_many_ranges():
    q = mqs.Queue()
    q.set_latency_sampling(10)
    for i in range(100):
        q.put(i)
    q.get_many(100)
    assert q.stats().latency.count == 10


def test_latency_sampling_skips_rejected_puts():
    q = mqs.Queue(maxsize=1)
    q.set_latency_sampling(1)
    q.put("a")
    time.sleep(0.05)
    with pytest.raises(mqs.Full):
        q.put_nowait("b")
    assert q.get() == "a"
    q.put("b")
    assert q.get() == "b"
    latency = q.stats().latency
    assert latency.count == 2
    # "a" waited 50 ms; "b" was got at once, so its stamp is from its
    # accepted put, not from the rejected one 50 ms earlier.
    assert dict(latency.buckets)[0.025] == 1
    assert latency.max_s >= 0.049


@pytest.mark.parametrize("cls", [mqs.Queue, mqs.SimpleQueue])
def test_latency_sampling_stops_after_shutdown_drop(cls):
    q = cls()
    q.set_latency_sampling(1)
    q.put_many(range(5))
    q.shutdown(immediate=True)
    assert q.stats().latency.count == 0


def test_latency_sampling_off_returns_none():
    q = mqs.Queue()
    q.set_latency_sampling(None)
    q.put(1)
    q.get()
    assert q.stats().latency is None


def test_default_sample_every_applies_to_new_queues():
    previous = metrics.default_sample_every()
    try:
        metrics.set_default_sample_every(None)
        assert mqs.Queue().stats().latency is None
        metrics.set_default_sample_every(5)
        assert mqs.SimpleQueue().stats().latency.sample_every == 5
    finally:
        metrics.set_default_sample_every(previous)


@pytest.mark.parametrize("value, error, match", [
    (0, ValueError, r"sample_every must be at least 1 \(1 samples every "
                    r"message\), got 0"),
    (-3, ValueError, r"got -3"),
    (2.5, TypeError, r"sample_every must be an int, got float 2.5"),
    (True, TypeError, r"got bool True"),
])
def test_latency_sampling_rejects_bad_rate(value, error, match):
    with pytest.raises(error, match=match):
        mqs.Queue().set_latency_sampling(value)


def test_histogram_buckets_are_cumulative():
    histogram = metrics.LatencyHistogram()
    for value_ns in (500, 3_000, 3_000, 2_000_000_000):
        histogram.record_ns(value_ns)
    summary = histogram.summary(1)
    buckets = dict(summary.buckets)
    assert buckets[1e-06] == 1
    assert buckets[5e-06] == 3
    assert buckets[1.0] == 3
    assert buckets[2.5] == 4
    assert summary.count == 4
    assert summary.max_s == pytest.approx(2.0, rel=0.01)


# ------------------------------------------------------- shared queues


def _produce(name, count):
    q = mqs.SharedQueue(name=name, create=False)
    for i in range(count):
        q.put(b"m%d" % i)
    q.close()


def test_shared_queue_stats_count_across_processes(shm_name):
    q = mqs.SharedQueue(name=shm_name, groups=2, capacity_bytes=1 << 16)
    try:
        child = multiprocessing.get_context("spawn").Process(
            target=_produce, args=(shm_name, 25))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        for _ in range(10):
            q.get(timeout=5)
        group1 = q.for_group(1)
        group1.get(timeout=5)
        stats = q.stats()
        assert stats.enqueued == 25
        assert stats.dequeued == (10, 1)
        assert stats.lag == (15, 24)
        assert stats.depth == 15
        assert group1.stats().depth == 24
        assert stats.attached_processes == 2
        assert stats.used_bytes == 24 * 32
        assert dict(stats.dropped) == {"repaired_record": 0,
                                       "consumer_died": 0,
                                       "decode_failed": 0,
                                       "damaged_record": 0}
        group1.close()
    finally:
        q.unlink()
        q.close()


def test_inspect_reads_without_attaching(shm_name):
    q = mqs.SharedQueue(name=shm_name, capacity_bytes=PAGE)
    try:
        q.put_many([b"a", b"b", b"c"])
        q.get()
        seen = metrics.inspect_shared_queue(shm_name)
        assert seen.name == shm_name
        assert seen.enqueued == 3
        assert seen.dequeued == (1,)
        assert seen.depth == 2
        # Only q's own process slot is held: inspection takes none.
        assert seen.attached_processes == 1
        assert q.stats().attached_processes == 1
        assert q.get() == b"b"
    finally:
        q.unlink()
        q.close()


def test_inspect_missing_queue_raises_not_found():
    with pytest.raises(mqs.QueueNotFound, match="no shared queue named "
                                                "'no-such-queue-x'"):
        metrics.inspect_shared_queue("no-such-queue-x")


def test_inspect_foreign_file_raises_layout_error(shm_name):
    path = os.path.join(SHM_DIR, f"mqs.{shm_name}")
    with open(path, "wb") as f:
        f.write(b"\0" * (1 << 17))
    with pytest.raises(mqs.QueueLayoutError, match="not an mqs queue|not "
                                                   "initialised"):
        metrics.inspect_shared_queue(shm_name)
    assert shm_name not in {s.name for s in metrics.scan_shared_queues()}


def test_scan_skips_durable_queue_with_damaged_log(shm_name, tmp_path):
    """A named durable queue whose log cannot be opened (a damaged
    segment header) still shows its ring's stats, and the scan and the
    exporter's collection go on with the other queues."""
    log_dir = str(tmp_path / "log")
    durable = mqs.SharedQueue(name=shm_name, persist=log_dir)
    other_name = shm_name + "-other"
    other = mqs.SharedQueue(name=other_name, capacity_bytes=PAGE)
    try:
        durable.put(b"x")
        segment = sorted(glob.glob(os.path.join(log_dir, "*.seg")))[0]
        with open(segment, "r+b") as file:
            file.write(b"\xff" * 8)
        found = {s.name: s for s in metrics.scan_shared_queues()}
        assert found[shm_name].persist is None
        assert other_name in found
        assert list(metrics.REGISTRY.collect())
    finally:
        other.close()
        durable.close()
        for path in glob.glob(os.path.join(SHM_DIR,
                                           f"mqs-persist.{shm_name}")):
            os.unlink(path)


def test_scan_finds_named_queues(shm_name):
    q = mqs.SharedQueue(name=shm_name, capacity_bytes=PAGE)
    try:
        q.put(b"x")
        found = {s.name: s for s in metrics.scan_shared_queues()}
        assert found[shm_name].depth == 1
    finally:
        q.unlink()
        q.close()


# ---------------------------------------------------------- segment logs


def test_segment_log_stats_report_group_lag(tmp_path):
    with mqs.SegmentLog(tmp_path / "log", fsync="never") as log:
        for i in range(50):
            log.append(b"%d" % i)
        log.commit("billing", 20)
        log.commit("audit", 50)
        stats = log.stats()
    assert stats.end_offset == 50
    assert stats.appended_records == 50
    assert dict(stats.committed) == {"audit": 50, "billing": 20}
    assert dict(stats.consumer_lag) == {"audit": 0, "billing": 30}
    assert stats.records_dropped == 0


def test_segment_log_stats_count_torn_tail(tmp_path):
    path = tmp_path / "log"
    with mqs.SegmentLog(path, fsync="never") as log:
        for i in range(10):
            log.append(b"record-%d" % i)
    # Without the recovery point of the clean close, the log is as a
    # writer that crashed leaves it, so the damaged last record is a torn
    # tail and recovery cuts it.
    (path / "recovery-point").unlink()
    segment = sorted(path.glob("*.seg"))[-1]
    data = bytearray(segment.read_bytes())
    position = data.rfind(b"record-9")
    data[position] ^= 0xFF
    segment.write_bytes(bytes(data))
    with mqs.SegmentLog(path, fsync="never") as log:
        stats = log.stats()
    assert stats.records_dropped == 1
    assert stats.end_offset == 9


# -------------------------------------------------------------- registry


def test_registry_exports_named_queue_and_collector():
    registry = metrics.MetricsRegistry()
    q = mqs.Queue()
    registry.register(q, "jobs")
    q.put(1)
    topic_depth = metrics.Metric("mqs_topic_depth_messages", "gauge",
                                 "Messages in a topic lane")
    handle = registry.add_collector(lambda: [
        metrics.Sample(topic_depth, {"topic": "orders", "lane": "9"}, 12)])
    samples = registry.collect(scan_shared=False)
    depth = [s for s in samples if s.metric is metrics.QUEUE_DEPTH
             and s.labels["queue"] == "jobs"]
    assert [s.value for s in depth] == [1]
    topic = [s for s in samples if s.metric is topic_depth]
    assert [s.value for s in topic] == [12]
    handle.remove()
    samples = registry.collect(scan_shared=False)
    assert not [s for s in samples if s.metric is topic_depth]


def test_registry_skips_failing_collector(caplog):
    registry = metrics.MetricsRegistry()

    def broken():
        raise RuntimeError("boom")

    registry.add_collector(broken)
    registry.collect(scan_shared=False)
    assert "metrics collector" in caplog.text
    assert "boom" in caplog.text


@pytest.mark.parametrize("name, kind, match", [
    ("queue_depth", "gauge", "must start with 'mqs_'"),
    ("mqs_puts", "counter", "must end in '_total'"),
    ("mqs_x", "summary", "must be 'counter', 'gauge' or 'histogram'"),
])
def test_metric_rejects_bad_definition(name, kind, match):
    with pytest.raises(ValueError, match=match):
        metrics.Metric(name, kind, "help")


def test_register_broker_exports_topic_stats():
    registry = metrics.MetricsRegistry()
    broker = mqs.Broker()
    broker.declare_topic("orders", max_attempts=1)
    for i in range(3):
        broker.publish("orders", {"n": i})
    consumer = broker.consume("orders", "billing")
    consumer.get(timeout=5).ack()
    consumer.get(timeout=5).nack(requeue=False)
    handle = metrics.register_broker(broker, ["orders", "gone"], "shop",
                                     registry=registry)
    samples = registry.collect(scan_shared=False)
    by_key = {(s.metric.name, tuple(sorted(s.labels.items()))): s.value
              for s in samples}
    labels = (("broker", "shop"), ("topic", "orders"))
    assert by_key[("mqs_topic_messages_total",
                   (*labels[:1], ("event", "published"), labels[1]))] == 3
    assert by_key[("mqs_topic_messages_total",
                   (*labels[:1], ("event", "acked"), labels[1]))] == 1
    assert by_key[("mqs_topic_messages",
                   (*labels[:1], ("state", "dlq"), labels[1]))] == 1
    assert by_key[("mqs_topic_consumer_groups", labels)] == 1
    assert not [s for s in samples if s.labels.get("topic") == "gone"]
    handle.remove()
    consumer.close(drain=False)
    broker.close()


def test_register_broker_warns_once_per_missing_topic(caplog):
    registry = metrics.MetricsRegistry()
    broker = mqs.Broker()
    handle = metrics.register_broker(broker, ["nosuch"], "shop",
                                     registry=registry)
    def broker_samples():
        # collect also returns the queues of this process.
        return [sample for sample in registry.collect(scan_shared=False)
                if sample.labels.get("broker") == "shop"]

    with caplog.at_level(logging.DEBUG, logger="mqs.metrics"):
        assert broker_samples() == []
        assert broker_samples() == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "topic 'nosuch' not found" in warnings[0].getMessage()
    assert "broker.topics()" in warnings[0].getMessage()

    # Declared later, the topic is exported without a restart.
    broker.declare_topic("nosuch")
    samples = broker_samples()
    assert samples != []
    assert {s.labels.get("topic") for s in samples} == {"nosuch"}
    handle.remove()
    broker.close()


def test_register_broker_rejects_bare_topic_name():
    broker = mqs.Broker()
    with pytest.raises(TypeError, match=r"pass \['orders'\] for one topic"):
        metrics.register_broker(broker, "orders",
                                registry=metrics.MetricsRegistry())
    broker.close()


def test_log_linear_buckets_cover_range_in_order():
    previous_upper = -1
    for index in range(metrics.HIST_BUCKETS):
        upper = metrics.hist_upper_ns(index)
        assert upper > previous_upper
        assert metrics.hist_index(previous_upper + 1) == index
        assert metrics.hist_index(upper) == index
        previous_upper = upper
    assert previous_upper == metrics.HIST_MAX_NS
    assert metrics.hist_index(metrics.HIST_MAX_NS + 10) \
        == metrics.HIST_BUCKETS - 1
    assert metrics.hist_index(-5) == 0


def test_log_linear_bucket_width_within_precision():
    for index in range(2 * metrics.HIST_SUB_BUCKETS, metrics.HIST_BUCKETS):
        lower = metrics.hist_upper_ns(index - 1) + 1
        width = metrics.hist_upper_ns(index) - lower + 1
        assert width / lower <= 1 / metrics.HIST_SUB_BUCKETS


def test_log_linear_histogram_summary():
    histogram = metrics.LogLinearHistogram()
    for value_ns in range(1_000, 1_001_000, 1_000):
        histogram.record_ns(value_ns)
    summary = histogram.summary(1)
    assert summary.count == 1000
    assert summary.mean_s == pytest.approx(500.5e-6)
    assert summary.p50_s == pytest.approx(500e-6, rel=0.032)
    assert summary.p99_s == pytest.approx(990e-6, rel=0.032)
    assert summary.max_s == pytest.approx(1e-3)
    assert summary.sum_s == pytest.approx(0.5005)
    # A value counts at the first bound at or above its bucket's highest
    # value, so values up to 3.1% below a bound may count one bound late.
    assert 96 <= dict(summary.buckets)[1e-4] <= 100
    assert summary.buckets[-1][1] == 1000
    restored = pickle.loads(pickle.dumps(histogram))
    assert restored.summary(1) == summary


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_durable_shared_queue_stats_report_the_log(tmp_path):
    """stats() of a durable queue, and inspect_durable_queue of its
    directory, report the log's groups, lag, cursors and committed
    offsets, not the inbox ring's."""
    path = str(tmp_path / "durable")
    q = mqs.SharedQueue(persist=path, groups=2, maxsize=50)
    slow = q.for_group(1)
    q.put_many([b"%d" % n for n in range(10)])
    assert q.get_many(4, timeout=10) == [b"0", b"1", b"2", b"3"]
    time.sleep(0.3)
    # The appender commits every 0.2 s; wait for group 0's commit.
    wait_for(lambda: q.stats().committed[0] == 4)
    stats = q.stats()
    assert stats.persist == path
    assert stats.groups == 2
    assert stats.maxsize == 50
    assert stats.enqueued == 10
    assert stats.dequeued == (4, 0)
    assert stats.lag == (6, 10)
    assert stats.depth == 6
    assert slow.stats().depth == 10
    assert slow.stats().group == 1
    assert stats.committed == (4, None)
    assert stats.lag_seconds[0] >= 0.3
    assert stats.lag_seconds[1] >= stats.lag_seconds[0]
    assert stats.lost_records == 0

    inspected = metrics.inspect_durable_queue(path)
    assert inspected.persist == path
    assert inspected.groups == 2
    assert inspected.lag == (6, 10)
    assert inspected.dequeued == (4, 0)
    assert inspected.committed == (4, None)
    assert inspected.attached_processes == 0

    assert len(slow.get_many(10, timeout=10)) == 10
    assert len(q.get_many(6, timeout=10)) == 6
    stats = q.stats()
    assert stats.lag == (0, 0)
    assert stats.lag_seconds == (0.0, 0.0)
    slow.close()
    q.close()
    assert metrics.inspect_durable_queue(path).committed == (10, 10)


def test_inspect_durable_queue_rejects_other_directory(tmp_path):
    with pytest.raises(mqs.QueueNotFound, match="not a durable"):
        metrics.inspect_durable_queue(str(tmp_path))
