"""Typical TimingWheel code, type-checked against _wheel.pyi by mypy."""

import array

import mqs

timers: mqs.TimingWheel[str] = mqs.TimingWheel(tick_s=0.001, capacity=64)
handle: int = timers.schedule(0.5, "a")
more: array.array[int] = timers.schedule_many([0.1, 0.2], ["b", "c"])
at: int = timers.schedule_at(12.5, "d")
cancelled: bool = timers.cancel(handle)
due: list[str] = timers.advance(now=100.0)
later: list[str] = timers.advance()
deadline: float | None = timers.next_deadline()
pending: int = len(timers)
simulated = mqs.TimingWheel[int](clock=lambda: 0.0)
size: int = simulated.nbytes + simulated.capacity
print(more, at, cancelled, due, later, deadline, pending, size, timers.tick_s)
