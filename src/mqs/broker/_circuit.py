"""`CircuitBreaker`: stop calling a failing dependency for a while."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
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
    failure opens it again.

    Parameters
    ----------
    failure_ratio : float
        Failed share, above 0 and at most 1, that opens the circuit.
    window : int
        Outcomes kept while closed.
    min_calls : int
        Outcomes needed before the ratio counts, at most `window`.
    open_seconds : float
        Time the circuit stays open before a trial.
    half_open_calls : int
        Trial calls allowed while half-open.
    clock : callable, optional
        Monotonic clock in seconds (default `time.monotonic`).

    Notes
    -----
    A consumer uses it around the work it does per message: check
    `allow()` (or use `call`), and on rejection ``msg.nack(delay=...)``
    so that the message waits instead of failing.
    """

    def __init__(self, failure_ratio: float = 0.5, window: int = 20, *,
                 min_calls: int = 10, open_seconds: float = 30.0,
                 half_open_calls: int = 1,
                 clock: Callable[[], float] | None = None) -> None:
        if not 0 < failure_ratio <= 1:
            raise ValueError(
                f"failure_ratio must be above 0 and at most 1, got "
                f"{failure_ratio!r}")
        for name, value in (("window", window), ("min_calls", min_calls),
                            ("half_open_calls", half_open_calls)):
            if isinstance(value, bool) or not isinstance(value, int) \
                    or value < 1:
                raise ValueError(
                    f"{name} must be an int of 1 or more, got {value!r}")
        if min_calls > window:
            raise ValueError(
                f"min_calls must be at most window ({window}), got "
                f"{min_calls!r}")
        if not open_seconds >= 0:
            raise ValueError(
                f"open_seconds must be 0 or more, got {open_seconds!r}")
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
        self._trials = 0
        self._trial_successes = 0

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"``."""
        with self._lock:
            self._update()
            return self._state

    def _update(self) -> None:
        if self._state == "open" and \
                self._clock() - self._opened_at >= self.open_seconds:
            self._state = "half_open"
            self._trials = 0
            self._trial_successes = 0

    def _open(self) -> None:
        self._state = "open"
        self._opened_at = self._clock()
        self._outcomes.clear()

    def allow(self) -> bool:
        """Return whether a call may go ahead now (counts a trial call
        while half-open)."""
        with self._lock:
            self._update()
            if self._state == "closed":
                return True
            if self._state == "half_open" and \
                    self._trials < self.half_open_calls:
                self._trials += 1
                return True
            return False

    def record_success(self) -> None:
        """Record a call that succeeded."""
        with self._lock:
            if self._state == "half_open":
                self._trial_successes += 1
                if self._trial_successes >= self.half_open_calls:
                    self._state = "closed"
                    self._outcomes.clear()
            elif self._state == "closed":
                self._outcomes.append(True)

    def record_failure(self) -> None:
        """Record a call that failed; may open the circuit."""
        with self._lock:
            if self._state == "half_open":
                self._open()
                return
            if self._state != "closed":
                return
            self._outcomes.append(False)
            kept = len(self._outcomes)
            failed = kept - sum(self._outcomes)
            if kept >= self.min_calls and \
                    failed / kept >= self.failure_ratio:
                self._open()

    def call(self, function: Callable[..., _T], *args: Any,
             **kwargs: Any) -> _T:
        """Call `function` if the circuit allows it and record the outcome.

        Raises
        ------
        CircuitOpen
            While the circuit is open (the function is not called).
        """
        if not self.allow():
            raise CircuitOpen(
                f"circuit is {self.state}: calls are rejected for "
                f"{self.open_seconds} s after the failure ratio reached "
                f"{self.failure_ratio}; retry later")
        try:
            result = function(*args, **kwargs)
        except Exception:
            self.record_failure()
            raise
        self.record_success()
        return result
