"""Cross-process round-trip latency of mqs.SharedQueue against its peers.

The ``ipc-pingpong`` case of `mqs.bench_ipc`: one forked process puts a
64-byte message on a ping queue and waits for it on a pong queue, and a
second forked process puts back every message it gets. The queues are
`mqs.SharedQueue` with ``wait_strategy="block"`` (the default) and
``"spin"``, `multiprocessing.Queue`, `faster_fifo.Queue` and pyzmq
PUSH/PULL sockets on ``ipc://`` paths in a temporary directory. ``raw
mmap spin`` is the floor for a ping-pong written in Python: two processes
busy-wait on 8-byte counters in an anonymous shared mmap, with no queue
and no payload. Peers whose package is missing are skipped
(``pip install 'mqs[bench]'`` installs them).

Round trips per round: 4,000 (the `mqs bench` default) scaled by
``--bench-count`` over its default of 500,000, after 100 untimed round
trips. Each round uses fresh queues and fresh processes;
``--bench-rounds`` rounds (default 5) follow one warm-up round. The round
time includes forking and joining the processes, so it is not the
latency: ``extra_info`` stores the nearest-rank percentiles of the single
round trips of all timed rounds (``p50_ns``, ``p90_ns``, ``p99_ns``) and
their mean (``mean_ns``).

Every round checks that each echo equals, byte for byte, the message
sent, and fails otherwise.

Run with ``pytest benchmarks/ --benchmark-only``.
"""

import pytest

from mqs import bench, bench_ipc

CASE = bench_ipc.CASES["ipc-pingpong"]


@pytest.mark.parametrize("queue_label",
                         [subject.label for subject in CASE.subjects])
def bench_ipc_round_trip(benchmark, request, queue_label):
    subject = next(s for s in CASE.subjects if s.label == queue_label)
    reason = bench_ipc.peer_missing_reason(subject.peer)
    if reason is not None:
        pytest.skip(reason)
    scale = request.config.getoption("--bench-count") / bench.DEFAULT_COUNT
    count = max(1, round(CASE.default_count * scale))
    rounds = request.config.getoption("--bench-rounds")
    messages = bench_ipc.make_messages(CASE.message_size_bytes, count)
    latencies = []

    def run():
        # run_pingpong_once raises BenchmarkError when an echo differs
        # from the message sent, which fails this benchmark.
        latencies.append(bench_ipc.run_pingpong_once(CASE, subject, messages))

    benchmark.group = f"{CASE.name}: {CASE.description}"
    benchmark.extra_info["round_trips_per_round"] = count
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)

    assert len(latencies) == rounds + 1
    result = bench_ipc.LatencyResult(CASE.name, queue_label, count,
                                     latencies[1:])
    assert result.total_round_trips == rounds * count
    benchmark.extra_info.update(
        p50_ns=result.p50_ns, p90_ns=result.p90_ns, p99_ns=result.p99_ns,
        mean_ns=result.mean_ns)
