"""Consumer groups of mqs.SharedQueue: broadcast between groups,
competition within a group, and gating on the slowest group."""

import multiprocessing
import uuid
import zlib

import pytest

import mqs

JOIN_TIMEOUT_S = 60


def read_group(queue, count, results):
    got = [queue.get(timeout=30) for _ in range(count)]
    results.put((queue.group, got))


def drain_until_stop(queue, results):
    got = []
    while True:
        item = queue.get(timeout=30)
        if item is None:
            break
        got.append(item)
    results.put((queue.group, got))


def join_all(processes):
    for process in processes:
        process.join(JOIN_TIMEOUT_S)
    alive = [process for process in processes if process.is_alive()]
    for process in alive:
        process.kill()
    assert not alive, f"{len(alive)} consumer processes did not finish"
    assert [process.exitcode for process in processes] == [0] * len(processes)


@pytest.fixture
def fork_context():
    return multiprocessing.get_context("fork")


def test_groups_each_see_every_message(fork_context):
    queue = mqs.SharedQueue(groups=3, capacity_bytes=1 << 16)
    results = mqs.SharedQueue()
    count = 2000
    readers = [
        fork_context.Process(target=read_group,
                             args=(queue.for_group(group), count, results))
        for group in range(3)
    ]
    for reader in readers:
        reader.start()
    messages = [zlib.crc32(str(index).encode()).to_bytes(4, "little") * 4
                for index in range(count)]
    for message in messages:
        queue.put(message, timeout=30)
    seen = dict(results.get(timeout=JOIN_TIMEOUT_S) for _ in range(3))
    join_all(readers)
    assert sorted(seen) == [0, 1, 2]
    for group in range(3):
        assert seen[group] == messages


def test_group_members_compete_exactly_once(fork_context):
    queue = mqs.SharedQueue(groups=2)
    results = mqs.SharedQueue()
    count = 3000
    members = [
        fork_context.Process(target=drain_until_stop,
                             args=(queue.for_group(1), results))
        for _ in range(2)
    ]
    solo = fork_context.Process(target=drain_until_stop,
                                args=(queue.for_group(0), results))
    for process in [*members, solo]:
        process.start()
    for index in range(count):
        queue.put(index, timeout=30)
    # One stop marker per consumer of each group.
    queue.put_many([None, None], timeout=30)
    outputs = [results.get(timeout=JOIN_TIMEOUT_S) for _ in range(3)]
    join_all([*members, solo])
    group0 = [got for group, got in outputs if group == 0]
    group1 = [got for group, got in outputs if group == 1]
    assert len(group0) == 1
    assert len(group1) == 2
    # Group 0's one consumer stops at the first stop marker, so it took
    # exactly the messages; the second marker stays queued in group 0.
    assert group0[0] == list(range(count))
    combined = sorted(group1[0] + group1[1])
    assert combined == list(range(count))
    for got in group1:
        assert got == sorted(got)


def test_slowest_group_gates_producers():
    queue = mqs.SharedQueue(groups=2, capacity_bytes=4096)
    fast = queue
    slow = queue.for_group(1)
    record = b"x" * 240  # 256 bytes with its header: 16 fit the ring
    for _ in range(16):
        queue.put(record, timeout=1)
        assert fast.get(timeout=1) == record
    with pytest.raises(mqs.Full):
        queue.put(record, timeout=0.05)
    assert fast.qsize() == 0
    assert slow.qsize() == 16
    assert slow.get(timeout=1) == record
    queue.put(record, timeout=1)
    assert slow.qsize() == 16


def test_group_qsize_counts_per_group():
    queue = mqs.SharedQueue(groups=2)
    other = queue.for_group(1)
    queue.put_many([1, 2, 3])
    assert queue.get() == 1
    assert queue.qsize() == 2
    assert other.qsize() == 3
    assert other.get_many(10) == [1, 2, 3]
    assert other.empty()


def test_named_queue_attaches_to_group():
    name = f"test-groups-{uuid.uuid4().hex[:12]}"
    queue = mqs.SharedQueue(name=name, groups=2)
    try:
        attached = mqs.SharedQueue(name=name, create=False, group=1)
        queue.put(b"hello")
        assert attached.group == 1
        assert attached.groups == 2
        assert attached.get(timeout=1) == b"hello"
        assert queue.get(timeout=1) == b"hello"
        attached.close()
    finally:
        queue.unlink()
        queue.close()


@pytest.mark.parametrize("groups", [0, 9, -1])
def test_groups_rejects_out_of_range(groups):
    with pytest.raises(ValueError, match=f"groups must be 1 to 8, got {groups}"):
        mqs.SharedQueue(groups=groups)


def test_for_group_rejects_unknown_group():
    queue = mqs.SharedQueue(groups=2)
    with pytest.raises(ValueError, match=r"group must be 0 to 1 .* got 2"):
        queue.for_group(2)
    with pytest.raises(TypeError, match="group must be an int, got str '1'"):
        queue.for_group("1")


def test_attach_rejects_group_beyond_queue():
    name = f"test-groups-{uuid.uuid4().hex[:12]}"
    queue = mqs.SharedQueue(name=name)
    try:
        with pytest.raises(ValueError, match=r"group must be 0 to 0 .* got 1"):
            mqs.SharedQueue(name=name, create=False, group=1)
    finally:
        queue.unlink()
        queue.close()


def test_for_group_handle_survives_spawn():
    context = multiprocessing.get_context("spawn")
    queue = mqs.SharedQueue(groups=2)
    results = mqs.SharedQueue()
    reader = context.Process(target=read_group,
                             args=(queue.for_group(1), 3, results))
    reader.start()
    queue.put_many([b"a", b"b", b"c"])
    group, got = results.get(timeout=JOIN_TIMEOUT_S)
    join_all([reader])
    assert group == 1
    assert got == [b"a", b"b", b"c"]
    assert queue.qsize() == 3
