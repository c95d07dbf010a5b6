"""Public queue classes: drop-ins for the standard library's `queue`."""

from mqs._queue import Queue, SimpleQueue
from mqs.errors import Empty, Full, ShutDown

__all__ = ["Queue", "SimpleQueue", "Empty", "Full", "ShutDown"]
