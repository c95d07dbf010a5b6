"""Render the JSON report of `mqs bench --json` as Markdown tables.

BENCHMARKS.md's "Latest run" section is the output of this script for one
run, so the tables there can be regenerated and checked against the
JSON:

    mqs bench --full --json run.json --plot benchmarks/latest.png
    python benchmarks/render_markdown.py run.json --commit abc1234 \
        --plot benchmarks/latest.png > latest.md

The script only formats; every number comes from the JSON file.
"""

from __future__ import annotations

import argparse
import json
import sys


def _table(header: list[str], rows: list[list[str]],
           right: int = 1) -> list[str]:
    """Return a Markdown table; columns from `right` on are right-aligned."""
    align = ["---" if index < right else "---:"
             for index in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 0.1:
        return f"{value:.2f}x"
    return f"{value:.3f}x"


def _us(nanoseconds: float) -> str:
    microseconds = nanoseconds / 1e3
    return f"{microseconds:,.0f}" if microseconds >= 1000 else \
        f"{microseconds:,.1f}"


def _size(size_bytes: int) -> str:
    if size_bytes >= 1024 and size_bytes % 1024 == 0:
        return f"{size_bytes // 1024} KiB"
    return f"{size_bytes} B"


def header(report: dict, commit: str | None, note: str | None) -> list[str]:
    machine = report["machine"]
    flags = "; ".join(machine["build"].get("compiler_flags") or
                      ["not recorded"])
    peers = ", ".join(f"{name} {version}" for name, version
                      in machine["peers"].items() if version)
    missing = ", ".join(name for name, version in machine["peers"].items()
                        if not version)
    load = machine.get("load_average") or []
    sections = ", ".join(f"{name} {seconds:.0f} s" for name, seconds
                         in report.get("section_durations_s", {}).items())
    lines = [
        f"`{' '.join(report['command'])}`, {report['date_utc']}"
        + (f", commit {commit}" if commit else "")
        + f", {report['duration_s']:.0f} s in all ({sections}).",
        "",
        (f"Machine: {machine['cpu_model']}, {machine['cpu_count']} cores, "
        f"{machine['memory_bytes'] / 2**30:.1f} GiB RAM, {machine['kernel']} "
        f"{machine['machine']}; {machine['python_implementation']} "
        f"{machine['python_version']}"
        f"{' with the GIL' if machine['gil_enabled'] else ' without GIL'}, "
        f"switch interval {machine['switch_interval_s'] * 1000:g} ms. "
        f"Load average {' '.join(f'{x:.2f}' for x in load)} at the start."),
        "",
        f"Build flags: {flags}.",
        "",
        f"Peers: {peers}" + (f"; not installed: {missing}" if missing else "")
        + ".",
        "",
    ]
    if note:
        lines += [note, ""]
    return lines


def queue_tables(report: dict) -> list[str]:
    lines = []
    in_process = [r for r in report["results"] if not r["case"].startswith(
        "ipc-")]
    if in_process:
        count = in_process[0]["count"]
        lines += [(f"### In-process throughput (million items/s, {count:,} "
                  f"items per run, {len(in_process[0]['rates_per_s'])} "
                  f"timed runs)"), ""]
        lines += _table(
            ["case", "queue", "median", "min-max", "x queue.Queue"],
            [[r["case"], r["queue"], f"{r['median_per_s'] / 1e6:,.2f}",
              f"{r['min_per_s'] / 1e6:,.2f}-{r['max_per_s'] / 1e6:,.2f}",
              _ratio(r["ratio_to_reference"])] for r in in_process], 2)
    ipc = [r for r in report["results"] if r["case"].startswith("ipc-")]
    if ipc:
        lines += [("### Cross-process throughput, 1 producer process to 1 "
                  "consumer process (thousand messages/s)"), ""]
        lines += _table(
            ["case", "queue", "median", "min-max", "MB/s", "x mp.Queue"],
            [[f"{r['case']} ({r['count']:,} per run)", r["queue"],
              f"{r['median_per_s'] / 1e3:,.0f}",
              f"{r['min_per_s'] / 1e3:,.0f}-{r['max_per_s'] / 1e3:,.0f}",
              f"{r['median_mb_per_s']:,.1f}",
              _ratio(r["ratio_to_reference"])] for r in ipc], 2)
    if report["latency"]:
        trips = report["latency"][0]["round_trips_total"]
        lines += [(f"### Round-trip latency, 64 B ping-pong between two "
                  f"processes (µs, {trips:,} round trips)"), ""]
        lines += _table(
            ["queue", "p50", "p90", "p99", "mean", "p50 x mp.Queue"],
            [[r["queue"], _us(r["p50_ns"]), _us(r["p90_ns"]),
              _us(r["p99_ns"]), _us(r["mean_ns"]),
              _ratio(r["p50_ratio_to_reference"])]
             for r in report["latency"]])
    return lines


def shape_tables(report: dict) -> list[str]:
    lines = []
    for domain, reference in (("threads", "queue.Queue"),
                              ("processes", "multiprocessing.Queue")):
        results = [r for r in report["shapes"] if r["domain"] == domain]
        if not results:
            continue
        queues = list(dict.fromkeys(r["queue"] for r in results))
        counts = sorted({r["count"] for r in results})
        lines += [(f"### Disruptor shapes over {domain}, 64 B messages "
                  f"(thousand messages published/s, x {reference})"), "",
                  (f"{', '.join(f'{c:,}' for c in counts)} messages per run, "
                  f"median of {len(results[0]['rates_per_s'])} timed runs."),
                  ""]
        rows = []
        for shape in dict.fromkeys(r["shape"] for r in results):
            cells = {r["queue"]: r for r in results if r["shape"] == shape}
            rows.append([shape] + [
                f"{cells[q]['median_per_s'] / 1e3:,.0f} "
                f"({_ratio(cells[q]['ratio_to_reference'])})"
                if q in cells else "-" for q in queues])
        lines += _table(["shape", *queues], rows)
    return lines


def payload_table(report: dict) -> list[str]:
    results = report["payload_sweep"]
    if not results:
        return []
    queues = list(dict.fromkeys(r["queue"] for r in results))
    rows = []
    for size in sorted({r["message_size_bytes"] for r in results}):
        cells = {r["queue"]: r for r in results
                 if r["message_size_bytes"] == size}
        count = next(iter(cells.values()))["count"]
        rows.append([_size(size), f"{count:,}"] + [
            f"{cells[q]['median_mb_per_s']:,.1f} "
            f"({_ratio(cells[q]['ratio_to_reference'])})"
            if q in cells else "-" for q in queues])
    return ([("### Payload sweep, one-to-one over processes (MB/s, x "
             "multiprocessing.Queue)"), ""]
            + _table(["payload", "messages", *queues], rows))


def latency_table(report: dict) -> list[str]:
    section = report["fixed_rate_latency"]
    results = section["results"]
    if not results:
        return []
    lines = [(f"### One-way latency at a fixed rate of "
             f"{section['rate_per_s']:,} messages/s, 64 B (µs)"), "",
             (f"Method: {section['method']}. "
             f"{results[0]['messages']:,} messages per queue after a "
             f"warm-up run. naive p99 is what a benchmark that timed each "
             f"message from its actual send would report."), ""]
    rows = [[r["domain"], r["queue"]]
            + [_us(r["corrected"][f"{name}_ns"])
               for name in ("p50", "p90", "p99", "p99.9", "max")]
            + [_us(r["uncorrected"]["p99_ns"]), f"{r['late_sends']:,}",
               _ratio(r["p99_ratio_to_reference"])] for r in results]
    return lines + _table(
        ["between", "queue", "p50", "p90", "p99", "p99.9", "max",
         "naive p99", "late sends", "p99 x ref"], rows, 2)


def timers_table(report: dict) -> list[str]:
    timers = report.get("timers")
    if not timers:
        return []
    phases = ("insert", "cancel", "expire", "schedule_many")
    heapq = timers["schedulers"]["heapq"]
    rows = []
    for name, stats in timers["schedulers"].items():
        cells = []
        for phase in phases:
            if phase not in stats:
                cells.append("-")
                continue
            base = heapq["insert" if phase == "schedule_many" else phase]
            cells.append(f"{stats[phase]['ops_per_s']:,.0f} "
                         f"({stats[phase]['ops_per_s'] / base['ops_per_s']:.2f}x)")
        rows.append([name, *cells])
    return ([(f"### Timers ({timers['count']:,} timers, delays in [0, 60) s, "
             f"ops/s of CPU time, x heapq)"), ""]
            + _table(["scheduler", *phases], rows))


def log_table(report: dict) -> list[str]:
    log = report.get("log")
    if not log:
        return []
    rows = []
    for case in log["cases"]:
        if "skipped" in case:
            rows.append([case["case"], "skipped: " + case["skipped"], "", ""])
            continue
        megabytes = case.get("bytes_per_s")
        rows.append([case["case"], f"{case['rate_per_s']:,.0f}",
                     "" if megabytes is None else f"{megabytes / 1e6:,.0f}",
                     str(case.get("syncs", ""))])
    return ([(f"### Durable log (records or 1 MiB blocks per second, scale "
             f"{log['scale']:g}, {log['filesystem']} at {log['directory']})"),
             ""] + _table(["case", "median/s", "MB/s", "syncs"], rows))


def broker_table(report: dict) -> list[str]:
    broker = report.get("broker")
    if not broker:
        return []
    rows = []
    for case in broker["cases"]:
        if "skipped" in case:
            rows.append([case["case"], "skipped: " + case["skipped"], ""])
            continue
        rows.append([case["case"], f"{case['messages']:,}",
                     f"{case['rate_per_s']:,.0f}"])
    return ([(f"### Broker (messages published, consumed and acked per "
              f"second, scale {broker['scale']:g})"), ""]
            + _table(["case", "messages", "median/s"], rows))


def redis_broker_table(report: dict) -> list[str]:
    redis = report.get("redis_broker")
    if not redis:
        return []
    title = "### Redis backend against redis-py loops (messages per second"
    if "skipped" in redis:
        return [title + ")", "", "Skipped: " + redis["skipped"], ""]
    rows = [[row["loop"], f"{row['batch']:,}", f"{row['rate_per_s']:,.0f}",
             " / ".join(f"{rate:,.0f}" for rate in row["rates_per_s"])]
            for row in redis["results"]]
    return ([(f"{title}, {redis['count']:,} messages of "
              f"{redis['body_bytes']} B per loop, median of "
              f"{redis['rounds']} rounds)"), ""]
            + _table(["loop", "batch", "median/s", "rounds/s"], rows))


def backends_table(report: dict) -> list[str]:
    backends = report.get("broker_backends")
    if not backends:
        return []
    rows = []
    for case in backends["cases"]:
        if "skipped" in case:
            rows.append([case["subject"], case["shape"],
                         "skipped: " + case["skipped"], "", ""])
            continue
        latency = ["", ""]
        if "latency_p50_us" in case:
            latency = [f"{case['latency_p50_us']:,.1f}",
                       f"{case['latency_p99_us']:,.1f}"]
        rows.append([case["subject"], case["shape"],
                     f"{case['rate_per_s']:,.0f}", *latency])
    return ([(f"### Broker per backend (messages published, got and acked "
              f"per second, {backends['count']:,} per round, median of "
              f"{backends['repeat']}; latency of one message in flight, "
              f"µs)"), ""]
            + _table(["subject", "shape", "median/s", "p50 µs", "p99 µs"],
                     rows))


def ratios_table(report: dict) -> list[str]:
    rows = [[r["name"], _ratio(r["value"]), (f"{r['comparison']} "
             f"{r['target']:g}x"), "met" if r["met"] else "missed"]
            for r in report["ratios"]]
    rows += [[r["name"], "-", "", "not measured: " + r["reason"]]
             for r in report["ratios_not_measured"]]
    for name, ratio in ((report.get("timers") or {}).get("ratios")
                        or {}).items():
        rows.append([f"timers {name}", _ratio(ratio["measured"]),
                     f">= {ratio['target']:g}x",
                     "met" if ratio["met"] else "missed"])
    for ratio in (report.get("log") or {}).get("ratios") or []:
        per_second = ratio["denominator"] is None
        value = ratio["value"]
        value_text = "-" if value is None else (
            f"{value:,.0f}/s" if per_second else _ratio(value))
        target = (f">= {ratio['target']:,.0f}/s" if per_second
                  else f">= {ratio['target']:g}x")
        status = {True: "met", False: "missed", None: "not measured"}[
            ratio["met"]]
        rows.append([f"log {ratio['name']}", value_text, target, status])
    for ratio in (report.get("broker") or {}).get("ratios") or []:
        if ratio["target"] is None:
            # The batched shapes, kept for comparison without a target.
            continue
        status = {True: "met", False: "missed", None: "not measured"}[
            ratio["met"]]
        rows.append([f"broker {ratio['name']}", _ratio(ratio["value"]),
                     f">= {ratio['target']:g}x", status])
    for ratio in (report.get("redis_broker") or {}).get("ratios") or []:
        rows.append([f"redis-broker {ratio['name']}",
                     _ratio(ratio["value"]), f">= {ratio['target']:g}x",
                     "met" if ratio["met"] else "missed"])
    for ratio in (report.get("broker_backends") or {}).get("ratios") or []:
        if not ratio["tracked"]:
            continue
        status = {True: "met", False: "missed", None: "not measured"}[
            ratio["met"]]
        rows.append([f"backends {ratio['name']}", _ratio(ratio["value"]),
                     f">= {ratio['target']:g}x", status])
    met = sum(row[3] == "met" for row in rows)
    return (["### Tracked ratios", "",
             f"{met} of {len(rows)} targets are met in this run.", ""]
            + _table(["ratio", "value", "target", "status"], rows))


def render(report: dict, commit: str | None = None, plot: str | None = None,
           note: str | None = None) -> str:
    """Return the Markdown of every section of `report`."""
    lines = header(report, commit, note)
    if plot:
        lines += [f"![Charts of this run]({plot})", ""]
    for part in (queue_tables, shape_tables, payload_table, latency_table,
                 timers_table, log_table, broker_table, redis_broker_table,
                 backends_table, ratios_table):
        lines += part(report)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="JSON file written by mqs bench")
    parser.add_argument("--commit", help="commit the run measured")
    parser.add_argument("--plot", help="path of the PNG to link")
    parser.add_argument("--note", help="a paragraph to add after the "
                                       "machine description")
    args = parser.parse_args(argv)
    with open(args.report, encoding="utf-8") as source:
        report = json.load(source)
    sys.stdout.write(render(report, args.commit, args.plot, args.note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
