"""Build the plain C tests of the timing wheel with a C compiler and run them.

tests/c/test_wheel.c (unit tests of csrc/mqs_wheel.h and a seeded random
comparison with a brute-force model) is compiled two ways: an optimised
build with warnings as errors, and AddressSanitizer with
UndefinedBehaviorSanitizer and the MQS_DEBUG assertions. Each binary must
exit with status 0 and print no sanitizer report. The wheel is
single-threaded, so there is no ThreadSanitizer build.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.c

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "tests" / "c" / "test_wheel.c", ROOT / "csrc" / "mqs_wheel.c"]
COMMON_FLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}"]
BUILD_FLAGS = {
    "plain": ["-O2"],
    "asan-ubsan": [
        "-O1",
        "-g",
        "-fno-omit-frame-pointer",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-DMQS_DEBUG=1",
    ],
}
SANITIZER_ENV = {
    "ASAN_OPTIONS": "halt_on_error=1:detect_leaks=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
}
# Text that only a sanitizer report contains.
SANITIZER_MARKERS = ("Sanitizer", "runtime error:")
TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module")
def compiler():
    cc = shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler found (install gcc)")
    return cc


@pytest.mark.parametrize("build", sorted(BUILD_FLAGS))
def test_c_wheel(build, compiler, tmp_path):
    binary = tmp_path / f"test_wheel_{build}"
    compile_result = subprocess.run(
        [compiler, *COMMON_FLAGS, *BUILD_FLAGS[build], *map(str, SOURCES),
         "-o", str(binary)],
        capture_output=True, text=True, timeout=TIMEOUT_SECONDS,
    )
    assert compile_result.returncode == 0, compile_result.stderr

    run_result = subprocess.run(
        [str(binary)], capture_output=True, text=True,
        timeout=TIMEOUT_SECONDS, env={**os.environ, **SANITIZER_ENV},
    )
    output = run_result.stdout + run_result.stderr
    assert run_result.returncode == 0, output
    assert "checks passed" in run_result.stdout
    for marker in SANITIZER_MARKERS:
        assert marker not in output
