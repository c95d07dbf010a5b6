"""Tests of the `mqs` command line tool itself (main, --version)."""

import subprocess
import sys


def run_mqs(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "mqs", *args], check=False, capture_output=True,
        text=True, timeout=60, cwd=cwd)


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
