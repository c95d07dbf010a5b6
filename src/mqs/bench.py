"""Throughput benchmarks of mqs queues against the standard library's `queue`.

Each case moves a list of distinct ints through a queue and times the
transfer with `time.perf_counter_ns`:

- ``1p1c``: one producer thread puts every item, one consumer thread gets
  them one at a time. The clock starts when the producer starts putting and
  stops when the consumer has the last item.
- ``1p1c-bounded``: the same with queues bounded at 1,024 items.
- ``pair``: one thread puts an item and gets it back at once (no waiting).
- ``batch``: as ``1p1c``, but mqs queues use `put_many` with lists of 1,000
  items and `get_many(1000)`, while the standard library queues, which have
  no batch calls, put and get one item at a time.

Every (case, queue) pair runs once as a warm-up on a tenth of the items,
then `repeat` timed runs. The runs of one case alternate between its
queues, so a slow spell of the machine hits every queue alike. The garbage
collector is off during a timed run, as in `timeit`. After each run the
items received are compared with the items put (count, sum and order), and
a mismatch raises `BenchmarkError`, since the rate of a run that lost items
means nothing.

This module only measures. `mqs.cli_bench` prints the results.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import platform
import queue as stdlib_queue
import re
import statistics
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import mqs

logger = logging.getLogger(__name__)

BATCH_SIZE = 1000
BOUNDED_MAXSIZE = 1024
DEFAULT_COUNT = 100_000
QUICK_COUNT = 10_000
FULL_COUNT = 300_000
DEFAULT_REPEAT = 3
REFERENCE_QUEUE = "queue.Queue"

# A threaded run that has not finished after this long is treated as
# stalled (a lost item leaves the consumer waiting forever), not as slow.
# queue.Queue, the slowest queue here, took about 3 us per item in the runs
# recorded in BENCHMARKS.md, so 10 us per item leaves a wide margin.
STALL_TIMEOUT_BASE_S = 30.0
STALL_TIMEOUT_PER_ITEM_S = 10e-6


class BenchmarkError(RuntimeError):
    """Raised when a run lost, added or reordered items, or stalled."""


@dataclasses.dataclass(frozen=True)
class Subject:
    """A queue under test: its label and a factory for a fresh instance."""

    label: str
    factory: Callable[[], Any]


@dataclasses.dataclass(frozen=True)
class Transfer:
    """Outcome of one run: the timed span and the items the consumer got."""

    elapsed_ns: int
    received: list


@dataclasses.dataclass(frozen=True)
class Case:
    """A benchmark case: how items move and which queues move them.

    `transfer(queue, items)` moves `items` through `queue` and
    returns a `Transfer`. `reference` is the label of the subject that the
    "x queue.Queue" ratio of this case divides by.
    """

    name: str
    description: str
    subjects: tuple[Subject, ...]
    reference: str
    transfer: Callable[[Any, list], Transfer]


@dataclasses.dataclass
class Result:
    """Rates of one queue in one case over all timed runs."""

    case: str
    queue: str
    count: int
    elapsed_ns: list[int]
    ratio_to_reference: float | None = None

    @property
    def rates(self) -> list[float]:
        """Items per second of each run, in run order."""
        return [self.count * 1e9 / ns for ns in self.elapsed_ns]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    @property
    def min(self) -> float:
        return min(self.rates)

    @property
    def max(self) -> float:
        return max(self.rates)

    @property
    def quartiles(self) -> tuple[float, float]:
        """First and third quartile of the rates (for one run, its rate)."""
        rates = self.rates
        if len(rates) < 2:
            return rates[0], rates[0]
        q1, _, q3 = statistics.quantiles(rates, n=4, method="inclusive")
        return q1, q3

    def to_dict(self) -> dict:
        q1, q3 = self.quartiles
        return {
            "case": self.case,
            "queue": self.queue,
            "count": self.count,
            "elapsed_ns": self.elapsed_ns,
            "rates_per_s": self.rates,
            "median_per_s": self.median,
            "min_per_s": self.min,
            "max_per_s": self.max,
            "q1_per_s": q1,
            "q3_per_s": q3,
            "ratio_to_reference": self.ratio_to_reference,
        }


@dataclasses.dataclass(frozen=True)
class TrackedRatio:
    """A ratio of two measurements that the project tracks, with its target.

    `numerator` and `denominator` are (case, queue label) pairs. The
    target is a minimum, or a maximum when `lower_is_better` is true (for
    ratios of latencies).
    """

    name: str
    numerator: tuple[str, str]
    denominator: tuple[str, str]
    target: float
    lower_is_better: bool = False

    @property
    def comparison(self) -> str:
        return "<=" if self.lower_is_better else ">="


@dataclasses.dataclass(frozen=True)
class RatioResult:
    """A tracked ratio and its value in one run."""

    tracked: TrackedRatio
    value: float

    @property
    def met(self) -> bool:
        if self.tracked.lower_is_better:
            return self.value <= self.tracked.target
        return self.value >= self.tracked.target

    def to_dict(self) -> dict:
        return {
            "name": self.tracked.name,
            "numerator": list(self.tracked.numerator),
            "denominator": list(self.tracked.denominator),
            "value": self.value,
            "comparison": self.tracked.comparison,
            "target": self.tracked.target,
            "met": self.met,
        }


# --------------------------------------------------------------- transfers


def _run_threads(producer: Callable[[], int], consumer: Callable[[], Any],
                 timeout_s: float) -> tuple[int, int, Any]:
    """Run producer and consumer in two threads and return their results.

    The producer returns its start time and the consumer returns a pair
    (end time, received items). Raises `BenchmarkError` if either thread
    raised or the pair did not finish within `timeout_s`.
    """
    outcomes: dict[str, Any] = {}
    barrier = threading.Barrier(2)

    def call(role: str, function: Callable[[], Any]) -> None:
        try:
            barrier.wait()
            outcomes[role] = function()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            outcomes[role + "_error"] = exc

    threads = [
        threading.Thread(target=call, args=("producer", producer),
                         name="mqs-bench-producer", daemon=True),
        threading.Thread(target=call, args=("consumer", consumer),
                         name="mqs-bench-consumer", daemon=True),
    ]
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))

    for role in ("producer", "consumer"):
        if role + "_error" in outcomes:
            raise BenchmarkError(
                f"the {role} thread raised "
                f"{outcomes[role + '_error']!r}") from outcomes[role + "_error"]
    stalled = [thread.name for thread in threads if thread.is_alive()]
    if stalled:
        # NOTE: a stalled daemon thread stays blocked until the process
        # exits; nothing can stop a thread that waits in a get.
        raise BenchmarkError(
            f"{' and '.join(stalled)} still running after {timeout_s:.0f} s; "
            f"items were lost or a waiting thread was never woken")
    start_ns = outcomes["producer"]
    end_ns, received = outcomes["consumer"]
    return start_ns, end_ns, received


def _stall_timeout_s(count: int) -> float:
    return STALL_TIMEOUT_BASE_S + count * STALL_TIMEOUT_PER_ITEM_S


def transfer_one_by_one(q: Any, items: list) -> Transfer:
    """Move items from a producer thread to a consumer thread, one per call."""
    count = len(items)

    def produce() -> int:
        put = q.put
        start_ns = time.perf_counter_ns()
        for item in items:
            put(item)
        return start_ns

    def consume() -> tuple[int, list]:
        get = q.get
        received = [get() for _ in range(count)]
        return time.perf_counter_ns(), received

    start_ns, end_ns, received = _run_threads(
        produce, consume, _stall_timeout_s(count))
    return Transfer(end_ns - start_ns, received)


def transfer_batches(q: Any, items: list) -> Transfer:
    """Move items between two threads with `put_many` and `get_many`.

    Queues without `put_many` (the standard library's) fall back to
    `transfer_one_by_one`. The lists passed to `put_many` are sliced before
    the clock starts. `get_many` may return fewer than `BATCH_SIZE` items
    when the consumer catches up with the producer.
    """
    if not hasattr(q, "put_many"):
        return transfer_one_by_one(q, items)
    count = len(items)
    batches = [items[i:i + BATCH_SIZE] for i in range(0, count, BATCH_SIZE)]

    def produce() -> int:
        put_many = q.put_many
        start_ns = time.perf_counter_ns()
        for batch in batches:
            put_many(batch)
        return start_ns

    def consume() -> tuple[int, list]:
        get_many = q.get_many
        received: list = []
        extend = received.extend
        while len(received) < count:
            extend(get_many(BATCH_SIZE))
        return time.perf_counter_ns(), received

    start_ns, end_ns, received = _run_threads(
        produce, consume, _stall_timeout_s(count))
    return Transfer(end_ns - start_ns, received)


def transfer_pairs(q: Any, items: list) -> Transfer:
    """Put each item and get one item back in the same thread."""
    put = q.put
    get = q.get
    start_ns = time.perf_counter_ns()
    # `put` returns None, so `put(item) or get()` puts the item and then
    # evaluates to the item got. The list comprehension keeps the loop's
    # own cost per item to one LIST_APPEND.
    received = [put(item) or get() for item in items]
    end_ns = time.perf_counter_ns()
    return Transfer(end_ns - start_ns, received)


# ------------------------------------------------------------------ cases


def _unbounded_subjects() -> tuple[Subject, ...]:
    return (
        Subject("mqs.Queue", mqs.Queue),
        Subject("mqs.SimpleQueue", mqs.SimpleQueue),
        Subject("queue.Queue", stdlib_queue.Queue),
        Subject("queue.SimpleQueue", stdlib_queue.SimpleQueue),
    )


def _bounded_subjects() -> tuple[Subject, ...]:
    return (
        Subject(f"mqs.Queue(maxsize={BOUNDED_MAXSIZE})",
                lambda: mqs.Queue(maxsize=BOUNDED_MAXSIZE)),
        Subject(f"queue.Queue(maxsize={BOUNDED_MAXSIZE})",
                lambda: stdlib_queue.Queue(maxsize=BOUNDED_MAXSIZE)),
    )


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("1p1c", "1 producer thread -> 1 consumer thread, unbounded",
             _unbounded_subjects(), "queue.Queue", transfer_one_by_one),
        Case("1p1c-bounded",
             f"1 producer thread -> 1 consumer thread, "
             f"maxsize={BOUNDED_MAXSIZE}",
             _bounded_subjects(), f"queue.Queue(maxsize={BOUNDED_MAXSIZE})",
             transfer_one_by_one),
        Case("pair", "same thread: put, then get, per item",
             _unbounded_subjects(), "queue.Queue", transfer_pairs),
        Case("batch",
             f"as 1p1c, with put_many/get_many of {BATCH_SIZE:,} "
             f"(stdlib: put/get per item)",
             _unbounded_subjects(), "queue.Queue", transfer_batches),
    )
}

TRACKED_RATIOS: tuple[TrackedRatio, ...] = (
    TrackedRatio("1p1c mqs.SimpleQueue / queue.SimpleQueue",
                 ("1p1c", "mqs.SimpleQueue"), ("1p1c", "queue.SimpleQueue"),
                 0.9),
    TrackedRatio("1p1c mqs.Queue / queue.SimpleQueue",
                 ("1p1c", "mqs.Queue"), ("1p1c", "queue.SimpleQueue"), 0.8),
    TrackedRatio(
        f"bounded mqs.Queue({BOUNDED_MAXSIZE}) / "
        f"queue.Queue({BOUNDED_MAXSIZE})",
        ("1p1c-bounded", f"mqs.Queue(maxsize={BOUNDED_MAXSIZE})"),
        ("1p1c-bounded", f"queue.Queue(maxsize={BOUNDED_MAXSIZE})"), 10.0),
    TrackedRatio("pair mqs.SimpleQueue / queue.SimpleQueue",
                 ("pair", "mqs.SimpleQueue"), ("pair", "queue.SimpleQueue"),
                 0.9),
    TrackedRatio("batch mqs.SimpleQueue / queue.SimpleQueue (per item)",
                 ("batch", "mqs.SimpleQueue"), ("batch", "queue.SimpleQueue"),
                 3.0),
    TrackedRatio("batch mqs.Queue / queue.SimpleQueue (per item)",
                 ("batch", "mqs.Queue"), ("batch", "queue.SimpleQueue"), 3.0),
)


# ----------------------------------------------------------------- running


def check_transfer(case: str, queue_label: str, items: list,
                   received: list) -> None:
    """Raise `BenchmarkError` unless `received` equals `items`, in order."""
    if received == items:
        return
    where = f"{queue_label} in case {case!r}"
    if len(received) != len(items) or sum(received) != sum(items):
        raise BenchmarkError(
            f"{where} lost or added items: the consumer got "
            f"{len(received):,} items summing to {sum(received):,}, "
            f"expected {len(items):,} summing to {sum(items):,}")
    index = next(i for i, (got, put) in enumerate(zip(received, items, strict=True))
                 if got != put)
    raise BenchmarkError(
        f"{where} reordered items: item {index:,} is {received[index]!r}, "
        f"expected {items[index]!r}")


def timed_ns(body: Callable[[], Any]) -> int:
    """Run `body` with the garbage collector off and return its wall time
    in nanoseconds (`time.perf_counter_ns`)."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        body()
        return time.perf_counter_ns() - start
    finally:
        if gc_was_enabled:
            gc.enable()


def run_once(case: Case, subject: Subject, items: list) -> int:
    """Time one transfer of `items` on a fresh queue; return nanoseconds.

    Raises
    ------
    BenchmarkError
        If the items received differ from `items` or the run stalled.
    """
    q = subject.factory()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        transfer = case.transfer(q, items)
    finally:
        if gc_was_enabled:
            gc.enable()
    check_transfer(case.name, subject.label, items, transfer.received)
    if transfer.elapsed_ns <= 0:
        raise BenchmarkError(
            f"{subject.label} in case {case.name!r}: the clock measured "
            f"{transfer.elapsed_ns} ns for {len(items):,} items")
    return transfer.elapsed_ns


def count_runs(case_names: Sequence[str], repeat: int) -> int:
    """Return how many runs, warm-ups included, `run_cases` will make."""
    return sum(len(CASES[name].subjects) * (repeat + 1)
               for name in case_names)


def run_cases(case_names: Sequence[str], count: int, repeat: int,
              on_run: Callable[[str, str], None] | None = None,
              ) -> list[Result]:
    """Run the named cases and return one `Result` per (case, queue).

    `on_run(case, queue)` is called after each run, warm-ups included,
    for progress display.

    Raises
    ------
    ValueError
        For an unknown case name or a `count` or `repeat` below 1.
    BenchmarkError
        If a run lost, added or reordered items, or stalled.
    """
    _validate(case_names, count, repeat)
    items = list(range(count))
    warmup_items = items[:max(1, count // 10)]
    results = []
    for name in case_names:
        case = CASES[name]
        for subject in case.subjects:
            run_once(case, subject, warmup_items)
            if on_run is not None:
                on_run(case.name, subject.label)
        elapsed: dict[str, list[int]] = {
            subject.label: [] for subject in case.subjects}
        for _ in range(repeat):
            for subject in case.subjects:
                elapsed[subject.label].append(run_once(case, subject, items))
                logger.debug("%s %s: %d items in %d ns", case.name,
                             subject.label, count, elapsed[subject.label][-1])
                if on_run is not None:
                    on_run(case.name, subject.label)
        results.extend(_case_results(case, count, elapsed))
    return results


def _validate(case_names: Sequence[str], count: int, repeat: int) -> None:
    unknown = [name for name in case_names if name not in CASES]
    if unknown:
        raise ValueError(
            f"unknown case {unknown[0]!r}; choose from {', '.join(CASES)}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count!r}")
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat!r}")


def _case_results(case: Case, count: int,
                  elapsed: dict[str, list[int]]) -> list[Result]:
    results = [Result(case.name, label, count, runs)
               for label, runs in elapsed.items()]
    reference = next(r for r in results if r.queue == case.reference)
    for result in results:
        result.ratio_to_reference = result.median / reference.median
    return results


def tracked_ratios(results: Sequence[Result]) -> list[RatioResult]:
    """Compute each tracked ratio whose two rates are among `results`."""
    medians = {(r.case, r.queue): r.median for r in results}
    ratios = []
    for tracked in TRACKED_RATIOS:
        if tracked.numerator in medians and tracked.denominator in medians:
            value = medians[tracked.numerator] / medians[tracked.denominator]
            ratios.append(RatioResult(tracked, value))
    return ratios


# ---------------------------------------------------------------- machine


def machine_info() -> dict:
    """Describe the machine, the interpreter and the mqs build."""
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity") else None,
        "memory_bytes": _memory_bytes(),
        "kernel": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "load_average": list(os.getloadavg())
        if hasattr(os, "getloadavg") else None,
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "gil_enabled": _gil_enabled(),
        "switch_interval_s": sys.getswitchinterval(),
        "mqs_version": mqs.__version__,
        "build": _build_info(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gil_enabled() -> bool:
    is_gil_enabled = getattr(sys, "_is_gil_enabled", None)
    return True if is_gil_enabled is None else is_gil_enabled()


def _build_info() -> dict:
    """Describe how the native extension was built, as far as it shows.

    setup.py does not store its flags in the module. GCC records the
    compiler version and the code generation flags (-O, -g, -f..., -m...,
    not -D or -W) in the debug info, which Python's default CFLAGS (-g)
    keep, so they are read from there when present.
    """
    from mqs import _queue

    path = getattr(_queue, "__file__", None)
    info: dict[str, Any] = {
        "extension": path,
        "python_cflags": sysconfig.get_config_var("CFLAGS"),
        "compiler_flags": None,
    }
    if path is None:
        return info
    try:
        with open(path, "rb") as extension:
            binary = extension.read()
    except OSError:
        return info
    producers = re.findall(rb"GNU C[^\0]*", binary)
    if producers:
        info["compiler_flags"] = sorted(
            {_without_repeated_flags(producer.decode("utf-8", "replace"))
             for producer in producers})
    return info


def _without_repeated_flags(producer: str) -> str:
    """Return a GCC producer string with each flag once.

    The producer lists the flags as passed, so a flag in both Python's
    CFLAGS and setup.py (-O3) appears twice. The last copy of each flag
    is kept, because GCC applies the last of several -O levels and of an
    -fx/-fno-x pair, so the result has the same effect.
    """
    words = producer.split()
    last = {word: index for index, word in enumerate(words)}
    return " ".join(word for index, word in enumerate(words)
                    if not word.startswith("-") or last[word] == index)
