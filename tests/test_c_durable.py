"""Build the plain C test of the durable queue's control block and run
it in the three builds (optimised, ASan with UBSan, TSan).

tests/c/test_durable.c drives csrc/mqs_durable.h from threads: bounded
reservations (maxsize stays exact with racing producers), the claim
announcements that keep retention below a paused reader, exactly once
delivery to each of two groups, and the group-commit handshake between
the appender and producers (no lost wake-up).
"""

import c_build
import pytest

pytestmark = pytest.mark.c

SOURCES = [c_build.C_TESTS / "test_durable.c"]
TIMEOUT_SECONDS = 300


@pytest.fixture(scope="module", params=list(c_build.BUILD_FLAGS))
def binary(request, tmp_path_factory):
    """Compile tests/c/test_durable.c once per build; return (name, path)."""
    build = request.param
    path = tmp_path_factory.mktemp(f"c-durable-{build}") / "test_durable"
    c_build.compile_c(build, SOURCES, path)
    return build, path


def test_c_durable_threads(binary):
    build, path = binary
    records = max(20_000, int(100_000 * c_build.scale_factor()))
    if build != "plain":
        records //= 5
    result = c_build.run_c([str(path), "threads", str(records)],
                           TIMEOUT_SECONDS)
    output = c_build.assert_clean(result, f"test_durable ({build})")
    assert result.stdout.rstrip().endswith(" passed, 0 failed"), output


def test_c_durable_gather(binary):
    build, path = binary
    rounds = max(2_000, int(10_000 * c_build.scale_factor()))
    if build != "plain":
        rounds //= 5
    result = c_build.run_c([str(path), "gather", str(rounds)],
                           TIMEOUT_SECONDS)
    output = c_build.assert_clean(result, f"test_durable gather ({build})")
    assert result.stdout.rstrip().endswith(" passed, 0 failed"), output
