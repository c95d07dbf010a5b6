"""Producers and consumers for the SharedQueue stress and crash tests.

A message is a 12-byte header (producer id, sequence number, CRC-32 of
the body, little-endian u32 each) followed by a body of random length,
cut from a fixed pool of random bytes. A consumer checks every body
against its CRC and that each producer's sequence numbers rise, and
reports the sequence numbers it got so the test can check exactly-once
delivery across consumers.

The module is imported by the test files and, through PYTHONPATH, by
child interpreters that run `python -c` with another build of mqs.
"""

import os
import queue
import random
import struct
import sys
import zlib
from array import array

HEADER = struct.Struct("<III")
# The producer id that marks a stop message: the consumer returns.
STOP = 0xFFFFFFFF
# consume_to_fd records a message whose body failed its CRC under this id.
BAD_BODY = 0xFFFFFFFE
RECORD = struct.Struct("<II")
BODY_POOL = random.Random(20240611).randbytes(1 << 20)
# A consumer keeps the text of this many errors; it counts them all.
MAX_ERROR_TEXTS = 20


def make_message(producer, sequence, rng, max_body):
    """Return a message with a body of 0 to max_body random bytes."""
    length = rng.randint(0, max_body)
    start = rng.randrange(len(BODY_POOL) - length + 1)
    body = BODY_POOL[start:start + length]
    return HEADER.pack(producer, sequence, zlib.crc32(body)) + body


def stop_message():
    return HEADER.pack(STOP, 0, 0)


class Receipt:
    """What one consumer got: sequence numbers per producer, and errors."""

    def __init__(self):
        self.sequences = {}
        self.last_sequence = {}
        self.errors = []
        self.error_count = 0
        self.messages = 0

    def _error(self, text):
        self.error_count += 1
        if len(self.errors) < MAX_ERROR_TEXTS:
            self.errors.append(text)

    def add(self, message):
        """Check and record one message; return False for a stop message."""
        if len(message) < HEADER.size:
            self._error(f"message of {len(message)} bytes is shorter than "
                        f"the {HEADER.size}-byte header")
            return True
        producer, sequence, crc = HEADER.unpack_from(message)
        if producer == STOP:
            return False
        body = memoryview(message)[HEADER.size:]
        if zlib.crc32(body) != crc:
            self._error(f"producer {producer} sequence {sequence}: CRC-32 "
                        f"of the {len(body)}-byte body does not match")
        last = self.last_sequence.get(producer, -1)
        if sequence <= last:
            self._error(f"producer {producer}: sequence {sequence} arrived "
                        f"after {last}")
        self.last_sequence[producer] = sequence
        self.sequences.setdefault(producer, array("I")).append(sequence)
        self.messages += 1
        return True

    def report(self):
        """Return a picklable summary for the parent process."""
        return {
            "sequences": {p: s.tobytes() for p, s in self.sequences.items()},
            "errors": self.errors,
            "error_count": self.error_count,
            "messages": self.messages,
        }


def sequences_of(report):
    """Return {producer: array of sequence numbers} from a report."""
    out = {}
    for producer, raw in report["sequences"].items():
        numbers = array("I")
        numbers.frombytes(raw)
        out[producer] = numbers
    return out


def produce(q, producer, count, seed, max_body, batch=1, timeout=60.0):
    """Put `count` messages of one producer, one by one or in batches."""
    rng = random.Random(seed * 1000003 + producer)
    sequence = 0
    while sequence < count:
        if batch == 1:
            q.put(make_message(producer, sequence, rng, max_body),
                  timeout=timeout)
            sequence += 1
            continue
        size = min(rng.randint(1, batch), count - sequence)
        q.put_many([make_message(producer, sequence + i, rng, max_body)
                    for i in range(size)], timeout=timeout)
        sequence += size


def consume(q, batch=1, timeout=60.0):
    """Get messages until a stop message; return the Receipt.

    A get_many batch may hold more than one stop message; the extra ones
    go back into the queue for the other consumers.
    """
    receipt = Receipt()
    while True:
        if batch == 1:
            messages = [q.get(timeout=timeout)]
        else:
            messages = q.get_many(batch, timeout=timeout)
        stops = sum(not receipt.add(m) for m in messages)
        if stops:
            for _ in range(stops - 1):
                q.put(stop_message(), timeout=timeout)
            return receipt


def consume_into_pipe(q, conn, batch=1):
    """multiprocessing target: consume, then send the report on conn."""
    try:
        conn.send(consume(q, batch).report())
    except queue.Empty:
        conn.send({"failure": "no message for 60 s"})


def consume_to_fd(q, fd):
    """Get messages forever, writing (producer, sequence) of each to fd.

    For consumers that are killed at random: each message is recorded
    once get returns it, so a kill loses at most the message in flight.
    A body that fails its CRC is recorded with producer BAD_BODY.
    """
    while True:
        message = q.get(timeout=60)
        producer, sequence, crc = HEADER.unpack_from(message)
        if zlib.crc32(memoryview(message)[HEADER.size:]) != crc:
            producer = BAD_BODY
        os.write(fd, RECORD.pack(producer, sequence))


def read_records(fd):
    """Return the (producer, sequence) pairs consume_to_fd wrote to fd."""
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    data = b"".join(chunks)
    return [RECORD.unpack_from(data, offset)
            for offset in range(0, len(data) - len(data) % RECORD.size,
                                RECORD.size)]


def produce_main(name, producer, count, seed, max_body):
    """`python -c` entry point: produce into a named queue, then print
    how many messages were put."""
    import mqs

    q = mqs.SharedQueue(name=name, create=False)
    produce(q, producer, count, seed, max_body)
    print(count, flush=True)
    q.close()
    sys.exit(0)
