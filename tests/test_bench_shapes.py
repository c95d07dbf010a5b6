"""Tests of the Disruptor shapes of `mqs bench` (`mqs.bench_shapes`)."""

import queue

import pytest

from mqs import bench, bench_ipc, bench_shapes


def thread_transport(label):
    return next(t for t in bench_shapes.THREAD_TRANSPORTS if t.label == label)


@pytest.mark.parametrize("shape", bench_shapes.SHAPES)
@pytest.mark.parametrize("label", ["mqs.RingBuffer", "queue.SimpleQueue"])
def test_run_once_moves_every_message_through_shape(shape, label):
    published, elapsed_ns = bench_shapes.run_once(
        shape, thread_transport(label), 300, 16)
    expected = 300 if shape != "three-to-one" else 3 * (300 // 3)
    assert published == expected
    assert elapsed_ns > 0


def test_run_once_moves_messages_between_processes():
    transport = next(t for t in bench_shapes.PROCESS_TRANSPORTS
                     if t.label == "mqs.SharedQueue")
    published, elapsed_ns = bench_shapes.run_once("diamond", transport, 200,
                                                  64)
    assert published == 200
    assert elapsed_ns > 0


class CorruptingQueue(queue.SimpleQueue):
    """Replace the sixth message put with zero bytes of the same length."""

    def __init__(self):
        super().__init__()
        self.puts = 0

    def put(self, item, block=True, timeout=None):
        self.puts += 1
        if self.puts == 6:
            item = bytes(len(item))
        super().put(item)


CORRUPTING = bench_shapes.Transport(
    "corrupting", "threads",
    bench_shapes._thread_queue(CorruptingQueue))


@pytest.mark.parametrize("shape", ["one-to-one", "pipeline", "diamond"])
def test_run_once_rejects_corrupted_message(shape):
    with pytest.raises(bench.BenchmarkError,
                       match=r"lost, duplicated, reordered or corrupted "
                             r"messages: got 50 of 50, and 1 differed"):
        bench_shapes.run_once(shape, CORRUPTING, 50, 8)


def test_checker_tracks_each_producer_in_order():
    pools = bench_shapes.make_pools(2, 8)
    checker = bench_shapes._Checker(pools)
    for message in (pools[0][0], pools[1][0], pools[1][1], pools[0][1]):
        checker.check(message)
    assert checker.outcome(5) == {"end_ns": 5, "received": 4,
                                  "mismatched": 0, "first_mismatch": -1}


def test_checker_counts_reordered_and_foreign_messages():
    pools = bench_shapes.make_pools(1, 8)
    checker = bench_shapes._Checker(pools)
    for message in (pools[0][1], pools[0][0], b"\x07" * 8, b""):
        checker.check(message)
    assert checker.outcome(0)["mismatched"] == 4
    assert checker.outcome(0)["first_mismatch"] == 0


def test_make_pools_are_distinct_per_producer():
    pools = bench_shapes.make_pools(3, 8)
    messages = [message for pool in pools for message in pool]
    assert len(set(messages)) == 3 * bench_ipc.MESSAGE_POOL_SIZE
    assert all(len(message) == 8 for message in messages)
    assert {pool[0][0] for pool in pools} == {0, 1, 2}


def test_make_pools_rejects_size_below_two():
    with pytest.raises(ValueError, match=r"at least 2 bytes, got 1"):
        bench_shapes.make_pools(1, 1)


def test_run_matrix_rejects_unknown_shape():
    run = bench_shapes.ShapeRun("threads", "star", 8, 10)
    with pytest.raises(ValueError, match=r"unknown shape 'star'; choose "
                                         r"from one-to-one"):
        bench_shapes.run_matrix([run], 1)


def test_run_matrix_reports_ratio_to_reference():
    run = bench_shapes.ShapeRun("threads", "one-to-one", 8, 200)
    results, skipped = bench_shapes.run_matrix([run], 2)
    assert skipped == []
    assert {r.queue for r in results} == {
        t.label for t in bench_shapes.THREAD_TRANSPORTS}
    for result in results:
        assert result.case == "threads one-to-one 8B"
        assert len(result.elapsed_ns) == 2
        assert result.ratio_to_reference > 0
    reference = next(r for r in results if r.queue == "queue.Queue")
    assert reference.ratio_to_reference == 1.0


def test_format_size_uses_binary_units():
    assert bench_shapes.format_size(8) == "8B"
    assert bench_shapes.format_size(1000) == "1000B"
    assert bench_shapes.format_size(4096) == "4KiB"
    assert bench_shapes.format_size(65536) == "64KiB"
