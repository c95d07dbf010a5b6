"""The delayed delivery lateness benchmark of mqs.bench_wheel.

Runs it on real processes with few messages and checks the result's
shape and its correctness checks; speed is never asserted here.
"""

import json

import pytest

from mqs import bench_wheel


def test_delivery_lateness_reports_percentiles():
    result = bench_wheel.run_delivery_lateness(50, max_delay_s=0.2)
    assert result.messages == 50
    assert result.early == 0
    assert result.tick_s == 0.001
    assert result.target_p99_s == pytest.approx(0.002)
    for stats in (result.due_to_ready, result.due_to_get):
        assert set(stats) == {"p50", "p99", "max"}
        assert 0 <= stats["p50"] <= stats["p99"] <= stats["max"]
    # A message is returned by get after it was moved into the ring.
    assert result.due_to_get["max"] >= result.due_to_ready["p50"]
    data = result.to_dict()
    assert data["met"] == result.met
    json.dumps(data)
    assert "due -> ready in ring" in bench_wheel.format_delivery_lateness(
        result)


@pytest.mark.parametrize("kwargs", [
    {"messages": 0},
    {"max_delay_s": 0.0},
    {"busy_fraction": 1.0},
    {"busy_slice_s": 0.0},
])
def test_delivery_lateness_rejects_bad_arguments(kwargs):
    arguments = {"messages": 10, **kwargs}
    with pytest.raises(ValueError, match="messages must be at least 1"):
        bench_wheel.run_delivery_lateness(**arguments)
