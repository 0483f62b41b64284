"""vDPA against the kernel's simulators (vdpa_sim_net, vdpa_sim_blk), inside the VM lane.

Python runs ~20x slower under TCG: each test does a handful of netlink
requests and ioctls, nothing more.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct

import pytest

from shadowvmm.backends.base import Capability, VringAddr
from shadowvmm.errors import ConfigError, UnsupportedError
from shadowvmm.memory import GuestAllocator, GuestMemory
from shadowvmm.virtio.constants import DeviceId, Feature, NetFeature, Status
from shadowvmm.virtio.split import SplitDriverQueue, SplitLayout
from shadowvmm_vdpa import VdpaBackend, VdpaNetlink, VdpaNetlinkError
from shadowvmm_vdpa.ioctl import BackendFeature
from shadowvmm_vdpa.netlink import Attr21

MAC = "02:5a:00:00:00:2a"
MTU = 1400
VDPASIM_BLK_CAPACITY = 0x40000          # drivers/vdpa/vdpa_sim/vdpa_sim_blk.c
NET_HDR_V1 = 12                         # struct virtio_net_hdr_v1
QSIZE = 16
RX, TX = 0, 1


async def test_mgmtdevs_listed(nl: VdpaNetlink) -> None:
    devs = {m.handle: m for m in await nl.mgmtdevs()}
    assert devs["vdpasim_net"].supported_classes & 1 << DeviceId.NET
    assert devs["vdpasim_blk"].supported_classes & 1 << DeviceId.BLOCK


async def test_net_device_lifecycle_and_errors(nl: VdpaNetlink, vdpa_device) -> None:
    async with vdpa_device("vnet0", "vdpasim_net", mac=MAC, mtu=MTU):
        (dev,) = [d for d in await nl.devices() if d.name == "vnet0"]
        assert (dev.device_id, dev.mgmtdev, dev.max_vqs) == (DeviceId.NET, "vdpasim_net", 3)
        assert await nl.device("vnet0") == dev
        config = await nl.config("vnet0")
        # max_vqp is only reported with VIRTIO_NET_F_MQ; vdpasim_net has one fixed pair
        assert (config.mac, config.mtu, config.max_vq_pairs) == (MAC, MTU, None)
        assert config.device_features & Feature.VERSION_1
        with pytest.raises(VdpaNetlinkError) as dup:
            await nl.add_device("vnet0", "vdpasim_net")
        assert dup.value.errno == errno.EEXIST
        with pytest.raises(VdpaNetlinkError) as vqp:
            await nl.add_device("vnet1", "vdpasim_net", max_vq_pairs=2)
        assert vqp.value.errno == errno.EOPNOTSUPP     # vdpasim_net has one fixed queue pair
        assert "not supported" in vqp.value.message    # the kernel's extack text
    with pytest.raises(VdpaNetlinkError) as gone:
        await nl.device("vnet0")
    assert gone.value.errno == errno.ENODEV
    with pytest.raises(VdpaNetlinkError) as unknown:
        await nl.add_device("vnet2", "vdpasim_nope")
    assert unknown.value.errno == errno.ENODEV
    assert "management device" in unknown.value.message


async def test_blk_device_config(nl: VdpaNetlink, vdpa_device) -> None:
    async with vdpa_device("vblk0", "vdpasim_blk"):
        assert (await nl.device("vblk0")).device_id == DeviceId.BLOCK
        if nl.attr21 is Attr21.DEVICE_FEATURES:
            # Linux 6.1 layout: DEV_CONFIG_GET only knows net devices
            with pytest.raises(VdpaNetlinkError) as info:
                await nl.config("vblk0")
            assert info.value.errno == errno.EOPNOTSUPP
            return
        config = await nl.config("vblk0")
        assert config.device_id == DeviceId.BLOCK
        assert config.blk_capacity == VDPASIM_BLK_CAPACITY
        assert config.device_features & Feature.VERSION_1


async def test_net_raw_ops(vdpa_device) -> None:
    async with vdpa_device("vnet3", "vdpasim_net", mac=MAC, mtu=MTU) as path:
        with pytest.raises(ConfigError):
            await VdpaBackend({"path": path, "device": "blk"}).connect()
        backend = VdpaBackend({"path": path, "device": "net"})
        await backend.connect()
        try:
            assert backend.device_id == DeviceId.NET
            assert backend.backend_features & BackendFeature.IOTLB_MSG_V2.mask
            assert Capability.SUSPEND in backend.capabilities()
            has_resume = bool(backend.offered_backend_features & BackendFeature.RESUME.mask)
            assert (Capability.RESUME in backend.capabilities()) == has_resume
            features = await backend.get_features()
            assert features & (Feature.VERSION_1 | Feature.ACCESS_PLATFORM | NetFeature.MAC | NetFeature.MTU) \
                == Feature.VERSION_1 | Feature.ACCESS_PLATFORM | NetFeature.MAC | NetFeature.MTU
            assert await backend.get_queue_num() == 3
            assert backend.config_size() >= 12
            config = await backend.get_config(0, 12)
            assert config[:6] == bytes.fromhex(MAC.replace(":", ""))
            assert struct.unpack_from("<H", config, 10)[0] == MTU
            assert backend.vring_num_max >= QSIZE
            assert backend.iova_range.last > backend.iova_range.first
            assert (backend.group_num(), backend.as_num()) == (2, 2)
            assert [backend.get_vring_group(i) for i in range(3)] == [0, 0, 1]   # CVQ in its own group
            assert await backend.get_status() == 0
            await backend.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
            assert await backend.get_status() == Status.ACKNOWLEDGE | Status.DRIVER
            await backend.reset()
            assert await backend.get_status() == 0
        finally:
            await backend.close()


class NetRig:
    """RX and TX split rings in memfd guest memory, driven through a VdpaBackend."""

    def __init__(self, backend: VdpaBackend) -> None:
        self.backend = backend
        self.memory = GuestMemory.create([(0, 1 << 20)], name="vdpa-net")
        alloc = GuestAllocator(self.memory, start=0x1000)
        self.queues = []
        for _ in (RX, TX):
            d, a, u = SplitLayout.area_sizes(QSIZE)
            layout = SplitLayout(QSIZE, alloc.alloc(d, 16), alloc.alloc(a, 2), alloc.alloc(u, 4))
            self.queues.append(SplitDriverQueue(self.memory, layout))
        self.kicks = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in self.queues]
        self.calls = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in self.queues]
        self.rx_buf = alloc.alloc(2048)
        self.tx_buf = alloc.alloc(2048)
        self.features = 0

    async def start(self, bases: tuple[int, int] = (0, 0)) -> None:
        """The QEMU order: status, features, memory, rings, DRIVER_OK."""
        b = self.backend
        await b.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        self.features = await b.get_features() & (Feature.VERSION_1 | Feature.ACCESS_PLATFORM | NetFeature.MAC)
        await b.set_features(self.features)
        await b.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        await b.set_mem_table(self.memory)
        for index, queue in enumerate(self.queues):
            layout = queue.layout
            await b.set_vring_num(index, QSIZE)
            await b.set_vring_base(index, bases[index])
            await b.set_vring_addr(VringAddr(index, layout.desc, layout.avail, layout.used))
            await b.set_vring_kick(index, self.kicks[index])
            await b.set_vring_call(index, self.calls[index])
            await b.set_vring_enable(index, True)
        await b.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
        assert await b.get_status() == 0xF

    async def loopback(self, tag: int) -> bytes:
        """Offer an RX buffer, send one broadcast frame on TX, wait for it on RX."""
        rx, tx = self.queues
        rx.add([], [(self.rx_buf, 2048)], "rx")
        rx.publish()
        frame = b"\xff" * 6 + bytes.fromhex(MAC.replace(":", "")) + b"\x88\xb5" + bytes([tag]) * 46
        self.memory.write(self.tx_buf, bytes(NET_HDR_V1) + frame)
        tx.add([(self.tx_buf, NET_HDR_V1 + len(frame))], [], "tx")
        tx.publish()
        os.eventfd_write(self.kicks[TX], 1)
        for _ in range(1000):
            used = rx.get_used()
            if used:
                break
            await asyncio.sleep(0.005)
        else:
            pytest.fail("no frame came back on RX")
        assert used == [("rx", NET_HDR_V1 + len(frame))]
        assert os.eventfd_read(self.calls[RX]) >= 1
        assert tx.get_used() == [("tx", 0)]
        return self.memory.read(self.rx_buf + NET_HDR_V1, len(frame))

    def close(self) -> None:
        for fd in self.kicks + self.calls:
            os.close(fd)
        self.memory.close()


@pytest.mark.parametrize("mode", ["resume", "reset-replay"])
async def test_net_datapath_suspend_and_restart(vdpa_device, mode: str) -> None:
    """TX->RX loopback, SUSPEND, ring bases, then RESUME or (6.1 style) reset + replay."""
    async with vdpa_device("vnet4", "vdpasim_net", mac=MAC) as path:
        config = {"path": path, "device": "net"}
        if mode == "reset-replay":
            # what Linux 6.1 offers: SUSPEND without RESUME or IOTLB_PERSIST
            config["backend_features"] = ~(BackendFeature.RESUME.mask | BackendFeature.IOTLB_PERSIST.mask)
        backend = VdpaBackend(config)
        await backend.connect()
        rig = NetRig(backend)
        try:
            if mode == "resume" and not backend.offered_backend_features & BackendFeature.RESUME.mask:
                pytest.skip(f"kernel offers no RESUME: {backend.capability_notes()}")
            await rig.start()
            assert (await rig.loopback(1))[14] == 1
            await backend.suspend()
            bases = [(await backend.get_vring_base(i)).base for i in (RX, TX)]
            assert bases == [1, 1]
            if mode == "resume":
                assert Capability.RESUME in backend.capabilities()
                assert not backend.capabilities() & Capability.RING_RESTART
                await backend.resume()
            else:
                assert not backend.capabilities() & (Capability.RESUME | Capability.RING_RESTART)
                assert "reset" in backend.capability_notes()
                with pytest.raises(UnsupportedError):
                    await backend.resume()
                await backend.reset()
                await rig.start(bases=(bases[RX], bases[TX]))
            assert (await rig.loopback(2))[14] == 2
            await backend.suspend()
            assert [(await backend.get_vring_base(i)).base for i in (RX, TX)] == [2, 2]
        finally:
            await backend.close()
            rig.close()


async def test_blk_raw_ops(vdpa_device) -> None:
    async with vdpa_device("vblk1", "vdpasim_blk") as path:
        backend = VdpaBackend({"path": path, "device": "blk"})
        await backend.connect()
        memory = GuestMemory.create([(0, 1 << 16)], name="vdpa-blk")
        kick, call = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(2))
        try:
            assert backend.device_id == DeviceId.BLOCK
            assert await backend.get_queue_num() == 1
            capacity = struct.unpack("<Q", await backend.get_config(0, 8))[0]
            assert capacity == VDPASIM_BLK_CAPACITY
            await backend.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
            await backend.set_features(await backend.get_features() & (Feature.VERSION_1 | Feature.ACCESS_PLATFORM))
            await backend.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
            await backend.set_mem_table(memory)
            d, a, u = SplitLayout.area_sizes(QSIZE)
            await backend.set_vring_num(0, QSIZE)
            await backend.set_vring_base(0, 0)
            await backend.set_vring_addr(VringAddr(0, 0x1000, 0x1000 + d, 0x2000))
            await backend.set_vring_kick(0, kick)
            await backend.set_vring_call(0, call)
            await backend.set_vring_enable(0, True)
            await backend.set_status(0xF)
            await backend.suspend()
            assert (await backend.get_vring_base(0)).base == 0
            if Capability.RESUME in backend.capabilities():
                await backend.resume()
            await backend.reset()
            assert await backend.get_status() == 0
        finally:
            await backend.close()
            memory.close()
            os.close(kick)
            os.close(call)
