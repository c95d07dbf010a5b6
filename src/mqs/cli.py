"""The `mqs` command line tool.

`build_parser` adds one subparser per subcommand through an
``_add_<name>_parser`` function. That function sets the ``handler``
default: a function that takes the parsed arguments, runs the subcommand
and returns the exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

import mqs
from mqs import bench

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `mqs` command with `argv` (default: sys.argv[1:])."""
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        Console(stderr=True).print("[red]interrupted[/red]")
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqs",
        description="Tools for mqs, the message queue scheduler.")
    parser.add_argument("--version", action="version",
                        version=f"mqs {mqs.__version__}")
    subparsers = parser.add_subparsers(
        title="commands", dest="command", required=True, metavar="COMMAND")
    _add_bench_parser(subparsers)
    return parser


def _positive_int(text: str) -> int:
    """Parse a count of at least 1 for argparse (accepts 1_000 and 1,000)."""
    try:
        value = int(text.replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid integer {text!r}; give a whole number such as "
            f"1000") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be at least 1, got {text!r}")
    return value


# ------------------------------------------------------------------ bench


def _add_bench_parser(subparsers) -> None:
    width = max(len(name) for name in bench.CASES) + 2
    cases = "\n".join(f"  {case.name:<{width}}{case.description}"
                      for case in bench.CASES.values())
    parser = subparsers.add_parser(
        "bench",
        help="measure mqs queues against the standard library's queue",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Measure the throughput of mqs.Queue and mqs.SimpleQueue\n"
            "against queue.Queue and queue.SimpleQueue in the same run,\n"
            "and check that every run delivered exactly the items put.\n\n"
            f"cases:\n{cases}"),
    )
    parser.add_argument(
        "--case", action="append", choices=list(bench.CASES),
        metavar="NAME",
        help=f"run only this case; repeat the option for several "
             f"(choices: {', '.join(bench.CASES)}; default: all)")
    parser.add_argument(
        "--count", type=_positive_int, default=None, metavar="N",
        help=f"items moved per run (default: {bench.DEFAULT_COUNT:,}, "
             f"or {bench.QUICK_COUNT:,} with --quick)")
    parser.add_argument(
        "--repeat", type=_positive_int, default=bench.DEFAULT_REPEAT,
        metavar="N",
        help=f"timed runs per case and queue, after one warm-up run; the "
             f"median is reported (default: {bench.DEFAULT_REPEAT})")
    parser.add_argument(
        "--quick", action="store_true",
        help=f"move {bench.QUICK_COUNT:,} items per run unless --count is "
             f"given: a smoke test in about a second, too short for "
             f"stable numbers")
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
    case_names = list(dict.fromkeys(args.case or bench.CASES))
    if args.json_path is not None:
        _check_json_path(args.json_path, parser)

    console = _make_console()
    machine = bench.machine_info()
    _print_machine(console, machine)
    console.print(f"items per run: {count:,}; timed runs: {args.repeat} "
                  f"after 1 warm-up run; cases: {', '.join(case_names)}")

    started = time.monotonic()
    try:
        results = _run_with_progress(console, case_names, count,
                                     args.repeat)
    except bench.BenchmarkError as exc:
        Console(stderr=True).print(f"[bold red]mqs bench: benchmark "
                                   f"failed:[/bold red] {exc}")
        return EXIT_FAILED
    duration_s = time.monotonic() - started
    ratios = bench.tracked_ratios(results)

    console.print(_results_table(results))
    if ratios:
        console.print(_ratios_table(ratios))
    console.print(f"finished in {duration_s:.1f} s")
    if args.json_path is not None:
        report = {
            "command": ["mqs", *args.argv],
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "duration_s": duration_s,
            "settings": {"count": count, "repeat": args.repeat,
                         "warmup_runs": 1, "cases": case_names,
                         "batch_size": bench.BATCH_SIZE,
                         "bounded_maxsize": bench.BOUNDED_MAXSIZE},
            "machine": machine,
            "results": [result.to_dict() for result in results],
            "ratios": [ratio.to_dict() for ratio in ratios],
        }
        _write_json(args.json_path, report)
        console.print(f"wrote {args.json_path}")
    return EXIT_OK


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


def _run_with_progress(console: Console, case_names: list[str], count: int,
                       repeat: int) -> list[bench.Result]:
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=True)
    with progress:
        task = progress.add_task(
            "runs", total=bench.count_runs(case_names, repeat))

        def advance(case: str, queue_label: str) -> None:
            progress.update(task, advance=1,
                            description=f"{case} {queue_label}")

        return bench.run_cases(case_names, count, repeat, on_run=advance)


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


def _format_rate(rate: float) -> str:
    return f"{rate / 1e6:,.2f}"


def _results_table(results: list[bench.Result]) -> Table:
    table = Table(
        title="Throughput, million messages per second",
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


def _ratios_table(ratios: list[bench.RatioResult]) -> Table:
    table = Table(title="Tracked ratios of medians")
    table.add_column("ratio")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_column("status")
    for ratio in ratios:
        status = "[green]met[/green]" if ratio.met else "[red]missed[/red]"
        table.add_row(ratio.tracked.name, f"{ratio.value:.2f}x",
                      f">= {ratio.tracked.target:g}x", status)
    return table


if __name__ == "__main__":
    sys.exit(main())
