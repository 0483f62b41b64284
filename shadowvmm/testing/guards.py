"""Helpers for tests that drive real peers through the device layer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..device import VirtioDevice
from ..shadow import RunState


async def guarded(device: VirtioDevice, log_tail: Callable[[], str], *coros: Awaitable[object]) -> None:
    """Run *coros* concurrently; fail at once (not at the timeout) if the backend fails."""
    async def watchdog() -> None:
        while device.run_state is not RunState.FAILED:
            await asyncio.sleep(0.01)
        raise AssertionError(f"{device.name}: backend failed; peer log:\n{log_tail()}")

    async with asyncio.TaskGroup() as group:
        dog = group.create_task(watchdog())
        try:
            await asyncio.gather(*(group.create_task(c) for c in coros))  # type: ignore[arg-type]
        finally:
            dog.cancel()
