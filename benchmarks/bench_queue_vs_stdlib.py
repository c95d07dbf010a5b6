"""Throughput of mqs.Queue and mqs.SimpleQueue against the stdlib queues.

Three cases from `mqs.bench`, each with the standard library baselines:

- ``1p1c``: one producer thread puts N ints, one consumer thread gets them
  one per call; unbounded queues.
- ``1p1c-bounded``: the same with `mqs.Queue(maxsize=1024)` and
  `queue.Queue(maxsize=1024)`.
- ``pair``: one thread puts each item and gets it back at once.

Each round moves N ints (``--bench-count``, default 500,000) through a
fresh queue; ``--bench-rounds`` rounds (default 5) follow one warm-up
round, with the garbage collector off. The round time covers the whole
transfer function, so in the threaded cases it includes starting and
joining the two threads (well under a millisecond). Every round is checked
afterwards: the consumer must have received exactly the items put, in
order.

Run with ``pytest benchmarks/ --benchmark-only``. Benchmarks of one case
share a group. The number in brackets after each time is that time divided
by the fastest queue's time in the group. A ratio of rates is therefore
the inverse of a ratio of times. ``--benchmark-json`` also stores the
median rate as ``items_per_s``.
"""

import pytest

from mqs import bench

UNBOUNDED = ["mqs.Queue", "mqs.SimpleQueue", "queue.Queue",
             "queue.SimpleQueue"]
BOUNDED = [f"mqs.Queue(maxsize={bench.BOUNDED_MAXSIZE})",
           f"queue.Queue(maxsize={bench.BOUNDED_MAXSIZE})"]


@pytest.mark.parametrize("queue_label", UNBOUNDED)
def bench_one_producer_one_consumer(measure_transfer, queue_label):
    measure_transfer("1p1c", queue_label)


@pytest.mark.parametrize("queue_label", BOUNDED)
def bench_one_producer_one_consumer_bounded(measure_transfer, queue_label):
    measure_transfer("1p1c-bounded", queue_label)


@pytest.mark.parametrize("queue_label", UNBOUNDED)
def bench_put_get_pair_same_thread(measure_transfer, queue_label):
    measure_transfer("pair", queue_label)
