"""Run each script of examples/ in a subprocess and check its output."""

import os
import pathlib
import subprocess
import sys

import pytest

import mqs
from mqs import metrics

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def run_example(name, *args):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines(), result.stderr


def test_delayed_scheduler_runs_cleanup_when_due():
    # The worker loop runs for the whole --run-for, so 3 s leaves 2.7 s
    # for the cleanup due at 0.3 s.
    lines, log = run_example("delayed_scheduler.py", "--cleanup-delay", "0.3",
                             "--run-for", "3")
    assert "ran: ['send_email', 'cleanup']" in lines
    assert "still delayed: 0" in lines
    assert log.index("email to ada@example.com") < log.index("cleanup of")


def test_delayed_scheduler_keeps_far_cleanup_delayed():
    lines, _ = run_example("delayed_scheduler.py", "--run-for", "0.3")
    assert "ran: ['send_email']" in lines
    assert "still delayed: 1" in lines


def test_priority_tasks_alerts_first_and_retries():
    lines, _ = run_example("priority_tasks.py", "--workers", "3",
                           "--tasks", "20")
    assert ("completed: Counter({'critical_alert': 20, 'report': 20, "
            "'cleanup': 20})") in lines
    assert "critical alerts done before the first cleanup: 20" in lines
    assert ("retried after a failure: ['critical_alert-7', 'report-3']"
            in lines)


def test_order_pipeline_fans_out_and_restocks():
    lines, _ = run_example("order_pipeline.py", "--orders", "50")
    assert "audited orders: 50" in lines
    assert "duplicates dropped: 5" in lines
    assert "restock requests: 2" in lines
    assert "stock: {'apple': 95, 'pear': 55}" in lines


@pytest.mark.parametrize("name,args,error", [
    ("priority_tasks.py", ["--workers", "0"],
     "argument --workers: must be 1 or more, got 0"),
    ("priority_tasks.py", ["--tasks", "0"],
     "argument --tasks: must be 1 or more, got 0"),
    ("priority_tasks.py", ["--workers", "two"],
     "argument --workers: invalid int 'two'"),
    ("delayed_scheduler.py", ["--cleanup-delay", "-5"],
     "argument --cleanup-delay: must be a finite number of seconds, 0 or "
     "more, got '-5'"),
    ("delayed_scheduler.py", ["--cleanup-delay", "nan"],
     "argument --cleanup-delay: must be a finite number of seconds"),
    ("delayed_scheduler.py", ["--cleanup-delay", "1e12"],
     "argument --cleanup-delay: must be at most 315576000 seconds"),
    ("delayed_scheduler.py", ["--run-for", "-1"],
     "argument --run-for: must be a finite number of seconds"),
    ("delayed_scheduler.py", ["--run-for", "inf"],
     "argument --run-for: must be a finite number of seconds"),
    ("order_pipeline.py", ["--orders", "-1"],
     "argument --orders: must be 0 or more, got -1"),
])
def test_example_rejects_bad_option(name, args, error):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True,
        text=True, timeout=60, env=os.environ.copy())
    assert result.returncode == 2, result.stderr
    assert error in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_order_pipeline_accepts_zero_orders():
    lines, _ = run_example("order_pipeline.py", "--orders", "0")
    assert "audited orders: 0" in lines
    assert "stock: {'apple': 120, 'pear': 80}" in lines


def test_readme_broker_example_runs():
    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme[readme.index("## Broker"):]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, timeout=60, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "fulfil {'id': 1, 'item': 'tea'}",
        "fulfil {'id': 2, 'item': 'cake'}",
        "2 []",
    ]


def readme_text():
    """Return the README with its line breaks folded into spaces."""
    readme = (EXAMPLES.parent / "README.md").read_text()
    return " ".join(readme.split())


def test_readme_sample_every_names_backends(tmp_path):
    readme = readme_text()
    assert ("The memory, log and redis backends take "
            "`Broker(..., sample_every=n)`") in readme
    assert "The shm backend rejects it" in readme

    # The redis backend takes it too; its suite needs a server.
    for backend, options in (("memory", {}),
                             ("log", {"path": tmp_path / "log"})):
        with mqs.Broker(backend, sample_every=3, **options) as broker:
            broker.declare_topic("t")
            broker.consume("t", "g")
            assert broker.group_stats("t")[0].sample_every == 3

    name = f"test-readme-{os.getpid()}"
    with pytest.raises(TypeError, match="unexpected keyword argument "
                                        "'sample_every'"):
        mqs.Broker("shm", name=name, sample_every=3)
    previous = metrics.default_sample_every()
    metrics.set_default_sample_every(3)
    try:
        with mqs.Broker("shm", name=name) as broker:
            broker.declare_topic("t")
            broker.consume("t", "g")
            assert broker.group_stats("t")[0].sample_every == 3
    finally:
        metrics.set_default_sample_every(previous)
        mqs.Broker.unlink(name)
