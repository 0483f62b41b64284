"""Leak checks for test suites: every test gives back the fds and tasks it opened.

Use them as autouse fixtures from a ``conftest.py``::

    from shadowvmm.testing.leaks import no_fd_leak, no_task_leak  # noqa: F401

The fd check runs after the test's own fixtures are torn down (it is set up
first, so it is torn down last). A realize, connect or start that fails must
release its fds, readers and tasks as well as one that succeeds. A test marked
``leaks_fds`` is exempt from both.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Iterator

import pytest

from .fds import open_fds

__all__ = ["no_fd_leak", "no_task_leak", "open_fds"]


@pytest.fixture(autouse=True)
def no_fd_leak(request: pytest.FixtureRequest) -> Iterator[None]:
    gc.collect()
    before = open_fds()
    yield
    gc.collect()
    leaked = {fd: target for fd, target in open_fds().items() if fd not in before or before[fd] != target}
    if leaked and not request.node.get_closest_marker("leaks_fds"):
        pytest.fail(f"the test left {len(leaked)} fds open: {sorted(leaked.items())[:8]}", pytrace=False)


@pytest.fixture(autouse=True)
async def no_task_leak(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Every task a test started is finished once its fixtures are torn down (this fixture is
    torn down after them): device workers, reconnect attempts, ring ledgers, peers' readers."""
    yield
    current = asyncio.current_task()
    await asyncio.sleep(0)
    left = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
    if left and not request.node.get_closest_marker("leaks_fds"):
        pytest.fail(f"the test left {len(left)} tasks running: "
                    f"{sorted(task.get_name() + ':' + _coro_name(task) for task in left)[:6]}",
                    pytrace=False)


def _coro_name(task: asyncio.Task[object]) -> str:
    return str(getattr(task.get_coro(), "__qualname__", task.get_coro()))
