"""Append and read rates of `mqs.SegmentLog` against durable-queue peers.

Measures every case of `mqs.bench_seglog` (its docstring lists them):
appends of 100 B and 4 KiB records under each ``fsync=`` mode,
`append_many` batches of 100 and 8 appending threads under "always",
`read` and `read_batch`, and the peers persist-queue (SQLiteQueue and
the file Queue), litequeue, Redis with ``appendfsync everysec`` and
``always`` (XADD per record through redis-py to a server started on
127.0.0.1 for each round, only if `redis-server` is installed), a Python ``write()`` + ``flush()`` loop of
framed records and raw sequential ``write()`` bandwidth. Install the
peers with ``pip install -e '.[bench]'``.

As a pytest-benchmark file (``pytest benchmarks/bench_seglog_append.py
--benchmark-only``), each case runs ``--bench-rounds`` rounds after one
warm-up round. pytest-benchmark times whole rounds, which include
creating the log or peer; the rate over the timed appends or reads only
is stored in ``extra_info["rate_per_s"]``. ``MQS_BENCH_SCALE``
(default 1.0) multiplies the records per round.

As a script it runs all cases round-robin (a slow spell of the machine
then hits every case alike), prints a table with the tracked ratios and
their targets, and with ``--json`` writes the full result:

    python benchmarks/bench_seglog_append.py --directory /var/tmp --json out.json

Write to a directory on the disk you want to measure: a tmpfs makes
every sync free.
"""

import argparse
import json
import os
import sys

import pytest

from mqs import bench_seglog

SCALE = float(os.environ.get("MQS_BENCH_SCALE", "1.0"))


@pytest.mark.parametrize("case", bench_seglog.CASE_NAMES)
def bench_seglog_case(benchmark, request, tmp_path, case):
    reason = bench_seglog._skip_reason(case)
    if reason:
        pytest.skip(reason)
    run, unit = bench_seglog._cases(SCALE)[case]
    rounds = []
    timed_rounds = request.config.getoption("--bench-rounds", default=3)

    def one_round():
        rounds.append(bench_seglog._one_round(run, str(tmp_path)))

    benchmark.group = f"seglog: {case}"
    benchmark.pedantic(one_round, rounds=timed_rounds, warmup_rounds=1)
    summary = bench_seglog._summary(case, unit, rounds[1:] or rounds)
    for key in ("rate_per_s", "rate_min_per_s", "rate_max_per_s",
                "bytes_per_s", "syncs", "amount", "unit"):
        if key in summary:
            benchmark.extra_info[key] = summary[key]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Benchmark mqs.SegmentLog against durable-queue peers.")
    parser.add_argument("--directory", default=None,
                        help="where logs are written (default: the system "
                             "temporary directory)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies the records per round "
                             "(default: 1.0)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed rounds per case after one warm-up "
                             "round (default: 5)")
    parser.add_argument("--cases", nargs="+", metavar="CASE",
                        choices=bench_seglog.CASE_NAMES,
                        help="cases to run (default: all)")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the result as JSON to FILE")
    args = parser.parse_args(argv)
    result = bench_seglog.run_seglog_bench(
        directory=args.directory, scale=args.scale, repeat=args.repeat,
        cases=args.cases,
        progress=lambda text: print(text, file=sys.stderr, flush=True))
    print(bench_seglog.format_seglog_bench(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
