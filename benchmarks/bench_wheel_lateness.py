"""Delayed delivery lateness of mqs.SharedQueue under a busy consumer.

What is measured (see `mqs.bench_wheel.run_delivery_lateness`): a producer
process puts N messages with random delays in [0.01, 2) s and exits; a
consumer process alternates 0.5 ms of CPU work with 0.5 ms of waiting in
`get` (busy 50%), so it moves each due message into the ring itself.
Per message: the time from its due time to the moment it was in the
ring (``due_to_ready``) and to the moment `get` returned it
(``due_to_get``), reported as p50, p99 and max in the benchmark's
``extra_info``. The target is p99 due -> ready at most one tick (1 ms)
plus 1 ms. A message seen before its due time fails the benchmark.

pytest-benchmark times one whole run per round (about 2 s of waiting),
so its own timing columns show the run length only; read the
percentiles in ``extra_info`` (``--benchmark-json``) or run this file as
a script.

Run with ``pytest benchmarks/bench_wheel_lateness.py --benchmark-only``;
N is ``MQS_BENCH_DELAYED`` (default 2,000). As a script,
``python benchmarks/bench_wheel_lateness.py [--messages N] [--json]``.
"""

import argparse
import json
import os
import sys

from mqs import bench_wheel

MESSAGES = int(os.environ.get("MQS_BENCH_DELAYED",
                              bench_wheel.LATENESS_MESSAGES))


def bench_delayed_delivery_lateness(benchmark):
    results = []

    def run():
        results.append(bench_wheel.run_delivery_lateness(MESSAGES))

    benchmark.group = "delayed delivery: due time to ready, busy consumer"
    benchmark.pedantic(run, rounds=1, iterations=1)
    result = results[-1]
    benchmark.extra_info.update(result.to_dict())
    assert result.early == 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=MESSAGES,
                        help=f"delayed messages to send (default "
                             f"{MESSAGES:,})")
    parser.add_argument("--max-delay", type=float,
                        default=bench_wheel.LATENESS_MAX_DELAY_S,
                        help="largest delay in seconds (default "
                             f"{bench_wheel.LATENESS_MAX_DELAY_S:g})")
    parser.add_argument("--busy-slice", type=float,
                        default=bench_wheel.LATENESS_BUSY_SLICE_S,
                        help="seconds of CPU work per busy slice (default "
                             f"{bench_wheel.LATENESS_BUSY_SLICE_S:g})")
    parser.add_argument("--json", action="store_true",
                        help="print the result as JSON")
    args = parser.parse_args(argv)
    result = bench_wheel.run_delivery_lateness(
        args.messages, max_delay_s=args.max_delay,
        busy_slice_s=args.busy_slice)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(bench_wheel.format_delivery_lateness(result))
    return 0 if result.early == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
