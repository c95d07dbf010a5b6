"""Cross-process benchmarks of `mqs.SharedQueue` against its peers.

Every run forks fresh processes (the ``fork`` start method of
`multiprocessing`) and a fresh queue. The cases:

- ``ipc-64b`` and ``ipc-4kib``: throughput of 64-byte and 4 KiB `bytes`
  messages from 1 producer process to 1 consumer process, one message per
  put and per get. The producer reads its clock before its first put and
  the consumer after its last get. Both read `time.perf_counter_ns`, which
  is CLOCK_MONOTONIC on Linux and so is the same clock in every process.
- ``ipc-batch``: as ``ipc-64b``, but the queues with batch calls put lists
  of `BATCH_SIZE` messages (`put_many`) and take up to `BATCH_SIZE` per
  call (`get_many`). Peers without batch calls put and get one message per
  call, so their rates differ from ``ipc-64b`` only by noise.
- ``ipc-pingpong``: round-trip latency of 64-byte messages. One process
  puts a message on a ping queue and waits for the echo on a pong queue.
  The other process gets each message and puts it back. Each run starts
  with `PINGPONG_WARMUP_ROUND_TRIPS` untimed round trips. The
  reference floor ``raw mmap spin`` is two processes that busy-wait on
  8-byte counters in an anonymous shared `mmap` from Python, with no
  queue and no payload.

The peers are `multiprocessing.Queue` (the reference of every ratio),
`multiprocessing.SimpleQueue`, `faster_fifo.Queue` and pyzmq PUSH/PULL
sockets over ``ipc://`` paths in a temporary directory. Each is used with
its own defaults, except that `faster_fifo.Queue` gets a buffer as large
as the default ring of `mqs.SharedQueue` (16 MiB). A peer whose package is
missing is skipped and reported in `IpcReport.skipped`.

Correctness: the messages come from a pool of `MESSAGE_POOL_SIZE`
distinct random payloads, message i being payload i mod the pool size.
The consumer compares every message byte for byte with the message sent
at that position, which catches a lost, duplicated, reordered or
corrupted message, and counts the messages. The comparison costs one
`memcmp` (about 60 ns for 4 KiB on the machine of BENCHMARKS.md), where a
CRC-32 of each message would cost about 0.9 us, as much as a whole put
and get of `mqs.SharedQueue`. A run whose count or content differs
raises `mqs.bench.BenchmarkError`, and so does a run whose processes have
not finished after a stall timeout.

Each (case, queue) pair runs once as a warm-up on a tenth of the messages,
then `repeat` timed runs that alternate between the case's queues. The
garbage collector is off in the child processes. This module only
measures; `mqs.cli_bench` prints the results.
"""

from __future__ import annotations

import array
import dataclasses
import gc
import importlib
import importlib.metadata
import logging
import math
import mmap
import multiprocessing
import multiprocessing.connection
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import mqs
from mqs import bench
from mqs.bench import BenchmarkError, RatioResult, TrackedRatio

logger = logging.getLogger(__name__)

BATCH_SIZE = bench.BATCH_SIZE
MESSAGE_POOL_SIZE = 251
PINGPONG_WARMUP_ROUND_TRIPS = 100
REFERENCE_QUEUE = "multiprocessing.Queue"
RAW_SPIN_LABEL = "raw mmap spin"
START_METHOD = "fork"

# The default ring of mqs.SharedQueue; faster_fifo.Queue gets the same
# buffer so that neither queue waits for room sooner than the other.
FASTER_FIFO_MAX_SIZE_BYTES = 16 << 20

# A run whose processes have not all reported after this long is treated
# as stalled (a lost message leaves the consumer waiting forever), not as
# slow. On the machine of BENCHMARKS.md the slowest runs took about 10 us
# per 4 KiB message and the slowest queues about 280 us per round trip at
# the 99th percentile, so the allowances per item leave a margin of 5x or
# more.
STALL_TIMEOUT_BASE_S = 30.0
STALL_TIMEOUT_PER_MESSAGE_S = 50e-6
STALL_TIMEOUT_PER_ROUND_TRIP_S = 2e-3

# Offsets, in 8-byte words, of the two counters of the raw spin reference:
# 64 bytes apart, so that each sits on its own cache line.
_RAW_PING_WORD = 0
_RAW_PONG_WORD = 8


# ------------------------------------------------------------------ peers


class _Endpoint:
    """One process's end of a channel, with the calls a role needs."""

    def __init__(self, put=None, get=None, put_many=None, get_many=None,
                 close=None):
        self.put = put
        self.get = get
        self.put_many = put_many
        self.get_many = get_many
        self._close = close

    def close(self) -> None:
        if self._close is not None:
            self._close()


class _QueueChannel:
    """A queue object made before the fork and inherited by both children.

    `put_many(list)` and `get_many(n)` are None for a queue without batch
    calls. `flush` runs in the producer when it closes its end, outside
    the timed span (for `multiprocessing.Queue`: wait until the feeder
    thread has written every message). `close` runs in the parent after
    the run.
    """

    def __init__(self, queue, *, put_many=None, get_many=None, flush=None,
                 close=None):
        self.queue = queue
        self._put_many = put_many
        self._get_many = get_many
        self._flush = flush
        self._close = close

    def open_receiver(self) -> _Endpoint:
        return _Endpoint(get=self.queue.get, get_many=self._get_many)

    def open_sender(self) -> _Endpoint:
        return _Endpoint(put=self.queue.put, put_many=self._put_many,
                         close=self._flush)

    def close(self) -> None:
        if self._close is not None:
            self._close()


def _shared_queue_channel(wait_strategy: str) -> _QueueChannel:
    q = mqs.SharedQueue(wait_strategy=wait_strategy)
    return _QueueChannel(q, put_many=q.put_many, get_many=q.get_many,
                         close=q.close)


def _multiprocessing_queue_channel() -> _QueueChannel:
    q = multiprocessing.get_context(START_METHOD).Queue()

    def close_and_join() -> None:
        q.close()
        q.join_thread()

    return _QueueChannel(q, flush=close_and_join, close=close_and_join)


def _multiprocessing_simple_queue_channel() -> _QueueChannel:
    q = multiprocessing.get_context(START_METHOD).SimpleQueue()
    return _QueueChannel(q, close=q.close)


def _faster_fifo_channel() -> _QueueChannel:
    import faster_fifo  # type: ignore[import-not-found]

    q = faster_fifo.Queue(max_size_bytes=FASTER_FIFO_MAX_SIZE_BYTES)

    def get_many(max_items: int) -> list:
        return q.get_many(max_messages_to_get=max_items)

    return _QueueChannel(q, put_many=q.put_many, get_many=get_many,
                         close=q.close)


class _ZmqChannel:
    """A PUSH/PULL pair on an ``ipc://`` path in a temporary directory.

    ZeroMQ contexts do not survive a fork, so each child makes its own
    socket: the receiver binds the path, the sender connects to it.
    """

    def __init__(self, directory: str, name: str):
        self.address = f"ipc://{os.path.join(directory, name)}"

    def open_receiver(self) -> _Endpoint:
        return self._open("PULL", "bind")

    def open_sender(self) -> _Endpoint:
        return self._open("PUSH", "connect")

    def _open(self, socket_type: str, verb: str) -> _Endpoint:
        import zmq

        context = zmq.Context()
        socket = context.socket(getattr(zmq, socket_type))
        getattr(socket, verb)(self.address)

        def close() -> None:
            # With the default LINGER of -1, term() should wait until every
            # queued message has gone to the peer. On ipc:// it does not
            # always (see the XXX note above the roles).
            socket.close()
            context.term()

        return _Endpoint(put=socket.send, get=socket.recv, close=close)

    def close(self) -> None:
        """Do nothing: the children own the sockets."""


@dataclasses.dataclass(frozen=True)
class Peer:
    """A queue implementation: how to make one channel of it.

    `module` is imported before the first run to find out whether the peer
    is installed; `package` is the name to give pip.
    """

    name: str
    module: str | None
    package: str | None
    make_channel: Callable[[str, str], Any]


PEER_SHARED_QUEUE = Peer(
    "mqs.SharedQueue", None, None,
    lambda directory, name: _shared_queue_channel("block"))
PEER_SHARED_QUEUE_SPIN = Peer(
    "mqs.SharedQueue spin", None, None,
    lambda directory, name: _shared_queue_channel("spin"))
PEER_MULTIPROCESSING_QUEUE = Peer(
    "multiprocessing.Queue", None, None,
    lambda directory, name: _multiprocessing_queue_channel())
PEER_MULTIPROCESSING_SIMPLE_QUEUE = Peer(
    "multiprocessing.SimpleQueue", None, None,
    lambda directory, name: _multiprocessing_simple_queue_channel())
PEER_FASTER_FIFO = Peer(
    "faster_fifo.Queue", "faster_fifo", "faster-fifo",
    lambda directory, name: _faster_fifo_channel())
PEER_ZMQ = Peer("pyzmq PUSH/PULL", "zmq", "pyzmq", _ZmqChannel)


def peer_missing_reason(peer: Peer | None) -> str | None:
    """Return why `peer` cannot run here, or None if it can."""
    if peer is None or peer.module is None:
        return None
    try:
        importlib.import_module(peer.module)
    except ModuleNotFoundError as exc:
        if exc.name != peer.module:
            return f"{peer.package} failed to import: {exc}"
        return (f"{peer.package} is not installed; pip install "
                f"'mqs[bench]' installs the peers")
    except ImportError as exc:
        return f"{peer.package} failed to import: {exc}"
    return None


def peer_versions() -> dict[str, str | None]:
    """Return the installed version of each optional peer package."""
    versions: dict[str, str | None] = {}
    for package in ("faster-fifo", "pyzmq"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        import zmq
    except ImportError:
        versions["libzmq"] = None
    else:
        versions["libzmq"] = zmq.zmq_version()
    return versions


# ------------------------------------------------------------------ cases


@dataclasses.dataclass(frozen=True)
class IpcSubject:
    """A queue under test in one case and the calls it uses.

    `mode` is one of:

    - ``"single"``: one put and one get per message;
    - ``"get_many"``: one put per message, `get_many(BATCH_SIZE)`;
    - ``"batch"``: `put_many` of `BATCH_SIZE` messages, `get_many`;
    - ``"pingpong"``: put and get per round trip on two channels;
    - ``"raw-spin"``: the shared counters of the raw spin reference.
    """

    label: str
    peer: Peer | None
    mode: str


@dataclasses.dataclass(frozen=True)
class IpcCase:
    """A cross-process case: message size, queues and message counts.

    `kind` is ``"throughput"`` or ``"pingpong"``. The counts are messages
    per run (round trips for ``"pingpong"``) of the default run, of
    ``--quick`` and of ``--full``.
    """

    name: str
    description: str
    kind: str
    message_size_bytes: int
    subjects: tuple[IpcSubject, ...]
    default_count: int
    quick_count: int
    full_count: int = 0

    def count_for(self, profile: str) -> int:
        """Return the messages per run of `profile` (quick, default, full)."""
        counts = {"quick": self.quick_count, "default": self.default_count,
                  "full": self.full_count or self.default_count}
        if profile not in counts:
            raise ValueError(f"unknown profile {profile!r}; choose from "
                             f"{', '.join(counts)}")
        return counts[profile]


def _throughput_subjects() -> tuple[IpcSubject, ...]:
    return (
        IpcSubject("mqs.SharedQueue", PEER_SHARED_QUEUE, "single"),
        IpcSubject("multiprocessing.Queue", PEER_MULTIPROCESSING_QUEUE,
                   "single"),
        IpcSubject("multiprocessing.SimpleQueue",
                   PEER_MULTIPROCESSING_SIMPLE_QUEUE, "single"),
        IpcSubject("faster_fifo.Queue get", PEER_FASTER_FIFO, "single"),
        IpcSubject("faster_fifo.Queue get_many", PEER_FASTER_FIFO,
                   "get_many"),
        IpcSubject("pyzmq PUSH/PULL ipc", PEER_ZMQ, "single"),
    )


def _batch_subjects() -> tuple[IpcSubject, ...]:
    return (
        IpcSubject("mqs.SharedQueue put_many/get_many", PEER_SHARED_QUEUE,
                   "batch"),
        IpcSubject("multiprocessing.Queue", PEER_MULTIPROCESSING_QUEUE,
                   "single"),
        IpcSubject("multiprocessing.SimpleQueue",
                   PEER_MULTIPROCESSING_SIMPLE_QUEUE, "single"),
        IpcSubject("faster_fifo.Queue put_many/get_many", PEER_FASTER_FIFO,
                   "batch"),
        IpcSubject("pyzmq PUSH/PULL ipc", PEER_ZMQ, "single"),
    )


def _pingpong_subjects() -> tuple[IpcSubject, ...]:
    return (
        IpcSubject("mqs.SharedQueue block", PEER_SHARED_QUEUE, "pingpong"),
        IpcSubject("mqs.SharedQueue spin", PEER_SHARED_QUEUE_SPIN,
                   "pingpong"),
        IpcSubject("multiprocessing.Queue", PEER_MULTIPROCESSING_QUEUE,
                   "pingpong"),
        IpcSubject("faster_fifo.Queue", PEER_FASTER_FIFO, "pingpong"),
        IpcSubject("pyzmq PUSH/PULL ipc", PEER_ZMQ, "pingpong"),
        IpcSubject(RAW_SPIN_LABEL, None, "raw-spin"),
    )


CASES: dict[str, IpcCase] = {
    case.name: case
    for case in (
        IpcCase("ipc-64b",
                "1 producer process -> 1 consumer process, 64 B bytes",
                "throughput", 64, _throughput_subjects(), 50_000, 5_000,
                100_000),
        IpcCase("ipc-4kib",
                "1 producer process -> 1 consumer process, 4 KiB bytes",
                "throughput", 4096, _throughput_subjects(), 25_000, 2_000,
                50_000),
        IpcCase("ipc-batch",
                f"as ipc-64b, with put_many/get_many of {BATCH_SIZE:,} "
                f"where the queue has them",
                "throughput", 64, _batch_subjects(), 50_000, 5_000,
                100_000),
        IpcCase("ipc-pingpong",
                "round trip of 64 B between 2 processes; p50/p90/p99",
                "pingpong", 64, _pingpong_subjects(), 2_000, 200,
                4_000),
    )
}

TRACKED_RATIOS: tuple[TrackedRatio, ...] = (
    TrackedRatio("ipc-64b mqs.SharedQueue / multiprocessing.Queue",
                 ("ipc-64b", "mqs.SharedQueue"),
                 ("ipc-64b", REFERENCE_QUEUE), 10.0),
    TrackedRatio("ipc-64b mqs.SharedQueue / pyzmq PUSH/PULL ipc",
                 ("ipc-64b", "mqs.SharedQueue"),
                 ("ipc-64b", "pyzmq PUSH/PULL ipc"), 2.0),
    TrackedRatio("ipc-batch mqs put_many/get_many / multiprocessing.Queue",
                 ("ipc-batch", "mqs.SharedQueue put_many/get_many"),
                 ("ipc-batch", REFERENCE_QUEUE), 30.0),
    TrackedRatio("ipc-4kib mqs.SharedQueue / multiprocessing.Queue (MB/s)",
                 ("ipc-4kib", "mqs.SharedQueue"),
                 ("ipc-4kib", REFERENCE_QUEUE), 4.0),
    TrackedRatio("ipc-pingpong p50 mqs block / multiprocessing.Queue",
                 ("ipc-pingpong", "mqs.SharedQueue block"),
                 ("ipc-pingpong", REFERENCE_QUEUE), 1 / 20,
                 lower_is_better=True),
    TrackedRatio("ipc-pingpong p50 mqs spin / raw mmap spin",
                 ("ipc-pingpong", "mqs.SharedQueue spin"),
                 ("ipc-pingpong", RAW_SPIN_LABEL), 3.0,
                 lower_is_better=True),
)


def case_count(case: IpcCase, count: int | None, profile: str) -> int:
    """Return the messages (or round trips) per run of `case`.

    An explicit `count` applies to every case; otherwise each case has
    its own count per profile ("quick", "default" or "full").
    """
    if count is not None:
        return count
    return case.count_for(profile)


def make_messages(size_bytes: int, count: int) -> list[bytes]:
    """Return `count` messages of `size_bytes` from a pool of distinct ones.

    Message i is pool entry i mod `MESSAGE_POOL_SIZE`. Each entry starts
    with its index (4 bytes, little-endian), so entries differ even if the
    seeded random tail repeated.
    """
    if size_bytes < 4:
        raise ValueError(f"message size must be at least 4 bytes, got "
                         f"{size_bytes!r}")
    rng = random.Random(size_bytes)
    pool = [index.to_bytes(4, "little") + rng.randbytes(size_bytes - 4)
            for index in range(MESSAGE_POOL_SIZE)]
    return [pool[index % MESSAGE_POOL_SIZE] for index in range(count)]


# ------------------------------------------------------------------ roles
#
# Each role runs in its own child process and waits three times on a
# barrier shared by the processes of a run. The first wait ends when every
# receiver is open, so a ZeroMQ receiver has bound its path before any
# sender connects. The second ends when every sender is open, right before
# the timed work. The third ends when every message has arrived, before
# any endpoint closes.
#
# XXX: the last wait is there because libzmq 4.3.5 can drop messages still
# queued on an ipc:// PUSH socket that is closed right after its last send,
# although LINGER is -1 (6 of 200 runs of 2,000 messages lost some with
# pyzmq 27.3.0 on the machine of BENCHMARKS.md; the same bug is reported
# at https://github.com/zeromq/libzmq/issues/4660). Remove it once
# closing a socket with LINGER -1 delivers every message.


def _produce(channel, messages: list, batch: bool, barrier) -> dict:
    barrier.wait()
    sender = channel.open_sender()
    barrier.wait()

    start_ns = time.perf_counter_ns()
    if batch:
        put_many = sender.put_many
        for offset in range(0, len(messages), BATCH_SIZE):
            put_many(messages[offset:offset + BATCH_SIZE])
    else:
        put = sender.put
        for message in messages:
            put(message)

    barrier.wait()
    sender.close()
    return {"start_ns": start_ns}


def _consume(channel, messages: list, batch: bool, barrier) -> dict:
    receiver = channel.open_receiver()
    barrier.wait()
    barrier.wait()

    if batch:
        received, mismatched, first_mismatch = _receive_batches(
            receiver.get_many, messages)
    else:
        received, mismatched, first_mismatch = _receive_single(
            receiver.get, messages)
    end_ns = time.perf_counter_ns()

    barrier.wait()
    receiver.close()
    return {"end_ns": end_ns, "received": received, "mismatched": mismatched,
            "first_mismatch": first_mismatch}


def _receive_single(get, messages: list) -> tuple[int, int, int]:
    """Get one message per expected one; return (count, mismatched, first)."""
    mismatched = 0
    first_mismatch = -1
    for index, expected in enumerate(messages):
        if get() != expected:
            mismatched += 1
            if first_mismatch < 0:
                first_mismatch = index
    return len(messages), mismatched, first_mismatch


def _receive_batches(get_many, messages: list) -> tuple[int, int, int]:
    """Call get_many until every message is in; return as _receive_single.

    A message past the expected count counts as mismatched.
    """
    count = len(messages)
    received = 0
    mismatched = 0
    first_mismatch = -1
    while received < count:
        for message in get_many(BATCH_SIZE):
            if received >= count or message != messages[received]:
                mismatched += 1
                if first_mismatch < 0:
                    first_mismatch = received
            received += 1
    return received, mismatched, first_mismatch


def _ping(ping_channel, pong_channel, warmup: list, messages: list,
          barrier) -> dict:
    """Send each message and wait for its echo, timing each round trip.

    The `warmup` round trips come first and are checked but not timed.
    Mismatch indexes count from the first warm-up message.
    """
    receiver = pong_channel.open_receiver()
    barrier.wait()
    sender = ping_channel.open_sender()
    barrier.wait()
    put = sender.put
    get = receiver.get

    mismatched = 0
    first_mismatch = -1
    for index, message in enumerate(warmup):
        put(message)
        if get() != message:
            mismatched += 1
            if first_mismatch < 0:
                first_mismatch = index

    latencies_ns = array.array("q", bytes(8 * len(messages)))
    clock = time.perf_counter_ns
    for index, message in enumerate(messages):
        start_ns = clock()
        put(message)
        reply = get()
        latencies_ns[index] = clock() - start_ns
        if reply != message:
            mismatched += 1
            if first_mismatch < 0:
                first_mismatch = len(warmup) + index

    barrier.wait()
    sender.close()
    receiver.close()
    return {"latencies_ns": latencies_ns,
            "received": len(warmup) + len(messages),
            "mismatched": mismatched, "first_mismatch": first_mismatch}


def _echo(ping_channel, pong_channel, total: int, barrier) -> dict:
    """Put back each message received, `total` times."""
    receiver = ping_channel.open_receiver()
    barrier.wait()
    sender = pong_channel.open_sender()
    barrier.wait()
    put = sender.put
    get = receiver.get

    for _ in range(total):
        put(get())

    barrier.wait()
    sender.close()
    receiver.close()
    return {"echoed": total}


def _raw_spin_ping(region: mmap.mmap, warmup_count: int, count: int,
                   barrier) -> dict:
    """Publish counter values and busy-wait for each to come back.

    The counters are aligned 8-byte words, which x86-64 and aarch64 load
    and store in one access, so a Python read cannot return half a value.
    The first `warmup_count` round trips are not timed.
    """
    barrier.wait()
    barrier.wait()
    words = memoryview(region).cast("q")
    for sequence in range(1, warmup_count + 1):
        words[_RAW_PING_WORD] = sequence
        while words[_RAW_PONG_WORD] != sequence:
            pass

    latencies_ns = array.array("q", bytes(8 * count))
    clock = time.perf_counter_ns
    first = warmup_count + 1
    for index, sequence in enumerate(range(first, first + count)):
        start_ns = clock()
        words[_RAW_PING_WORD] = sequence
        while words[_RAW_PONG_WORD] != sequence:
            pass
        latencies_ns[index] = clock() - start_ns

    barrier.wait()
    last_echo = words[_RAW_PONG_WORD]
    words.release()
    # A counter carries no payload, so the only check is that the last
    # value came back.
    return {"latencies_ns": latencies_ns, "received": warmup_count + count,
            "mismatched": 0 if last_echo == warmup_count + count else 1,
            "first_mismatch": warmup_count + count - 1}


def _raw_spin_echo(region: mmap.mmap, total: int, barrier) -> dict:
    """Busy-wait for each counter value and copy it to the pong word."""
    barrier.wait()
    barrier.wait()
    words = memoryview(region).cast("q")
    for sequence in range(1, total + 1):
        while words[_RAW_PING_WORD] != sequence:
            pass
        words[_RAW_PONG_WORD] = sequence

    barrier.wait()
    words.release()
    return {"echoed": total}


# ---------------------------------------------------------------- processes


def _child_main(role: Callable[[Any], dict], barrier, connection) -> None:
    """Run `role` in a child process and send its outcome to the parent."""
    gc.disable()
    outcome: tuple[str, Any]
    try:
        outcome = ("ok", role(barrier))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        outcome = ("error", f"{type(exc).__name__}: {exc}")
    connection.send(outcome)
    connection.close()


def _run_roles(where: str,
               roles: Sequence[tuple[str, Callable[[Any], dict]]],
               timeout_s: float) -> dict[str, dict]:
    """Run each (name, role) in a forked child; return outcomes by name.

    Raises `BenchmarkError`, its message starting with `where`, if a role
    raised, a child exited without reporting, or not every child reported
    within `timeout_s`. Children still running then are killed; only the
    children started here are.
    """
    context: Any = multiprocessing.get_context(START_METHOD)
    # The barrier's own timeout only stops children whose parent died:
    # it is longer than `timeout_s`, so a stall is reported by the parent
    # and not as a broken barrier in a child.
    barrier = context.Barrier(len(roles), timeout=2 * timeout_s + 10)
    started = []
    try:
        for name, role in roles:
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(
                target=_child_main, args=(role, barrier, writer),
                name=f"mqs-bench-{name}", daemon=True)
            process.start()
            writer.close()
            started.append((name, process, reader))
        return _collect_outcomes(where, started, timeout_s)
    finally:
        for _, process, reader in started:
            if process.is_alive():
                process.kill()
            process.join()
            reader.close()


def _collect_outcomes(where: str, started: list,
                      timeout_s: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_s
    pending = {reader: (name, process) for name, process, reader in started}
    outcomes: dict[str, dict] = {}
    while pending:
        ready: list[Any] = multiprocessing.connection.wait(
            list(pending), max(0.0, deadline - time.monotonic()))
        if not ready:
            names = " and ".join(name for name, _ in pending.values())
            processes = "processes are" if len(pending) > 1 else "process is"
            raise BenchmarkError(
                f"{where}: the {names} {processes} still running after "
                f"{timeout_s:.0f} s; messages were lost or a waiting "
                f"process was never woken")
        for reader in ready:
            name, process = pending.pop(reader)
            try:
                status, payload = reader.recv()
            except EOFError:
                process.join(1.0)
                raise BenchmarkError(
                    f"{where}: the {name} process exited with status "
                    f"{process.exitcode} before it reported") from None
            if status == "error":
                raise BenchmarkError(
                    f"{where}: the {name} process raised {payload}")
            outcomes[name] = payload
    for name, process, _ in started:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            raise BenchmarkError(
                f"{where}: the {name} process reported but did not exit "
                f"within {timeout_s:.0f} s")
    return outcomes


# ---------------------------------------------------------------- one run


def _stall_timeout_s(case: IpcCase, count: int) -> float:
    per_item_s = (STALL_TIMEOUT_PER_ROUND_TRIP_S if case.kind == "pingpong"
                  else STALL_TIMEOUT_PER_MESSAGE_S)
    return STALL_TIMEOUT_BASE_S + count * per_item_s


def _make_channel(subject: IpcSubject, directory: str, name: str) -> Any:
    if subject.peer is None:
        raise ValueError(f"subject {subject.label!r} has no peer to make a "
                         f"channel with (mode {subject.mode!r})")
    return subject.peer.make_channel(directory, name)


def check_received(case: str, queue_label: str, expected: int,
                   outcome: dict) -> None:
    """Raise `BenchmarkError` unless `outcome` shows every message intact.

    `outcome` is the consumer's (or the pinging process's) report:
    ``received`` messages, of which ``mismatched`` differed from the
    message sent at their position, the first at ``first_mismatch``.
    """
    received = outcome["received"]
    mismatched = outcome["mismatched"]
    if received == expected and mismatched == 0:
        return
    first = (f" (the first at index {outcome['first_mismatch']:,})"
             if mismatched else "")
    raise BenchmarkError(
        f"{queue_label} in case {case!r} lost, duplicated, reordered or "
        f"corrupted messages: got {received:,} of {expected:,}, and "
        f"{mismatched:,} differed from the message sent at their "
        f"position{first}")


def run_throughput_once(case: IpcCase, subject: IpcSubject,
                        messages: list[bytes]) -> int:
    """Move `messages` between two new processes; return nanoseconds.

    Raises
    ------
    BenchmarkError
        If messages were lost or changed, a process failed, or the run
        stalled.
    """
    batch_send = subject.mode == "batch"
    batch_receive = subject.mode in ("batch", "get_many")
    with tempfile.TemporaryDirectory(prefix="mqs-bench-") as directory:
        channel = _make_channel(subject, directory, "queue")
        try:
            outcomes = _run_roles(
                f"{subject.label} in case {case.name!r}",
                [("consumer", lambda barrier: _consume(
                    channel, messages, batch_receive, barrier)),
                 ("producer", lambda barrier: _produce(
                     channel, messages, batch_send, barrier))],
                _stall_timeout_s(case, len(messages)))
        finally:
            channel.close()

    check_received(case.name, subject.label, len(messages),
                   outcomes["consumer"])
    elapsed_ns = outcomes["consumer"]["end_ns"] - outcomes["producer"][
        "start_ns"]
    if elapsed_ns <= 0:
        raise BenchmarkError(
            f"{subject.label} in case {case.name!r}: the clock measured "
            f"{elapsed_ns} ns for {len(messages):,} messages")
    return elapsed_ns


def run_pingpong_once(case: IpcCase, subject: IpcSubject,
                      messages: list[bytes]) -> array.array:
    """Bounce each message between two new processes; return latencies.

    The run starts with up to `PINGPONG_WARMUP_ROUND_TRIPS` untimed round
    trips. Returns the nanoseconds of each timed round trip, in order.

    Raises
    ------
    BenchmarkError
        As `run_throughput_once`.
    """
    warmup = messages[:PINGPONG_WARMUP_ROUND_TRIPS]
    total = len(warmup) + len(messages)
    timeout_s = _stall_timeout_s(case, total)
    where = f"{subject.label} in case {case.name!r}"
    if subject.mode == "raw-spin":
        outcomes = _run_raw_spin(where, len(warmup), len(messages),
                                 timeout_s)
    else:
        with tempfile.TemporaryDirectory(prefix="mqs-bench-") as directory:
            ping = _make_channel(subject, directory, "ping")
            pong = _make_channel(subject, directory, "pong")
            try:
                outcomes = _run_roles(
                    where,
                    [("echo", lambda barrier: _echo(
                        ping, pong, total, barrier)),
                     ("ping", lambda barrier: _ping(
                         ping, pong, warmup, messages, barrier))],
                    timeout_s)
            finally:
                ping.close()
                pong.close()

    check_received(case.name, subject.label, total, outcomes["ping"])
    return outcomes["ping"]["latencies_ns"]


def _run_raw_spin(where: str, warmup_count: int, count: int,
                  timeout_s: float) -> dict[str, dict]:
    # An anonymous mapping is MAP_SHARED by default, so the forked
    # children see each other's stores.
    region = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        return _run_roles(
            where,
            [("echo", lambda barrier: _raw_spin_echo(
                region, warmup_count + count, barrier)),
             ("ping", lambda barrier: _raw_spin_ping(
                 region, warmup_count, count, barrier))],
            timeout_s)
    finally:
        region.close()


# ----------------------------------------------------------------- results


@dataclasses.dataclass
class IpcResult(bench.Result):
    """Rates of one queue in one cross-process throughput case."""

    message_size_bytes: int = 0

    @property
    def megabytes_per_s(self) -> list[float]:
        """Payload megabytes (10**6 bytes) per second of each run."""
        return [rate * self.message_size_bytes / 1e6 for rate in self.rates]

    def to_dict(self) -> dict:
        data = super().to_dict()
        megabytes = self.megabytes_per_s
        data.update({
            "message_size_bytes": self.message_size_bytes,
            "mb_per_s": megabytes,
            "median_mb_per_s": statistics.median(megabytes),
            "min_mb_per_s": min(megabytes),
            "max_mb_per_s": max(megabytes),
        })
        return data


@dataclasses.dataclass
class LatencyResult:
    """Round-trip latencies of one queue over all timed ping-pong runs.

    Percentiles use the nearest-rank method on the round trips of all
    runs together.
    """

    case: str
    queue: str
    round_trips: int
    latencies_ns: list[array.array]
    p50_ratio_to_reference: float | None = None
    p99_ratio_to_reference: float | None = None

    def __post_init__(self) -> None:
        self._sorted_ns = sorted(
            value for run in self.latencies_ns for value in run)

    def percentile_ns(self, fraction: float) -> int:
        """Return the nearest-rank percentile, `fraction` in (0, 1]."""
        rank = max(1, math.ceil(fraction * len(self._sorted_ns)))
        return self._sorted_ns[rank - 1]

    @property
    def total_round_trips(self) -> int:
        return len(self._sorted_ns)

    @property
    def p50_ns(self) -> int:
        return self.percentile_ns(0.50)

    @property
    def p90_ns(self) -> int:
        return self.percentile_ns(0.90)

    @property
    def p99_ns(self) -> int:
        return self.percentile_ns(0.99)

    @property
    def mean_ns(self) -> float:
        return statistics.fmean(self._sorted_ns)

    @property
    def run_p50_ns(self) -> list[float]:
        """Median round trip of each run, in run order."""
        return [statistics.median(run) for run in self.latencies_ns]

    def to_dict(self) -> dict:
        return {
            "case": self.case,
            "queue": self.queue,
            "round_trips_per_run": self.round_trips,
            "runs": len(self.latencies_ns),
            "round_trips_total": self.total_round_trips,
            "p50_ns": self.p50_ns,
            "p90_ns": self.p90_ns,
            "p99_ns": self.p99_ns,
            "mean_ns": self.mean_ns,
            "min_ns": self._sorted_ns[0],
            "max_ns": self._sorted_ns[-1],
            "run_p50_ns": self.run_p50_ns,
            "p50_ratio_to_reference": self.p50_ratio_to_reference,
            "p99_ratio_to_reference": self.p99_ratio_to_reference,
        }


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A queue of a case that did not run, and why."""

    case: str
    queue: str
    reason: str

    def to_dict(self) -> dict:
        return {"case": self.case, "queue": self.queue,
                "reason": self.reason}


@dataclasses.dataclass
class IpcReport:
    """Everything one `run_cases` call measured or skipped."""

    throughput: list[IpcResult]
    latency: list[LatencyResult]
    skipped: list[Skipped]
    counts: dict[str, int]


# ----------------------------------------------------------------- running


def count_runs(case_names: Sequence[str], repeat: int) -> int:
    """Return how many runs, warm-ups included, `run_cases` will make."""
    return sum(
        (repeat + 1)
        for name in case_names for subject in CASES[name].subjects
        if peer_missing_reason(subject.peer) is None)


def run_cases(case_names: Sequence[str], repeat: int, count: int | None = None,
              profile: str = "default",
              on_run: Callable[[str, str], None] | None = None) -> IpcReport:
    """Run the named cross-process cases.

    `count` sets the messages (round trips for ``ipc-pingpong``) per run
    of every case; None takes each case's count for `profile` ("quick",
    "default" or "full"). `on_run(case, queue)` is called after each
    run, warm-ups included.

    Raises
    ------
    ValueError
        For an unknown case name or a `count` or `repeat` below 1.
    BenchmarkError
        If a run lost or changed messages, a process failed, or a run
        stalled.
    """
    _validate(case_names, count, repeat)
    report = IpcReport([], [], [], {})
    for name in case_names:
        case = CASES[name]
        messages_per_run = case_count(case, count, profile)
        report.counts[name] = messages_per_run
        subjects = []
        for subject in case.subjects:
            reason = peer_missing_reason(subject.peer)
            if reason is None:
                subjects.append(subject)
            else:
                report.skipped.append(Skipped(name, subject.label, reason))
        measurements = _run_case(case, subjects, messages_per_run, repeat,
                                 on_run)
        if case.kind == "pingpong":
            report.latency.extend(
                _latency_results(case, messages_per_run, measurements))
        else:
            report.throughput.extend(
                _throughput_results(case, messages_per_run, measurements))
    return report


def _validate(case_names: Sequence[str], count: int | None,
              repeat: int) -> None:
    unknown = [name for name in case_names if name not in CASES]
    if unknown:
        raise ValueError(
            f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    if count is not None and count < 1:
        raise ValueError(f"count must be at least 1, got {count!r}")
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat!r}")


def _run_case(case: IpcCase, subjects: list[IpcSubject], count: int,
              repeat: int, on_run: Callable[[str, str], None] | None,
              ) -> dict[str, list]:
    """Run one warm-up and `repeat` timed runs of each subject.

    The timed runs alternate between the subjects. Returns, per queue
    label, the elapsed nanoseconds (throughput) or the latency arrays
    (ping-pong) of the timed runs.
    """
    run_once = (run_pingpong_once if case.kind == "pingpong"
                else run_throughput_once)
    messages = make_messages(case.message_size_bytes, count)
    warmup_messages = messages[:max(1, count // 10)]
    for subject in subjects:
        run_once(case, subject, warmup_messages)
        if on_run is not None:
            on_run(case.name, subject.label)

    measurements: dict[str, list] = {subject.label: [] for subject in subjects}
    for _ in range(repeat):
        for subject in subjects:
            measurements[subject.label].append(
                run_once(case, subject, messages))
            logger.debug("%s %s: run of %d done", case.name, subject.label,
                         count)
            if on_run is not None:
                on_run(case.name, subject.label)
    return measurements


def _throughput_results(case: IpcCase, count: int,
                        elapsed: dict[str, list[int]]) -> list[IpcResult]:
    results = [IpcResult(case.name, label, count, runs,
                         message_size_bytes=case.message_size_bytes)
               for label, runs in elapsed.items()]
    reference = next(r for r in results if r.queue == REFERENCE_QUEUE)
    for result in results:
        result.ratio_to_reference = result.median / reference.median
    return results


def _latency_results(case: IpcCase, count: int,
                     latencies: dict[str, list]) -> list[LatencyResult]:
    results = [LatencyResult(case.name, label, count, runs)
               for label, runs in latencies.items()]
    reference = next(r for r in results if r.queue == REFERENCE_QUEUE)
    for result in results:
        result.p50_ratio_to_reference = result.p50_ns / reference.p50_ns
        result.p99_ratio_to_reference = result.p99_ns / reference.p99_ns
    return results


def tracked_ratios(
        report: IpcReport,
) -> tuple[list[RatioResult], list[tuple[TrackedRatio, str]]]:
    """Compute the tracked ratios of the cases in `report`.

    Throughput ratios divide median rates, latency ratios divide p50
    round trips. Returns the ratios measured and, for each ratio of a case
    that ran without one of its queues, the ratio and the skip reason.
    """
    values: dict[tuple[str, str], float] = {
        (r.case, r.queue): r.median for r in report.throughput}
    values.update({(r.case, r.queue): r.p50_ns for r in report.latency})
    skipped = {(s.case, s.queue): s.reason for s in report.skipped}
    measured = []
    unmeasured = []
    for tracked in TRACKED_RATIOS:
        pair = (tracked.numerator, tracked.denominator)
        if all(key in values for key in pair):
            measured.append(RatioResult(
                tracked, values[tracked.numerator]
                / values[tracked.denominator]))
            continue
        reasons = [skipped[key] for key in pair if key in skipped]
        if reasons:
            unmeasured.append((tracked, reasons[0]))
    return measured, unmeasured
