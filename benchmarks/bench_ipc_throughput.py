"""Cross-process throughput of mqs.SharedQueue against its peers.

The ``ipc-64b``, ``ipc-4kib`` and ``ipc-batch`` cases of `mqs.bench_ipc`:
a forked producer process sends `bytes` messages to a forked consumer
process. The queues are `mqs.SharedQueue`, `multiprocessing.Queue`,
`multiprocessing.SimpleQueue`, `faster_fifo.Queue` (with `get`, and with
`get_many`) and pyzmq PUSH/PULL sockets on an ``ipc://`` path in a
temporary directory. In ``ipc-batch``, mqs and faster-fifo use `put_many`
with lists of 1,000 messages and `get_many`. The other queues put and get
one message per call there too. Peers whose package is missing are
skipped (``pip install 'mqs[bench]'`` installs them).

Messages per round: each case's `mqs bench` default (200,000 of 64 B,
100,000 of 4 KiB, 200,000 in ``ipc-batch``) scaled by ``--bench-count``
over its default of 500,000, so ``--bench-count 5000`` runs 1% of them.
Each round uses a fresh queue and fresh processes; ``--bench-rounds``
rounds (default 5) follow one warm-up round. The round time includes
forking and joining the two processes (a few milliseconds).
``extra_info`` stores the median rate from the producer's first put to
the consumer's last get, without that overhead: ``messages_per_s`` and
``mb_per_s`` (10**6 bytes).

Every round checks that the consumer received every message, each equal
byte for byte to the message sent at its position, and fails otherwise.

Run with ``pytest benchmarks/ --benchmark-only``. Benchmarks of one case
share a group, so the bracketed ratios compare the queues of that case.
"""

import statistics

import pytest

from mqs import bench, bench_ipc

THROUGHPUT_CASES = ["ipc-64b", "ipc-4kib", "ipc-batch"]


def _parameters():
    for name in THROUGHPUT_CASES:
        for subject in bench_ipc.CASES[name].subjects:
            yield pytest.param(name, subject.label,
                               id=f"{name}-{subject.label}")


@pytest.mark.parametrize(("case_name", "queue_label"), list(_parameters()))
def bench_ipc_throughput(benchmark, request, case_name, queue_label):
    case = bench_ipc.CASES[case_name]
    subject = next(s for s in case.subjects if s.label == queue_label)
    reason = bench_ipc.peer_missing_reason(subject.peer)
    if reason is not None:
        pytest.skip(reason)
    scale = request.config.getoption("--bench-count") / bench.DEFAULT_COUNT
    count = max(1, round(case.default_count * scale))
    rounds = request.config.getoption("--bench-rounds")
    messages = bench_ipc.make_messages(case.message_size_bytes, count)
    elapsed_ns = []

    def run():
        # run_throughput_once raises BenchmarkError when a message was
        # lost or changed, which fails this benchmark.
        elapsed_ns.append(
            bench_ipc.run_throughput_once(case, subject, messages))

    benchmark.group = f"{case.name}: {case.description}"
    benchmark.extra_info["count"] = count
    benchmark.extra_info["message_size_bytes"] = case.message_size_bytes
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)

    assert len(elapsed_ns) == rounds + 1
    rate = count * 1e9 / statistics.median(elapsed_ns[1:])
    benchmark.extra_info["messages_per_s"] = rate
    benchmark.extra_info["mb_per_s"] = rate * case.message_size_bytes / 1e6
