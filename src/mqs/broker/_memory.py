"""The ``memory`` backend: every topic's `TopicState` in this process.

One lock guards all topics; every operation that can make a message
deliverable or free room notifies both the threads waiting on the
condition and the asyncio futures of `fetch_async` and `wait_async`.
No timer thread: a waiting `fetch` sleeps until the earliest of its
timeout, the next timer of the topic's wheel and the next rate-limit
token, then advances the wheel itself.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from mqs import metrics
from mqs.broker._backend import (
    Backend,
    DeadLetter,
    Delivery,
    Envelope,
    GroupStats,
)
from mqs.broker._policy import TopicConfig
from mqs.broker._state import TopicState
from mqs.errors import Full, ShutDown, TopicConfigError, UnknownTopic

__all__ = ["MemoryBackend"]

_new_tuple = tuple.__new__
# Every MemoryBackend of this process (see `_after_fork_in_child`).
_instances: weakref.WeakSet[MemoryBackend] = weakref.WeakSet()
# The fields of an `Envelope` after `body` and `priority`, at their
# defaults.
_ENVELOPE_DEFAULTS = Envelope(None)[2:]


class MemoryBackend(Backend):
    """Broker state in Python objects, shared by the threads of a process.

    Parameters
    ----------
    clock : callable, optional
        Monotonic clock in seconds (default `time.monotonic`). Tests pass
        a simulated one and call with ``timeout=0``.
    sample_every : int, None or "default"
        Sample the latencies of one delivery in this many per group
        (see `group_stats`); None turns sampling off. The default is
        `mqs.metrics.default_sample_every()` when the backend is made.
    """

    name = "memory"
    # Threads in `_wait` (see `__init__`); a class default, because
    # subclasses set up their own waits.
    _waiting = 0

    def __init__(self, clock: Callable[[], float] | None = None, *,
                 sample_every: int | None | str = "default") -> None:
        if clock is not None and not callable(clock):
            # Checked here, because the first use comes only at the first
            # publish, far from the mistake.
            raise TypeError(
                f"clock must be a callable returning monotonic seconds, or "
                f"None for time.monotonic, got {type(clock).__name__} "
                f"{clock!r}")
        self.clock = time.monotonic if clock is None else clock
        self.sample_every = _sample_every(sample_every)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._topics: dict[str, TopicState] = {}
        self._ids = itertools.count(1)
        self._consumer_ids = itertools.count(1)
        self._futures: list[tuple[asyncio.AbstractEventLoop,
                                  asyncio.Future]] = []
        # Threads in `_wait`, so that `_notify` costs nothing without them.
        self._waiting = 0
        self._closed = False
        _instances.add(self)

    def _next_id(self) -> str:
        return str(next(self._ids))

    def _topic(self, topic: str) -> TopicState:
        state = self._topics.get(topic)
        if state is None:
            raise UnknownTopic(
                f"unknown topic {topic!r}; declare it first with "
                f"broker.declare_topic({topic!r})", topic)
        return state

    def _check_open(self) -> None:
        """Raise ShutDown after `close`; the caller holds the lock."""
        if self._closed:
            raise ShutDown("memory broker is closed; open a new Broker")

    def _notify(self) -> None:
        """Wake every waiter; the caller holds the lock."""
        if not self._waiting and not self._futures:
            return
        self._changed.notify_all()
        futures, self._futures = self._futures, []
        for loop, future in futures:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:
                # That loop is closed; nobody waits on the future any more.
                pass

    def _wait(self, timeout: float | None) -> None:
        """Wait on the condition for at most `timeout` seconds; the
        caller holds the lock."""
        self._waiting += 1
        try:
            self._changed.wait(timeout)
        finally:
            self._waiting -= 1

    # Topics.

    def declare_topic(self, config: TopicConfig, replace: bool = False
                      ) -> TopicConfig:
        with self._lock:
            state = self._topics.get(config.name)
            if state is None:
                self._topics[config.name] = TopicState(
                    config, self.clock, self._next_id, self.sample_every)
                return config
            if not _redeclare_changes(state.config, config, replace):
                return config
            state.config = config
            self._notify()
            return config

    def topic_config(self, topic: str) -> TopicConfig:
        with self._lock:
            return self._topic(topic).config

    def has_topic(self, topic: str) -> bool:
        with self._lock:
            return topic in self._topics

    def topics(self) -> list[str]:
        # The shm and log backends inherit this: their `_lock` brings the
        # replica up to date with the other processes first.
        with self._lock:
            return sorted(self._topics)

    def delete_topic(self, topic: str) -> None:
        with self._lock:
            self._topic(topic)
            del self._topics[topic]
            self._notify()

    # Producing.

    def publish(self, topic: str, envelopes: Sequence[Envelope],
                timeout: float | None) -> list[str]:
        deadline = None if timeout is None else self.clock() + timeout
        ids: list[str] = []
        waited = False
        with self._lock:
            while True:
                # Also after each wait: `close` wakes a blocked publish.
                self._check_open()
                if waited and topic not in self._topics:
                    raise _deleted_while_full(topic, len(ids), len(envelopes))
                state = self._topic(topic)
                now = self.clock()
                ids += state.publish(envelopes[len(ids):], now, time.time(),
                                     len(ids))
                self._notify()
                if len(ids) == len(envelopes):
                    return ids
                wait = None if deadline is None else deadline - now
                if wait is not None and wait <= 0:
                    raise _stayed_full(topic, state.config.maxsize,
                                       len(ids), len(envelopes))
                self._wait(_slice(wait))
                waited = True

    def publish_one(self, topic: str, body: Any, priority: int
                    ) -> str | None:
        # `publish` for one envelope without options, on a topic without
        # a maxsize (which never blocks): the rest goes through
        # `publish`, which checks and waits.
        envelope = _new_tuple(Envelope, (body, priority,
                                         *_ENVELOPE_DEFAULTS))
        with self._lock:
            state = self._topics.get(topic)
            if state is None or state.config.maxsize or self._closed:
                return None
            ids = state.publish((envelope,), self.clock(), time.time())
            self._notify()
        return ids[0]

    # Consuming.

    def open_consumer(self, topic: str, group: str, *, start: str,
                      prefetch: int, max_attempts: int | None,
                      ack_timeout: float | None = None) -> str:
        consumer = f"c{next(self._consumer_ids)}"
        with self._lock:
            self._topic(topic).open_consumer(
                group, consumer, start, prefetch, max_attempts, self.clock())
            self._notify()
        return consumer

    def close_consumer(self, topic: str, group: str, consumer: str) -> int:
        with self._lock:
            state = self._topics.get(topic)
            if state is None:
                return 0
            returned = state.close_consumer(group, consumer, self.clock())
            self._notify()
            return returned

    def fetch(self, topic: str, group: str, consumer: str, max_items: int,
              *, ack_timeout: float, auto_ack: bool,
              timeout: float | None) -> list[Delivery]:
        deadline = None if timeout is None else self.clock() + timeout
        with self._lock:
            while True:
                # Also after each wait: `close` wakes a blocked fetch.
                self._check_open()
                found, wake = self._try_fetch(
                    topic, group, consumer, max_items, ack_timeout, auto_ack)
                if found:
                    return found
                now = self.clock()
                if deadline is not None and now >= deadline:
                    return []
                wait = _earliest(deadline, wake)
                self._wait(_slice(None if wait is None
                                   else wait - now))

    def fetch_one(self, topic: str, group: str, consumer: str,
                  ack_timeout: float, auto_ack: bool) -> Delivery | None:
        # `_try_fetch` for one message, without the next wake time, which
        # only a waiting `fetch` needs.
        with self._lock:
            state = self._topics.get(topic)
            if state is None or self._closed:
                # `fetch` raises UnknownTopic or ShutDown.
                return None
            try:
                found = state.fetch(group, consumer, 1, ack_timeout,
                                    auto_ack, self.clock())
            except ShutDown:
                # A closed consumer: `fetch` raises it again.
                return None
            if not found:
                return None
            if auto_ack and state.config.maxsize:
                self._notify()
        return found[0]

    def _try_fetch(self, topic, group, consumer, max_items, ack_timeout,
                   auto_ack) -> tuple[list[Delivery], float | None]:
        """Fetch without waiting; the caller holds the lock."""
        state = self._topic(topic)
        now = self.clock()
        found = state.fetch(group, consumer, max_items, ack_timeout,
                            auto_ack, now)
        if found and auto_ack and state.config.maxsize:
            # Finished messages freed room for blocked publishers.
            self._notify()
        return found, state.next_wake(group, now)

    async def fetch_async(self, topic: str, group: str, consumer: str,
                          max_items: int, *, ack_timeout: float,
                          auto_ack: bool, timeout: float | None
                          ) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else self.clock() + timeout
        while True:
            future = loop.create_future()
            with self._lock:
                found, wake = self._try_fetch(
                    topic, group, consumer, max_items, ack_timeout, auto_ack)
                if found:
                    return found
                self._futures.append((loop, future))
            now = self.clock()
            if deadline is not None and now >= deadline:
                return []
            wait = _earliest(deadline, wake)
            await self._await_future(
                loop, future, None if wait is None else max(0.0, wait - now))

    def ack(self, topic: str, group: str, tag: Any) -> bool:
        with self._lock:
            self._check_open()
            done = self._topic(topic).ack(group, tag, self.clock())
            self._notify()
            return done

    def nack(self, topic: str, group: str, tag: Any, *, requeue: bool,
             delay: float | None, error: str | None) -> bool:
        with self._lock:
            self._check_open()
            done = self._topic(topic).nack(group, tag, requeue, delay, error,
                                           self.clock())
            self._notify()
            return done

    def extend(self, topic: str, group: str, tag: Any, seconds: float
               ) -> bool:
        with self._lock:
            self._check_open()
            done = self._topic(topic).extend(group, tag, seconds,
                                             self.clock())
            self._notify()
            return done

    def release(self, topic: str, group: str, tags: Sequence[Any]) -> int:
        with self._lock:
            state = self._topics.get(topic)
            if state is None:
                return 0
            returned = state.release(group, tags, self.clock())
            self._notify()
            return returned

    def in_flight(self, topic: str, group: str, consumer: str) -> int:
        with self._lock:
            state = self._topics.get(topic)
            return 0 if state is None else state.in_flight(group, consumer)

    # Dead letters.

    def dlq_list(self, topic: str, limit: int | None = None
                 ) -> list[DeadLetter]:
        with self._lock:
            return self._topic(topic).dlq_list(limit)

    def dlq_redrive(self, topic: str, ids: Sequence[str] | None = None
                    ) -> int:
        with self._lock:
            moved = self._topic(topic).dlq_redrive(ids, self.clock())
            self._notify()
            return moved

    def dlq_purge(self, topic: str) -> int:
        with self._lock:
            return self._topic(topic).dlq_purge()

    # State.

    def stats(self, topic: str) -> dict[str, int]:
        with self._lock:
            state = self._topic(topic)
            state.advance(self.clock())
            return state.stats()

    def group_stats(self, topic: str) -> list[GroupStats]:
        with self._lock:
            state = self._topic(topic)
            now = self.clock()
            state.advance(now)
            return state.group_stats(now)

    def close(self) -> None:
        """Make later acks, nacks and extends raise ShutDown.

        `Broker` rejects its own calls after its close, but a message
        that a consumer handed out before it would still reach here.
        """
        with self._lock:
            self._closed = True
            self._notify()

    def wait_changed(self, timeout: float) -> None:
        with self._lock:
            self._wait(_slice(timeout))

    async def wait_changed_async(self, timeout: float) -> None:
        """Await a state change or `timeout` seconds, off the lock."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._futures.append((loop, future))
        await self._await_future(loop, future, timeout)

    async def _await_future(self, loop, future, timeout) -> None:
        # Not asyncio.wait_for: on CPython 3.11.7 it returns the result
        # when the future is resolved in the loop step that cancels the
        # task, so the cancelled fetch loop would go on to take a message.
        # Awaiting the future itself raises CancelledError in that case.
        timer = None if timeout is None else loop.call_later(
            timeout, _resolve, future)
        try:
            await future
        finally:
            if timer is not None:
                timer.cancel()
            with self._lock:
                try:
                    self._futures.remove((loop, future))
                except ValueError:
                    pass  # _notify took it already


def _sample_every(value: int | None | str) -> int | None:
    """Check a backend's `sample_every` option; "default" reads the
    process default of `mqs.metrics`."""
    if value == "default":
        return metrics.default_sample_every()
    if value is not None:
        metrics.LatencySampler(value)  # raises for a bad value
    return value


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _slice(wait: float | None) -> float:
    """Bound one condition wait to 50 ms, so Ctrl-C and clock changes of
    a simulated clock are seen; the callers loop until done."""
    if wait is None:
        return 0.05
    return max(0.0, min(wait, 0.05))


def _stayed_full(topic: str, maxsize: int, published: int,
                 total: int) -> Full:
    """Return the `Full` a publish raises when its timeout ends on a full
    topic; ``accepted`` is the number of messages already published."""
    return Full(
        f"topic {topic!r} stayed full (maxsize {maxsize}): published "
        f"{published} of {total} messages; consume faster or raise maxsize",
        published)


def _deleted_while_full(topic: str, published: int,
                        total: int) -> UnknownTopic:
    """Return the `UnknownTopic` a blocked publish raises when its topic
    was deleted while it waited for room."""
    return UnknownTopic(
        f"topic {topic!r} was deleted while a publish waited for room in "
        f"it: published {published} of {total} messages; declare the topic "
        f"again to publish the rest", topic, deleted=True,
        published=published)


def _redeclare_changes(stored: TopicConfig, config: TopicConfig,
                       replace: bool) -> bool:
    """Return whether declaring an existing topic with `config` changes
    its `stored` settings.

    Raises TopicConfigError when it would change them without
    replace=True, or change the lanes or the policy, which no backend
    can do while the topic exists.
    """
    if stored == config:
        return False
    if not replace:
        raise TopicConfigError(_conflict(stored, config))
    if stored.weights != config.weights or stored.policy != config.policy:
        raise TopicConfigError(
            f"topic {config.name!r}: lanes and policy cannot change "
            f"while it exists; delete_topic({config.name!r}) first")
    return True


def _conflict(stored: TopicConfig, new: TopicConfig) -> str:
    fields = [name for name in stored.__dataclass_fields__
              if getattr(stored, name) != getattr(new, name)]
    changes = ", ".join(
        f"{name}: stored {getattr(stored, name)!r}, got "
        f"{getattr(new, name)!r}" for name in fields)
    return (f"topic {new.name!r} exists with other settings ({changes}); "
            f"pass replace=True to change them")


def _after_fork_in_child() -> None:
    """Give each memory broker that a forked child inherited new locks.

    A thread of the parent may have held a broker's lock at the fork.
    That thread does not exist in the child, so the lock would stay taken
    and the child's first call would hang. The child's broker is its own
    copy of the parent's state.
    NOTE: a fork in the middle of another thread's operation copies that
    operation half done.
    """
    for backend in list(_instances):
        if type(backend._lock) is not type(threading.Lock()):
            # A subclass with its own section (shm, log) resets itself.
            continue
        backend._lock = threading.Lock()
        backend._changed = threading.Condition(backend._lock)
        backend._waiting = 0
        backend._futures = []


os.register_at_fork(after_in_child=_after_fork_in_child)
