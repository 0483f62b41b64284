"""Shared test hooks: every test must give back the file descriptors it opened.

The check runs after the test's own fixtures are torn down (this fixture is set up first, so
it is torn down last). A realize, connect or start that fails must release its fds, readers
and tasks as well as one that succeeds; a test that leaks fails here, naming the fds.
"""

from __future__ import annotations

import asyncio
import gc
import os

import pytest


def _fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
    return fds


@pytest.fixture(autouse=True)
def no_fd_leak(request: pytest.FixtureRequest):
    gc.collect()
    before = _fds()
    yield
    gc.collect()
    leaked = {fd: target for fd, target in _fds().items() if fd not in before or before[fd] != target}
    if leaked and not request.node.get_closest_marker("leaks_fds"):
        pytest.fail(f"the test left {len(leaked)} fds open: {sorted(leaked.items())[:8]}", pytrace=False)


@pytest.fixture(autouse=True)
async def no_task_leak(request: pytest.FixtureRequest):
    """Every task a test started is finished once its fixtures are torn down (this fixture is
    torn down after them): device workers, reconnect attempts, ring ledgers, peers' readers."""
    yield
    current = asyncio.current_task()
    await asyncio.sleep(0)
    left = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
    if left and not request.node.get_closest_marker("leaks_fds"):
        pytest.fail(f"the test left {len(left)} tasks running: "
                    f"{sorted(task.get_name() + ':' + task.get_coro().__qualname__ for task in left)[:6]}",
                    pytrace=False)
