"""`Broker`, `Consumer`, `Message` and `Producer`: the broker's public API.

These classes validate arguments and wait; every piece of state lives in
the backend (see `mqs.broker._backend` for the contract).
"""

from __future__ import annotations

import atexit
import datetime
import difflib
import inspect
import logging
import math
import os
import pickle
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mqs._limits import check_max_delay
from mqs._topiccore import MessageBase, fork_count
from mqs.broker._backend import (
    Backend,
    DeadLetter,
    Delivery,
    Envelope,
    GroupStats,
)
from mqs.broker._log_shared import SharedLogBackend
from mqs.broker._memory import MemoryBackend, _deleted_while_full
from mqs.broker._policy import (
    MAX_PREFETCH,
    Backoff,
    TopicConfig,
    check_max_attempts,
    check_priority,
    check_topic_name,
)
from mqs.broker._shm import ShmBackend
from mqs.errors import (
    BackendOutOfMemory,
    BackendUnavailable,
    Empty,
    Full,
    MessageDetached,
    MqsError,
    ProducerFlushError,
    ConsumerForked,
    ProducerForked,
    RequestTimeout,
    ShutDown,
    UnknownTopic,
)

__all__ = ["Broker", "Consumer", "Message", "Producer", "BACKENDS"]

logger = logging.getLogger(__name__)

# Backend name -> factory taking the Broker's keyword options.
BACKENDS: dict[str, Callable[..., Backend]] = {
    "memory": lambda clock=None, sample_every="default": MemoryBackend(
        clock=clock, sample_every=sample_every),
    "log": SharedLogBackend,
    "redis": lambda **options: _redis_backend(**options),
    "shm": ShmBackend,
}
_STARTS = ("earliest", "latest")
# The `Envelope` fields that a backend with `pickles_messages` pickles.
_PICKLED_FIELDS = ("body", "key", "headers", "dedup_id")
# Largest max_items of `Consumer.get_many`, as in `mqs.Queue.get_many`.
_MAX_ITEMS = 2**63 - 1
# Largest number of messages one fetch requests from a backend, because the
# topic core of the shm backend takes a 32-bit unsigned count. max_items
# is only an upper bound, so cutting a larger one to this loses nothing.
_MAX_FETCH = 2**32 - 1
# Largest limit of `dlq_list` that reaches a backend. The redis backend
# passes it to a Lua script, whose numbers are doubles, and from 2**63 - 1
# on the server rejects the rounded value. No dead-letter queue contains
# 2**53 letters, so cutting a larger limit to it returns the same list.
_MAX_DLQ_LIMIT = 2**53
# Classes of a timeout that the fast path of `Consumer.get` accepts as
# they are; `_seconds` checks any other value.
_NUMBERS = (int, float)


def _redis_backend(**options: Any) -> Backend:
    # Imported on use: redis-py is needed only by this backend.
    from mqs.broker._redis import RedisBackend

    # The lambda in BACKENDS takes any keyword, so `Broker.__init__`
    # cannot check the options against it; check them here instead.
    _check_backend_options("redis", RedisBackend, options)
    return RedisBackend(**options)


def _check_backend_options(backend: str, factory: Callable[..., Any],
                           options: dict[str, Any]) -> None:
    """Raise TypeError if `factory` cannot take `options`, before anything
    is opened. The message names the backend, the invalid option and the
    options that the backend accepts."""
    signature = inspect.signature(factory)
    try:
        signature.bind(**options)
    except TypeError as exc:
        problem = str(exc)
    else:
        return
    parameters = signature.parameters
    unknown = [name for name in options if name not in parameters]
    if unknown:
        problem = ("got an unexpected keyword argument "
                   if len(unknown) == 1 else
                   "got unexpected keyword arguments ")
        problem += ", ".join(repr(name) for name in unknown)
        guesses = difflib.get_close_matches(unknown[0], parameters, n=1)
        if guesses:
            problem += f" (did you mean {guesses[0]!r}?)"
    accepted = ", ".join(
        f"{name} (required)" if parameter.default is parameter.empty
        else name
        for name, parameter in parameters.items())
    raise TypeError(
        f"invalid options for backend={backend!r}: {problem}; the backend "
        f"accepts {accepted}; see help(mqs.Broker) for what each one sets")



def _another_thread_alive() -> bool:
    """Tell whether a thread that could still ack is alive: one other
    than the caller and mqs's own background threads (named "mqs-...")."""
    current = threading.current_thread()
    return any(thread is not current and thread.is_alive()
               and not thread.name.startswith("mqs-")
               for thread in threading.enumerate())


def _seconds(name: str, value: Any, *, allow_none: bool = True,
             allow_zero: bool = True, allow_inf: bool = True
             ) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a number of seconds, got "
            f"{type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        bound = "0 or more" if allow_zero else "above 0"
        raise ValueError(f"{name} must be {bound} seconds, got {value!r}")
    if math.isinf(value) and not allow_inf:
        # A deadline of inf cannot be scheduled on the timing wheel, and a
        # log or shm broker would replay the failing operation at every
        # open, so it is rejected before it reaches a backend.
        raise ValueError(
            f"{name} must be a finite number of seconds, got {value!r}")
    if not allow_inf:
        check_max_delay(name, value, value)
    return value


def _check_bool(name: str, value: Any) -> None:
    """Raise TypeError unless `value` is True or False.

    Any object has a truth value, so without this check a string from a
    config file such as "false" or "no" would switch the option on.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got "
                        f"{type(value).__name__} {value!r}")


def _required_seconds(name: str, value: Any, *, allow_zero: bool = True,
                      allow_inf: bool = True) -> float:
    seconds = _seconds(name, value, allow_none=False, allow_zero=allow_zero,
                       allow_inf=allow_inf)
    assert seconds is not None
    return seconds


def _time_left(deadline: float | None) -> float | None:
    """Return the seconds until the time.monotonic() `deadline` (at
    least 0), or None for no deadline."""
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def _delay_of(delay: Any, at: Any) -> float:
    """Return the delay in seconds that `delay` or `at` requests."""
    if delay is not None and at is not None:
        raise ValueError(
            f"pass delay or at, not both (got delay={delay!r}, at={at!r})")
    if at is None:
        return _seconds("delay", delay, allow_inf=False) or 0.0
    if isinstance(at, datetime.datetime):
        at = at.timestamp()
    elif isinstance(at, bool) or not isinstance(at, (int, float)):
        raise TypeError(
            f"at must be a datetime or time.time() seconds, got "
            f"{type(at).__name__} {at!r}")
    if not math.isfinite(at):
        raise ValueError(f"at must be a finite time, got {at!r}")
    delay = max(0.0, at - time.time())
    check_max_delay("at", delay, at)
    return delay


def _check_hashable(name: str, value: Any) -> None:
    """Raise TypeError unless `value` is None or hashable.

    The memory, shm and log backends keep keys and dedup ids in dicts,
    but redis with ``serializer="pickle"`` stores their pickle, so
    without this check only redis accepted an unhashable one.
    """
    if value is None:
        return
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"{name} must be hashable, got {type(value).__name__} "
            f"{value!r}; use a str, an int, or a tuple of those"
        ) from None


# Keyword options of one message, which `Broker._envelope` takes.
_MESSAGE_OPTIONS = ("priority", "delay", "at", "key", "headers", "dedup_id",
                    "reply_to", "correlation_id", "ttl")


def _check_options(call: str, options: Mapping[str, Any],
                   others: tuple[str, ...] = ()) -> None:
    """Raise TypeError naming `call` if `options` has a key that neither
    `_MESSAGE_OPTIONS` nor `others` (options `call` takes itself) lists."""
    unknown = [name for name in options if name not in _MESSAGE_OPTIONS]
    if not unknown:
        return
    accepted = _MESSAGE_OPTIONS + others
    problem = ", ".join(repr(name) for name in unknown)
    guesses = difflib.get_close_matches(unknown[0], accepted, n=1)
    hint = f" (did you mean {guesses[0]!r}?)" if guesses else ""
    raise TypeError(
        f"{call} got unexpected keyword argument(s) {problem}{hint}; it "
        f"accepts {', '.join(accepted)}")


def _fetch_limit(max_items: Any) -> int:
    """Return the number of messages a fetch of `max_items` may take.

    The rules match `mqs.Queue.get_many`: TypeError for a non-int,
    ValueError below 1 or above 2**63 - 1. Larger limits are cut to
    `_MAX_FETCH`, which every backend can take.
    """
    if isinstance(max_items, bool) or not isinstance(max_items, int):
        raise TypeError(
            f"max_items must be an int, got {type(max_items).__name__} "
            f"{max_items!r}")
    if max_items < 1:
        raise ValueError(f"max_items must be at least 1, got {max_items!r}")
    if max_items > _MAX_ITEMS:
        raise ValueError(
            f"max_items must be at most 2**63 - 1, got {max_items!r}")
    return min(max_items, _MAX_FETCH)


def _flush_error(failures: list[tuple[str, int, Exception | None]]
                 ) -> ProducerFlushError:
    """Return the error `Broker.close` raises for the batches its
    producers dropped: ``(topic, dropped, cause)`` each."""
    by_topic: dict[str, int] = {}
    for topic, dropped, _ in failures:
        by_topic[topic] = by_topic.get(topic, 0) + dropped
    total = sum(by_topic.values())
    causes = "; ".join(
        f"{topic!r}: {dropped} ({type(cause).__name__}: {cause})"
        for topic, dropped, cause in failures)
    error = ProducerFlushError(
        f"Broker.close dropped {total} buffered producer message(s) that "
        f"could not be published ({causes}); close the producers before "
        f"the broker to handle such errors", dropped=total,
        by_topic=by_topic)
    error.__cause__ = failures[0][2]
    return error


def _may_be_pickling_error(error: Exception) -> bool:
    """Return whether a backend's publish may have raised `error` while
    pickling a message: a body's ``__reduce__`` can raise any exception,
    but mqs's own errors (Full, UnknownTopic, BackendUnavailable, ...)
    come from the backend itself."""
    return not isinstance(error, MqsError)


def _unpicklable_error(topic: str, backend: str, field: str,
                       cause: Exception) -> TypeError:
    """Return the TypeError for a message to `topic` whose `field` failed
    to pickle with `cause`, which it chains."""
    error = TypeError(
        f"{field} of a message to topic {topic!r} cannot be pickled "
        f"({type(cause).__name__}: {cause}); the {backend} backend pickles "
        f"the {field}, so pass a picklable value, such as built-in types "
        f"or instances of module-level classes")
    error.__cause__ = cause
    return error


def _unpicklable_field(envelope: Envelope
                       ) -> tuple[str, Exception] | None:
    """Return the first field of `envelope` that fails to pickle, with
    the pickling error, or None if every field pickles."""
    for field in _PICKLED_FIELDS:
        value = getattr(envelope, field)
        if value is None:
            continue
        try:
            pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # whatever pickling raised
            return field, exc
    return None


def _fast_path(backend: Backend, name: str) -> Callable[..., Any] | None:
    """Return the bound method `name` of `backend` if its class overrides
    `Backend`'s default, which only returns None."""
    if getattr(type(backend), name) is getattr(Backend, name):
        return None
    method: Callable[..., Any] = getattr(backend, name)
    return method


class Message(MessageBase):
    """One delivered message; `ack` or `nack` it once.

    Attributes
    ----------
    body : object
        The published body. The memory backend hands every group the
        same object, not a copy.
    id : str
        Message id, unique in its topic.
    topic, group : str
        Where it came from.
    priority : int
        The priority it was published with (0-9).
    attempts : int
        Deliveries of this message to its group, this one included.
    key : object
        The ordering key it was published with, or None.
    headers : dict
        Published headers (dead letters add ``mqs.*`` headers).
    timestamp : float
        Publish time in `time.time()` seconds.
    reply_to, correlation_id : str or None
        Set on requests made with `Broker.request`.

    Notes
    -----
    `copy.copy`, `copy.deepcopy` and `pickle` make a detached copy: it
    has every attribute above (deepcopy copies the body and headers too)
    but no consumer, so its `ack`, `nack`, `extend` and `reply` raise
    `MessageDetached`. Settle the original message, which stays in the
    process that got it. A copy never settles the delivery, even in the
    same process: two objects that could settle one delivery would race
    on which one does. `Broker.reply` accepts a copy.

    The fields and `ack` live in C (`mqs._topiccore.MessageBase`), because
    they run for every message; ``Message(consumer, delivery, settled)``
    builds one from a backend's `Delivery`.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return (f"<mqs.Message {self.topic}/{self.id} priority="
                f"{self.priority} attempts={self.attempts} body="
                f"{self.body!r:.60}>")

    def nack(self, requeue: bool = True, delay: float | None = None, *,
             error: BaseException | str | None = None) -> bool:
        """Reject the message: retry it later or dead-letter it.

        Parameters
        ----------
        requeue : bool
            True: deliver it again, unless it was delivered `max_attempts`
            times, which dead-letters it. False: dead-letter it now.
        delay : float, optional
            Seconds before it is ready again. None uses the topic's
            `retry` backoff (no delay without one); 0 means at once.
        error : exception or str, optional
            Stored as the ``mqs.last_error`` header if it dead-letters.

        Returns
        -------
        bool
            False if the ack deadline had passed already (see `ack`).

        Raises
        ------
        AlreadySettled
            If the message was acked or nacked before.
        ShutDown, ConnectionError, ...
            The backend's error when the nack failed. The message stays
            unsettled then, so the nack (or an ack) can be tried again.

        Notes
        -----
        Requeue position: a message ready again (at once, or after its
        delay) joins the tail of its priority lane, behind the messages
        already waiting there. A message with a key keeps its place at the
        head of its key, so later messages of that key still wait for it.
        """
        _check_bool("requeue", requeue)
        delay = _seconds("delay", delay, allow_inf=False)
        if error is not None and not isinstance(error, str):
            error = f"{type(error).__name__}: {error}"
        if self._consumer is not None:
            self._consumer._check_process("Message.nack")
        self._settle("nack")
        consumer = self._consumer
        try:
            return consumer._backend.nack(consumer.topic, consumer.group,
                                          self._delivery.tag,
                                          requeue=requeue, delay=delay,
                                          error=error)
        except BaseException:
            # The nack failed, so the message stays unsettled (see `ack`).
            self._settled = False
            raise

    def extend(self, seconds: float) -> bool:
        """Move the ack deadline to `seconds` from now (not from the old
        deadline); return False if it had passed already."""
        seconds = _required_seconds("seconds", seconds, allow_zero=False,
                                    allow_inf=False)
        self._check_attached("extend")
        self._consumer._check_process("Message.extend")
        if self._settled:
            return False
        consumer = self._consumer
        return consumer._backend.extend(consumer.topic, consumer.group,
                                        self._delivery.tag, seconds)

    def reply(self, body: Any, **options: Any) -> bool:
        """Publish `body` as the reply to a `Broker.request`; see
        `Broker.reply`."""
        if self._consumer is None:
            raise MessageDetached(
                f"message {self.id} of topic {self.topic!r} is a copy (made "
                f"by copy, deepcopy or pickle) and has no broker; reply "
                f"to it with broker.reply(message, body)")
        return self._consumer._broker.reply(self, body, **options)


class Consumer:
    """Messages of one topic for one consumer of a group.

    Create with `Broker.consume`. Competing consumers of one group share
    its messages; each group gets every message. Thread-safe: several
    threads may call `get` on one consumer. A consumer belongs to the
    process that opened it: in a forked child its calls, and `ack`,
    `nack` and `extend` of the messages it delivered, raise
    `ConsumerForked`.
    """

    def __init__(self, broker: Broker, topic: str, group: str, *,
                 prefetch: int, ack_timeout: float, auto_ack: bool,
                 start: str, max_attempts: int | None) -> None:
        self._broker = broker
        self._backend = broker._backend
        self.topic = topic
        self.group = group
        self.prefetch = prefetch
        self.ack_timeout = ack_timeout
        self.auto_ack = auto_ack
        self._closed = False
        # A consumer whose count differs was opened by a parent process
        # (see `_check_process`).
        self._fork_count = fork_count()
        self._pid = os.getpid()
        self._id = self._backend.open_consumer(
            topic, group, start=start, prefetch=prefetch,
            max_attempts=max_attempts, ack_timeout=ack_timeout)
        self._read_one: Callable[[float, bool], Message | None] | None = \
            self._backend.message_reader(self, Message)
        # A reader that can also wait for a message (`CoreReader`).
        self._wait_read: Callable[[float, bool, float], Message | None] \
            | None = getattr(self._read_one, "wait_read", None)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"<mqs.Consumer {self.topic!r} group={self.group!r} "
                f"prefetch={self.prefetch} {state}>")

    def __reduce__(self) -> Any:
        raise TypeError(
            f"{self!r} cannot be pickled, because a consumer belongs to "
            f"the process that opened it; "
            f"{_reopen_hint(self._backend)}, then call "
            f"broker.consume({self.topic!r}, {self.group!r}) there")

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def forked(self) -> bool:
        """True in a process forked from the one that opened this."""
        return self._fork_count != fork_count()

    def _check_process(self, call: str) -> None:
        """Raise `ConsumerForked` in a forked child: the consumer and its
        in-flight messages belong to the process that opened it."""
        if self._fork_count != fork_count():
            raise ConsumerForked(
                f"{call} in process {os.getpid()}, but the consumer of "
                f"topic {self.topic!r} and group {self.group!r} belongs to "
                f"process {self._pid}, which this process was forked from; "
                f"open a consumer in this process with broker.consume"
                f"({self.topic!r}, {self.group!r})")

    @property
    def in_flight(self) -> int:
        """Messages this consumer got and has not acked or nacked yet."""
        self._check_process("Consumer.in_flight")
        return self._backend.in_flight(self.topic, self.group, self._id)

    def ack_many(self, messages: Iterable[Message]) -> int:
        """Acknowledge messages of this consumer in one backend call.

        Returns how many were acked in time: the others came after their
        ack deadline (counted as ``late_acks``, see `Message.ack`). With
        ``auto_ack=True`` this does nothing and returns the count.

        Raises
        ------
        TypeError
            If an item is not a `Message`.
        ValueError
            If a message came from another consumer or appears twice.
        AlreadySettled
            If a message was acked or nacked before; then none is acked.
        ShutDown, ConnectionError, ...
            The backend's error when the ack failed. The messages stay
            unsettled then, so the ack can be tried again.
        """
        self._check_process("Consumer.ack_many")
        batch = list(messages)
        seen = set()
        for message in batch:
            if not isinstance(message, Message):
                raise TypeError(
                    f"ack_many takes Message objects received from this "
                    f"consumer, got {type(message).__name__} {message!r}")
            message._check_attached("ack")
            if message._consumer is not self:
                raise ValueError(
                    f"message {message.id} came from another consumer; "
                    f"ack it with its own consumer")
            if id(message) in seen:
                raise ValueError(
                    f"message {message.id} appears twice in ack_many")
            seen.add(id(message))
        if self.auto_ack:
            return len(batch)
        for message in batch:
            if message._settled:
                message._settle("ack")
        for message in batch:
            message._settled = True
        try:
            done = self._backend.ack_many(
                self.topic, self.group,
                [message._delivery.tag for message in batch])
        except BaseException:
            # The ack failed, so the messages stay unsettled and a retry
            # may ack them.
            for message in batch:
                message._settled = False
            raise
        return sum(done)

    def _wrap(self, found: list[Delivery]) -> list[Message]:
        return [Message(self, delivery, self.auto_ack) for delivery in found]

    def _check_open(self) -> None:
        if self._closed:
            raise ShutDown(
                f"get on a closed consumer of topic {self.topic!r}")

    def get_many(self, max_items: int, timeout: float | None = None
                 ) -> list[Message]:
        """Return 1 to `max_items` messages, waiting up to `timeout`.

        At most ``prefetch - in_flight`` messages come back without
        `auto_ack`: while the consumer holds `prefetch` unacknowledged
        messages it waits for an ack, a nack or a missed ack deadline.

        A message whose body fails to unpickle is logged (with its topic
        and id) and left out of the batch; it stays in flight as in
        `get`, so the other messages still come back.

        Raises
        ------
        Empty
            When nothing arrived within `timeout` (never earlier).
        ShutDown
            When the consumer is or gets closed.
        MessageDecodeError
            When no message of the fetched batch unpickles (see `get`).
        TypeError
            If `max_items` is not an int.
        ValueError
            If `max_items` is below 1 or above 2**63 - 1.
        """
        max_items = _fetch_limit(max_items)
        timeout = _seconds("timeout", timeout)
        self._check_process("Consumer.get_many")
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            found = self._backend.fetch(
                self.topic, self.group, self._id, max_items,
                ack_timeout=self.ack_timeout, auto_ack=self.auto_ack,
                timeout=timeout)
        except UnknownTopic:
            if not self._broker._declare_lost(self.topic):
                raise
            found = self._backend.fetch(
                self.topic, self.group, self._id, max_items,
                ack_timeout=self.ack_timeout, auto_ack=self.auto_ack,
                timeout=_time_left(deadline))
        if not found:
            raise Empty()
        return self._wrap(found)

    def get(self, timeout: float | None = None) -> Message:
        """Return the next message, waiting up to `timeout` seconds.

        Raises `Empty` on timeout and `ShutDown` once closed. A body that
        fails to unpickle raises `MessageDecodeError` (with its topic,
        message id and the unpickling error as ``__cause__``), but its
        message stays in flight: it is delivered again after its ack
        deadline, and dead-lettered (reason ``"ack_timeout"``) after
        `max_attempts`. Without `max_attempts` it comes back forever.
        """
        if (self._read_one is not None and not self._closed
                and self._fork_count == fork_count()
                and (timeout is None or (timeout.__class__ in _NUMBERS
                                         and timeout >= 0))):
            # A message that is ready now needs no wait, so only the
            # timeout is checked first.
            if self._wait_read is None:
                message = self._read_one(self.ack_timeout, self.auto_ack)
            else:
                # Waits for a message without the Python path below;
                # None leaves the case (or the time left) to it.
                started = time.monotonic()
                message = self._wait_read(
                    self.ack_timeout, self.auto_ack,
                    -1.0 if timeout is None else timeout)
                if message is None and timeout is not None:
                    timeout = max(0.0, timeout - (time.monotonic() - started))
            if message is not None:
                return message
        self._check_process("Consumer.get")
        return self.get_many(1, timeout)[0]

    async def get_many_async(self, max_items: int,
                             timeout: float | None = None) -> list[Message]:
        """Like `get_many`, awaiting without blocking the event loop."""
        max_items = _fetch_limit(max_items)
        timeout = _seconds("timeout", timeout)
        self._check_process("Consumer.get_async")
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            found = await self._backend.fetch_async(
                self.topic, self.group, self._id, max_items,
                ack_timeout=self.ack_timeout, auto_ack=self.auto_ack,
                timeout=timeout)
        except UnknownTopic:
            if not await self._backend.run_blocking(
                    self._broker._declare_lost, self.topic):
                raise
            found = await self._backend.fetch_async(
                self.topic, self.group, self._id, max_items,
                ack_timeout=self.ack_timeout, auto_ack=self.auto_ack,
                timeout=_time_left(deadline))
        if not found:
            raise Empty()
        return self._wrap(found)

    async def get_async(self, timeout: float | None = None) -> Message:
        """Like `get`, awaiting without blocking the event loop.

        Cancelling the await loses no message: a message is taken only in
        the same step that returns it.
        """
        return (await self.get_many_async(1, timeout))[0]

    def __iter__(self) -> Consumer:
        return self

    def __next__(self) -> Message:
        try:
            return self.get()
        except ShutDown:
            raise StopIteration from None

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.get_async()
        except ShutDown:
            raise StopAsyncIteration from None

    def close(self, drain: bool = True, timeout: float | None = None) -> int:
        """Stop consuming; return how many in-flight messages went back.

        With `drain` (the default), wait up to `timeout` seconds for the
        messages already handed out to be acked or nacked by other
        threads. None waits up to `ack_timeout`, because by then an
        unacked message is due for redelivery anyway, and a thread that
        closes its own unacked messages would otherwise wait forever.
        When no other thread of the program is alive (mqs's own
        background threads aside), nothing could settle a message during
        the wait, so there is none.
        Then, or at once without `drain`, every message still in flight
        goes back to the group for redelivery, with its attempt counted.
        On redis, messages that a cancelled `get_async` took under
        `auto_ack` and no later get returned go back too, unseen, and
        count in the result. Later `get` calls raise `ShutDown` and
        iteration stops. Closing twice does nothing. In a process
        forked from the one that opened the consumer it raises
        `ConsumerForked` and closes nothing.
        """
        _check_bool("drain", drain)
        timeout = _seconds("timeout", timeout)
        self._check_process("Consumer.close")
        if self._closed:
            return 0
        self._closed = True
        if timeout is None:
            # NOTE: a message that another thread extended past this bound
            # goes back to the group too; its later ack counts as late.
            timeout = self.ack_timeout
        if drain and _another_thread_alive():
            deadline = None if timeout is None else time.monotonic() + timeout
            while self.in_flight:
                left = 0.05 if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    break
                self._backend.wait_changed(min(left, 0.05))
        returned = self._backend.close_consumer(self.topic, self.group,
                                                self._id)
        if returned:
            logger.debug("consumer of %r/%r closed with %d messages in "
                         "flight; they go back to the group", self.topic,
                         self.group, returned)
        return returned

    async def close_async(self, drain: bool = True,
                          timeout: float | None = None) -> int:
        """Like `close`, awaiting the drain without blocking the loop."""
        _check_bool("drain", drain)
        timeout = _seconds("timeout", timeout)
        self._check_process("Consumer.close_async")
        if self._closed:
            return 0
        self._closed = True
        if timeout is None:
            timeout = self.ack_timeout
        # On redis, each call waits on the network.
        run = self._backend.run_blocking
        if drain:
            deadline = None if timeout is None else time.monotonic() + timeout
            while await run(self._backend.in_flight, self.topic, self.group,
                            self._id):
                left = 0.05 if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    break
                await self._backend.wait_changed_async(min(left, 0.05))
        return await run(self._backend.close_consumer, self.topic,
                         self.group, self._id)

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# Batchers of this process whose buffered messages `_flush_at_exit`
# publishes; weak, so that a closed producer is not kept.
_batchers: weakref.WeakSet[_Batcher] = weakref.WeakSet()
_exit_hook_lock = threading.Lock()
_exit_hook_registered = False
# Maximum wait of an idle background thread before it checks whether its
# `Producer` was garbage-collected (when the finalizer could not wake it).
_IDLE_WAIT_S = 1.0
# Maximum time the exit hook waits for all producers together: for a
# background publish to finish and for room in a full topic.
_EXIT_TIMEOUT_S = 10.0
# Minimum seconds between the tries of a background send while the
# backend's server is out of memory (BackendOutOfMemory). Memory comes
# back only when consumers or an operator act, so trying every linger
# (5 ms by default) would only load the server.
_OUT_OF_MEMORY_RETRY_S = 0.5

def _register_exit_hook() -> None:
    """Register `_flush_at_exit` with atexit, once per process.

    Registered at the first producer rather than at import, because
    atexit runs its hooks last in, first out: this one then runs before
    the hooks registered earlier, such as the one that stops a
    `mqs._redis_server.RedisServer`.
    """
    global _exit_hook_registered
    with _exit_hook_lock:
        if not _exit_hook_registered:
            atexit.register(_flush_at_exit)
            _exit_hook_registered = True


def _flush_at_exit() -> None:
    """Publish the buffered messages of every producer of this process."""
    deadline = time.monotonic() + _EXIT_TIMEOUT_S
    for batcher in list(_batchers):
        # A forked child inherits copies of its parent's batches, which
        # the parent publishes itself.
        if not batcher.forked:
            left = max(0.0, deadline - time.monotonic())
            batcher.shut("the interpreter exited", timeout=left)


def _power_of_ten(number: int) -> bool:
    """Return whether `number` is 1, 10, 100 ..."""
    while number >= 10 and number % 10 == 0:
        number //= 10
    return number == 1


class _Batcher:
    """The buffer, lock and background thread of one `Producer`.

    The thread references this object and never the `Producer`, so a
    producer dropped without `close` is garbage-collected. Its finalizer
    calls `orphan`, and the thread then publishes the batch and ends.
    """

    def __init__(self, broker: Broker, topic: str, *, linger: float,
                 batch_size: int, timeout: float | None) -> None:
        self.broker = broker
        self.topic = topic
        self.linger = linger
        self.batch_size = batch_size
        self.timeout = timeout
        self.pid = os.getpid()
        # A `_Batcher` whose count differs was created by a parent process.
        self._fork_count = fork_count()
        self.dropped = 0
        self._batch: list[Envelope] = []
        self._batch_started = 0.0
        self._ids: list[str] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._orphaned = False
        self._thread: threading.Thread | None = None
        # Messages of the publish call in progress, for the count of a
        # `shut` that cannot wait for it.
        self._sending = 0
        # Sends by the background thread that failed in a row.
        self._failed_sends = 0
        _batchers.add(self)
        _register_exit_hook()

    @property
    def forked(self) -> bool:
        """True in a process forked from the one that created this."""
        return self._fork_count != fork_count()

    def check_process(self, call: str) -> None:
        """Raise `ProducerForked` in a forked child, before any lock is
        taken: the child's copy of `_lock` may have been held at the
        fork, and its batch belongs to the parent."""
        if self.forked:
            raise ProducerForked(
                f"Producer.{call} in process {os.getpid()}, but the "
                f"producer of {self.topic!r} belongs to process "
                f"{self.pid}, which this process was forked from; create "
                f"a producer in this process with broker.producer"
                f"({self.topic!r})")

    def publish(self, envelope: Envelope) -> None:
        with self._lock:
            self._raise_error()
            if self._closed:
                raise ShutDown(f"publish on a closed producer of "
                               f"{self.topic!r}")
            if not self._batch:
                self._batch_started = time.monotonic()
            self._batch.append(envelope)
            if len(self._batch) >= self.batch_size or self.linger == 0:
                self._send_locked(sender=envelope)
            elif len(self._batch) == 1:
                self._start_thread()
                self._wake.notify()

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"mqs-producer-{self.topic}",
                daemon=True)
            self._thread.start()

    def _run(self) -> None:
        with self._lock:
            while not self._closed:
                if self._orphaned:
                    self._shut_locked("its Producer was garbage-collected")
                    return
                if not self._batch:
                    self._wake.wait(_IDLE_WAIT_S)
                    continue
                # Loop after every wake: the batch may have been sent by a
                # full publish or a flush meanwhile, and a new one started.
                left = self._batch_started + self.linger - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                try:
                    self._send_locked()
                except Exception as exc:  # reported to the caller
                    self._failed_sends += 1
                    pause = self.linger
                    if isinstance(exc, BackendOutOfMemory):
                        pause = max(pause, _OUT_OF_MEMORY_RETRY_S)
                    # The traceback once per run of failures, then a
                    # count at powers of ten: a send retried every
                    # linger would flood the log.
                    if self._failed_sends == 1:
                        logger.warning(
                            "producer of %r failed to send a batch; it "
                            "tries again every %g s", self.topic,
                            pause, exc_info=True)
                    elif _power_of_ten(self._failed_sends):
                        logger.warning(
                            "producer of %r failed to send a batch %d "
                            "times in a row: %s", self.topic,
                            self._failed_sends, exc)
                    self._error = exc
                    # The loop waits until linger after the batch start.
                    self._batch_started = \
                        time.monotonic() + pause - self.linger
                    continue
                if self._failed_sends:
                    logger.info("producer of %r sent its batch after %d "
                                "failed tries", self.topic,
                                self._failed_sends)
                    self._failed_sends = 0
                    # Sent after all: nothing is left for the caller to
                    # hear about.
                    self._error = None

    def _send_locked(self, timeout: float | None = None,
                     sender: Envelope | None = None) -> None:
        """Publish the batch, waiting up to `timeout` seconds on a full
        topic (None: the producer's `timeout`).

        `sender` is the message of the `publish` call that sends the
        batch. If the send raises, `sender` leaves the batch, because a
        publish that raises has not kept its message, while the earlier
        messages stay for the next try. Messages that fail to pickle are
        dropped and the rest are sent (see `_drop_unpicklable`).
        """
        sender_error: BaseException | None = None
        while self._batch:
            batch, self._batch = self._batch, []
            self._sending = len(batch)
            try:
                self._ids += self.broker._backend_publish(
                    self.topic, batch, self.timeout if timeout is None
                    else timeout)
            except BaseException as exc:
                unsent = batch[getattr(exc, "accepted", 0):]
                kept, pickling_error = self._drop_unpicklable(
                    unsent, exc, sender)
                sender_error = sender_error or pickling_error
                if len(kept) < len(unsent):
                    # Only messages that would fail every retry left the
                    # batch, so the rest go out at once.
                    self._batch = kept + self._batch
                    continue
                if sender is not None:
                    kept = [envelope for envelope in kept
                            if envelope is not sender]
                self._batch = kept + self._batch
                if sender is not None and isinstance(exc, Full):
                    raise self._sender_full(exc) from exc
                raise
            finally:
                self._sending = 0
        if sender_error is not None:
            raise sender_error

    def _sender_full(self, error: Full) -> Full:
        """Return the `Full` that `Producer.publish` raises for `error`,
        of the same class."""
        text = (f"{error} (Producer.publish did not keep this message, so "
                f"publish it again to retry it; {len(self._batch)} earlier "
                f"message(s) stay buffered and go out with the next send)")
        if isinstance(error, BackendOutOfMemory):
            return BackendOutOfMemory(text, topic=error.topic)
        return Full(text)

    def _drop_unpicklable(self, unsent: list[Envelope], error: BaseException,
                          sender: Envelope | None
                          ) -> tuple[list[Envelope], TypeError | None]:
        """Return the messages of `unsent` that a later send may publish,
        and the error for `sender` if it fails to pickle.

        A message that fails to pickle would fail every retry and hold
        back the batch. `Broker._backend_publish` turns any exception
        raised while pickling into TypeError, so after one every message
        is checked. Those that fail are dropped: `sender` with the error
        for its `publish` call to raise, and any other, which an earlier
        `publish` accepted, counted in `dropped` and logged.
        """
        if not (isinstance(error, TypeError)
                and self.broker._backend.pickles_messages):
            return unsent, None
        kept = []
        sender_error = None
        lost = 0
        for envelope in unsent:
            failure = _unpicklable_field(envelope)
            if failure is None:
                kept.append(envelope)
            elif envelope is sender:
                sender_error = _unpicklable_error(
                    self.topic, self.broker._backend.name, *failure)
            else:
                lost += 1
                field, cause = failure
                logger.warning(
                    "producer of %r dropped a buffered message whose %s "
                    "cannot be pickled (%s: %s)", self.topic, field,
                    type(cause).__name__, cause)
        self.dropped += lost
        return kept, sender_error

    def flush(self) -> list[str]:
        with self._lock:
            self._raise_error()
            if self._batch:
                self._send_locked()
            ids, self._ids = self._ids, []
            return ids

    def close(self) -> list[str]:
        ids = self.flush()
        with self._lock:
            self._closed = True
            self._wake.notify()
        self._join()
        return ids

    def shut(self, reason: str, timeout: float | None = None
             ) -> tuple[int, Exception | None]:
        """Publish the buffered messages, dropping them if that fails, and
        stop; return how many were dropped and the error that caused it.

        `reason` completes the log message "... when <reason>".
        `timeout` bounds the wait for a background publish in progress
        and for room in a full topic; None waits as `flush` does.
        In a forked child it does nothing and returns ``(0, None)``,
        because the batch belongs to the parent, which publishes it.
        """
        if self.forked:
            return 0, None
        if not self._lock.acquire(timeout=-1 if timeout is None
                                  else timeout):
            # Another thread is still in a publish of this producer,
            # which may take the messages later or not at all.
            lost = len(self._batch) + self._sending
            self.dropped += lost
            logger.warning(
                "producer of %r was still publishing when %s; %d buffered "
                "message(s) may be lost", self.topic, reason, lost)
            return lost, None
        try:
            result = self._shut_locked(reason, timeout)
        finally:
            self._lock.release()
        self._join()
        return result

    def _shut_locked(self, reason: str, timeout: float | None = None
                     ) -> tuple[int, Exception | None]:
        # A background send error was logged when it happened; the send
        # below tries its messages once more.
        self._error = None
        error = None
        if timeout is not None and self.timeout is not None:
            timeout = min(timeout, self.timeout)
        if self._batch and not self._closed:
            try:
                self._send_locked(timeout)
            except Exception as exc:
                error = exc
        dropped = len(self._batch)
        if dropped:
            self._batch = []
            self.dropped += dropped
            logger.warning(
                "producer of %r dropped %d buffered message(s) that could "
                "not be published when %s", self.topic, dropped, reason,
                exc_info=error)
        self._closed = True
        self._wake.notify()
        return dropped, error

    def _join(self) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def orphan(self) -> None:
        """Make the background thread publish the batch and end; called
        when the `Producer` is garbage-collected."""
        if self.forked:
            # The parent publishes the batch, and the child has no thread.
            return
        self._orphaned = True
        # Not blocking: a finalizer may run in any thread at any point,
        # and the background thread holds the lock while it publishes.
        # When the lock is taken, the thread reads the flag at its next
        # wake (at most _IDLE_WAIT_S later).
        if self._lock.acquire(blocking=False):
            try:
                if self._batch and not self._closed:
                    self._start_thread()
                self._wake.notify()
            finally:
                self._lock.release()


class Producer:
    """A batching publisher to one topic: `linger` and `batch_size`.

    `publish` buffers messages; a batch goes to the backend in one call
    once it holds `batch_size` messages, or `linger` seconds after its
    first message (sent by a background thread), or on `flush`/`close`.
    Errors of a background send are raised by the next `publish`,
    `flush` or `close`, unless a later background send of the batch
    succeeded first. The background thread tries again every `linger`
    seconds and logs the first failure with its traceback, then a count
    at 10, 100 ... failures in a row. The messages of a failed batch
    that the topic did not take are kept for the next try. The ids of the ones it took before
    the error are not returned by `flush`.

    A `publish` that raises has not kept its message: the caller owns the
    retry, and a retry publishes the message once. This holds for a send
    that the publish triggers (`Full` with ``when_full="raise"``, or
    after `timeout`) and for the error of an earlier background send that
    it raises. The messages of earlier `publish` calls stay buffered.

    A message whose body, key or headers fail to pickle (on a backend
    that pickles them) would fail every send, so it is dropped and the
    rest of its batch is sent. If the `publish` call of that message
    sends the batch, it raises TypeError. Otherwise the message was
    accepted earlier, so the producer logs a warning and counts it in
    `dropped`.

    Parameters
    ----------
    linger : float
        Seconds a batch waits for more messages, from 0 (send at once) to
        `mqs.MAX_DELAY_SECONDS`.
    batch_size : int
        Messages that make a batch go out at once, 1 or more.
    timeout : float, optional
        Bound in seconds of a send's wait for room in a full topic that
        blocks (None: no bound).

    Notes
    -----
    Buffered messages are published, not lost, in these cases too:

    - `Broker.close` publishes the batch of every open producer of the
      broker first.
    - A producer dropped without `close` is garbage-collected, and its
      background thread then publishes its batch and ends.
    - At the exit of the interpreter (an atexit hook) every producer of
      the process publishes its batch. The hook waits at most 10 s in
      total for publishes in progress and for room in full topics. A
      process that ends through ``os._exit``, a signal or SIGKILL loses
      what its producers buffer.

    In these cases nobody can retry a failed publish, so the producer
    drops the messages it could not publish, logs a warning and counts
    them in `dropped`. `Broker.close` raises `ProducerFlushError` after
    such a drop.

    A producer belongs to the process that created it. In a forked child,
    `publish`, `flush`, `close` and ``with`` raise `ProducerForked`
    (create a producer in the child instead), and `Broker.close` and the
    exit hook leave the parent's batch alone.
    """

    def __init__(self, broker: Broker, topic: str, *, linger: float,
                 batch_size: int, timeout: float | None) -> None:
        # The cap keeps the background thread's wait within
        # threading.TIMEOUT_MAX, past which Condition.wait raises
        # OverflowError.
        linger = _required_seconds("linger", linger, allow_inf=False)
        timeout = _seconds("timeout", timeout)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) \
                or batch_size < 1:
            raise ValueError(
                f"batch_size must be an int of 1 or more, got {batch_size!r}")
        self._batcher = _Batcher(broker, topic, linger=linger,
                                 batch_size=batch_size, timeout=timeout)
        # Exit is left to `_flush_at_exit`, which also covers producers
        # that are still referenced.
        finalizer = weakref.finalize(self, self._batcher.orphan)
        finalizer.atexit = False

    def __repr__(self) -> str:
        return (f"<mqs.Producer {self.topic!r} linger={self.linger} "
                f"batch_size={self.batch_size}>")

    def __reduce__(self) -> Any:
        raise TypeError(
            f"{self!r} cannot be pickled, because a producer belongs to "
            f"the process that created it; "
            f"{_reopen_hint(self._batcher.broker.backend)}, then call "
            f"broker.producer({self.topic!r}) there")

    @property
    def topic(self) -> str:
        return self._batcher.topic

    @property
    def linger(self) -> float:
        return self._batcher.linger

    @property
    def batch_size(self) -> int:
        return self._batcher.batch_size

    @property
    def timeout(self) -> float | None:
        return self._batcher.timeout

    @property
    def closed(self) -> bool:
        return self._batcher._closed

    @property
    def dropped(self) -> int:
        """Buffered messages dropped because they could not be published
        when the broker closed, the interpreter exited or the producer
        was garbage-collected (see Notes), or because they failed to
        pickle after their `publish` call returned."""
        return self._batcher.dropped

    def publish(self, body: Any, **options: Any) -> None:
        """Buffer one message; options as in `Broker.publish`.

        Raises
        ------
        Full
            When the send that this call triggers finds the topic full.
            The message was not kept, so publish it again to retry.
        TypeError
            For an unknown option, or when the send that this call
            triggers cannot pickle the message, which is not kept.
        """
        self._batcher.check_process("publish")
        _check_options("Producer.publish", options)
        broker = self._batcher.broker
        envelope = broker._envelope(body, **options)
        broker._check_due_before_expiry(self._batcher.topic, envelope)
        self._batcher.publish(envelope)

    def flush(self) -> list[str]:
        """Send the buffered messages now; return the ids sent since the
        last `flush` (including background sends)."""
        self._batcher.check_process("flush")
        return self._batcher.flush()

    def close(self) -> list[str]:
        """Flush and stop the background thread; return as `flush`.

        If the flush raises, the producer stays open with the messages
        the topic did not take, so a later `close` can try again.
        """
        self._batcher.check_process("close")
        return self._batcher.close()

    def __enter__(self) -> Producer:
        self._batcher.check_process("__enter__")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _reopen_hint(backend: Backend) -> str:
    """Return how another process opens the broker of `backend`."""
    name = backend.name
    if name == "shm":
        where = f"name={getattr(backend, 'shm_name', '...')!r}"
    elif name == "log":
        where = f"path={getattr(backend, 'path', '...')!r}"
    elif name == "redis":
        # The URL without its password, so it is safe in a message.
        return (f"open mqs.Broker(backend='redis', url=URL) in that "
                f"process, with the URL of {getattr(backend, 'url', '')}")
    elif name == "memory":
        return ("a memory broker serves only the threads of one process, "
                "so open an shm or log broker in each process instead")
    else:
        return f"open a broker of the {name!r} backend in that process"
    return f"open mqs.Broker(backend={name!r}, {where}) in that process"


class Broker:
    """Topics with priority lanes, acks, retries, dead letters and groups.

    Parameters
    ----------
    backend : str or Backend
        Where the broker keeps its state, and so who shares it:

        - ``"memory"``: the threads of this process.
        - ``"shm"``: every process on this machine that passes the same
          ``name=``. The state stays in /dev/shm until `unlink` (see
          `mqs.broker._shm`).
        - ``"log"``: every process on this machine that passes the same
          ``path=``, durable in that log directory (see
          `mqs.broker._log_shared`). With ``fsync="always"`` a publish
          returns after a sync that covers it, so it survives a power
          loss. An ack (or nack, or auto_ack delivery) returns before its
          sync: SIGKILL of any process loses none, but a power loss may
          undo the acks of the last ``fsync_interval_s`` (50 ms by
          default) at most, and those messages are delivered again with
          ``attempts + 1``, unless ``sync_acks=True``.
        - ``"redis"``: processes on any host, through a Redis server
          (``url=``; see `mqs.broker._redis`).

        A `Backend` instance is used as it is, and takes no `options`.
    auto_declare : bool
        Declare an unknown topic with default settings on its first
        `publish` or `consume`. False raises `UnknownTopic` instead.
    **options
        Options of the chosen backend, described under Other Parameters.
        Another option, or a missing required one, raises TypeError that
        names the options the backend accepts.

        - ``"memory"``: `clock`, `sample_every`.
        - ``"shm"``: `name` (required), `journal_bytes`.
        - ``"log"``: `path` (required), `fsync`, `fsync_interval_s`,
          `segment_bytes`, `compact_bytes`, `sample_every`,
          `journal_bytes`, `sync_acks`.
        - ``"redis"``: `url`, `serializer`, `namespace`,
          `socket_timeout`, `retry_timeout`, `connect_retry_timeout`,
          `stream_maxlen`, `client`, `sample_every`.

    Other Parameters
    ----------------
    clock : callable, default None
        Monotonic clock in seconds of the memory backend; None means
        `time.monotonic`. Tests pass a simulated one and call with
        ``timeout=0``.
    sample_every : int, None or "default", default "default"
        Sample the latencies of one delivery in this many per group
        (see `group_stats`). None turns sampling off. "default" reads
        `mqs.metrics.default_sample_every()` when the broker opens, which
        is what the shm backend always does.
    name : str
        Name of the shm broker. Processes that pass the same name share
        it.
    journal_bytes : int, default 16777216
        Size in bytes of the shared journal (shm and log backends) when
        this call creates it: a multiple of 8 from 4096 to 2**31. An
        existing journal keeps its size. A larger journal means rarer
        snapshots.
    path : str or os.PathLike
        Directory of the log broker, created (mode 0700) if missing.
    fsync : {"interval", "always", "never"}, default "interval"
        When the log broker's records reach the device. "always": a
        publish returns after a sync that covers it. "interval": a
        record is synced at most `fsync_interval_s` after it is written.
        "never": a power loss may lose what no snapshot or close synced.
        Every mode survives SIGKILL of any process.
    fsync_interval_s : float, default 0.05
        Max age in seconds of an unsynced record of the log broker under
        "interval", and of an unsynced ack under "always".
    segment_bytes : int, default 16777216
        Size in bytes of each log segment file, a multiple of 4096. A
        publish batch is split into records of at most half a segment,
        and one message that does not fit raises `MessageTooLarge`.
    compact_bytes : int, default 67108864
        Bytes of log records written after the last snapshot that
        trigger a new snapshot.
    sync_acks : bool, default False
        Under ``fsync="always"``, make acks, nacks and auto_ack
        deliveries of the log broker wait for a sync that covers them,
        as publishes do. True with another `fsync` mode raises
        ValueError, because acks in those modes never wait for a sync.
    url : str, default None
        Redis server: ``redis://[user:password@]host:port/db``, or
        ``rediss://`` for TLS, with redis-py's TLS settings in the query
        string (``?ssl_ca_certs=/etc/ca.pem``). Required unless `client`
        is given: the backend never guesses a server.
    serializer : None or "pickle", default None
        Bodies on Redis. None: bytes or str only. "pickle": any picklable
        body, header or key. Use it only when every client that can
        write to the server is trusted.
    namespace : str, default "mqs"
        First part of every Redis key. Brokers with different namespaces
        on one server do not see each other. It cannot contain braces or
        colons.
    socket_timeout : float, default 5.0
        Seconds a Redis command may wait for its reply, unless less of
        `retry_timeout` is left. Blocking waits use at most half of it.
    retry_timeout : float, default 30.0
        Seconds from the start of a call to keep retrying a lost Redis
        connection, or a server that does not reply, before raising
        `BackendConnectionError`.
    connect_retry_timeout : float, default None
        Seconds to keep retrying the first Redis connection, made while
        the broker opens. None uses `retry_timeout`.
    stream_maxlen : int, default None
        Cap each Redis lane stream at about this many entries (``XADD
        MAXLEN ~``). None never trims. An entry trimmed after a group
        read it is dead-lettered with reason "trimmed", and one trimmed
        before any group read it is lost without being counted.
    client : redis.Redis, default None
        Client to use instead of one built from `url`. Its replies must
        be bytes (``decode_responses=False``). Each attempt then waits
        for the client's own socket timeout, which can exceed what is
        left of `retry_timeout`. Every waiting get uses a connection of
        the client's pool, so its ``max_connections`` must exceed the
        number of threads and awaited topics that wait at once.
    """

    def __init__(self, backend: str | Backend = "memory", *,
                 auto_declare: bool = True, **options: Any) -> None:
        _check_bool("auto_declare", auto_declare)
        if isinstance(backend, Backend):
            if options:
                raise TypeError(
                    f"options {sorted(options)} apply only to a backend "
                    f"name such as backend='log'; pass them to the "
                    f"{type(backend).__name__} constructor instead")
            self._backend = backend
        elif backend in BACKENDS:
            factory = BACKENDS[backend]
            _check_backend_options(backend, factory, options)
            self._backend = factory(**options)
        else:
            raise BackendUnavailable(
                f"unknown backend {backend!r}; choose one of "
                f"{sorted(BACKENDS)}")
        self.auto_declare = auto_declare
        # The settings of the topics declared through this broker and not
        # deleted by it, which `_ensure_topic` restores when the backend
        # lost them.
        self._declared: dict[str, TopicConfig] = {}
        self._closed = False
        # Consumers that `close` must close first. Weak, because a
        # consumer dropped without `Consumer.close` must not leak.
        self._consumers: weakref.WeakSet[Consumer] = weakref.WeakSet()
        # Batchers of the producers whose buffered messages `close`
        # publishes first. A batcher outlives its garbage-collected
        # producer while its thread publishes the last batch.
        self._batchers: weakref.WeakSet[_Batcher] = weakref.WeakSet()
        self._publish_one = _fast_path(self._backend, "publish_one")

    def __repr__(self) -> str:
        return f"<mqs.Broker backend={self._backend.name!r}>"

    def __reduce__(self) -> Any:
        # Without this, pickle fails on an internal lock with a message
        # that names neither the broker nor the fix.
        raise TypeError(
            f"{self!r} cannot be pickled, so it cannot reach a spawn or "
            f"forkserver child through Process(args=...); "
            f"{_reopen_hint(self._backend)}")

    @property
    def backend(self) -> Backend:
        return self._backend

    # Topics.

    def declare_topic(self, topic: str, *,
                      weights: Mapping[int, int] | None = None,
                      policy: str = "weighted", rate: Any = None,
                      dedup_window: float | None = 300.0,
                      max_attempts: int | None = None,
                      retry: Backoff | None = None, ttl: float | None = None,
                      on_expire: str = "drop",
                      retention: float | None = None, maxsize: int = 0,
                      when_full: str = "block",
                      replace: bool = False) -> TopicConfig:
        """Create a topic, or check its stored settings; return them.

        Parameters
        ----------
        weights : dict, optional
            Lanes and their weights: ``{priority: weight}``, each weight
            an int from 1 to 2**32 - 1. A message goes to the highest
            lane at or below its priority (the lowest lane if none is).
            Default: ten lanes, priority p weighted p + 1.
        policy : str
            ``"weighted"`` (default): deficit round robin. Each round
            starts at the highest ready lane and gives a lane up to its
            weight in deliveries, so each lane gets its weight's share
            under saturation and none starves.
            ``"strict"``: the highest non-empty lane always goes first, so
            lower lanes starve while higher ones have messages.
        rate : float, mqs.Rate or dict, optional
            Token-bucket limit on deliveries per second of each group:
            one for the topic, or ``{lane: rate}`` per lane.
        dedup_window : float
            Seconds a `dedup_id` is remembered (default 300; 0 disables;
            at most `mqs.MAX_DELAY_SECONDS`, 10 years).
        max_attempts : int, optional
            Deliveries before a failing message goes to the DLQ, from 1
            to 2**32 - 1 (None: retry forever). `consume` can override it
            for its group.
        retry : mqs.Backoff, optional
            Delay before redelivery after a nack without an explicit
            delay (None: at once).
        ttl : float, optional
            Seconds after publish that a message may still be delivered,
            at most `mqs.MAX_DELAY_SECONDS` (10 years); later it is
            dropped (``on_expire="drop"``) or dead-lettered
            (``"dead_letter"``), and counted. The ttl counts from the
            publish, not from the end of a delay, so a publish whose
            delay is not shorter than its ttl raises ValueError. A
            message expires when a get of its group reaches it: until
            then `stats` counts it as ready, and each group counts it in
            ``expired``.
        retention : float, optional
            Seconds a message stays stored after every group finished it,
            for groups that join later with ``start="earliest"``.
        maxsize : int
            Stored messages allowed (0: unbounded). `when_full` sets what
            a publish does at the limit: ``"block"`` (default),
            ``"raise"`` (`mqs.Full`) or ``"drop_oldest"`` (drops the
            oldest stored message that is not in flight, counted as
            ``dropped_full``; waits as ``"block"`` when all are in
            flight).
        replace : bool
            Overwrite differing stored settings instead of raising
            `TopicConfigError` (lanes and policy cannot change).
        """
        _check_bool("replace", replace)
        config = TopicConfig.build(
            topic, weights=weights, policy=policy, rate=rate,
            dedup_window=dedup_window, max_attempts=max_attempts,
            retry=retry, ttl=ttl, on_expire=on_expire, retention=retention,
            maxsize=maxsize, when_full=when_full)
        self._check_open()
        stored = self._backend.declare_topic(config, replace=replace)
        self._declared[topic] = stored
        return stored

    def _check_open(self) -> None:
        # The memory and redis backends keep working after their close,
        # so the broker itself enforces that calls after `close` fail.
        if self._closed:
            raise ShutDown(f"{self!r} is closed; open a new Broker")

    def _check_topic_name(self, topic: str) -> None:
        self._check_open()
        check_topic_name(topic)

    def _ensure_topic(self, topic: str) -> None:
        self._check_topic_name(topic)
        if self._backend.has_topic(topic) or self._declare_lost(topic):
            return
        if not self.auto_declare:
            raise UnknownTopic(
                f"unknown topic {topic!r}; declare it first with "
                f"broker.declare_topic({topic!r}) or pass "
                f"auto_declare=True", topic)
        try:
            self.declare_topic(topic)
        except Exception:
            if not self._backend.has_topic(topic):
                raise

    def _declare_lost(self, topic: str) -> bool:
        """Declare `topic` again if this broker declared it and it went
        missing (another process deleted it, or the backend lost it).

        Returns False, declaring nothing, for a topic that this broker
        never declared or deleted itself."""
        declared = self._declared.get(topic)
        if declared is None:
            return False
        self._declare_again(declared)
        return True

    def _declare_again(self, config: TopicConfig) -> None:
        """Declare again, with its settings rather than the defaults, a
        topic that this broker declared and that went missing. Another
        process may have deleted it, or the backend lost it, as a Redis
        server restarted without persistence does."""
        topic = config.name
        where = (f"topic {topic!r}, declared by this broker, is missing "
                 f"from the {self._backend.name} backend (deleted by another "
                 f"process, or lost with the backend's data)")
        if not self.auto_declare:
            raise UnknownTopic(f"{where}; declare it again", topic)
        logger.warning("%s; declaring it again with the same settings",
                       where)
        try:
            self._backend.declare_topic(config)
        except Exception:
            if not self._backend.has_topic(topic):
                raise

    def topic_config(self, topic: str) -> TopicConfig:
        """Return the settings the backend stores for `topic`."""
        self._check_open()
        return self._backend.topic_config(topic)

    def topics(self) -> list[str]:
        """Return the names of the broker's declared topics, sorted.

        Raises `NotImplementedError` if the backend cannot list them.
        """
        self._check_open()
        return self._backend.topics()

    def delete_topic(self, topic: str) -> None:
        """Drop a topic with its messages, groups and dead letters."""
        self._check_open()
        self._declared.pop(topic, None)
        self._backend.delete_topic(topic)

    # Publishing.

    def _envelope(self, body: Any, *, priority: int = 0,
                  delay: float | None = None, at: Any = None, key: Any = None,
                  headers: Mapping[str, Any] | None = None,
                  dedup_id: Any = None, reply_to: str | None = None,
                  correlation_id: str | None = None,
                  ttl: float | None = None) -> Envelope:
        check_priority(priority)
        if headers is not None and not isinstance(headers, Mapping):
            raise TypeError(
                f"headers must be a dict or None, got "
                f"{type(headers).__name__} {headers!r}")
        if reply_to is not None:
            try:
                check_topic_name(reply_to)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"reply_to must be a topic name: {exc}") \
                    from None
        if correlation_id is not None and not isinstance(correlation_id, str):
            raise TypeError(
                f"correlation_id must be a str or None, got "
                f"{type(correlation_id).__name__} {correlation_id!r}; every "
                f"backend hands it back as a str")
        for name, value in (("key", key), ("dedup_id", dedup_id)):
            _check_hashable(name, value)
        return Envelope(
            body=body, priority=priority, delay=_delay_of(delay, at),
            key=key, headers=dict(headers) if headers else None,
            dedup_id=dedup_id, reply_to=reply_to,
            correlation_id=correlation_id,
            ttl=_seconds("ttl", ttl, allow_zero=False, allow_inf=False))

    def publish(self, topic: str, body: Any, *, priority: int = 0,
                delay: float | None = None, at: Any = None, key: Any = None,
                headers: Mapping[str, Any] | None = None,
                dedup_id: Any = None, reply_to: str | None = None,
                correlation_id: str | None = None, ttl: float | None = None,
                timeout: float | None = None) -> str:
        """Publish one message; return its id.

        Parameters
        ----------
        priority : int
            0 to 9, 9 highest.
        delay, at : optional
            Seconds to wait, or a `datetime` / `time.time()` value to wait
            for, before the message can be delivered (not both), at most
            `mqs.MAX_DELAY_SECONDS` (10 years) from now.
        key : hashable, optional
            Ordering key: messages of one key go out in publish order, one
            at a time per group.
        dedup_id : hashable, optional
            A second publish with the same id within the topic's
            `dedup_window` is dropped (counted) and returns the first id.
        ttl : float, optional
            Overrides the topic's ttl for this message, above 0 and at
            most `mqs.MAX_DELAY_SECONDS`.
        timeout : float, optional
            Bound of the wait when the topic is full and blocks. It does
            not bound the wait for durability: under ``fsync="always"``
            a log broker's publish returns once the log is synced, so a
            writer process that is stopped (SIGSTOP) holds it until the
            writer runs again or dies and another process takes over.

        Raises
        ------
        InvalidPriority
            For a priority outside 0 to 9.
        ValueError
            For a negative, infinite or too long `delay`, `at` or `ttl`,
            or a delay not shorter than the message's ttl (or else the
            topic's), because the message would expire before it is due.
        Full
            When the topic is full (``when_full="raise"``, or ``"block"``
            past `timeout`).
        UnknownTopic
            If the topic does not exist and `auto_declare` is off.
        TypeError
            If the body, key, headers or dedup_id fails to pickle on a
            backend that pickles them (shm, log, and redis with
            ``serializer="pickle"``), whatever exception pickling raised.
            That exception is the ``__cause__``, and nothing is
            published.
        """
        if (self._publish_one is not None and priority.__class__ is int
                and 0 <= priority <= 9 and delay is None and at is None
                and key is None and headers is None and dedup_id is None
                and reply_to is None and correlation_id is None
                and ttl is None and timeout is None
                and topic.__class__ is str and not self._closed):
            # Without options nothing else needs a check, so the backend
            # may store the message at once.
            try:
                message_id = self._publish_one(topic, body, priority)
            except Exception as exc:
                if _may_be_pickling_error(exc):
                    self._raise_unpicklable(
                        topic, [Envelope(body, priority)], exc)
                raise
            if message_id is not None:
                return message_id
        envelope = self._envelope(
            body, priority=priority, delay=delay, at=at, key=key,
            headers=headers, dedup_id=dedup_id, reply_to=reply_to,
            correlation_id=correlation_id, ttl=ttl)
        return self._publish(topic, [envelope],
                             _seconds("timeout", timeout))[0]

    def publish_many(self, topic: str, bodies: Iterable[Any], *,
                     timeout: float | None = None, **options: Any
                     ) -> list[str]:
        """Publish every body of `bodies` in one backend call, in order,
        with the same options as `publish`; return their ids.

        On `Full`, ``exc.accepted`` bodies were published and stay. A
        `dedup_id` with more than one body raises ValueError, because the
        messages would share it and all but the first would be dropped as
        duplicates.
        """
        # A dict would be published one key per message.
        if isinstance(bodies, (str, bytes, bytearray, memoryview, Mapping)):
            raise TypeError(
                f"publish_many takes an iterable of bodies, got "
                f"{type(bodies).__name__} {bodies!r:.60}, which would be "
                f"published one item per message; pass [body] to publish "
                f"it as one message, or use publish")
        try:
            bodies = iter(bodies)
        except TypeError:
            raise TypeError(
                f"publish_many takes an iterable of bodies (a list, a "
                f"tuple, a generator), got {type(bodies).__name__} "
                f"{bodies!r:.60}; pass [body] to publish one message"
            ) from None
        _check_options("publish_many", options, ("timeout",))
        # The options are checked once; every envelope shares them.
        settings = self._envelope(None, **options)[1:]
        envelopes = [Envelope(body, *settings) for body in bodies]
        dedup_id = options.get("dedup_id")
        if dedup_id is not None and len(envelopes) > 1:
            raise ValueError(
                f"dedup_id {dedup_id!r} would be shared by the "
                f"{len(envelopes)} messages of publish_many, so all but the "
                f"first would be dropped as duplicates; publish each body "
                f"with its own dedup_id through publish, or leave dedup_id "
                f"out")
        timeout = _seconds("timeout", timeout)
        if not envelopes:
            self._ensure_topic(topic)
            return []
        return self._publish(topic, envelopes, timeout)

    def _publish(self, topic: str, envelopes: list[Envelope],
                 timeout: float | None) -> list[str]:
        """Publish `envelopes` to `topic`, declaring it if needed."""
        if not self._backend.publish_checks_topic:
            self._ensure_topic(topic)
            self._check_due_before_expiry(topic, envelopes[0])
            return self._backend_publish(topic, envelopes, timeout)
        # The backend raises UnknownTopic itself, so the topic check costs
        # nothing (no round trip to Redis) while the topic exists.
        self._check_topic_name(topic)
        self._check_due_before_expiry(topic, envelopes[0])
        try:
            return self._backend_publish(topic, envelopes, timeout)
        except UnknownTopic as exc:
            # A topic deleted while the publish waited for room stays
            # deleted.
            if exc.deleted:
                raise
            self._ensure_topic(topic)
        return self._backend_publish(topic, envelopes, timeout)

    def _check_due_before_expiry(self, topic: str,
                                 envelope: Envelope) -> None:
        """Raise ValueError if delayed `envelope` would expire before it
        is due, because its ttl counts from the publish.

        `publish_many` checks its first envelope only, since all of them
        share their options. A delayed publish reads the topic's settings
        (a round trip to Redis) unless the message has its own ttl.
        """
        delay = envelope.delay
        if not delay:
            return
        ttl = envelope.ttl
        if ttl is not None:
            if delay >= ttl:
                raise ValueError(
                    f"delay {delay:g} s is not shorter than the message's "
                    f"ttl {ttl:g} s, which counts from the publish, so the "
                    f"message would expire before it is due; pass a ttl "
                    f"longer than the delay")
            return
        try:
            ttl = self._backend.topic_config(topic).ttl
        except UnknownTopic:
            # The publish declares the topic with the default settings,
            # which have no ttl, or raises UnknownTopic itself.
            return
        # NOTE: a redeclare with replace=True that shortens the ttl after
        # this read is not seen, and its messages expire unseen (counted).
        if ttl is not None and delay >= ttl:
            raise ValueError(
                f"delay {delay:g} s is not shorter than the ttl {ttl:g} s "
                f"of topic {topic!r}, which counts from the publish, so the "
                f"message would expire before it is due; pass a ttl longer "
                f"than the delay to this publish, or declare the topic with "
                f"a longer ttl")

    def _backend_publish(self, topic: str, envelopes: list[Envelope],
                         timeout: float | None) -> list[str]:
        try:
            return self._backend.publish(topic, envelopes, timeout)
        except Exception as exc:
            if _may_be_pickling_error(exc):
                self._raise_unpicklable(topic, envelopes, exc)
            raise

    def _raise_unpicklable(self, topic: str, envelopes: list[Envelope],
                           error: Exception) -> None:
        """Raise TypeError naming the field of `envelopes` that fails to
        pickle, with its pickling error chained.

        Returns when every field pickles, so that the caller re-raises
        `error`, which the backend's publish raised.
        """
        if not self._backend.pickles_messages:
            return
        for envelope in envelopes:
            failure = _unpicklable_field(envelope)
            if failure is not None:
                raise _unpicklable_error(topic, self._backend.name, *failure)

    async def publish_async(self, topic: str, body: Any, *,
                            timeout: float | None = None, **options: Any
                            ) -> str:
        """Like `publish`; a full topic is awaited without blocking the
        event loop.

        As with `publish`, a topic deleted (or lost with the backend's
        data) while the call waits for room raises `UnknownTopic` with
        ``deleted=True``, and the topic is not declared again.
        """
        _check_options("publish_async", options, ("timeout",))
        envelope = self._envelope(body, **options)
        timeout = _seconds("timeout", timeout)
        run = self._backend.run_blocking
        if await run(self._prepare_publish, topic, envelope) != "block":
            return (await run(self._publish_prepared, topic, envelope))[0]
        deadline = None if timeout is None else time.monotonic() + timeout
        waited = False
        while True:
            try:
                if not waited:
                    return (await run(self._publish_prepared, topic,
                                      envelope))[0]
                return (await run(self._backend_publish, topic, [envelope],
                                  0))[0]
            except BackendOutOfMemory:
                # Not a full topic: waiting frees no memory on the server.
                raise
            except Full:
                left = None if deadline is None \
                    else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise
            except UnknownTopic as exc:
                if not waited or exc.deleted:
                    raise
                raise _deleted_while_full(topic, 0, 1) from None
            step = 0.05 if left is None else min(left, 0.05)
            await self._backend.wait_changed_async(step)
            waited = True

    def _publish_prepared(self, topic: str, envelope: Envelope
                          ) -> list[str]:
        """Publish `envelope`, checked by `_prepare_publish`, without
        waiting for room; declare the topic again if it went missing
        since that check."""
        try:
            return self._backend_publish(topic, [envelope], 0)
        except UnknownTopic as exc:
            if exc.deleted:
                raise
            self._ensure_topic(topic)
        return self._backend_publish(topic, [envelope], 0)

    def _prepare_publish(self, topic: str, envelope: Envelope) -> str:
        """Check a publish of `envelope` to `topic`, declaring the topic
        if needed, and return its when_full policy (`publish_async`)."""
        self._ensure_topic(topic)
        self._check_due_before_expiry(topic, envelope)
        return self._backend.topic_config(topic).when_full

    def producer(self, topic: str, *, linger: float = 0.005,
                 batch_size: int = 100,
                 timeout: float | None = None) -> Producer:
        """Return a `Producer` that batches publishes to `topic`.

        `linger`, `batch_size` and `timeout` are described in `Producer`.

        Raises
        ------
        TypeError
            For a `linger` or `timeout` that is not a number.
        ValueError
            For a negative or NaN `linger` or `timeout`, a `linger` above
            `mqs.MAX_DELAY_SECONDS`, or a `batch_size` that is not an int
            of 1 or more.
        """
        # The arguments are checked before the topic is declared.
        producer = Producer(self, topic, linger=linger,
                            batch_size=batch_size, timeout=timeout)
        self._ensure_topic(topic)
        self._batchers.add(producer._batcher)
        return producer

    # Consuming.

    def consume(self, topic: str, group: str = "default", *,
                prefetch: int = 1, ack_timeout: float = 30.0,
                auto_ack: bool = False, start: str = "earliest",
                max_attempts: int | None = None) -> Consumer:
        """Return a new consumer of `topic` in `group`.

        Parameters
        ----------
        group : str
            Consumer group: every group gets every message, the consumers
            of one group compete for them. A name with a lone surrogate
            raises ValueError.
        prefetch : int
            Unacknowledged messages this consumer may hold at once, from
            1 to 2**32 - 1.
        ack_timeout : float
            Seconds to ack a message before it is redelivered with
            ``attempts + 1`` (or dead-lettered at `max_attempts`), above
            0 and at most `mqs.MAX_DELAY_SECONDS`.
        auto_ack : bool
            Acknowledge at delivery: at most once, never redelivered.
        start : str
            For a new group: ``"earliest"`` also delivers the messages the
            topic still stores, ``"latest"`` only later ones.
        max_attempts : int, optional
            Overrides the topic's `max_attempts` for this group, from 1
            to 2**32 - 1.
        """
        if not isinstance(group, str) or not group:
            raise TypeError(f"group must be a non-empty str, got {group!r}")
        try:
            group.encode("utf-8")
        except UnicodeEncodeError:
            # The shm, log and redis backends store the name as UTF-8.
            raise ValueError(
                f"group must be valid UTF-8 text, got {group!r} with a lone "
                f"surrogate; pass a name without one") from None
        _check_bool("auto_ack", auto_ack)
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) \
                or prefetch < 1:
            raise ValueError(
                f"prefetch must be an int of 1 or more, got {prefetch!r}")
        if prefetch > MAX_PREFETCH:
            raise ValueError(
                f"prefetch must be at most {MAX_PREFETCH} (2**32 - 1), got "
                f"{prefetch}; pass a smaller limit of unacked messages")
        if start not in _STARTS:
            raise ValueError(
                f"start must be 'earliest' or 'latest', got {start!r}")
        check_max_attempts(max_attempts)
        ack_timeout = _required_seconds("ack_timeout", ack_timeout,
                                        allow_zero=False, allow_inf=False)
        self._ensure_topic(topic)
        consumer = Consumer(self, topic, group, prefetch=prefetch,
                            ack_timeout=ack_timeout, auto_ack=auto_ack,
                            start=start, max_attempts=max_attempts)
        self._consumers.add(consumer)
        return consumer

    # Request-reply.

    def request(self, topic: str, body: Any, timeout: float, **options: Any
                ) -> Message:
        """Publish a request and return the reply message.

        The request carries ``reply_to`` (a private reply topic) and a
        ``correlation_id``; the responder calls ``msg.reply(body)``.

        Raises
        ------
        RequestTimeout
            When no reply arrived within `timeout` seconds. A reply that
            arrives later is dropped.
        """
        timeout = _required_seconds("timeout", timeout)
        reply_topic, correlation_id = self._open_reply(topic)
        try:
            replies = self.consume(reply_topic, "reply", auto_ack=True)
            self.publish(topic, body, reply_to=reply_topic,
                         correlation_id=correlation_id, **options)
            try:
                return replies.get(timeout)
            except Empty:
                raise RequestTimeout(
                    f"no reply to the request on {topic!r} within "
                    f"{timeout} s (correlation id {correlation_id})"
                ) from None
        finally:
            self._backend.delete_topic(reply_topic)

    async def request_async(self, topic: str, body: Any, timeout: float,
                            **options: Any) -> Message:
        """Like `request`, awaiting the reply without blocking the loop."""
        timeout = _required_seconds("timeout", timeout)
        # The topic calls wait on the network on the redis backend.
        run = self._backend.run_blocking
        reply_topic, correlation_id = await run(self._open_reply, topic)
        try:
            replies = await run(lambda: self.consume(reply_topic, "reply",
                                                     auto_ack=True))
            await self.publish_async(topic, body, reply_to=reply_topic,
                                     correlation_id=correlation_id,
                                     **options)
            try:
                return await replies.get_async(timeout)
            except Empty:
                raise RequestTimeout(
                    f"no reply to the request on {topic!r} within "
                    f"{timeout} s (correlation id {correlation_id})"
                ) from None
        finally:
            await run(self._backend.delete_topic, reply_topic)

    def _open_reply(self, topic: str) -> tuple[str, str]:
        correlation_id = uuid.uuid4().hex
        reply_topic = f"mqs.reply.{correlation_id}"
        self._ensure_topic(topic)
        self._backend.declare_topic(
            TopicConfig.build(reply_topic, dedup_window=0))
        return reply_topic, correlation_id

    def reply(self, message: Message, body: Any, **options: Any) -> bool:
        """Publish `body` to the ``reply_to`` topic of `message`.

        Returns False, and logs, when the requester is gone (it timed out
        and deleted its reply topic).
        """
        if message.reply_to is None:
            raise ValueError(
                f"message {message.id} of {message.topic!r} has no reply_to; "
                f"only messages sent by Broker.request can be replied to")
        self._check_open()
        envelope = self._envelope(body, correlation_id=message.correlation_id,
                                  **options)
        try:
            self._backend_publish(message.reply_to, [envelope], 0)
        except UnknownTopic:
            logger.info("reply to request %s dropped: the requester timed "
                        "out", message.correlation_id)
            return False
        return True

    # Dead letters and state.

    def dlq_list(self, topic: str, limit: int | None = None
                 ) -> list[DeadLetter]:
        """Return the dead letters of `topic`, oldest first (at most
        `limit` of them; None returns all).

        Returns
        -------
        list of DeadLetter
            Every dead letter, including those whose body fails to
            deserialize in this process. Such a letter has ``body`` None,
            ``decode_error`` set to the error as ``"<type>: <message>"``
            and ``raw_body`` holding the serialized body as stored. Its
            other fields are filled as usual. A key or headers that fail
            to deserialize (redis with ``serializer="pickle"`` pickles
            them apart from the body) leave ``key`` None or only the
            ``mqs.*`` headers, their bytes in ``raw_key`` or
            ``raw_headers``, and add ``"key: <type>: <message>"`` or
            ``"headers: <type>: <message>"`` to ``decode_error`` (see
            `DeadLetter`).

        Notes
        -----
        Bodies fail to deserialize only on the backends that store them
        pickled: shm, log, and redis with ``serializer="pickle"``. The
        usual cause is a class in the body that cannot be imported
        here, such as ``mqs dlq list`` run outside the application's
        environment. List again where the class imports (set
        PYTHONPATH, or use the application's interpreter) to see the
        body. `dlq_redrive` and `dlq_purge` work on such letters as on
        any other, and redrive puts the stored bytes back unchanged.
        """
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int):
                raise TypeError(
                    f"limit must be an int or None (every dead letter), got "
                    f"{type(limit).__name__} {limit!r}")
            if limit < 0:
                raise ValueError(
                    f"limit must be 0 or more, or None (every dead letter), "
                    f"got {limit!r}")
            limit = min(limit, _MAX_DLQ_LIMIT)
        self._check_open()
        return self._backend.dlq_list(topic, limit)

    def dlq_redrive(self, topic: str, ids: Iterable[str] | None = None
                    ) -> int:
        """Move dead letters back to their group with attempts reset;
        return how many moved.

        `ids` is an iterable of `DeadLetter.id` strings, or None for every
        dead letter. Ids not in the dead-letter queue are skipped. The
        topic's `maxsize` does not limit a redrive: every letter goes
        back, and publishes find the topic full until it is below
        `maxsize` again.
        """
        self._check_open()
        if ids is None:
            return self._backend.dlq_redrive(topic, None)
        # A bare str would be iterated as one id per character and redrive
        # other messages than the one meant.
        if isinstance(ids, (str, bytes)):
            raise TypeError(
                f"ids must be an iterable of dead-letter ids, got "
                f"{type(ids).__name__} {ids!r}; pass [{ids!r}] for one id")
        if not isinstance(ids, Iterable):
            raise TypeError(
                f"ids must be an iterable of dead-letter ids, got "
                f"{type(ids).__name__} {ids!r}; pass a list of "
                f"DeadLetter.id strings, or None for every dead letter")
        id_list = list(ids)
        for message_id in id_list:
            if not isinstance(message_id, str):
                raise TypeError(
                    f"dead-letter ids must be str (DeadLetter.id), got "
                    f"{type(message_id).__name__} {message_id!r}")
        return self._backend.dlq_redrive(topic, id_list)

    def dlq_purge(self, topic: str) -> int:
        """Delete the dead letters of `topic`; return how many (counted)."""
        self._check_open()
        return self._backend.dlq_purge(topic)

    def stats(self, topic: str) -> dict[str, int]:
        """Return the topic's counters and gauges.

        Counters: published, delivered, acked, nacked, redelivered,
        late_acks, and every drop by reason (deduplicated, expired,
        dropped_full, dropped_unsubscribed, dead_lettered and
        dead_lettered.<reason>, dlq_purged). Gauges: stored, ready,
        delayed, in_flight (summed over groups), dlq, groups.

        Raises `UnknownTopic` for an undeclared topic and `ShutDown` once
        the broker is closed.
        """
        self._check_open()
        return self._backend.stats(topic)

    def group_stats(self, topic: str) -> list[GroupStats]:
        """Return the lag, counters and sampled latencies of every group
        of `topic` (see `mqs.broker.GroupStats`).

        Raises
        ------
        UnknownTopic
            If the topic does not exist.
        NotImplementedError
            If the backend does not report group metrics.
        ShutDown
            If the broker is closed.
        """
        self._check_open()
        return self._backend.group_stats(topic)

    def close(self) -> None:
        """Publish the batches of this broker's producers, close its open
        consumers, then release the backend.

        Each open `Producer` of the broker publishes what it buffers and
        closes. Each open consumer closes as with
        ``Consumer.close(drain=False)``: its in-flight messages go back to
        their group at once, with the attempt counted, so other processes
        get them without waiting for the ack deadline. Afterwards
        `Consumer.close` returns 0, and calls on the broker, on its
        consumers (`Consumer.get`, `Consumer.ack_many`), on its producers
        (`Producer.publish`) and on their messages (`Message.ack`,
        `nack`, `extend`) raise `ShutDown`. Closing twice does nothing.
        In a process forked from the one that opened a consumer, the
        consumer only stops: its messages stay in flight for the parent.

        Raises
        ------
        ProducerFlushError
            After everything is closed, if a producer failed to publish
            its batch. Those messages were dropped, logged and counted
            (`Producer.dropped`); to handle such errors yourself, call
            `Producer.close` before this.

        Notes
        -----
        A producer's publish waits as in `Producer.flush`: on a full topic
        that blocks, for up to the producer's `timeout`.
        """
        if self._closed:
            return
        self._closed = True
        failures: list[tuple[str, int, Exception | None]] = []
        try:
            for batcher in list(self._batchers):
                dropped, error = batcher.shut("the broker closed")
                if dropped:
                    failures.append((batcher.topic, dropped, error))
            for consumer in list(self._consumers):
                if consumer.forked:
                    # Its messages belong to the parent process, which
                    # closes it; here it only stops.
                    consumer._closed = True
                else:
                    consumer.close(drain=False)
        finally:
            self._backend.close()
        if failures:
            raise _flush_error(failures)

    @staticmethod
    def unlink(name: str) -> bool:
        """Remove the shm broker `name` with all its state from /dev/shm.

        Returns whether it existed. `close` never removes an shm broker,
        so that other processes keep it; call this when no process needs
        it any more. Processes that still have it open keep their
        mapping, and the next ``Broker(backend="shm", name=name)``
        creates a new, empty broker.
        """
        return ShmBackend.unlink(name)

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
