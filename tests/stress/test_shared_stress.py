"""Stress tests of mqs.SharedQueue: 4 producer and 4 consumer processes.

Producers put messages of random size (0 to 4 KiB bodies) that carry the
producer id, a sequence number and the CRC-32 of the body. Consumers
check every body and that each producer's messages reach them in order.
They report what they got, so the test can check that every message
arrived exactly once. Random choices use fixed seeds.

MQS_TEST_SCALE (default 1, sized for CI on 2 cores) multiplies the
message count and the time bound. At 1 each of the two main tests sends
1,000,000 messages and the bounded-queue test a quarter of that.
"""

import multiprocessing
import time

import pytest
import shared_workers
from shared_workers import sequences_of, stop_message

from mqs.shared import SharedQueue

pytestmark = pytest.mark.stress

PRODUCERS = 4
CONSUMERS = 4
MESSAGES_PER_SCALE = 1_000_000
MAX_BODY = 4096
RING_BYTES = 1 << 20
TIME_BOUND_S = 90.0  # at MQS_TEST_SCALE=1, for one test
SEED = 7


def run_processes(q, per_producer, scale, batch):
    """Run the producers and consumers; return the consumers' reports."""
    context = multiprocessing.get_context("fork")
    deadline = time.monotonic() + TIME_BOUND_S * max(1.0, scale)
    pipes = [context.Pipe(duplex=False) for _ in range(CONSUMERS)]
    consumers = [
        context.Process(target=shared_workers.consume_into_pipe,
                        args=(q, send_end, batch), name=f"consumer-{i}")
        for i, (_, send_end) in enumerate(pipes)
    ]
    producers = [
        context.Process(target=shared_workers.produce,
                        args=(q, p, per_producer, SEED, MAX_BODY, batch),
                        name=f"producer-{p}")
        for p in range(PRODUCERS)
    ]
    everyone = consumers + producers
    try:
        for process in everyone:
            process.start()
        for process in producers:
            process.join(max(0.0, deadline - time.monotonic()))
        late = [p.name for p in producers if p.is_alive()]
        assert not late, f"producers still running at the time bound: {late}"
        assert [p.exitcode for p in producers] == [0] * PRODUCERS

        for _ in range(CONSUMERS):
            q.put(stop_message(), timeout=60)
        reports = []
        for receive_end, _ in pipes:
            if not receive_end.poll(max(0.0, deadline - time.monotonic())):
                pytest.fail("a consumer sent no report before the time "
                            "bound")
            reports.append(receive_end.recv())
        for process in consumers:
            process.join(max(1.0, deadline - time.monotonic()))
        assert [c.exitcode for c in consumers] == [0] * CONSUMERS
    finally:
        for process in everyone:
            if process.is_alive():
                process.kill()
                process.join(10)
    return reports


def check_reports(reports, per_producer):
    failures = [r["failure"] for r in reports if "failure" in r]
    assert failures == []
    errors = [e for r in reports for e in r["errors"]]
    assert sum(r["error_count"] for r in reports) == 0, errors

    expected = list(range(per_producer))
    for producer in range(PRODUCERS):
        got = []
        for report in reports:
            got.extend(sequences_of(report).get(producer, []))
        assert len(got) == per_producer, (
            f"producer {producer}: {len(got)} messages arrived, "
            f"{per_producer} were put")
        assert sorted(got) == expected, (
            f"producer {producer}: some messages arrived twice or never")


@pytest.mark.parametrize("batch", [1, 64], ids=["put-get", "put_many-get_many"])
def test_shared_queue_delivers_exactly_once_in_order(scale, batch):
    per_producer = max(1000, int(MESSAGES_PER_SCALE * scale)) // PRODUCERS
    q = SharedQueue(capacity_bytes=RING_BYTES)
    try:
        reports = run_processes(q, per_producer, scale, batch)
        check_reports(reports, per_producer)
        assert q.qsize() == 0
        stats = q.stats()
        assert stats.repaired_records == 0
        assert stats.repaired_bytes == 0
        assert stats.lost_records == 0
        assert stats.depth == 0
    finally:
        q.close()


def test_bounded_shared_queue_delivers_exactly_once(scale):
    per_producer = max(1000, int(MESSAGES_PER_SCALE * scale / 4)) // PRODUCERS
    q = SharedQueue(64, capacity_bytes=RING_BYTES)
    try:
        reports = run_processes(q, per_producer, scale, 16)
        check_reports(reports, per_producer)
        assert q.qsize() == 0
    finally:
        q.close()
