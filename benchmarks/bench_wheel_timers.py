"""Timer scheduling: mqs.TimingWheel against heapq, sched and asyncio.

What is measured, per scheduler (see `mqs.bench_wheel` for the details of
each scheduler):

- ``insert``: schedule N timers with random deadlines in [0, 60) s on a
  simulated clock, one call per timer.
- ``cancel``: cancel every other timer of a full scheduler.
- ``expire``: with half the timers cancelled, advance the clock in 10 ms
  steps past 60 s and collect the fired items.
- ``schedule_many``: the wheel only, all N timers in one call.

How: each benchmark builds its starting state in an untimed setup
(`benchmark.pedantic`) and times only its phase, with the garbage
collector off. Afterwards it checks that the phase did its job. Every
cancel must hit a pending timer, and every timer not cancelled must fire
once, in deadline order, in the first 10 ms step at or past its deadline.
sched.scheduler gets at most 100,000 timers and a 1 s budget for cancels,
because its cancel is O(n).

Run with ``pytest benchmarks/bench_wheel_timers.py --benchmark-only``.
N is ``MQS_BENCH_TIMERS`` (default 1,000,000) and the rounds per benchmark
``--bench-rounds``. Benchmarks of one phase share a group, so compare
their times within the group. pytest-benchmark reports time per round,
so a ratio of rates is the inverse ratio of times.

Run as a script, ``python benchmarks/bench_wheel_timers.py``, it calls
`mqs.bench_wheel.run_wheel_bench` and prints every scheduler's rates side
by side with the ratios the project tracks (rates from thread CPU time).
"""

import argparse
import json
import os
import sys

import pytest

from mqs import bench_wheel

COUNT = int(os.environ.get("MQS_BENCH_TIMERS", bench_wheel.DEFAULT_COUNT))
DEADLINES = bench_wheel.make_deadlines(COUNT)
ALL = list(bench_wheel.SCHEDULERS)


@pytest.fixture
def rounds(request):
    return request.config.getoption("--bench-rounds", default=3)


def _start(label, fill=True):
    """Return a new run of `label`, its deadlines, items and handles.

    With `fill`, every timer is scheduled and the handles are returned;
    otherwise the run is empty and the handles are None.
    """
    run_class = bench_wheel.RUNS[label]
    deadlines, items = bench_wheel.workload(run_class, DEADLINES)
    run = run_class(len(deadlines))
    handles = run.insert(deadlines, items) if fill else None
    return run, deadlines, items, handles


@pytest.mark.parametrize("label", ALL)
def bench_insert(benchmark, rounds, label):
    runs = []

    def setup():
        run, deadlines, items, _ = _start(label, fill=False)
        runs.append(run)
        return (run, deadlines, items), {}

    benchmark.group = "insert: N timers into an empty scheduler"
    benchmark.pedantic(lambda run, d, i: run.insert(d, i), setup=setup,
                       rounds=rounds)
    for run in runs:
        expected = len(bench_wheel.workload(type(run), DEADLINES)[0])
        assert run.pending() == expected
        run.close()


@pytest.mark.parametrize("label", ALL)
def bench_cancel_half(benchmark, rounds, label):
    results = []

    def setup():
        run, _, _, handles = _start(label)
        results.append([run, handles[::2], None])
        return (results[-1],), {}

    def cancel(result):
        result[2] = result[0].cancel(result[1])

    benchmark.group = "cancel: every other timer"
    benchmark.pedantic(cancel, setup=setup, rounds=rounds)
    for run, victims, cancelled in results:
        if label == bench_wheel.SCHED:
            assert 0 < cancelled <= len(victims)
        else:
            assert cancelled == len(victims)
        run.close()


@pytest.mark.parametrize("label", ALL)
def bench_expire_in_steps(benchmark, rounds, label):
    results = []

    def setup():
        run, deadlines, items, handles = _start(label)
        cancelled = run.cancel(handles[::2])
        results.append([run, deadlines, set(items[::2][:cancelled]), None])
        return (results[-1],), {}

    def expire(result):
        result[3] = result[0].expire()

    benchmark.group = "expire: 10 ms steps over 60 s, half cancelled"
    benchmark.pedantic(expire, setup=setup, rounds=rounds)
    for run, deadlines, cancelled, (fired, ends) in results:
        bench_wheel.check_expiry(label, deadlines, cancelled, fired, ends,
                                 type(run).early_tolerance_s)
        assert run.pending() == 0
        run.close()


def bench_wheel_schedule_many(benchmark, rounds):
    results = []

    def setup():
        run, deadlines, items, _ = _start(bench_wheel.WHEEL, fill=False)
        results.append([run, None])
        return (results[-1], deadlines, items), {}

    def schedule_many(result, deadlines, items):
        result[1] = result[0].schedule_many(deadlines, items)

    benchmark.group = "insert: N timers into an empty scheduler"
    benchmark.pedantic(schedule_many, setup=setup, rounds=rounds)
    for run, handles in results:
        assert len(set(handles)) == COUNT
        fired, ends = run.expire()
        bench_wheel.check_expiry("schedule_many", DEADLINES, set(), fired,
                                 ends)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Compare mqs.TimingWheel with heapq, sched and asyncio "
                    "on timers with random delays in [0, 60) s.")
    parser.add_argument("--count", type=int, default=bench_wheel.DEFAULT_COUNT,
                        help="timers per run (default: %(default)s)")
    parser.add_argument("--repeat", type=int,
                        default=bench_wheel.DEFAULT_REPEAT,
                        help="runs per scheduler; the table shows the "
                             "median rate (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the full result to this file")
    args = parser.parse_args(argv)
    if args.count < 1 or args.repeat < 1:
        parser.error(f"--count and --repeat must be at least 1, got "
                     f"{args.count} and {args.repeat}")

    result = bench_wheel.run_wheel_bench(args.count, args.repeat)
    print(bench_wheel.format_wheel_bench(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
