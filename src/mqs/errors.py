"""Exceptions raised by mqs.

Every mqs exception derives from `MqsError` and also from the builtin or
standard-library class a caller would already catch, so ``except
queue.Empty`` or ``except ValueError`` keeps working.
"""

import queue as _stdlib_queue

__all__ = [
    "MqsError",
    "Empty",
    "Full",
    "ShutDown",
    "MessageTooLarge",
    "MessageDecodeError",
    "LogCorrupted",
    "LogPoisoned",
    "RecoveryPointError",
    "LogLocked",
    "LogVersionError",
    "LayoutVersionError",
    "OffsetOutOfRange",
    "DirectoryKindError",
    "InvalidPriority",
    "TopicConfigError",
    "UnknownTopic",
    "RequestTimeout",
    "CircuitOpen",
    "AlreadySettled",
    "MessageDetached",
    "ProducerFlushError",
    "ProducerForked",
    "ConsumerForked",
    "BackendUnavailable",
    "BackendConnectionError",
    "BackendOutOfMemory",
    "CertificateVerifyError",
]


class MqsError(Exception):
    """Base class of every exception mqs raises."""


class Empty(MqsError, _stdlib_queue.Empty):
    """Raised by a non-blocking or timed-out get on an empty queue."""


class Full(MqsError, _stdlib_queue.Full):
    """Raised by a non-blocking or timed-out put on a full queue.

    Attributes
    ----------
    accepted : int
        Items of a ``put_many`` batch that were added before the queue
        stayed full (0 for a single put). Accepted items stay queued.
    """

    def __init__(self, message="", accepted=0):
        super().__init__(message)
        self.accepted = accepted


_shutdown_bases = (MqsError,)
if hasattr(_stdlib_queue, "ShutDown"):  # Python 3.13 and later
    _shutdown_bases = (MqsError, _stdlib_queue.ShutDown)


class ShutDown(*_shutdown_bases):
    """Raised by put on a shut-down queue, and by get once it is also empty.

    Attributes
    ----------
    accepted : int
        Items of a ``put_many`` batch that were added before the shutdown.
    """

    def __init__(self, message="", accepted=0):
        super().__init__(message)
        self.accepted = accepted


class MessageTooLarge(MqsError, ValueError):
    """Raised for a message larger than the queue can ever hold."""


class MessageDecodeError(MqsError, ValueError):
    """Raised by a get whose message failed to deserialize.

    The serializer's own exception is the ``__cause__``. A `SharedQueue`
    removed the message, so it is dropped, and the queue counts it under
    the reason ``"decode_failed"`` of its stats. A `Broker` consumer
    keeps the message in flight: it is delivered again after its ack
    deadline, and dead-lettered after the topic's ``max_attempts``.

    Attributes
    ----------
    topic : str or None
        The broker topic of the message (None for a `SharedQueue`).
    message_id : str or None
        The broker message id (None for a `SharedQueue`).
    """

    def __init__(self, message="", topic=None, message_id=None):
        super().__init__(message)
        self.topic = topic
        self.message_id = message_id


class LogCorrupted(MqsError, ValueError):
    """Raised when a record of a segment log fails its checks.

    Attributes
    ----------
    offset : int or None
        Offset of the damaged record, when one is known.
    path : str or None
        The log directory or the damaged file.
    """

    def __init__(self, message="", offset=None, path=None):
        super().__init__(message)
        self.offset = offset
        self.path = path


class LogPoisoned(MqsError, OSError):
    """Raised by every append after a sync of a segment log failed.

    A failed fsync or msync may leave the kernel's pages marked clean, so
    a later sync could report success for lost data; the log therefore
    takes no more writes. Reopen it to recover what reached the disk.
    """


class RecoveryPointError(MqsError, OSError):
    """Raised by `SegmentLog.close` when writing the recovery point failed.

    The records are intact and the handle is closed. Without a recovery
    point that covers the last records, the next open checks their CRCs
    and cannot resynchronize past a damaged record length among them.
    `filename` is the recovery point's path.
    """


class LogLocked(MqsError, BlockingIOError):
    """Raised when another process holds a segment log's writer lock."""


class LogVersionError(MqsError, ValueError):
    """Raised for a segment log written by a newer format version."""


class LayoutVersionError(MqsError, ValueError):
    """Raised when a shared-memory file of mqs (an shm broker's journal or
    topic core, a SharedQueue) has another layout version than this mqs
    reads: processes of two mqs versions share it.

    Attributes
    ----------
    path : str or None
        The file.
    version : int or None
        The layout version of the file.
    expected_version : int or None
        The layout version this mqs reads.
    """

    def __init__(self, message="", path=None, version=None,
                 expected_version=None):
        super().__init__(message)
        self.path = path
        self.version = version
        self.expected_version = expected_version


class OffsetOutOfRange(MqsError, IndexError):
    """Raised for a log offset below the first retained or past the last."""


class DirectoryKindError(MqsError, ValueError):
    """Raised when a directory given to one kind of mqs storage belongs to
    another kind (a durable SharedQueue's, a log broker's, a bare segment
    log's).

    Attributes
    ----------
    path : str or None
        The directory.
    kind : str or None
        The kind of storage found there, e.g. ``"log broker"``.
    """

    def __init__(self, message="", path=None, kind=None):
        super().__init__(message)
        self.path = path
        self.kind = kind


class InvalidPriority(MqsError, ValueError):
    """Raised for a message priority outside 0 to 9."""


class TopicConfigError(MqsError, ValueError):
    """Raised for an invalid topic setting, or one that conflicts with the
    settings a backend already stores for the topic."""


class UnknownTopic(MqsError, LookupError):
    """Raised for a topic that was never declared on the broker, or that
    was deleted while a publish waited for room in it.

    Attributes
    ----------
    topic : str
        The name that was not found.
    deleted : bool
        True when the topic was deleted while a blocked publish waited
        for room. `Broker.publish` then raises instead of declaring the
        topic anew, so no message lands in a topic that someone removed.
    published : int
        With `deleted`: how many of the call's messages were published
        before the topic was deleted.
    """

    def __init__(self, message="", topic=None, *, deleted=False,
                 published=0):
        super().__init__(message)
        self.topic = topic
        self.deleted = deleted
        self.published = published


class RequestTimeout(MqsError, TimeoutError):
    """Raised by `Broker.request` when no reply arrived in time."""


class CircuitOpen(MqsError, RuntimeError):
    """Raised by `CircuitBreaker.call` while the circuit is open."""


class AlreadySettled(MqsError, RuntimeError):
    """Raised by a second ack or nack of one delivered message."""


class MessageDetached(MqsError, RuntimeError):
    """Raised by `ack`, `nack`, `extend` and `reply` of a copy of a
    delivered message (made by `copy.copy`, `copy.deepcopy` or
    `pickle`); settle the original message instead."""


class ProducerFlushError(MqsError, RuntimeError):
    """Raised by `Broker.close` when producers could not publish their
    buffered messages. Those messages were dropped, logged and counted in
    `Producer.dropped`.

    Attributes
    ----------
    dropped : int
        Messages dropped, over every producer.
    by_topic : dict
        Messages dropped per topic.
    """

    def __init__(self, message="", dropped=0, by_topic=None):
        super().__init__(message)
        self.dropped = dropped
        self.by_topic = dict(by_topic or {})


class ProducerForked(MqsError, RuntimeError):
    """Raised by every call of a `Producer` in a process forked from the
    one that created it.

    The child's copy of the producer shares the parent's buffered
    messages and may hold a copy of a lock taken at the fork, so using it
    could publish the parent's messages twice or wait forever. Create a
    new producer in the child with `Broker.producer`.
    """


class ConsumerForked(MqsError, RuntimeError):
    """Raised by a `Consumer` and by the messages it delivered when they
    are used in a process forked from the one that opened the consumer.

    The consumer's in-flight messages belong to that process: a child
    that acked one would make the parent's ack count as late, and a
    child that closed the consumer would hand the parent's messages to
    other consumers. Open a consumer in the child with `Broker.consume`.
    """


class BackendUnavailable(MqsError, ValueError):
    """Raised by `Broker` for a backend name that this build lacks, or
    whose client library (redis-py for ``"redis"``) is not installed."""


class BackendConnectionError(MqsError, ConnectionError):
    """Raised when a broker backend's server stays unreachable, or
    rejects the credentials, after the backend's retries."""


class BackendOutOfMemory(Full):
    """Raised at once, whatever the topic's `when_full`, by a call that
    would store data on a broker backend's server that is out of memory.
    For Redis, that is a server whose used memory is above its
    ``maxmemory`` and whose policy evicts nothing (``noeviction``).

    Publishing, declaring a topic and opening the first consumer of a
    group raise it. Getting, acking, nacking, closing consumers and
    purging dead letters keep working, so consumers can free memory.
    Raise ``maxmemory``, shorten the topic's retention, consume and ack
    the backlog or purge the dead letters, then publish again.

    Attributes
    ----------
    topic : str or None
        The topic of the call.
    accepted : int
        Messages of the call that were published before the server ran
        out of memory. They stay stored.
    """

    def __init__(self, message="", accepted=0, topic=None):
        super().__init__(message, accepted)
        self.topic = topic


class CertificateVerifyError(BackendConnectionError):
    """Raised at once, without retries, when the TLS certificate of a
    broker backend's server fails verification."""
