"""Weighted lanes under saturation and the rate limiter, in real time.

Runs `mqs.bench_lanes` (see its docstring for the method): each lane's
share of the deliveries of a saturated topic with weights
{9: 8, 5: 4, 0: 1} against its weight, and the delivery rate of a topic
with ``Rate(2000)`` against the target (3 processes share the bucket
on the shm and log backends), each over a window of
``--window`` seconds (10 by default). The limits are 5% of each lane's
share and 2% of the rate. A miss is reported in ``extra_info`` and
not raised, so one run shows every number.

Run: ``pytest benchmarks/bench_broker_lanes.py --benchmark-only -s``
(``-s`` prints the tables). One round per case: the window is the
measurement.
"""

import pytest

from mqs import bench_lanes


@pytest.fixture
def window(request):
    return float(request.config.getoption("--window"))


@pytest.mark.parametrize("backend", ["memory", "shm", "log"])
def bench_lane_shares(benchmark, window, backend):
    result = benchmark.pedantic(
        bench_lanes.run_lane_shares, kwargs={"duration_s": window,
                                             "backend": backend},
        rounds=1, iterations=1)
    benchmark.group = f"weighted lanes under saturation, {window:g} s"
    benchmark.extra_info.update(
        {f"share_lane_{lane['lane']}": lane["share"]
         for lane in result["lanes"]},
        max_error=result["max_error"], met=result["met"])
    print()
    print(bench_lanes.format_lanes(result))


@pytest.mark.parametrize("backend, processes",
                         [("memory", 1), ("shm", 3), ("log", 3)])
def bench_rate_limit(benchmark, window, backend, processes):
    result = benchmark.pedantic(
        bench_lanes.run_rate_limit, kwargs={
            "duration_s": window, "backend": backend,
            "processes": processes},
        rounds=1, iterations=1)
    benchmark.group = f"rate limit, {window:g} s"
    benchmark.extra_info.update(
        rate_per_s=result["rate_per_s"], error=result["error"],
        met=result["met"])
    print()
    print(bench_lanes.format_rate(result))
