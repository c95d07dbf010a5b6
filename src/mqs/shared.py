"""Public shared-memory queue: a drop-in for `multiprocessing.Queue`."""

from mqs._shared import QueueLayoutError, QueueNotFound, SharedQueue

__all__ = ["SharedQueue", "QueueNotFound", "QueueLayoutError"]
