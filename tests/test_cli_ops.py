"""Tests of `mqs stat`, `top`, `dump`, `purge` and `tail`, run in a
subprocess against real shared queues and real segment logs."""

import glob
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

import mqs

SHM_DIR = "/dev/shm"
PAGE = os.sysconf("SC_PAGESIZE")
SUBCOMMANDS = ["stat", "top", "dump", "purge", "clean", "tail", "metrics"]


def run_mqs(*args, timeout=60, columns=160, cwd=None):
    env = {**os.environ, "COLUMNS": str(columns)}
    if cwd is not None:
        # The child imports mqs from PYTHONPATH, so relative entries must
        # keep pointing where they did.
        env["PYTHONPATH"] = os.pathsep.join(
            os.path.abspath(entry)
            for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry)
    return subprocess.run(
        [sys.executable, "-m", "mqs", *args], check=False,
        capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def assert_one_line_error(result, text):
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert text in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.fixture
def shm_name():
    name = f"test-cli-{uuid.uuid4().hex[:16]}"
    yield name
    for path in glob.glob(os.path.join(SHM_DIR, f"mqs.{name}*")):
        os.unlink(path)


@pytest.fixture
def queue(shm_name):
    q = mqs.SharedQueue(name=shm_name, groups=2, capacity_bytes=1 << 16)
    yield q
    q.close()


@pytest.fixture
def log_dir(tmp_path):
    path = tmp_path / "events"
    with mqs.SegmentLog(path, segment_bytes=8192, fsync="never") as log:
        for i in range(300):
            log.append(b"event-%d" % i, key=b"k%d" % (i % 3))
        log.commit("billing", 120)
    return path


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command):
    result = run_mqs(command, "--help")
    assert result.returncode == 0
    assert f"usage: mqs {command}" in result.stdout


def test_tail_help_says_topics_are_not_supported_yet():
    result = run_mqs("tail", "--help")
    assert "topics are not supported yet" in " ".join(result.stdout.split())


# ------------------------------------------------------------------- stat


def test_stat_shared_queue_prints_counters(queue, shm_name):
    queue.put_many([b"a", b"b", b"c", b"d"])
    queue.get()
    result = run_mqs("stat", shm_name)
    assert result.returncode == 0, result.stderr
    assert f"shared queue {shm_name}" in result.stdout
    assert "group 0: lag (messages)" in result.stdout
    assert "attached processes" in result.stdout


def test_stat_json_matches_queue(queue, shm_name):
    queue.put_many([b"a", b"b", b"c", b"d"])
    queue.get()
    result = run_mqs("stat", shm_name, "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["enqueued"] == 4
    assert stats["dequeued"] == [1, 0]
    assert stats["lag"] == [3, 4]
    assert stats["attached_processes"] == 1
    assert stats["dropped"] == {"repaired_record": 0, "consumer_died": 0,
                                "decode_failed": 0, "damaged_record": 0}


def test_stat_json_counts_delayed(queue, shm_name):
    queue.put(b"later", delay=600)
    queue.put(b"later too", delay=600)
    queue.put(b"now")
    assert queue.stats().delayed == 2
    result = run_mqs("stat", shm_name, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["delayed"] == 2


def test_stat_log_shows_group_lag(log_dir):
    result = run_mqs("stat", str(log_dir), "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["end_offset"] == 300
    assert stats["committed"] == {"billing": 120}
    assert stats["consumer_lag"] == {"billing": 180}
    table = run_mqs("stat", str(log_dir))
    assert "group billing: lag (records)" in table.stdout
    assert "180" in table.stdout


def test_stat_durable_queue_directory_shows_groups(tmp_path):
    path = str(tmp_path / "durable")
    q = mqs.SharedQueue(persist=path, groups=2)
    q.put_many([b"a", b"b", b"c", b"d"])
    assert q.get(timeout=10) == b"a"
    q.close()
    result = run_mqs("stat", path, "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["persist"] == path
    assert stats["groups"] == 2
    assert stats["lag"] == [3, 4]
    assert stats["dequeued"] == [1, 0]
    assert stats["committed"] == [1, None]
    assert stats["lag_seconds"][1] > 0
    table = run_mqs("stat", path)
    assert table.returncode == 0, table.stderr
    assert "durable shared queue" in table.stdout
    assert "group 1: lag (seconds)" in table.stdout
    assert "group 0: committed offset" in table.stdout


def test_stat_unknown_name_is_one_line_error():
    result = run_mqs("stat", "no-such-queue-for-cli")
    assert_one_line_error(result, "no shared queue named "
                                  "'no-such-queue-for-cli'")


def test_stat_bad_path_is_one_line_error(tmp_path):
    path = tmp_path / "missing" / "log"
    result = run_mqs("stat", str(path))
    # The error lists every kind of path mqs stat reads.
    assert_one_line_error(result, f"'{path}' not found; give a log broker, "
                                  f"durable queue or segment log directory")


def test_stat_file_path_is_one_line_error(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"not a log")
    result = run_mqs("stat", str(path))
    assert_one_line_error(result, f"'{path}' is not a directory; give a "
                                  f"log broker, durable queue or segment "
                                  f"log directory")


def test_stat_shm_path_reads_queue(queue, shm_name):
    queue.put(b"a")
    result = run_mqs("stat", f"/dev/shm/mqs.{shm_name}", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["enqueued"] == 1


def test_stat_directory_without_segments_is_error(tmp_path):
    result = run_mqs("stat", str(tmp_path))
    assert_one_line_error(result, "has no segment files")


@pytest.mark.parametrize("command", ["dump", "tail"])
def test_log_broker_directory_is_named_in_error(command, tmp_path):
    path = tmp_path / "broker"
    broker = mqs.Broker(backend="log", path=str(path))
    broker.declare_topic("orders")
    broker.publish("orders", b"x")
    broker.close()
    result = run_mqs(command, str(path))
    assert_one_line_error(result, "is a log broker directory")
    assert f"mqs dlq list {path} TOPIC" in result.stderr
    assert f"mqs stat {path}" in result.stderr
    assert "has no segment files" not in result.stderr


# Brokers: `mqs stat` shows every topic and consumer group.

def fill_broker(broker):
    """Give topic "orders" of `broker` 2 ready messages, 1 dead letter,
    1 delayed message and 1 message in flight; return the consumer that
    holds it. Topic "audit" gets 1 message and no group."""
    broker.declare_topic("orders")
    broker.declare_topic("audit")
    broker.publish("audit", "a")
    broker.publish_many("orders", [0, 1, 2, 3])
    broker.publish("orders", 4, delay=600)
    consumer = broker.consume("orders", "billing", prefetch=1)
    rejected = consumer.get(timeout=5)
    rejected.nack(requeue=False, error="bad total")
    consumer.get(timeout=5)
    return consumer


def check_broker_json(stats):
    assert sorted(stats["topics"]) == ["audit", "orders"]
    orders = stats["topics"]["orders"]
    assert orders["stats"]["ready"] == 2
    assert orders["stats"]["in_flight"] == 1
    assert orders["stats"]["delayed"] == 1
    assert orders["stats"]["dlq"] == 1
    assert orders["stats"]["published"] == 5
    assert orders["stats"]["dead_lettered.rejected"] == 1
    [group] = orders["groups"]
    assert group["group"] == "billing"
    assert group["lag_messages"] == 2
    assert group["in_flight"] == 1
    assert group["delivered"] == 2
    assert group["dead_lettered"] == 1
    assert group["error_ratio"] == 0.5
    audit = stats["topics"]["audit"]
    assert audit["stats"]["ready"] == 0  # no group receives it
    assert audit["stats"]["published"] == 1
    assert audit["groups"] == []


@pytest.fixture
def shm_broker():
    """A filled shm broker (see `fill_broker`) whose consumer stays
    open; yields its name and unlinks it after the test."""
    name = f"test-cli-broker-{uuid.uuid4().hex[:12]}"
    broker = mqs.Broker("shm", name=name)
    consumer = fill_broker(broker)
    yield name
    # Its message in flight goes back at once instead of after the drain
    # wait of a whole ack timeout.
    consumer.close(drain=False)
    broker.close()
    mqs.Broker.unlink(name)


def test_stat_shm_broker_json(shm_broker):
    result = run_mqs("stat", shm_broker, "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["backend"] == "shm"
    assert stats["broker"] == shm_broker
    check_broker_json(stats)

    # --shm names the same broker.
    flagged = run_mqs("stat", "--shm", shm_broker, "--json")
    assert flagged.returncode == 0, flagged.stderr
    check_broker_json(json.loads(flagged.stdout))


@pytest.mark.parametrize("interval", [None, 0.05])
def test_stat_skips_topic_deleted_while_reading(shm_broker, monkeypatch,
                                                interval):
    """A topic that another process deletes between the listing and the
    reading of its stats, such as the reply topic of a finished
    Broker.request, is left out instead of failing the whole command."""
    from mqs.cli_broker import broker_stats

    listed = mqs.Broker.topics

    def topics_then_delete(broker):
        names = listed(broker)
        if "audit" in names:
            broker.delete_topic("audit")
        return names

    monkeypatch.setattr(mqs.Broker, "topics", topics_then_delete)
    stats = broker_stats("shm", shm_broker, interval_s=interval)
    assert sorted(stats["topics"]) == ["orders"]
    assert stats["topics"]["orders"]["stats"]["published"] == 5


def test_stat_shm_broker_table(shm_broker):
    result = run_mqs("stat", shm_broker)
    assert result.returncode == 0, result.stderr
    # The title wraps at the table's width.
    words = " ".join(result.stdout.split())
    assert f"shm broker {shm_broker}: 2 topic(s)" in words
    lines = [" ".join(line.replace("│", " ").split())
             for line in result.stdout.splitlines()]
    assert "orders: ready 2" in lines
    assert "orders: in_flight 1" in lines
    assert "orders: delayed 1" in lines
    assert "orders: dlq 1" in lines
    assert "orders / billing: lag_messages 2" in lines
    assert "orders / billing: error_ratio 0.500" in lines
    assert "audit: published 1" in lines


def test_stat_log_broker_directory(tmp_path):
    path = tmp_path / "broker"
    with mqs.Broker("log", path=str(path)) as broker:
        fill_broker(broker).close(drain=False)
    result = run_mqs("stat", str(path), "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["backend"] == "log"
    orders = stats["topics"]["orders"]["stats"]
    # Closing the consumer put its in-flight message back.
    assert orders["ready"] == 3
    assert orders["in_flight"] == 0
    assert orders["delayed"] == 1
    assert orders["dlq"] == 1

    table = run_mqs("stat", "broker", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "log broker broker: 2 topic(s)" in " ".join(table.stdout.split())

    # The command changed nothing that a reader can see.
    with mqs.Broker("log", path=str(path)) as broker:
        assert [letter.body for letter in broker.dlq_list("orders")] == [0]
        assert broker.stats("orders")["ready"] == 3


def test_stat_redis_broker_json(redis_url):
    import redis

    namespace = f"mqs-cli-stat-{uuid.uuid4().hex[:12]}"
    broker = mqs.Broker("redis", url=redis_url, serializer="pickle",
                        namespace=namespace)
    try:
        consumer = fill_broker(broker)
        result = run_mqs("stat", "--url", redis_url, "-o",
                         f"namespace={namespace}", "--json")
        consumer.close(drain=False)
    finally:
        broker.close()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{{{namespace}:*"))
        if keys:
            client.unlink(*keys)
        client.close()
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["backend"] == "redis"
    assert stats["broker"] == redis_url
    check_broker_json(stats)


def test_stat_redis_namespace_without_topics_notes_option(redis_url):
    namespace = f"mqs-cli-empty-{uuid.uuid4().hex[:12]}"
    result = run_mqs("stat", "--url", redis_url, "-o",
                     f"namespace={namespace}", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["topics"] == {}
    assert f"no topics in namespace {namespace!r}" in result.stderr
    assert "-o namespace=NAME" in result.stderr


def test_stat_interval_prints_rates(shm_name):
    broker = mqs.Broker("shm", name=shm_name)
    broker.declare_topic("t")
    consumer = broker.consume("t", "g", auto_ack=True)
    stop = threading.Event()

    def publish_and_consume():
        while not stop.is_set():
            broker.publish("t", 0)
            consumer.get(timeout=5)
            time.sleep(0.001)

    worker = threading.Thread(target=publish_and_consume)
    worker.start()
    try:
        result = run_mqs("stat", "--shm", shm_name, "--interval", "0.5",
                         "--json")
        table = run_mqs("stat", "--shm", shm_name, "--interval", "0.1")
    finally:
        stop.set()
        worker.join(30)
        consumer.close()
        broker.close()
        mqs.Broker.unlink(shm_name)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    interval = stats["interval_s"]
    assert interval >= 0.5
    topic = stats["topics"]["t"]
    for name in ("published", "delivered", "acked"):
        # A rate is a whole number of messages over the interval.
        count = topic["rates"][name] * interval
        assert count > 0, name
        assert abs(count - round(count)) < 1e-6, name
        assert round(count) <= topic["stats"][name], name

    assert table.returncode == 0, table.stderr
    words = " ".join(table.stdout.split())
    assert "rates over" in words
    lines = [" ".join(line.replace("│", " ").split())
             for line in table.stdout.splitlines()]
    assert any(line.startswith("t: published/s ") for line in lines)
    assert any(line.startswith("t: acked/s ") for line in lines)


@pytest.mark.parametrize("value", ["0", "nan", "7200"])
def test_stat_interval_rejects_bad_value(value):
    result = run_mqs("stat", "--shm", "any", "--interval", value)
    assert result.returncode == 2
    assert f"invalid interval {value!r}" in result.stderr


def test_stat_interval_only_for_broker(queue, shm_name):
    result = run_mqs("stat", shm_name, "--interval", "1")
    assert result.returncode == 2
    assert "--option and --interval apply only to a broker" in result.stderr


def test_stat_missing_broker_is_not_created(tmp_path):
    name = f"test-cli-missing-{uuid.uuid4().hex[:12]}"
    result = run_mqs("stat", "--shm", name)
    assert_one_line_error(result, f"shm broker '{name}' not found")
    assert not os.path.exists(f"/dev/shm/mqs.broker.{name}")

    result = run_mqs("stat", name)
    assert_one_line_error(result, f"no shared queue named '{name}', no shm "
                                  f"broker of that name")

    missing = tmp_path / "nowhere"
    result = run_mqs("stat", "--path", str(missing))
    assert_one_line_error(result, f"log broker directory '{missing}' not "
                                  f"found")
    assert not missing.exists()


def test_stat_broker_and_flag_is_usage_error(shm_broker):
    result = run_mqs("stat", shm_broker, "--shm", shm_broker)
    assert result.returncode == 2
    assert "give either NAME|PATH or --shm, not both" in result.stderr
    result = run_mqs("stat")
    assert result.returncode == 2
    assert ("give a NAME|PATH, --shm NAME, --path LOGDIR or --url URL"
            in result.stderr)


def test_stat_name_both_shm_broker_and_log_dir(shm_broker, tmp_path):
    with mqs.Broker("log", path=str(tmp_path / shm_broker)) as broker:
        broker.declare_topic("other")
    result = run_mqs("stat", shm_broker, cwd=tmp_path)
    assert_one_line_error(result, "is both an shm broker name and a log "
                                  "broker directory")
    assert f"--shm {shm_broker} or --path ./{shm_broker}" in result.stderr

    by_path = run_mqs("stat", "--path", shm_broker, "--json", cwd=tmp_path)
    assert by_path.returncode == 0, by_path.stderr
    assert sorted(json.loads(by_path.stdout)["topics"]) == ["other"]


def test_stat_name_both_shm_broker_and_queue(shm_broker):
    queue = mqs.SharedQueue(name=shm_broker, capacity_bytes=1 << 16)
    try:
        result = run_mqs("stat", shm_broker)
        assert_one_line_error(result, "is both an shm broker and a shared "
                                      "queue")
        assert f"--shm {shm_broker} for the broker" in result.stderr
        assert f"/dev/shm/mqs.{shm_broker} for the queue" in result.stderr

        by_path = run_mqs("stat", f"/dev/shm/mqs.{shm_broker}", "--json")
        assert by_path.returncode == 0, by_path.stderr
        assert json.loads(by_path.stdout)["enqueued"] == 0
    finally:
        queue.close()
        for path in glob.glob(f"/dev/shm/mqs.{shm_broker}"):
            os.unlink(path)


def test_metrics_log_broker_directory_is_error(tmp_path):
    path = tmp_path / "broker"
    mqs.Broker(backend="log", path=str(path)).close()
    result = run_mqs("metrics", "--port", "0", "--log", str(path),
                     "--duration", "0.1")
    assert_one_line_error(result, "is a log broker directory")


# -------------------------------------------------------------------- top


def test_top_once_lists_queue(queue, shm_name):
    queue.put_many([b"x"] * 5)
    result = run_mqs("top", "--once")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines()
                if shm_name in line)
    cells = [cell.strip() for cell in line.strip("│ ").split("│")]
    assert cells[0] == shm_name
    assert cells[1] == "2"
    assert cells[2] == "5"


def test_top_and_stat_show_durable_queue_groups(shm_name, tmp_path):
    """A named durable queue's ring is only its inbox: top and stat by
    name report the log's groups and lag instead."""
    q = mqs.SharedQueue(name=shm_name, groups=2,
                        persist=str(tmp_path / "durable"))
    try:
        q.put_many([b"x"] * 5)
        assert q.get(timeout=10) == b"x"
        result = run_mqs("top", "--once")
        assert result.returncode == 0, result.stderr
        line = next(line for line in result.stdout.splitlines()
                    if shm_name in line)
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        assert cells[0] == shm_name
        assert cells[1] == "2"
        assert cells[2] == "5"
        stat = run_mqs("stat", shm_name, "--json")
        assert stat.returncode == 0, stat.stderr
        stats = json.loads(stat.stdout)
        assert stats["persist"] == str(tmp_path / "durable")
        assert stats["lag"] == [4, 5]
    finally:
        q.unlink()
        q.close()
    assert not os.path.exists(os.path.join(SHM_DIR,
                                           f"mqs-persist.{shm_name}"))


def test_top_iterations_prints_rates(queue, shm_name):
    result = run_mqs("top", "--iterations", "2", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("mqs shared queues on this machine") == 2


@pytest.mark.parametrize("value", ["-1", "0", "nan", "7200", "x"])
def test_top_interval_rejects_bad_value(value):
    result = run_mqs("top", "--interval", value)
    assert result.returncode == 2
    assert f"invalid interval {value!r}; give seconds above 0" \
        in result.stderr


# ------------------------------------------------------------------- dump


def test_dump_lists_segments_and_verifies(log_dir):
    result = run_mqs("dump", str(log_dir))
    assert result.returncode == 0, result.stderr
    segments = sorted(p.name for p in log_dir.glob("*.seg"))
    assert len(segments) >= 2
    for name in segments:
        assert name in result.stdout
    assert "offsets 0 to 299: 300 records verified, 0 damaged" \
        in result.stdout


def test_dump_empty_log_says_no_records(tmp_path):
    path = tmp_path / "empty"
    with mqs.SegmentLog(path, segment_bytes=8192, fsync="never"):
        pass
    result = run_mqs("dump", str(path))
    assert result.returncode == 0, result.stderr
    assert "no records (next offset 0): 0 records verified, 0 damaged" \
        in result.stdout


def test_dump_records_prints_each_record(log_dir):
    result = run_mqs("dump", str(log_dir), "--records")
    assert result.returncode == 0, result.stderr
    assert "b'event-0'" in result.stdout
    assert "b'event-299'" in result.stdout


def test_dump_exits_nonzero_on_crc_error(log_dir):
    first = sorted(log_dir.glob("*.seg"))[0]
    data = bytearray(first.read_bytes())
    position = data.find(b"event-5")
    data[position] ^= 0xFF
    first.write_bytes(bytes(data))
    result = run_mqs("dump", str(log_dir))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "offset 5:" in result.stdout
    assert "299 records verified, 1 damaged" in result.stdout
    assert "1 damaged or missing record(s)" in result.stderr


@pytest.mark.parametrize("fsync", ["never", "interval", "always"])
def test_dump_counts_damage_after_clean_close(tmp_path, fsync):
    path = tmp_path / "events"
    with mqs.SegmentLog(path, fsync=fsync) as log:
        log.append_many([b"rec-%d" % i for i in range(5)])
    segment = next(path.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    data[data.find(b"rec-2")] ^= 0x01
    segment.write_bytes(bytes(data))
    result = run_mqs("dump", str(path))
    assert result.returncode == 1
    assert "offset 2:" in result.stdout
    assert "offsets 0 to 4: 4 records verified, 1 damaged" in result.stdout
    assert "1 damaged or missing record(s)" in result.stderr


@pytest.mark.parametrize("fsync", ["never", "interval", "always"])
def test_dump_reports_records_skipped_by_resync(tmp_path, fsync):
    path = tmp_path / "events"
    with mqs.SegmentLog(path, fsync=fsync) as log:
        log.append_many([b"rec-%d" % i for i in range(5)])
    segment = next(path.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    # The length of record 2 sits 32 bytes before its value; a large
    # length hides where the records after it start, until recovery
    # resynchronizes at record 3.
    position = data.find(b"rec-2") - 32
    data[position + 2] ^= 0x10
    segment.write_bytes(bytes(data))
    result = run_mqs("dump", str(path))
    assert result.returncode == 1
    assert "offset 2: record at offset 2" in result.stdout
    assert "offsets 0 to 4: 4 records verified, 1 damaged" in result.stdout
    assert (f"recovery skipped 1 damaged record(s) in 1 range(s), the "
            f"first at offset 2 (segment {0:020d}, position {position:,})"
            in " ".join(result.stdout.split()))
    assert "1 damaged or missing record(s)" in result.stderr


@pytest.mark.parametrize("fsync", ["never", "interval", "always"])
def test_dump_counts_records_lost_before_clean_end(tmp_path, fsync):
    path = tmp_path / "events"
    with mqs.SegmentLog(path, fsync=fsync) as log:
        log.append_many([b"rec-%d" % i for i in range(5)])
    segment = next(path.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    # A large length in the last record, and a recovery point written
    # before it recorded the next offset, so the number of offsets the
    # damage took is unknown and the records end at offset 4.
    data[data.find(b"rec-4") - 32 + 2] ^= 0x10
    segment.write_bytes(bytes(data))
    with open(path / "recovery-point", "r+b") as f:
        f.truncate(32)
    result = run_mqs("dump", str(path))
    assert result.returncode == 1
    assert "offset 4: record fails its length or offset check" \
        in result.stdout
    assert "offsets 0 to 3: 4 records verified, 1 damaged" in result.stdout
    assert "1 damaged or missing record(s)" in result.stderr


def test_dump_missing_dir_is_one_line_error(tmp_path):
    result = run_mqs("dump", str(tmp_path / "nope"))
    assert_one_line_error(result, "not found")


# ------------------------------------------------------------------ purge


def test_purge_without_yes_changes_nothing(queue, shm_name):
    queue.put_many([b"a", b"b"])
    result = run_mqs("purge", shm_name)
    assert result.returncode == 2
    assert "run again with --yes" in result.stderr
    assert queue.qsize() == 2


def test_purge_without_yes_is_one_line(queue, shm_name):
    queue.put(b"a")
    result = run_mqs("purge", shm_name, columns=40)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_purge_yes_discards_every_group(queue, shm_name):
    queue.put_many([b"a", b"b", b"c"])
    queue.get()
    result = run_mqs("purge", shm_name, "--yes")
    assert result.returncode == 0, result.stderr
    assert "[2, 3]" in result.stdout
    stats = queue.stats()
    assert stats.lag == (0, 0)
    queue.put(b"after")
    assert queue.get(timeout=5) == b"after"


def test_purge_keeps_and_names_delayed(queue, shm_name):
    queue.put_many([b"a", b"b"])
    queue.put(b"later", delay=60)
    dry_run = run_mqs("purge", shm_name)
    assert dry_run.returncode == 2
    assert "1 delayed message(s) not due yet stay" in dry_run.stderr
    result = run_mqs("purge", shm_name, "--yes")
    assert result.returncode == 0, result.stderr
    assert "[2, 2]" in result.stdout
    assert "1 delayed message(s) not due yet stay" in result.stdout
    assert queue.qsize() == 0
    assert queue.delayed == 1


def test_purge_unknown_queue_is_one_line_error():
    result = run_mqs("purge", "no-such-queue-for-cli", "--yes")
    assert_one_line_error(result, "no shared queue named")


@pytest.mark.parametrize("command", [
    ("purge", "--yes"),
    ("tail", "--group", "0", "--timeout", "0"),
])
def test_queue_command_on_shm_broker_names_broker(shm_broker, command):
    """purge and tail work on shared queues only. Given an shm broker's
    name, their error names it as a broker and lists the commands that
    read one."""
    name, *options = command
    result = run_mqs(name, shm_broker, *options)
    assert_one_line_error(result, f"{shm_broker!r} is an shm broker")
    assert "no shm broker of that name" not in result.stderr
    assert f"mqs stat {shm_broker}" in result.stderr
    assert f"mqs dlq list {shm_broker} TOPIC" in result.stderr


def test_purge_log_broker_dir_error(tmp_path):
    """purge works on shared queues only. Given a log broker's directory
    (a name without '/', run from its parent), the error names the
    directory's kind and the command that deletes the broker's dead
    letters, instead of claiming that no such directory exists."""
    mqs.Broker(backend="log", path=str(tmp_path / "shop")).close()
    result = run_mqs("purge", "shop", "--yes", cwd=tmp_path)
    assert_one_line_error(result, "'shop' is a log broker directory")
    assert "no directory" not in result.stderr
    assert "mqs dlq purge shop TOPIC" in result.stderr


# ------------------------------------------------------------------- tail


def test_tail_log_prints_last_records(log_dir):
    result = run_mqs("tail", str(log_dir), "--lines", "3", "--timeout", "0")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("297 ")
    assert lines[-1].endswith("b'event-299'")


def test_tail_log_follows_new_records(log_dir):
    process = subprocess.Popen(
        [sys.executable, "-m", "mqs", "tail", str(log_dir), "--from", "300",
         "--count", "2", "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Give tail time to reach its polling loop, so that it usually
        # follows the appends. With --from, a late start prints the same.
        time.sleep(0.5)
        with mqs.SegmentLog(log_dir, segment_bytes=8192,
                            fsync="never") as log:
            log.append(b"late-1")
            log.append(b"late-2")
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert stdout.splitlines() == ["300 6 B b'late-1'", "301 6 B b'late-2'"]


def test_tail_queue_gets_its_group_only(queue, shm_name):
    queue.put_many([b"one", b"two"])
    queue.put({"n": 3})
    result = run_mqs("tail", shm_name, "--group", "1", "--count", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "3 B b'one'", "3 B b'two'", "dict {'n': 3}"]
    assert queue.stats().lag == (3, 0)


def test_tail_queue_without_group_is_error(queue, shm_name):
    result = run_mqs("tail", shm_name, "--timeout", "0")
    assert_one_line_error(result, "give --group")


def test_tail_queue_group_out_of_range_is_error(queue, shm_name):
    result = run_mqs("tail", shm_name, "--group", "5", "--timeout", "0")
    assert_one_line_error(result, "--group must be 0 to 1")


def test_tail_unknown_target_is_one_line_error():
    result = run_mqs("tail", "no-such-queue-for-cli", "--group", "0")
    assert_one_line_error(result, "no shared queue named")


def closed_redis_url():
    """Return a redis:// URL of a 127.0.0.1 port that nothing listens on
    (it was free a moment ago)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def test_stat_unreachable_redis_fails_fast():
    pytest.importorskip("redis")
    result = run_mqs("stat", "--url", closed_redis_url(), "--retry-timeout",
                     "0")
    assert_one_line_error(result, "unreachable for 0.0 s")
    assert "raise --retry-timeout" in result.stderr
    assert "raise retry_timeout" not in result.stderr

    # The default retries for a few seconds, not the library's 30 s.
    result = run_mqs("stat", "--url", closed_redis_url())
    assert result.returncode == 1
    assert "unreachable for 3.0 s" in result.stderr
    assert "Traceback" not in result.stderr


def test_stat_log_broker_title_on_one_line(tmp_path):
    path = tmp_path / ("a-directory-name-long-enough-to-wrap-a-narrow-table"
                       "-title") / "broker"
    broker = mqs.Broker(backend="log", path=path)
    broker.publish("t", 1)
    broker.close()
    result = run_mqs("stat", "--path", str(path))
    assert result.returncode == 0, result.stderr
    title = result.stdout.splitlines()[0].strip()
    assert title == f"log broker {path}: 1 topic(s)"
