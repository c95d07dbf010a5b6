"""Tests of mqs.RingBuffer: the native ring driven from Python."""

import gc
import weakref

import pytest

import mqs


class Item:
    """A weak-referenceable payload, to watch when the ring lets go."""

    def __init__(self, value):
        self.value = value


def test_ring_rejects_capacity_not_power_of_two():
    with pytest.raises(ValueError, match=r"power of two.*got 1000 \(try 1024\)"):
        mqs.RingBuffer(1000)


@pytest.mark.parametrize("capacity", [0, -4, 2**41])
def test_ring_rejects_capacity_out_of_range(capacity):
    with pytest.raises(ValueError, match=f"got {capacity}"):
        mqs.RingBuffer(capacity)


def test_ring_rejects_capacity_of_wrong_type():
    with pytest.raises(TypeError, match="capacity must be an int, got str '8'"):
        mqs.RingBuffer("8")


def test_ring_rejects_no_consumer_and_no_worker():
    with pytest.raises(ValueError, match="at least one of them set, got 0 and 0"):
        mqs.RingBuffer(8, max_consumers=0, max_workers=0)


def test_ring_rejects_push_when_full():
    ring = mqs.RingBuffer(4)
    ring.add_worker()
    pushed = [ring.try_push(i) for i in range(5)]
    assert pushed == [True, True, True, True, False]


def test_ring_broadcast_consumers_each_see_every_item():
    ring = mqs.RingBuffer(8, max_consumers=2, max_workers=0)
    first = ring.add_consumer()
    second = ring.add_consumer()
    assert ring.try_push_many(range(5))
    assert ring.poll(first) == [0, 1, 2, 3, 4]
    assert ring.poll(second, 2) == [0, 1]
    assert ring.poll(second) == [2, 3, 4]
    assert ring.poll(first) == []


def test_ring_slowest_consumer_gates_producers():
    ring = mqs.RingBuffer(4, max_consumers=2, max_workers=0)
    fast = ring.add_consumer()
    slow = ring.add_consumer()
    assert ring.try_push_many([0, 1, 2, 3])
    assert ring.poll(fast) == [0, 1, 2, 3]
    assert not ring.try_push(4)
    assert ring.poll(slow, 1) == [0]
    assert ring.try_push(4)
    assert ring.poll(fast) == [4]
    assert ring.poll(slow) == [1, 2, 3, 4]


def test_ring_workers_share_items_exactly_once():
    ring = mqs.RingBuffer(16, max_workers=3, multi_producer=True)
    workers = [ring.add_worker() for _ in range(3)]
    assert ring.try_push_many(range(10))
    taken = ring.take(workers[0], 4) + ring.take(workers[1], 4)
    taken += ring.take(workers[2])
    assert taken == list(range(10))
    assert ring.take(workers[0]) == []


def test_ring_idle_worker_does_not_gate_producers():
    ring = mqs.RingBuffer(4, max_workers=2)
    busy = ring.add_worker()
    ring.add_worker()
    for round_number in range(10):
        assert ring.try_push_many([round_number] * 4)
        assert ring.take(busy) == [round_number] * 4


def test_ring_wraps_over_many_laps():
    ring = mqs.RingBuffer(8, max_consumers=1, max_workers=0, multi_producer=True)
    consumer = ring.add_consumer()
    seen = []
    for value in range(1000):
        assert ring.try_push(value)
        if value % 3 == 0:
            seen += ring.poll(consumer)
    seen += ring.poll(consumer)
    assert seen == list(range(1000))


def test_ring_rejects_batch_larger_than_capacity():
    ring = mqs.RingBuffer(4)
    ring.add_worker()
    with pytest.raises(ValueError, match="batch of 5 items is larger than the ring"):
        ring.try_push_many(range(5))


def test_ring_rejects_extra_consumer():
    ring = mqs.RingBuffer(4, max_consumers=1, max_workers=0)
    ring.add_consumer()
    with pytest.raises(ValueError, match="all 1 consumers are taken"):
        ring.add_consumer()


def test_ring_rejects_unknown_worker_index():
    ring = mqs.RingBuffer(4, max_workers=1)
    with pytest.raises(ValueError, match="worker index must be one returned"):
        ring.take(5)


def test_ring_worker_take_releases_item():
    ring = mqs.RingBuffer(4)
    worker = ring.add_worker()
    item = Item(1)
    watcher = weakref.ref(item)
    ring.try_push(item)
    del item
    taken = ring.take(worker)
    del taken
    gc.collect()
    assert watcher() is None


def test_ring_broadcast_releases_item_on_reuse_and_free():
    ring = mqs.RingBuffer(2, max_consumers=1, max_workers=0)
    consumer = ring.add_consumer()
    first = Item(1)
    watcher = weakref.ref(first)
    ring.try_push(first)
    del first
    ring.poll(consumer)
    assert watcher() is not None
    ring.try_push_many([Item(2), Item(3)])
    assert watcher() is None
    last = ring.poll(consumer)
    last_watcher = weakref.ref(last[1])
    del last
    del ring
    assert last_watcher() is None


def test_ring_nbytes_counts_slots_and_markers():
    single = mqs.RingBuffer(1024)
    multi = mqs.RingBuffer(1024, multi_producer=True)
    assert single.nbytes >= 1024 * 8
    assert multi.nbytes - single.nbytes == 1024 * 4


def test_ring_rejects_take_by_unregistered_worker():
    ring = mqs.RingBuffer(4)
    for value in range(6):
        ring.try_push(value)
    with pytest.raises(ValueError, match="worker index must be one returned by add_worker"):
        ring.take(0)


def test_ring_rejects_poll_by_unregistered_consumer():
    ring = mqs.RingBuffer(8, max_consumers=2, max_workers=2)
    ring.add_consumer()
    with pytest.raises(ValueError, match="consumer index must be one returned by add_consumer"):
        ring.poll(1)
