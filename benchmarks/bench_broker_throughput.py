"""Publish -> consume -> ack throughput of `mqs.Broker` on the memory backend.

One producer thread publishes N small dicts (a fifth of
``--bench-count``) and one consumer thread takes them and acknowledges
each one, in four variants: single `publish` calls with a consumer of
``prefetch=1`` calling `get` and `ack`; `publish_many` batches of 500
with a consumer of ``prefetch=500`` calling `get_many`; the batched
variant with ``auto_ack=True``; and the batched variant spread over three
priorities with the weighted policy. The stdlib baseline moves the same
items through `queue.Queue` with `put`, `get` and `task_done`, the
closest stdlib equivalent of an acknowledged delivery.

Each round uses a fresh broker or queue; the round time includes
starting and joining both threads. Every round is checked: the consumer
must receive each item exactly once. Divide N by the median round time
for messages per second; ``--benchmark-json`` stores it as
``messages_per_s``.
"""

import queue
import threading

import pytest

import mqs

BATCH = 500


def _broker_round(items, batched, auto_ack, priorities):
    broker = mqs.Broker()
    received = []
    consumer = broker.consume("t", "g", prefetch=BATCH if batched else 1,
                              auto_ack=auto_ack)

    def consume():
        while len(received) < len(items):
            if batched:
                messages = consumer.get_many(BATCH, timeout=30)
            else:
                messages = [consumer.get(timeout=30)]
            for message in messages:
                received.append(message.body)
                if not auto_ack:
                    message.ack()

    def produce():
        if not batched:
            for item in items:
                broker.publish("t", item)
            return
        for start in range(0, len(items), BATCH):
            chunk = items[start:start + BATCH]
            broker.publish_many("t", chunk,
                                priority=priorities[start // BATCH
                                                    % len(priorities)])

    threads = [threading.Thread(target=consume),
               threading.Thread(target=produce)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return received


def _stdlib_round(items):
    jobs = queue.Queue()
    received = []

    def consume():
        for _ in range(len(items)):
            received.append(jobs.get())
            jobs.task_done()

    threads = [threading.Thread(target=consume),
               threading.Thread(target=lambda: [jobs.put(i) for i in items])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return received


VARIANTS = {
    "broker publish/get/ack": dict(batched=False, auto_ack=False,
                                   priorities=(0,)),
    "broker publish_many/get_many/ack": dict(batched=True, auto_ack=False,
                                             priorities=(0,)),
    "broker publish_many/get_many auto_ack": dict(batched=True,
                                                  auto_ack=True,
                                                  priorities=(0,)),
    "broker 3 priorities weighted": dict(batched=True, auto_ack=False,
                                         priorities=(9, 5, 0)),
    "queue.Queue put/get/task_done": None,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def bench_broker_publish_consume_ack(benchmark, request, variant):
    count = max(1, request.config.getoption("--bench-count") // 5)
    rounds = request.config.getoption("--bench-rounds")
    items = [{"n": i, "payload": "x" * 64} for i in range(count)]
    results = []

    def run():
        options = VARIANTS[variant]
        if options is None:
            results.append(_stdlib_round(items))
        else:
            results.append(_broker_round(items, **options))

    benchmark.group = "broker: publish -> consume -> ack, 1 producer, " \
                      "1 consumer thread"
    benchmark.extra_info["count"] = count
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)
    for received in results:
        assert sorted(item["n"] for item in received) == list(range(count))
    if benchmark.stats is not None:
        benchmark.extra_info["messages_per_s"] = \
            count / benchmark.stats.stats.median
