"""mqs: a message queue scheduler for Python with a native core."""

from mqs.errors import Empty, Full, MessageTooLarge, MqsError, ShutDown
from mqs._ring import RingBuffer
from mqs.queue import Queue, SimpleQueue

__all__ = [
    "Queue",
    "SimpleQueue",
    "RingBuffer",
    "MqsError",
    "Empty",
    "Full",
    "ShutDown",
    "MessageTooLarge",
]

__version__ = "0.1.0"

