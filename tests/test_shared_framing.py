"""Record framing of mqs.SharedQueue through a one-page ring.

A record is a 16-byte header plus the payload, rounded up to 16 bytes,
and the data region is mapped twice so a record that runs past the end
of the buffer stays contiguous. These tests push messages of every size
from 0 to max_message_size through a 4096-byte ring and check each one
byte for byte. They also check that qsize stays exact and that a put
raises Full exactly when the ring has no room for the record.
"""

import glob
import os
import queue
import random
import struct
import uuid
from collections import deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from mqs.shared import SharedQueue

RING_BYTES = 4096
MAX_MESSAGE = RING_BYTES - 16
# Offset of the producers' claim position (tail) in the queue file:
# block 1 of the header, see csrc/mqs_bytering.h.
TAIL_OFFSET = 128

pytestmark = pytest.mark.skipif(
    os.sysconf("SC_PAGESIZE") != RING_BYTES,
    reason="the framing tests use a one-page ring of 4096 bytes")


def record_bytes(length):
    """Bytes a message of `length` takes in the ring."""
    return (16 + length + 15) // 16 * 16


def payload(index, length):
    """Deterministic bytes that differ from message to message."""
    return random.Random(index).randbytes(length)


@pytest.fixture
def named_ring():
    """Return a one-page named queue; remove its file afterwards."""
    name = f"test-framing-{uuid.uuid4().hex[:16]}"
    q = SharedQueue(name=name, capacity_bytes=RING_BYTES)
    yield q
    q.close()
    for path in glob.glob(f"/dev/shm/mqs.{name}*"):
        os.unlink(path)


def ring_tail(q):
    with open(f"/dev/shm/mqs.{q.name}", "rb") as file:
        file.seek(TAIL_OFFSET)
        return struct.unpack("<q", file.read(8))[0]


def move_tail_to(q, offset):
    """Put and get one filler message so the tail lands on `offset`."""
    gap = (offset - ring_tail(q)) % RING_BYTES
    if gap:
        q.put_nowait(bytes(gap - 16))
        assert q.get_nowait() == bytes(gap - 16)
    assert ring_tail(q) % RING_BYTES == offset


def lengths_crossing_end(offset):
    """Payload lengths that end at, just past or well past the end."""
    to_end = RING_BYTES - offset - 16
    candidates = {0, 1, 15, 16, 17, to_end - 1, to_end, to_end + 1,
                  to_end + 100, MAX_MESSAGE}
    return sorted(n for n in candidates if 0 <= n <= MAX_MESSAGE)


@pytest.mark.parametrize("offset", range(0, RING_BYTES, 16))
def test_record_round_trips_from_every_aligned_offset(named_ring, offset):
    q = named_ring
    for index, length in enumerate(lengths_crossing_end(offset)):
        move_tail_to(q, offset)
        message = payload(offset * 1000 + index, length)
        q.put_nowait(message)
        assert q.qsize() == 1
        received = q.get_nowait()
        assert type(received) is bytes
        assert len(received) == length
        assert received == message
        assert q.qsize() == 0


@pytest.mark.parametrize("offset", range(RING_BYTES - 512, RING_BYTES, 16))
def test_view_of_wrapped_record_is_contiguous(named_ring, offset):
    q = named_ring
    length = RING_BYTES - offset + 200
    move_tail_to(q, offset)
    message = bytearray(payload(offset, length))
    q.put_nowait(message)
    with q.get_view(timeout=0) as view:
        assert view.nbytes == length
        assert view.contiguous
        assert bytes(view) == message


# Sizes that hit the 16-byte boundaries and both ends of the range, and
# anything in between.
message_lengths = st.one_of(
    st.integers(0, 48),
    st.integers(MAX_MESSAGE - 48, MAX_MESSAGE),
    st.integers(2, RING_BYTES // 16 - 1).flatmap(
        lambda n: st.sampled_from([16 * n - 17, 16 * n - 16, 16 * n - 15])),
    st.integers(0, MAX_MESSAGE),
)


class FramingMachine(RuleBasedStateMachine):
    """Random puts and gets against a model of the ring's occupancy.

    With one process and no view alive, a record fits exactly when the
    bytes of the queued records plus its own are at most the ring size.
    """

    @initialize()
    def open_queue(self):
        self.q = SharedQueue(capacity_bytes=RING_BYTES)
        self.queued = deque()
        self.used_bytes = 0
        self.sent = 0

    def _next_message(self, length, as_bytearray):
        data = payload(self.sent, length)
        self.sent += 1
        return bytearray(data) if as_bytearray else data

    def _take_expected(self, received):
        expected = self.queued.popleft()
        self.used_bytes -= record_bytes(len(expected))
        assert type(received) is type(expected)
        assert len(received) == len(expected)
        assert received == expected

    @rule(length=message_lengths, as_bytearray=st.booleans())
    def put(self, length, as_bytearray):
        message = self._next_message(length, as_bytearray)
        if self.used_bytes + record_bytes(length) <= RING_BYTES:
            self.q.put_nowait(message)
            self.queued.append(message)
            self.used_bytes += record_bytes(length)
        else:
            with pytest.raises(queue.Full):
                self.q.put_nowait(message)

    @rule(lengths=st.lists(message_lengths, min_size=1, max_size=8))
    def put_many(self, lengths):
        messages = [self._next_message(n, False) for n in lengths]
        fitting = 0
        used = self.used_bytes
        for message in messages:
            if used + record_bytes(len(message)) > RING_BYTES:
                break
            used += record_bytes(len(message))
            fitting += 1
        if fitting == len(messages):
            self.q.put_many(messages, block=False)
        else:
            with pytest.raises(queue.Full) as caught:
                self.q.put_many(messages, block=False)
            assert caught.value.accepted == fitting
        self.queued.extend(messages[:fitting])
        self.used_bytes = used

    @rule()
    def get(self):
        if not self.queued:
            with pytest.raises(queue.Empty):
                self.q.get_nowait()
            return
        self._take_expected(self.q.get_nowait())

    @precondition(lambda self: self.queued)
    @rule(max_items=st.integers(1, 10))
    def get_many(self, max_items):
        received = self.q.get_many(max_items, block=False)
        assert len(received) == min(max_items, len(self.queued))
        for item in received:
            self._take_expected(item)

    @precondition(lambda self: self.queued)
    @rule()
    def get_view(self):
        with self.q.get_view(timeout=0) as view:
            self._take_expected(bytes(view)
                                if type(self.queued[0]) is bytes
                                else bytearray(view))

    @invariant()
    def qsize_is_exact(self):
        assert self.q.qsize() == len(self.queued)
        assert self.q.empty() == (not self.queued)

    def teardown(self):
        self.q.close()


TestFramingMachine = FramingMachine.TestCase
TestFramingMachine.settings = settings(max_examples=150,
                                       stateful_step_count=60,
                                       deadline=None)
