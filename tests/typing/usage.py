"""Typical user code, type-checked against the .pyi stubs by mypy."""

import datetime

import mqs

jobs: mqs.Queue[int] = mqs.Queue(maxsize=16)
jobs.put(1)
jobs.put_many([2, 3])
jobs.put(4, delay=0.5)
jobs.put(5, at=1_700_000_000.0)
first: int = jobs.get(timeout=1.0)
batch: list[int] = jobs.get_many(8, timeout=0.1)
jobs.task_done()
jobs.maxsize = 32
jobs.shutdown(immediate=True)

names: mqs.SimpleQueue[str] = mqs.SimpleQueue()
names.put_nowait("a")
name: str = names.get_nowait()

ring = mqs.RingBuffer(8, max_consumers=1, max_workers=0)
reader: int = ring.add_consumer()
pushed: bool = ring.try_push(name)
seen: list[object] = ring.poll(reader)
print(first, batch, pushed, seen)

frames: mqs.SharedQueue[bytes] = mqs.SharedQueue(capacity_bytes=1 << 20,
                                                  groups=2)
audit = frames.for_group(1)
frames.put(b"frame")
frames.put(b"later", delay=0.5)
frames.put_many([b"a", b"b"], at=datetime.datetime.now())
waiting: int = frames.delayed + frames.delayed_capacity_bytes
with audit.get_view(timeout=1.0) as view:
    size: int = view.nbytes
first_frame: bytes = frames.get(timeout=1.0)
print(size, first_frame, frames.qsize(), audit.group, waiting)
frames.close()

durable: mqs.SharedQueue[str] = mqs.SharedQueue(
    persist="/tmp/mqs-typing-jobs", fsync="always")
log_dir: str | None = durable.persist
print(log_dir, durable.fsync)
durable.close()


async def waits() -> None:
    queued: mqs.Queue[int] = mqs.Queue(maxsize=1)
    await queued.put_async(1, timeout=1.0)
    value: int = await queued.get_async(timeout=1.0)
    shared: mqs.SharedQueue[bytes] = mqs.SharedQueue()
    await shared.put_async(b"x")
    got: bytes = await shared.get_async()
    print(value, got)
