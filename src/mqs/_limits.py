"""Upper bound of message delays, shared by the queues and the broker."""

from __future__ import annotations

# Maximum delay in seconds that a put, publish, nack, ttl, ack deadline
# or retry backoff accepts: 10 years of 365.25 days, beyond any real
# schedule. A larger value such as 1e300 would never come due, and past
# about 292 years a deadline in int64 nanoseconds overflows.
MAX_DELAY_SECONDS = 315_576_000.0
_BOUND_TEXT = "mqs.MAX_DELAY_SECONDS = 315576000 seconds (10 years)"


def check_max_delay(name: str, seconds: float, value: object,
                    error: type[Exception] = ValueError) -> None:
    """Raise `error` naming `value` if `seconds` exceeds the bound.

    `seconds` is the delay that `value`, the argument as passed, requests
    from now. For ``name == "at"`` the value is an absolute time, so the
    message adds "from now".
    """
    if seconds > MAX_DELAY_SECONDS:
        when = " from now" if name == "at" else ""
        raise error(
            f"{name} must be at most {_BOUND_TEXT}{when}, got {value!r}")
