"""VhostUserBackend end to end against the real qemu-storage-daemon: a GET_ID request through a ring."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from shadowvmm.backends.base import Capability, RingState, VringAddr
from shadowvmm.config import DeviceConfig
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.machine import Machine
from shadowvmm.memory import GuestMemory
from shadowvmm.testing.peers import QsdBlk
from shadowvmm.testing.plugin import require_peer
from shadowvmm.virtio.constants import BLK_ID_BYTES, BlkRequestType, BlkStatus, Feature
from shadowvmm.workload import blk_write_verify
from shadowvmm_vhost_user import VhostUserBackend
from shadowvmm_vhost_user.connection import wait_fd

DESC = struct.Struct("<QIHH")
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[QsdBlk]:
    binary = require_peer("qemu-storage-daemon")
    with QsdBlk(tmp_path, size=64 << 20, num_queues=2, binary=binary) as peer:
        yield peer


async def wait_used(memory: GuestMemory, used: int, idx: int, call: int, timeout: float) -> None:
    """Wait for used->idx to reach *idx*, one call notification at a time.

    libvhost-user signals a call fd as soon as SET_VRING_CALL installs it, so a
    notification alone does not mean the request completed.
    """
    async with asyncio.timeout(timeout):
        while memory.load_u16(used + 2) != idx:
            await wait_fd(call)
            os.eventfd_read(call)


@pytest.mark.peer
async def test_get_id_through_a_ring(qsd: QsdBlk) -> None:
    backend = VhostUserBackend({"socket": str(qsd.socket_path), "device": "blk", "timeout": 5.0, "queues": 2})
    memory = GuestMemory.create([(0, 1 << 20), (1 << 30, 1 << 20)])
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        await backend.connect()
        assert Capability.CONFIG in backend.capabilities() and Capability.MQ in backend.capabilities()
        assert await backend.get_queue_num() == 2
        capacity = int.from_bytes(await backend.get_config(0, 8), "little")
        assert capacity == (64 << 20) // 512
        await backend.set_vring_call(0, call)
        await backend.set_vring_call(1, call)
        await backend.set_features(Feature.VERSION_1)
        await backend.set_mem_table(memory)
        base = 1 << 30
        desc, avail, used = base + 0x1000, base + 0x2000, base + 0x3000
        await backend.set_vring_num(0, 16)
        await backend.set_vring_base(0, 0)
        await backend.set_vring_addr(VringAddr(0, desc, avail, used))
        await backend.set_vring_kick(0, kick)
        await backend.set_vring_enable(0, True)
        await backend.set_vring_enable(1, True)

        header, data, status = 0x1000, 0x2000, 0x3000
        memory.write(header, struct.pack("<IIQ", BlkRequestType.GET_ID, 0, 0))
        memory.write(status, b"\xff")
        memory.write(desc, DESC.pack(header, 16, VIRTQ_DESC_F_NEXT, 1)
                     + DESC.pack(data, BLK_ID_BYTES, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2)
                     + DESC.pack(status, 1, VIRTQ_DESC_F_WRITE, 0))
        memory.store_u16(avail + 4, 0)
        memory.store_u16(avail + 2, 1)
        os.eventfd_write(kick, 1)
        await wait_used(memory, used, 1, call, 5.0)
        assert memory.read(status, 1)[0] == BlkStatus.OK
        assert memory.read(data, BLK_ID_BYTES).rstrip(b"\0") == b"vhost_user_blk"
        assert await backend.get_vring_base(0) == RingState(0, 1)
        await backend.reset()
    finally:
        await backend.close()
        for fd in (kick, call):
            os.close(fd)
        memory.close()


@pytest.mark.peer
async def test_device_layer_write_verify_across_stop(tmp_path: Path) -> None:
    """Guest driver -> device layer -> VhostUserBackend -> qsd (file image): data and ring state survive a stop."""
    binary = require_peer("qemu-storage-daemon")
    with QsdBlk(tmp_path, image=tmp_path / "disk.img", size=64 << 20, create=True, num_queues=2,
                binary=binary) as peer:
        machine = Machine(48 << 20)
        backend = VhostUserBackend({"socket": str(peer.socket_path), "device": "blk", "queues": 2})
        device = await machine.add_device(DeviceConfig("blk0", "vhost-user", {}, transport="pci"), backend)
        guest = machine.guest("blk0")
        try:
            driver = BlkDriver(guest)
            await driver.start()
            first = await blk_write_verify(driver, requests=200, queue_depth=8, block_bytes=4096, seed=1)
            states = await device.stop()
            assert [s.index for s in states] == [0, 1]
            assert sum(s.base for s in states) >= first.writes + first.reads
            await device.resume()
            second = await blk_write_verify(driver, requests=200, queue_depth=8, block_bytes=4096, seed=2)
            assert first.mismatches == [] and second.mismatches == []
            assert device.faults.total == 0
        finally:
            guest.close()
            await machine.close()
