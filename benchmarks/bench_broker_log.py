"""Publish -> consume -> ack through the durable log backend of `mqs.Broker`
against persist-queue's SQLiteAckQueue and Redis Streams.

The subjects, shapes and checks are those of `mqs.bench_backends` (also
run by ``mqs bench`` as its ``broker-backends`` section): N small dicts
(``--bench-count`` / 50) go through each subject, one message per call,
in one thread, with 4 producer threads and 1 consumer thread, and with 4
producer and 4 consumer threads. Subjects: `Broker(backend="log")` with
``fsync="always"`` and ``"interval"``, SQLiteAckQueue with
``auto_commit=True`` (the peer of "always") and Redis Streams through
redis-py on a throwaway redis-server with ``appendfsync everysec`` (the
peer of "interval"). ``--benchmark-json`` stores ``messages_per_s``.

Run ``python benchmarks/bench_broker_log.py`` to measure these subjects
in every shape in one run and print the ratios ``log always /
SQLiteAckQueue`` and ``log interval / Redis Streams`` per shape (medians
of ``--rounds`` rounds after a warm-up round).
"""

import argparse
import os
import platform

from mqs import bench_backends

try:
    import pytest
except ImportError:  # pragma: no cover - the script mode needs no pytest
    pytest = None

SUBJECT_NAMES = ("log fsync=always", "log fsync=interval", "SQLiteAckQueue",
                 "Redis Streams everysec")


if pytest is not None:
    @pytest.fixture(scope="module")
    def redis_everysec_url():
        from mqs._redis_server import RedisServer

        reason = bench_backends.skip_reason("Redis Streams everysec")
        if reason is not None:
            pytest.skip(reason)
        with RedisServer(appendfsync="everysec") as server:
            yield server.url


    @pytest.mark.parametrize("shape", bench_backends.SHAPE_NAMES)
    @pytest.mark.parametrize("subject", SUBJECT_NAMES)
    def bench_broker_log_vs_peers(benchmark, request, subject, shape):
        reason = bench_backends.skip_reason(subject)
        if reason is not None:
            pytest.skip(reason)
        url = request.getfixturevalue("redis_everysec_url") \
            if subject.startswith("Redis") else None
        count = max(bench_backends.PRODUCERS * bench_backends.CONSUMERS,
                    request.config.getoption("--bench-count") // 50)
        rounds = request.config.getoption("--bench-rounds")
        items = bench_backends.make_items(count)

        benchmark.group = f"durable publish -> consume -> ack, {shape}"
        benchmark.extra_info["count"] = count
        benchmark.pedantic(bench_backends.run_round,
                           args=(subject, shape, items, url),
                           rounds=rounds, warmup_rounds=1)
        if benchmark.stats is not None:
            benchmark.extra_info["messages_per_s"] = \
                count / benchmark.stats.stats.median


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Measure the log broker against SQLiteAckQueue and "
                    "Redis Streams (appendfsync everysec) in one run and "
                    "print the ratios.")
    parser.add_argument("--count", type=int, default=4000,
                        help="messages per round (default: 4000)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds per subject and shape, after one "
                             "warm-up round (default: 3)")
    args = parser.parse_args(argv)
    print(f"python {platform.python_version()}, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()}, {args.count} messages, "
          f"{args.rounds} rounds", flush=True)
    result = bench_backends.run_backends_bench(
        args.count, args.rounds, subjects=SUBJECT_NAMES)
    print(bench_backends.format_backends_bench(result))
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
