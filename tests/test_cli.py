"""Tests of the `mqs` command line tool and the `mqs bench` measurements."""

import json
import queue
import subprocess
import sys
import threading

import pytest

from mqs import bench, cli

EXPECTED_QUEUES = {
    "1p1c": {"mqs.Queue", "mqs.SimpleQueue", "queue.Queue",
             "queue.SimpleQueue"},
    "1p1c-bounded": {"mqs.Queue(maxsize=1024)", "queue.Queue(maxsize=1024)"},
    "pair": {"mqs.Queue", "mqs.SimpleQueue", "queue.Queue",
             "queue.SimpleQueue"},
    "batch": {"mqs.Queue", "mqs.SimpleQueue", "queue.Queue",
              "queue.SimpleQueue"},
}


def run_mqs(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "mqs", *args], check=False, capture_output=True,
        text=True, timeout=60, cwd=cwd)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """Run `mqs bench --quick --json PATH` once and return (process, JSON)."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    process = run_mqs("bench", "--quick", "--repeat", "3", "--json",
                      str(path))
    assert process.returncode == 0, process.stderr
    return process, json.loads(path.read_text(encoding="utf-8"))


def test_bench_quick_exits_zero_and_prints_table(quick_report):
    process, _ = quick_report
    assert "Throughput" in process.stdout
    assert "Tracked ratios" in process.stdout
    assert "queue.SimpleQueue" in process.stdout


def test_bench_json_has_every_case_and_queue(quick_report):
    _, report = quick_report
    found = {}
    for result in report["results"]:
        found.setdefault(result["case"], set()).add(result["queue"])
    assert found == EXPECTED_QUEUES


def test_bench_json_rates_are_positive(quick_report):
    _, report = quick_report
    for result in report["results"]:
        label = f"{result['case']} {result['queue']}"
        assert result["count"] == bench.QUICK_COUNT, label
        assert len(result["rates_per_s"]) == 3, label
        assert all(rate > 0 for rate in result["rates_per_s"]), label
        assert result["min_per_s"] <= result["median_per_s"], label
        assert result["median_per_s"] <= result["max_per_s"], label
        assert result["ratio_to_reference"] > 0, label


def test_bench_json_has_tracked_ratios(quick_report):
    _, report = quick_report
    ratios = {ratio["name"]: ratio for ratio in report["ratios"]}
    assert set(ratios) == {tracked.name for tracked in bench.TRACKED_RATIOS}
    for name, ratio in ratios.items():
        assert ratio["value"] > 0, name
        assert ratio["target"] > 0, name
        assert ratio["met"] == (ratio["value"] >= ratio["target"]), name


def test_bench_json_describes_machine_and_settings(quick_report):
    _, report = quick_report
    machine = report["machine"]
    assert machine["cpu_count"] >= 1
    assert machine["python_version"] == ".".join(
        map(str, sys.version_info[:3]))
    assert machine["mqs_version"]
    assert report["settings"]["count"] == bench.QUICK_COUNT
    assert report["settings"]["repeat"] == 3
    assert report["command"][:2] == ["mqs", "bench"]


def test_bench_case_option_selects_cases(tmp_path):
    path = tmp_path / "pair.json"
    process = run_mqs("bench", "--case", "pair", "--count", "1000",
                      "--repeat", "1", "--json", str(path))
    assert process.returncode == 0, process.stderr
    report = json.loads(path.read_text(encoding="utf-8"))
    assert {result["case"] for result in report["results"]} == {"pair"}
    assert [ratio["name"] for ratio in report["ratios"]] == [
        "pair mqs.SimpleQueue / queue.SimpleQueue"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--count", "-5"], r"argument --count: must be at least 1, got '-5'"),
        (["--count", "0"], r"argument --count: must be at least 1, got '0'"),
        (["--count", "many"], r"argument --count: invalid integer 'many'"),
        (["--repeat", "0"], r"argument --repeat: must be at least 1, got '0'"),
        (["--case", "nope"], r"argument --case: invalid choice: 'nope'"),
        (["--json", "/nonexistent-dir/bench.json"],
         r"argument --json: directory '/nonexistent-dir' not found"),
    ],
)
def test_bench_bad_option_exits_two(args, expected):
    process = run_mqs("bench", *args)
    assert process.returncode == 2
    assert expected in process.stderr
    assert process.stdout == ""


def test_unknown_case_error_lists_choices():
    process = run_mqs("bench", "--case", "nope")
    assert "1p1c-bounded" in process.stderr


def test_mqs_without_command_exits_two():
    process = run_mqs()
    assert process.returncode == 2
    assert "COMMAND" in process.stderr


def test_cli_module_runs_as_script():
    process = subprocess.run(
        [sys.executable, "-m", "mqs.cli", "--version"], check=False,
        capture_output=True, text=True, timeout=60)
    assert process.returncode == 0
    assert process.stdout.startswith("mqs ")


# Faulty queues for the correctness checks.


class LossyQueue(queue.SimpleQueue):
    """Drop item 3 on put."""

    def put(self, item, block=True, timeout=None):
        if item != 3:
            super().put(item)


class SwappingQueue(queue.SimpleQueue):
    """Swap the values 5 and 6 on put: same count and sum, wrong order."""

    def put(self, item, block=True, timeout=None):
        super().put({5: 6, 6: 5}.get(item, item))


def test_run_once_rejects_reordered_items():
    case = bench.CASES["pair"]
    subject = bench.Subject("swapping", SwappingQueue)
    with pytest.raises(bench.BenchmarkError,
                       match=r"swapping in case 'pair' reordered items: "
                             r"item 5 is 6, expected 5"):
        bench.run_once(case, subject, list(range(10)))


def test_run_once_rejects_lost_item_in_pair_case():
    case = bench.CASES["pair"]
    # The pair transfer gets once per put, so the dropped item would make
    # the last get wait forever. One extra item queued up front keeps the
    # count at 10 and changes the sum instead.
    items = list(range(10))
    queue_with_spare = LossyQueue()

    def make_queue():
        queue_with_spare.put(100)
        return queue_with_spare

    subject = bench.Subject("lossy", make_queue)
    with pytest.raises(bench.BenchmarkError,
                       match=r"lossy in case 'pair' lost or added items: "
                             r"the consumer got 10 items summing to 142, "
                             r"expected 10 summing to 45"):
        bench.run_once(case, subject, items)


def test_run_once_reports_stall_when_item_lost(monkeypatch):
    monkeypatch.setattr(bench, "STALL_TIMEOUT_BASE_S", 0.5)
    queues_made = []

    def make_queue():
        queues_made.append(LossyQueue())
        return queues_made[-1]

    subject = bench.Subject("lossy", make_queue)
    try:
        with pytest.raises(bench.BenchmarkError,
                           match=r"mqs-bench-consumer still running after "
                                 r"\d+ s; items were lost"):
            bench.run_once(bench.CASES["1p1c"], subject, list(range(10)))
    finally:
        # Wake the consumer that still waits for a tenth item. LossyQueue
        # drops 3, so any other value does.
        queues_made[-1].put(-1)
        for thread in threading.enumerate():
            if thread.name == "mqs-bench-consumer":
                thread.join(5)
                assert not thread.is_alive()


def test_bench_exits_one_when_queue_reorders(monkeypatch, capsys):
    faulty = bench.Case("faulty", "a queue that swaps two items",
                        (bench.Subject("queue.Queue", SwappingQueue),),
                        "queue.Queue", bench.transfer_pairs)
    monkeypatch.setitem(bench.CASES, "faulty", faulty)
    status = cli.main(["bench", "--case", "faulty", "--count", "100",
                       "--repeat", "1"])
    assert status == 1
    captured = capsys.readouterr()
    assert "benchmark failed" in captured.err
    assert "reordered items" in captured.err
    assert "Throughput" not in captured.out
