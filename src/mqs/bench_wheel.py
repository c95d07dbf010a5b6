"""Timer benchmarks of `mqs.TimingWheel` against heapq, sched and asyncio.

Every scheduler gets the same timers: `count` items with random delays in
[0, 60) s (fixed seed) on a simulated clock that starts at 0, so the
delays are the deadlines. Each phase runs with the garbage collector off,
as in `timeit`, and is timed twice: in CPU time of the running thread
(`time.thread_time_ns`) and in wall time (`time.perf_counter_ns`). Rates
and ratios use the CPU time, which leaves out the time the OS gave other
processes. On a shared machine that time is most of the run-to-run noise.
The phases are:

- ``insert``: schedule every timer, one call per timer.
- ``cancel``: cancel every other timer, one call per timer.
- ``expire``: move the clock forward in 10 ms steps until it passes 60 s
  and collect the items that come due. The rate counts items fired.
- ``schedule_many`` (the wheel only): schedule every timer in one call.
  Its tracked ratio is against heapq's one-call-per-timer ``insert``.

The schedulers:

- ``mqs.TimingWheel``: `schedule_at`, `cancel`, `advance(now)`.
- ``heapq``: `HeapqScheduler` below, the priority-queue recipe of the
  `heapq` documentation: ``[deadline, sequence, item]`` lists on a heap,
  int handles mapped to entries by a dict, lazy cancel by marking the
  entry, and marked entries skipped as they are popped.
- ``sched.scheduler``: `enterabs`, `cancel` and `run(blocking=False)` with
  a simulated `timefunc`. Its cancel is a list removal plus a re-heapify,
  which is O(n). So it gets at most `SCHED_MAX_COUNT` timers and cancels
  for at most `SCHED_CANCEL_BUDGET_S` seconds, and the result records how
  many operations it did.
- ``asyncio.call_at``: `loop.call_at` on a loop that is not running, whose
  `time` returns the simulated clock; `TimerHandle.cancel`; each step runs
  the loop once (`call_soon(loop.stop)` then `run_forever`).

sched and asyncio run a callback per fired timer (`list.append`) because
their APIs require one; the wheel and heapq return the items instead.

Each run is checked after its timed phases, since the rate of a wrong run
means nothing: every timer not cancelled fired exactly once, in deadline
order, in the first step whose time is at or past its deadline (asyncio
may fire up to its clock resolution early, as its event loop does).
A failed check raises `mqs.bench.BenchmarkError`.

The tracked ratios (`TRACKED_RATIOS`) are meant for the default count of
1,000,000 timers. With a few thousand, heapq's pops are cheap and the
wheel's 6,001 advance calls dominate its expire phase, so the ratios drop.

This module only measures: `run_wheel_bench` returns a dict, and
`format_wheel_bench` renders it as text.

`run_delivery_lateness` measures delayed delivery of `mqs.SharedQueue`
across processes instead: how long after their due time delayed
messages are in the ring and returned by `get` in a consumer process
that is busy half of the time. It returns a `DeliveryLateness`, and
`format_delivery_lateness` renders it as text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import heapq
import itertools
import multiprocessing
import random
import sched
import statistics
import struct
import time
from collections.abc import Callable
from typing import Any

import mqs
from mqs.bench import BenchmarkError, machine_info

DELAY_RANGE_S = 60.0
STEP_S = 0.01
TICK_S = 0.001
DEFAULT_COUNT = 1_000_000
DEFAULT_REPEAT = 3
DEFAULT_SEED = 20261204
SCHED_MAX_COUNT = 100_000
SCHED_CANCEL_BUDGET_S = 1.0

WHEEL = "mqs.TimingWheel"
HEAPQ = "heapq"
SCHED = "sched.scheduler"
ASYNCIO = "asyncio.call_at"
SCHEDULERS = (WHEEL, HEAPQ, SCHED, ASYNCIO)
PHASES = ("insert", "cancel", "expire", "schedule_many")

# (name, phase of mqs.TimingWheel, phase of heapq, minimum ratio of rates)
TRACKED_RATIOS = (
    ("insert_vs_heapq", "insert", "insert", 4.0),
    ("expire_vs_heapq", "expire", "expire", 10.0),
    ("cancel_vs_heapq", "cancel", "cancel", 1.0),
    ("schedule_many_vs_heapq_insert", "schedule_many", "insert", 10.0),
)

_REMOVED = object()


class HeapqScheduler:
    """A timer scheduler on `heapq` with lazy cancellation.

    It follows the priority-queue recipe of the `heapq` documentation.
    Heap entries are ``[deadline, sequence, item]`` lists, and a dict maps
    each sequence number (the handle, an int like the wheel's) to its
    entry. `cancel` pops the entry from the dict and marks it, and
    `advance` skips marked entries as it pops.
    """

    def __init__(self) -> None:
        self._heap: list[list[Any]] = []
        self._entries: dict[int, list[Any]] = {}
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def schedule_at(self, deadline: float, item: Any) -> int:
        handle = next(self._counter)
        entry = [deadline, handle, item]
        self._entries[handle] = entry
        heapq.heappush(self._heap, entry)
        return handle

    def cancel(self, handle: int) -> bool:
        entry = self._entries.pop(handle, None)
        if entry is None:
            return False
        entry[2] = _REMOVED
        return True

    def advance(self, now: float) -> list[Any]:
        heap = self._heap
        entries = self._entries
        pop = heapq.heappop
        fired = []
        while heap and heap[0][0] <= now:
            _, handle, item = pop(heap)
            if item is not _REMOVED:
                del entries[handle]
                fired.append(item)
        return fired


class SimulatedClock:
    """A clock for the schedulers under test; `now` is set by the run."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_deadlines(count: int, seed: int = DEFAULT_SEED) -> list[float]:
    """Return `count` random deadlines in [0, 60) s, from a fixed seed."""
    rng = random.Random(seed)
    return [rng.random() * DELAY_RANGE_S for _ in range(count)]


def step_times() -> list[float]:
    """Return the clock readings of the expire phase: 10 ms steps past 60 s."""
    steps = int(DELAY_RANGE_S / STEP_S) + 1
    return [(k + 1) * STEP_S for k in range(steps)]


def _timed(function: Callable[[], Any]) -> tuple[int, int, Any]:
    """Run `function` with the collector off.

    Returns (wall ns, CPU ns of this thread, result).
    """
    gc.collect()
    gc.disable()
    try:
        start_cpu = time.thread_time_ns()
        start = time.perf_counter_ns()
        result = function()
        elapsed = time.perf_counter_ns() - start
        elapsed_cpu = time.thread_time_ns() - start_cpu
    finally:
        gc.enable()
    return elapsed, elapsed_cpu, result


def _expire_steps(advance: Callable[[float], Any]) -> tuple[list, list[int]]:
    """Call advance(t) for every step; return the items and step ends."""
    fired: list = []
    ends = []
    for now in step_times():
        fired += advance(now)
        ends.append(len(fired))
    return fired, ends


def check_expiry(label: str, deadlines: list[float], cancelled: set[int],
                 fired: list[int], ends: list[int],
                 early_tolerance_s: float = 0.0) -> None:
    """Raise `BenchmarkError` unless `fired` is exactly right.

    `fired` contains the indexes of fired timers in firing order, and
    ends[k] is len(fired) after step k. Every index not in `cancelled`
    must appear once, in deadline order, in the first step whose time is
    at or past its deadline (minus `early_tolerance_s`). Times are
    compared in whole nanoseconds, the wheel's resolution, so two
    deadlines less than a nanosecond apart count as equal.
    """
    expected = len(deadlines) - len(cancelled)
    if len(fired) != expected or len(set(fired)) != expected:
        raise BenchmarkError(
            f"{label}: fired {len(fired)} timers ({len(set(fired))} "
            f"distinct), expected {expected}")
    if cancelled.intersection(fired):
        raise BenchmarkError(f"{label}: a cancelled timer fired")

    tolerance_ns = round(early_tolerance_s * 1e9)
    start = 0
    previous_deadline_ns = -(2**63)
    previous_now_ns = -(2**63)
    for now, end in zip(step_times(), ends):
        now_ns = round(now * 1e9)
        for index in fired[start:end]:
            deadline_ns = round(deadlines[index] * 1e9)
            if deadline_ns < previous_deadline_ns:
                raise BenchmarkError(
                    f"{label}: timer {index} (deadline {deadline_ns} ns) "
                    f"fired after one due at {previous_deadline_ns} ns")
            if deadline_ns > now_ns + tolerance_ns:
                raise BenchmarkError(
                    f"{label}: timer {index} fired early at {now_ns} ns, "
                    f"deadline {deadline_ns} ns")
            if deadline_ns < previous_now_ns:
                raise BenchmarkError(
                    f"{label}: timer {index} fired late at {now_ns} ns, "
                    f"deadline {deadline_ns} ns")
            previous_deadline_ns = deadline_ns
        start = end
        previous_now_ns = now_ns


class WheelRun:
    """One run of `mqs.TimingWheel`, whose items are the timer indexes."""

    label = WHEEL
    max_count: int | None = None
    early_tolerance_s = 0.0

    def __init__(self, count: int) -> None:
        self.clock = SimulatedClock()
        self.wheel: mqs.TimingWheel[int] = mqs.TimingWheel(
            TICK_S, count, clock=self.clock)

    def insert(self, deadlines: list[float], items: list[int]) -> list:
        schedule_at = self.wheel.schedule_at
        return [schedule_at(d, i) for d, i in zip(deadlines, items)]

    def schedule_many(self, deadlines: list[float], items: list[int]) -> list:
        return self.wheel.schedule_many(deadlines, items)

    def cancel(self, handles: list) -> int:
        cancel = self.wheel.cancel
        return sum([cancel(h) for h in handles])

    def expire(self) -> tuple[list, list[int]]:
        return _expire_steps(self.wheel.advance)

    def pending(self) -> int:
        return len(self.wheel)

    def close(self) -> None:
        pass


class HeapqRun(WheelRun):
    """One run of `HeapqScheduler`."""

    label = HEAPQ

    def __init__(self, count: int) -> None:
        self.scheduler = HeapqScheduler()

    def insert(self, deadlines: list[float], items: list[int]) -> list:
        schedule_at = self.scheduler.schedule_at
        return [schedule_at(d, i) for d, i in zip(deadlines, items)]

    def cancel(self, handles: list) -> int:
        cancel = self.scheduler.cancel
        return sum([cancel(h) for h in handles])

    def expire(self) -> tuple[list, list[int]]:
        return _expire_steps(self.scheduler.advance)

    def pending(self) -> int:
        return len(self.scheduler)


class SchedRun(WheelRun):
    """One run of `sched.scheduler`, with the bounds in the module docstring."""

    label = SCHED
    max_count = SCHED_MAX_COUNT

    def __init__(self, count: int) -> None:
        self.clock = SimulatedClock()
        self.scheduler = sched.scheduler(timefunc=self.clock,
                                         delayfunc=lambda _: None)
        self.fired: list[int] = []

    def insert(self, deadlines: list[float], items: list[int]) -> list:
        enterabs = self.scheduler.enterabs
        append = self.fired.append
        return [enterabs(d, 0, append, (i,)) for d, i in zip(deadlines, items)]

    def cancel(self, handles: list) -> int:
        """Cancel handles in order until done or out of time budget."""
        cancel = self.scheduler.cancel
        budget_end = time.perf_counter_ns() + int(SCHED_CANCEL_BUDGET_S * 1e9)
        done = 0
        for event in handles:
            cancel(event)
            done += 1
            if time.perf_counter_ns() > budget_end:
                break
        return done

    def expire(self) -> tuple[list, list[int]]:
        ends = []
        for now in step_times():
            self.clock.now = now
            self.scheduler.run(blocking=False)
            ends.append(len(self.fired))
        return self.fired, ends

    def pending(self) -> int:
        return len(self.scheduler.queue)


class AsyncioRun(WheelRun):
    """One run of `loop.call_at` on an event loop that is not running.

    The loop's `time` returns the simulated clock, and each step runs the
    loop once. Its run loop fires timers due before now plus the clock
    resolution, so they may fire that much early.
    """

    label = ASYNCIO
    early_tolerance_s = time.get_clock_info("monotonic").resolution

    def __init__(self, count: int) -> None:
        self.clock = SimulatedClock()
        self.loop = asyncio.new_event_loop()
        self.loop.time = self.clock  # type: ignore[method-assign]
        self.fired: list[int] = []

    def insert(self, deadlines: list[float], items: list[int]) -> list:
        call_at = self.loop.call_at
        append = self.fired.append
        return [call_at(d, append, i) for d, i in zip(deadlines, items)]

    def cancel(self, handles: list) -> int:
        for handle in handles:
            handle.cancel()
        return len(handles)

    def expire(self) -> tuple[list, list[int]]:
        loop = self.loop
        ends = []
        for now in step_times():
            self.clock.now = now
            loop.call_soon(loop.stop)
            loop.run_forever()
            ends.append(len(self.fired))
        return self.fired, ends

    def pending(self) -> int:
        return len(self.loop._scheduled)  # type: ignore[attr-defined]

    def close(self) -> None:
        self.loop.close()


RUNS: dict[str, type[WheelRun]] = {
    WHEEL: WheelRun,
    HEAPQ: HeapqRun,
    SCHED: SchedRun,
    ASYNCIO: AsyncioRun,
}


def workload(run_class: type[WheelRun], deadlines: list[float]
             ) -> tuple[list[float], list[int]]:
    """Return the deadlines and items one scheduler gets (sched: fewer)."""
    if run_class.max_count is not None:
        deadlines = deadlines[:run_class.max_count]
    return deadlines, list(range(len(deadlines)))


def _phase(timing: list[int], operations: int) -> dict:
    wall_ns, cpu_ns = timing
    return {"operations": operations, "wall_ns": wall_ns, "cpu_ns": cpu_ns,
            "ops_per_s": operations * 1e9 / max(cpu_ns, 1),
            "wall_ops_per_s": operations * 1e9 / max(wall_ns, 1)}


def run_once(run_class: type[WheelRun], all_deadlines: list[float]) -> dict:
    """Time the insert, cancel and expire phases (and the wheel's
    schedule_many) of one scheduler, check the results, return rates."""
    deadlines, items = workload(run_class, all_deadlines)
    count = len(deadlines)
    label = run_class.label
    result = {}

    run = run_class(count)
    try:
        *insert_time, handles = _timed(lambda: run.insert(deadlines, items))
        *cancel_time, cancelled = _timed(lambda: run.cancel(handles[::2]))
        if run_class is not SchedRun and cancelled != len(handles[::2]):
            raise BenchmarkError(
                f"{label}: cancelled {cancelled} pending timers, expected "
                f"{len(handles[::2])}")
        *expire_time, (fired, ends) = _timed(run.expire)
        check_expiry(label, deadlines, set(items[::2][:cancelled]), fired,
                     ends, run_class.early_tolerance_s)
        if run.pending() != 0:
            raise BenchmarkError(
                f"{label}: {run.pending()} timers left pending")
    finally:
        run.close()
    result["insert"] = _phase(insert_time, count)
    result["cancel"] = _phase(cancel_time, cancelled)
    result["expire"] = _phase(expire_time, len(fired))

    if run_class is WheelRun:
        run = run_class(count)
        *many_time, handles = _timed(
            lambda: run.schedule_many(deadlines, items))
        if len(set(handles)) != count:
            raise BenchmarkError(
                f"{label}: schedule_many returned {len(set(handles))} "
                f"distinct handles, expected {count}")
        fired, ends = run.expire()
        check_expiry(f"{label} schedule_many", deadlines, set(), fired, ends)
        result["schedule_many"] = _phase(many_time, count)
    return result


def _summarise(runs: list[dict]) -> dict:
    """Median, min and max rate of each phase over repeated runs."""
    summary = {}
    for phase in runs[0]:
        rates = [run[phase]["ops_per_s"] for run in runs]
        wall_rates = [run[phase]["wall_ops_per_s"] for run in runs]
        summary[phase] = {
            "operations": runs[0][phase]["operations"],
            "ops_per_s": statistics.median(rates),
            "min_ops_per_s": min(rates),
            "max_ops_per_s": max(rates),
            "wall_ops_per_s": statistics.median(wall_rates),
        }
    return summary


def run_wheel_bench(count: int = DEFAULT_COUNT,
                    repeat: int = DEFAULT_REPEAT, *,
                    seed: int = DEFAULT_SEED) -> dict:
    """Time the wheel and its peers on `count` timers, `repeat` times each.

    The runs of the schedulers alternate (wheel, heapq, sched, asyncio,
    then again), so a slow spell of the machine hits all of them alike.

    Returns
    -------
    dict
        ``count``, ``repeat``, ``seed``, ``machine``
        (`mqs.bench.machine_info`), ``schedulers`` (per scheduler and
        phase: ``operations`` per run, the median, min and max
        ``ops_per_s`` from CPU time, and the median ``wall_ops_per_s``),
        and ``ratios`` (per tracked ratio: ``measured`` ratio of median
        rates, ``target`` and ``met``).

    Raises
    ------
    ValueError
        If `count` or `repeat` is below 1.
    mqs.bench.BenchmarkError
        If a run fired a wrong set of timers or fired them out of order.
    """
    if count < 1 or repeat < 1:
        raise ValueError(
            f"count and repeat must be at least 1, got {count!r} and "
            f"{repeat!r}")
    deadlines = make_deadlines(count, seed)
    runs: dict[str, list[dict]] = {name: [] for name in SCHEDULERS}
    for _ in range(repeat):
        for name in SCHEDULERS:
            runs[name].append(run_once(RUNS[name], deadlines))

    schedulers = {name: _summarise(runs[name]) for name in SCHEDULERS}
    ratios = {}
    for name, wheel_phase, heapq_phase, target in TRACKED_RATIOS:
        measured = (schedulers[WHEEL][wheel_phase]["ops_per_s"]
                    / schedulers[HEAPQ][heapq_phase]["ops_per_s"])
        ratios[name] = {"measured": measured, "target": target,
                        "met": measured >= target}
    return {"count": count, "repeat": repeat, "seed": seed,
            "machine": machine_info(), "schedulers": schedulers,
            "ratios": ratios}


def format_wheel_bench(result: dict) -> str:
    """Render a `run_wheel_bench` result as a plain-text table."""
    machine = result["machine"]
    flags = machine["build"].get("compiler_flags") or ["unknown"]
    load = " ".join(f"{value:.2f}"
                    for value in machine["load_average"] or [])
    lines = [
        f"Python {machine['python_version']} on {machine['cpu_model']} "
        f"({machine['cpus_usable']} CPUs usable, load average {load}), "
        f"extension built with {' '.join(flags)}",
        f"{result['count']:,} timers, delays in [0, {DELAY_RANGE_S:g}) s, "
        f"{result['repeat']} runs each, median rates (ops/s of CPU time)",
        f"{'scheduler':<18}" + "".join(f"{phase:>15}" for phase in PHASES),
    ]
    heapq_rates = result["schedulers"][HEAPQ]
    for name in SCHEDULERS:
        cells = []
        for phase in PHASES:
            stats = result["schedulers"][name].get(phase)
            cells.append("-" if stats is None
                         else f"{stats['ops_per_s']:,.0f}")
        lines.append(f"{name:<18}" + "".join(f"{c:>15}" for c in cells))
        ratio_cells = []
        for phase in PHASES:
            stats = result["schedulers"][name].get(phase)
            base = heapq_rates.get("insert" if phase == "schedule_many"
                                   else phase)
            ratio_cells.append(
                "-" if stats is None or base is None
                else f"{stats['ops_per_s'] / base['ops_per_s']:.2f}x")
        lines.append(f"{'  x heapq':<18}"
                     + "".join(f"{c:>15}" for c in ratio_cells))
    count = result["count"]
    full = {"insert": count, "cancel": (count + 1) // 2,
            "expire": count // 2, "schedule_many": count}
    for name in SCHEDULERS:
        partial = [f"{phase} {stats['operations']:,}"
                   for phase, stats in result["schedulers"][name].items()
                   if stats["operations"] != full[phase]]
        if partial:
            lines.append(f"{name} ran fewer operations: "
                         + ", ".join(partial))
    lines.append("tracked ratios:")
    for name, ratio in result["ratios"].items():
        verdict = "met" if ratio["met"] else "NOT met"
        lines.append(f"  {name}: {ratio['measured']:.2f}x "
                     f"(target {ratio['target']:g}x, {verdict})")
    return "\n".join(lines)


# -- delayed delivery lateness across processes ------------------------------

LATENESS_MESSAGES = 2000
LATENESS_MAX_DELAY_S = 2.0
LATENESS_BUSY_FRACTION = 0.5
LATENESS_BUSY_SLICE_S = 0.0005
LATENESS_TIMEOUT_S = 120.0
_LATENESS_ITEM = struct.Struct("<qq")  # message number, due time in ns


@dataclasses.dataclass(frozen=True)
class DeliveryLateness:
    """Lateness of delayed messages of a `mqs.SharedQueue`, in seconds.

    ``due_to_ready``: from a message's due time to the moment the busy
    consumer had moved it into the ring. ``due_to_get``: from its due
    time to the moment `get` returned it in that consumer. Each is a dict
    with ``p50``, ``p99`` and ``max``. ``early`` counts messages seen
    before their due time (a correct queue has none). ``target_p99_s``
    is one tick (1 ms) plus 1 ms, the bound for ``due_to_ready["p99"]``.
    """

    messages: int
    max_delay_s: float
    busy_fraction: float
    busy_slice_s: float
    tick_s: float
    due_to_ready: dict
    due_to_get: dict
    early: int
    target_p99_s: float
    machine: dict

    @property
    def met(self) -> bool:
        """Whether the p99 from due to ready is within the target."""
        return self.due_to_ready["p99"] <= self.target_p99_s

    def to_dict(self) -> dict:
        """Return the result as a JSON-ready dict (with ``met``)."""
        return {**dataclasses.asdict(self), "met": self.met}


def _percentiles(values_ns: list[int]) -> dict:
    ordered = sorted(values_ns)

    def at(fraction: float) -> float:
        index = min(len(ordered) - 1, int(fraction * len(ordered)))
        return ordered[index] / 1e9

    return {"p50": at(0.50), "p99": at(0.99), "max": ordered[-1] / 1e9}


def _busy_consumer(q, count: int, busy_fraction: float, busy_slice_s: float,
                   pipe) -> None:
    """Child process: alternate CPU work and gets until `count` arrive.

    Sends back (got, moves): got is a list of (number, due_ns, got_ns),
    moves the handle's move trace (see `SharedQueue._trace_moves`).
    """
    moves = q._trace_moves()
    busy_ns = int(busy_slice_s * 1e9)
    idle_ns = int(busy_ns * (1 - busy_fraction) / busy_fraction) \
        if busy_fraction > 0 else busy_ns
    got = []
    end = time.monotonic_ns() + int(LATENESS_TIMEOUT_S * 1e9)
    while len(got) < count and time.monotonic_ns() < end:
        stop = time.monotonic_ns() + busy_ns
        while time.monotonic_ns() < stop:
            pass
        stop = time.monotonic_ns() + idle_ns
        while len(got) < count:
            left = stop - time.monotonic_ns()
            if left <= 0:
                break
            try:
                data = q.get(timeout=left / 1e9)
            except mqs.Empty:
                break
            now = time.monotonic_ns()
            number, due = _LATENESS_ITEM.unpack(data)
            got.append((number, due, now))
    pipe.send((got, list(moves)))
    pipe.close()


def run_delivery_lateness(messages: int = LATENESS_MESSAGES, *,
                          max_delay_s: float = LATENESS_MAX_DELAY_S,
                          busy_fraction: float = LATENESS_BUSY_FRACTION,
                          busy_slice_s: float = LATENESS_BUSY_SLICE_S,
                          seed: int = DEFAULT_SEED) -> DeliveryLateness:
    """Measure how late delayed messages reach a busy consumer process.

    A producer process puts `messages` messages with random delays in
    [0.01, `max_delay_s`) s into an anonymous `mqs.SharedQueue` and
    exits; a consumer process alternates `busy_slice_s` of CPU work with
    waiting in `get` (busy `busy_fraction` of the time, 0.5 by default),
    so it moves each message into the ring itself, once its wait ends.
    The due time is read just before the put, so the measured lateness
    is at most a microsecond or so above the true one.

    Returns
    -------
    DeliveryLateness

    Raises
    ------
    ValueError
        If a count, delay or fraction is out of range.
    mqs.bench.BenchmarkError
        If the consumer missed or duplicated a message, or it timed out.
    """
    if messages < 1 or not 0.01 < max_delay_s <= 3600 \
            or not 0 < busy_fraction < 1 or not 0 < busy_slice_s <= 1:
        raise ValueError(
            f"messages must be at least 1, max_delay_s above 0.01 and at "
            f"most 3600, busy_fraction between 0 and 1 (exclusive) and "
            f"busy_slice_s in (0, 1]; got {messages!r}, {max_delay_s!r}, "
            f"{busy_fraction!r} and {busy_slice_s!r}")
    context = multiprocessing.get_context("fork")
    q = mqs.SharedQueue(capacity_bytes=1 << 20,
                        delayed_capacity_bytes=max(1 << 20, messages * 128))
    receive_end, send_end = context.Pipe(duplex=False)
    consumer = context.Process(
        target=_busy_consumer,
        args=(q, messages, busy_fraction, busy_slice_s, send_end))
    producer = context.Process(target=_put_delayed,
                               args=(q, messages, max_delay_s, seed))
    consumer.start()
    producer.start()
    try:
        producer.join(LATENESS_TIMEOUT_S)
        if not receive_end.poll(LATENESS_TIMEOUT_S + max_delay_s):
            raise BenchmarkError("the lateness consumer sent no result")
        got, moves = receive_end.recv()
        consumer.join(LATENESS_TIMEOUT_S)
    finally:
        for process in (producer, consumer):
            if process.is_alive():
                process.kill()
                process.join()
        q.close()
    return _lateness_result(got, moves, messages, max_delay_s,
                            busy_fraction, busy_slice_s)


def _put_delayed(q, messages: int, max_delay_s: float, seed: int) -> None:
    rng = random.Random(seed)
    for number in range(messages):
        delay = rng.uniform(0.01, max_delay_s)
        due = time.monotonic_ns() + int(delay * 1e9)
        q.put(_LATENESS_ITEM.pack(number, due), delay=delay, timeout=60)


def _lateness_result(got, moves, messages, max_delay_s, busy_fraction,
                     busy_slice_s) -> DeliveryLateness:
    numbers = sorted(number for number, _, _ in got)
    if numbers != list(range(messages)):
        raise BenchmarkError(
            f"the consumer got {len(got)} messages, {len(set(numbers))} "
            f"distinct, of {messages}")
    # Moves and gets go in due order through one FIFO ring, so the i-th
    # message got is the i-th one moved.
    ready_ns = [at for count, at in moves for _ in range(count)]
    if len(ready_ns) != messages:
        raise BenchmarkError(
            f"the consumer moved {len(ready_ns)} messages into the ring, "
            f"expected {messages}")
    due_to_ready = [ready - due for (_, due, _), ready in zip(got, ready_ns)]
    due_to_get = [at - due for _, due, at in got]
    early = sum(1 for value in due_to_ready + due_to_get if value < 0)
    return DeliveryLateness(
        messages=messages, max_delay_s=max_delay_s,
        busy_fraction=busy_fraction, busy_slice_s=busy_slice_s,
        tick_s=TICK_S, due_to_ready=_percentiles(due_to_ready),
        due_to_get=_percentiles(due_to_get), early=early,
        target_p99_s=TICK_S + 0.001, machine=machine_info())


def format_delivery_lateness(result: DeliveryLateness) -> str:
    """Render a `run_delivery_lateness` result as plain text."""
    load = " ".join(f"{value:.2f}"
                    for value in result.machine["load_average"] or [])
    lines = [(
        f"{result.messages:,} delayed messages, delays in [0.01, "
        f"{result.max_delay_s:g}) s, consumer process busy "
        f"{result.busy_fraction:.0%} in slices of "
        f"{result.busy_slice_s * 1e3:g} ms (load average {load})")]
    for label, stats in (("due -> ready in ring", result.due_to_ready),
                         ("due -> returned by get", result.due_to_get)):
        lines.append(f"  {label:<24} p50 {stats['p50'] * 1e3:8.3f} ms   "
                     f"p99 {stats['p99'] * 1e3:8.3f} ms   "
                     f"max {stats['max'] * 1e3:8.3f} ms")
    verdict = "met" if result.met else "NOT met"
    lines.append(f"  early: {result.early}; target p99 due -> ready <= "
                 f"{result.target_p99_s * 1e3:g} ms: {verdict}")
    return "\n".join(lines)
