"""Shared test hooks.

- Every test gives back the fds and tasks it opened (:mod:`shadowvmm.testing.leaks`).
- ``ring_layout`` and ``transport`` run one test once per virtqueue layout (split, v1.4 §2.7;
  packed, §2.8) and once per transport (PCI, §4.1; MMIO, §4.2), instead of copies of it.
  When values differ per layout, parametrize them together with the layout:
  ``parametrize("ring_layout,size", by_layout(split=[...], packed=[...]), indirect=["ring_layout"])``
  (:func:`helpers.by_layout`).
"""

from __future__ import annotations

import pytest
from helpers import RING_LAYOUTS, TRANSPORTS

from shadowvmm.testing.leaks import no_fd_leak, no_task_leak

__all__ = ["no_fd_leak", "no_task_leak", "ring_layout", "transport"]


@pytest.fixture(params=RING_LAYOUTS)
def ring_layout(request: pytest.FixtureRequest) -> str:
    """The virtqueue layout under test: "split" or "packed"."""
    return str(request.param)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """The transport under test: "pci" or "mmio"."""
    return str(request.param)
