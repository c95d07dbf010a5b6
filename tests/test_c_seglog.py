"""Build and run the plain C tests of the segment log (tests/c/test_seglog.c).

Two builds: optimised with -Wall -Wextra -Werror, and AddressSanitizer
plus UndefinedBehaviorSanitizer, so a leak, an overflow or undefined
behaviour fails the test.
"""

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = [
    ROOT / "tests" / "c" / "test_seglog.c",
    ROOT / "csrc" / "mqs_seglog.c",
    ROOT / "csrc" / "mqs_crc32c.c",
]
WARNINGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-pthread"]
BUILDS = {
    "optimised": ["-O2"],
    "asan_ubsan": [
        "-O1",
        "-g",
        "-fsanitize=address,undefined",
        "-fno-omit-frame-pointer",
        "-fno-sanitize-recover=all",
    ],
}

pytestmark = pytest.mark.c


@pytest.mark.parametrize("build", sorted(BUILDS))
def test_c_seglog(build, tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler on PATH")
    binary = tmp_path / f"test_seglog_{build}"
    compile_cmd = [
        compiler, *WARNINGS, *BUILDS[build], f"-I{ROOT / 'csrc'}",
        *map(str, SOURCES), "-o", str(binary),
    ]
    built = subprocess.run(compile_cmd, capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr

    env = dict(os.environ, TMPDIR=str(tmp_path))
    env.pop("MQS_FAILPOINT", None)
    run = subprocess.run([str(binary)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1].endswith(" 0 failed")
