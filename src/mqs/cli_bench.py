"""The `mqs bench` subcommand: options, progress display and tables.

The measurements live in `mqs.bench` and its sibling modules; this module
runs them, prints rich tables and writes the JSON report.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import statistics
import subprocess
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from mqs import (
    bench,
    bench_backends,
    bench_broker,
    bench_ipc,
    bench_latency,
    bench_plot,
    bench_redis,
    bench_seglog,
    bench_shapes,
    bench_wheel,
)
from mqs import cli_bench_tables as tables
from mqs.cli import EXIT_FAILED, EXIT_OK, _positive_int

SECTION_DESCRIPTIONS = {
    "shapes-threads": "the 5 Disruptor shapes over threads, 64 B messages",
    "shapes-processes": "the 5 Disruptor shapes over processes, 64 B",
    "payload-sweep": "one-to-one over processes, payloads of 8 B to 64 KiB",
    "latency-threads": "one-way latency between threads at a fixed rate, "
                       "from intended send times",
    "latency-processes": "one-way latency between processes at a fixed "
                         "rate, from intended send times",
    "timers": "mqs.TimingWheel insert/cancel/expire against heapq, sched "
              "and asyncio",
    "log": "mqs.SegmentLog appends and reads against persist-queue, "
           "litequeue, Redis and raw writes",
    "broker": "shm broker publish+consume+ack by one producer and one "
              "consumer process, and in 1 and 4 processes, against Redis "
              "Streams XADD/XREADGROUP/XACK",
    "redis-broker": "the broker's redis backend, batched, against "
                    "per-message XADD, XREADGROUP+XACK and LPUSH/BRPOP "
                    "loops of redis-py",
    "broker-backends": "broker publish+get+ack per backend (memory, shm, "
                       "log always/interval, redis) in threads, with "
                       "latency, against SQLiteAckQueue and Redis Streams "
                       "(appendfsync everysec)",
}


@dataclasses.dataclass(frozen=True)
class Profile:
    """Counts and repeats of one kind of run: quick, default or full."""

    name: str
    repeat: int
    queue_count: int
    shape_counts: dict[str, int]
    payload_sizes: tuple[int, ...]
    payload_count: int
    payload_budget_bytes: int
    latency_count: int
    wheel_count: int
    seglog_scale: float
    shape_warmup: bool = True
    wheel_repeat: int = 1
    seglog_repeat: int = 1
    # Delayed messages of the delivery lateness run (timers section).
    lateness_messages: int = 1_000
    # Scale of mqs.bench_broker's counts, and its timed rounds.
    broker_scale: float = 0.25
    broker_repeat: int = 1
    # Messages per loop of the redis-broker section, and its rounds (each
    # loop's row is its median round).
    redis_count: int = 5_000
    redis_rounds: int = 3
    # Messages per round of the broker-backends section, and its timed
    # rounds.
    backends_count: int = 1_000
    backends_repeat: int = 1

    def payload_messages(self, size_bytes: int) -> int:
        """Messages per run at `size_bytes`, capped by the byte budget."""
        return max(100, min(self.payload_count,
                            self.payload_budget_bytes // size_bytes))


PROFILES = {
    "quick": Profile(
        "quick", 1, bench.QUICK_COUNT,
        {"threads": 2_000, "processes": 1_000}, (8, 4096, 65536), 1_000,
        4 << 20, 300, 10_000, 0.005, shape_warmup=False,
        lateness_messages=200, broker_scale=0.02, redis_count=1_000,
        redis_rounds=1, backends_count=100),
    "default": Profile(
        "default", bench.DEFAULT_REPEAT, bench.DEFAULT_COUNT,
        {"threads": 30_000, "processes": 10_000}, (8, 64, 512, 4096, 65536),
        10_000, 64 << 20, 2_500, 100_000, 0.05, broker_scale=0.5,
        broker_repeat=3),
    "full": Profile(
        "full", 5, bench.FULL_COUNT,
        {"threads": 200_000, "processes": 50_000},
        bench_shapes.PAYLOAD_SIZES, 50_000, 512 << 20, 20_000,
        bench_wheel.DEFAULT_COUNT, 1.0, wheel_repeat=3, seglog_repeat=5,
        lateness_messages=2_000, broker_scale=1.0, broker_repeat=3,
        redis_count=20_000, backends_count=2_000, backends_repeat=3),
}


def _all_cases() -> list[str]:
    """Return every case name: in-process, ipc-, then the other sections."""
    return [*bench.CASES, *bench_ipc.CASES, *SECTION_DESCRIPTIONS]


def _bench_description() -> str:
    """Return the help description of `mqs bench`, with its case list."""
    descriptions = {name: case.description
                    for name, case in bench.CASES.items()}
    descriptions.update((name, case.description)
                        for name, case in bench_ipc.CASES.items())
    descriptions.update(SECTION_DESCRIPTIONS)
    width = max(len(name) for name in descriptions) + 2
    cases = "\n".join(f"  {name:<{width}}{description}"
                      for name, description in descriptions.items())
    return (
        "Measure mqs against the standard library and every installed\n"
        "peer in one run: in-process and cross-process queues, the LMAX\n"
        "Disruptor's shapes (one-to-one, three-to-one, one-to-three,\n"
        "pipeline, diamond) over threads and processes, a payload sweep,\n"
        "latency percentiles at a fixed rate measured from the intended\n"
        "send times (coordinated omission corrected), timers, the\n"
        "durable log and the shm broker against Redis Streams. Results\n"
        "are reported as ratios to the standard library or the peer.\n"
        "Every run checks that exactly the items sent arrived,\n"
        "intact and in order. Missing peers are skipped with a note.\n\n"
        "The default run is a representative subset of about a minute on\n"
        "an idle 2-core machine; --full runs the whole matrix with larger\n"
        "counts, --quick a smoke run of a few seconds.\n\n"
        f"cases:\n{cases}")


def add_parser(subparsers) -> None:
    """Add the `mqs bench` subparser to `subparsers`."""
    all_cases = _all_cases()
    parser = subparsers.add_parser(
        "bench",
        help="measure mqs queues against the standard library and peers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_bench_description(),
    )

    parser.add_argument(
        "--case", action="append", choices=all_cases, metavar="NAME",
        help=f"run only this case; repeat the option for several "
             f"(choices: {', '.join(all_cases)}; default: all)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true",
        help="a smoke run of a few seconds with small counts and 1 timed "
             "run: too short for stable numbers")
    size.add_argument(
        "--full", action="store_true",
        help="the whole matrix (every payload size) with large counts "
             "and 5 timed runs; several minutes")
    parser.add_argument(
        "--count", type=_positive_int, default=None, metavar="N",
        help=f"items per run in every selected case except log: "
             f"messages, round trips for ipc-pingpong, timers for timers "
             f"(default: per case; the in-process cases move "
             f"{bench.DEFAULT_COUNT:,} items, {bench.QUICK_COUNT:,} with "
             f"--quick and {bench.FULL_COUNT:,} with --full)")
    parser.add_argument(
        "--repeat", type=_positive_int, default=None, metavar="N",
        help=f"timed runs per case and queue, after one warm-up run; the "
             f"median is reported (default: {bench.DEFAULT_REPEAT}, 1 with "
             f"--quick, 5 with --full; timers and log: 1, or 3 and 5 with "
             f"--full; the latency cases make 1)")
    parser.add_argument(
        "--rate", type=_positive_int, default=bench_latency.DEFAULT_RATE_PER_S,
        metavar="N",
        help=f"messages per second the latency cases send (default: "
             f"{bench_latency.DEFAULT_RATE_PER_S:,})")
    parser.add_argument(
        "--json", metavar="PATH", dest="json_path",
        help="also write the machine, Python version, build flags and "
             "every result to PATH as JSON")
    parser.add_argument(
        "--plot", metavar="PATH", dest="plot_path",
        help="also render charts (throughput by payload size, latency "
             "percentiles, shapes) to PATH, in the format its suffix "
             "names (.png, .svg, .pdf, ...); needs matplotlib "
             "(pip install 'mqs[bench]')")
    parser.set_defaults(handler=lambda args: _run_bench(args, parser))


def _profile(args: argparse.Namespace) -> Profile:
    """Return the profile of `args` with --count and --repeat applied."""
    name = "quick" if args.quick else "full" if args.full else "default"
    profile = PROFILES[name]
    if args.repeat is not None:
        profile = dataclasses.replace(profile, repeat=args.repeat,
                                      wheel_repeat=args.repeat,
                                      seglog_repeat=args.repeat,
                                      broker_repeat=args.repeat,
                                      backends_repeat=args.repeat)
    if args.count is not None:
        profile = dataclasses.replace(
            profile, queue_count=args.count,
            shape_counts={domain: args.count
                          for domain in profile.shape_counts},
            payload_count=args.count, payload_budget_bytes=1 << 62,
            latency_count=args.count, wheel_count=args.count,
            backends_count=max(args.count, bench_backends.PRODUCERS
                               * bench_backends.CONSUMERS // 2))
    return profile


def _run_bench(args: argparse.Namespace,
               parser: argparse.ArgumentParser) -> int:
    """Run `mqs bench`; `parser` reports option errors found here."""
    profile = _profile(args)
    case_names = list(dict.fromkeys(args.case or _all_cases()))
    if args.json_path is not None:
        _check_output_path("--json", args.json_path, "bench.json", parser)
    if args.plot_path is not None:
        _check_output_path("--plot", args.plot_path, "bench.png", parser)
        missing = bench_plot.missing_reason()
        if missing is not None:
            parser.error(f"argument --plot: {missing}")
        # Checked before the run, which takes minutes.
        path_error = bench_plot.path_error(args.plot_path)
        if path_error is not None:
            parser.error(f"argument --plot: {path_error}")

    console = _make_console()
    machine = bench.machine_info()
    machine["peers"] = peer_versions()
    _print_machine(console, machine)
    console.print(f"profile: {profile.name}; timed runs: {profile.repeat} "
                  f"after 1 warm-up run; cases: {', '.join(case_names)}")

    started = time.monotonic()
    try:
        run = _run_with_progress(console, case_names, profile, args)
    except bench.BenchmarkError as exc:
        Console(stderr=True).print(f"[bold red]mqs bench: benchmark "
                                   f"failed:[/bold red] {escape(str(exc))}")
        return EXIT_FAILED
    duration_s = time.monotonic() - started

    _print_tables(console, run, profile)
    sections = ", ".join(f"{name} {seconds:.1f} s"
                         for name, seconds in run.durations.items()
                         if seconds >= 0.05)
    # Sections under 0.05 s are left out, and a quick single case may
    # leave none.
    console.print(f"finished in {duration_s:.2f} s"
                  + (f" ({sections})" if sections else ""))
    report = _report(args, run, profile, case_names, machine, duration_s)
    if args.json_path is not None:
        _write_json(args.json_path, report)
        console.print(f"wrote {args.json_path}")
    if args.plot_path is not None:
        bench_plot.render(report, args.plot_path)
        console.print(f"wrote {args.plot_path}")
    return EXIT_OK


def peer_versions() -> dict[str, str | None]:
    """Return the version of every optional peer package and server."""
    versions = bench_ipc.peer_versions()
    for package in ("persist-queue", "litequeue", "redis", "matplotlib"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    versions["redis-server"] = _redis_server_version()
    return versions


def _redis_server_version() -> str | None:
    binary = shutil.which(os.environ.get("MQS_REDIS_SERVER")
                          or "redis-server")
    if binary is None:
        return None
    try:
        output = subprocess.run([binary, "--version"], capture_output=True,
                                text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"v=(\S+)", output)
    return match.group(1) if match else output.strip() or None


@dataclasses.dataclass
class BenchRun:
    """Everything one `mqs bench` run measured or skipped."""

    results: list[bench.Result]
    ipc: bench_ipc.IpcReport
    shapes: list[bench_shapes.ShapeResult]
    payload: list[bench_shapes.ShapeResult]
    latency: list[bench_latency.LatencyRunResult]
    skipped: list[bench_ipc.Skipped]
    timers: dict | None = None
    log: dict | None = None
    broker: dict | None = None
    redis: dict | None = None
    backends: dict | None = None
    durations: dict[str, float] = dataclasses.field(default_factory=dict)


def _shape_runs(case_names: list[str], profile: Profile,
                ) -> tuple[list[bench_shapes.ShapeRun],
                           list[bench_shapes.ShapeRun]]:
    shapes = [bench_shapes.ShapeRun(domain, shape,
                                    bench_shapes.SHAPE_PAYLOAD_BYTES,
                                    profile.shape_counts[domain])
              for domain in ("threads", "processes")
              if f"shapes-{domain}" in case_names
              for shape in bench_shapes.SHAPES]
    payload = []
    if "payload-sweep" in case_names:
        payload = [bench_shapes.ShapeRun(
            "processes", "one-to-one", size, profile.payload_messages(size))
            for size in profile.payload_sizes]
    return shapes, payload


def _broker_runs(profile: Profile) -> int:
    ready = [name for name in bench_broker.CASE_NAMES
             if bench_broker._skip_reason(name) is None]
    return len(ready) * (profile.broker_repeat + 1)


def _backends_runs(profile: Profile) -> int:
    ready = [name for name in bench_backends.SUBJECT_NAMES
             if bench_backends.skip_reason(name) is None]
    return (len(ready) * len(bench_backends.SHAPE_NAMES)
            * (profile.backends_repeat + 1))


def _seglog_runs(profile: Profile) -> int:
    ready = [name for name in bench_seglog.CASE_NAMES
             if bench_seglog._skip_reason(name) is None]
    return len(ready) * (profile.seglog_repeat + 1)


def _run_with_progress(console: Console, case_names: list[str],
                       profile: Profile,
                       args: argparse.Namespace) -> BenchRun:
    thread_cases = [name for name in case_names if name in bench.CASES]
    ipc_cases = [name for name in case_names if name in bench_ipc.CASES]
    shape_runs, payload_runs = _shape_runs(case_names, profile)
    latency_domains = [domain for domain in ("threads", "processes")
                       if f"latency-{domain}" in case_names]
    total = (bench.count_runs(thread_cases, profile.repeat)
             + bench_ipc.count_runs(ipc_cases, profile.repeat)
             + bench_shapes.count_runs(shape_runs + payload_runs,
                                       profile.repeat, profile.shape_warmup)
             + bench_latency.count_runs(latency_domains)
             + ("timers" in case_names)
             + (_seglog_runs(profile) if "log" in case_names else 0)
             + (_broker_runs(profile) if "broker" in case_names else 0)
             + (len(bench_redis.BROKER_COMPARISON) * profile.redis_rounds
                if "redis-broker" in case_names else 0)
             + (_backends_runs(profile)
                if "broker-backends" in case_names else 0))
    # No auto refresh: its thread would be running while the cross-process
    # cases fork, and a fork copies the locks that thread may hold.
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=True,
        auto_refresh=False)
    with progress:
        task = progress.add_task("runs", total=total)

        def advance(case: str, queue_label: str) -> None:
            progress.update(task, advance=1,
                            description=f"{case} {queue_label}")
            progress.refresh()

        durations: dict[str, float] = {}
        clock = _SectionClock(durations)
        results = []
        if thread_cases:
            with clock("in-process"):
                results = bench.run_cases(thread_cases, profile.queue_count,
                                          profile.repeat, on_run=advance)
        with clock("cross-process"):
            ipc_report = bench_ipc.run_cases(
                ipc_cases, profile.repeat, count=args.count,
                profile=profile.name, on_run=advance)
        with clock("shapes"):
            shapes, skipped = bench_shapes.run_matrix(
                shape_runs, profile.repeat, on_run=advance,
                warmup=profile.shape_warmup)
        with clock("payload-sweep"):
            payload, payload_skipped = bench_shapes.run_matrix(
                payload_runs, profile.repeat, on_run=advance,
                warmup=profile.shape_warmup)
        with clock("latency"):
            latency, latency_skipped = bench_latency.run_latency(
                latency_domains, profile.latency_count, args.rate,
                on_run=advance)
        run = BenchRun(results, ipc_report, shapes, payload, latency,
                       skipped + payload_skipped + latency_skipped,
                       durations=durations)
        if "timers" in case_names:
            progress.update(task, description="timers")
            progress.refresh()
            with clock("timers"):
                run.timers = bench_wheel.run_wheel_bench(
                    profile.wheel_count, profile.wheel_repeat)
                # Delayed delivery through a SharedQueue to a consumer
                # process that is busy half of the time.
                lateness = bench_wheel.run_delivery_lateness(
                    profile.lateness_messages).to_dict()
                lateness.pop("machine", None)
                run.timers["delivery_lateness"] = lateness
            advance("timers", "done")
        if "log" in case_names:
            with clock("log"):
                run.log = bench_seglog.run_seglog_bench(
                    scale=profile.seglog_scale, repeat=profile.seglog_repeat,
                    progress=lambda text: advance("log", text))
        if "broker" in case_names:
            with clock("broker"):
                run.broker = bench_broker.run_broker_bench(
                    scale=profile.broker_scale, repeat=profile.broker_repeat,
                    progress=lambda text: advance("broker", text))
        if "redis-broker" in case_names:
            with clock("redis-broker"):
                run.redis = _run_redis_broker(
                    profile, lambda text: advance("redis-broker", text))
        if "broker-backends" in case_names:
            with clock("broker-backends"):
                run.backends = bench_backends.run_backends_bench(
                    profile.backends_count, profile.backends_repeat,
                    progress=lambda text: advance("broker-backends", text))
        return run


def _run_redis_broker(profile: Profile, progress) -> dict:
    """Run the redis-broker section, or return why it is skipped."""
    from mqs._redis_server import find_redis_server

    try:
        import redis  # noqa: F401
    except ImportError:
        return {"skipped": "redis-py is not installed (pip install "
                           "'mqs[bench]')"}
    if find_redis_server() is None:
        return {"skipped": "redis-server is not installed (Debian: apt-get "
                           "install redis-server)"}
    return bench_redis.run_broker_comparison(
        profile.redis_count, rounds=profile.redis_rounds, progress=progress)


class _SectionClock:
    """Context manager factory that adds each section's wall time."""

    def __init__(self, durations: dict[str, float]):
        self.durations = durations

    @contextlib.contextmanager
    def __call__(self, section: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self.durations[section] = time.monotonic() - started


def _print_tables(console: Console, run: BenchRun, profile: Profile) -> None:
    ratios = bench.tracked_ratios(run.results)
    ipc_ratios, unmeasured = bench_ipc.tracked_ratios(run.ipc)
    ratios.extend(ipc_ratios)
    if run.results:
        console.print(_results_table(run.results, profile.queue_count))
    if run.ipc.throughput or _skipped_in(run.ipc, "throughput"):
        console.print(_ipc_throughput_table(run.ipc))
    if run.ipc.latency or _skipped_in(run.ipc, "pingpong"):
        console.print(_latency_table(run.ipc))
    for domain in ("threads", "processes"):
        results = [r for r in run.shapes if r.domain == domain]
        if results:
            console.print(tables.shapes_table(domain, results, run.skipped))
    if run.payload:
        console.print(tables.payload_table(run.payload, run.skipped))
    if run.latency:
        console.print(tables.fixed_rate_latency_table(run.latency,
                                                      run.skipped))
    if run.timers is not None:
        console.print(tables.timers_table(run.timers))
        if "delivery_lateness" in run.timers:
            console.print(tables.lateness_text(
                run.timers["delivery_lateness"]))
    if run.log is not None:
        console.print(tables.log_table(run.log))
    if run.broker is not None:
        console.print(tables.broker_table(run.broker))
    if run.redis is not None:
        console.print(tables.redis_broker_table(run.redis))
    if run.backends is not None:
        console.print(tables.backends_table(run.backends))
    extra = tables.section_ratios(run.timers, run.log, run.broker,
                                  run.redis, run.backends)
    if ratios or unmeasured or extra:
        console.print(_ratios_table(ratios, unmeasured, extra,
                                    judged=profile.name != "quick"))


def _report(args: argparse.Namespace, run: BenchRun, profile: Profile,
            case_names: list[str], machine: dict, duration_s: float) -> dict:
    ratios = bench.tracked_ratios(run.results)
    ipc_ratios, unmeasured = bench_ipc.tracked_ratios(run.ipc)
    ratios.extend(ipc_ratios)
    timers = None
    if run.timers is not None:
        timers = {key: value for key, value in run.timers.items()
                  if key != "machine"}
    log = None
    if run.log is not None:
        log = {key: value for key, value in run.log.items()
               if key != "machine"}
    broker = None
    if run.broker is not None:
        broker = {key: value for key, value in run.broker.items()
                  if key != "machine"}
    backends = None
    if run.backends is not None:
        backends = {key: value for key, value in run.backends.items()
                    if key != "machine"}
    return {
        "command": ["mqs", *args.argv],
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "duration_s": duration_s,
        "section_durations_s": run.durations,
        "profile": profile.name,
        "settings": _settings(profile, case_names, run.ipc, args),
        "machine": machine,
        "results": [result.to_dict() for result in run.results]
        + [result.to_dict() for result in run.ipc.throughput],
        "latency": [result.to_dict() for result in run.ipc.latency],
        "skipped": [skip.to_dict() for skip in run.ipc.skipped],
        "ratios": [ratio.to_dict() for ratio in ratios],
        "ratios_not_measured": [
            {"name": tracked.name, "reason": reason}
            for tracked, reason in unmeasured],
        "shapes": [result.to_dict() for result in run.shapes],
        "payload_sweep": [result.to_dict() for result in run.payload],
        "fixed_rate_latency": {
            "method": bench_latency.METHOD,
            "rate_per_s": args.rate,
            "results": [result.to_dict() for result in run.latency],
        },
        "sections_skipped": [skip.to_dict() for skip in run.skipped],
        "timers": timers,
        "log": log,
        "broker": broker,
        "redis_broker": run.redis,
        "broker_backends": backends,
    }


def _settings(profile: Profile, case_names: list[str],
              ipc_report: bench_ipc.IpcReport,
              args: argparse.Namespace) -> dict:
    return {
        "count": profile.queue_count, "repeat": profile.repeat,
        "warmup_runs": 1, "cases": case_names,
        "batch_size": bench.BATCH_SIZE,
        "bounded_maxsize": bench.BOUNDED_MAXSIZE,
        "ipc": {
            "counts": ipc_report.counts,
            "start_method": bench_ipc.START_METHOD,
            "message_pool_size": bench_ipc.MESSAGE_POOL_SIZE,
            "pingpong_warmup_round_trips":
                bench_ipc.PINGPONG_WARMUP_ROUND_TRIPS,
            "faster_fifo_max_size_bytes":
                bench_ipc.FASTER_FIFO_MAX_SIZE_BYTES,
        },
        "shapes": {
            "counts": profile.shape_counts,
            "payload_bytes": bench_shapes.SHAPE_PAYLOAD_BYTES,
            "ring_capacity": bench_shapes.RING_CAPACITY,
            "warmup_runs": int(profile.shape_warmup),
        },
        "payload_sweep": {
            "sizes_bytes": list(profile.payload_sizes),
            "counts": {str(size): profile.payload_messages(size)
                       for size in profile.payload_sizes},
        },
        "latency": {"count": profile.latency_count, "rate_per_s": args.rate,
                    "payload_bytes": bench_latency.PAYLOAD_BYTES},
        "timers": {"count": profile.wheel_count,
                   "repeat": profile.wheel_repeat},
        "log": {"scale": profile.seglog_scale,
                "repeat": profile.seglog_repeat},
        "broker": {"scale": profile.broker_scale,
                   "repeat": profile.broker_repeat},
        "redis_broker": {"count": profile.redis_count,
                         "rounds": profile.redis_rounds,
                         "batch": bench_redis.DEFAULT_BATCH},
        "broker_backends": {"count": profile.backends_count,
                            "repeat": profile.backends_repeat},
    }


def _skipped_in(report: bench_ipc.IpcReport, kind: str) -> bool:
    return any(bench_ipc.CASES[skip.case].kind == kind
               for skip in report.skipped)


def _make_console() -> Console:
    """Return a console for stdout, 100 columns wide when not a terminal.

    Rich falls back to 80 columns without a terminal, which truncates the
    queue labels of the results table in logs and redirected output.
    """
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=100)
    return console


def _check_output_path(option: str, path: str, example: str,
                       parser: argparse.ArgumentParser) -> None:
    """Exit with status 2 before running if `path` cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"argument {option}: {path!r} is a directory; give a "
                     f"file path such as {os.path.join(path, example)!r}")
    if not os.path.isdir(directory):
        parser.error(f"argument {option}: directory {directory!r} not "
                     f"found; create it or choose another path")
    if not os.access(directory, os.W_OK):
        parser.error(f"argument {option}: directory {directory!r} is not "
                     f"writable; choose another path")


def _write_json(path: str, report: dict) -> None:
    """Write `report` to `path` through a temporary file and a rename."""
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as output:
        json.dump(report, output, indent=2)
        output.write("\n")
    os.replace(temporary, path)


def _print_machine(console: Console, machine: dict) -> None:
    memory = machine["memory_bytes"]
    memory_text = f"{memory / 2**30:.1f} GiB RAM" if memory else "RAM unknown"
    gil = "GIL enabled" if machine["gil_enabled"] else "GIL disabled"
    console.print(
        f"[bold]machine[/bold]: {machine['cpu_model']}, "
        f"{machine['cpu_count']} cores ({machine['cpus_usable']} usable), "
        f"{memory_text}, {machine['kernel']} {machine['machine']}")
    console.print(
        f"[bold]python[/bold]: {machine['python_implementation']} "
        f"{machine['python_version']}, {gil}, switch interval "
        f"{machine['switch_interval_s'] * 1000:g} ms; "
        f"[bold]mqs[/bold] {machine['mqs_version']}")
    flags = machine["build"]["compiler_flags"]
    console.print(f"[bold]build[/bold]: "
                  f"{'; '.join(flags) if flags else 'flags not recorded'}")
    peers = "; ".join(f"{name} {version or 'not installed'}"
                      for name, version in machine["peers"].items())
    console.print(f"[bold]peers[/bold]: {peers}")


def _format_rate(rate: float) -> str:
    return f"{rate / 1e6:,.2f}"


def _results_table(results: list[bench.Result], count: int) -> Table:
    table = Table(
        title=f"In-process throughput, million items per second "
              f"({count:,} items per run)",
        caption=f"x {bench.REFERENCE_QUEUE}: ratio of medians to the "
                f"case's {bench.REFERENCE_QUEUE}")
    table.add_column("case")
    table.add_column("queue")
    table.add_column("median", justify="right")
    table.add_column("min-max", justify="right")
    table.add_column(f"x {bench.REFERENCE_QUEUE}", justify="right")
    previous_case = None
    for result in results:
        first_of_case = result.case != previous_case
        if first_of_case and previous_case is not None:
            table.add_section()
        previous_case = result.case
        table.add_row(
            result.case if first_of_case else "", result.queue,
            _format_rate(result.median),
            f"{_format_rate(result.min)}-{_format_rate(result.max)}",
            f"{result.ratio_to_reference:.2f}x")
    return table


def _format_thousands(rate: float) -> str:
    return f"{rate / 1e3:,.0f}"


def _ipc_throughput_table(report: bench_ipc.IpcReport) -> Table:
    reference = bench_ipc.REFERENCE_QUEUE
    table = Table(
        title="Cross-process throughput, 1 producer process -> 1 consumer "
              "process, thousand messages per second",
        caption=f"Under each case: messages per run. MB/s: median payload "
                f"bytes / 10**6 per second. x mp.Queue: ratio of medians to "
                f"the case's {reference}." + _skip_notes(report, "throughput"))
    table.add_column("case")
    table.add_column("queue", no_wrap=True)
    table.add_column("median", justify="right")
    table.add_column("min-max", justify="right", no_wrap=True)
    table.add_column("MB/s", justify="right")
    table.add_column("x mp.Queue", justify="right")
    for index, name in enumerate(report.counts):
        if bench_ipc.CASES[name].kind != "throughput":
            continue
        if index and table.rows:
            table.add_section()
        label = f"{name}\n{report.counts[name]:,}"
        for result in report.throughput:
            if result.case != name:
                continue
            table.add_row(
                label, result.queue, _format_thousands(result.median),
                f"{_format_thousands(result.min)}-"
                f"{_format_thousands(result.max)}",
                f"{statistics.median(result.megabytes_per_s):,.1f}",
                f"{result.ratio_to_reference:.2f}x")
            label = ""
        for skip in report.skipped:
            if skip.case == name:
                table.add_row(label, skip.queue, "skipped")
                label = ""
    return table


def _skip_notes(report: bench_ipc.IpcReport, kind: str) -> str:
    """Return one caption line per skipped queue of the cases of `kind`."""
    notes: dict[str, str] = {}
    for skip in report.skipped:
        if bench_ipc.CASES[skip.case].kind == kind:
            notes.setdefault(skip.queue, skip.reason)
    return "".join(f"\n{queue} skipped: {escape(reason)}"
                   for queue, reason in notes.items())


def _format_ratio(value: float | None) -> str:
    """Format a ratio with 2 decimals, 3 below 0.1, or in e-notation."""
    if value is None:
        return "-"
    if value >= 0.1:
        return f"{value:.2f}x"
    if value >= 0.001:
        return f"{value:.3f}x"
    return f"{value:.1e}x"


def _format_us(nanoseconds: float) -> str:
    return f"{nanoseconds / 1e3:,.2f}"


def _latency_table(report: bench_ipc.IpcReport) -> Table:
    reference = bench_ipc.REFERENCE_QUEUE
    totals = {result.total_round_trips for result in report.latency}
    trips = (f", {totals.pop():,} round trips per queue"
             if len(totals) == 1 else "")
    table = Table(
        title=f"Cross-process round trip (ping-pong) of 64 B, "
              f"microseconds{trips}",
        caption=f"Percentiles over the round trips of all timed runs. "
                f"p50 x mp.Queue: ratio to the p50 of {reference}; "
                f"lower is faster." + _skip_notes(report, "pingpong"))
    table.add_column("queue", no_wrap=True)
    table.add_column("p50", justify="right")
    table.add_column("p90", justify="right")
    table.add_column("p99", justify="right")
    table.add_column("mean", justify="right")
    table.add_column("p50 x mp.Queue", justify="right")
    for result in report.latency:
        table.add_row(
            result.queue, _format_us(result.p50_ns),
            _format_us(result.p90_ns), _format_us(result.p99_ns),
            _format_us(result.mean_ns),
            _format_ratio(result.p50_ratio_to_reference))
    for skip in report.skipped:
        if bench_ipc.CASES[skip.case].kind == "pingpong":
            table.add_row(skip.queue, "skipped")
    return table


def _ratios_table(
        ratios: list[bench.RatioResult],
        unmeasured: list[tuple[bench.TrackedRatio, str]],
        extra: list[tables.SectionRatio] | None = None, *,
        judged: bool = True) -> Table:
    """Return the table of tracked ratios. With `judged` false (a --quick
    run, whose counts are too small for the targets) the status column
    reads "not judged" instead of met or missed."""
    table = Table(title="Tracked ratios (throughput: of medians; "
                        "latency: of p50)")
    table.add_column("ratio")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_column("status")
    smoke = "not judged (--quick)"
    for ratio in ratios:
        status = "[green]met[/green]" if ratio.met else "[red]missed[/red]"
        table.add_row(ratio.tracked.name, _format_ratio(ratio.value),
                      f"{ratio.tracked.comparison} {ratio.tracked.target:g}x",
                      status if judged else smoke)
    for tracked, reason in unmeasured:
        table.add_row(tracked.name, "-",
                      f"{tracked.comparison} {tracked.target:g}x",
                      "not measured")
    for row in extra or []:
        cells = row.cells()
        if not judged and row.met is not None:
            cells = (*cells[:3], smoke)
        table.add_row(*cells)
    notes = dict.fromkeys(reason for _, reason in unmeasured)
    captions = []
    if not judged:
        captions.append("--quick is a smoke run: its counts are too small "
                        "to hold the targets to; run mqs bench without "
                        "--quick to judge them")
    if notes:
        captions.append("not measured: " + "\n".join(
            escape(note) for note in notes))
    if captions:
        table.caption = "\n".join(captions)
    return table
