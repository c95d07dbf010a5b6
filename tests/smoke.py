"""Smoke test for an installed wheel: import mqs and move items through it.

Run as a script (`python tests/smoke.py`) by cibuildwheel and by .ci/run
after installing a built wheel into a fresh virtual environment.
"""

import queue
import sys
import threading

import mqs


def main():
    items = 100_000
    q = mqs.Queue(maxsize=64)
    received = []

    def consume():
        for _ in range(items):
            received.append(q.get(timeout=30))

    consumer = threading.Thread(target=consume)
    consumer.start()
    q.put_many(range(items))
    consumer.join(timeout=60)
    assert not consumer.is_alive(), "consumer did not finish in 60 s"
    assert received == list(range(items)), "items lost or reordered"

    simple = mqs.SimpleQueue()
    simple.put("x")
    assert simple.get_many(10) == ["x"]
    try:
        simple.get(timeout=0.01)
    except queue.Empty:
        pass
    else:
        raise AssertionError("get on an empty queue did not raise Empty")
    print(f"mqs {mqs.__version__} smoke test passed on {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
