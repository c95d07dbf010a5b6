"""`mqs.bench_backends`: every subject in every shape, checked rounds,
latency of the one-thread shape and the ratios against the peers."""

import pytest

from mqs import bench_backends
from mqs.bench import BenchmarkError

LOCAL = ("memory", "shm", "log fsync=interval", "log fsync=always")


def test_local_subjects_in_every_shape():
    result = bench_backends.run_backends_bench(40, 1, subjects=LOCAL)
    cases = {(case["subject"], case["shape"]): case
             for case in result["cases"]}
    assert set(cases) == {(subject, shape) for subject in LOCAL
                          for shape in bench_backends.SHAPE_NAMES}
    for (subject, shape), case in cases.items():
        assert case["messages"] == 40
        assert case["rounds"] == 1
        assert 0 < case["rate_min_per_s"] <= case["rate_per_s"] \
            <= case["rate_max_per_s"]
        if shape == "1 thread":
            assert 0 < case["latency_p50_us"] <= case["latency_p99_us"]
        else:
            assert "latency_p50_us" not in case
    # No peer was requested, so no ratio is listed.
    assert result["ratios"] == []
    text = bench_backends.format_backends_bench(result)
    assert "log fsync=always" in text


def test_peers_and_ratios():
    subjects = ("log fsync=interval", "log fsync=always", "SQLiteAckQueue",
                "Redis Streams everysec", "redis backend")
    for name in subjects:
        reason = bench_backends.skip_reason(name)
        if reason is not None:
            pytest.skip(reason)
    result = bench_backends.run_backends_bench(24, 1, subjects=subjects)
    rates = {(case["subject"], case["shape"]): case["rate_per_s"]
             for case in result["cases"]}
    ratios = {ratio["name"]: ratio for ratio in result["ratios"]}
    for shape in bench_backends.SHAPE_NAMES:
        interval = ratios[f"log fsync=interval / Redis Streams everysec, "
                          f"{shape}"]
        assert interval["value"] == pytest.approx(
            rates["log fsync=interval", shape]
            / rates["Redis Streams everysec", shape])
        assert interval["target"] == 20.0
        assert interval["tracked"]
        assert interval["met"] == (interval["value"] >= 20.0)
        always = ratios[f"log fsync=always / SQLiteAckQueue, {shape}"]
        # The target is set for 4 concurrent producers only.
        assert always["tracked"] == (shape != "1 thread")
        assert always["target"] == (None if shape == "1 thread" else 10.0)
        backend = ratios[f"redis backend / Redis Streams everysec, {shape}"]
        assert backend["target"] is None
        assert backend["value"] > 0


def test_lost_item_fails_the_round(monkeypatch):
    class Losing(bench_backends._BrokerSubject):
        def get_ack(self):
            body = super().get_ack()
            if body["n"] == 3:
                # Taken and acked, but reported as the item before.
                return {"n": 2}
            return body

    import mqs

    monkeypatch.setattr(bench_backends, "make_subject",
                        lambda name, path, url: Losing(mqs.Broker()))
    with pytest.raises(BenchmarkError, match="lost or duplicated"):
        bench_backends.run_round("memory", "1 thread",
                                 bench_backends.make_items(10))


@pytest.mark.parametrize("count, repeat, match", [
    (3, 1, "count must be an int of at least 8, got 3"),
    (40, 0, "repeat must be an int of at least 1, got 0"),
    (40.5, 1, "count must be an int"),
])
def test_bad_arguments(count, repeat, match):
    with pytest.raises(ValueError, match=match):
        bench_backends.run_backends_bench(count, repeat, subjects=["memory"])


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown subject 'sqs'"):
        bench_backends.run_backends_bench(40, 1, subjects=["sqs"])
    with pytest.raises(ValueError, match="unknown shape 'pairs'"):
        bench_backends.run_round("memory", "pairs",
                                 bench_backends.make_items(10))
