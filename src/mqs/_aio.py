"""asyncio waits for the queues: `get_async` of `Queue`, `SimpleQueue`
and `SharedQueue`, `put_async` of `Queue` and `SharedQueue`.

The queues park threads on futexes, which an event loop cannot await. So
these coroutines try the non-blocking call and, while it fails, sleep on
the event loop for a growing pause (0.5 ms doubling up to 5 ms) before
trying again. The loop is never blocked and a cancelled await takes or
adds nothing: an item moves only in the same step that returns.
"""

import asyncio
import math
import time

from mqs.errors import Empty, Full

__all__ = ["get_async", "in_executor", "put_async"]

_FIRST_PAUSE = 0.0005
_MAX_PAUSE = 0.005


# Above this many seconds a timeout means no limit, as in the blocking
# calls (`deadline_ns` in _waiting.pxd).
_NO_LIMIT_S = 1e9


def _deadline(timeout):
    """Return the monotonic deadline `timeout` seconds ahead, or None
    for no limit.

    Checks `timeout` as the blocking `get` and `put` do, with the same
    messages: TypeError unless it converts to a C double, ValueError if
    it is negative or NaN.
    """
    if timeout is None:
        return None
    try:
        # math.fsum converts its items with PyFloat_AsDouble, as the
        # blocking calls do. float() would also parse a string.
        seconds = math.fsum((timeout,))
    except TypeError:
        raise TypeError(
            f"timeout must be a number of seconds or None, got {timeout!r}"
        ) from None
    if seconds < 0 or math.isnan(seconds):
        raise ValueError(
            f"timeout must be a non-negative number of seconds, "
            f"got {timeout!r}")
    if seconds > _NO_LIMIT_S:
        return None
    return time.monotonic() + seconds


async def _retry(attempt, failure, timeout):
    """Call `attempt()` until it stops raising `failure` or time is up."""
    deadline = _deadline(timeout)
    pause = _FIRST_PAUSE
    while True:
        try:
            return attempt()
        except failure:
            if deadline is None:
                wait = pause
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                wait = min(pause, left)
        await asyncio.sleep(wait)
        pause = min(pause * 2, _MAX_PAUSE)


async def get_async(queue, timeout=None):
    """Return ``queue.get_nowait()`` once an item is there.

    Raises `Empty` after `timeout` seconds (None: wait forever), never
    earlier, and any other error of `get_nowait` at once.
    """
    return await _retry(queue.get_nowait, Empty, timeout)


async def put_async(queue, item, timeout=None):
    """Call ``queue.put_nowait(item)`` once there is room.

    Raises `Full` after `timeout` seconds (None: wait forever), never
    earlier, and any other error of `put_nowait` at once.
    """
    return await _retry(lambda: queue.put_nowait(item), Full, timeout)


async def in_executor(function, *args):
    """Run a blocking `function(*args)` in the loop's default executor."""
    return await asyncio.get_running_loop().run_in_executor(
        None, function, *args)
