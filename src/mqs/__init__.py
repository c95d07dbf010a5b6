"""mqs: a message queue scheduler for Python with a native core."""

from mqs.errors import Empty, Full, MessageTooLarge, MqsError, ShutDown
from mqs.errors import (
    AlreadySettled,
    BackendUnavailable,
    CircuitOpen,
    InvalidPriority,
    RequestTimeout,
    TopicConfigError,
    UnknownTopic,
)
from mqs.errors import (
    LogCorrupted,
    LogLocked,
    LogPoisoned,
    LogVersionError,
    OffsetOutOfRange,
)
from mqs._seglog import LogRecord, SegmentLog
from mqs._ring import RingBuffer
from mqs._wheel import TimingWheel
from mqs.queue import Queue, SimpleQueue
from mqs.shared import QueueLayoutError, QueueNotFound, SharedQueue
from mqs.broker import (
    Backoff,
    Broker,
    CircuitBreaker,
    Consumer,
    DeadLetter,
    Message,
    Producer,
    Rate,
    TopicConfig,
)

__all__ = [
    "Queue",
    "SimpleQueue",
    "RingBuffer",
    "TimingWheel",
    "SharedQueue",
    "QueueNotFound",
    "QueueLayoutError",
    "MqsError",
    "Empty",
    "Full",
    "ShutDown",
    "MessageTooLarge",
    "SegmentLog",
    "LogRecord",
    "LogCorrupted",
    "LogPoisoned",
    "LogLocked",
    "LogVersionError",
    "OffsetOutOfRange",
    "Broker",
    "Consumer",
    "Message",
    "Producer",
    "Backoff",
    "Rate",
    "CircuitBreaker",
    "TopicConfig",
    "DeadLetter",
    "InvalidPriority",
    "TopicConfigError",
    "UnknownTopic",
    "RequestTimeout",
    "CircuitOpen",
    "AlreadySettled",
    "BackendUnavailable",
]

__version__ = "0.1.0"

