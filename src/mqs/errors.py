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
    "LogCorrupted",
    "LogPoisoned",
    "LogLocked",
    "LogVersionError",
    "OffsetOutOfRange",
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


class LogLocked(MqsError, BlockingIOError):
    """Raised when another process holds a segment log's writer lock."""


class LogVersionError(MqsError, ValueError):
    """Raised for a segment log written by a newer format version."""


class OffsetOutOfRange(MqsError, IndexError):
    """Raised for a log offset below the first retained or past the last."""
