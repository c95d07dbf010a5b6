"""Wake asyncio waiters from a shared-memory wait word.

The shm and log backends signal changes through wait words
(``csrc/mqs_wait.h``): a futex word that any process bumps after a
change, when a waiter is registered. An event loop cannot await a
futex, so `Wakeups` parks one daemon thread per watched word and
resolves the futures of the awaiting coroutines, through
``loop.call_soon_threadsafe``, when the word's epoch moves.

A coroutine never misses a change: it registers on the word with
`Wakeups.prepare` (which counts it as a waiter, so every later change
bumps the epoch) before it checks its condition, and `Wakeups.wait`
returns as soon as the epoch differs from the one `prepare` returned.
A word is any object with the methods ``wait_prepare()``,
``wait(epoch, timeout)``, ``cancel_wait()`` (`mqs._journal.SharedJournal`
and `mqs._topiccore.TopicCore`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from typing import Any

from mqs._topiccore import TopicRetired

__all__ = ["Wakeups"]

logger = logging.getLogger(__name__)

# A watcher thread parks on its word for at most this long per call (the
# words' own cap), then checks for stop and for new epochs.
PARK_SLICE_S = 0.05
# A watcher thread without waiters exits after this long.
IDLE_EXIT_S = 1.0

_instances: weakref.WeakSet[Wakeups] = weakref.WeakSet()


class Wakeups:
    """The watcher threads of one backend, one per watched wait word.

    Every method may be called from any thread. `close` stops the
    threads; the owner calls it before it unmaps a word.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._watchers: dict[int, _Watcher] = {}
        self._closed = False
        _instances.add(self)

    def prepare(self, word: Any) -> int:
        """Register as a waiter on `word`; return the epoch for `wait`.

        The caller checks its condition after this call and then calls
        `wait` or not, and `finish` in every case.
        """
        return word.wait_prepare()

    def finish(self, word: Any) -> None:
        """Deregister a waiter registered by `prepare`."""
        word.cancel_wait()

    async def wait(self, word: Any, epoch: int, timeout: float) -> None:
        """Await a change of `word` after `epoch`, or `timeout` seconds.

        Returns early, without a change, when `close` runs.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._closed:
                return
            watcher = self._watchers.get(id(word))
            if watcher is None or watcher.word is not word:
                watcher = _Watcher(self, word)
                self._watchers[id(word)] = watcher
                watcher.start()
            watcher.pending[future] = (loop, epoch)
            watcher.changed.notify()
        timer = loop.call_later(max(0.0, timeout), _resolve, future)
        try:
            await future
        finally:
            timer.cancel()
            with self._lock:
                watcher.pending.pop(future, None)

    def close(self, timeout: float = 1.0) -> None:
        """Stop every watcher thread, waking its waiters; idempotent.

        Waits up to `timeout` seconds in all for the threads to leave
        their words, so the caller may then unmap them.
        """
        with self._lock:
            self._closed = True
            watchers = list(self._watchers.values())
            for watcher in watchers:
                watcher.stopping = True
                watcher.changed.notify()
        for watcher in watchers:
            if watcher.thread is not threading.current_thread():
                watcher.thread.join(timeout)
            if watcher.thread.is_alive():
                logger.warning("%s: a wakeup thread did not stop within "
                               "%.1f s", self.name, timeout)

    def _after_fork_in_child(self) -> None:
        # The threads did not survive the fork; their futures belong to
        # the parent's event loops.
        self._lock = threading.Lock()
        self._watchers = {}


class _Watcher:
    """One thread parked on one word for the futures in `pending`."""

    def __init__(self, owner: Wakeups, word: Any) -> None:
        self.owner = owner
        self.word = word
        self.changed = threading.Condition(owner._lock)
        # future -> (its loop, the epoch its coroutine registered at)
        self.pending: dict[asyncio.Future, tuple[Any, int]] = {}
        self.stopping = False
        self.thread = threading.Thread(
            target=self._run, name=f"mqs-wakeup-{owner.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            while self._wait_for_waiters():
                self._watch_once()
        except TopicRetired:
            # The core handle was closed: its topic left the core or was
            # deleted. The woken coroutines look up their word again.
            pass
        except Exception:
            logger.error("%s: the wakeup thread failed; awaiting consumers "
                         "fall back to their timeout", self.owner.name,
                         exc_info=True)
        finally:
            with self.owner._lock:
                futures = list(self.pending.items())
                self.pending.clear()
                if self.owner._watchers.get(id(self.word)) is self:
                    del self.owner._watchers[id(self.word)]
            _resolve_all(futures)

    def _wait_for_waiters(self) -> bool:
        """Block while no coroutine waits; return False to exit."""
        with self.changed:
            while not self.pending and not self.stopping:
                if not self.changed.wait(IDLE_EXIT_S) and not self.pending:
                    return False
            return not self.stopping

    def _watch_once(self) -> None:
        """Resolve the futures whose epoch moved, then park on the word
        until it moves again (at most PARK_SLICE_S)."""
        word = self.word
        epoch = word.wait_prepare()
        with self.owner._lock:
            due = [(future, entry) for future, entry in self.pending.items()
                   if entry[1] != epoch]
            for future, _ in due:
                del self.pending[future]
            park = bool(self.pending) and not self.stopping
        _resolve_all(due)
        if park:
            # Every remaining future registered at `epoch`, so the park
            # returns on the first change after it.
            word.wait(epoch, PARK_SLICE_S)
        else:
            word.cancel_wait()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _resolve_all(futures: list[tuple[asyncio.Future, tuple[Any, int]]]
                 ) -> None:
    for future, (loop, _) in futures:
        try:
            loop.call_soon_threadsafe(_resolve, future)
        except RuntimeError:
            pass  # The loop is closed, so no coroutine awaits this future.


def _after_fork() -> None:
    for wakeups in list(_instances):
        wakeups._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork)
