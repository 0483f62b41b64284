"""The ``vdpa_sim`` fixture (shadowvmm_vdpa.fixtures) inside the VM lane: ready devices on
vdpasim_blk (data written and read back) and vdpasim_net (a frame looped back)."""

from __future__ import annotations

from shadowvmm.backends.base import Capability
from shadowvmm_vdpa.fixtures import SIM_MAC

VDPASIM_BLK_CAPACITY = 0x40000


async def test_vdpa_sim_blk_is_ready(vdpa_sim) -> None:
    rd = await vdpa_sim("blk")
    assert rd.device.rings_running and rd.device.failure is None
    assert rd.blk.config is not None and rd.blk.config.capacity == VDPASIM_BLK_CAPACITY
    assert Capability.SUSPEND in rd.device.backend.capabilities()
    pattern = bytes(range(256)) * 16
    await rd.blk.write(8, pattern)
    assert await rd.blk.read(8, len(pattern)) == pattern


async def test_vdpa_sim_net_loops_frames_back(vdpa_sim) -> None:
    rd = await vdpa_sim("net")
    mac = rd.net.config.mac
    assert mac == bytes.fromhex(SIM_MAC.replace(":", ""))
    frame = b"\xff" * 6 + mac + b"\x88\xb5" + bytes(range(50))
    assert await rd.net.send([frame]) == 1
    assert await rd.net.receive(1, timeout=20.0) == [frame]
