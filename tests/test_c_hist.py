"""Build the plain C test of the shared latency histogram and run it.

tests/c/test_hist.c drives csrc/mqs_hist.h in three builds (optimised
with warnings as errors, ASan with UBSan, and TSan): bucket bounds,
clamping, the count, sum and max fields, reset, and threads that record
at once. Its ``index`` mode prints the C bucket of each value, which
must equal `mqs.metrics.hist_index`, the Python mirror of the layout.
"""

import random

import c_build
import pytest

from mqs import metrics

pytestmark = pytest.mark.c

SOURCES = [c_build.C_TESTS / "test_hist.c"]
TIMEOUT_SECONDS = 120


@pytest.fixture(scope="module", params=list(c_build.BUILD_FLAGS))
def binary(request, tmp_path_factory):
    name = request.param
    path = tmp_path_factory.mktemp(f"c-hist-{name}") / "test_hist"
    c_build.compile_c(name, SOURCES, path, ["-pthread"])
    return name, path


def run(binary, mode, stdin=None):
    name, path = binary
    result = c_build.run_c([str(path), mode], TIMEOUT_SECONDS, stdin=stdin)
    return c_build.assert_clean(result, f"test_hist {mode} ({name})"), \
        result.stdout


def test_c_hist_units(binary):
    _, stdout = run(binary, "units")
    assert stdout.rstrip().endswith(" passed, 0 failed"), stdout


def test_c_hist_threads(binary):
    _, stdout = run(binary, "threads")
    assert stdout.rstrip().endswith(" passed, 0 failed"), stdout


def test_c_hist_index_matches_python(binary):
    if binary[0] == "tsan":
        pytest.skip("single-threaded: the other builds cover it")
    rng = random.Random(20261204)
    values = [-1, 0, 1, 63, 64, 65, 127, 128, metrics.HIST_MAX_NS,
              metrics.HIST_MAX_NS + 1]
    values += [metrics.hist_upper_ns(index)
               for index in range(metrics.HIST_BUCKETS)]
    values += [metrics.hist_upper_ns(index) + 1
               for index in range(metrics.HIST_BUCKETS - 1)]
    values += [rng.randrange(0, 1 << 43) for _ in range(2000)]
    _, stdout = run(binary, "index",
                    stdin="".join(f"{value}\n" for value in values))
    c_indexes = [int(line) for line in stdout.split()]
    assert len(c_indexes) == len(values)
    mismatches = [(value, index, metrics.hist_index(value))
                  for value, index in zip(values, c_indexes)
                  if index != metrics.hist_index(value)]
    assert mismatches == []
