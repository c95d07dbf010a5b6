"""Attaching to an existing named SharedQueue with explicit sizes."""

import uuid

import pytest

import mqs


@pytest.fixture
def named_queue():
    name = f"test-attach-{uuid.uuid4().hex[:12]}"
    queue = mqs.SharedQueue(name=name, capacity_bytes=1 << 16, maxsize=5)
    yield queue
    queue.unlink()
    queue.close()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"capacity_bytes": 1 << 20}, "capacity_bytes=65536, not 1048576"),
        ({"maxsize": 7}, "maxsize=5, not 7"),
        ({"groups": 2}, "groups=1, not 2"),
        ({"max_message_size": 100}, "max_message_size=65520, not 100"),
    ],
)
def test_attach_rejects_different_layout(named_queue, arguments, message):
    for create in (True, False):
        with pytest.raises(mqs.QueueLayoutError, match=message):
            mqs.SharedQueue(name=named_queue.name, create=create, **arguments)


def test_attach_accepts_matching_or_omitted_layout(named_queue):
    same = mqs.SharedQueue(name=named_queue.name, capacity_bytes=1 << 16,
                           maxsize=5, groups=1, create=False)
    plain = mqs.SharedQueue(name=named_queue.name)
    named_queue.put(b"x")
    assert same.capacity_bytes == 1 << 16
    assert plain.maxsize == 5
    assert plain.get(timeout=1) == b"x"
    same.close()
    plain.close()


@pytest.mark.parametrize("name", [".", "..", "a\0b", "a/b", ""])
def test_name_rejects_unusable_names(name):
    with pytest.raises(ValueError, match="name must be 1 to 200 characters, not '.' or '..'"):
        mqs.SharedQueue(name=name)
