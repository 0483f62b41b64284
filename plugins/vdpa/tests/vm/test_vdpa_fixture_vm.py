"""The ``vdpa_sim`` fixture (shadowvmm_vdpa.fixtures) inside the VM lane: a ready device on
vdpasim_blk, data written and read back through the whole stack."""

from __future__ import annotations

from shadowvmm.backends.base import Capability

VDPASIM_BLK_CAPACITY = 0x40000


async def test_vdpa_sim_blk_is_ready(vdpa_sim) -> None:
    rd = await vdpa_sim("blk")
    assert rd.device.rings_running and rd.device.failure is None
    assert rd.blk.config is not None and rd.blk.config.capacity == VDPASIM_BLK_CAPACITY
    assert Capability.SUSPEND in rd.device.backend.capabilities()
    pattern = bytes(range(256)) * 16
    await rd.blk.write(8, pattern)
    assert await rd.blk.read(8, len(pattern)) == pattern
