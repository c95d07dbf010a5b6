"""Catch-up time of a process that lags behind a journal restart.

A process fills a topic of a fresh log broker (``fsync="never"``) with a
backlog of N messages through `publish_many`, then forks a second
process that opens the same broker and calls `Broker.stats` every 20
ms. The first process publishes 100,000 more messages, one call each,
so the journal fills and restarts while the second process is between
two calls. That process then lacks records of the old journal and
catches up in one of two ways, measured in the same run:

- ``tail``: it applies the records it lacks from the tail file that the
  restart wrote (the default when that costs less than the snapshot);
- ``snapshot``: it reloads the newest snapshot of the whole state and
  applies the tails after it, as a new process does (before tail files
  existed, every lagging process reloaded a snapshot).

Both hold the broker's mutex, so every other process waits as long.
Reported per backlog size and way: the catch-ups seen, their longest
time, and the longest `stats` call of the second process.

Run ``python benchmarks/bench_broker_catch_up.py`` (``--counts``) for a
table, or ``pytest benchmarks/bench_broker_catch_up.py --benchmark-only
-s`` (a backlog of 100,000 messages, one round per way).
"""

import argparse
import multiprocessing
import os
import platform
import tempfile
import time

import mqs
from bench_broker_backlog import _counts
from mqs.broker._log_shared import unlink_journal

BODY = "x" * 64
MORE = 100_000
WAYS = ("tail", "snapshot")
POLL_S = 0.02


def _watch(path, way, stop, results):
    """Call `stats` every `POLL_S` seconds until `stop` is set; put the
    catch-up times (seconds) and the longest `stats` call on `results`."""
    broker = mqs.Broker(backend="log", path=path, fsync="never")
    backend = broker._backend
    catch_ups = []
    catch_up = backend._catch_up

    def timed_catch_up(generation):
        if (generation == backend._generation + 1
                and backend._applied == backend._journal.restart_used):
            return
        started = time.perf_counter()
        if way == "tail":
            catch_up(generation)
        else:
            backend._load_snapshot_file(generation)
        catch_ups.append(time.perf_counter() - started)

    backend._catch_up = timed_catch_up
    longest = 0.0
    try:
        while not stop.is_set():
            started = time.perf_counter()
            broker.stats("t")
            longest = max(longest, time.perf_counter() - started)
            time.sleep(POLL_S)
    finally:
        broker.close()
    results.put((catch_ups, longest))


def run_catch_up(count, way):
    """Build a backlog of `count` messages, publish `MORE` with a second
    process watching, and return the measurements of that process."""
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="mqs-bench-catch-up-") as tmp:
        path = os.path.join(tmp, "b")
        broker = mqs.Broker(backend="log", path=path, fsync="never")
        try:
            broker.declare_topic("t")
            for start in range(0, count, 1000):
                broker.publish_many("t", [BODY] * min(1000, count - start))
            stop = context.Event()
            results = context.Queue()
            watcher = context.Process(target=_watch,
                                      args=(path, way, stop, results))
            watcher.start()
            try:
                # The watcher's first stats call ends its own catch-up.
                time.sleep(1.0)
                first = broker._backend._generation
                for _ in range(MORE):
                    broker.publish("t", BODY)
                restarts = broker._backend._generation - first
                time.sleep(0.5)
                stop.set()
                catch_ups, longest = results.get(timeout=600)
            finally:
                stop.set()
                watcher.join(600)
        finally:
            broker.close()
            unlink_journal(path)
    return {
        "count": count,
        "way": way,
        "restarts": restarts,
        "catch_ups": len(catch_ups),
        "max_catch_up_ms": max(catch_ups, default=0.0) * 1e3,
        "max_stats_ms": longest * 1e3,
    }


def format_row(result):
    return (f"{result['count']:>9,} {result['way']:>8} "
            f"{result['restarts']:>8} {result['catch_ups']:>9} "
            f"{result['max_catch_up_ms']:>14.1f} "
            f"{result['max_stats_ms']:>14.1f}")


HEADER = (f"{'messages':>9} {'way':>8} {'restarts':>8} {'catch-ups':>9} "
          f"{'max catch-up ms':>14} {'max stats ms':>14}")


# ---- pytest-benchmark ----------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - the script mode needs no pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("way", WAYS)
    def bench_lagging_process_catch_up(benchmark, way):
        result = benchmark.pedantic(run_catch_up, args=(100_000, way),
                                    rounds=1, iterations=1)
        benchmark.group = "catch-up after a journal restart, 100,000 stored"
        benchmark.extra_info.update(result)
        print()
        print(HEADER)
        print(format_row(result))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--counts", type=_counts, default=[100_000, 300_000, 1_000_000],
        help="backlog sizes in messages, comma-separated "
             "(default: 100000,300000,1000000)")
    args = parser.parse_args(argv)
    print(f"Python {platform.python_version()}, {platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(HEADER)
    for count in args.counts:
        for way in WAYS:
            print(format_row(run_catch_up(count, way)), flush=True)


if __name__ == "__main__":
    main()
