"""Tests of the Prometheus exporter: scrape a real server on 127.0.0.1."""

import glob
import logging
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

import mqs
from mqs import metrics

SHM_DIR = "/dev/shm"
PAGE = os.sysconf("SC_PAGESIZE")


@pytest.fixture
def shm_name():
    name = f"test-exporter-{uuid.uuid4().hex[:16]}"
    yield name
    for path in glob.glob(os.path.join(SHM_DIR, f"mqs.{name}*")):
        os.unlink(path)


def scrape(port):
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return response.read().decode()


def samples_by_name(text):
    """Return {sample name: [(labels, value)]} of Prometheus text."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(
                (sample.labels, sample.value))
    return found


def value_of(found, name, **labels):
    matches = [value for sample_labels, value in found.get(name, [])
               if all(sample_labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (name, labels, found.get(name))
    return matches[0]


def test_server_exports_process_and_shared_queues(shm_name, tmp_path):
    q = mqs.Queue()
    metrics.register(q, "exporter-jobs")
    q.set_latency_sampling(1)
    q.put_many(range(8))
    q.get_many(3)
    shared = mqs.SharedQueue(name=shm_name, groups=2, capacity_bytes=PAGE)
    shared.put_many([b"a", b"b", b"c"])
    shared.get()
    log = mqs.SegmentLog(tmp_path / "log", fsync="never")
    metrics.register(log, "exporter-log")
    for i in range(6):
        log.append(b"%d" % i)
    log.commit("readers", 2)
    try:
        with mqs.start_metrics_server(0) as server:
            assert server.addr == "127.0.0.1"
            found = samples_by_name(scrape(server.port))
    finally:
        shared.unlink()
        shared.close()
        log.close()

    jobs = {"queue": "exporter-jobs", "kind": "Queue"}
    assert value_of(found, "mqs_queue_depth_messages", **jobs) == 5
    assert value_of(found, "mqs_queue_enqueued_messages_total", **jobs) == 8
    assert value_of(found, "mqs_queue_dequeued_messages_total", **jobs) == 3
    assert value_of(found, "mqs_queue_latency_seconds_count", **jobs) == 3
    assert value_of(found, "mqs_queue_latency_seconds_bucket", le="+Inf",
                    **jobs) == 3

    name = {"queue": shm_name, "kind": "SharedQueue"}
    assert value_of(found, "mqs_queue_enqueued_messages_total", **name) == 3
    assert value_of(found, "mqs_queue_consumer_lag_messages", group="0",
                    **name) == 2
    assert value_of(found, "mqs_queue_consumer_lag_messages", group="1",
                    **name) == 3
    assert value_of(found, "mqs_queue_dequeued_messages_total", group="0",
                    **name) == 1
    assert value_of(found, "mqs_queue_attached_processes", **name) == 1
    assert value_of(found, "mqs_queue_dropped_messages_total",
                    reason="repaired_record", **name) == 0
    assert value_of(found, "mqs_queue_capacity_bytes", **name) == PAGE

    assert value_of(found, "mqs_log_end_offset", log="exporter-log") == 6
    assert value_of(found, "mqs_log_consumer_lag_messages",
                    log="exporter-log", group="readers") == 4
    assert value_of(found, "mqs_log_appended_records_total",
                    log="exporter-log") == 6


def test_server_exports_durable_queue_groups(shm_name, tmp_path):
    """A named durable queue is exported with its log's groups and lag,
    not with its inbox ring's single group."""
    shared = mqs.SharedQueue(name=shm_name, groups=2,
                             persist=str(tmp_path / "durable"))
    shared.put_many([b"a", b"b", b"c"])
    assert shared.get(timeout=10) == b"a"
    try:
        with mqs.start_metrics_server(0) as server:
            found = samples_by_name(scrape(server.port))
    finally:
        shared.unlink()
        shared.close()
    name = {"queue": shm_name, "kind": "SharedQueue"}
    assert value_of(found, "mqs_queue_consumer_lag_messages", group="0",
                    **name) == 2
    assert value_of(found, "mqs_queue_consumer_lag_messages", group="1",
                    **name) == 3
    assert value_of(found, "mqs_queue_depth_messages", group="1",
                    **name) == 3
    assert value_of(found, "mqs_queue_dequeued_messages_total", group="0",
                    **name) == 1
    assert value_of(found, "mqs_queue_consumer_lag_seconds", group="1",
                    **name) >= 0


def test_metric_names_follow_prometheus_conventions():
    q = mqs.Queue()
    q.put(1)
    with mqs.start_metrics_server(0, scan_shared=False) as server:
        text = scrape(server.port)
    families = list(text_string_to_metric_families(text))
    assert families
    for family in families:
        assert family.name.startswith("mqs_"), family.name
        if family.type == "counter":
            assert any(s.name.endswith("_total") for s in family.samples)
    help_lines = [line for line in text.splitlines()
                  if line.startswith("# HELP mqs_")]
    assert help_lines


def test_start_metrics_server_rejects_bad_port():
    with pytest.raises(ValueError, match="port must be an int from 0 to "
                                         "65535, got 70000"):
        mqs.start_metrics_server(70000)


def test_server_stops_on_close():
    server = mqs.start_metrics_server(0, scan_shared=False)
    port = server.port
    server.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_closed_broker_collector_is_removed(caplog):
    broker = mqs.Broker("memory")
    broker.declare_topic("orders")
    broker.publish("orders", "x")
    handle = metrics.register_broker(broker, ["orders"], "shop")
    try:
        with mqs.start_metrics_server(0, scan_shared=False) as server:
            found = samples_by_name(scrape(server.port))
            assert value_of(found, "mqs_topic_messages", broker="shop",
                            topic="orders", state="stored") == 1
            broker.close()
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="mqs"):
                texts = [scrape(server.port) for _ in range(3)]
    finally:
        handle.remove()
        broker.close()
    for text in texts:
        assert 'broker="shop"' not in text
    records = [record for record in caplog.records
               if record.name.startswith("mqs")]
    assert [record.levelname for record in records] == ["INFO"]
    assert "broker shop is closed" in records[0].getMessage()
    assert records[0].exc_info is None


def test_failing_collector_logs_traceback_once(caplog):
    registry = metrics.MetricsRegistry()
    calls = []

    def collect():
        calls.append(1)
        if len(calls) <= 3:
            raise RuntimeError("source unavailable")
        return []

    handle = registry.add_collector(collect)
    try:
        with caplog.at_level(logging.DEBUG, logger="mqs.metrics"):
            for _ in range(4):
                registry.collect(scan_shared=False)
    finally:
        handle.remove()
    records = [record for record in caplog.records
               if record.name == "mqs.metrics"]
    assert [record.levelname for record in records] == [
        "WARNING", "DEBUG", "DEBUG", "INFO"]
    assert records[0].exc_info is not None
    assert "3 scrapes in a row" in records[2].getMessage()
    assert "after 3 failed scrapes" in records[3].getMessage()


def test_metrics_command_serves_shared_queues(shm_name, tmp_path):
    shared = mqs.SharedQueue(name=shm_name, capacity_bytes=PAGE)
    shared.put_many([b"x"] * 4)
    with mqs.SegmentLog(tmp_path / "log", fsync="never") as log:
        log.append(b"one")
    process = subprocess.Popen(
        [sys.executable, "-m", "mqs", "metrics", "--port", "0",
         "--log", str(tmp_path / "log"), "--duration", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line)
        assert match, (line, process.stderr.read() if process.poll() else "")
        found = samples_by_name(scrape(int(match.group(1))))
        assert value_of(found, "mqs_queue_depth_messages", queue=shm_name,
                        group="0") == 4
        assert value_of(found, "mqs_log_end_offset",
                        log=str(tmp_path / "log")) == 1
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        shared.unlink()
        shared.close()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr


def test_metrics_command_reports_port_in_use():
    with mqs.start_metrics_server(0, scan_shared=False) as server:
        result = subprocess.run(
            [sys.executable, "-m", "mqs", "metrics", "--port",
             str(server.port), "--duration", "0"],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{server.port}: port in use" \
        in result.stderr
    assert "Traceback" not in result.stderr


def test_alert_rules_use_exported_metric_names():
    path = os.path.join(os.path.dirname(__file__), "..", "docs",
                        "alerts.yml")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    defined = {value.name for value in vars(metrics).values()
               if isinstance(value, metrics.Metric)}
    used = set(re.findall(r"\b(mqs_[a-z_]+?)(?:_bucket)?\b", text))
    assert used
    assert used <= defined, used - defined
