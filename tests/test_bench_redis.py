"""Tests of the Redis peer loops in mqs.bench_redis, on a real server."""

import os

import pytest

from mqs import bench_redis

if os.environ.get("CI"):
    import redis  # CI installs the test extra, so a missing one is an error
else:
    redis = pytest.importorskip("redis")

COUNT = 250


@pytest.mark.parametrize("loop", list(bench_redis.LOOPS))
def test_redis_loop_reports_count_and_rate(redis_url, loop):
    result = bench_redis.run_redis_peers(COUNT, batch=64, loops=[loop],
                                         url=redis_url)[0]
    assert result.loop == loop
    assert result.count == COUNT
    assert result.elapsed_ns > 0
    assert result.rate_per_s == pytest.approx(COUNT / result.elapsed_ns * 1e9)
    assert result.params["body_bytes"] == 100
    expected_batch = 64 if loop in ("xadd_pipelined", "xreadgroup_xack_batched",
                                    "stream_roundtrip",
                                    "broker_publish_batched",
                                    "broker_consume_ack_batched") else 1
    assert result.params["batch"] == expected_batch


def test_redis_loops_leave_no_keys(redis_server_factory):
    # A server of its own: tests of other files may write keys
    # with the same prefix to the shared one meanwhile.
    redis_url = redis_server_factory().url
    client = redis.Redis.from_url(redis_url)
    before = set(client.scan_iter(match="mqs-bench:*"))
    bench_redis.xadd_pipelined(redis_url, COUNT, body_bytes=10, batch=7)
    bench_redis.xreadgroup_xack(redis_url, 20)
    bench_redis.lpush_brpop(redis_url, 20)
    assert set(client.scan_iter(match="mqs-bench:*")) == before
    client.close()


def test_broker_loops_leave_no_keys(redis_server_factory):
    # A server of its own: tests of other files may write keys
    # with the same prefix to the shared one meanwhile.
    redis_url = redis_server_factory().url
    client = redis.Redis.from_url(redis_url)
    before = set(client.scan_iter(match="{mqs-bench-*"))
    bench_redis.broker_publish_batched(redis_url, 30, batch=7)
    bench_redis.broker_consume_ack(redis_url, 20)
    assert set(client.scan_iter(match="{mqs-bench-*")) == before
    client.close()


def test_redis_roundtrip_per_message(redis_url):
    result = bench_redis.stream_roundtrip(redis_url, 100, batch=1,
                                          body_bytes=4096)
    assert result.count == 100
    assert result.params["batch"] == 1
    assert result.params["body_bytes"] == 4096


def test_redis_lpush_brpop_reports_phases(redis_url):
    result = bench_redis.lpush_brpop(redis_url, 50)
    assert result.params["push_ns"] > 0
    assert result.params["pop_ns"] > 0
    assert result.elapsed_ns == \
        result.params["push_ns"] + result.params["pop_ns"]


def test_redis_peers_start_their_own_server(redis_server_factory):
    results = bench_redis.run_redis_peers(
        100, appendfsync="always", loops=["xadd", "xreadgroup_xack_batched"])
    assert [r.loop for r in results] == ["xadd", "xreadgroup_xack_batched"]
    for result in results:
        assert result.params["appendfsync"] == "always"
        assert result.params["url"].startswith("redis://127.0.0.1:")


def test_redis_result_url_hides_password(redis_server_factory):
    server = redis_server_factory(password="hunter2")
    result = bench_redis.xadd(server.url, 10)
    assert "hunter2" not in result.params["url"]
    assert result.params["url"] == f"redis://:***@127.0.0.1:{server.port}/0"


@pytest.mark.parametrize("kwargs,match", [
    ({"count": 0}, "count must be an int >= 1, got 0"),
    ({"count": 10, "body_bytes": 0}, "body_bytes must be an int >= 1, got 0"),
    ({"count": 10, "batch": 0}, "batch must be an int >= 1, got 0"),
    ({"count": 10, "loops": ["xdel"]}, "unknown Redis loop 'xdel'"),
])
def test_redis_peers_reject_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench_redis.run_redis_peers(url="redis://127.0.0.1:1/0", **kwargs)
