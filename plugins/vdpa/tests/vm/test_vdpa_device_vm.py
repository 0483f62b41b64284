"""The full stack on the kernel's simulators: guest driver model -> transport ->
VirtioDevice -> VdpaBackend -> vhost-vdpa -> vdpa_sim, inside the VM lane.

Each test runs twice: with RESUME (the 6.12 path) and with the backend told
to drop RESUME and IOTLB_PERSIST, which is what Linux 6.1 offers and makes
the device layer fall back to reset + replay of ring bases on resume.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shadowvmm.backends.base import Capability
from shadowvmm.config import DeviceConfig
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.machine import Machine
from shadowvmm.virtio.constants import NetFeature
from shadowvmm_vdpa import VdpaBackend
from shadowvmm_vdpa.ioctl import BackendFeature

MAC = "02:5a:00:00:00:3b"
VDPASIM_BLK_CAPACITY = 0x40000
NET_HDR_V1 = 12
MODES = ["resume", "reset-replay"]


def backend_config(path: str, device: str, mode: str) -> dict[str, Any]:
    config: dict[str, Any] = {"path": path, "device": device}
    if mode == "reset-replay":
        config["backend_features"] = ~(BackendFeature.RESUME.mask | BackendFeature.IOTLB_PERSIST.mask)
    return config


def check_mode(backend: VdpaBackend, mode: str) -> None:
    has_resume = Capability.RESUME in backend.capabilities()
    if mode == "resume" and not has_resume:
        pytest.skip(f"kernel offers no RESUME: {backend.capability_notes()}")
    assert has_resume == (mode == "resume")


@pytest.mark.parametrize("mode", MODES)
async def test_blk_data_and_transparent_stop(vdpa_device, mode: str) -> None:
    async with vdpa_device("vblk7", "vdpasim_blk") as path:
        config = backend_config(path, "blk", mode)
        backend = VdpaBackend(config)
        machine = Machine(memory_bytes=2 << 20)
        try:
            device = await machine.add_device(DeviceConfig("blk0", "vdpa", config, queue_size=64), backend)
            check_mode(backend, mode)
            driver = BlkDriver(machine.guest("blk0"), max_request=4096, slots_per_queue=8)
            await driver.start(queue_size=64)
            assert driver.config.capacity == VDPASIM_BLK_CAPACITY
            pattern = bytes(range(256)) * 16
            await driver.write(24, pattern)
            assert await driver.read(24, len(pattern)) == pattern
            states = await device.stop()
            assert [(s.index, s.base) for s in states] == [(0, 2)]
            pending = asyncio.ensure_future(driver.read(24, len(pattern)))   # guest I/O while stopped
            await asyncio.sleep(0.2)
            assert not pending.done()
            await device.resume()
            assert await asyncio.wait_for(pending, 20) == pattern
        finally:
            await machine.close()


@pytest.mark.parametrize("mode", MODES)
async def test_net_loopback_and_transparent_stop(vdpa_device, mode: str) -> None:
    async with vdpa_device("vnet7", "vdpasim_net", mac=MAC) as path:
        config = backend_config(path, "net", mode)
        backend = VdpaBackend(config)
        machine = Machine(memory_bytes=2 << 20)
        try:
            device = await machine.add_device(DeviceConfig("net0", "vdpa", config, queue_size=64), backend)
            check_mode(backend, mode)
            guest = machine.guest("net0")
            await guest.initialize(NetFeature.MAC, queue_size=64, num_queues=2)   # RX, TX; no CVQ
            mac = bytes.fromhex(MAC.replace(":", ""))
            assert guest.read_config(0, 6) == mac
            rx, tx = guest.queues
            rx_buf, tx_buf = machine.allocator.alloc(2048), machine.allocator.alloc(2048)

            async def loopback(tag: int) -> None:
                frame = b"\xff" * 6 + mac + b"\x88\xb5" + bytes([tag]) * 46
                received = rx.add([], [(rx_buf, 2048)])
                rx.kick()
                machine.memory.write(tx_buf, bytes(NET_HDR_V1) + frame)
                assert await asyncio.wait_for(tx.request([(tx_buf, NET_HDR_V1 + len(frame))], []), 20) == 0
                assert await asyncio.wait_for(received, 20) == NET_HDR_V1 + len(frame)
                assert machine.memory.read(rx_buf + NET_HDR_V1, len(frame)) == frame

            await loopback(1)
            states = await device.stop()
            assert [(s.index, s.base) for s in states] == [(0, 1), (1, 1)]
            await device.resume()
            await loopback(2)
        finally:
            await machine.close()
