"""Hot-path cost of latency sampling: throughput with sampling on and off.

Run as a script: ``python benchmarks/bench_metrics_overhead.py``. Each
subject moves ``--count`` messages per round, one message per call, in
three arms: sampling off (``None``), the default rate (one message in
`mqs.metrics.DEFAULT_SAMPLE_EVERY`) and every message (``1``, the worst
case). Every round runs all three arms back to back in an order that
rotates from round to round, so slow drifts of a loaded machine hit
every arm alike. The cost of an arm is ``1 - throughput(arm) /
throughput(off)``, taken per round. The report gives its median over the
``--rounds`` rounds and its interquartile range (IQR), in which negative
values are noise. The
counters (enqueued, dequeued, per-group delivered, acked) cannot be
turned off, so they are in all three arms.

Subjects:

- ``Queue``: `mqs.Queue`, one thread puts and gets each int in turn.
- ``SharedQueue``: an anonymous `mqs.SharedQueue`, one thread puts and
  gets each 64-byte message in turn (stamp and unstamp in one process).
- ``SharedQueue-ipc``: a forked producer process puts 64-byte messages
  and this process gets them; the round time runs from the fork to the
  last get.
- ``Broker``: `mqs.Broker("memory")`, one thread publishes, gets and
  acks each message in turn.

Every round checks that every message arrived once, in order.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import mqs
from mqs import metrics

ARMS = {"off": None, "default": metrics.DEFAULT_SAMPLE_EVERY, "every": 1}
PAYLOAD = b"x" * 64


def run_queue(count: int, sample_every: int | None) -> float:
    q = mqs.Queue()
    q.set_latency_sampling(sample_every)
    put, get = q.put, q.get
    start = time.perf_counter_ns()
    for i in range(count):
        put(i)
        if get() != i:
            raise AssertionError("Queue returned an item out of order")
    return (time.perf_counter_ns() - start) / 1e9


def run_shared(count: int, sample_every: int | None) -> float:
    q = mqs.SharedQueue(capacity_bytes=1 << 20)
    q.set_latency_sampling(sample_every)
    put, get = q.put, q.get
    start = time.perf_counter_ns()
    for _ in range(count):
        put(PAYLOAD)
        if get() != PAYLOAD:
            raise AssertionError("SharedQueue returned another payload")
    elapsed = (time.perf_counter_ns() - start) / 1e9
    q.close()
    return elapsed


def _produce(q: mqs.SharedQueue, count: int) -> None:
    put = q.put
    for i in range(count):
        put(i.to_bytes(8, "little") + PAYLOAD[8:])
    q.close()


def run_shared_ipc(count: int, sample_every: int | None) -> float:
    q = mqs.SharedQueue(capacity_bytes=1 << 20)
    q.set_latency_sampling(sample_every)
    context = multiprocessing.get_context("fork")
    start = time.perf_counter_ns()
    producer = context.Process(target=_produce, args=(q, count))
    producer.start()
    get_many = q.get_many
    expected = 0
    while expected < count:
        for message in get_many(1024, timeout=60):
            if int.from_bytes(message[:8], "little") != expected:
                raise AssertionError("SharedQueue lost or reordered a "
                                     "message across processes")
            expected += 1
    elapsed = (time.perf_counter_ns() - start) / 1e9
    producer.join(60)
    if producer.exitcode != 0:
        raise AssertionError(f"producer exited with {producer.exitcode}")
    q.close()
    return elapsed


def run_broker(count: int, sample_every: int | None) -> float:
    broker = mqs.Broker("memory", sample_every=sample_every)
    broker.declare_topic("t", dedup_window=0)
    consumer = broker.consume("t", "g", prefetch=1)
    publish, get = broker.publish, consumer.get
    start = time.perf_counter_ns()
    for i in range(count):
        publish("t", i)
        message = get(timeout=0)
        if message.body != i:
            raise AssertionError("Broker delivered out of order")
        message.ack()
    elapsed = (time.perf_counter_ns() - start) / 1e9
    consumer.close(drain=False)
    broker.close()
    return elapsed


# Subject name -> (run function, share of --count it moves per round).
SUBJECTS: dict[str, tuple[Callable[[int, int | None], float], float]] = {
    "Queue": (run_queue, 5.0),
    "SharedQueue": (run_shared, 1.0),
    "SharedQueue-ipc": (run_shared_ipc, 1.0),
    "Broker": (run_broker, 0.1),
}


def measure(subject: str, count: int, rounds: int) -> dict[str, object]:
    """Return per-arm throughputs and per-round costs of one subject."""
    run, share = SUBJECTS[subject]
    count = max(1, int(count * share))
    names = list(ARMS)
    for name in names:  # warm-up, not timed
        run(max(1, count // 10), ARMS[name])
    rates: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        order = names[index % len(names):] + names[:index % len(names)]
        for name in order:
            gc.collect()
            gc.disable()
            try:
                rates[name].append(count / run(count, ARMS[name]))
            finally:
                gc.enable()
    costs = {name: [1 - on / off for on, off in zip(rates[name],
                                                     rates["off"])]
             for name in names if name != "off"}
    return {"count": count, "rates": rates, "costs": costs}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs, CPython "
            f"{platform.python_version()}, mqs {mqs.__version__}")


def report(results: dict[str, dict[str, object]]) -> str:
    lines = [
        "| subject | messages per round | off (k msg/s) | default 1/"
        f"{metrics.DEFAULT_SAMPLE_EVERY} (k msg/s) | cost of default "
        "(median, IQR) | every message (k msg/s) | cost of every "
        "message (median, IQR) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for subject, result in results.items():
        rates = result["rates"]
        costs = result["costs"]
        cells = [subject, f"{result['count']:,}",
                 f"{statistics.median(rates['off']) / 1e3:,.0f}"]
        for name in ("default", "every"):
            cells.append(f"{statistics.median(rates[name]) / 1e3:,.0f}")
            low, _, high = statistics.quantiles(costs[name], n=4)
            cells.append(
                f"{statistics.median(costs[name]) * 100:+.1f}% "
                f"({low * 100:+.1f} to {high * 100:+.1f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200_000,
                        help="messages per round (Queue moves 5 times as "
                             "many, the broker a tenth); default 200,000")
    parser.add_argument("--rounds", type=int, default=21,
                        help="rounds per subject; default 21")
    parser.add_argument("--subject", action="append", choices=SUBJECTS,
                        help="run only this subject; repeat for several")
    parser.add_argument("--json", metavar="PATH",
                        help="also write the raw rates to this file")
    args = parser.parse_args(argv)

    subjects = args.subject or list(SUBJECTS)
    load_before = os.getloadavg()
    started = time.time()
    results = {subject: measure(subject, args.count, args.rounds)
               for subject in subjects}
    load_after = os.getloadavg()

    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"machine: {machine()}")
    print(f"time: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(started))}"
          f", {time.time() - started:.0f} s")
    print(f"load average: {' '.join(f'{x:.2f}' for x in load_before)} at "
          f"the start, {' '.join(f'{x:.2f}' for x in load_after)} at the end")
    print()
    print(report(results))

    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"machine": machine(), "load_before": load_before,
                       "load_after": load_after, "results": results},
                      file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
