"""virtio-mmio v2 transport: its registers, interrupts, bad accesses, and an end-to-end
virtio-rng read through MMIO (virtio v1.4 §4.2.2). What PCI and MMIO share (feature words,
FEATURES_OK, the status sequence, config generation and device config) is in
test_transport_common.py."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

import pytest
from helpers import faults, no_faults, signalled, wait_fd

from shadowvmm.config import DeviceConfig
from shadowvmm.device import VirtioDevice
from shadowvmm.guest.driver import GuestDevice
from shadowvmm.guest.rng import RngDriver
from shadowvmm.guest.transport import MmioGuestTransport
from shadowvmm.machine import Machine
from shadowvmm.shadow import GuestFault
from shadowvmm.transport.mmio import MmioTransport
from shadowvmm.virtio.constants import ISR_CONFIG, ISR_QUEUE, Feature, Status

# register offsets (v1.4 §4.2.2, Linux uapi virtio_mmio.h)
MAGIC, VERSION, DEVICE_ID, VENDOR_ID = 0x000, 0x004, 0x008, 0x00C
DEV_FEATURES, DEV_FEATURES_SEL, DRV_FEATURES, DRV_FEATURES_SEL = 0x010, 0x014, 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY, QUEUE_NOTIFY = 0x030, 0x034, 0x038, 0x044, 0x050
INT_STATUS, INT_ACK, STATUS = 0x060, 0x064, 0x070
DESC_LO, DESC_HI, DRIVER_LO, DRIVER_HI, DEVICE_LO, DEVICE_HI = 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4
SHM_SEL, SHM_LEN_LO, SHM_LEN_HI, SHM_BASE_LO, SHM_BASE_HI = 0x0AC, 0x0B0, 0x0B4, 0x0B8, 0x0BC
QUEUE_RESET, CONFIG_GEN, CONFIG = 0x0C0, 0x0FC, 0x100

NUM_QUEUES = 2
QUEUE_MAX = 256
DISK_BYTES = 1 << 20
ADS = Status.ACKNOWLEDGE | Status.DRIVER


@dataclass
class Rig:
    m: Machine
    dev: VirtioDevice
    t: MmioTransport
    name: str
    guests: list[GuestDevice] = field(default_factory=list)

    def r(self, off: int, width: int = 4) -> int:
        return self.t.read(off, width)

    def w(self, off: int, value: int, width: int = 4) -> None:
        self.t.write(off, width, value)

    def guest(self) -> GuestDevice:
        g = self.m.guest(self.name)
        self.guests.append(g)
        return g

    def negotiate(self, features: int) -> None:
        self.w(STATUS, Status.ACKNOWLEDGE)
        self.w(STATUS, ADS)
        for word in range(2):
            self.w(DRV_FEATURES_SEL, word)
            self.w(DRV_FEATURES, features >> (32 * word) & 0xFFFFFFFF)
        self.w(STATUS, ADS | Status.FEATURES_OK)

    def program_queue(self, index: int, size: int, base: int) -> None:
        """Program queue *index* with rings at *base* (desc), +0x1000 (driver), +0x2000 (device)."""
        self.w(QUEUE_SEL, index)
        self.w(QUEUE_NUM, size)
        for lo, hi, addr in ((DESC_LO, DESC_HI, base), (DRIVER_LO, DRIVER_HI, base + 0x1000),
                             (DEVICE_LO, DEVICE_HI, base + 0x2000)):
            self.w(lo, addr & 0xFFFFFFFF)
            self.w(hi, addr >> 32)


async def make_rig(device: str = "blk") -> Rig:
    m = Machine(16 << 20)
    options = ({"device": "blk", "queues": NUM_QUEUES, "size": DISK_BYTES} if device == "blk"
               else {"device": device})
    name = f"{device}0"
    dev = await m.add_device(DeviceConfig(name, "inproc", options, transport="mmio",
                                          queue_size=QUEUE_MAX if device == "blk" else 64))
    t = m.slots[name].transport
    assert isinstance(t, MmioTransport)
    return Rig(m, dev, t, name)


async def close_rig(r: Rig) -> None:
    for g in r.guests:
        g.close()
    await r.m.close()


@pytest.fixture
async def rig():
    r = await make_rig("blk")
    yield r
    await close_rig(r)


@pytest.fixture
async def rng():
    r = await make_rig("rng")
    yield r
    await close_rig(r)


# ---------------------------------------------------------------------------- identification


async def test_identification_registers(rig, rng):
    with no_faults(rig.dev):
        assert rig.r(MAGIC) == 0x74726976
        assert rig.r(MAGIC).to_bytes(4, "little") == b"virt"
        assert rig.r(VERSION) == 2
        assert rig.r(DEVICE_ID) == 2
        assert rig.r(VENDOR_ID) == 0x554D4551
    assert rng.r(DEVICE_ID) == 4
    assert rig.dev.interrupts.msix_enabled is False       # MMIO has no MSI-X


# ---------------------------------------------------------------------------- queues


async def test_queue_sel_and_size_max(rig):
    with no_faults(rig.dev):
        for q in range(NUM_QUEUES):
            rig.w(QUEUE_SEL, q)
            assert rig.r(QUEUE_NUM_MAX) == QUEUE_MAX
            assert rig.r(QUEUE_READY) == 0
        rig.w(QUEUE_SEL, NUM_QUEUES)                        # no such queue: max 0, not ready
        assert rig.r(QUEUE_NUM_MAX) == 0
        assert rig.r(QUEUE_READY) == 0
        assert rig.r(QUEUE_RESET) == 0
    assert MmioGuestTransport(rig.t).num_queues() == NUM_QUEUES


async def test_queue_size(rig):
    rig.w(QUEUE_SEL, 1)
    with no_faults(rig.dev):
        rig.w(QUEUE_NUM, 32)
    assert rig.dev.queues[1].size == 32 and rig.dev.queues[0].size == QUEUE_MAX
    with faults(rig.dev, {GuestFault.QUEUE_SIZE: 3}):
        rig.w(QUEUE_NUM, 48)
        rig.w(QUEUE_NUM, 0)
        rig.w(QUEUE_NUM, 2 * QUEUE_MAX)
    assert rig.dev.queues[1].size == 32
    assert rig.r(QUEUE_NUM_MAX) == QUEUE_MAX                # max is unaffected


async def test_queue_addresses_and_ready(rig):
    rig.negotiate(int(Feature.VERSION_1))
    with no_faults(rig.dev):
        rig.program_queue(1, 16, 0x1_0000)
        rig.w(DESC_HI, 0)                                   # independent halves
    q = rig.dev.queues[1]
    assert (q.size, q.desc, q.driver, q.device) == (16, 0x10000, 0x11000, 0x12000)
    rig.w(DRIVER_HI, 0x1)
    assert q.driver == 0x1_0001_1000 and q.desc == 0x10000
    rig.w(DRIVER_HI, 0)
    with no_faults(rig.dev):
        rig.w(QUEUE_READY, 1)
        assert rig.r(QUEUE_READY) == 1
    assert q.enabled and not rig.dev.queues[0].enabled
    rig.w(QUEUE_SEL, 0)
    assert rig.r(QUEUE_READY) == 0
    rig.w(QUEUE_SEL, 1)
    with faults(rig.dev, {GuestFault.QUEUE_LIVE: 2}):       # fields frozen while ready
        rig.w(QUEUE_NUM, 32)
        rig.w(DESC_LO, 0x2_0000)
    assert (q.size, q.desc) == (16, 0x10000)


async def test_queue_ready_refused_for_bad_ring(rig):
    rig.negotiate(int(Feature.VERSION_1))
    rig.program_queue(0, 16, 0x1_0008)                      # descriptor table not 16-aligned
    with faults(rig.dev, {GuestFault.QUEUE_SIZE: 1}):
        rig.w(QUEUE_READY, 1)
    assert rig.r(QUEUE_READY) == 0


async def test_queue_sel_out_of_range_writes_ignored(rig):
    rig.w(QUEUE_SEL, 7)
    with faults(rig.dev, {GuestFault.QUEUE_SELECT: 5}):
        rig.w(QUEUE_NUM, 16)
        rig.w(DESC_LO, 0x1000)
        rig.w(DRIVER_HI, 1)
        rig.w(DEVICE_LO, 0x3000)
        rig.w(QUEUE_READY, 1)
    assert all((q.size, q.desc, q.driver, q.device, q.enabled) == (QUEUE_MAX, 0, 0, 0, False)
               for q in rig.dev.queues)


async def test_queue_notify(rig):
    rig.negotiate(int(Feature.VERSION_1))
    rig.program_queue(0, 16, 0x1_0000)
    with faults(rig.dev, {GuestFault.NOTIFY_INVALID: 2}):
        rig.w(QUEUE_NOTIFY, 0)                              # not ready yet
        rig.w(QUEUE_NOTIFY, NUM_QUEUES)                     # no such queue
    assert rig.dev.stats.kicks == 0
    rig.w(QUEUE_READY, 1)
    with no_faults(rig.dev):
        rig.w(QUEUE_NOTIFY, 0)
        rig.w(QUEUE_NOTIFY, 0x8001_0000)                    # NOTIFICATION_DATA layout: vq index in bits 0-15
    assert rig.dev.stats.kicks == 2
    assert signalled(rig.dev._kick_fds[0])


async def test_queue_ready_zero_with_ring_reset_resets_queue(rig):
    g = rig.guest()
    await g.initialize(int(Feature.RING_RESET), queue_size=16)
    await rig.dev.settle()
    assert rig.dev.negotiated(Feature.RING_RESET)
    rig.w(QUEUE_SEL, 1)
    assert rig.r(QUEUE_READY) == 1
    with no_faults(rig.dev):
        rig.w(QUEUE_READY, 0)
        assert rig.r(QUEUE_RESET) == 1
    await rig.dev.settle()
    assert rig.r(QUEUE_RESET) == 0 and rig.r(QUEUE_READY) == 0
    assert not rig.dev.backend.rings[1].enabled
    # QueueReset itself
    rig.w(QUEUE_SEL, 0)
    with no_faults(rig.dev):
        rig.w(QUEUE_RESET, 1)
        assert rig.r(QUEUE_RESET) == 1
    await rig.dev.settle()
    assert rig.r(QUEUE_RESET) == 0 and rig.r(QUEUE_READY) == 0
    assert rig.dev.queues[0].size == QUEUE_MAX and rig.dev.queues[0].desc == 0


async def test_queue_ready_zero_stops_queue_without_ring_reset(rig):
    g = rig.guest()
    await g.initialize(0, queue_size=16)
    await rig.dev.settle()
    rig.w(QUEUE_SEL, 0)
    with no_faults(rig.dev):
        rig.w(QUEUE_READY, 0)
    await rig.dev.settle()
    assert rig.r(QUEUE_READY) == 0
    assert not rig.dev.backend.rings[0].enabled


# ---------------------------------------------------------------------------- interrupts and reset


async def test_interrupt_status_and_ack(rig):
    rig.negotiate(int(Feature.VERSION_1))
    rig.w(STATUS, 0x0F)
    await rig.dev.settle()
    assert rig.r(INT_STATUS) == 0
    rig.dev.update_config(struct.pack("<Q", 7) + bytes(rig.dev.config[8:]))
    assert signalled(rig.dev.interrupts.intx_fd)
    with no_faults(rig.dev):
        assert rig.r(INT_STATUS) == ISR_CONFIG
        assert rig.r(INT_STATUS) == ISR_CONFIG              # not read-to-clear on MMIO
        rig.w(INT_ACK, ISR_QUEUE)                           # acking another bit leaves it set
        assert rig.r(INT_STATUS) == ISR_CONFIG
        rig.w(INT_ACK, ISR_CONFIG)
        assert rig.r(INT_STATUS) == 0


async def test_used_buffer_interrupt(rng):
    g = rng.guest()
    driver = RngDriver(g, buffer_size=64)
    await driver.start(queue_size=16)
    g.close()                                               # take the interrupt ourselves
    q = g.queues[0]
    fut = q.add([], [(driver.buffer, 32)])
    q.kick()
    assert await wait_fd(rng.dev.interrupts.intx_fd) == 1
    assert rng.r(INT_STATUS) == ISR_QUEUE
    rng.w(INT_ACK, ISR_QUEUE)
    assert rng.r(INT_STATUS) == 0
    assert q.reap() == 1 and fut.result() == 32


async def test_reset_clears_interrupt_status_and_queues(rig):
    g = rig.guest()
    await g.initialize(0, queue_size=16)
    await rig.dev.settle()
    g.close()
    rig.dev.update_config(struct.pack("<Q", 7) + bytes(rig.dev.config[8:]))
    assert rig.r(INT_STATUS) == ISR_CONFIG
    rig.w(STATUS, 0)
    await rig.dev.settle()
    assert rig.r(STATUS) == 0
    assert rig.r(INT_STATUS) == 0
    for q in range(NUM_QUEUES):
        rig.w(QUEUE_SEL, q)
        assert rig.r(QUEUE_READY) == 0
        assert rig.dev.queues[q].size == QUEUE_MAX and rig.dev.queues[q].desc == 0


async def test_shared_memory_registers_absent(rig):
    with no_faults(rig.dev):
        for sel in (0, 1, 0xFF):
            rig.w(SHM_SEL, sel)
            assert rig.r(SHM_LEN_LO) == 0xFFFFFFFF
            assert rig.r(SHM_LEN_HI) == 0xFFFFFFFF
            assert rig.r(SHM_BASE_LO) == 0xFFFFFFFF
            assert rig.r(SHM_BASE_HI) == 0xFFFFFFFF


# ---------------------------------------------------------------------------- bad accesses


async def test_bad_widths_counted(rig):
    with faults(rig.dev, {GuestFault.BAD_WIDTH: 5}):
        assert rig.r(MAGIC, 2) == 0                          # control registers are 32-bit only
        assert rig.r(STATUS, 1) == 0
        rig.w(STATUS, Status.ACKNOWLEDGE, 1)
        rig.w(QUEUE_SEL, 1, 2)
        assert rig.r(INT_STATUS, 8) == 0
    assert rig.r(STATUS) == 0
    assert rig.dev.queue_select == 0


async def test_bad_offsets_counted(rig):
    with faults(rig.dev, {GuestFault.UNKNOWN_OFFSET: 6}):
        assert rig.r(0x018) == 0                             # reserved
        assert rig.r(0x028) == 0                             # legacy GuestPageSize
        rig.w(0x03C, 4096)                                   # legacy QueueAlign
        rig.w(0x040, 1)                                      # legacy QueuePFN
        assert rig.r(0x002) == 0                             # misaligned
        assert rig.r(0x0F8) == 0


async def test_direction_violations_counted(rig):
    with faults(rig.dev, {GuestFault.READ_ONLY: 4, GuestFault.WRITE_ONLY: 6}):
        rig.w(MAGIC, 0)
        rig.w(DEVICE_ID, 5)
        rig.w(QUEUE_NUM_MAX, 8)
        rig.w(INT_STATUS, 0)
        assert rig.r(DEV_FEATURES_SEL) == 0
        assert rig.r(DRV_FEATURES) == 0
        assert rig.r(QUEUE_SEL) == 0
        assert rig.r(QUEUE_NUM) == 0
        assert rig.r(QUEUE_NOTIFY) == 0
        assert rig.r(INT_ACK) == 0
    assert rig.r(MAGIC) == 0x74726976 and rig.r(DEVICE_ID) == 2


# ---------------------------------------------------------------------------- end to end


async def test_rng_read_end_to_end(rng):
    g = rng.guest()
    assert isinstance(g.transport, MmioGuestTransport)
    driver = RngDriver(g, buffer_size=256)
    features = await driver.start(queue_size=16)
    assert features == int(Feature.VERSION_1)
    assert g.status() == 0x0F
    data = await asyncio.wait_for(driver.read(1000), 5)      # several requests of <= 256 bytes
    assert len(data) == 1000
    assert len(set(data)) > 100                              # entropy, not a constant fill
    assert g.queues[0].completed == 4
    assert rng.dev.stats.kicks >= 1 and rng.dev.stats.interrupts >= 4
    assert rng.r(INT_STATUS) == 0                            # the guest acknowledged
    assert rng.dev.faults.total == 0
    assert rng.dev.backend.requests == 4
