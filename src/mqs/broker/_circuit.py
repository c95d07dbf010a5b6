"""`CircuitBreaker`: stop calling a failing dependency for a while."""

from __future__ import annotations

import collections
import contextlib
import inspect
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from mqs.errors import CircuitOpen

__all__ = ["CircuitBreaker"]

_T = TypeVar("_T")


class CircuitBreaker:
    """Closed, open and half-open states driven by the failure ratio.

    Closed: calls pass, and the outcomes of the last `window` calls are
    kept. Once at least `min_calls` are kept and the failed share reaches
    `failure_ratio`, the circuit opens: calls are rejected for
    `open_seconds`. Then it is half-open: up to `half_open_calls` trial
    calls pass; if they all succeed it closes (with an empty window), one
    failure opens it again. A trial that reports no outcome within
    `open_seconds` of its `allow()` frees its slot for another trial, so
    a caller that never records an outcome cannot keep the circuit
    half-open for good.

    `call` and `call_async` count an outcome only while the state that
    allowed the call lasts. A call allowed before the circuit last
    changed state, or a trial whose slot expired, records nothing, so a
    slow call that began while the circuit was closed cannot close it
    again in place of a trial. `record_success` and `record_failure`
    cannot tell which call they report, so they always count.

    Parameters
    ----------
    failure_ratio : float
        Failed share, above 0 and at most 1, that opens the circuit.
    window : int
        Outcomes kept while closed.
    min_calls : int
        Outcomes needed before the ratio counts, at most `window`.
    open_seconds : float
        Time the circuit stays open before a trial, and the time a trial
        call may take before its slot is freed (a finite number, 0 or
        more).
    half_open_calls : int
        Trial calls allowed at once while half-open.
    clock : callable, optional
        Monotonic clock in seconds (default `time.monotonic`).

    Raises
    ------
    TypeError
        For an argument of the wrong type.
    ValueError
        For an argument outside its range.

    Notes
    -----
    A consumer uses it around the work it does per message: check
    `allow()` (or use `call` or `call_async`), and on rejection
    ``msg.nack(delay=...)`` so that the message waits instead of failing.
    """

    def __init__(self, failure_ratio: float = 0.5, window: int = 20, *,
                 min_calls: int = 10, open_seconds: float = 30.0,
                 half_open_calls: int = 1,
                 clock: Callable[[], float] | None = None) -> None:
        for name, number in (("failure_ratio", failure_ratio),
                             ("open_seconds", open_seconds)):
            if isinstance(number, bool) or not isinstance(
                    number, (int, float)):
                raise TypeError(
                    f"{name} must be a number, got "
                    f"{type(number).__name__} {number!r}")
        if not 0 < failure_ratio <= 1:
            raise ValueError(
                f"failure_ratio must be above 0 and at most 1, got "
                f"{failure_ratio!r}")
        for name, value in (("window", window), ("min_calls", min_calls),
                            ("half_open_calls", half_open_calls)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"{name} must be an int of 1 or more, got "
                    f"{type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(
                    f"{name} must be an int of 1 or more, got {value!r}")
        if min_calls > window:
            raise ValueError(
                f"min_calls must be at most window ({window}), got "
                f"{min_calls!r}")
        if not 0 <= open_seconds < math.inf:
            raise ValueError(
                f"open_seconds must be a finite number of seconds, 0 or "
                f"more, got {open_seconds!r}")
        if clock is not None and not callable(clock):
            raise TypeError(
                f"clock must be a callable that returns monotonic seconds, "
                f"such as time.monotonic, got {type(clock).__name__} "
                f"{clock!r}")
        self.failure_ratio = failure_ratio
        self.min_calls = min_calls
        self.open_seconds = open_seconds
        self.half_open_calls = half_open_calls
        self._clock = clock or time.monotonic
        self._outcomes: collections.deque[bool] = collections.deque(
            maxlen=window)
        self._lock = threading.Lock()
        self._state = "closed"
        self._opened_at = 0.0
        # Incremented at every change of state, so that `call` can drop
        # the outcome of a call that an earlier state allowed.
        self._generation = 0
        # Trial id -> clock time at which that trial call was allowed, for
        # the trials in progress, oldest first.
        self._trials: dict[int, float] = {}
        self._next_trial_id = 0
        self._trial_successes = 0

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"``."""
        with self._lock:
            self._update()
            return self._state

    def _update(self) -> None:
        now = self._clock()
        if self._state == "open" and \
                now - self._opened_at >= self.open_seconds:
            self._state = "half_open"
            self._generation += 1
            self._trials.clear()
            self._trial_successes = 0
        if self._state == "half_open":
            trials = self._trials
            while trials:
                trial_id, start = next(iter(trials.items()))
                if now - start < self.open_seconds:
                    break
                del trials[trial_id]

    def _open(self) -> None:
        self._state = "open"
        self._generation += 1
        self._opened_at = self._clock()
        self._outcomes.clear()
        self._trials.clear()

    def _end_oldest_trial(self) -> None:
        if self._trials:
            del self._trials[next(iter(self._trials))]

    def _admit(self) -> tuple[int, int | None] | None:
        """Return a ticket for a call that may go ahead now, or None.

        The ticket is the generation that allowed the call and, while
        half-open, the id of its trial slot. The lock must be held.
        """
        self._update()
        if self._state == "closed":
            return self._generation, None
        if self._state == "half_open" and \
                len(self._trials) < self.half_open_calls:
            trial_id = self._next_trial_id
            self._next_trial_id += 1
            self._trials[trial_id] = self._clock()
            return self._generation, trial_id
        return None

    def _count_success(self) -> None:
        if self._state == "half_open":
            self._trial_successes += 1
            if self._trial_successes >= self.half_open_calls:
                self._state = "closed"
                self._generation += 1
                self._outcomes.clear()
        elif self._state == "closed":
            self._outcomes.append(True)

    def _count_failure(self) -> None:
        if self._state == "half_open":
            self._open()
            return
        if self._state != "closed":
            return
        self._outcomes.append(False)
        kept = len(self._outcomes)
        failed = kept - sum(self._outcomes)
        if kept >= self.min_calls and failed / kept >= self.failure_ratio:
            self._open()

    def _settle(self, ticket: tuple[int, int | None],
                succeeded: bool | None) -> None:
        """Free the slot of the call that `ticket` admitted and count its
        outcome (None counts nothing), unless the state that admitted it
        is over or its trial slot expired."""
        generation, trial_id = ticket
        with self._lock:
            self._update()
            if generation != self._generation:
                return
            if trial_id is not None and \
                    self._trials.pop(trial_id, None) is None:
                return
            if succeeded is True:
                self._count_success()
            elif succeeded is False:
                self._count_failure()

    def allow(self) -> bool:
        """Return whether a call may go ahead now (counts a trial call
        while half-open)."""
        with self._lock:
            return self._admit() is not None

    def record_success(self) -> None:
        """Record a call that succeeded."""
        with self._lock:
            if self._state == "half_open":
                self._end_oldest_trial()
            self._count_success()

    def record_failure(self) -> None:
        """Record a call that failed; may open the circuit."""
        with self._lock:
            self._count_failure()

    def release(self) -> None:
        """Free the slot of a call that `allow()` let through but that
        ended without an outcome to record, such as one interrupted by
        KeyboardInterrupt or cancelled. Records nothing."""
        with self._lock:
            if self._state == "half_open":
                self._end_oldest_trial()

    def _rejected(self) -> CircuitOpen:
        """Return the error for a call that `allow()` rejected."""
        with self._lock:
            self._update()
            if self._state == "half_open":
                return CircuitOpen(
                    f"circuit is half_open: {len(self._trials)} "
                    f"trial call(s) are in progress and at most "
                    f"{self.half_open_calls} may run at once; retry "
                    f"later")
            left = max(0.0,
                       self._opened_at + self.open_seconds - self._clock())
            return CircuitOpen(
                f"circuit is {self._state}: calls are rejected for another "
                f"{left:.3g} s after the failure ratio reached "
                f"{self.failure_ratio}; retry later")

    def _admit_or_raise(self) -> tuple[int, int | None]:
        with self._lock:
            ticket = self._admit()
        if ticket is None:
            raise self._rejected()
        return ticket

    @contextlib.contextmanager
    def _recording_errors(self, ticket: tuple[int, int | None]
                          ) -> Iterator[None]:
        """Record an Exception raised inside as a failure, and free the
        trial slot for any other BaseException, then re-raise it."""
        try:
            yield
        except Exception:
            self._settle(ticket, False)
            raise
        except BaseException:
            self._settle(ticket, None)
            raise

    def call(self, function: Callable[..., _T], *args: Any,
             **kwargs: Any) -> _T:
        """Call `function` if the circuit allows it and record the outcome.

        An Exception from `function` is recorded as a failure. Any other
        BaseException, such as KeyboardInterrupt, records nothing and
        frees a trial slot before it propagates.

        Raises
        ------
        CircuitOpen
            While the circuit is open (the function is not called).
        TypeError
            If `function` is a coroutine function or returns an awaitable,
            whose outcome `call` cannot see. Use `call_async` instead.
        """
        if inspect.iscoroutinefunction(function):
            raise TypeError(
                f"call cannot record the outcome of coroutine function "
                f"{function!r}; use await breaker.call_async(...) instead")
        ticket = self._admit_or_raise()
        with self._recording_errors(ticket):
            result = function(*args, **kwargs)
        if inspect.isawaitable(result):
            self._settle(ticket, None)
            if inspect.iscoroutine(result):
                # Closing it avoids the "never awaited" RuntimeWarning.
                result.close()
            raise TypeError(
                f"call cannot record the outcome of {function!r}, which "
                f"returned the awaitable {result!r}; use await "
                f"breaker.call_async(...) instead")
        self._settle(ticket, True)
        return result

    async def call_async(self, function: Callable[..., Awaitable[_T]],
                         *args: Any, **kwargs: Any) -> _T:
        """Await ``function(*args, **kwargs)`` if the circuit allows it
        and record the outcome as `call` does.

        Cancellation (asyncio.CancelledError) records nothing and frees a
        trial slot.

        Raises
        ------
        CircuitOpen
            While the circuit is open (the function is not called).
        TypeError
            If `function` does not return an awaitable (a plain
            function: use `call`). Records nothing.
        """
        ticket = self._admit_or_raise()
        with self._recording_errors(ticket):
            awaitable = function(*args, **kwargs)
        if not inspect.isawaitable(awaitable):
            # A usage error, not an outcome of the protected call.
            self._settle(ticket, None)
            raise TypeError(
                f"call_async needs a function that returns an awaitable, "
                f"but {function!r} returned {awaitable!r}; pass an async "
                f"function, or use breaker.call(...) for a plain one")
        with self._recording_errors(ticket):
            result = await awaitable
        self._settle(ticket, True)
        return result
