"""Rich tables of `mqs bench` for the shapes, payload sweep, fixed-rate
latency, timers and log sections (`mqs.cli_bench` prints the others)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from rich.markup import escape
from rich.table import Table

from mqs import bench_latency, bench_shapes, bench_wheel
from mqs.bench_ipc import Skipped


def _skip_caption(skipped: Sequence[Skipped], cases: set[str]) -> str:
    notes = {skip.queue: skip.reason for skip in skipped
             if skip.case in cases}
    return "".join(f"\n{queue} skipped: {escape(reason)}"
                   for queue, reason in notes.items())


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# Column headings short enough for a 100-column table of five queues.
_SHORT_LABELS = {
    "multiprocessing.Queue": "mp.Queue",
    "faster_fifo.Queue": "faster_fifo",
    "pyzmq PUSH/PULL ipc": "pyzmq",
}


def _short(label: str) -> str:
    return _SHORT_LABELS.get(label, label)


def shapes_table(domain: str, results: list[bench_shapes.ShapeResult],
                 skipped: Sequence[Skipped]) -> Table:
    """Return one row per shape and one column per transport."""
    reference = bench_shapes.REFERENCES[domain]
    size = bench_shapes.format_size(results[0].message_size_bytes)
    transports = list(dict.fromkeys(result.queue for result in results))
    table = Table(
        title=f"Disruptor shapes over {domain}, {size} messages: thousand "
              f"messages published per second (x {reference})",
        caption=_shapes_caption(domain, results)
        + _skip_caption(skipped, {result.case for result in results}))
    table.add_column("shape", no_wrap=True)
    for transport in transports:
        table.add_column(_short(transport), justify="right")
    for shape in bench_shapes.SHAPES:
        row = {r.queue: r for r in results if r.shape == shape}
        if not row:
            continue
        cells = [f"{row[t].median / 1e3:,.0f}\n"
                 f"{_ratio(row[t].ratio_to_reference)}"
                 if t in row else "-" for t in transports]
        table.add_row(shape, *cells)
    return table


def _shapes_caption(domain: str,
                    results: list[bench_shapes.ShapeResult]) -> str:
    counts = sorted({result.count for result in results})
    runs = len(results[0].elapsed_ns)
    multicast = "; ".join(
        f"{transport.label}: {transport.broadcast}"
        for transport in bench_shapes.TRANSPORTS[domain]
        if transport.broadcast != "one queue per reader")
    shapes = "; ".join(f"{shape}: {description}" for shape, description
                       in bench_shapes.SHAPE_DESCRIPTIONS.items())
    return (f"{shapes}. Median of {runs} timed runs of "
            f"{', '.join(f'{c:,}' for c in counts)} messages. Multicast "
            f"edges: one queue per reader, except {multicast}.")


def payload_table(results: list[bench_shapes.ShapeResult],
                  skipped: Sequence[Skipped]) -> Table:
    """Return one row per payload size and one column per transport."""
    transports = list(dict.fromkeys(result.queue for result in results))
    table = Table(
        title="Payload sweep, one-to-one over processes: MB/s (x "
              f"{bench_shapes.PROCESS_REFERENCE})",
        caption="MB/s: median payload bytes / 10**6 per second."
        + _skip_caption(skipped, {result.case for result in results}))
    table.add_column("payload")
    table.add_column("messages", justify="right")
    for transport in transports:
        table.add_column(_short(transport), justify="right")
    for size in sorted({result.message_size_bytes for result in results}):
        row = {r.queue: r for r in results if r.message_size_bytes == size}
        cells = []
        for transport in transports:
            result = row.get(transport)
            if result is None:
                cells.append("-")
                continue
            megabytes = result.median * size / 1e6
            cells.append(f"{megabytes:,.1f}\n"
                         f"{_ratio(result.ratio_to_reference)}")
        count = next(iter(row.values())).count
        table.add_row(bench_shapes.format_size(size), f"{count:,}", *cells)
    return table


def _us(nanoseconds: float) -> str:
    microseconds = nanoseconds / 1e3
    if microseconds >= 1000:
        return f"{microseconds:,.0f}"
    return f"{microseconds:,.1f}"


def fixed_rate_latency_table(
        results: list[bench_latency.LatencyRunResult],
        skipped: Sequence[Skipped]) -> Table:
    """Return one row per queue with corrected and uncorrected latencies."""
    rates = {result.rate_per_s for result in results}
    counts = {result.count for result in results}
    table = Table(
        title=f"One-way latency at a fixed rate of "
              f"{', '.join(f'{r:,.0f}' for r in sorted(rates))} msg/s, "
              f"64 B, microseconds",
        caption=(
            "Measured from each message's intended send time, so a stall "
            "counts for every message due during it (coordinated omission "
            "corrected). 'naive p99': from the actual send time, as a "
            "send-then-wait benchmark would measure. late: sends more "
            "than one interval behind schedule. "
            f"{', '.join(f'{c:,}' for c in sorted(counts))} messages per "
            f"queue."
            + _skip_caption(skipped, {"latency-threads",
                                      "latency-processes"})))
    table.add_column("queue", no_wrap=True)
    for name, _ in bench_latency.PERCENTILES:
        table.add_column(name, justify="right")
    table.add_column("max", justify="right")
    table.add_column("naive p99", justify="right")
    table.add_column("late", justify="right")
    table.add_column("p99 x ref", justify="right")
    previous = None
    for result in results:
        if result.domain != previous:
            if previous is not None:
                table.add_section()
            table.add_row(f"[bold]between {result.domain}[/bold]")
        corrected = result.corrected
        table.add_row(
            result.queue,
            *(_us(corrected[f"{name}_ns"])
              for name, _ in bench_latency.PERCENTILES),
            _us(corrected["max_ns"]),
            _us(result.uncorrected["p99_ns"]),
            f"{result.late_sends:,}",
            _ratio(result.p99_ratio_to_reference))
        previous = result.domain
    return table


def timers_table(timers: dict) -> Table:
    """Return one row per scheduler: rates of each phase and x heapq."""
    phases = bench_wheel.PHASES
    table = Table(
        title=f"Timers: {timers['count']:,} random delays in [0, "
              f"{bench_wheel.DELAY_RANGE_S:g}) s, million operations per "
              f"second of CPU time (x heapq)",
        caption="schedule_many is compared with heapq's insert. The "
                "tracked ratios are meant for 1,000,000 timers; with fewer, "
                "heapq's pops are cheaper and the ratios lower."
        + _partial_caption(timers))
    table.add_column("scheduler", no_wrap=True)
    for phase in phases:
        table.add_column(phase, justify="right")
    heapq_rates = timers["schedulers"][bench_wheel.HEAPQ]
    for name in bench_wheel.SCHEDULERS:
        cells = []
        for phase in phases:
            stats = timers["schedulers"][name].get(phase)
            base = heapq_rates.get("insert" if phase == "schedule_many"
                                   else phase)
            if stats is None or base is None:
                cells.append("-")
                continue
            cells.append(f"{stats['ops_per_s'] / 1e6:,.2f}\n"
                         f"{stats['ops_per_s'] / base['ops_per_s']:.2f}x")
        table.add_row(name, *cells)
    return table


def _partial_caption(timers: dict) -> str:
    count = timers["count"]
    full = {"insert": count, "cancel": (count + 1) // 2,
            "expire": count // 2, "schedule_many": count}
    notes = []
    for name, phases in timers["schedulers"].items():
        partial = [f"{phase} {stats['operations']:,}"
                   for phase, stats in phases.items()
                   if stats["operations"] != full[phase]]
        if partial:
            notes.append(f"\n{name} ran fewer operations: "
                         f"{', '.join(partial)}")
    return "".join(notes)


def log_table(log: dict) -> Table:
    """Return one row per durable log case, skipped ones with the reason."""
    table = Table(
        title=f"Durable log: records (blocks for raw.) per second, "
              f"{log['filesystem']} at {log['directory']}",
        caption=f"Scale {log['scale']:g} of the counts of "
                f"mqs.bench_seglog, median of {log['repeat']} timed "
                f"rounds after 1 warm-up round.")
    table.add_column("case", no_wrap=True)
    table.add_column("median/s", justify="right")
    table.add_column("min-max/s", justify="right")
    table.add_column("MB/s", justify="right")
    table.add_column("syncs", justify="right")
    for case in log["cases"]:
        if "skipped" in case:
            table.add_row(case["case"], "skipped", escape(case["skipped"]))
            continue
        megabytes = case.get("bytes_per_s")
        table.add_row(
            case["case"], f"{case['rate_per_s']:,.0f}",
            f"{case['rate_min_per_s']:,.0f}-{case['rate_max_per_s']:,.0f}",
            "" if megabytes is None else f"{megabytes / 1e6:,.0f}",
            str(case.get("syncs", "")))
    return table


def broker_table(broker: dict) -> Table:
    """Return one row per broker case, skipped ones with the reason."""
    table = Table(
        title="Broker: messages published, consumed and acked per second",
        caption=f"Scale {broker['scale']:g} of the counts of "
                f"mqs.bench_broker, median of {broker['repeat']} timed "
                f"rounds after 1 warm-up round; 100 B bodies, one topic "
                f"and group shared by all processes.")
    table.add_column("case", no_wrap=True)
    table.add_column("messages", justify="right")
    table.add_column("median/s", justify="right")
    table.add_column("min-max/s", justify="right")
    for case in broker["cases"]:
        if "skipped" in case:
            table.add_row(case["case"], "skipped", escape(case["skipped"]))
            continue
        table.add_row(
            case["case"], f"{case['messages']:,}",
            f"{case['rate_per_s']:,.0f}",
            f"{case['rate_min_per_s']:,.0f}-{case['rate_max_per_s']:,.0f}")
    return table


def backends_table(backends: dict) -> Table:
    """Return one row per subject and shape of the broker-backends
    section, skipped ones with the reason."""
    table = Table(
        title="Broker per backend: messages published, got and acked "
              "per second",
        caption=f"{backends['count']:,} messages per round, median of "
                f"{backends['repeat']} timed rounds after 1 warm-up round; "
                f"one call per message; latency of one publish, get and "
                f"ack with one message in flight (1 thread).")
    table.add_column("subject", no_wrap=True)
    table.add_column("shape", no_wrap=True)
    table.add_column("median/s", justify="right")
    table.add_column("min-max/s", justify="right")
    table.add_column("p50 µs", justify="right")
    table.add_column("p99 µs", justify="right")
    for case in backends["cases"]:
        if "skipped" in case:
            table.add_row(case["subject"], case["shape"], "skipped",
                          escape(case["skipped"]), "", "")
            continue
        latency = ("", "")
        if "latency_p50_us" in case:
            latency = (f"{case['latency_p50_us']:,.1f}",
                       f"{case['latency_p99_us']:,.1f}")
        table.add_row(
            case["subject"], case["shape"], f"{case['rate_per_s']:,.0f}",
            f"{case['rate_min_per_s']:,.0f}-{case['rate_max_per_s']:,.0f}",
            *latency)
    return table


@dataclasses.dataclass(frozen=True)
class SectionRatio:
    """A tracked ratio of the timers or log section, for the ratios table."""

    name: str
    value: float | None
    target: float
    met: bool | None
    per_second: bool = False

    def cells(self) -> tuple[str, str, str, str]:
        unit = "/s" if self.per_second else "x"
        if self.value is None:
            value = "-"
        elif self.per_second:
            value = f"{self.value:,.0f}/s"
        else:
            value = f"{self.value:.2f}x"
        status = {True: "[green]met[/green]", False: "[red]missed[/red]",
                  None: "not measured"}[self.met]
        target = (f"{self.target:,.0f}" if self.target >= 1000
                  else f"{self.target:g}")
        return self.name, value, f">= {target}{unit}", status


def lateness_text(lateness: dict) -> str:
    """Return the delivery lateness result of the timers section as text."""
    def ms(stage: str, key: str) -> str:
        return f"{lateness[stage][key] * 1e3:.3f} ms"

    verdict = "met" if lateness["met"] else "missed"
    return (
        f"Delayed delivery through a SharedQueue: {lateness['messages']:,} "
        f"messages, consumer process busy "
        f"{lateness['busy_fraction']:.0%}\n"
        f"  due -> ready in ring  p50 {ms('due_to_ready', 'p50')}, "
        f"p99 {ms('due_to_ready', 'p99')}, max {ms('due_to_ready', 'max')}\n"
        f"  due -> returned by get  p50 {ms('due_to_get', 'p50')}, "
        f"p99 {ms('due_to_get', 'p99')}\n"
        f"  early: {lateness['early']}; target p99 due -> ready <= "
        f"{lateness['target_p99_s'] * 1e3:g} ms: {verdict}")


def redis_broker_table(report: dict) -> Table:
    """Return one row per loop of the redis-broker section."""
    if "skipped" in report:
        table = Table(title="Redis broker: skipped")
        table.add_column("reason")
        table.add_row(escape(report["skipped"]))
        return table
    table = Table(
        title="Redis broker: messages per second, the mqs redis backend "
              "against redis-py loops",
        caption=f"{report['count']:,} messages of {report['body_bytes']} B "
                f"per loop, median of {report.get('rounds', 1)} interleaved "
                f"rounds, on a throwaway redis-server (append-only file "
                f"{report['appendfsync'] or 'off'}), hiredis "
                f"{'on' if report['hiredis'] else 'off'}. broker_* rows "
                f"go through mqs.Broker; _batched rows send "
                f"{report['batch']} messages per call (pipelined for "
                f"redis-py, one script call for mqs).")
    table.add_column("loop", no_wrap=True)
    table.add_column("batch", justify="right")
    table.add_column("messages/s", justify="right")
    for row in report["results"]:
        table.add_row(row["loop"], str(row["batch"]),
                      f"{row['rate_per_s']:,.0f}")
    return table


def section_ratios(timers: dict | None, log: dict | None,
                   broker: dict | None = None,
                   redis: dict | None = None,
                   backends: dict | None = None) -> list[SectionRatio]:
    """Return the tracked ratios of the timers, log, broker,
    redis-broker and broker-backends sections."""
    rows = []
    if timers is not None:
        rows += [SectionRatio(f"timers {name}", ratio["measured"],
                              ratio["target"], ratio["met"])
                 for name, ratio in timers["ratios"].items()]
    if log is not None:
        rows += [SectionRatio(f"log {ratio['name']}", ratio["value"],
                              ratio["target"], ratio["met"],
                              per_second=ratio["denominator"] is None)
                 for ratio in log["ratios"]]
    if broker is not None:
        # The batched ratios have no target (see mqs.bench_broker).
        rows += [SectionRatio(f"broker {ratio['name']}", ratio["value"],
                              ratio["target"], ratio["met"])
                 for ratio in broker["ratios"]
                 if ratio["target"] is not None]
    if redis is not None and "ratios" in redis:
        rows += [SectionRatio(f"redis {ratio['name']}", ratio["value"],
                              ratio["target"], ratio["met"])
                 for ratio in redis["ratios"]]
    if backends is not None:
        rows += [SectionRatio(f"backends {ratio['name']}", ratio["value"],
                              ratio["target"], ratio["met"])
                 for ratio in backends["ratios"] if ratio["tracked"]]
    return rows
