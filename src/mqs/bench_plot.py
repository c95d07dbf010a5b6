"""Render the charts of a `mqs bench` report with matplotlib.

`render(report, path)` takes the dict that ``mqs bench --json`` writes
and saves one image (PNG, SVG, PDF or another format that matplotlib
writes, named by the suffix of the path) with up to four panels:
throughput by payload size (the payload sweep), fixed-rate latency
percentiles, and the Disruptor shapes over threads and over
processes. A panel whose section did not run is left out. matplotlib is
an optional dependency (the ``bench`` extra); `missing_reason` says
whether it can be imported.
"""

from __future__ import annotations

import importlib.util
import math
import os

from mqs import bench_latency, bench_shapes


def missing_reason() -> str | None:
    """Return why charts cannot be drawn here, or None if they can."""
    if importlib.util.find_spec("matplotlib") is None:
        return ("matplotlib is not installed; pip install 'mqs[bench]' "
                "(or pip install matplotlib) to draw charts")
    return None


def path_error(path: str) -> str | None:
    """Return why matplotlib cannot write charts to `path`, judged by
    its suffix, or None if it can. Needs matplotlib."""
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = os.path.splitext(path)[1]
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if suffix[1:].lower() in formats:
        return None
    found = f"suffix {suffix!r}" if suffix else "no suffix"
    return (f"{path!r} has {found}, but the suffix names the image format; "
            f"give one that matplotlib writes, such as .png, .svg or "
            f".pdf (all: {', '.join(formats)})")


def render(report: dict, path: str) -> None:
    """Save the charts of `report` to `path`, in the image format that
    the suffix of `path` names (see `path_error`).

    Raises
    ------
    ModuleNotFoundError
        If matplotlib is not installed.
    ValueError
        If matplotlib cannot write the format of the suffix.
    """
    error = path_error(path)
    if error is not None:
        raise ValueError(error)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(draw, data) for draw, data in (
        (_draw_payload, report.get("payload_sweep") or []),
        (_draw_latency, (report.get("fixed_rate_latency") or {}).get(
            "results") or []),
        (_draw_shapes, [r for r in report.get("shapes") or []
                        if r["domain"] == "threads"]),
        (_draw_shapes, [r for r in report.get("shapes") or []
                        if r["domain"] == "processes"]),
    ) if data]
    columns = 2 if len(panels) > 1 else 1
    rows = max(1, math.ceil(len(panels) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(7 * columns,
                                                        4.8 * rows),
                                squeeze=False)
    for index, axis in enumerate(axes.flat):
        if index < len(panels):
            draw, data = panels[index]
            draw(axis, data)
        else:
            axis.set_axis_off()
    if not panels:
        axes[0][0].text(0.5, 0.5, "no payload sweep, latency or shape "
                        "results in this run", ha="center", va="center")
    machine = report.get("machine", {})
    figure.suptitle(
        f"mqs bench ({report.get('profile', '?')}): "
        f"{machine.get('cpu_model', '?')}, {machine.get('cpus_usable')} "
        f"CPUs, Python {machine.get('python_version', '?')}, "
        f"{report.get('date_utc', '')}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, format=os.path.splitext(path)[1][1:].lower(),
                   dpi=100)
    plt.close(figure)


def _draw_payload(axis, results: list[dict]) -> None:
    for queue in dict.fromkeys(r["queue"] for r in results):
        points = sorted((r["message_size_bytes"], r["median_mb_per_s"])
                        for r in results if r["queue"] == queue)
        axis.plot([size for size, _ in points],
                  [megabytes for _, megabytes in points],
                  marker="o", label=queue)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    sizes = sorted({r["message_size_bytes"] for r in results})
    axis.set_xticks(sizes, [bench_shapes.format_size(s) for s in sizes])
    axis.set_xlabel("payload")
    axis.set_ylabel("MB/s (10**6 bytes)")
    axis.set_title("Throughput by payload size, 1 producer -> 1 consumer "
                   "process", fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)


def _draw_latency(axis, results: list[dict]) -> None:
    names = [name for name, _ in bench_latency.PERCENTILES] + ["max"]
    for result in results:
        corrected = result["corrected"]
        values = [corrected[f"{name}_ns"] / 1e3 for name in names]
        style = "--" if result["domain"] == "threads" else "-"
        axis.plot(names, values, style, marker="o",
                  label=f"{result['queue']} ({result['domain']})")
    axis.set_yscale("log")
    axis.set_ylabel("microseconds")
    rates = sorted({result["rate_per_s"] for result in results})
    axis.set_title(
        f"One-way latency at {', '.join(f'{r:,.0f}' for r in rates)} msg/s, "
        f"from intended send times\n(coordinated omission corrected; "
        f"dashed: threads)", fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)


def _draw_shapes(axis, results: list[dict]) -> None:
    shapes = [shape for shape in bench_shapes.SHAPES
              if any(r["shape"] == shape for r in results)]
    queues = list(dict.fromkeys(r["queue"] for r in results))
    width = 0.8 / max(1, len(queues))
    for offset, queue in enumerate(queues):
        rates = {r["shape"]: r["median_per_s"] for r in results
                 if r["queue"] == queue}
        positions = [index + offset * width for index in range(len(shapes))]
        axis.bar(positions, [rates.get(shape, 0) / 1e3 for shape in shapes],
                 width, label=queue)
    axis.set_xticks([index + 0.4 - width / 2 for index in range(len(shapes))],
                    shapes, fontsize=8)
    axis.set_yscale("log")
    axis.set_ylabel("thousand messages published per second")
    axis.set_title(f"Disruptor shapes over {results[0]['domain']}, "
                   f"{bench_shapes.format_size(results[0]['message_size_bytes'])}"
                   f" messages", fontsize=10)
    axis.grid(True, axis="y", which="both", alpha=0.3)
    axis.legend(fontsize=8)
