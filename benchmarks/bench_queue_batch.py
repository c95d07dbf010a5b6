"""Per-item throughput of `put_many`/`get_many` against stdlib put/get loops.

The ``batch`` case of `mqs.bench`: one producer thread and one consumer
thread move N ints (``--bench-count``, default 500,000). The mqs queues
put lists of 1,000 items with `put_many` (sliced before the clock starts)
and the consumer calls `get_many(1000)`, which returns what is queued, up
to 1,000 items. `queue.Queue` and `queue.SimpleQueue` have no batch calls,
so for them both threads put and get one item per call.

Each round uses a fresh queue; ``--bench-rounds`` rounds (default 5)
follow one warm-up round, with the garbage collector off. The round time
includes starting and joining the two threads. Every round is checked
afterwards: the consumer must have received exactly the items put, in
order. Divide ``--bench-count`` by the median round time for items per
second; ``--benchmark-json`` stores it as ``items_per_s``.
"""

import pytest


@pytest.mark.parametrize(
    "queue_label",
    ["mqs.Queue", "mqs.SimpleQueue", "queue.Queue", "queue.SimpleQueue"])
def bench_batch_one_producer_one_consumer(measure_transfer, queue_label):
    measure_transfer("batch", queue_label)
