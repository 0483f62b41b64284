"""Moved to :mod:`shadowvmm.device.vmmqueue`; this path stays importable."""

from __future__ import annotations

from .device.vmmqueue import (
    VMM_REQUEST_MAX,
    ControlHost,
    DeviceHost,
    NetControl,
    QueueHandler,
    QueueHost,
    RingRegs,
    VmmQueue,
    vmm_queue_handlers,
)

__all__ = ["VMM_REQUEST_MAX", "ControlHost", "DeviceHost", "NetControl", "QueueHandler", "QueueHost", "RingRegs",
           "VmmQueue", "vmm_queue_handlers"]
