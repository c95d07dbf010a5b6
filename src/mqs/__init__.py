"""mqs: a message queue scheduler for Python with a native core."""

from mqs.errors import Empty, Full, MessageTooLarge, MqsError, ShutDown
from mqs.errors import (
    AlreadySettled,
    BackendConnectionError,
    BackendOutOfMemory,
    CertificateVerifyError,
    BackendUnavailable,
    CircuitOpen,
    ConsumerForked,
    InvalidPriority,
    MessageDecodeError,
    MessageDetached,
    ProducerFlushError,
    ProducerForked,
    RequestTimeout,
    TopicConfigError,
    UnknownTopic,
)
from mqs.errors import (
    DirectoryKindError,
    LayoutVersionError,
    LogCorrupted,
    LogLocked,
    LogPoisoned,
    LogVersionError,
    OffsetOutOfRange,
    RecoveryPointError,
)
from mqs._limits import MAX_DELAY_SECONDS
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
from mqs import metrics

__all__ = [
    "MAX_DELAY_SECONDS",
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
    "MessageDecodeError",
    "SegmentLog",
    "LogRecord",
    "LogCorrupted",
    "LogPoisoned",
    "RecoveryPointError",
    "LogLocked",
    "LogVersionError",
    "LayoutVersionError",
    "OffsetOutOfRange",
    "DirectoryKindError",
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
    "MessageDetached",
    "ProducerFlushError",
    "ProducerForked",
    "ConsumerForked",
    "BackendConnectionError",
    "BackendOutOfMemory",
    "CertificateVerifyError",
    "BackendUnavailable",
    "metrics",
    "start_metrics_server",
]

__version__ = "0.1.0"


def start_metrics_server(port, addr="127.0.0.1", *, scan_shared=True):
    """Serve Prometheus metrics of every queue at ``http://addr:port/``.

    Exports the queues of this process and, with `scan_shared`, every
    named shared-memory queue of the machine; see
    `mqs.exporter.start_metrics_server`. Returns a `MetricsServer`;
    call its ``close()`` to stop.
    """
    from mqs.exporter import start_metrics_server as start

    return start(port, addr, scan_shared=scan_shared)

