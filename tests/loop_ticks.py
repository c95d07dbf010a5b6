"""Count the ticks of an event loop while a coroutine runs, to check
that the coroutine does not block the loop."""

import asyncio


async def ticking(awaitable, errors=()):
    """Await `awaitable` while counting 10 ms ticks of the loop; return
    ``(result, ticks)``. An exception of a type in `errors` is returned
    as the result instead of raised."""
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        result = await awaitable
    except errors as exc:
        result = exc
    finally:
        task.cancel()
    return result, ticks
