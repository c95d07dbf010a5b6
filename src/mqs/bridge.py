"""Forward a broker topic to another broker: `forward` and endpoint specs.

`forward` consumes a topic of one `mqs.Broker` in a consumer group and
publishes every message to a topic of another broker, then acks it at
the source. A message is acked only after the destination stored it, so
a crash of the forwarding process loses nothing: the source delivers
the unacked messages again (after their ack deadline, or at once when a
``log`` broker reopens). Each forwarded message carries the dedup id
``mqs.bridge:<source topic>:<message id>``, so the destination drops a
second copy that arrives within its topic's `dedup_window` (300 s by
default). Delivery across the hop is therefore at-least-once, and the
destination stores a message once unless its second copy arrives after
that window.

Endpoints are written ``redis://[user:password@]host:port/db#topic``
(or ``rediss://``), ``log:directory#topic`` and ``shm:name#topic``;
`open_endpoint` opens one. ``mqs bridge SOURCE DESTINATION`` runs `forward` from the command
line.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from typing import Any

from mqs.broker import Broker
from mqs.broker._broker import _check_bool
from mqs.errors import BackendConnectionError, Empty, UnknownTopic

__all__ = ["Endpoint", "forward", "open_endpoint", "parse_endpoint",
           "same_topic"]

logger = logging.getLogger(__name__)

SOURCE_HEADER = "mqs.bridge.source"
# The fix that a missing source topic's error names; `mqs bridge`
# replaces it with its --wait-for-topic option.
WAIT_HINT = "pass wait_for_topic=True to wait until a producer declares it"
# Seconds between checks for the source topic under wait_for_topic.
_TOPIC_POLL_S = 0.2


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A broker and one of its topics, as parsed from an endpoint spec."""

    backend: str
    location: str
    topic: str


def parse_endpoint(spec: str) -> Endpoint:
    """Parse ``redis://...#topic``, ``rediss://...#topic``,
    ``log:directory#topic`` or ``shm:name#topic``.

    Raises
    ------
    ValueError
        For another scheme or a missing topic, with an example.
    """
    location, sep, topic = spec.rpartition("#")
    if not sep or not topic or not location:
        raise ValueError(
            f"invalid endpoint {spec!r}: add the topic after '#', such as "
            f"'redis://127.0.0.1:6379/0#orders', 'log:broker-dir#orders' or "
            f"'shm:orders-broker#orders'")
    if location.startswith(("redis://", "rediss://")):
        return Endpoint("redis", location, topic)
    if location.startswith("log:") and len(location) > 4:
        return Endpoint("log", location[4:], topic)
    if location.startswith("shm:") and len(location) > 4:
        return Endpoint("shm", location[4:], topic)
    raise ValueError(
        f"invalid endpoint {spec!r}: it must start with redis://, "
        f"rediss://, log:<directory> or shm:<name>")


def same_topic(first: Endpoint, second: Endpoint) -> bool:
    """Return True if both endpoints name one topic of one broker.

    Log directories are compared after resolving symlinks and ``..``.
    NOTE: redis URLs are compared as written, so two spellings of one
    server (a host name and its address) are not recognized.
    """
    if first.backend != second.backend or first.topic != second.topic:
        return False
    if first.backend == "log":
        return (os.path.realpath(first.location)
                == os.path.realpath(second.location))
    return first.location == second.location


def open_endpoint(endpoint: Endpoint, *, pickle: bool = False,
                  connect_retry_timeout: float | None = None,
                  retry_timeout: float | None = None) -> Broker:
    """Open the broker of `endpoint`.

    For a redis broker, `pickle` sets ``serializer="pickle"`` (log and
    shm brokers always pickle), `retry_timeout` the seconds it retries a
    lost connection (None: the backend's default, 30 s) and
    `connect_retry_timeout` the seconds it retries an unreachable server
    while it opens (None: as long as `retry_timeout`). Log and shm
    brokers ignore the timeouts.
    """
    _check_bool("pickle", pickle)
    if endpoint.backend == "redis":
        options = {}
        if retry_timeout is not None:
            options["retry_timeout"] = retry_timeout
        return Broker(backend="redis", url=endpoint.location,
                      serializer="pickle" if pickle else None,
                      connect_retry_timeout=connect_retry_timeout,
                      **options)
    if endpoint.backend == "shm":
        return Broker(backend="shm", name=endpoint.location)
    return Broker(backend="log", path=endpoint.location)


def forward(source: Broker, source_topic: str, destination: Broker,
            destination_topic: str, *, group: str = "mqs.bridge",
            batch: int = 100, ack_timeout: float = 60.0,
            max_messages: int | None = None,
            idle_timeout: float | None = None,
            stop: threading.Event | None = None,
            wait_for_topic: bool = False) -> int:
    """Move messages from `source_topic` to `destination_topic`; return
    how many were forwarded.

    Each round gets up to `batch` messages, publishes them in one call
    with their priority, key, headers, reply_to and correlation id (plus
    the header ``mqs.bridge.source``), then acks them in one call.
    Returns after `max_messages` messages, after `idle_timeout` seconds
    without a message, or once `stop` is set (None: never).

    Raises `mqs.UnknownTopic` when `source_topic` is not declared on
    `source`, unless `wait_for_topic` is true: then it first waits until
    a producer declares the topic (or publishes to it), within the same
    `idle_timeout` and `stop`, and returns 0 if that ends the wait.
    Raises `mqs.BackendConnectionError` when a redis broker stays
    unreachable for its `retry_timeout`. If that broker is the source,
    the messages in flight go back to the group after their ack
    deadline, because closing the consumer would need the source.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int of 1 or more, got {batch!r}")
    _check_bool("wait_for_topic", wait_for_topic)
    if idle_timeout is not None and (
            isinstance(idle_timeout, bool)
            or not isinstance(idle_timeout, (int, float))
            or not 0 <= idle_timeout < math.inf):
        # NaN compares false with every idle time, so the bridge would
        # never stop.
        raise ValueError(
            f"idle_timeout must be a finite number of seconds of 0 or more, "
            f"or None to run until stopped, got {idle_timeout!r}")
    if source is destination and source_topic == destination_topic:
        # Every forwarded copy would reach the bridge's group again.
        raise ValueError(
            f"source and destination are the same topic {source_topic!r} "
            f"of one broker, so messages would loop forever; give another "
            f"destination topic")
    if not _source_topic_ready(source, source_topic, wait_for_topic,
                               idle_timeout, stop):
        return 0
    consumer = source.consume(source_topic, group, prefetch=batch,
                              ack_timeout=ack_timeout)
    destination._ensure_topic(destination_topic)
    moved = 0
    idle_since = time.monotonic()
    # Set when a call to the source raised BackendConnectionError, that
    # is, after the source's backend retried for its whole retry_timeout.
    source_lost = False
    try:
        while stop is None or not stop.is_set():
            limit = batch
            if max_messages is not None:
                limit = min(batch, max_messages - moved)
                if limit <= 0:
                    break
            try:
                messages = consumer.get_many(limit, timeout=0.2)
            except Empty:
                if idle_timeout is not None \
                        and time.monotonic() - idle_since >= idle_timeout:
                    break
                continue
            except BackendConnectionError:
                source_lost = True
                raise
            envelopes = [_envelope(destination, source_topic, message)
                         for message in messages]
            destination.backend.publish(destination_topic, envelopes, None)
            try:
                acked = consumer.ack_many(messages)
            except BackendConnectionError:
                source_lost = True
                raise
            if acked < len(messages):
                logger.warning(
                    "bridge %s -> %s: %d of %d acks came after their ack "
                    "deadline; those messages will be forwarded again and "
                    "dropped as duplicates at the destination", source_topic,
                    destination_topic, len(messages) - acked, len(messages))
            moved += len(messages)
            idle_since = time.monotonic()
    finally:
        if source_lost:
            # Closing would retry the lost source for another
            # retry_timeout before the error is raised. Its in-flight
            # messages go back after their ack deadline, as after a
            # crash. Marked closed, the consumer is skipped by
            # Broker.close as well.
            consumer._closed = True
        else:
            consumer.close(drain=False)
    return moved


def _source_topic_ready(source: Broker, topic: str, wait: bool,
                        idle_timeout: float | None,
                        stop: threading.Event | None) -> bool:
    """Return whether `topic` exists on `source`, waiting for it when
    `wait` is true; False when `idle_timeout` or `stop` ended the wait.

    Consuming a missing topic would declare it with default settings,
    so a bridge with a mistyped source name would wait forever and a
    producer's later declaration with other settings would fail.
    """
    if source.backend.has_topic(topic):
        return True
    if not wait:
        raise UnknownTopic(
            f"source topic {topic!r} does not exist on the source broker; "
            f"check the name, declare the topic first, or "
            f"{WAIT_HINT}", topic)
    logger.info("bridge: waiting for source topic %s to be declared", topic)
    started = time.monotonic()
    while not source.backend.has_topic(topic):
        if idle_timeout is not None \
                and time.monotonic() - started >= idle_timeout:
            return False
        if stop is not None:
            if stop.wait(_TOPIC_POLL_S):
                return False
        else:
            time.sleep(_TOPIC_POLL_S)
    return True


def _envelope(destination: Broker, source_topic: str, message: Any):
    headers = dict(message.headers)
    headers[SOURCE_HEADER] = f"{source_topic}/{message.id}"
    return destination._envelope(
        message.body, priority=message.priority, key=message.key,
        headers=headers,
        dedup_id=f"mqs.bridge:{source_topic}:{message.id}",
        reply_to=message.reply_to, correlation_id=message.correlation_id)
