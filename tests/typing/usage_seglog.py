"""Typical SegmentLog user code, type-checked against the .pyi stubs."""

import tempfile

import mqs

with tempfile.TemporaryDirectory() as directory:
    with mqs.SegmentLog(directory + "/events", fsync="interval") as log:
        offset: int = log.append(b"event", key=b"user-1")
        first: int = log.append_many([b"a", (b"k", b"b")])
        view: memoryview = log.read(offset)
        record: mqs.LogRecord = log.read_record(first)
        stamp: int = record.timestamp
        batch = log.read_batch(offset, 1000)
        log.commit("analytics", offset + batch.num_rows)
        position: int | None = log.committed("analytics")
        for item in log.iter_from(timestamp=stamp):
            print(item.offset, bytes(item.value))
        print(view.nbytes, position, log.stats().syncs, log.recovery)
