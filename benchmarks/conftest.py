"""Options and the shared measuring fixture of the queue benchmarks."""

import argparse

import pytest

from mqs import bench


def _positive_int(text):
    try:
        value = int(text.replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid integer {text!r}; give a whole number such as "
            f"1000") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def pytest_addoption(parser):
    group = parser.getgroup("mqs benchmarks")
    group.addoption(
        "--bench-count", type=_positive_int, default=bench.DEFAULT_COUNT,
        metavar="N",
        help=f"items moved per round (default: {bench.DEFAULT_COUNT:,})")
    group.addoption(
        "--bench-rounds", type=_positive_int, default=bench.DEFAULT_REPEAT,
        metavar="N",
        help=f"timed rounds per benchmark after 1 warm-up round "
             f"(default: {bench.DEFAULT_REPEAT})")
    group.addoption(
        "--window", type=_positive_int, default=10, metavar="SECONDS",
        help="measured window of the lane and rate benchmarks in seconds "
             "(default: 10)")


@pytest.fixture
def measure_transfer(benchmark, request):
    """Return a function that benchmarks one queue in one `mqs.bench` case.

    Each round moves `--bench-count` ints through a fresh queue with the
    case's transfer function. After all rounds, every round's received
    items are compared with the items put, and the median rate in items
    per second is stored in ``extra_info["items_per_s"]``.
    """
    count = request.config.getoption("--bench-count")
    rounds = request.config.getoption("--bench-rounds")

    def measure(case_name, queue_label):
        case = bench.CASES[case_name]
        subject = next(s for s in case.subjects if s.label == queue_label)
        items = list(range(count))
        transfers = []

        def setup():
            return (subject.factory(), items), {}

        def run(q, items):
            transfers.append(case.transfer(q, items))

        benchmark.group = f"{case.name}: {case.description}"
        benchmark.extra_info["count"] = count
        benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=1)

        for transfer in transfers:
            bench.check_transfer(case.name, subject.label, items,
                                 transfer.received)
        assert len(transfers) >= 1
        if benchmark.stats is not None:
            median_s = benchmark.stats.stats.median
            benchmark.extra_info["items_per_s"] = count / median_s

    return measure
