"""Tests of `mqs bench` and the measurements behind it."""

import array
import json
import multiprocessing
import queue
import subprocess
import sys
import threading
import types

import pytest

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
    cli,
    cli_bench,
)

THREAD_CASES = ["1p1c", "1p1c-bounded", "pair", "batch"]
IPC_CASES = ["ipc-64b", "ipc-4kib", "ipc-batch", "ipc-pingpong"]
IPC_THROUGHPUT_QUEUES = {
    "mqs.SharedQueue", "multiprocessing.Queue", "multiprocessing.SimpleQueue",
    "faster_fifo.Queue get", "faster_fifo.Queue get_many",
    "pyzmq PUSH/PULL ipc"}
EXPECTED_IPC_QUEUES = {
    "ipc-64b": IPC_THROUGHPUT_QUEUES,
    "ipc-4kib": IPC_THROUGHPUT_QUEUES,
    "ipc-batch": {"mqs.SharedQueue put_many/get_many",
                  "multiprocessing.Queue", "multiprocessing.SimpleQueue",
                  "faster_fifo.Queue put_many/get_many",
                  "pyzmq PUSH/PULL ipc"},
    "ipc-pingpong": {"mqs.SharedQueue block", "mqs.SharedQueue spin",
                     "multiprocessing.Queue", "faster_fifo.Queue",
                     "pyzmq PUSH/PULL ipc", "raw mmap spin"},
}

EXPECTED_QUEUES = {
    "1p1c": {"mqs.Queue", "mqs.SimpleQueue", "queue.Queue",
             "queue.SimpleQueue"},
    "1p1c-bounded": {"mqs.Queue(maxsize=1024)", "queue.Queue(maxsize=1024)"},
    "pair": {"mqs.Queue", "mqs.SimpleQueue", "queue.Queue",
             "queue.SimpleQueue"},
    "batch": {"mqs.Queue", "mqs.SimpleQueue", "queue.Queue",
              "queue.SimpleQueue"},
}


def run_mqs(*args, cwd=None, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "mqs", *args], check=False, capture_output=True,
        text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """Run `mqs bench --quick --json PATH` once and return (process, JSON)."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    cases = [arg for name in THREAD_CASES for arg in ("--case", name)]
    process = run_mqs("bench", "--quick", "--repeat", "3", *cases,
                      "--json", str(path))
    assert process.returncode == 0, process.stderr
    return process, json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Run every case of `mqs bench --quick` with --json and --plot once.

    Returns (process, JSON report, PNG path).
    """
    directory = tmp_path_factory.mktemp("bench")
    json_path = directory / "bench.json"
    png_path = directory / "bench.png"
    process = run_mqs("bench", "--quick", "--json", str(json_path),
                      "--plot", str(png_path), timeout=300)
    assert process.returncode == 0, process.stderr
    return (process, json.loads(json_path.read_text(encoding="utf-8")),
            png_path)


@pytest.fixture(scope="module")
def ipc_report(tmp_path_factory):
    """Run the cross-process cases with --quick --repeat 2 once."""
    path = tmp_path_factory.mktemp("bench") / "ipc.json"
    cases = [arg for name in IPC_CASES for arg in ("--case", name)]
    process = run_mqs("bench", "--quick", "--repeat", "2", *cases,
                      "--json", str(path))
    assert process.returncode == 0, process.stderr
    return process, json.loads(path.read_text(encoding="utf-8"))


def test_bench_quick_exits_zero_and_prints_table(quick_report):
    process, _ = quick_report
    assert "In-process throughput" in process.stdout
    assert "Tracked ratios" in process.stdout
    assert "queue.SimpleQueue" in process.stdout
    assert "Cross-process" not in process.stdout
    # Quick counts are too small to hold a target to.
    assert "not judged (--quick)" in process.stdout
    assert "missed" not in process.stdout
    assert "met" not in process.stdout.split("Tracked ratios")[1]


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
        assert ratio["comparison"] == ">=", name
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


def test_bench_ipc_prints_tables(ipc_report):
    process, _ = ipc_report
    assert "Cross-process throughput" in process.stdout
    assert "Cross-process round trip" in process.stdout
    assert "Tracked ratios" in process.stdout
    assert "In-process throughput" not in process.stdout


def _skipped_queues(report):
    skipped = {}
    for skip in report["skipped"]:
        skipped.setdefault(skip["case"], set()).add(skip["queue"])
    return skipped


def test_bench_ipc_json_has_every_case_and_queue(ipc_report):
    _, report = ipc_report
    found = _skipped_queues(report)
    for result in report["results"] + report["latency"]:
        found.setdefault(result["case"], set()).add(result["queue"])
    assert found == EXPECTED_IPC_QUEUES


def test_bench_ipc_skips_only_missing_peers(ipc_report):
    _, report = ipc_report
    for skip in report["skipped"]:
        assert "is not installed" in skip["reason"], skip
        assert "pip install 'mqs[bench]'" in skip["reason"], skip
    assert not any(skip["queue"].startswith(("mqs.", "multiprocessing."))
                   for skip in report["skipped"])


def test_bench_ipc_throughput_results(ipc_report):
    _, report = ipc_report
    sizes = {"ipc-64b": 64, "ipc-4kib": 4096, "ipc-batch": 64}
    results = report["results"]
    assert {result["case"] for result in results} == set(sizes)
    for result in results:
        label = f"{result['case']} {result['queue']}"
        case = bench_ipc.CASES[result["case"]]
        assert result["count"] == case.quick_count, label
        assert result["message_size_bytes"] == sizes[result["case"]], label
        assert len(result["rates_per_s"]) == 2, label
        assert all(rate > 0 for rate in result["rates_per_s"]), label
        assert result["median_mb_per_s"] == pytest.approx(
            result["median_per_s"] * result["message_size_bytes"] / 1e6)
        assert result["min_mb_per_s"] <= result["max_mb_per_s"], label
        if result["queue"] == bench_ipc.REFERENCE_QUEUE:
            assert result["ratio_to_reference"] == 1.0, label
        else:
            assert result["ratio_to_reference"] > 0, label


def test_bench_ipc_latency_results(ipc_report):
    _, report = ipc_report
    count = bench_ipc.CASES["ipc-pingpong"].quick_count
    assert report["latency"]
    for result in report["latency"]:
        label = result["queue"]
        assert result["case"] == "ipc-pingpong", label
        assert result["round_trips_per_run"] == count, label
        assert result["runs"] == 2, label
        assert result["round_trips_total"] == 2 * count, label
        assert 0 < result["min_ns"] <= result["p50_ns"], label
        assert result["p50_ns"] <= result["p90_ns"] <= result["p99_ns"], label
        assert result["p99_ns"] <= result["max_ns"], label
        assert result["min_ns"] <= result["mean_ns"] <= result["max_ns"]
        assert len(result["run_p50_ns"]) == 2, label
        assert result["p50_ratio_to_reference"] > 0, label
        assert result["p99_ratio_to_reference"] > 0, label


def test_bench_ipc_json_has_tracked_ratios(ipc_report):
    _, report = ipc_report
    expected = {tracked.name for tracked in bench_ipc.TRACKED_RATIOS}
    measured = {ratio["name"]: ratio for ratio in report["ratios"]}
    unmeasured = {entry["name"] for entry in report["ratios_not_measured"]}
    assert set(measured) | unmeasured == expected
    assert not set(measured) & unmeasured
    for name, ratio in measured.items():
        assert ratio["value"] > 0, name
        if ratio["comparison"] == "<=":
            assert ratio["met"] == (ratio["value"] <= ratio["target"]), name
        else:
            assert ratio["comparison"] == ">=", name
            assert ratio["met"] == (ratio["value"] >= ratio["target"]), name


def test_bench_ipc_json_describes_settings(ipc_report):
    _, report = ipc_report
    ipc = report["settings"]["ipc"]
    assert ipc["counts"] == {
        name: bench_ipc.CASES[name].quick_count for name in IPC_CASES}
    assert ipc["start_method"] == "fork"
    assert ipc["message_pool_size"] == bench_ipc.MESSAGE_POOL_SIZE
    assert report["settings"]["cases"] == IPC_CASES
    assert set(report["machine"]["peers"]) == {
        "faster-fifo", "pyzmq", "libzmq", "persist-queue", "litequeue",
        "redis", "matplotlib", "redis-server"}


def test_bench_count_option_sets_ipc_messages(tmp_path):
    path = tmp_path / "ipc.json"
    process = run_mqs("bench", "--case", "ipc-64b", "--case", "pair",
                      "--count", "300", "--repeat", "1", "--json", str(path))
    assert process.returncode == 0, process.stderr
    report = json.loads(path.read_text(encoding="utf-8"))
    assert {result["count"] for result in report["results"]} == {300}
    assert {result["case"] for result in report["results"]} == {
        "ipc-64b", "pair"}
    assert report["settings"]["ipc"]["counts"] == {"ipc-64b": 300}


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
    assert "ipc-pingpong" in process.stderr


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


# Faulty cross-process channels for the correctness checks. The children
# are forked, so they see these classes and the monkeypatched settings.


class FaultyChannel:
    """A multiprocessing.SimpleQueue whose sender alters message 5.

    `fault` is "corrupt" (send other bytes of the same length), "drop"
    (send nothing) or "raise" (raise ValueError in the producer).
    """

    def __init__(self, fault):
        self.queue = multiprocessing.get_context("fork").SimpleQueue()
        self.fault = fault

    def open_receiver(self):
        return types.SimpleNamespace(get=self.queue.get, close=lambda: None)

    def open_sender(self):
        sent = 0

        def put(message):
            nonlocal sent
            sent += 1
            if sent == 6 and self.fault == "raise":
                raise ValueError("producer failed on purpose")
            if sent == 6 and self.fault == "drop":
                return
            if sent == 6:
                message = bytes(len(message))
            self.queue.put(message)

        return types.SimpleNamespace(put=put, close=lambda: None)

    def close(self):
        self.queue.close()


def faulty_subject(fault, mode="single"):
    peer = bench_ipc.Peer(f"faulty ({fault})", None, None,
                          lambda directory, name: FaultyChannel(fault))
    return bench_ipc.IpcSubject(f"faulty ({fault})", peer, mode)


def test_ipc_run_rejects_corrupted_message():
    case = bench_ipc.CASES["ipc-64b"]
    messages = bench_ipc.make_messages(64, 20)
    with pytest.raises(bench.BenchmarkError,
                       match=r"faulty \(corrupt\) in case 'ipc-64b' lost, "
                             r"duplicated, reordered or corrupted messages: "
                             r"got 20 of 20, and 1 differed from the message "
                             r"sent at their position \(the first at index "
                             r"5\)"):
        bench_ipc.run_throughput_once(case, faulty_subject("corrupt"),
                                      messages)


def test_ipc_run_reports_stall_when_message_lost(monkeypatch):
    monkeypatch.setattr(bench_ipc, "STALL_TIMEOUT_BASE_S", 1.0)
    case = bench_ipc.CASES["ipc-64b"]
    messages = bench_ipc.make_messages(64, 20)
    with pytest.raises(bench.BenchmarkError,
                       match=r"faulty \(drop\) in case 'ipc-64b': the "
                             r"consumer and producer processes are still "
                             r"running after 1 s; messages were lost"):
        bench_ipc.run_throughput_once(case, faulty_subject("drop"), messages)
    assert multiprocessing.active_children() == []


def test_ipc_run_reports_error_raised_in_child():
    case = bench_ipc.CASES["ipc-64b"]
    messages = bench_ipc.make_messages(64, 20)
    with pytest.raises(bench.BenchmarkError,
                       match=r"the producer process raised ValueError: "
                             r"producer failed on purpose"):
        bench_ipc.run_throughput_once(case, faulty_subject("raise"),
                                      messages)
    assert multiprocessing.active_children() == []


def test_ipc_pingpong_rejects_corrupted_echo():
    case = bench_ipc.CASES["ipc-pingpong"]
    # The pinging side sends on the faulty channel, so message 5, the
    # sixth of the 100 untimed warm-up round trips, comes back changed.
    messages = bench_ipc.make_messages(64, 150)
    with pytest.raises(bench.BenchmarkError,
                       match=r"faulty \(corrupt\) in case 'ipc-pingpong' "
                             r"lost, duplicated, reordered or corrupted "
                             r"messages: got 250 of 250, and 1 differed "
                             r"from the message sent at their position "
                             r"\(the first at index 5\)"):
        bench_ipc.run_pingpong_once(case, faulty_subject("corrupt"),
                                    messages)


def test_make_messages_repeats_distinct_pool():
    messages = bench_ipc.make_messages(64, bench_ipc.MESSAGE_POOL_SIZE + 3)
    pool = messages[:bench_ipc.MESSAGE_POOL_SIZE]
    assert len(set(pool)) == bench_ipc.MESSAGE_POOL_SIZE
    assert all(len(message) == 64 for message in messages)
    assert messages[bench_ipc.MESSAGE_POOL_SIZE:] == pool[:3]


def test_latency_result_uses_nearest_rank_percentiles():
    runs = [array.array("q", range(1, 51)), array.array("q", range(51, 101))]
    result = bench_ipc.LatencyResult("ipc-pingpong", "q", 50, runs)
    assert result.total_round_trips == 100
    assert result.p50_ns == 50
    assert result.p90_ns == 90
    assert result.p99_ns == 99
    assert result.mean_ns == 50.5
    assert result.run_p50_ns == [25.5, 75.5]


MISSING_PEER = bench_ipc.Peer("missing", "mqs_test_no_such_module",
                              "no-such-package", None)


def test_peer_missing_reason_names_package():
    reason = bench_ipc.peer_missing_reason(MISSING_PEER)
    assert reason == ("no-such-package is not installed; pip install "
                      "'mqs[bench]' installs the peers")
    assert bench_ipc.peer_missing_reason(bench_ipc.PEER_SHARED_QUEUE) is None


def test_bench_skips_missing_peer_with_note(monkeypatch, capsys, tmp_path):
    case = bench_ipc.IpcCase(
        "ipc-64b", "as ipc-64b, with a peer that is not installed",
        "throughput", 64,
        (bench_ipc.IpcSubject("mqs.SharedQueue",
                              bench_ipc.PEER_SHARED_QUEUE, "single"),
         bench_ipc.IpcSubject("multiprocessing.Queue",
                              bench_ipc.PEER_MULTIPROCESSING_QUEUE, "single"),
         bench_ipc.IpcSubject("pyzmq PUSH/PULL ipc", MISSING_PEER,
                              "single")),
        100, 100)
    monkeypatch.setitem(bench_ipc.CASES, "ipc-64b", case)
    path = tmp_path / "skip.json"
    status = cli.main(["bench", "--case", "ipc-64b", "--repeat", "1",
                       "--json", str(path)])
    assert status == 0
    output = capsys.readouterr().out
    assert ("pyzmq PUSH/PULL ipc skipped: no-such-package is not installed"
            in output)
    assert "not measured: no-such-package is not installed" in output
    report = json.loads(path.read_text(encoding="utf-8"))
    assert report["skipped"] == [{
        "case": "ipc-64b", "queue": "pyzmq PUSH/PULL ipc",
        "reason": bench_ipc.peer_missing_reason(MISSING_PEER)}]
    assert [entry["name"] for entry in report["ratios_not_measured"]] == [
        "ipc-64b mqs.SharedQueue / pyzmq PUSH/PULL ipc"]
    assert [ratio["name"] for ratio in report["ratios"]] == [
        "ipc-64b mqs.SharedQueue / multiprocessing.Queue"]


def test_bench_exits_one_when_ipc_queue_corrupts(monkeypatch, capsys):
    case = bench_ipc.IpcCase(
        "ipc-64b", "a queue that corrupts a message", "throughput", 64,
        (bench_ipc.IpcSubject("multiprocessing.Queue",
                              bench_ipc.PEER_MULTIPROCESSING_QUEUE, "single"),
         faulty_subject("corrupt")),
        50, 50)
    monkeypatch.setitem(bench_ipc.CASES, "ipc-64b", case)
    status = cli.main(["bench", "--case", "ipc-64b", "--repeat", "1"])
    assert status == 1
    captured = capsys.readouterr()
    assert "benchmark failed" in captured.err
    assert "corrupted messages" in captured.err
    assert "Cross-process throughput" not in captured.out


# The whole --quick run: every section, --json and --plot.


def test_quick_run_prints_every_section(quick_run):
    process, _, _ = quick_run
    for title in ("In-process throughput", "Cross-process throughput",
                  "Cross-process round trip", "Disruptor shapes over threads",
                  "Disruptor shapes over processes", "Payload sweep",
                  "One-way latency at a fixed rate", "Timers:",
                  "Durable log:", "Broker:", "Redis broker:",
                  "Tracked ratios"):
        assert title in process.stdout, title
    assert "coordinated omission corrected" in process.stdout
    assert "profile: quick" in process.stdout


def test_quick_run_writes_png(quick_run):
    _, _, png_path = quick_run
    data = png_path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000


def test_quick_run_json_describes_machine_and_profile(quick_run):
    _, report, _ = quick_run
    assert report["profile"] == "quick"
    assert report["command"][:3] == ["mqs", "bench", "--quick"]
    machine = report["machine"]
    assert machine["python_version"] == ".".join(
        map(str, sys.version_info[:3]))
    assert "compiler_flags" in machine["build"]
    assert "python_cflags" in machine["build"]
    assert report["settings"]["cases"] == cli_bench._all_cases()
    assert report["settings"]["repeat"] == 1


def test_build_info_lists_each_flag_once():
    flags = bench._build_info()["compiler_flags"]
    if flags is None:
        pytest.skip("the extension has no GCC producer string")
    for producer in flags:
        options = [word for word in producer.split()
                   if word.startswith("-")]
        assert options
        assert len(options) == len(set(options)), producer


@pytest.mark.parametrize("producer,expected", [
    ("GNU C11 12.2.0 -g -O3 -O3 -fwrapv", "GNU C11 12.2.0 -g -O3 -fwrapv"),
    ("GNU C11 12.2.0 -O3 -O0 -O3", "GNU C11 12.2.0 -O0 -O3"),
    ("GNU C11 12.2.0 -fno-x -fx -fno-x", "GNU C11 12.2.0 -fx -fno-x"),
    ("GNU C11 12.2.0", "GNU C11 12.2.0"),
])
def test_repeated_flags_keep_last_copy(producer, expected):
    assert bench._without_repeated_flags(producer) == expected


def _queues_by_case(results):
    found = {}
    for result in results:
        found.setdefault(result["case"], set()).add(result["queue"])
    return found


def _transports_or_skipped(report, domain, case):
    """Return the transports of `domain` the run measured or skipped."""
    skipped = {skip["queue"] for skip in report["sections_skipped"]
               if skip["case"] == case}
    for skip in report["sections_skipped"]:
        assert "is not installed" in skip["reason"], skip
    return skipped


def test_quick_run_json_has_every_shape(quick_run):
    _, report, _ = quick_run
    found = _queues_by_case(report["shapes"])
    profile = cli_bench.PROFILES["quick"]
    for domain, transports in bench_shapes.TRANSPORTS.items():
        for shape in bench_shapes.SHAPES:
            case = f"{domain} {shape} 64B"
            skipped = _transports_or_skipped(report, domain, case)
            assert found[case] | skipped == {t.label for t in transports}
            assert not found[case] & skipped
    for result in report["shapes"]:
        label = f"{result['case']} {result['queue']}"
        expected = profile.shape_counts[result["domain"]]
        if result["shape"] == "three-to-one":
            expected -= expected % 3
        assert result["count"] == expected, label
        assert result["message_size_bytes"] == 64, label
        assert len(result["rates_per_s"]) == 1, label
        assert result["median_per_s"] > 0, label
        assert result["ratio_to_reference"] > 0, label
        if result["queue"] in ("queue.Queue", "multiprocessing.Queue"):
            assert result["ratio_to_reference"] == 1.0, label


def test_quick_run_json_has_payload_sweep(quick_run):
    _, report, _ = quick_run
    profile = cli_bench.PROFILES["quick"]
    sizes = {}
    for result in report["payload_sweep"]:
        sizes.setdefault(result["message_size_bytes"], set()).add(
            result["queue"])
        assert result["shape"] == "one-to-one"
        assert result["domain"] == "processes"
        assert result["count"] == profile.payload_messages(
            result["message_size_bytes"])
        assert result["median_mb_per_s"] == pytest.approx(
            result["median_per_s"] * result["message_size_bytes"] / 1e6)
    assert sorted(sizes) == list(profile.payload_sizes)
    for queues in sizes.values():
        assert {"mqs.SharedQueue", "multiprocessing.Queue"} <= queues


def test_quick_run_json_has_fixed_rate_latency(quick_run):
    _, report, _ = quick_run
    latency = report["fixed_rate_latency"]
    assert "intended send time" in latency["method"]
    assert latency["rate_per_s"] == bench_latency.DEFAULT_RATE_PER_S
    found = _queues_by_case(latency["results"])
    assert {"mqs.Queue", "mqs.SimpleQueue", "queue.Queue",
            "queue.SimpleQueue"} == found["latency-threads"]
    assert {"mqs.SharedQueue", "multiprocessing.Queue"} <= found[
        "latency-processes"]
    count = cli_bench.PROFILES["quick"].latency_count
    for result in latency["results"]:
        label = result["queue"]
        assert result["messages"] == count, label
        for series in ("corrected", "uncorrected"):
            summary = result[series]
            assert summary["count"] == count, label
            assert 0 < summary["min_ns"] <= summary["p50_ns"], label
            assert summary["p50_ns"] <= summary["p90_ns"], label
            assert summary["p90_ns"] <= summary["p99_ns"], label
            assert summary["p99_ns"] <= summary["p99.9_ns"], label
            assert summary["p99.9_ns"] <= summary["max_ns"], label
        assert result["p99_ratio_to_reference"] > 0, label


def test_quick_run_json_has_timers_and_log(quick_run):
    _, report, _ = quick_run
    timers = report["timers"]
    assert timers["count"] == cli_bench.PROFILES["quick"].wheel_count
    assert set(timers["schedulers"]) == set(bench_wheel.SCHEDULERS)
    assert {name for name, *_ in bench_wheel.TRACKED_RATIOS} == set(
        timers["ratios"])
    for name, ratio in timers["ratios"].items():
        assert ratio["measured"] > 0, name
    lateness = timers["delivery_lateness"]
    assert lateness["messages"] == cli_bench.PROFILES["quick"].lateness_messages
    assert lateness["early"] == 0
    for stage in ("due_to_ready", "due_to_get"):
        assert 0 <= lateness[stage]["p50"] <= lateness[stage]["p99"]
        assert lateness[stage]["p99"] <= lateness[stage]["max"]
    log = report["log"]
    assert [case["case"] for case in log["cases"]] == list(
        bench_seglog.CASE_NAMES)
    for case in log["cases"]:
        if case["case"].startswith("seglog."):
            assert case["rate_per_s"] > 0, case["case"]
        elif "skipped" in case:
            assert "not installed" in case["skipped"], case
    assert {ratio["name"] for ratio in log["ratios"]} == set(
        bench_seglog.TARGETS)
    broker = report["broker"]
    assert [case["case"] for case in broker["cases"]] == list(
        bench_broker.CASE_NAMES)
    for case in broker["cases"]:
        if case["case"].startswith("shm."):
            assert case["rate_per_s"] > 0, case["case"]


def test_quick_run_json_has_redis_broker(quick_run):
    _, report, _ = quick_run
    section = report["redis_broker"]
    if "skipped" in section:
        pytest.skip(section["skipped"])
    loops = [row["loop"] for row in section["results"]]
    assert loops == list(bench_redis.BROKER_COMPARISON)
    for row in section["results"]:
        assert row["rate_per_s"] > 0, row
    assert section["count"] == cli_bench.PROFILES["quick"].redis_count
    names = [ratio["name"] for ratio in section["ratios"]]
    assert names == [ratio[0] for ratio in bench_redis.BROKER_RATIOS]
    for ratio in section["ratios"]:
        assert ratio["value"] > 0
        assert ratio["met"] == (ratio["value"] >= ratio["target"])


def test_quick_run_json_has_broker_backends(quick_run):
    _, report, _ = quick_run
    section = report["broker_backends"]
    assert section["count"] == cli_bench.PROFILES["quick"].backends_count
    cases = {(case["subject"], case["shape"]): case
             for case in section["cases"]}
    assert set(cases) == {(subject, shape)
                          for subject in bench_backends.SUBJECT_NAMES
                          for shape in bench_backends.SHAPE_NAMES}
    for (subject, shape), case in cases.items():
        if "skipped" in case:
            assert subject in ("SQLiteAckQueue", "redis backend",
                               "Redis Streams everysec"), case
            continue
        assert case["rate_per_s"] > 0, case
        if shape == "1 thread":
            assert 0 < case["latency_p50_us"] <= case["latency_p99_us"]
    tracked = [ratio for ratio in section["ratios"] if ratio["tracked"]]
    assert {ratio["target"] for ratio in tracked} <= {10.0, 20.0}


def test_quick_run_json_keeps_tracked_ratios(quick_run):
    _, report, _ = quick_run
    measured = {ratio["name"] for ratio in report["ratios"]}
    unmeasured = {entry["name"] for entry in report["ratios_not_measured"]}
    expected = {tracked.name for tracked in bench.TRACKED_RATIOS}
    expected |= {tracked.name for tracked in bench_ipc.TRACKED_RATIOS}
    assert measured | unmeasured == expected
    for ratio in report["ratios"]:
        assert ratio["value"] > 0, ratio["name"]


def test_plot_without_matplotlib_exits_two(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench_plot, "missing_reason",
                        lambda: "matplotlib is not installed; pip install "
                                "'mqs[bench]'")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--case", "pair", "--plot",
                  str(tmp_path / "bench.png")])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert ("argument --plot: matplotlib is not installed; pip install "
            "'mqs[bench]'") in captured.err
    assert captured.out == ""


def test_plot_rejects_suffix_matplotlib_cannot_write(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "charts.txt"
    process = run_mqs("bench", "--case", "pair", "--plot", str(path))
    assert process.returncode == 2
    assert (f"argument --plot: {str(path)!r} has suffix '.txt', but the "
            f"suffix names the image format") in process.stderr
    assert "such as .png, .svg or .pdf" in process.stderr
    # Rejected before the run, so nothing was measured or written.
    assert process.stdout == ""
    assert not path.exists()


def test_plot_writes_format_of_suffix(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "charts.svg"
    process = run_mqs("bench", "--case", "pair", "--count", "2000",
                      "--repeat", "1", "--plot", str(path))
    assert process.returncode == 0, process.stderr
    assert path.read_bytes().lstrip().startswith(b"<?xml")
    assert b"<svg" in path.read_bytes()


def test_quick_and_full_are_exclusive():
    process = run_mqs("bench", "--quick", "--full")
    assert process.returncode == 2
    assert "not allowed with argument" in process.stderr


def test_count_option_applies_to_shapes_and_latency(tmp_path):
    path = tmp_path / "count.json"
    process = run_mqs("bench", "--case", "shapes-threads", "--case",
                      "latency-threads", "--count", "90", "--repeat", "1",
                      "--json", str(path))
    assert process.returncode == 0, process.stderr
    report = json.loads(path.read_text(encoding="utf-8"))
    assert {result["count"] for result in report["shapes"]} == {90}
    assert {result["messages"] for result in
            report["fixed_rate_latency"]["results"]} == {90}
    assert report["results"] == []
    assert report["timers"] is None
    assert report["log"] is None
    assert report["broker"] is None
    assert report["broker_backends"] is None
