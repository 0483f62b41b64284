"""Bounded waits for asynchronous effects in tests: poll a condition until it holds or a
deadline passes, instead of sleeping a guessed time and then counting.

On timeout each helper raises :class:`AssertionError` naming what was awaited and the
last value seen, so a failure reads like the assertion it replaces::

    await wait_until(lambda: device.started, what="the device started")
    await wait_for_count(lambda: device.stats.kicks, 2, what="kicks")
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: Generous: a wait ends as soon as its condition holds, so only a failing test pays it.
TIMEOUT = 5.0
INTERVAL = 0.001


async def wait_value(probe: Callable[[], T], accept: Callable[[T], bool], *, timeout: float = TIMEOUT,
                     interval: float = INTERVAL, what: str = "condition") -> T:
    """Poll *probe* until *accept* holds for its value; return that value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = probe()
        if accept(value):
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last value: {value!r}")
        await asyncio.sleep(interval)


async def wait_until(predicate: Callable[[], object], *, timeout: float = TIMEOUT, interval: float = INTERVAL,
                     what: str = "condition") -> object:
    """Poll *predicate* until it returns a true value; return that value."""
    return await wait_value(predicate, bool, timeout=timeout, interval=interval, what=what)


async def wait_for_count(count: Callable[[], int], at_least: int, *, timeout: float = TIMEOUT,
                         interval: float = INTERVAL, what: str = "count") -> int:
    """Poll *count* until it reaches *at_least*; return the count seen."""
    return await wait_value(count, lambda n: n >= at_least, timeout=timeout, interval=interval,
                            what=f"{what} >= {at_least}")


async def wait_for_equal(probe: Callable[[], T], expected: T, *, timeout: float = TIMEOUT,
                         interval: float = INTERVAL, what: str = "value") -> T:
    """Poll *probe* until it equals *expected*."""
    return await wait_value(probe, lambda v: v == expected, timeout=timeout, interval=interval,
                            what=f"{what} == {expected!r}")


async def wait_eventfd(fd: int, *, timeout: float = TIMEOUT, interval: float = INTERVAL) -> int:
    """Wait until non-blocking eventfd *fd* is signalled; return (and consume) its count."""
    def read() -> int | None:
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return None

    value = await wait_value(read, lambda n: n is not None, timeout=timeout, interval=interval,
                             what=f"eventfd {fd} to be signalled")
    assert value is not None
    return value


def wait_until_sync(predicate: Callable[[], object], *, timeout: float = TIMEOUT, interval: float = 0.01,
                    what: str = "condition") -> object:
    """Blocking form of :func:`wait_until`, for code outside an event loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last value: {value!r}")
        time.sleep(interval)
