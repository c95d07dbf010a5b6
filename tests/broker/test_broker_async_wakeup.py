"""Tests of `get_async` and `async for` on the shm and log backends.

A consumer that awaits must be woken by a publish in another process
through the broker's wait words (no polling loop), keep the event loop
free, stay idle while nothing happens, and stop when its consumer or
broker closes. Each test runs on three paths: an shm topic on its topic
core, an shm topic on the journal (a ttl keeps it off the core), and
the log backend.
"""

import asyncio
import os
import threading
import time
import uuid

import pytest

import mqs
from broker_children import FORK, join, start
from mqs.broker import _shm

KINDS = ["shm-core", "shm-journal", "log"]


@pytest.fixture(params=KINDS)
def where(request, tmp_path):
    """Return ``(kind, location)`` of a fresh broker, removed afterwards."""
    kind = request.param
    if kind == "log":
        yield kind, str(tmp_path / "broker")
        return
    name = f"test-aw-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield kind, name
    mqs.Broker.unlink(name)


def open_broker(where):
    kind, location = where
    if kind == "log":
        return mqs.Broker(backend="log", path=location,
                          segment_bytes=1 << 20)
    return mqs.Broker(backend="shm", name=location, journal_bytes=1 << 20)


def declare(broker, where, topic="t"):
    # A ttl keeps a topic off its core, on the journal.
    ttl = 3600 if where[0] == "shm-journal" else None
    broker.declare_topic(topic, ttl=ttl)


def wakeup_threads():
    return [thread for thread in threading.enumerate()
            if thread.name.startswith("mqs-wakeup-")]


def _publish_on_event(where, go, count):
    """Child: wait for `go`, then publish `count` messages on "t"."""
    broker = open_broker(where)
    try:
        if not go.wait(60):
            os._exit(3)
        for i in range(count):
            broker.publish("t", i)
    finally:
        broker.close()


def _publish_between_events(where, ready, go, done):
    """Child: publish "warm-up" on "t" (which opens the topic here), set
    `ready`, wait for `go`, publish 0 and close only after `done`, because
    a close wakes every waiter of the broker."""
    broker = open_broker(where)
    try:
        broker.publish("t", "warm-up")
        ready.set()
        if not go.wait(60):
            os._exit(3)
        broker.publish("t", 0)
        if not done.wait(60):
            os._exit(3)
    finally:
        broker.close()


def _ping_pong(where, rounds):
    """Child: publish on "t", then wait for the reply on "r", `rounds`
    times; every publish must wake the parent's awaiting consumer."""
    broker = open_broker(where)
    try:
        replies = broker.consume("r", "child", auto_ack=True)
        for i in range(rounds):
            broker.publish("t", i)
            if replies.get(timeout=30).body != i:
                os._exit(4)
    finally:
        broker.close()


def test_async_get_woken_by_other_process(where):
    broker = open_broker(where)
    declare(broker, where)
    consumer = broker.consume("t", "g", auto_ack=True)
    go = FORK.Event()
    child = start(_publish_on_event, where, go, 1)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        waiting = asyncio.create_task(consumer.get_async(timeout=30))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        ticks_before = ticks
        go.set()
        message = await waiting
        task.cancel()
        return message, ticks_before

    try:
        message, ticks_before = asyncio.run(main())
        join(child)
    finally:
        broker.close()
    assert message.body == 0
    # The loop ran other tasks while the consumer awaited.
    assert ticks_before >= 3


def test_async_get_idle_does_not_poll(where, monkeypatch):
    broker = open_broker(where)
    declare(broker, where)
    consumer = broker.consume("t", "g")
    backend = broker._backend
    calls = 0
    fetch = backend.fetch

    def counting_fetch(*args, **kwargs):
        nonlocal calls
        calls += 1
        return fetch(*args, **kwargs)

    monkeypatch.setattr(backend, "fetch", counting_fetch)

    async def main():
        with pytest.raises(mqs.Empty):
            await consumer.get_async(timeout=1.0)

    try:
        started = time.process_time()
        asyncio.run(main())
        cpu = time.process_time() - started
    finally:
        broker.close()
    # One check per REAP_INTERVAL_S (20 in the second) and no faster; a
    # polling loop with a 10 ms pause makes about 100.
    assert calls <= 2 / _shm.REAP_INTERVAL_S + 5
    # Generous: an idle wait costs a few milliseconds of CPU.
    assert cpu < 0.5


def test_async_get_never_misses_wakeup(where, monkeypatch, scale):
    # The periodic check is pushed out to 30 s, so a message reaches the
    # awaiting consumer only through a wakeup. A missed wakeup stalls its
    # round past the 10 s timeout of get_async.
    monkeypatch.setattr(_shm, "REAP_INTERVAL_S", 30.0)
    broker = open_broker(where)
    declare(broker, where)
    declare(broker, where, "r")
    consumer = broker.consume("t", "g", auto_ack=True)
    broker.consume("r", "child", auto_ack=True).close()
    rounds = max(20, int(200 * scale))
    child = start(_ping_pong, where, rounds)

    async def main():
        bodies = []
        for _ in range(rounds):
            message = await consumer.get_async(timeout=10)
            bodies.append(message.body)
            broker.publish("r", message.body)
        return bodies

    try:
        bodies = asyncio.run(main())
        join(child)
    finally:
        broker.close()
    assert bodies == list(range(rounds))


def test_async_for_ends_on_consumer_close(where):
    broker = open_broker(where)
    declare(broker, where)
    consumer = broker.consume("t", "g", auto_ack=True)

    async def main():
        async def read_all():
            return [message.body async for message in consumer]

        reader = asyncio.create_task(read_all())
        await asyncio.sleep(0.2)
        consumer.close()
        return await asyncio.wait_for(reader, 10)

    try:
        assert asyncio.run(main()) == []
    finally:
        broker.close()


def test_async_get_raises_on_broker_close(where):
    broker = open_broker(where)
    declare(broker, where)
    consumer = broker.consume("t", "g", auto_ack=True)

    async def main():
        waiting = asyncio.create_task(consumer.get_async(timeout=30))
        await asyncio.sleep(0.2)
        broker.close()
        with pytest.raises(mqs.ShutDown):
            await asyncio.wait_for(waiting, 10)

    try:
        asyncio.run(main())
    finally:
        broker.close()
    assert wakeup_threads() == []


def test_async_many_awaiters_get_each_message_once(where, scale):
    broker = open_broker(where)
    declare(broker, where)
    workers = 16
    per_worker = max(5, int(20 * scale))
    total = workers * per_worker
    # One group of competing consumers and one broadcast group.
    consumers = [broker.consume("t", "work", auto_ack=True)
                 for _ in range(workers)]
    watcher = broker.consume("t", "watch", auto_ack=True, prefetch=total)
    go = FORK.Event()
    child = start(_publish_on_event, where, go, total)

    async def main():
        delivered = []
        watched = []

        async def work(consumer):
            while len(delivered) < total:
                try:
                    message = await consumer.get_async(timeout=0.5)
                except mqs.Empty:
                    continue
                delivered.append(message.body)

        async def watch():
            while len(watched) < total:
                watched.append((await watcher.get_async(timeout=30)).body)

        tasks = [asyncio.create_task(work(consumer))
                 for consumer in consumers]
        tasks.append(asyncio.create_task(watch()))
        await asyncio.sleep(0.2)
        go.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        return delivered, watched

    try:
        delivered, watched = asyncio.run(main())
        join(child)
    finally:
        broker.close()
    assert sorted(delivered) == list(range(total))
    assert watched == list(range(total))


def test_async_get_in_two_loops_at_once(where):
    broker = open_broker(where)
    declare(broker, where)
    consumers = [broker.consume("t", f"g{i}", auto_ack=True)
                 for i in range(2)]
    go = FORK.Event()
    child = start(_publish_on_event, where, go, 1)
    results = [None, None]

    def run_loop(index):
        async def main():
            return (await consumers[index].get_async(timeout=30)).body

        results[index] = asyncio.run(main())

    threads = [threading.Thread(target=run_loop, args=(i,))
               for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        go.set()
        for thread in threads:
            thread.join(60)
        join(child)
    finally:
        broker.close()
    assert results == [0, 0]


def test_async_get_in_successive_loops(where):
    broker = open_broker(where)
    declare(broker, where)
    consumer = broker.consume("t", "g", auto_ack=True)

    async def main(body):
        asyncio.get_running_loop().call_later(0.1, broker.publish, "t", body)
        return (await consumer.get_async(timeout=30)).body

    try:
        assert asyncio.run(main("a")) == "a"
        assert asyncio.run(main("b")) == "b"
    finally:
        broker.close()
    assert wakeup_threads() == []


def test_wait_changed_async_woken_by_publish(where):
    # On a core topic a publish changes only the core, not the journal.
    # A missed wakeup makes the wait last its whole 30 s.
    broker = open_broker(where)
    declare(broker, where)
    consumer = broker.consume("t", "g", auto_ack=True)
    ready, go, done = FORK.Event(), FORK.Event(), FORK.Event()
    child = start(_publish_between_events, where, ready, go, done)
    assert ready.wait(60)
    assert consumer.get(timeout=5).body == "warm-up"

    async def main():
        # Earlier work (the warm-up's auto-ack record, which the log
        # writer handles later) may end a wait at once: a wait may wake
        # without a change of its own. Start over until one stays parked.
        for _ in range(50):
            waiting = asyncio.create_task(
                broker._backend.wait_changed_async(30.0))
            await asyncio.sleep(0.2)
            if not waiting.done():
                break
            await waiting
        assert not waiting.done()
        began = time.monotonic()
        go.set()
        await asyncio.wait_for(waiting, 60)
        return time.monotonic() - began

    try:
        try:
            waited = asyncio.run(main())
        finally:
            done.set()
        join(child)
        assert waited < 15
        assert consumer.get(timeout=5).body == 0
    finally:
        broker.close()
    assert wakeup_threads() == []
