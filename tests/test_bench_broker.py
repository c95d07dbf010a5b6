"""Tests of mqs.bench_broker: the shm broker against Redis Streams."""

import os
import time

import pytest

from mqs import bench_broker
from mqs.bench import BenchmarkError

if os.environ.get("CI"):
    import redis  # CI installs the test extra, so a missing one is an error
else:
    redis = pytest.importorskip("redis")

SCALE = 0.02


def test_broker_bench_runs_every_case(redis_url):
    result = bench_broker.run_broker_bench(scale=SCALE, repeat=1,
                                           url=redis_url)
    cases = {case["case"]: case for case in result["cases"]}
    assert list(cases) == list(bench_broker.CASE_NAMES)
    for name, case in cases.items():
        _, mode, shape = name.split(".")
        count = int(bench_broker.BASE_COUNTS[mode] * SCALE)
        expected = count if shape == "1p1c" else int(shape[:-1]) * count
        if name.startswith("core."):
            expected *= bench_broker.CORE_COUNT_FACTOR
        assert case["messages"] == expected, name
        assert case["rounds"] == 1, name
        assert 0 < case["rate_min_per_s"] <= case["rate_per_s"], name
        assert case["rate_per_s"] <= case["rate_max_per_s"], name
    ratios = {ratio["name"]: ratio for ratio in result["ratios"]}
    assert sorted(ratios) == sorted(
        f"{name[4:]}_vs_redis_streams" for name in cases
        if name.startswith("shm."))
    for ratio in ratios.values():
        shm = cases[ratio["numerator"]]["rate_per_s"]
        peer = cases[ratio["denominator"]]["rate_per_s"]
        assert ratio["value"] == pytest.approx(shm / peer)
        if ratio["numerator"].startswith("shm.per_message."):
            assert ratio["target"] == bench_broker.TARGET
            assert ratio["met"] == (ratio["value"] >= bench_broker.TARGET)
        else:
            assert ratio["target"] is None
            assert ratio["met"] is None
    tracked = [name for name, ratio in ratios.items() if ratio["tracked"]]
    assert tracked == ["per_message.1p1c_vs_redis_streams"]


def test_broker_bench_split_shape_workers():
    workers = bench_broker._shape_workers(
        "1p1c", bench_broker._shm_worker, bench_broker._shm_producer,
        bench_broker._shm_consumer)
    assert workers == [bench_broker._shm_producer,
                       bench_broker._shm_consumer]
    whole = bench_broker._shape_workers(
        "4p", bench_broker._shm_worker, bench_broker._shm_producer,
        bench_broker._shm_consumer)
    assert whole == [bench_broker._shm_worker] * 4
    assert bench_broker._shape_messages("1p1c", 7) == 7
    assert bench_broker._shape_messages("4p", 7) == 28


def test_broker_bench_leaves_no_keys_or_brokers(redis_server_factory):
    # A server of its own: tests of other files may write keys
    # with the same prefix to the shared one meanwhile.
    redis_url = redis_server_factory().url
    client = redis.Redis.from_url(redis_url)
    before = set(client.scan_iter(match="mqs-bench:*"))
    bench_broker.run_broker_bench(scale=SCALE, repeat=1, url=redis_url,
                                  cases=["redis.batched.1p",
                                         "shm.batched.1p",
                                         "core.per_message.1p1c"])
    assert set(client.scan_iter(match="mqs-bench:*")) == before
    client.close()
    assert not [entry for entry in os.listdir("/dev/shm")
                if entry.startswith(f"mqs.broker.mqs-bench-{os.getpid()}")]
    assert not [entry for entry in os.listdir("/dev/shm")
                if entry.startswith(f"mqs-bench-core-{os.getpid()}")]


def test_broker_bench_worker_failure_raises(monkeypatch):
    def broken(*args):
        raise SystemExit(3)
    monkeypatch.setattr(bench_broker, "_shm_worker", broken)
    with pytest.raises(BenchmarkError, match="exit codes"):
        bench_broker.run_broker_bench(scale=SCALE, repeat=1,
                                      cases=["shm.per_message.1p"])


def _slow_exit_worker(loop_s, exit_s, count, start, results):
    start.wait()
    began = time.perf_counter_ns()
    time.sleep(loop_s)
    results.put((count, began, time.perf_counter_ns()))
    # Exit and teardown after the last operation are not timed.
    time.sleep(exit_s)


def test_broker_bench_times_loops_not_exit():
    elapsed = bench_broker._run_workers(
        [_slow_exit_worker, _slow_exit_worker], (0.2, 1.0), 5, 10)
    assert elapsed >= 0.2e9
    assert elapsed < 0.9e9


def test_broker_bench_counts_every_worker():
    with pytest.raises(BenchmarkError, match="consumed 10 messages, "
                                             "expected 11"):
        bench_broker._run_workers(
            [_slow_exit_worker, _slow_exit_worker], (0.0, 0.0), 5, 11)


def test_broker_bench_rejects_unknown_case():
    with pytest.raises(ValueError, match="unknown case 'shm.x'"):
        bench_broker.run_broker_bench(cases=["shm.x"])


def test_batched_ratio_is_shown_without_a_target():
    """The 30x target is set for one call per message: a batched ratio is
    printed with "no target" and stays out of the tracked-ratios table."""
    from mqs import cli_bench_tables

    result = {"cases": [], "ratios": [
        {"name": "per_message.1p1c_vs_redis_streams", "value": 31.0,
         "target": 30.0, "met": True, "tracked": True,
         "numerator": "shm.per_message.1p1c",
         "denominator": "redis.per_message.1p1c"},
        {"name": "batched.1p_vs_redis_streams", "value": 3.5,
         "target": None, "met": None, "tracked": False,
         "numerator": "shm.batched.1p", "denominator": "redis.batched.1p"},
    ]}
    text = bench_broker.format_broker_bench(result)
    lines = {line.split()[0]: line for line in text.splitlines() if line}
    assert lines["batched.1p_vs_redis_streams"].split()[1:] == [
        "3.50x", "no", "target"]
    assert "target >= 30x  met  (tracked)" in lines[
        "per_message.1p1c_vs_redis_streams"]
    rows = cli_bench_tables.section_ratios(None, None, result)
    assert [row.name for row in rows] == [
        "broker per_message.1p1c_vs_redis_streams"]
