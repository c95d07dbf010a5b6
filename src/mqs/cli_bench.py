"""The `mqs bench` subcommand: options, progress display and tables.

The measurements live in `mqs.bench` and its sibling modules; this module
runs them, prints rich tables and writes the JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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

from mqs import bench, bench_ipc
from mqs.cli import EXIT_FAILED, EXIT_OK, _positive_int


def _all_cases() -> list[str]:
    """Return every case name: the in-process cases, then the ipc- ones."""
    return [*bench.CASES, *bench_ipc.CASES]


def _bench_description() -> str:
    """Return the help description of `mqs bench`, with its case list."""
    descriptions = {name: case.description
                    for name, case in bench.CASES.items()}
    descriptions.update((name, case.description)
                        for name, case in bench_ipc.CASES.items())
    width = max(len(name) for name in descriptions) + 2
    cases = "\n".join(f"  {name:<{width}}{description}"
                      for name, description in descriptions.items())
    return (
        "Measure the throughput of mqs.Queue and mqs.SimpleQueue\n"
        "against queue.Queue and queue.SimpleQueue, and the throughput\n"
        "and round-trip latency of mqs.SharedQueue between two\n"
        "processes against multiprocessing.Queue and its peers\n"
        "(faster-fifo and pyzmq, when installed), in the same run.\n"
        "Every run checks that exactly the items put arrived, intact\n"
        "and in order.\n\n"
        f"cases:\n{cases}")


def add_parser(subparsers) -> None:
    """Add the `mqs bench` subparser to `subparsers`."""
    all_cases = _all_cases()
    ipc_counts = ", ".join(
        f"{case.default_count:,} ({case.quick_count:,})"
        for case in bench_ipc.CASES.values())
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
    parser.add_argument(
        "--count", type=_positive_int, default=None, metavar="N",
        help=f"items per run in every selected case: messages, or round "
             f"trips for ipc-pingpong (default: {bench.DEFAULT_COUNT:,} "
             f"({bench.QUICK_COUNT:,}) for the in-process cases; "
             f"{ipc_counts} for the ipc- cases in the order above; the "
             f"counts in brackets are those of --quick)")
    parser.add_argument(
        "--repeat", type=_positive_int, default=bench.DEFAULT_REPEAT,
        metavar="N",
        help=f"timed runs per case and queue, after one warm-up run; the "
             f"median is reported (default: {bench.DEFAULT_REPEAT})")
    parser.add_argument(
        "--quick", action="store_true",
        help="use each case's small default count (in brackets under "
             "--count) unless --count is given: a smoke test, too short "
             "for stable numbers")
    parser.add_argument(
        "--json", metavar="PATH", dest="json_path",
        help="also write the machine description and every result to "
             "PATH as JSON")
    parser.set_defaults(handler=lambda args: _run_bench(args, parser))


def _run_bench(args: argparse.Namespace,
               parser: argparse.ArgumentParser) -> int:
    """Run `mqs bench`; `parser` reports option errors found here."""
    count = args.count
    if count is None:
        count = bench.QUICK_COUNT if args.quick else bench.DEFAULT_COUNT
    case_names = list(dict.fromkeys(args.case or _all_cases()))
    thread_cases = [name for name in case_names if name in bench.CASES]
    ipc_cases = [name for name in case_names if name in bench_ipc.CASES]
    if args.json_path is not None:
        _check_json_path(args.json_path, parser)

    console = _make_console()
    machine = bench.machine_info()
    machine["peers"] = bench_ipc.peer_versions()
    _print_machine(console, machine)
    console.print(f"timed runs: {args.repeat} after 1 warm-up run; "
                  f"cases: {', '.join(case_names)}")

    started = time.monotonic()
    try:
        results, ipc_report = _run_with_progress(
            console, thread_cases, ipc_cases, count, args)
    except bench.BenchmarkError as exc:
        Console(stderr=True).print(f"[bold red]mqs bench: benchmark "
                                   f"failed:[/bold red] {escape(str(exc))}")
        return EXIT_FAILED
    duration_s = time.monotonic() - started
    ratios = bench.tracked_ratios(results)
    ipc_ratios, unmeasured = bench_ipc.tracked_ratios(ipc_report)
    ratios.extend(ipc_ratios)

    if results:
        console.print(_results_table(results, count))
    if ipc_report.throughput or _skipped_in(ipc_report, "throughput"):
        console.print(_ipc_throughput_table(ipc_report))
    if ipc_report.latency or _skipped_in(ipc_report, "pingpong"):
        console.print(_latency_table(ipc_report))
    if ratios or unmeasured:
        console.print(_ratios_table(ratios, unmeasured))
    console.print(f"finished in {duration_s:.1f} s")
    if args.json_path is not None:
        report = {
            "command": ["mqs", *args.argv],
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "duration_s": duration_s,
            "settings": _settings(args, count, case_names, ipc_report),
            "machine": machine,
            "results": [result.to_dict() for result in results]
            + [result.to_dict() for result in ipc_report.throughput],
            "latency": [result.to_dict() for result in ipc_report.latency],
            "skipped": [skip.to_dict() for skip in ipc_report.skipped],
            "ratios": [ratio.to_dict() for ratio in ratios],
            "ratios_not_measured": [
                {"name": tracked.name, "reason": reason}
                for tracked, reason in unmeasured],
        }
        _write_json(args.json_path, report)
        console.print(f"wrote {args.json_path}")
    return EXIT_OK


def _settings(args: argparse.Namespace, count: int, case_names: list[str],
              ipc_report: bench_ipc.IpcReport) -> dict:
    return {
        "count": count, "repeat": args.repeat, "warmup_runs": 1,
        "cases": case_names, "batch_size": bench.BATCH_SIZE,
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


def _check_json_path(path: str, parser: argparse.ArgumentParser) -> None:
    """Exit with status 2 before running if `path` cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"argument --json: {path!r} is a directory; give a "
                     f"file path such as {os.path.join(path, 'bench.json')!r}")
    if not os.path.isdir(directory):
        parser.error(f"argument --json: directory {directory!r} not found; "
                     f"create it or choose another path")
    if not os.access(directory, os.W_OK):
        parser.error(f"argument --json: directory {directory!r} is not "
                     f"writable; choose another path")


def _write_json(path: str, report: dict) -> None:
    """Write `report` to `path` through a temporary file and a rename."""
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as output:
        json.dump(report, output, indent=2)
        output.write("\n")
    os.replace(temporary, path)


def _run_with_progress(
        console: Console, thread_cases: list[str], ipc_cases: list[str],
        count: int, args: argparse.Namespace,
) -> tuple[list[bench.Result], bench_ipc.IpcReport]:
    # No auto refresh: its thread would be running while the cross-process
    # cases fork, and a fork copies the locks that thread may hold.
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=True,
        auto_refresh=False)
    with progress:
        task = progress.add_task(
            "runs", total=bench.count_runs(thread_cases, args.repeat)
            + bench_ipc.count_runs(ipc_cases, args.repeat))

        def advance(case: str, queue_label: str) -> None:
            progress.update(task, advance=1,
                            description=f"{case} {queue_label}")
            progress.refresh()

        results = []
        if thread_cases:
            results = bench.run_cases(thread_cases, count, args.repeat,
                                      on_run=advance)
        ipc_report = bench_ipc.run_cases(
            ipc_cases, args.repeat, count=args.count, quick=args.quick,
            on_run=advance)
        return results, ipc_report


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
        unmeasured: list[tuple[bench.TrackedRatio, str]]) -> Table:
    table = Table(title="Tracked ratios (throughput: of medians; "
                        "latency: of p50)")
    table.add_column("ratio")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_column("status")
    for ratio in ratios:
        status = "[green]met[/green]" if ratio.met else "[red]missed[/red]"
        table.add_row(ratio.tracked.name, _format_ratio(ratio.value),
                      f"{ratio.tracked.comparison} {ratio.tracked.target:g}x",
                      status)
    for tracked, reason in unmeasured:
        table.add_row(tracked.name, "-",
                      f"{tracked.comparison} {tracked.target:g}x",
                      "not measured")
    notes = dict.fromkeys(reason for _, reason in unmeasured)
    if notes:
        table.caption = "not measured: " + "\n".join(
            escape(note) for note in notes)
    return table
