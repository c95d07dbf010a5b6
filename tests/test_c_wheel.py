"""Build and run the plain C tests of the timing wheel (tests/c/test_wheel.c).

Two builds: optimised with warnings as errors, and AddressSanitizer plus
UndefinedBehaviorSanitizer with MQS_DEBUG assertions on. The wheel is
single-threaded, so there is no ThreadSanitizer build.
"""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = [ROOT / "tests" / "c" / "test_wheel.c", ROOT / "csrc" / "mqs_wheel.c"]
COMMON_FLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}"]

BUILDS = {
    "optimised": ["-O2"],
    "sanitized": [
        "-O1",
        "-g",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer",
        "-DMQS_DEBUG=1",
    ],
}

pytestmark = pytest.mark.c


@pytest.fixture(scope="module")
def compiler():
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler found (install gcc)")
    return cc


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_c_wheel(build, compiler, tmp_path):
    binary = tmp_path / f"test_wheel_{build}"
    compile_result = subprocess.run(
        [compiler, *COMMON_FLAGS, *BUILDS[build], *map(str, SOURCES),
         "-o", str(binary)],
        capture_output=True, text=True, timeout=300,
    )
    assert compile_result.returncode == 0, compile_result.stderr

    run_result = subprocess.run(
        [str(binary)], capture_output=True, text=True, timeout=300,
    )
    assert run_result.returncode == 0, run_result.stdout + run_result.stderr
    assert "checks passed" in run_result.stdout
