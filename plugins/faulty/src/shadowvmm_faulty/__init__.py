"""shadowvmm-faulty: an example third-party backend plugin that wraps any backend and injects
faults (control-plane latency, a failure at the Nth call of an operation, virtio-blk I/O errors
every N requests, hidden capabilities). See :mod:`shadowvmm_faulty.backend`."""

from __future__ import annotations

from .backend import ASYNC_OPS, ERRORS, OPTIONS, FaultyBackend
from .ioerrors import IoErrorInjector

__all__ = ["ASYNC_OPS", "ERRORS", "OPTIONS", "FaultyBackend", "IoErrorInjector"]
