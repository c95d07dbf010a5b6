"""Build and run the plain C tests of the segment log (tests/c/test_seglog.c).

Three builds: optimised with -Wall -Wextra -Werror, AddressSanitizer
plus UndefinedBehaviorSanitizer, so a leak, an overflow or undefined
behaviour fails the test, and ThreadSanitizer for the log's own threads
(the "interval" flusher, the toucher that writes zeros ahead) and the
threads of the group-commit tests.
"""

import os

import pytest

import c_build

pytestmark = pytest.mark.c

SOURCES = [
    c_build.C_TESTS / "test_seglog.c",
    c_build.CSRC / "mqs_seglog.c",
    c_build.CSRC / "mqs_crc32c.c",
]
TIMEOUT_SECONDS = 300


@pytest.mark.parametrize("build", ["plain", "asan-ubsan", "tsan"])
def test_c_seglog(build, tmp_path, monkeypatch):
    binary = c_build.compile_c(build, SOURCES,
                               tmp_path / f"test_seglog_{build}")
    # An armed failpoint from the caller's environment must not fire here.
    monkeypatch.delenv("MQS_FAILPOINT", raising=False)
    result = c_build.run_c([str(binary)], TIMEOUT_SECONDS,
                           env={"TMPDIR": str(tmp_path)})
    output = c_build.assert_clean(result, f"test_seglog ({build} build)")
    assert result.stdout.strip().splitlines()[-1].endswith(" 0 failed"), output
