"""The ``shm`` backend: one broker shared by every process of a machine.

``Broker(backend="shm", name=...)`` opens the broker called `name`,
creating it if missing. Every process that opens the same name shares
its topics, settings, messages, groups, in-flight tables, dead letters,
counters and rate-limit buckets.

Design: a replicated operation journal
    The broker is one file in /dev/shm, ``mqs.broker.<name>`` (mode
    0600, created under a private name and linked into place, so no process
    maps a half-formatted file), laid out by ``csrc/mqs_journal.h``: a
    robust process-shared mutex, a change wait word (a futex), the
    liveness slots of the processes, and a journal of operations. Each
    record is one operation exactly as the ``log`` backend records it:
    the pickled tuple ``(op, now, args)`` with its broker time ``now``,
    message and consumer ids from replicated counters and the seed of
    each topic's retry jitter. Every process keeps a replica of the
    whole state (a `TopicState` per topic). Under the mutex it first
    replays the records it has not applied yet, then runs its own
    operation on its replica and appends the record, so all replicas
    pass through the same states in the same order. Message bodies are
    pickled once by the publisher and stay bytes in the journal and in
    every replica; only the process that receives a message unpickles
    it. A commit bumps the wait word, which wakes a blocked `fetch` or
    `publish` in any process.

    When the journal has no room for a record, the mutex holder writes
    its replica (`TopicState.snapshot`) to ``mqs.broker.<name>.snapshot-
    <generation>`` in /dev/shm and restarts the journal empty under the
    next generation. A replica that had applied every record of the old
    journal goes on as it is; one that had not reloads the snapshot.
    The snapshot lives in its own file because its size is that of the
    stored state, which the fixed mapping cannot bound.

    Why not rings per lane in the mapping: the broker's rules (weighted
    lanes, key ordering, per-group rate buckets, dedup windows, retry
    jitter, DLQ headers) already live in `TopicState` and
    `mqs.broker._policy`, tested once for every backend. A second copy
    written against a shared-memory layout would have to agree with them
    rule by rule, and every rule would need its own crash repair. The
    journal keeps one implementation and makes crash repair a single
    rule (below). The cost is throughput: every operation holds one
    mutex across all topics, and every process replays every other
    process's operations, so the work per operation grows with the
    number of busy processes instead of shrinking. `mqs bench` measures
    it.

Time
    Broker time is `time.monotonic`, which is one clock for every
    process on the machine, never below the last recorded ``now``.

Consumers and dead processes
    Each process that opens the broker takes a participant slot (an
    open-file-description lock on one byte of the file, held until the
    process closes the broker or dies) and a token that no later holder
    of the slot gets. A consumer is registered with its process's slot
    and token. Any process that finds a consumer's slot released or
    taken by another token closes that consumer through the journal:
    its in-flight messages go back to the tail of their lanes with
    their attempts kept (the next delivery has ``attempts + 1``). The
    check runs when a process opens the broker, when it finds the
    mutex's previous owner dead, and every `REAP_INTERVAL_S` seconds in
    the operations of each process, a waiting `fetch` included.

What survives what
    A process killed at any instruction: every operation that returned
    before the kill stays. An operation whose record was not committed
    (the mutex holder died before storing the journal position, the
    last step of an append) never happened; one that was committed
    happened, even if its caller never saw the result (a publish whose
    id was not returned is delivered; messages fetched for a consumer of
    the dead process are redelivered). The mutex holder stores shared
    state only as single words, so the next process to take the mutex
    (it gets EOWNERDEAD) marks it consistent and goes on; the dead
    process's consumers are closed as above. A compaction killed before
    it restarted the journal leaves the old journal in force.
    All processes exit: the broker stays in /dev/shm with its state,
    and the next process to open the name goes on from it, closing the
    consumers of the processes that are gone. `Broker.close` never
    removes it; ``mqs.Broker.unlink(name)`` does.
    Reboot, or /dev/shm cleared: everything is gone; use the ``log``
    backend for messages that must outlive the machine.

Limits
    Bodies, keys, headers and dedup ids must be picklable; anyone who
    can write the broker's files can run code in the processes that
    open it, hence mode 0600. One record must fit in half the journal
    (`journal_bytes`); a bigger publish batch is split, and a bigger
    message raises `MessageTooLarge`. At most 256 processes have a
    broker of one name open at once. A consumer belongs to the process
    that opened it; a child forked after that takes its own slot and
    must open its own consumers. A compaction holds the mutex while it
    pickles and writes the whole state, so every process waits that long
    (it grows with the stored messages) about once per `journal_bytes`
    of records. A process stopped (SIGSTOP, a debugger) while it holds
    the mutex stalls every other process until it continues or dies.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

from mqs._journal import MAX_BYTES, MIN_BYTES, SharedJournal
from mqs.broker._backend import Backend, DeadLetter, Delivery, Envelope
from mqs.broker._log import LogBackend
from mqs.broker._memory import MemoryBackend
from mqs.broker._state import TopicState
from mqs.errors import BackendUnavailable, MessageTooLarge, ShutDown

__all__ = ["ShmBackend", "REAP_INTERVAL_S"]

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIX = "mqs.broker."
# The first field of every snapshot; another format raises.
FORMAT = ("mqs.broker.shm", 1)
# How often each process checks that the consumers' processes live.
REAP_INTERVAL_S = 0.05
DEFAULT_JOURNAL_BYTES = 16 << 20

# Every open ShmBackend of this process, given its own slot in a child.
_instances: weakref.WeakSet[ShmBackend] = weakref.WeakSet()


def _check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__} "
                        f"{name!r}")
    if not name or "/" in name or "\0" in name or name in (".", "..") \
            or len(name) > 200:
        raise ValueError(
            f"name must be 1 to 200 characters, not '.' or '..', without "
            f"'/' or NUL, got {name!r}")
    return name


def _journal_path(name: str) -> str:
    return os.path.join(SHM_DIR, PREFIX + name)


class _SharedSection:
    """The backend's `_lock`: this process's thread lock, then the shared
    mutex with the replica brought up to date.

    The inherited `MemoryBackend` and `LogBackend` methods run their
    operations inside ``with self._lock:``, so they need no change.
    """

    def __init__(self, backend: ShmBackend) -> None:
        self.backend = backend
        self.thread_lock = threading.Lock()

    def __enter__(self) -> None:
        self.thread_lock.acquire()
        try:
            self.backend._enter_shared()
        except BaseException:
            self.backend._leave_shared()
            self.thread_lock.release()
            raise

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.backend._leave_shared()
        finally:
            self.thread_lock.release()


class _ChangeWait:
    """The backend's `_changed`: waits for a commit by any process."""

    def __init__(self, backend: ShmBackend) -> None:
        self.backend = backend

    def wait(self, timeout: float) -> None:
        self.backend._wait_for_change(timeout)

    def notify_all(self) -> None:
        # Every commit wakes the waiters when the mutex is released.
        pass


class ShmBackend(LogBackend):
    """Broker state replicated in every process through a shared journal.

    Parameters
    ----------
    name : str
        Broker name; processes that pass the same name share the broker.
    journal_bytes : int
        Size of the journal when this call creates the broker (a
        multiple of 8 from 4096 to 2**31); an existing broker keeps its
        own. A fuller journal means rarer snapshots.

    Raises
    ------
    TypeError, ValueError
        If `name` or `journal_bytes` is invalid.
    mqs._journal.JournalLayoutError
        If the /dev/shm file of that name is not an shm broker of this
        mqs version.
    """

    name = "shm"

    def __init__(self, name: str, *,
                 journal_bytes: int = DEFAULT_JOURNAL_BYTES) -> None:
        _check_name(name)
        if isinstance(journal_bytes, bool) or not isinstance(
                journal_bytes, int) or not (
                    MIN_BYTES <= journal_bytes <= MAX_BYTES) \
                or journal_bytes % 8:
            raise ValueError(
                f"journal_bytes must be a multiple of 8 from {MIN_BYTES} "
                f"to {MAX_BYTES}, got {journal_bytes!r}")
        MemoryBackend.__init__(self, clock=self._read_clock)
        self.shm_name = name
        self.path = _journal_path(name)
        self._offset = 0.0
        self._last = 0.0
        self._now = 0.0
        self._log = None
        self._failed = None
        self._closed = False
        self._reset_state()
        self._generation = -1
        self._applied = 0
        self._held = False
        self._appended = False
        self._waiting = 0
        self._next_reap = 0.0
        self._lock = _SharedSection(self)  # type: ignore[assignment]
        self._changed = _ChangeWait(self)  # type: ignore[assignment]
        self._journal = SharedJournal(self.path, journal_bytes)
        self._max_record = self._journal.journal_bytes // 2
        try:
            self._slot, self._token = self._journal.attach()
        except BaseException:
            self._journal.close()
            raise
        _instances.add(self)
        # Catch up and close the consumers of processes that are gone.
        with self._lock:
            pass

    def _reset_state(self) -> None:
        self._topics = {}
        self._next_message = 0
        self._next_consumer = 0
        # consumer id -> (topic, group, slot, token) of its process.
        self._owners: dict[str, tuple[str, str, int, int]] = {}

    # The shared mutex and the replica.

    def _enter_shared(self) -> None:
        """Take the mutex and apply the records this replica lacks."""
        if self._closed:
            raise ShutDown(f"shm broker {self.shm_name!r} is closed")
        if self._journal.lock():
            logger.warning("shm broker %s: a process died holding the "
                           "broker mutex; checking its consumers",
                           self.shm_name)
            self._next_reap = 0.0
        self._held = True
        self._appended = False
        generation, used = self._journal.position()
        if generation != self._generation:
            if not (generation == self._generation + 1
                    and self._applied == self._journal.restart_used):
                self._load_snapshot_file(generation)
            self._generation = generation
            self._applied = 0
        if used > self._applied:
            self._replay_records(self._journal.read(self._applied, used))
            self._applied = used
        if time.monotonic() >= self._next_reap:
            self._reap()

    def _leave_shared(self) -> None:
        if not self._held:
            return
        self._held = False
        self._journal.unlock()
        if self._appended:
            self._journal.signal()

    def _wait_for_change(self, timeout: float) -> None:
        """Release the section, wait for a commit by anyone (at most
        `timeout` seconds, 50 ms per call) and take the section again."""
        epoch = self._journal.wait_prepare()
        self._waiting += 1
        section = self._lock
        assert isinstance(section, _SharedSection)
        try:
            self._leave_shared()
            section.thread_lock.release()
            try:
                self._journal.wait(epoch, timeout)
            finally:
                section.thread_lock.acquire()
        finally:
            self._waiting -= 1
        self._enter_shared()

    def _replay_records(self, records: list[bytes]) -> None:
        for data in records:
            op, now, args = pickle.loads(data)
            # Exactly the recorded time, even when this process read a
            # later clock for an operation that changed nothing: rate
            # buckets refilled at another time would diverge.
            self._now = now
            self._last = max(self._last, now)
            try:
                self._apply(op, args)
            except Exception:
                # It raised the same way where it first ran.
                logger.debug("replayed %s raised", op, exc_info=True)

    def _load_snapshot_file(self, generation: int) -> None:
        self._reset_state()
        if generation == 0:
            return
        path = self._snapshot_path(generation)
        try:
            with open(path, "rb") as file:
                snapshot = pickle.load(file)
        except FileNotFoundError:
            raise BackendUnavailable(
                f"shm broker {self.shm_name!r}: snapshot {path} is missing "
                f"(the broker was unlinked, or /dev/shm was cleared); "
                f"close it and open it again") from None
        if snapshot[0] != FORMAT:
            raise BackendUnavailable(
                f"shm broker {self.shm_name!r} has snapshot format "
                f"{snapshot[0]!r}, this mqs reads {FORMAT!r}; use the mqs "
                f"version that created it")
        (_, self._next_message, self._next_consumer, now, topics,
         self._owners) = snapshot
        self._now = self._last = max(self._last, now)
        self._topics = {
            name: TopicState.restore(data, self._pinned, self._next_id)
            for name, data in topics.items()}

    def _snapshot_path(self, generation: int) -> str:
        return f"{self.path}.snapshot-{generation}"

    def _compact(self) -> None:
        """Write the replica as the next generation's snapshot and restart
        the journal; the caller holds the mutex and is caught up."""
        topics = {name: state.snapshot()
                  for name, state in self._topics.items()}
        data = pickle.dumps(
            (FORMAT, self._next_message, self._next_consumer, self._now,
             topics, self._owners), protocol=pickle.HIGHEST_PROTOCOL)
        generation = self._generation + 1
        path = self._snapshot_path(generation)
        temp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                     | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(temp, path)
        except BaseException:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
            raise
        self._generation = self._journal.restart()
        self._applied = 0
        self._remove_snapshots(keep=path)
        logger.debug("shm broker %s: wrote a snapshot of %d bytes for "
                     "generation %d", self.shm_name, len(data),
                     self._generation)

    def _remove_snapshots(self, keep: str | None) -> None:
        prefix = os.path.basename(self.path) + ".snapshot-"
        for entry in os.listdir(SHM_DIR):
            path = os.path.join(SHM_DIR, entry)
            if entry.startswith(prefix) and path != keep:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    # Recording operations (the caller holds the section).

    def _logged(self, op: str, *args: Any) -> Any:
        """Apply an operation at `_now` and append its record."""
        data = pickle.dumps((op, self._now, args),
                            protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > self._max_record:
            raise MessageTooLarge(
                f"a {op} record of {len(data)} bytes does not fit in half "
                f"the journal of shm broker {self.shm_name!r} "
                f"({self._max_record} bytes); open the broker with a larger "
                f"journal_bytes or send smaller messages")
        _, used = self._journal.position()
        if self._journal.record_bytes(len(data)) > \
                self._journal.journal_bytes - used:
            self._compact()
        try:
            return self._apply(op, args)
        finally:
            self._append(data)

    def _append(self, data: bytes) -> None:
        end = self._journal.append(data)
        if end < 0:
            raise AssertionError("journal full after a compaction")
        self._applied = end
        self._appended = True

    def _after_write(self) -> None:
        pass

    def _sync(self, log: Any) -> None:
        pass

    def _check_open(self) -> None:
        if self._closed:
            raise ShutDown(f"shm broker {self.shm_name!r} is closed")

    def _reap(self) -> None:
        """Close the consumers whose processes are gone."""
        self._next_reap = time.monotonic() + REAP_INTERVAL_S
        dead = [(consumer, owner) for consumer, owner in self._owners.items()
                if not self._journal.alive(owner[2], owner[3])]
        if not dead:
            return
        self._tick()
        returned = 0
        for consumer, (topic, group, _, _) in dead:
            returned += self._logged("close", topic, group, consumer)
        logger.info("shm broker %s: closed %d consumer(s) of processes that "
                    "are gone; %d in-flight message(s) are ready again",
                    self.shm_name, len(dead), returned)

    # Replicated operations that also track consumer owners.

    def _do_open(self, topic: str, group: str, consumer: str, start: str,
                 prefetch: int, max_attempts: int | None, slot: int = -1,
                 token: int = 0) -> None:
        super()._do_open(topic, group, consumer, start, prefetch,
                         max_attempts)
        self._owners[consumer] = (topic, group, slot, token)

    def _do_close(self, topic: str, group: str, consumer: str) -> int:
        self._owners.pop(consumer, None)
        return super()._do_close(topic, group, consumer)

    def _do_ack_many(self, topic: str, group: str, tags: list[Any]
                     ) -> list[bool]:
        state = self._topic(topic)
        return [state.ack(group, tag, self._now) for tag in tags]

    def _do_delete(self, topic: str) -> None:
        super()._do_delete(topic)
        for consumer, owner in list(self._owners.items()):
            if owner[0] == topic:
                del self._owners[consumer]

    # Operations that differ from the log backend's.

    def publish(self, topic: str, envelopes: Sequence[Envelope],
                timeout: float | None) -> list[str]:
        # Bodies travel as bytes; receivers unpickle them (see `fetch`).
        encoded = [envelope._replace(body=pickle.dumps(
            envelope.body, protocol=pickle.HIGHEST_PROTOCOL))
            for envelope in envelopes]
        return super().publish(topic, encoded, timeout)

    def open_consumer(self, topic: str, group: str, *, start: str,
                      prefetch: int, max_attempts: int | None) -> str:
        with self._lock:
            self._check_open()
            self._topic(topic)
            self._next_consumer += 1
            consumer = f"c{self._next_consumer}"
            self._tick()
            self._logged("open", topic, group, consumer, start, prefetch,
                         max_attempts, self._slot, self._token)
        return consumer

    def fetch(self, topic: str, group: str, consumer: str, max_items: int,
              *, ack_timeout: float, auto_ack: bool,
              timeout: float | None) -> list[Delivery]:
        found = super().fetch(topic, group, consumer, max_items,
                              ack_timeout=ack_timeout, auto_ack=auto_ack,
                              timeout=timeout)
        return [delivery._replace(body=pickle.loads(delivery.body))
                for delivery in found]

    def ack_many(self, topic: str, group: str, tags: Sequence[Any]
                 ) -> list[bool]:
        # One record, so one mutex round and one replay for the batch.
        return self._settle("ack_many", topic, group, list(tags))

    async def fetch_async(self, topic: str, group: str, consumer: str,
                          max_items: int, *, ack_timeout: float,
                          auto_ack: bool, timeout: float | None
                          ) -> list[Delivery]:
        # Commits of other processes cannot resolve this loop's futures,
        # so poll (Backend's default).
        return await Backend.fetch_async(
            self, topic, group, consumer, max_items, ack_timeout=ack_timeout,
            auto_ack=auto_ack, timeout=timeout)

    async def wait_changed_async(self, timeout: float) -> None:
        await Backend.wait_changed_async(self, timeout)

    def dlq_list(self, topic: str, limit: int | None = None
                 ) -> list[DeadLetter]:
        letters = super().dlq_list(topic, limit)
        return [dataclasses.replace(letter, body=pickle.loads(letter.body))
                for letter in letters]

    def close(self) -> None:
        """Release this process's slot and mapping; the broker and its
        state stay for other processes (see `unlink`). Idempotent.
        Consumers of this process that are still open are closed by the
        next process that checks, as for a process that died."""
        section = self._lock
        assert isinstance(section, _SharedSection)
        with section.thread_lock:
            if self._closed:
                return
            self._closed = True
            self._journal.signal()
        # Threads of this process that wait for a change return within
        # 50 ms, then see the broker closed.
        deadline = time.monotonic() + 1.0
        while self._waiting and time.monotonic() < deadline:
            time.sleep(0.001)
        with section.thread_lock:
            self._journal.close()
        _instances.discard(self)

    @staticmethod
    def unlink(name: str) -> bool:
        """Remove the shm broker `name` from /dev/shm; return whether it
        existed. Processes that have it open keep using their mapping;
        the next open of the name creates a new, empty broker."""
        path = _journal_path(_check_name(name))
        try:
            os.unlink(path)
            existed = True
        except FileNotFoundError:
            existed = False
        prefix = os.path.basename(path) + ".snapshot-"
        for entry in os.listdir(SHM_DIR):
            if entry.startswith(prefix):
                try:
                    os.unlink(os.path.join(SHM_DIR, entry))
                except FileNotFoundError:
                    pass
        return existed

    def _after_fork_in_child(self) -> None:
        self._lock = _SharedSection(self)  # type: ignore[assignment]
        self._held = False
        self._waiting = 0
        if self._closed:
            return
        self._journal.reopen()
        self._slot, self._token = self._journal.attach()

    def __repr__(self) -> str:
        return f"<ShmBackend {self.shm_name!r}>"


def _after_fork() -> None:
    for backend in list(_instances):
        backend._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork)
