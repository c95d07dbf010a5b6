"""The LMAX Disruptor's performance-test shapes over threads and processes.

The LMAX Disruptor's performance tests (its ``src/perftest`` harness)
measure five topologies. They are one producer to one consumer, three
producers to one consumer (the sequencer), one producer multicast to
three consumers, a three-stage pipeline, and a diamond: one producer,
two stages in parallel that each see every message, then a stage that
joins them. This module runs the same shapes with Python queues:

- over threads (`THREAD_TRANSPORTS`): `mqs.Queue`, `mqs.SimpleQueue`,
  `mqs.RingBuffer`, `queue.Queue` (the reference of every ratio) and
  `queue.SimpleQueue`;
- over processes (`PROCESS_TRANSPORTS`): `mqs.SharedQueue`,
  `multiprocessing.Queue` (the reference), `faster_fifo.Queue` and pyzmq
  PUSH/PULL sockets over ``ipc://``.

A transport with broadcast built in serves the multicast edges of the
one-to-three and diamond shapes with one channel: `mqs.RingBuffer` with
one broadcast consumer per reader, `mqs.SharedQueue` with one consumer
group per reader. The other transports get one channel per reader, and
the writer puts each message on every one of them, which is how those
queues are used for multicast.

Every stage is a thread or a forked process. `mqs.RingBuffer` never
waits, so its readers and writers call ``time.sleep(0)`` (which releases
the GIL) when the ring is empty or full; a reader takes up to
`RING_POLL_ITEMS` items per poll, the Disruptor's batching effect.

The messages are `bytes` from pools of `bench_ipc.MESSAGE_POOL_SIZE`
distinct payloads per producer whose first byte is the producer's number
and whose second byte is the pool index. Every sink compares each message
with the one its producer sent at that position and counts them, so a
lost, duplicated, reordered or corrupted message fails the run with
`mqs.bench.BenchmarkError`, as in the Disruptor, whose perf tests check a
checksum. The rate counts messages published per second, from the first
producer's first put to the last sink's last get.

Threads pass references, so the payload size changes little there; the
payload sweep (`PAYLOAD_SIZES`) runs the one-to-one shape over processes.
This module only measures; `mqs.cli_bench` prints the results.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue as stdlib_queue
import random
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import mqs
from mqs import bench_ipc
from mqs.bench import BenchmarkError

logger = logging.getLogger(__name__)

SHAPES = ("one-to-one", "three-to-one", "one-to-three", "pipeline",
          "diamond")
SHAPE_DESCRIPTIONS = {
    "one-to-one": "1 producer -> 1 consumer",
    "three-to-one": "3 producers -> 1 consumer (sequencer)",
    "one-to-three": "1 producer -> 3 consumers, each sees every message",
    "pipeline": "1 producer -> stage 1 -> stage 2 -> stage 3",
    "diamond": "1 producer -> 2 parallel stages -> 1 joining stage",
}
PAYLOAD_SIZES = (8, 64, 256, 1024, 4096, 16384, 65536)
SHAPE_PAYLOAD_BYTES = 64
RING_CAPACITY = 1 << 14
RING_POLL_ITEMS = 1024
THREAD_REFERENCE = "queue.Queue"
PROCESS_REFERENCE = bench_ipc.REFERENCE_QUEUE

# A run whose stages have not all finished after the base plus this much
# per message is treated as stalled. The slowest transports here moved
# about 25,000 messages per second (40 us each) through the diamond of
# processes on a busy 2-core machine, so 200 us per message leaves a
# margin of 5x.
STALL_TIMEOUT_BASE_S = 30.0
STALL_TIMEOUT_PER_MESSAGE_S = 200e-6


# -------------------------------------------------------------- transports


class _Endpoint:
    """One stage's end of a channel: `put` for writers, `get` for readers."""

    def __init__(self, put=None, get=None, close=None):
        self.put = put
        self.get = get
        self._close = close

    def close(self) -> None:
        if self._close is not None:
            self._close()


class _ThreadQueueChannel:
    """One in-process queue shared by its writers and its reader."""

    def __init__(self, q: Any):
        self.queue = q

    def open_receiver(self, reader: int = 0) -> _Endpoint:
        return _Endpoint(get=self.queue.get)

    def open_sender(self) -> _Endpoint:
        return _Endpoint(put=self.queue.put)

    def close(self) -> None:
        """Do nothing: the queue goes with its last reference."""


class _RingChannel:
    """An `mqs.RingBuffer` with one broadcast consumer per reader."""

    def __init__(self, readers: int, writers: int):
        self.ring = mqs.RingBuffer(RING_CAPACITY, max_consumers=readers,
                                   max_workers=0,
                                   multi_producer=writers > 1)
        # Consumers start at the cursor, so they are added before any push.
        self.consumers = [self.ring.add_consumer() for _ in range(readers)]

    def open_receiver(self, reader: int = 0) -> _Endpoint:
        poll = self.ring.poll
        consumer = self.consumers[reader]
        pending: collections.deque = collections.deque()
        popleft = pending.popleft
        sleep = time.sleep

        def get() -> Any:
            while not pending:
                items = poll(consumer, RING_POLL_ITEMS)
                if items:
                    pending.extend(items)
                else:
                    sleep(0)
            return popleft()

        return _Endpoint(get=get)

    def open_sender(self) -> _Endpoint:
        try_push = self.ring.try_push
        sleep = time.sleep

        def put(item: Any) -> None:
            while not try_push(item):
                sleep(0)

        return _Endpoint(put=put)

    def close(self) -> None:
        """Do nothing: the ring goes with its last reference."""


class _SharedQueueGroupsChannel:
    """An `mqs.SharedQueue` with one consumer group per reader."""

    def __init__(self, readers: int):
        self.queue = mqs.SharedQueue(groups=readers)

    def open_receiver(self, reader: int = 0) -> _Endpoint:
        handle = self.queue.for_group(reader) if reader else self.queue
        return _Endpoint(get=handle.get)

    def open_sender(self) -> _Endpoint:
        return _Endpoint(put=self.queue.put)

    def close(self) -> None:
        self.queue.close()


class _FanOutChannel:
    """One channel per reader; a writer puts each message on all of them.

    With one reader it only adapts the channel's `open_receiver`, which
    takes no reader number in `bench_ipc`.
    """

    def __init__(self, channels: list):
        self.channels = channels

    def open_receiver(self, reader: int = 0) -> _Endpoint:
        return self.channels[reader].open_receiver()

    def open_sender(self) -> _Endpoint:
        if len(self.channels) == 1:
            return self.channels[0].open_sender()
        senders = [channel.open_sender() for channel in self.channels]
        puts = [sender.put for sender in senders]

        def put(item: Any) -> None:
            for channel_put in puts:
                channel_put(item)

        def close() -> None:
            for sender in senders:
                sender.close()

        return _Endpoint(put=put, close=close)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


@dataclasses.dataclass(frozen=True)
class Transport:
    """A queue implementation under test in the shapes.

    `make_channel(directory, name, readers, writers)` returns a channel
    with `open_receiver(reader)`, `open_sender()` and `close()`; with
    `readers` above 1 every reader sees every message. `peer` names the
    optional package, if any, for the skip check.
    """

    label: str
    domain: str
    make_channel: Callable[[str, str, int, int], Any]
    peer: bench_ipc.Peer | None = None
    broadcast: str = "one queue per reader"


def _fan_out(make_one: Callable[[str, str], Any]) -> Callable[..., Any]:
    """Wrap a one-reader channel factory into a fan-out for many readers."""

    def make_channel(directory: str, name: str, readers: int,
                     writers: int) -> Any:
        if readers == 1:
            return _FanOutChannel([make_one(directory, name)])
        return _FanOutChannel([make_one(directory, f"{name}.{reader}")
                               for reader in range(readers)])

    return make_channel


def _thread_queue(factory: Callable[[], Any]) -> Callable[..., Any]:
    return _fan_out(lambda directory, name: _ThreadQueueChannel(factory()))


def _ipc_peer(peer: bench_ipc.Peer) -> Callable[..., Any]:
    return _fan_out(lambda directory, name: peer.make_channel(directory,
                                                              name))


def _shared_queue_channel(directory: str, name: str, readers: int,
                          writers: int) -> Any:
    return _SharedQueueGroupsChannel(readers)


THREAD_TRANSPORTS: tuple[Transport, ...] = (
    Transport("mqs.Queue", "threads", _thread_queue(mqs.Queue)),
    Transport("mqs.SimpleQueue", "threads", _thread_queue(mqs.SimpleQueue)),
    Transport("mqs.RingBuffer", "threads",
              lambda directory, name, readers, writers: _RingChannel(
                  readers, writers),
              broadcast="one ring, a broadcast consumer per reader"),
    Transport("queue.Queue", "threads", _thread_queue(stdlib_queue.Queue)),
    Transport("queue.SimpleQueue", "threads",
              _thread_queue(stdlib_queue.SimpleQueue)),
)

PROCESS_TRANSPORTS: tuple[Transport, ...] = (
    Transport("mqs.SharedQueue", "processes", _shared_queue_channel,
              broadcast="one queue, a consumer group per reader"),
    Transport("multiprocessing.Queue", "processes",
              _ipc_peer(bench_ipc.PEER_MULTIPROCESSING_QUEUE)),
    Transport("faster_fifo.Queue", "processes",
              _ipc_peer(bench_ipc.PEER_FASTER_FIFO),
              peer=bench_ipc.PEER_FASTER_FIFO),
    Transport("pyzmq PUSH/PULL ipc", "processes",
              _ipc_peer(bench_ipc.PEER_ZMQ), peer=bench_ipc.PEER_ZMQ),
)

TRANSPORTS = {"threads": THREAD_TRANSPORTS, "processes": PROCESS_TRANSPORTS}
REFERENCES = {"threads": THREAD_REFERENCE, "processes": PROCESS_REFERENCE}


# ---------------------------------------------------------------- messages


def make_pools(producers: int, size_bytes: int) -> list[list[bytes]]:
    """Return one pool of distinct messages of `size_bytes` per producer.

    Byte 0 of a message is its producer's number and byte 1 its index in
    the pool, so messages differ even where the seeded random tails repeat.
    """
    if size_bytes < 2:
        raise ValueError(f"message size must be at least 2 bytes, got "
                         f"{size_bytes!r}")
    rng = random.Random(size_bytes)
    return [[bytes((producer, index)) + rng.randbytes(size_bytes - 2)
             for index in range(bench_ipc.MESSAGE_POOL_SIZE)]
            for producer in range(producers)]


def _messages(pool: list[bytes], count: int) -> list[bytes]:
    return [pool[index % len(pool)] for index in range(count)]


class _Checker:
    """Compare messages with what each producer sent, in order."""

    def __init__(self, pools: list[list[bytes]]):
        self.pools = pools
        self.next_index = [0] * len(pools)
        self.received = 0
        self.mismatched = 0
        self.first_mismatch = -1

    def check(self, message: Any) -> None:
        producer = message[0] if message else -1
        if 0 <= producer < len(self.pools):
            pool = self.pools[producer]
            index = self.next_index[producer]
            self.next_index[producer] = index + 1
            ok = message == pool[index % len(pool)]
        else:
            ok = False
        if not ok:
            self.mismatched += 1
            if self.first_mismatch < 0:
                self.first_mismatch = self.received
        self.received += 1

    def outcome(self, end_ns: int) -> dict:
        return {"end_ns": end_ns, "received": self.received,
                "mismatched": self.mismatched,
                "first_mismatch": self.first_mismatch}


# ------------------------------------------------------------------- roles
#
# Every role waits three times on a barrier shared by the stages of a run,
# as the roles of bench_ipc do: once its receivers are open (a ZeroMQ
# receiver binds before any sender connects), once its senders are open,
# right before the timed work, and once the work is done, before any
# endpoint closes.


def _producer(channel: Any, messages: list[bytes]) -> Callable:
    def role(barrier) -> dict:
        barrier.wait()
        sender = channel.open_sender()
        barrier.wait()
        put = sender.put
        start_ns = time.perf_counter_ns()
        for message in messages:
            put(message)
        barrier.wait()
        sender.close()
        return {"start_ns": start_ns}

    return role


def _relay(source: Any, reader: int, target: Any, count: int) -> Callable:
    def role(barrier) -> dict:
        receiver = source.open_receiver(reader)
        barrier.wait()
        sender = target.open_sender()
        barrier.wait()
        get = receiver.get
        put = sender.put
        for _ in range(count):
            put(get())
        barrier.wait()
        sender.close()
        receiver.close()
        return {"relayed": count}

    return role


def _sink(source: Any, reader: int, count: int,
          pools: list[list[bytes]]) -> Callable:
    def role(barrier) -> dict:
        receiver = source.open_receiver(reader)
        barrier.wait()
        barrier.wait()
        get = receiver.get
        checker = _Checker(pools)
        check = checker.check
        for _ in range(count):
            check(get())
        end_ns = time.perf_counter_ns()
        barrier.wait()
        receiver.close()
        return checker.outcome(end_ns)

    return role


def _join(left: Any, right: Any, count: int,
          pools: list[list[bytes]]) -> Callable:
    """Take one message from each side per step; both must be the same."""

    def role(barrier) -> dict:
        left_receiver = left.open_receiver()
        right_receiver = right.open_receiver()
        barrier.wait()
        barrier.wait()
        get_left = left_receiver.get
        get_right = right_receiver.get
        checker = _Checker(pools)
        check = checker.check
        for _ in range(count):
            message = get_left()
            if get_right() != message:
                message = b""
            check(message)
        end_ns = time.perf_counter_ns()
        barrier.wait()
        left_receiver.close()
        right_receiver.close()
        return checker.outcome(end_ns)

    return role


def build_roles(shape: str, transport: Transport, directory: str,
                count: int, size_bytes: int,
                ) -> tuple[list[tuple[str, Callable]], list, int]:
    """Make the channels and roles of one run of `shape`.

    Returns the (name, role) pairs, the channels to close after the run
    and the messages published. Three-to-one rounds `count` down to a
    multiple of 3, each producer sending a third.
    """
    make = transport.make_channel
    if shape == "three-to-one":
        per_producer = max(1, count // 3)
        pools = make_pools(3, size_bytes)
        channel = make(directory, "queue", 1, 3)
        roles = [("sink", _sink(channel, 0, 3 * per_producer, pools))]
        roles += [(f"producer{k}",
                   _producer(channel, _messages(pools[k], per_producer)))
                  for k in range(3)]
        return roles, [channel], 3 * per_producer

    pools = make_pools(1, size_bytes)
    messages = _messages(pools[0], count)
    if shape == "one-to-one":
        channel = make(directory, "queue", 1, 1)
        return ([("sink", _sink(channel, 0, count, pools)),
                 ("producer", _producer(channel, messages))],
                [channel], count)
    if shape == "one-to-three":
        channel = make(directory, "queue", 3, 1)
        roles = [(f"sink{k}", _sink(channel, k, count, pools))
                 for k in range(3)]
        return roles + [("producer", _producer(channel, messages))], \
            [channel], count
    if shape == "pipeline":
        stages = [make(directory, f"stage{k}", 1, 1) for k in range(3)]
        return ([("sink", _sink(stages[2], 0, count, pools)),
                 ("stage2", _relay(stages[1], 0, stages[2], count)),
                 ("stage1", _relay(stages[0], 0, stages[1], count)),
                 ("producer", _producer(stages[0], messages))],
                stages, count)
    if shape == "diamond":
        fan = make(directory, "fan", 2, 1)
        left = make(directory, "left", 1, 1)
        right = make(directory, "right", 1, 1)
        return ([("join", _join(left, right, count, pools)),
                 ("left", _relay(fan, 0, left, count)),
                 ("right", _relay(fan, 1, right, count)),
                 ("producer", _producer(fan, messages))],
                [fan, left, right], count)
    raise ValueError(f"unknown shape {shape!r}; choose from "
                     f"{', '.join(SHAPES)}")


# ----------------------------------------------------------------- runners


def run_thread_roles(where: str,
                     roles: Sequence[tuple[str, Callable[[Any], dict]]],
                     timeout_s: float) -> dict[str, dict]:
    """Run each (name, role) in a thread; return outcomes by name.

    Raises `BenchmarkError`, its message starting with `where`, if a role
    raised or not every thread finished within `timeout_s`. A stalled
    thread stays blocked until the process exits (nothing can stop a
    thread that waits in a get), so the threads are daemons.
    """
    barrier = threading.Barrier(len(roles), timeout=2 * timeout_s + 10)
    outcomes: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}

    def call(name: str, role: Callable[[Any], dict]) -> None:
        try:
            outcomes[name] = role(barrier)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[name] = exc
            barrier.abort()

    threads = [threading.Thread(target=call, args=(name, role),
                                name=f"mqs-bench-{name}", daemon=True)
               for name, role in roles]
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))

    for name, _ in roles:
        error = errors.get(name)
        if error is not None and not isinstance(
                error, threading.BrokenBarrierError):
            raise BenchmarkError(
                f"{where}: the {name} thread raised {error!r}") from error
    stalled = [thread.name for thread in threads if thread.is_alive()]
    if stalled or errors:
        raise BenchmarkError(
            f"{where}: {' and '.join(stalled or list(errors))} did not "
            f"finish within {timeout_s:.0f} s; messages were lost or a "
            f"waiting thread was never woken")
    return outcomes


def _stall_timeout_s(count: int) -> float:
    return STALL_TIMEOUT_BASE_S + count * STALL_TIMEOUT_PER_MESSAGE_S


def run_once(shape: str, transport: Transport, count: int,
             size_bytes: int) -> tuple[int, int]:
    """Run `shape` once on `transport`; return (messages, nanoseconds).

    Raises
    ------
    BenchmarkError
        If a sink got a wrong count or wrong messages, a stage failed, or
        the run stalled.
    """
    where = f"{transport.label} in {transport.domain} {shape}"
    with tempfile.TemporaryDirectory(prefix="mqs-bench-") as directory:
        roles, channels, published = build_roles(
            shape, transport, directory, count, size_bytes)
        timeout_s = _stall_timeout_s(published)
        try:
            if transport.domain == "threads":
                outcomes = run_thread_roles(where, roles, timeout_s)
            else:
                outcomes = bench_ipc._run_roles(where, roles, timeout_s)
        finally:
            for channel in channels:
                channel.close()

    starts = [o["start_ns"] for o in outcomes.values() if "start_ns" in o]
    ends = []
    for name, outcome in outcomes.items():
        if "end_ns" in outcome:
            bench_ipc.check_received(f"{transport.domain} {shape}",
                                     f"{transport.label} ({name})",
                                     published, outcome)
            ends.append(outcome["end_ns"])
    elapsed_ns = max(ends) - min(starts)
    if elapsed_ns <= 0:
        raise BenchmarkError(f"{where}: the clock measured {elapsed_ns} ns "
                             f"for {published:,} messages")
    return published, elapsed_ns


# ----------------------------------------------------------------- results


@dataclasses.dataclass
class ShapeResult(bench_ipc.IpcResult):
    """Rates of one transport in one shape at one payload size."""

    domain: str = ""
    shape: str = ""

    def to_dict(self) -> dict:
        data = super().to_dict()
        data.update({"domain": self.domain, "shape": self.shape})
        return data


@dataclasses.dataclass(frozen=True)
class ShapeRun:
    """One (domain, shape, payload size) cell of the matrix to run."""

    domain: str
    shape: str
    size_bytes: int
    count: int

    @property
    def case(self) -> str:
        return f"{self.domain} {self.shape} {format_size(self.size_bytes)}"


def format_size(size_bytes: int) -> str:
    """Format a payload size as 8B, 4KiB or 64KiB."""
    if size_bytes >= 1024 and size_bytes % 1024 == 0:
        return f"{size_bytes // 1024}KiB"
    return f"{size_bytes}B"


def available_transports(domain: str
                         ) -> tuple[list[Transport], list[bench_ipc.Skipped]]:
    """Return the transports of `domain` that can run and the skipped ones."""
    ready = []
    skipped = []
    for transport in TRANSPORTS[domain]:
        reason = bench_ipc.peer_missing_reason(transport.peer)
        if reason is None:
            ready.append(transport)
        else:
            skipped.append(bench_ipc.Skipped(domain, transport.label, reason))
    return ready, skipped


def count_runs(runs: Sequence[ShapeRun], repeat: int,
               warmup: bool = True) -> int:
    """Return how many runs, warm-ups included, `run_matrix` will make."""
    return sum((repeat + warmup) * len(available_transports(run.domain)[0])
               for run in runs)


def run_matrix(runs: Sequence[ShapeRun], repeat: int,
               on_run: Callable[[str, str], None] | None = None,
               warmup: bool = True,
               ) -> tuple[list[ShapeResult], list[bench_ipc.Skipped]]:
    """Run every cell of `runs` on every available transport of its domain.

    Each cell gets a warm-up run on a tenth of its messages (unless
    `warmup` is false), then `repeat` timed runs that alternate between
    the transports. `on_run(case, transport)` is called after each run,
    warm-ups included.

    Raises
    ------
    ValueError
        For an unknown shape or domain, or a count or `repeat` below 1.
    BenchmarkError
        If a run lost or changed messages, a stage failed, or it stalled.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat!r}")
    results: list[ShapeResult] = []
    skipped: list[bench_ipc.Skipped] = []
    for run in runs:
        if run.domain not in TRANSPORTS:
            raise ValueError(f"unknown domain {run.domain!r}; choose from "
                             f"{', '.join(TRANSPORTS)}")
        if run.shape not in SHAPES:
            raise ValueError(f"unknown shape {run.shape!r}; choose from "
                             f"{', '.join(SHAPES)}")
        if run.count < 1:
            raise ValueError(f"count must be at least 1, got {run.count!r}")
        transports, missing = available_transports(run.domain)
        skipped.extend(bench_ipc.Skipped(run.case, skip.queue, skip.reason)
                       for skip in missing)
        results.extend(_run_cell(run, transports, repeat, on_run, warmup))
    return results, skipped


def _run_cell(run: ShapeRun, transports: list[Transport], repeat: int,
              on_run: Callable[[str, str], None] | None, warmup: bool,
              ) -> list[ShapeResult]:
    for transport in transports if warmup else ():
        run_once(run.shape, transport, max(3, run.count // 10),
                 run.size_bytes)
        if on_run is not None:
            on_run(run.case, transport.label)
    elapsed: dict[str, list[int]] = {t.label: [] for t in transports}
    published = run.count
    for _ in range(repeat):
        for transport in transports:
            published, elapsed_ns = run_once(run.shape, transport, run.count,
                                             run.size_bytes)
            elapsed[transport.label].append(elapsed_ns)
            logger.debug("%s %s: %d messages in %d ns", run.case,
                         transport.label, published, elapsed_ns)
            if on_run is not None:
                on_run(run.case, transport.label)
    results = [ShapeResult(run.case, label, published, runs,
                           message_size_bytes=run.size_bytes,
                           domain=run.domain, shape=run.shape)
               for label, runs in elapsed.items()]
    reference = next((r for r in results
                      if r.queue == REFERENCES[run.domain]), None)
    for result in results:
        if reference is not None:
            result.ratio_to_reference = result.median / reference.median
    return results
