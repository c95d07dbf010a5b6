"""Type-check a usage file against the shipped .pyi stubs."""

import pathlib
import subprocess
import sys

import pytest

USAGE = pathlib.Path(__file__).parent / "typing" / "usage.py"


def test_stubs_type_check_usage_file():
    pytest.importorskip("mypy")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--cache-dir=/dev/null", str(USAGE)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stubs_reject_wrong_argument_type(tmp_path):
    pytest.importorskip("mypy")
    bad = tmp_path / "bad.py"
    bad.write_text("import mqs\nq: mqs.Queue[int] = mqs.Queue()\nq.put('x')\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--cache-dir=/dev/null", str(bad)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert "arg-type" in result.stdout
