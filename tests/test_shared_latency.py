"""Latency histograms of SharedQueue: stamped puts, the histogram in the
queue's mapping, and readers in other processes.

Producers and consumers run in real child processes. The histogram is
read by the creating handle, by a read-only inspection of the file and
by `mqs stat`.
"""

import glob
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

import mqs
from mqs import metrics
from mqs.shared import SharedQueue

SHM_DIR = "/dev/shm"
CHILD_TIMEOUT_S = 60


@pytest.fixture
def shm_name():
    name = f"test-latency-{uuid.uuid4().hex[:16]}"
    yield name
    # The ring, and the note a durable queue writes beside it.
    for pattern in (f"mqs.{name}*", f"mqs-persist.{name}"):
        for path in glob.glob(os.path.join(SHM_DIR, pattern)):
            os.unlink(path)


def run_child(code, *args):
    """Run `code` in a child Python and return its completed process."""
    script = "import sys, time\nimport mqs\n" + textwrap.dedent(code)
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    return result


_PUT_N = """
q = mqs.SharedQueue(name=sys.argv[1], create=False)
for i in range(int(sys.argv[2])):
    q.put(i)
q.close()
"""

_GET_N = """
q = mqs.SharedQueue(name=sys.argv[1], create=False)
got = [q.get(timeout=30) for _ in range(int(sys.argv[2]))]
assert got == list(range(int(sys.argv[2]))), got
q.close()
"""


def test_latency_recorded_across_processes(shm_name):
    q = SharedQueue(name=shm_name, capacity_bytes=1 << 16)
    q.set_latency_sampling(1)
    run_child(_PUT_N, shm_name, 20)
    time.sleep(0.1)
    assert [q.get(timeout=5) for _ in range(20)] == list(range(20))
    latency = q.stats().latency
    assert latency.count == 20
    assert latency.sample_every == 1
    assert latency.p50_s >= 0.1
    assert latency.max_s < 60
    assert latency.p50_s <= latency.p99_s <= latency.max_s
    assert latency.buckets[-1][1] == 20
    assert latency.sum_s >= 20 * 0.1
    q.close()


def test_latency_of_child_consumer_read_by_inspection(shm_name):
    q = SharedQueue(name=shm_name, capacity_bytes=1 << 16)
    q.set_latency_sampling(1)
    for i in range(30):
        q.put(i)
    time.sleep(0.05)
    run_child(_GET_N, shm_name, 30)
    inspected = metrics.inspect_shared_queue(shm_name)
    assert inspected.latency.count == 30
    assert inspected.latency.p50_s >= 0.05
    assert q.stats().latency == inspected.latency
    q.close()


def test_sampling_one_in_n_per_producer(shm_name):
    q = SharedQueue(name=shm_name, capacity_bytes=1 << 20)
    q.set_latency_sampling(10)
    run_child(_PUT_N, shm_name, 100)
    run_child(_PUT_N, shm_name, 105)
    got = []
    while len(got) < 205:
        got += q.get_many(1000, timeout=5)
    assert len(got) == 205
    # Each producer stamps its 10th, 20th, ... put: 10 each.
    assert q.stats().latency.count == 20
    assert q.stats().latency.sample_every == 10
    q.close()


def test_sampling_turned_on_elsewhere_reaches_producer(shm_name):
    q = SharedQueue(name=shm_name, capacity_bytes=1 << 20)
    q.set_latency_sampling(None)
    code = """
    q = mqs.SharedQueue(name=sys.argv[1], create=False)
    print("attached", flush=True)
    sys.stdin.readline()
    for i in range(1100):
        q.put(b"x")
    q.close()
    """
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\nimport mqs\n" + textwrap.dedent(code), shm_name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "attached\n", child.stderr.read()
        q.set_latency_sampling(1)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(CHILD_TIMEOUT_S) == 0, child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(CHILD_TIMEOUT_S)
        child.stdin.close()
        child.stdout.close()
        child.stderr.close()
    assert len(q.get_many(2000, timeout=5)) == 1100
    # The child read the rate (off) at attach, and again after 1024 puts:
    # it stamped puts 1024 to 1100.
    assert q.stats().latency.count == 77
    q.close()


@pytest.mark.parametrize("item", [b"bytes", bytearray(b"array"), b"",
                                  {"pickled": [1, 2]}, "text" * 100])
def test_stamped_messages_round_trip(item):
    q = SharedQueue(capacity_bytes=1 << 16)
    q.set_latency_sampling(1)
    q.put(item)
    got = q.get(timeout=5)
    assert got == item
    assert type(got) is type(item)
    assert q.stats().latency.count == 1
    q.close()


def test_stamped_view_shows_payload_only():
    q = SharedQueue(capacity_bytes=1 << 16)
    q.set_latency_sampling(1)
    q.put(b"payload")
    with q.get_view(timeout=5) as view:
        assert bytes(view) == b"payload"
    assert q.stats().latency.count == 1
    q.close()


def test_max_size_message_fits_when_sampled():
    q = SharedQueue(capacity_bytes=4096, max_message_size=100)
    q.set_latency_sampling(1)
    q.put(b"m" * 100)
    assert q.get(timeout=5) == b"m" * 100
    # Sent without a stamp, because the stamp would not fit.
    assert q.stats().latency.count == 0
    with pytest.raises(mqs.MessageTooLarge, match="message is 101 bytes"):
        q.put(b"m" * 101)
    q.close()


def test_delayed_message_latency_runs_from_due_time():
    q = SharedQueue(capacity_bytes=1 << 16)
    q.set_latency_sampling(1)
    q.put(b"later", delay=0.3)
    assert q.get(timeout=5) == b"later"
    latency = q.stats().latency
    assert latency.count == 1
    assert latency.max_s < 0.25


def test_sampling_off_clears_histogram():
    q = SharedQueue(capacity_bytes=1 << 16)
    q.set_latency_sampling(1)
    q.put(1)
    q.get(timeout=5)
    q.set_latency_sampling(None)
    assert q.stats().latency is None
    q.put(2)
    q.get(timeout=5)
    assert q.stats().latency is None
    q.close()


def test_default_sample_every_applies_to_new_shared_queues():
    previous = metrics.default_sample_every()
    try:
        metrics.set_default_sample_every(None)
        assert SharedQueue(capacity_bytes=1 << 16).stats().latency is None
        metrics.set_default_sample_every(5)
        q = SharedQueue(capacity_bytes=1 << 16)
        assert q.stats().latency.sample_every == 5
        for i in range(12):
            q.put(i)
        assert q.get_many(20, timeout=5) == list(range(12))
        assert q.stats().latency.count == 2
    finally:
        metrics.set_default_sample_every(previous)


@pytest.mark.parametrize("value, error, match", [
    (0, ValueError, "sample_every must be at least 1"),
    (1.5, TypeError, "sample_every must be an int, got float 1.5"),
])
def test_set_latency_sampling_rejects_bad_value(value, error, match):
    q = SharedQueue(capacity_bytes=1 << 16)
    with pytest.raises(error, match=match):
        q.set_latency_sampling(value)
    q.close()


def test_durable_queue_has_no_sampling(shm_name, tmp_path):
    log_dir = str(tmp_path / "log")
    q = SharedQueue(name=shm_name, persist=log_dir)
    assert q.stats().latency is None
    with pytest.raises(ValueError, match="not available on a durable"):
        q.set_latency_sampling(1)
    # A handle opened without persist= may still stamp its puts; the
    # durable consumer strips the stamp.
    plain = SharedQueue(name=shm_name, create=False)
    plain.set_latency_sampling(1)
    plain.put({"kept": True})
    plain.put(b"raw")
    assert q.get(timeout=5) == {"kept": True}
    assert q.get(timeout=5) == b"raw"
    plain.close()
    q.close()
    reopened = SharedQueue(name=shm_name, persist=log_dir)
    reopened.close()


def test_exporter_samples_include_shared_latency(shm_name):
    q = SharedQueue(name=shm_name, capacity_bytes=1 << 16)
    q.set_latency_sampling(1)
    q.put(b"a")
    q.get(timeout=5)
    samples = [sample for sample in metrics.REGISTRY.collect()
               if sample.metric is metrics.QUEUE_LATENCY
               and sample.labels.get("queue") == shm_name]
    assert len(samples) == 1
    assert samples[0].labels["kind"] == "SharedQueue"
    assert samples[0].labels["stage"] == "enqueue_to_deliver"
    assert samples[0].value.count == 1
    q.close()


def test_stat_command_shows_latency(shm_name):
    q = SharedQueue(name=shm_name, capacity_bytes=1 << 16)
    q.set_latency_sampling(1)
    for i in range(3):
        q.put(i)
    q.get_many(3, timeout=5)
    env = {**os.environ, "COLUMNS": "160"}
    table = subprocess.run(
        [sys.executable, "-m", "mqs", "stat", shm_name], env=env,
        capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert table.returncode == 0, table.stderr
    assert "1 in 1" in table.stdout
    assert "latency p99" in table.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "mqs", "stat", shm_name, "--json"], env=env,
        capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert as_json.returncode == 0, as_json.stderr
    latency = json.loads(as_json.stdout)["latency"]
    assert latency["count"] == 3
    assert latency["sample_every"] == 1
    q.close()


def test_stats_record_pickles_with_latency():
    q = SharedQueue(capacity_bytes=1 << 16)
    q.set_latency_sampling(1)
    q.put(1)
    q.get(timeout=5)
    stats = q.stats()
    assert pickle.loads(pickle.dumps(stats)) == stats
    q.close()
