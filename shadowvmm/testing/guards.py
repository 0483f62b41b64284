"""Helpers for tests that drive real peers through the device layer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..device import VirtioDevice
from ..errors import DeviceFailedError
from ..lifecycle import unless_failed


async def guarded(device: VirtioDevice, log_tail: Callable[[], str], *coros: Awaitable[object]) -> None:
    """Run *coros* concurrently; fail at once (not at the timeout) if the device fails,
    with the peer's log tail in the message."""
    async def together() -> None:
        async with asyncio.TaskGroup() as group:
            for coro in coros:
                group.create_task(coro)  # type: ignore[arg-type]

    try:
        await unless_failed(device, together())
    except DeviceFailedError as exc:
        raise AssertionError(f"{device.name}: backend failed ({exc.__cause__}); peer log:\n{log_tail()}") from exc
