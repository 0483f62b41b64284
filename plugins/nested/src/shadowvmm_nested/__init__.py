"""shadowvmm-nested: the backend of an L1 hypervisor's device is a virtio device of the layer
below, driven through that device's transport (as Linux vp_vdpa in an L1). See
:mod:`shadowvmm_nested.backend` and docs/nested.md."""

from __future__ import annotations

from .adminpath import AdminPath
from .backend import L1Backend, Phase, iommu_table
from .l0migrate import L1Stack, build_l1, follow, migrate_l0, switch_over
from .lower import Iommu, LowerDevice
from .move import move_device
from .ringstate import RingStatePath
from .stoppath import (
    Derived,
    QueuePlan,
    StartPlan,
    StopPath,
    SuspendPath,
    fresh_base,
    packed_state,
    register_start,
    split_state,
)

__all__ = [
    "AdminPath", "Derived", "Iommu", "L1Backend", "L1Stack", "LowerDevice", "Phase", "QueuePlan",
    "RingStatePath", "StartPlan", "StopPath", "SuspendPath", "build_l1", "follow", "fresh_base", "iommu_table",
    "migrate_l0", "move_device", "packed_state", "register_start", "split_state", "switch_over",
]
