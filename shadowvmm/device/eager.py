"""Start a coroutine at once in the caller, as Python 3.12's eager tasks do.

A task costs about 1.5 µs on uvloop (the task, its loop callback, the weak-set entry), more than
the whole VMM stop of an idle in-process device. :func:`start_eager` runs a coroutine up to its
first suspension in the caller; only one that suspends gets a task, for the rest.

On Python 3.12+ the task is created with ``eager_start=True``, which runs the first part with
the task itself as the current task. Before 3.12 the first part runs with the *caller's*
task current, so only coroutines that enter no current-task-bound construct
(``asyncio.timeout``, ``asyncio.current_task``) before their first suspension may start eagerly:
callers ask the backend (:attr:`~shadowvmm.backends.base.Capability.EAGER_OPS`).
"""

from __future__ import annotations

import asyncio
import collections.abc
import sys
from collections.abc import Coroutine, Generator
from typing import Any

#: ``asyncio.Task(..., eager_start=True)`` exists (Python 3.12+).
NATIVE_EAGER = sys.version_info >= (3, 12)


class _Resumed(collections.abc.Coroutine):
    """A coroutine that already ran up to yielding *first*, as a task's coroutine: the task's
    first step gets *first* back, every later one (and a cancellation, even before that step)
    goes to the coroutine."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self._coro = coro
        self._first = first

    def send(self, value: Any) -> Any:
        if self._first is not _TAKEN:
            first, self._first = self._first, _TAKEN
            return first
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._first = _TAKEN
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        return (yield from self._run())

    def _run(self) -> Generator[Any, None, Any]:
        while True:
            try:
                yielded = self.send(None)
            except StopIteration as stop:
                return stop.value
            yield yielded


_TAKEN = object()


def start_eager(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any],
                eager: bool) -> asyncio.Task[Any] | None:
    """Run *coro* up to its first suspension; None if it finished then, else the task running
    the rest. Pass a coroutine that records its own outcome: a result is dropped, and before 3.12
    an exception raised before the first suspension propagates here. *eager* False (a coroutine
    not safe to start in the caller, see the module docstring) gives a plain task."""
    if NATIVE_EAGER:
        task: asyncio.Task[Any] = asyncio.Task(coro, loop=loop, eager_start=eager)  # type: ignore[call-arg]
        return None if task.done() else task
    if not eager:
        return loop.create_task(coro)
    try:
        first = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(_Resumed(coro, first))
