"""Lifecycle orders on the kernel's simulators, inside the VM lane (lifecycle issue).

Seed scenario 2.2 followed by the reset the 2021 STOP dialect requires: the guest stops its
virtio-blk device, the VMM migrates the stopped device to a second vdpa_sim_blk (the
destination never starts it), and there the guest resets and initialises again. The
destination must start fresh rings, not the migrated bases nor anything staged: vdpa_sim
reports "used unknown descriptor" to the guest otherwise. Also reset + immediate re-init.
Each runs with RESUME (6.12) and with the reset-and-replay fallback (what 6.1 offers).
"""

from __future__ import annotations

import asyncio

import pytest
from test_vdpa_device_vm import MODES, backend_config, check_mode

from shadowvmm.config import DeviceConfig
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.machine import Machine
from shadowvmm.migration.harness import machine_sharing, move_guest
from shadowvmm.shadow import StopDialect
from shadowvmm.virtio.constants import Status
from shadowvmm_vdpa import VdpaBackend

LIVE = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
BLOCK = bytes(range(256)) * 16


async def until(predicate, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


@pytest.mark.parametrize("mode", MODES)
async def test_scenario_2_2_then_reset_on_the_destination(vdpa_device, mode: str) -> None:
    async with vdpa_device("vlca", "vdpasim_blk") as path_a, vdpa_device("vlcb", "vdpasim_blk") as path_b:
        cfg_a, cfg_b = backend_config(path_a, "blk", mode), backend_config(path_b, "blk", mode)
        source = Machine(memory_bytes=4 << 20)
        dest = machine_sharing(source.memory)
        dev_cfg = DeviceConfig("blk0", "vdpa", {}, queue_size=64, stop_dialect=StopDialect.STOP)
        try:
            backend_a = VdpaBackend(cfg_a)
            src_dev = await source.add_device(dev_cfg, backend_a)
            check_mode(backend_a, mode)
            dst_dev = await dest.add_device(dev_cfg, VdpaBackend(cfg_b))
            guest = source.guest("blk0")
            driver = BlkDriver(guest, max_request=4096, slots_per_queue=8)
            stop_bit = src_dev.policy.dialect.feature
            await driver.start(queue_size=64, extra_features=stop_bit)
            for sector in range(0, 64, 8):
                await driver.write(sector, BLOCK)
            guest.transport.set_status(guest.status() | Status.STOP)
            await until(lambda: guest.status() & Status.STOP)
            states = await src_dev.stop()
            assert [s.base for s in states] == [8]                        # 8 writes on the one queue
            state = await src_dev.export_state(source.slots["blk0"].transport)
            preview = src_dev.start_preview()
            if preview is not None:
                await dst_dev.prestage(preview)
            await dst_dev.import_state(state, dest.slots["blk0"].transport)
            move_guest(guest, src_dev, dst_dev, dest.slots["blk0"].transport)
            assert guest.status() & Status.STOP and not dst_dev.started
            await asyncio.wait_for(driver.start(queue_size=32), 20)       # reset, fresh rings elsewhere
            assert guest.status() == LIVE
            for sector in range(0, 64, 8):                                 # vdpa_sim_blk B's own disk
                await asyncio.wait_for(driver.write(sector, BLOCK), 20)
                assert await asyncio.wait_for(driver.read(sector, len(BLOCK)), 20) == BLOCK
            assert not guest.violations and dst_dev.faults.total == 0
            guest.close()
        finally:
            await dest.close()
            await source.close()


@pytest.mark.parametrize("mode", MODES)
async def test_reset_and_immediate_reinit(vdpa_device, mode: str) -> None:
    async with vdpa_device("vlcc", "vdpasim_blk") as path:
        config = backend_config(path, "blk", mode)
        machine = Machine(memory_bytes=4 << 20)
        try:
            backend = VdpaBackend(config)
            await machine.add_device(DeviceConfig("blk0", "vdpa", config, queue_size=64), backend)
            check_mode(backend, mode)
            guest = machine.guest("blk0")
            guest._settle = None            # a guest does not wait for the VMM's backend start
            driver = BlkDriver(guest, max_request=4096, slots_per_queue=8)
            for round_ in range(20):
                await asyncio.wait_for(driver.start(queue_size=64), 20)
                data = bytes([round_]) * 4096
                await asyncio.wait_for(driver.write(round_ * 8, data), 20)
                assert await asyncio.wait_for(driver.read(round_ * 8, 4096), 20) == data
            assert not guest.violations
        finally:
            await machine.close()
