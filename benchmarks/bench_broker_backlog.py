"""Publish latency while a backlog builds up on a topic with no consumer.

One thread publishes N small messages (``b"x" * 64``, one `publish` per
message) to a plain topic of a fresh `mqs.Broker` that has no consumer
yet, timing every call with `time.perf_counter_ns`. It reports the
total publish time, the median, p99.9 and max latency of one publish,
and the slowest publish's position in the backlog. Then one consumer
with ``auto_ack=True`` drains the topic with ``get_many(1000)`` and the
drain time is reported; the drain checks that every message arrived
exactly once and in publish order.

A pause that grows with the stored messages (a topic moved out of its
shared-memory core, a snapshot of the whole state) shows up as a max
latency that grows with N.

Run ``python benchmarks/bench_broker_backlog.py`` (``--counts``,
``--backends``) for a table, or
``pytest benchmarks/bench_broker_backlog.py --benchmark-only -s``
(100,000 messages per backend, one round).
"""

import argparse
import os
import platform
import statistics
import tempfile
import time
import uuid

import mqs

BODY = b"x" * 64
DRAIN_BATCH = 1000
BACKENDS = ("shm", "log")


def _open(backend, directory):
    if backend == "shm":
        name = f"bench-backlog-{uuid.uuid4().hex[:12]}"
        return mqs.Broker(backend="shm", name=name), name
    return mqs.Broker(backend="log", path=os.path.join(directory, "b")), None


def run_backlog(backend, count):
    """Publish `count` messages, then drain them; return the measurements.

    The result is a dict with ``count``, ``publish_s`` (total),
    ``median_us``, ``p999_us`` and ``max_us`` (one publish),
    ``max_at`` (index of the slowest publish) and ``drain_s``.
    """
    with tempfile.TemporaryDirectory(prefix="mqs-bench-backlog-") as tmp:
        broker, shm_name = _open(backend, tmp)
        try:
            latencies = _publish(broker, count)
            drain_s = _drain(broker, count)
        finally:
            broker.close()
            if shm_name is not None:
                mqs.Broker.unlink(shm_name)
    ordered = sorted(latencies)
    slowest = max(range(count), key=latencies.__getitem__)
    return {
        "backend": backend,
        "count": count,
        "publish_s": sum(latencies) / 1e9,
        "median_us": statistics.median(ordered) / 1e3,
        "p999_us": ordered[min(count - 1, int(count * 0.999))] / 1e3,
        "max_us": ordered[-1] / 1e3,
        "max_at": slowest,
        "drain_s": drain_s,
    }


def _publish(broker, count):
    publish = broker.publish
    clock = time.perf_counter_ns
    latencies = [0] * count
    for i in range(count):
        started = clock()
        publish("t", (i, BODY))
        latencies[i] = clock() - started
    return latencies


def _drain(broker, count):
    started = time.perf_counter()
    consumer = broker.consume("t", "g", auto_ack=True, prefetch=DRAIN_BATCH)
    expected = 0
    while expected < count:
        messages = consumer.get_many(DRAIN_BATCH, timeout=60)
        if not messages:
            raise AssertionError(
                f"drain timed out after {expected} of {count} messages")
        for message in messages:
            if message.body[0] != expected:
                raise AssertionError(
                    f"message {message.body[0]} arrived where {expected} "
                    f"was expected")
            expected += 1
    consumer.close()
    return time.perf_counter() - started


def format_row(result):
    return (f"{result['backend']:>4} {result['count']:>9,} "
            f"{result['publish_s']:>9.2f} {result['median_us']:>9.1f} "
            f"{result['p999_us']:>10.1f} {result['max_us']:>12.1f} "
            f"{result['max_at']:>9,} {result['drain_s']:>8.2f}")


HEADER = (f"{'':>4} {'messages':>9} {'publish s':>9} {'median us':>9} "
          f"{'p99.9 us':>10} {'max us':>12} {'max at':>9} {'drain s':>8}")


# ---- pytest-benchmark ----------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - the script mode needs no pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("backend", BACKENDS)
    def bench_publish_into_backlog(benchmark, backend):
        result = benchmark.pedantic(run_backlog, args=(backend, 100_000),
                                    rounds=1, iterations=1)
        benchmark.group = "publish into a backlog of 100,000 messages"
        benchmark.extra_info.update(result)
        print()
        print(HEADER)
        print(format_row(result))


def _counts(text):
    try:
        counts = [int(part.replace("_", "")) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid --counts {text!r}; give integers separated by "
            f"commas, such as 100000,500000") from None
    if any(count < 1 for count in counts):
        raise argparse.ArgumentTypeError(
            f"every count must be at least 1, got {text!r}")
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--counts", type=_counts, default=[100_000, 500_000, 1_000_000],
        help="backlog sizes in messages, comma-separated "
             "(default: 100000,500000,1000000)")
    parser.add_argument(
        "--backends", default=",".join(BACKENDS),
        help="comma-separated backends out of shm and log (default: both)")
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    for backend in backends:
        if backend not in BACKENDS:
            parser.error(f"unknown backend {backend!r}; use shm or log")
    print(f"Python {platform.python_version()}, {platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(HEADER)
    for backend in backends:
        for count in args.counts:
            print(format_row(run_backlog(backend, count)), flush=True)


if __name__ == "__main__":
    main()
