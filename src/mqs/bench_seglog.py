"""Append and read rates of `mqs.SegmentLog` against durable-queue peers.

Every case writes to a fresh directory under `directory` (default: the
system temporary directory; give a path on the disk you care about) and
is timed with `time.perf_counter_ns` around the appends or reads only,
with the garbage collector off. `os.sync()` runs before every round so
one case's dirty pages are not written back during the next. Rounds go
round-robin over the cases (a warm-up round, then `repeat` timed ones),
so a slow spell of a shared disk hits mqs and its peers alike; each
result keeps the median, min and max rate. The page-cache cases swing
the most: on a 2-vCPU KVM guest, the first few hundred MiB of fresh page
cache in a process cost about 10 us per 4 KiB page to touch (kernel
memset under the page faults) and later ones about 1 us, whether
written through mmap or write().

Cases (records of 100 bytes unless the name ends in 4KiB):

- ``seglog.<mode>.<size>``: one thread calls `append` per record with
  ``fsync=`` "always", "interval" or "never".
- ``seglog.always.append_many_100``: `append_many` batches of 100 under
  "always" (one sync per batch).
- ``durable_queue.always.8_processes``: 8 producer processes putting
  into one ``SharedQueue(persist=..., fsync="always")``; each put returns
  after a sync that covers it, and the appender syncs once per batch.
- ``seglog.always.8_threads``: 8 threads calling `append` under
  "always"; their syncs are shared (group commit). The result records
  the number of syncs.
- ``seglog.read.<size>``: `read` of every record in order (memoryview).
- ``seglog.read_batch``: `read_batch` of 65,536 records at a time.
- ``persistqueue.SQLiteQueue``, ``persistqueue.Queue``, ``litequeue``:
  `put` per record with each library's defaults (skipped if the package
  is missing; install the ``bench`` extra).
- ``redis.appendfsync_everysec`` and ``redis.appendfsync_always``: one
  XADD per record through redis-py (with hiredis when installed) to a
  redis-server that each round starts on 127.0.0.1 with the append-only
  file on and ``appendfsync everysec`` (the peer of ``fsync="interval"``,
  since both sync in the background about once per interval) or
  ``always`` (the peer of ``fsync="always"``). Skipped without redis-py
  or a redis-server binary.
- ``python.write_flush``: a Python loop that frames each record (length,
  CRC-32 from zlib, offset, timestamp) and calls ``write`` + ``flush``.
- ``raw.sequential_write``: ``write`` of 1 MiB blocks to a new file
  without sync; ``raw.sequential_write_preallocated`` does the same into
  a file preallocated with posix_fallocate, which skips block allocation
  as the log's segments do. The 4 KiB "never" case is compared with the
  faster of the two.

Each seglog round is checked afterwards (end offset and sampled records),
since the rate of a wrong run means nothing; a failed check raises
`mqs.bench.BenchmarkError`. `run_seglog_bench` returns a dict and
`format_seglog_bench` renders it as text.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import statistics
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import mqs
from mqs._redis_server import find_redis_server
from mqs.bench import BenchmarkError, machine_info, timed_ns

SMALL = 100
LARGE = 4096
THREADS = 8
BATCH = 100
READ_BATCH_ROWS = 65536
SEGMENT_BYTES = 256 << 20

# Records per round at scale 1. The "always" and peer cases sync per
# record, so they get far fewer records than the page-cache cases.
# Puts of the 8-process case in all, at any scale. The 8 processes start
# putting up to about 3 ms apart on a 2-vCPU VM. There, a round of 400
# puts took 10 to 12 ms (32,000 to 38,000 puts/s) and one of 2,000 took
# 34 ms (57,000 to 59,000 puts/s), so the start skew decided small rounds.
MIN_PROCESS_PUTS = 2_000
BASE_COUNTS = {
    "always": 3_000,
    "many": 100_000,
    "threads": 16_000,
    "processes": 8_000,
    "fast": 1_000_000,
    "large": 100_000,
    "peer": 3_000,
    "read_batch": 4_000_000,
    "raw_bytes": 512 << 20,
}

# Targets of the tracked ratios: (numerator case, denominator case or
# None for an absolute rate, minimum).
TARGETS = {
    "always_100B_vs_sqlitequeue": (
        "seglog.always.100B", "persistqueue.SQLiteQueue", 1.0),
    "8_threads_always_vs_sqlitequeue": (
        "seglog.always.8_threads", "persistqueue.SQLiteQueue", 5.0),
    "durable_queue_8_processes_always_vs_sqlitequeue": (
        "durable_queue.always.8_processes", "persistqueue.SQLiteQueue", 5.0),
    "append_many_100_always_vs_sqlitequeue": (
        "seglog.always.append_many_100", "persistqueue.SQLiteQueue", 50.0),
    "interval_100B_vs_write_flush": (
        "seglog.interval.100B", "python.write_flush", 3.0),
    "interval_100B_vs_redis_everysec": (
        "seglog.interval.100B", "redis.appendfsync_everysec", 100.0),
    # Both sides pay one sync per record, so ours must not pay more.
    "always_100B_vs_redis_always": (
        "seglog.always.100B", "redis.appendfsync_always", 1.0),
    # Against the faster of the two raw.sequential_write cases.
    "never_4KiB_bandwidth_vs_raw_write": (
        "seglog.never.4KiB", "raw.sequential_write", 0.5),
    "read_batch_records_per_s": ("seglog.read_batch", None, 10_000_000),
}


class _Round:
    """One timed round: records (or blocks) done, elapsed time, extras."""

    def __init__(self, amount: int, elapsed_ns: int, extra: dict | None = None):
        self.amount = amount
        self.elapsed_ns = max(elapsed_ns, 1)
        self.extra = extra or {}


def _payload(size: int) -> bytes:
    return bytes((i * 7 + 1) & 0xFF or 1 for i in range(size))


def _check_log(log: mqs.SegmentLog, count: int, value: bytes) -> None:
    if log.end_offset != count:
        raise BenchmarkError(
            f"log at {log.path} ends at offset {log.end_offset}, expected "
            f"{count}")
    for offset in {0, count // 2, count - 1}:
        if bytes(log.read(offset)) != value:
            raise BenchmarkError(
                f"record {offset} of {log.path} has the wrong bytes")


# ---- seglog cases --------------------------------------------------------

def _append_round(workdir: str, fsync: str, size: int, count: int) -> _Round:
    value = _payload(size)
    with mqs.SegmentLog(os.path.join(workdir, "log"),
                        segment_bytes=SEGMENT_BYTES, fsync=fsync) as log:
        append = log.append

        def body() -> None:
            for _ in range(count):
                append(value)

        elapsed = timed_ns(body)
        _check_log(log, count, value)
        syncs = log.stats().syncs
    return _Round(count, elapsed, {"bytes": count * size, "syncs": syncs})


def _append_many_round(workdir: str, count: int) -> _Round:
    value = _payload(SMALL)
    batch = [value] * BATCH
    batches = max(1, count // BATCH)
    with mqs.SegmentLog(os.path.join(workdir, "log"),
                        segment_bytes=SEGMENT_BYTES, fsync="always") as log:
        def body() -> None:
            for _ in range(batches):
                log.append_many(batch)

        elapsed = timed_ns(body)
        _check_log(log, batches * BATCH, value)
        syncs = log.stats().syncs
    return _Round(batches * BATCH, elapsed, {"syncs": syncs})


def _threads_round(workdir: str, count: int) -> _Round:
    value = _payload(SMALL)
    per_thread = max(1, count // THREADS)
    errors: list[BaseException] = []
    with mqs.SegmentLog(os.path.join(workdir, "log"),
                        segment_bytes=SEGMENT_BYTES, fsync="always") as log:
        def work() -> None:
            try:
                for _ in range(per_thread):
                    log.append(value)
            except BaseException as exc:  # reported after the join
                errors.append(exc)

        def body() -> None:
            threads = [threading.Thread(target=work) for _ in range(THREADS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        elapsed = timed_ns(body)
        if errors:
            raise BenchmarkError(f"an appending thread failed: {errors[0]!r}")
        _check_log(log, per_thread * THREADS, value)
        syncs = log.stats().syncs
    return _Round(per_thread * THREADS, elapsed, {"syncs": syncs})


def _read_round(workdir: str, size: int, count: int) -> _Round:
    value = _payload(size)
    path = os.path.join(workdir, "log")
    with mqs.SegmentLog(path, segment_bytes=SEGMENT_BYTES,
                        fsync="never") as log:
        log.append_many([value] * count)
        read = log.read
        total = [0]

        def body() -> None:
            n = 0
            for offset in range(count):
                n += len(read(offset))
            total[0] = n

        elapsed = timed_ns(body)
    if total[0] != count * size:
        raise BenchmarkError(
            f"read {total[0]} bytes, expected {count * size}")
    return _Round(count, elapsed, {"bytes": count * size})


def _read_batch_round(workdir: str, count: int) -> _Round:
    value = _payload(SMALL)
    path = os.path.join(workdir, "log")
    with mqs.SegmentLog(path, segment_bytes=1 << 30, fsync="never") as log:
        for start in range(0, count, 100_000):
            log.append_many([value] * min(100_000, count - start))
        log.read_batch(0, 16)   # imports pyarrow outside the clock
        rows = [0]
        last: list[Any] = [None]

        def body() -> None:
            offset = 0
            while offset < count:
                batch = log.read_batch(offset, READ_BATCH_ROWS)
                offset += batch.num_rows
                last[0] = batch
            rows[0] = offset

        elapsed = timed_ns(body)
        if rows[0] != count or last[0].column("value")[0].as_py() != value:
            raise BenchmarkError(
                f"read_batch returned {rows[0]} rows, expected {count}")
    return _Round(count, elapsed)


# ---- peers ---------------------------------------------------------------

def _sqlitequeue_round(workdir: str, count: int) -> _Round:
    import persistqueue

    value = _payload(SMALL)
    queue = persistqueue.SQLiteQueue(os.path.join(workdir, "q"),
                                     auto_commit=True)
    elapsed = timed_ns(lambda: [queue.put(value) for _ in range(count)])
    if queue.qsize() != count:
        raise BenchmarkError(f"SQLiteQueue contains {queue.qsize()} items, "
                             f"expected {count}")
    return _Round(count, elapsed)


def _file_queue_round(workdir: str, count: int) -> _Round:
    import persistqueue

    value = _payload(SMALL)
    queue = persistqueue.Queue(os.path.join(workdir, "q"),
                               tempdir=workdir)
    elapsed = timed_ns(lambda: [queue.put(value) for _ in range(count)])
    if queue.qsize() != count:
        raise BenchmarkError(f"persistqueue.Queue contains {queue.qsize()} "
                             f"items, expected {count}")
    return _Round(count, elapsed)


def _litequeue_round(workdir: str, count: int) -> _Round:
    import litequeue

    value = _payload(SMALL).decode("latin-1")  # its data column is TEXT
    queue = litequeue.LiteQueue(os.path.join(workdir, "q.sqlite3"))
    elapsed = timed_ns(lambda: [queue.put(value) for _ in range(count)])
    size = queue.qsize()
    queue.close()
    if size != count:
        raise BenchmarkError(f"litequeue contains {size} items, expected "
                             f"{count}")
    return _Round(count, elapsed)


def _redis_round(workdir: str, appendfsync: str, count: int) -> _Round:
    import redis

    from mqs._redis_server import RedisServer

    value = _payload(SMALL)
    with RedisServer(appendfsync=appendfsync) as server:
        client = redis.Redis.from_url(server.url)
        xadd = client.xadd
        elapsed = timed_ns(
            lambda: [xadd("log", {"v": value}) for _ in range(count)])
        length = client.xlen("log")
        client.close()
    if length != count:
        raise BenchmarkError(f"redis stream contains {length} entries, "
                             f"expected {count}")
    return _Round(count, elapsed)


def _write_flush_round(workdir: str, count: int) -> _Round:
    value = _payload(SMALL)
    header = struct.Struct("<IIqq")
    crc = zlib.crc32(value)
    path = os.path.join(workdir, "records")
    with open(path, "ab") as f:
        write, flush = f.write, f.flush

        def body() -> None:
            for offset in range(count):
                write(header.pack(len(value), crc, offset, time.time_ns()))
                write(value)
                flush()

        elapsed = timed_ns(body)
    if os.path.getsize(path) != count * (header.size + SMALL):
        raise BenchmarkError("write()+flush() file has the wrong size")
    return _Round(count, elapsed)


def _raw_write_round(workdir: str, total_bytes: int,
                     preallocate: bool) -> _Round:
    block = _payload(1 << 20)
    blocks = max(1, total_bytes // len(block))
    path = os.path.join(workdir, "raw")
    with open(path, "wb", buffering=0) as f:
        if preallocate:
            os.posix_fallocate(f.fileno(), 0, blocks * len(block))
        elapsed = timed_ns(lambda: [f.write(block) for _ in range(blocks)])
    return _Round(blocks, elapsed, {"bytes": blocks * len(block)})


# ---- runner --------------------------------------------------------------

def _durable_producer(queue: Any, value: bytes, count: int,
                      start: Any, times: Any) -> None:
    start.wait()
    began = time.perf_counter_ns()
    for _ in range(count):
        queue.put(value)
    times.put((began, time.perf_counter_ns()))
    queue.close()


def _durable_queue_round(workdir: str, count: int) -> _Round:
    """THREADS producer processes put into one SharedQueue(persist=...,
    fsync="always"); every put returns after a sync that covers it.

    Each producer reads the monotonic clock (CLOCK_MONOTONIC, the same in
    every process) after the start event and after its last put. The
    round runs from the first start to the last put, so process exit and
    `close` are not timed."""
    value = _payload(SMALL)
    per_process = max(1, count // THREADS)
    context = multiprocessing.get_context("fork")
    start = context.Event()
    times = context.SimpleQueue()
    queue = mqs.SharedQueue(persist=os.path.join(workdir, "queue"),
                            fsync="always", capacity_bytes=1 << 22)
    try:
        producers = [context.Process(target=_durable_producer,
                                     args=(queue, value, per_process, start,
                                           times))
                     for _ in range(THREADS)]
        for producer in producers:
            producer.start()
        start.set()
        for producer in producers:
            producer.join()
        if [p.exitcode for p in producers] != [0] * THREADS:
            raise BenchmarkError(
                f"a durable queue producer failed: exit codes "
                f"{[p.exitcode for p in producers]}")
        spans = [times.get() for _ in producers]
        elapsed = (max(span[1] for span in spans)
                   - min(span[0] for span in spans))
        if queue.qsize() != per_process * THREADS:
            raise BenchmarkError(
                f"the durable queue holds {queue.qsize()} messages, "
                f"expected {per_process * THREADS}")
    finally:
        queue.close()
    return _Round(per_process * THREADS, elapsed)


def _cases(scale: float) -> dict[str, tuple[Callable[[str], _Round], str]]:
    def n(kind: str) -> int:
        return max(1, int(BASE_COUNTS[kind] * scale))

    cases: dict[str, tuple[Callable[[str], _Round], str]] = {}
    for fsync in ("always", "interval", "never"):
        small = n("always") if fsync == "always" else n("fast")
        large = n("always") // 2 if fsync == "always" else n("large")
        cases[f"seglog.{fsync}.100B"] = (
            lambda d, f=fsync, c=small: _append_round(d, f, SMALL, c),
            "records")
        cases[f"seglog.{fsync}.4KiB"] = (
            lambda d, f=fsync, c=large: _append_round(d, f, LARGE, c),
            "records")
    cases["seglog.always.append_many_100"] = (
        lambda d: _append_many_round(d, n("many")), "records")
    cases["seglog.always.8_threads"] = (
        lambda d: _threads_round(d, n("threads")), "records")
    cases["durable_queue.always.8_processes"] = (
        lambda d: _durable_queue_round(d, max(n("processes"),
                                              MIN_PROCESS_PUTS)),
        "records")
    cases["seglog.read.100B"] = (
        lambda d: _read_round(d, SMALL, n("fast")), "records")
    cases["seglog.read.4KiB"] = (
        lambda d: _read_round(d, LARGE, n("large")), "records")
    cases["seglog.read_batch"] = (
        lambda d: _read_batch_round(d, n("read_batch")), "records")
    cases["persistqueue.SQLiteQueue"] = (
        lambda d: _sqlitequeue_round(d, n("peer")), "records")
    cases["persistqueue.Queue"] = (
        lambda d: _file_queue_round(d, n("peer")), "records")
    cases["litequeue"] = (lambda d: _litequeue_round(d, n("peer")), "records")
    for appendfsync in ("everysec", "always"):
        cases[f"redis.appendfsync_{appendfsync}"] = (
            lambda d, a=appendfsync: _redis_round(d, a, n("peer")), "records")
    cases["python.write_flush"] = (
        lambda d: _write_flush_round(d, n("fast")), "records")
    cases["raw.sequential_write"] = (
        lambda d: _raw_write_round(d, n("raw_bytes"), False), "blocks")
    cases["raw.sequential_write_preallocated"] = (
        lambda d: _raw_write_round(d, n("raw_bytes"), True), "blocks")
    return cases


CASE_NAMES = tuple(_cases(1.0))


def _skip_reason(name: str) -> str | None:
    modules = {
        "persistqueue.": "persistqueue",
        "litequeue": "litequeue",
        "redis.": "redis",
    }
    for prefix, module in modules.items():
        if name.startswith(prefix):
            try:
                __import__(module)
            except ImportError:
                return (f"{module} is not installed (pip install "
                        f"'mqs[bench]')")
    if name.startswith("redis.") and find_redis_server() is None:
        return ("redis-server is not installed (Debian: apt-get install "
                "redis-server)")
    return None


def _one_round(run: Callable[[str], _Round], directory: str | None) -> _Round:
    workdir = tempfile.mkdtemp(prefix="mqs-bench-seglog-", dir=directory)
    try:
        os.sync()
        return run(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _summary(name: str, unit: str, rounds: list[_Round]) -> dict:
    rates = sorted(r.amount / r.elapsed_ns * 1e9 for r in rounds)
    median_round = sorted(rounds, key=lambda r: r.amount / r.elapsed_ns)[
        len(rounds) // 2]
    out: dict[str, Any] = {
        "case": name,
        "unit": unit,
        "amount": median_round.amount,
        "rounds": len(rounds),
        "rate_per_s": statistics.median(rates),
        "rate_min_per_s": rates[0],
        "rate_max_per_s": rates[-1],
    }
    if "bytes" in median_round.extra:
        out["bytes_per_s"] = (median_round.extra["bytes"] /
                              median_round.elapsed_ns * 1e9)
    if "syncs" in median_round.extra:
        out["syncs"] = median_round.extra["syncs"]
    return out


def run_case(name: str, directory: str | None = None, scale: float = 1.0,
             repeat: int = 3) -> dict:
    """Run one case: a warm-up round and `repeat` timed rounds.

    Returns a dict with the case name, records (or blocks) per round, the
    median, min and max rate per second, bytes per second where the case
    writes bytes, syncs where it counts them, or ``skipped`` with the
    reason.
    """
    return _run_cases([name], directory, scale, repeat, None)[name]


def _run_cases(names: Sequence[str], directory: str | None, scale: float,
               repeat: int, progress: Callable[[str], None] | None
               ) -> dict[str, dict]:
    """Run every case once per round, round after round, so that a slow
    spell of the machine (other processes' I/O) hits all cases alike."""
    cases = _cases(scale)
    for name in names:
        if name not in cases:
            raise ValueError(f"unknown case {name!r}; expected one of "
                             f"{', '.join(cases)}")
    skipped = {name: _skip_reason(name) for name in names}
    rounds: dict[str, list[_Round]] = {name: [] for name in names}
    for index in range(repeat + 1):
        for name in names:
            if skipped[name]:
                continue
            if progress:
                progress(f"round {index}/{repeat} {name}")
            result = _one_round(cases[name][0], directory)
            if index > 0:
                rounds[name].append(result)
    results = {}
    for name in names:
        if skipped[name]:
            results[name] = {"case": name, "skipped": skipped[name]}
        else:
            results[name] = _summary(name, cases[name][1], rounds[name])
    return results


def _ratio(results: dict[str, dict], numerator: str,
           denominator: str | None) -> float | None:
    top = results.get(numerator, {})
    if "rate_per_s" not in top:
        return None
    if denominator is None:
        return top["rate_per_s"]
    bottom = results.get(denominator, {})
    if "rate_per_s" not in bottom:
        return None
    if denominator == "raw.sequential_write":
        other = results.get("raw.sequential_write_preallocated", {})
        reference = max(bottom["bytes_per_s"], other.get("bytes_per_s", 0.0))
        return top.get("bytes_per_s", 0.0) / reference
    return top["rate_per_s"] / bottom["rate_per_s"]


def run_seglog_bench(directory: str | None = None, scale: float = 1.0,
                     repeat: int = 5,
                     cases: Sequence[str] | None = None,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Run the segment log benchmark and return the results as a dict.

    Parameters
    ----------
    directory : str or None
        Where the logs and peer files are written (a fresh subdirectory
        per round, removed afterwards).
    scale : float
        Multiplies the records per round (1.0 with the default `repeat`:
        about a minute on 2 cores with every peer installed).
    repeat : int
        Timed rounds per case, after one warm-up round.
    cases : sequence of str or None
        Case names to run (default: all of `CASE_NAMES`).
    progress : callable or None
        Called with a round number and case name before each round.

    Returns
    -------
    dict
        ``machine`` (`mqs.bench.machine_info`), ``directory``,
        ``cases`` (one dict per case, see `run_case`) and ``ratios``
        (name, value, target, met) for the tracked targets.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat!r}")
    names = list(cases) if cases is not None else list(CASE_NAMES)
    results = _run_cases(names, directory, scale, repeat, progress)
    ratios = []
    for ratio_name, (numerator, denominator, target) in TARGETS.items():
        value = _ratio(results, numerator, denominator)
        ratios.append({
            "name": ratio_name,
            "numerator": numerator,
            "denominator": denominator,
            "value": value,
            "target": target,
            "met": None if value is None else value >= target,
        })
    return {
        "machine": machine_info(),
        "directory": directory or tempfile.gettempdir(),
        "filesystem": _filesystem(directory or tempfile.gettempdir()),
        "scale": scale,
        "repeat": repeat,
        "cases": list(results.values()),
        "ratios": ratios,
    }


def _filesystem(path: str) -> str | None:
    """Return the file system type of `path` from /proc/mounts, if found."""
    try:
        real = os.path.realpath(path)
        best = ("", None)
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) >= 3 and real.startswith(fields[1]) and \
                        len(fields[1]) > len(best[0]):
                    best = (fields[1], fields[2])
        return best[1]
    except OSError:
        return None


def format_seglog_bench(result: dict) -> str:
    """Render a `run_seglog_bench` result as a plain-text table."""
    lines = [f"{'case':36} {'median/s':>14} {'min/s':>14} {'max/s':>14} "
             f"{'MB/s':>9} {'syncs':>7}"]
    for case in result["cases"]:
        if "skipped" in case:
            lines.append(f"{case['case']:36} skipped: {case['skipped']}")
            continue
        mb = case.get("bytes_per_s")
        lines.append(
            f"{case['case']:36} {case['rate_per_s']:14,.0f} "
            f"{case['rate_min_per_s']:14,.0f} {case['rate_max_per_s']:14,.0f} "
            f"{'' if mb is None else format(mb / 1e6, '9,.0f'):>9} "
            f"{case.get('syncs', ''):>7}")
    lines.append("")
    for ratio in result["ratios"]:
        value = ratio["value"]
        shown = "n/a" if value is None else (
            f"{value:,.0f}/s" if ratio["denominator"] is None
            else f"{value:.2f}x")
        target = (f"{ratio['target']:,.0f}/s" if ratio["denominator"] is None
                  else f"{ratio['target']}x")
        verdict = {True: "met", False: "MISSED", None: "not measured"}[
            ratio["met"]]
        lines.append(f"{ratio['name']:40} {shown:>14}  target >= {target}  "
                     f"{verdict}")
    machine = result["machine"]
    lines.append("")
    lines.append(f"{machine.get('cpu_model')}, {machine.get('cpu_count')} "
                 f"CPUs, Python {machine.get('python_version')}, "
                 f"{result.get('filesystem')} at {result['directory']}, "
                 f"load {machine.get('load_average')}")
    return "\n".join(lines)
