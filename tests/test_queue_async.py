"""asyncio waits of Queue, SimpleQueue and SharedQueue."""

import asyncio
import multiprocessing as mp
import threading
import time

import pytest

import mqs
from loop_ticks import ticking


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.mark.parametrize("make", [mqs.Queue, mqs.SimpleQueue,
                                  mqs.SharedQueue])
def test_get_async_waits_without_blocking_loop(make):
    queue = make()
    threading.Timer(0.2, queue.put, ("x",)).start()
    item, ticks = run(ticking(queue.get_async(timeout=10)))
    assert item == "x"
    assert ticks >= 5


@pytest.mark.parametrize("make", [mqs.Queue, mqs.SimpleQueue,
                                  mqs.SharedQueue])
def test_get_async_times_out_never_early(make):
    queue = make()
    started = time.monotonic()
    with pytest.raises(mqs.Empty):
        run(queue.get_async(timeout=0.1))
    assert time.monotonic() - started >= 0.1


def test_get_async_rejects_negative_timeout():
    with pytest.raises(ValueError, match="non-negative"):
        run(mqs.Queue().get_async(timeout=-1))


BAD_TIMEOUTS = [(float("nan"), ValueError), (-1, ValueError),
                ("x", TypeError), (b"1", TypeError), ([], TypeError)]


def sync_error(call):
    """Return the type and message of what `call()` raises."""
    with pytest.raises(Exception) as caught:
        call()
    return type(caught.value), str(caught.value)


def async_error(coroutine):
    """Return the type and message of what awaiting `coroutine` raises
    within 5 seconds."""
    async def bounded():
        return await asyncio.wait_for(coroutine, 5)

    with pytest.raises(Exception) as caught:
        run(bounded())
    return type(caught.value), str(caught.value)


@pytest.mark.parametrize("timeout,error", BAD_TIMEOUTS)
@pytest.mark.parametrize("make", [mqs.Queue, mqs.SimpleQueue,
                                  mqs.SharedQueue])
def test_get_async_timeout_check_matches_get(make, timeout, error):
    queue = make()
    expected = sync_error(lambda: queue.get(timeout=timeout))
    assert expected[0] is error
    assert "timeout" in expected[1]
    assert async_error(queue.get_async(timeout=timeout)) == expected


@pytest.mark.parametrize("timeout,error", BAD_TIMEOUTS)
@pytest.mark.parametrize("make", [lambda: mqs.Queue(maxsize=1),
                                  lambda: mqs.SharedQueue(maxsize=1)])
def test_put_async_timeout_check_matches_put(make, timeout, error):
    queue = make()
    queue.put(1)
    expected = sync_error(lambda: queue.put(2, timeout=timeout))
    assert expected[0] is error
    assert "timeout" in expected[1]
    assert async_error(queue.put_async(2, timeout=timeout)) == expected
    assert queue.qsize() == 1


def test_async_timeout_above_limit_waits_like_none():
    queue = mqs.Queue()
    threading.Timer(0.1, queue.put, ("x",)).start()
    assert run(queue.get_async(timeout=1e12)) == "x"
    threading.Timer(0.1, queue.put, ("y",)).start()
    assert run(queue.get_async(timeout=float("inf"))) == "y"


def test_queue_get_async_sees_delayed_item():
    queue = mqs.Queue()
    queue.put("later", delay=0.1)
    assert run(queue.get_async(timeout=10)) == "later"


def test_cancelled_get_async_takes_nothing():
    queue = mqs.Queue()

    async def main():
        task = asyncio.create_task(queue.get_async())
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        queue.put("kept")

    run(main())
    assert queue.get_nowait() == "kept"


@pytest.mark.parametrize("make", [lambda: mqs.Queue(maxsize=1),
                                  lambda: mqs.SharedQueue(maxsize=1)])
def test_put_async_waits_for_room(make):
    queue = make()
    queue.put(1)
    threading.Timer(0.2, queue.get).start()
    _, ticks = run(ticking(queue.put_async(2, timeout=10)))
    assert ticks >= 5
    assert queue.get(timeout=1) == 2


def test_put_async_times_out_and_raises_shutdown():
    queue = mqs.Queue(maxsize=1)
    queue.put(1)
    with pytest.raises(mqs.Full):
        run(queue.put_async(2, timeout=0.05))
    queue.shutdown()
    with pytest.raises(mqs.ShutDown):
        run(queue.put_async(3))


def _produce(queue):
    for i in range(100):
        queue.put(i)


def test_shared_queue_get_async_across_processes():
    queue = mqs.SharedQueue()
    child = mp.get_context("fork").Process(target=_produce, args=(queue,))
    child.start()

    async def main():
        return [await queue.get_async(timeout=30) for _ in range(100)]

    assert run(main()) == list(range(100))
    child.join(30)
    assert child.exitcode == 0
