"""Helpers shared by the core test suite: bounded waits (from :mod:`shadowvmm.testing.waits`),
guest-fault accounting and eventfd probes."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

import pytest

from shadowvmm.testing.waits import (
    wait_eventfd,
    wait_for_count,
    wait_for_equal,
    wait_until,
    wait_until_sync,
    wait_value,
)

if TYPE_CHECKING:
    from shadowvmm.device import VirtioDevice
    from shadowvmm.shadow import GuestFault

__all__ = [
    "RING_LAYOUTS", "TRANSPORTS", "by_layout", "faults", "no_faults", "signalled", "wait_eventfd", "wait_fd",
    "wait_for_count", "wait_for_equal", "wait_until", "wait_until_sync", "wait_value",
]

#: The values of the ``ring_layout`` and ``transport`` fixtures (tests/conftest.py).
RING_LAYOUTS = ("split", "packed")
TRANSPORTS = ("pci", "mmio")


def by_layout(**values: list[object]) -> list[object]:
    """``(layout, value)`` parameters for ``parametrize("ring_layout,<name>", ...,
    indirect=["ring_layout"])`` when the values differ per layout (a split ring's size is a
    power of 2, a packed ring's need not be)."""
    return [pytest.param(layout, value, id=f"{layout}-{value}")
            for layout in RING_LAYOUTS for value in values[layout]]


@contextmanager
def faults(dev: VirtioDevice, expected: dict[GuestFault, int]) -> Iterator[None]:
    """The block must count exactly *expected* guest faults (and nothing else) and not raise."""
    before = Counter(dev.faults.counts)
    yield
    delta = Counter(dev.faults.counts)
    delta.subtract(before)
    assert {k: v for k, v in delta.items() if v} == expected


def no_faults(dev: VirtioDevice) -> AbstractContextManager[None]:
    """The block must count no guest fault."""
    return faults(dev, {})


async def wait_fd(fd: int, timeout: float = 2.0) -> int:
    """Wait until eventfd *fd* is signalled; returns (and consumes) its count."""
    return await wait_eventfd(fd, timeout=timeout)


def signalled(fd: int) -> bool:
    """Consume eventfd *fd* if it is signalled; whether it was."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        return False
    return True
