"""L1 moves its L2's device to another L0 device, L2 noticing nothing.

:func:`move_device` stops L1's device the transparent way (:meth:`VirtioDevice.stop`: the
backend's suspend, i.e. the stop path at L0, then the ring states), re-creates the device
on the new L0 device from those states (:meth:`L1Backend.switch_lower`) and resumes L1's
device. L2 reads DRIVER_OK throughout; every L2 request completes exactly once, on the old
device (before the stop) or on the new one (after it).

A fresh L0 device starts its rings at 0. Only a stop path that can set ring bases (ring-state
registers, the admin queue) re-creates rings past their start; with SUSPEND the move is
refused (:class:`~shadowvmm.errors.RefusedError`) and L1's device resumed on the old L0
device, so the refusal too is invisible to L2.
"""

from __future__ import annotations

import logging

from shadowvmm.device import VirtioDevice
from shadowvmm.errors import ArgumentError

from .backend import L1Backend
from .lower import Iommu, LowerDevice

log = logging.getLogger(__name__)


async def move_device(device: VirtioDevice, lower: LowerDevice, iommu: Iommu) -> None:
    """Move L1's *device* (its backend an :class:`L1Backend`) onto the L0 device *lower*,
    whose IOMMU is *iommu*. On any failure the device resumes on the old L0 device and the
    error is raised."""
    backend = device.backend
    if not isinstance(backend, L1Backend):
        raise ArgumentError(f"{device.name}: backend {backend.implementation!r} is not an L1 backend")
    old = backend.lower.name
    states = {state.index: state for state in await device.stop()}
    try:
        await backend.switch_lower(lower, iommu, states)
    finally:
        await device.resume()
    log.info("%s: moved from %s to %s with ring states %s", device.name, old, lower.name,
             {index: f"{state.base:#x}" for index, state in states.items()})
