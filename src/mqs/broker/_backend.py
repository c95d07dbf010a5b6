"""The contract between `mqs.Broker` and a storage backend.

A backend stores every piece of broker state and applies each operation
below atomically (under one lock, one transaction or one script). The
`Broker`, `Consumer` and `Message` classes hold no state that must be
shared: they validate arguments, build `Envelope` records, turn
`Delivery` records into `Message` objects and wait. To add a backend,
subclass `Backend`, implement the abstract methods, register a factory
in ``mqs.broker._broker.BACKENDS`` and add a factory of a fresh broker
to ``BACKEND_FACTORIES`` in tests/broker/conftest.py; the contract suite
(tests/broker/test_broker_contract.py) then runs against it unchanged.

Semantics every backend must keep (the contract suite checks each):

- Topics: `declare_topic` stores a `TopicConfig`. Declaring again with an
  equal config is a no-op, a different one raises `TopicConfigError`
  unless ``replace=True`` (lanes and policy never change while the topic
  exists). Other calls on an undeclared topic raise `UnknownTopic`,
  except `close_consumer`, `release` and `in_flight`, which return 0.
- Time: every operation first fires the timers that are due (delays, ack
  deadlines), so its result never depends on when the last `fetch` ran.
- Groups: a consumer group is created by the first `open_consumer` that
  names it. Every group of a topic receives every message published
  after the group was created; ``start="earliest"`` also gives it every
  message the topic still stores (not yet finished by every group, kept
  for `retention` seconds, or published while the topic had no group).
- Lanes: a message's lane is ``lane_of(priority, config.lanes)``. Inside a
  lane messages are FIFO by publish order; the next lane comes from a
  `LaneScheduler` per group (state: a cursor and one deficit per lane).
  A requeued message (nack without delay, missed ack deadline, redrive)
  goes to the tail of its lane; a message released unseen by a closing
  consumer goes back to the head.
- Keys: per group, only the oldest unfinished message of a key is
  visible (ready, delayed or in flight); the next one becomes visible
  when it is acked, dead-lettered, expired or dropped. So one key is
  never in flight twice in a group, and its messages go out in publish
  order.
- Delivery: `fetch` first fires due timers (delays, ack deadlines), then
  takes messages while lanes are eligible (a visible message, rate
  tokens available), skipping expired ones (`ttl` from publish:
  dropped, or dead-lettered when ``config.on_expire == "dead_letter"``;
  checked at every delivery, redeliveries included).
  Each taken message gets ``attempts += 1``. With `auto_ack` it is
  finished at once; otherwise it is in flight, owned by the consumer,
  with an ack deadline ``now + ack_timeout``. A consumer never holds
  more than its `prefetch` in-flight messages.
- Rate limits: each group has one `TokenBucket` for ``config.rate`` and
  one per lane of ``config.lane_rates``; a delivery takes a token from
  each that applies, and a lane without tokens is not eligible. An
  adaptive bucket is cut by nacks and missed deadlines and raised by
  acks (`TokenBucket.on_failure`, `on_success`).
- Redelivery: a missed deadline puts the message back at its lane's tail
  (its next delivery has ``attempts + 1``), or dead-letters it (reason
  ``"ack_timeout"``) once ``attempts >= max_attempts`` (the group's
  value from `open_consumer` if given, else the topic's). `nack` with
  ``requeue=False`` dead-letters (reason ``"rejected"``); with requeue it
  dead-letters (reason ``"max_attempts"``) at the limit, otherwise
  schedules the message after ``retry_delay(...)``.
- Delivery tags: every delivery carries a tag that stays valid until the
  message is acked, nacked, released or its deadline passes. `ack`,
  `nack`, `extend` and `release` return False for a stale tag and count
  it as ``late_acks``; they never act on a later delivery.
- Dead letters carry the headers ``mqs.dead_letter_reason``,
  ``mqs.attempts``, ``mqs.last_error`` and ``mqs.group``; `dlq_redrive`
  puts them back at the tail of their lane in their group, with
  attempts reset to 0, ready at once and without a ttl.
- Dedup: a publish whose `dedup_id` was seen on the topic within
  ``config.dedup_window`` seconds is dropped, counted as
  ``deduplicated``, and returns the first message's id.
- Capacity: with ``config.maxsize`` > 0, a publish that finds that many
  stored messages blocks (``when_full="block"``, up to the publish
  timeout, then `mqs.Full`), raises `mqs.Full` at once (``"raise"``), or
  drops the oldest stored message that is not in flight
  (``"drop_oldest"``, counted as ``dropped_full``; when every stored
  message is in flight it waits as ``"block"`` does).
- Counters: `stats` returns at least the keys of `COUNTER_KEYS` and
  `GAUGE_KEYS`. Every message that leaves without an ack is counted by
  reason.
- Group metrics: `group_stats` returns one `GroupStats` per group with
  its lag (ready messages and the seconds the oldest one has waited
  since it joined its lane), its own delivery counters, and latency
  histograms of one delivery in `sample_every`: enqueue-to-deliver
  (from joining a lane's tail to delivery) and deliver-to-ack. A
  backend without them keeps the default, which raises
  `NotImplementedError`; the exporter then skips that broker's group
  metrics.
- Waiting: blocking calls never return before their timeout unless they
  have a result, and wake by themselves when the next timer is due (no
  timer thread is required: the caller of `fetch` advances time).

Notes for the planned backends. The rules above are written as shared
code where they can be: `mqs.broker._policy` (lane choice, backoff,
token buckets, validation) holds no messages, and
`mqs.broker._state.TopicState` is the complete in-memory state machine.
A ``log`` backend can replay its control records (publish, deliver, ack,
nack, extend, dead-letter, redrive) into a `TopicState` on open and keep
appending them, so it only adds durability. An ``shm`` backend keeps the
same state in a shared mapping under a robust process-shared mutex (the
ring for ready records, the shared timing wheel for delays and ack
deadlines) and reuses the `_policy` helpers, whose state is a few plain
numbers. A ``redis`` backend maps lanes to streams and runs each
operation as one Lua script, with a consumer group per broker group.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from mqs.broker._policy import TopicConfig
from mqs.errors import MessageDecodeError
from mqs.metrics import LatencySummary

__all__ = [
    "Backend",
    "Envelope",
    "Delivery",
    "DeadLetter",
    "GroupStats",
    "COUNTER_KEYS",
    "GAUGE_KEYS",
]

logger = logging.getLogger(__name__)

# Counters of `Backend.stats`: totals since the topic was declared.
COUNTER_KEYS = (
    "published",
    "delivered",
    "acked",
    "nacked",
    # A delivered message put back for another delivery: nack with
    # requeue, missed ack deadline, or its consumer closed or died while
    # holding it. Not a release of unseen messages, nor a dead letter.
    "redelivered",
    "late_acks",        # ack, nack, extend or release with a stale tag
    "deduplicated",     # publish dropped: dedup_id seen in the window
    "expired",          # dropped: ttl passed before delivery
    "dropped_full",     # dropped by when_full="drop_oldest"
    # Published while the topic had no group, then skipped because its
    # first group started at "latest" and retention was not set.
    "dropped_unsubscribed",
    "dead_lettered",    # moved to the DLQ, any reason
    "dead_lettered.max_attempts",
    "dead_lettered.ack_timeout",
    "dead_lettered.rejected",
    "dead_lettered.expired",
    "redriven",
    "dlq_purged",
)
# Gauges of `Backend.stats`: the state now, summed over groups.
GAUGE_KEYS = ("stored", "ready", "delayed", "in_flight", "dlq", "groups")


class Envelope(NamedTuple):
    """One message as a producer publishes it, before it has an id.

    `delay` is seconds from the publish (0 for none); `ttl` None means
    the topic's ttl applies. A named tuple, because one is built per
    message and a frozen dataclass costs several times more to build.
    """

    body: Any
    priority: int = 0
    delay: float = 0.0
    key: Any = None
    headers: dict[str, Any] | None = None
    dedup_id: Any = None
    reply_to: str | None = None
    correlation_id: str | None = None
    ttl: float | None = None


class Delivery(NamedTuple):
    """One message handed to one consumer of one group.

    `tag` identifies this delivery for ack, nack, extend and release.
    `timestamp` is the publish time in `time.time()` seconds.
    """

    id: str
    tag: Any
    topic: str
    group: str
    body: Any
    priority: int
    attempts: int
    key: Any
    headers: dict[str, Any]
    timestamp: float
    reply_to: str | None
    correlation_id: str | None


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """One message in a topic's dead-letter queue.

    `id` is the message id it had in the topic; `headers` include the
    ``mqs.*`` dead-letter headers listed in the module docstring.

    `decode_error` is None when `body`, `key` and `headers` are the
    message's own. A backend that stores bodies serialized (shm, log,
    and redis with ``serializer="pickle"``) sets it when the body fails
    to deserialize in the listing process, for example because a class
    in it cannot be imported there. Then `body` is None, `decode_error`
    is the deserializer's exception as ``"<type>: <message>"``, and
    `raw_body` is the serialized body as stored. `raw_body` is None
    otherwise.

    The redis backend with ``serializer="pickle"`` also pickles the key
    and the headers on their own. A key that fails to unpickle leaves
    `key` None and its pickled bytes in `raw_key`. Headers that fail
    leave only the ``mqs.*`` headers in `headers` and the stored bytes
    in `raw_headers`. Each such failure adds ``"key: <type>: <message>"``
    or ``"headers: <type>: <message>"`` to `decode_error`, after the
    body's error if the body failed too, joined by ``"; "``.
    """

    id: str
    topic: str
    group: str
    body: Any
    priority: int
    key: Any
    headers: dict[str, Any]
    timestamp: float
    attempts: int
    reason: str
    error: str | None
    decode_error: str | None = None
    raw_body: bytes | None = None
    raw_key: bytes | None = None
    raw_headers: bytes | None = None


def unpickled_letter(letter: DeadLetter) -> DeadLetter:
    """Return `letter` with its pickled body unpickled.

    A body that fails to unpickle leaves the letter listed with `body`
    None, `decode_error` and `raw_body` set (see `DeadLetter`), so one
    broken body never hides the other dead letters.
    """
    try:
        body = pickle.loads(letter.body)
    except Exception as exc:
        return undecodable_letter(letter, letter.body, exc)
    return dataclasses.replace(letter, body=body)


def undecodable_letter(letter: DeadLetter, raw_body: bytes,
                       exc: Exception) -> DeadLetter:
    """Return `letter` marked as one whose `raw_body` failed to
    deserialize with `exc` (see `DeadLetter`)."""
    error = f"{type(exc).__name__}: {exc}"
    logger.debug("dead letter %s of topic %r: its %d-byte body failed to "
                 "deserialize (%s)", letter.id, letter.topic, len(raw_body),
                 error, exc_info=exc)
    return dataclasses.replace(letter, body=None, decode_error=error,
                               raw_body=bytes(raw_body))


def undecodable_part(letter: DeadLetter, part: str, raw: bytes,
                     exc: Exception) -> DeadLetter:
    """Return `letter` marked as one whose `part`, "key" or "headers",
    failed to deserialize from `raw` with `exc` (see `DeadLetter`).

    The caller has already left the part out, so `key` is None or
    `headers` has only the ``mqs.*`` headers.
    """
    error = f"{part}: {type(exc).__name__}: {exc}"
    logger.debug("dead letter %s of topic %r: its %d-byte %s failed to "
                 "deserialize (%s)", letter.id, letter.topic, len(raw), part,
                 error, exc_info=exc)
    if letter.decode_error is not None:
        error = f"{letter.decode_error}; {error}"
    raw_field = "raw_key" if part == "key" else "raw_headers"
    return dataclasses.replace(letter, decode_error=error,
                               **{raw_field: bytes(raw)})


def decode_error(topic: str, message_id: str, cause: BaseException,
                 auto_ack: bool) -> MessageDecodeError:
    """Return the error for message `message_id` of `topic`, whose body
    (or headers) failed to unpickle with `cause`; the caller chains it."""
    return MessageDecodeError(
        f"message {message_id} of topic {topic!r} failed to unpickle "
        f"({type(cause).__name__}: {cause}). {_decode_outcome(auto_ack)}. "
        f"Check that this process can import the classes of the body",
        topic=topic, message_id=message_id)


def _decode_outcome(auto_ack: bool) -> str:
    if auto_ack:
        return ("It was acked at delivery (auto_ack=True), so it is "
                "lost")
    return ("It stays in flight: it is delivered again after its ack "
            "deadline and dead-lettered after the topic's max_attempts")


def decode_each(topic: str, items: Sequence[Any],
                decode: Callable[[Any], Delivery],
                message_id: Callable[[Any], str],
                auto_ack: bool) -> list[Delivery]:
    """Return ``decode(item)`` for each of the fetched `items` whose body
    unpickles, in order.

    A fetched item whose body fails to unpickle stays in flight, so that
    it is delivered again after its ack deadline and dead-lettered after
    max_attempts (with `auto_ack` it was acked and is lost). It is logged with its topic and id and left out, so
    that the other messages of the batch are still delivered. Raises
    `MessageDecodeError` (the unpickling error chained) only when no
    item decodes.
    """
    decoded = []
    failures = []
    for item in items:
        try:
            decoded.append(decode(item))
        except Exception as exc:  # whatever the body's unpickling raised
            failures.append((message_id(item), exc))
    if failures and not decoded:
        first_id, first_cause = failures[0]
        for failed_id, cause in failures[1:]:
            _log_decode_failure(topic, failed_id, cause, auto_ack)
        raise decode_error(topic, first_id, first_cause,
                           auto_ack) from first_cause
    for failed_id, cause in failures:
        _log_decode_failure(topic, failed_id, cause, auto_ack)
    return decoded


def _log_decode_failure(topic: str, message_id: str,
                        cause: BaseException, auto_ack: bool) -> None:
    logger.error("message %s of topic %r failed to unpickle. %s",
                 message_id, topic, _decode_outcome(auto_ack),
                 exc_info=cause)


@dataclasses.dataclass(frozen=True)
class GroupStats:
    """Lag, counters and sampled latencies of one consumer group.

    `lag_messages` counts the group's ready messages, including those
    that wait behind an earlier message of their key. `lag_seconds` is
    how long the oldest of them has been ready (0 when none is). The
    counters run since the group was created. `errors` counts nacks and
    the dead letters that no nack caused (missed ack deadlines at
    `max_attempts`, expiries), so each failed delivery counts once.
    Latencies are None while sampling is off and nothing was sampled.
    """

    topic: str
    group: str
    consumers: int
    lag_messages: int
    lag_seconds: float
    delayed: int
    in_flight: int
    delivered: int
    acked: int
    nacked: int
    redelivered: int
    dead_lettered: int
    errors: int
    sample_every: int | None
    enqueue_to_deliver: LatencySummary | None
    deliver_to_ack: LatencySummary | None

    @property
    def error_ratio(self) -> float:
        """`errors` over `delivered` (0.0 before the first delivery)."""
        return self.errors / self.delivered if self.delivered else 0.0


class Backend(abc.ABC):
    """Storage and atomic operations of one broker; see the module docs.

    Every method may be called from any thread. Topic names are checked
    by the `Broker` (non-empty str); everything else by the backend.
    """

    name = "abstract"
    # True when `publish` raises `UnknownTopic` for an undeclared topic
    # before it stores any message of the batch, so `Broker.publish` may
    # skip its `has_topic` call and declare the topic only on that error.
    publish_checks_topic = False
    # True when `publish` pickles bodies, keys, headers and dedup ids, so
    # `Broker` can name the field whose pickling failed.
    pickles_messages = False

    # Topics.

    @abc.abstractmethod
    def declare_topic(self, config: TopicConfig, replace: bool = False
                      ) -> TopicConfig:
        """Store `config`, or check it against the stored one; return it."""

    @abc.abstractmethod
    def topic_config(self, topic: str) -> TopicConfig:
        """Return the stored config, or raise `UnknownTopic`."""

    @abc.abstractmethod
    def has_topic(self, topic: str) -> bool:
        """Return whether `topic` was declared."""

    @abc.abstractmethod
    def delete_topic(self, topic: str) -> None:
        """Drop a topic with its messages, groups and DLQ."""

    def topics(self) -> list[str]:
        """Return the names of the declared topics, sorted.

        This default raises `NotImplementedError`: a backend lists its
        topics only once it overrides it.
        """
        raise NotImplementedError(
            f"backend {self.name!r} does not list its topics")

    # Producing.

    @abc.abstractmethod
    def publish(self, topic: str, envelopes: Sequence[Envelope],
                timeout: float | None) -> list[str]:
        """Store a batch in order; return one message id per envelope.

        `timeout` bounds the wait of ``when_full="block"`` (None: no
        bound, 0: no wait). Raises `mqs.Full` (with ``accepted`` set to
        the envelopes stored before it) when the topic stays full.
        """

    def publish_one(self, topic: str, body: Any, priority: int
                    ) -> str | None:
        """Publish one message that has no options through the backend's
        fast path; return its id, or None to make the caller use `publish`.

        `publish` then does every check. The `Broker` calls this only for
        a valid `priority` and a str `topic`. This default returns None.
        """
        return None

    # Consuming.

    @abc.abstractmethod
    def open_consumer(self, topic: str, group: str, *, start: str,
                      prefetch: int, max_attempts: int | None,
                      ack_timeout: float | None = None) -> str:
        """Create the group if needed and register a consumer; return its id.

        `max_attempts`, when not None, overrides the topic's for the group.
        `ack_timeout` is the consumer's, for a backend that sizes a lease
        from it (redis); the others ignore it.
        """

    @abc.abstractmethod
    def close_consumer(self, topic: str, group: str, consumer: str) -> int:
        """Release the consumer's in-flight messages (attempts kept) and
        forget it; return how many went back."""

    @abc.abstractmethod
    def fetch(self, topic: str, group: str, consumer: str, max_items: int,
              *, ack_timeout: float, auto_ack: bool,
              timeout: float | None) -> list[Delivery]:
        """Deliver 1 to `max_items` messages, waiting up to `timeout`.

        Returns an empty list on timeout (never before it) and when the
        consumer already holds `prefetch` in-flight messages when the
        timeout ends.
        """

    def fetch_one(self, topic: str, group: str, consumer: str,
                  ack_timeout: float, auto_ack: bool) -> Delivery | None:
        """Deliver one message that is ready now through the backend's
        fast path; return None to make the caller use `fetch`.

        None comes back when nothing is ready and in every case that the
        fast path leaves to `fetch`. Never waits. This default returns
        None.
        """
        return None

    def message_reader(self, consumer: Any, message_type: type
                       ) -> Callable[[float, bool], Any] | None:
        """Return the fast path of `Consumer.get` for `consumer`, or None
        when the backend has none.

        The `Consumer` calls the result with ``(ack_timeout, auto_ack)``
        after `open_consumer`. It returns one message that is ready now
        as a `message_type` (built as ``message_type(consumer, delivery,
        auto_ack)``), or None to make the caller use `fetch`. This
        default wraps `fetch_one` when a subclass overrides it.
        """
        if type(self).fetch_one is Backend.fetch_one:
            return None
        fetch_one = self.fetch_one
        topic, group, consumer_id = consumer.topic, consumer.group, \
            consumer._id

        def read_one(ack_timeout: float, auto_ack: bool) -> Any:
            delivery = fetch_one(topic, group, consumer_id, ack_timeout,
                                 auto_ack)
            if delivery is None:
                return None
            return message_type(consumer, delivery, auto_ack)

        return read_one

    async def fetch_async(self, topic: str, group: str, consumer: str,
                          max_items: int, *, ack_timeout: float,
                          auto_ack: bool, timeout: float | None
                          ) -> list[Delivery]:
        """Like `fetch`, without blocking the running event loop.

        This default polls with a growing sleep (up to 10 ms); a backend
        that can notify waiters should override it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.0005
        while True:
            found = self.fetch(topic, group, consumer, max_items,
                               ack_timeout=ack_timeout, auto_ack=auto_ack,
                               timeout=0)
            if found:
                return found
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                pause = min(pause, left)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.01)

    @abc.abstractmethod
    def ack(self, topic: str, group: str, tag: Any) -> bool:
        """Finish a delivery; False if the tag is stale."""

    def ack_many(self, topic: str, group: str, tags: Sequence[Any]
                 ) -> list[bool]:
        """Finish several deliveries; return one bool per tag, False for a
        stale one. This default calls `ack` per tag; a backend with a
        round trip per call should override it."""
        return [self.ack(topic, group, tag) for tag in tags]

    @abc.abstractmethod
    def nack(self, topic: str, group: str, tag: Any, *, requeue: bool,
             delay: float | None, error: str | None) -> bool:
        """Return a delivery for retry or dead-letter it; False if stale."""

    @abc.abstractmethod
    def extend(self, topic: str, group: str, tag: Any, seconds: float
               ) -> bool:
        """Set the ack deadline to now + `seconds`; False if stale."""

    @abc.abstractmethod
    def release(self, topic: str, group: str, tags: Sequence[Any]) -> int:
        """Put unseen deliveries back at the head of their lanes, in order,
        with the attempt they used refunded; return how many went back."""

    @abc.abstractmethod
    def in_flight(self, topic: str, group: str, consumer: str) -> int:
        """Return how many messages the consumer holds unacknowledged."""

    # Dead letters.

    @abc.abstractmethod
    def dlq_list(self, topic: str, limit: int | None = None
                 ) -> list[DeadLetter]:
        """Return dead letters, oldest first."""

    @abc.abstractmethod
    def dlq_redrive(self, topic: str, ids: Sequence[str] | None = None
                    ) -> int:
        """Move dead letters (all, or those `ids`) back to their groups."""

    @abc.abstractmethod
    def dlq_purge(self, topic: str) -> int:
        """Delete every dead letter of the topic; return how many."""

    # State.

    @abc.abstractmethod
    def stats(self, topic: str) -> dict[str, int]:
        """Return counters and gauges (`COUNTER_KEYS`, `GAUGE_KEYS`)."""

    def group_stats(self, topic: str) -> list[GroupStats]:
        """Return one `GroupStats` per group of `topic`.

        Raises `UnknownTopic` for an undeclared topic. This default
        raises `NotImplementedError`: a backend reports group metrics
        only once it overrides it.
        """
        raise NotImplementedError(
            f"backend {self.name!r} does not report per-group stats")

    @abc.abstractmethod
    def wait_changed(self, timeout: float) -> None:
        """Block until the state may have changed or `timeout` passed."""

    async def run_blocking(self, function: Callable[..., Any],
                           *args: Any) -> Any:
        """Return ``function(*args)`` for a coroutine.

        This default calls it in the event loop's thread, because the
        local backends return at once. A backend that waits on the
        network runs it in other threads."""
        return function(*args)

    async def wait_changed_async(self, timeout: float) -> None:
        """Await a possible state change or `timeout` seconds, without
        blocking the event loop. This default sleeps up to 5 ms; a backend
        that can notify waiters should override it."""
        await asyncio.sleep(min(timeout, 0.005))

    def close(self) -> None:
        """Release the backend's resources; the default does nothing."""
