"""virtio-pci modern transport: capabilities, every common-cfg field, bad accesses, ISR/MSI-X,
the PCI_CFG window and device reset (virtio v1.4 §4.1). What PCI and MMIO share (feature
words, FEATURES_OK, the status sequence, config generation and device config) is in
test_transport_common.py."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

import pytest
from helpers import faults, no_faults, signalled, wait_fd, wait_until

from shadowvmm.config import DeviceConfig
from shadowvmm.device import VirtioDevice
from shadowvmm.guest.driver import GuestDevice, GuestQueue
from shadowvmm.guest.transport import PciGuestTransport
from shadowvmm.machine import Machine
from shadowvmm.shadow import GuestFault
from shadowvmm.transport.pci import CapType, PciTransport, Space
from shadowvmm.virtio.constants import ISR_CONFIG, ISR_QUEUE, NO_VECTOR, BlkFeature, DeviceId, Feature, Status
from shadowvmm.virtio.split import SplitDriverQueue, SplitLayout

# ---------------------------------------------------------------------------- offsets (v1.4 §4.1.4.3)

DFSELECT, DF, GFSELECT, GF = 0x00, 0x04, 0x08, 0x0C
MSIX, NUMQ, STATUS, CFGGEN = 0x10, 0x12, 0x14, 0x15
Q_SELECT, Q_SIZE, Q_MSIX, Q_ENABLE, Q_NOFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
Q_DESCLO, Q_DESCHI, Q_AVAILLO, Q_AVAILHI, Q_USEDLO, Q_USEDHI = 0x20, 0x24, 0x28, 0x2C, 0x30, 0x34
Q_NDATA, Q_RESET, ADM_Q_IDX, ADM_Q_NUM = 0x38, 0x3A, 0x3C, 0x3E

COMMON, ISR, DEVCFG, NOTIFY = 0x0000, 0x1000, 0x2000, 0x3000
QUEUE_MAX = 256
NUM_QUEUES = 2
VECTORS = NUM_QUEUES + 1

#: What the inproc blk backend offers through the default policy.
BLK_OFFERED = int(BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH
                  | BlkFeature.CONFIG_WCE | BlkFeature.MQ | Feature.INDIRECT_DESC
                  | Feature.EVENT_IDX | Feature.VERSION_1 | Feature.RING_PACKED
                  | Feature.RING_RESET)
DISK_BYTES = 1 << 20
CAPACITY_SECTORS = DISK_BYTES // 512                 #: 2048 = 0x800
SERIAL = b"shadowvmm-blk"
ADS = Status.ACKNOWLEDGE | Status.DRIVER


# ---------------------------------------------------------------------------- rig


@dataclass
class Rig:
    m: Machine
    dev: VirtioDevice
    t: PciTransport
    guests: list[GuestDevice] = field(default_factory=list)

    def r(self, off: int, width: int) -> int:
        """Raw read of a common-cfg field through the intercept path."""
        return self.t.read(Space.BAR, COMMON + off, width)

    def w(self, off: int, width: int, value: int) -> None:
        self.t.write(Space.BAR, COMMON + off, width, value)

    def select(self, index: int) -> None:
        self.w(Q_SELECT, 2, index)

    def guest(self, msix: bool = True) -> GuestDevice:
        g = self.m.guest("blk0", msix=msix)
        self.guests.append(g)
        return g

    def cfg(self, off: int, width: int) -> int:
        return self.t.read(Space.CONFIG, off, width)

    def negotiate(self, features: int) -> None:
        """Raw init up to FEATURES_OK with *features* (ACKNOWLEDGE|DRIVER set if not yet)."""
        if self.r(STATUS, 1) != ADS:
            self.w(STATUS, 1, Status.ACKNOWLEDGE)
            self.w(STATUS, 1, ADS)
        for word in range(2):
            self.w(GFSELECT, 4, word)
            self.w(GF, 4, features >> (32 * word) & 0xFFFFFFFF)
        self.w(STATUS, 1, ADS | Status.FEATURES_OK)


async def make_rig(device: str = "blk", transport: str = "pci") -> Rig:
    m = Machine(32 << 20)
    options = ({"device": device, "queues": NUM_QUEUES, "size": DISK_BYTES} if device == "blk"
               else {"device": device})
    dev = await m.add_device(DeviceConfig("blk0", "inproc", options, transport=transport))
    t = m.slots["blk0"].transport
    assert isinstance(t, PciTransport)
    return Rig(m, dev, t)


@pytest.fixture
async def rig():
    r = await make_rig()
    yield r
    for g in r.guests:
        g.close()
    await r.m.close()


def get_id(g: GuestDevice, q: GuestQueue) -> tuple[asyncio.Future, int]:
    """Queue (not kick) a virtio-blk GET_ID request; returns its future and data GPA."""
    mem = g.memory
    header = g.alloc.alloc(16, 16)
    data = g.alloc.alloc(20, 4)
    status = g.alloc.alloc(1, 1)
    mem.write(header, struct.pack("<IIQ", 8, 0, 0))
    mem.write(status, b"\xff")
    fut = q.add([(header, 16)], [(data, 20), (status, 1)])
    return fut, data


def walk_caps(t: PciTransport) -> list[dict]:
    """Walk the PCI capability list like a guest would, returning every capability."""
    caps = []
    pos = t.read(Space.CONFIG, 0x34, 1)
    seen = set()
    while pos:
        assert pos % 4 == 0 and 0x40 <= pos < 0x100 and pos not in seen
        seen.add(pos)
        cap = {"pos": pos, "id": t.read(Space.CONFIG, pos, 1),
               "next": t.read(Space.CONFIG, pos + 1, 1)}
        if cap["id"] == 0x09:
            cap.update(len=t.read(Space.CONFIG, pos + 2, 1), type=t.read(Space.CONFIG, pos + 3, 1),
                       bar=t.read(Space.CONFIG, pos + 4, 1), offset=t.read(Space.CONFIG, pos + 8, 4),
                       length=t.read(Space.CONFIG, pos + 12, 4))
            if cap["type"] == CapType.NOTIFY:
                cap["multiplier"] = t.read(Space.CONFIG, pos + 16, 4)
        caps.append(cap)
        pos = cap["next"]
    return caps


# ---------------------------------------------------------------------------- identity and capabilities


async def test_pci_ids_and_header(rig):
    assert rig.cfg(0x00, 2) == 0x1AF4
    assert rig.cfg(0x02, 2) == 0x1040 + DeviceId.BLOCK == 0x1042
    assert rig.cfg(0x08, 1) >= 1                     # non-transitional revision
    assert rig.cfg(0x2C, 2) == 0x1AF4
    assert rig.cfg(0x2E, 2) >= 0x40                  # subsystem id of a non-transitional device
    assert rig.cfg(0x06, 2) & 0x10                   # capabilities list present
    assert rig.cfg(0x0B, 1) == 0x01 and rig.cfg(0x0A, 1) == 0x80   # mass storage / other
    # read-only header: writes to the ids do not stick
    rig.t.write(Space.CONFIG, 0x00, 4, 0xFFFFFFFF)
    assert rig.cfg(0x00, 4) == 0x1042_1AF4


async def test_rng_device_id_and_no_device_cap():
    r = await make_rig("rng")
    try:
        assert r.cfg(0x02, 2) == 0x1044
        types = [c["type"] for c in walk_caps(r.t) if c["id"] == 0x09]
        assert types == [CapType.COMMON, CapType.NOTIFY, CapType.ISR, CapType.PCI_CFG]
        assert r.r(NUMQ, 2) == 1
        with faults(r.dev, {GuestFault.CONFIG_RANGE: 1}):
            assert r.t.read(Space.BAR, DEVCFG, 4) == 0
    finally:
        await r.m.close()


async def test_capability_list(rig):
    caps = walk_caps(rig.t)
    msix = [c for c in caps if c["id"] == 0x11]
    assert len(msix) == 1
    pos = msix[0]["pos"]
    assert rig.cfg(pos + 2, 2) & 0x7FF == VECTORS - 1          # table size N-1
    assert rig.cfg(pos + 4, 4) == 0x4000 | 4                   # table in BAR 4 @ 0x4000
    assert rig.cfg(pos + 8, 4) == 0x5000 | 4                   # PBA in BAR 4 @ 0x5000
    vendor = {c["type"]: c for c in caps if c["id"] == 0x09}
    assert [c["type"] for c in caps if c["id"] == 0x09] == [
        CapType.COMMON, CapType.NOTIFY, CapType.ISR, CapType.DEVICE, CapType.PCI_CFG]
    common, notify, isr = vendor[CapType.COMMON], vendor[CapType.NOTIFY], vendor[CapType.ISR]
    device, pci_cfg = vendor[CapType.DEVICE], vendor[CapType.PCI_CFG]
    # 0x40 bytes of v1.3+ common cfg plus the le32 queue_ring_state at 0x40 (docs/nested.md)
    assert (common["bar"], common["offset"], common["length"], common["len"]) == (4, 0x0000, 0x44, 16)
    assert (notify["bar"], notify["offset"], notify["len"]) == (4, 0x3000, 20)
    assert notify["multiplier"] == 4
    assert notify["length"] >= (NUM_QUEUES - 1) * notify["multiplier"] + 2
    assert (isr["bar"], isr["offset"], isr["length"], isr["len"]) == (4, 0x1000, 1, 16)
    assert (device["bar"], device["offset"], device["length"], device["len"]) == (4, 0x2000, 60, 16)
    assert (pci_cfg["len"], pci_cfg["bar"]) == (20, 0)
    assert pci_cfg["pos"] == rig.t.pci_cfg_cap
    assert caps[-1]["next"] == 0
    for cap in (common, device):
        assert cap["offset"] % 4 == 0
    # every queue's notify address is inside the notify structure
    for q in range(NUM_QUEUES):
        rig.select(q)
        assert rig.r(Q_NOFF, 2) * notify["multiplier"] + 2 <= notify["length"]
    # a guest driver's capability walk finds the same structures
    gt = rig.m.guest_transport("blk0")
    assert gt.caps[CapType.COMMON] == (4, 0x0000, 0x44)
    assert gt.caps[CapType.NOTIFY] == (4, 0x3000, notify["length"])
    assert gt.caps[CapType.ISR] == (4, 0x1000, 1)
    assert gt.caps[CapType.DEVICE] == (4, 0x2000, 60)
    assert gt.notify_multiplier == 4


async def test_msix_enable_bit_routes_interrupts(rig):
    assert rig.dev.interrupts.msix_enabled is False
    gt = rig.m.guest_transport("blk0", msix=True)
    assert rig.dev.interrupts.msix_enabled is True
    assert rig.cfg(gt.msix_cap + 2, 2) & 0x8000
    rig.t.write(Space.CONFIG, gt.msix_cap + 2, 2, 0)
    assert rig.dev.interrupts.msix_enabled is False


async def test_msix_table_is_read_write(rig):
    with no_faults(rig.dev):
        rig.t.write(Space.BAR, 0x4000 + 16 + 8, 4, 0x1234_5678)      # vector 1 data
        assert rig.t.read(Space.BAR, 0x4000 + 16 + 8, 4) == 0x1234_5678
        assert rig.t.read(Space.BAR, 0x4000, 4) == 0
        assert rig.t.read(Space.BAR, 0x5000, 8) == 0                    # PBA: nothing pending



async def test_out_of_width_values_are_truncated_at_the_intercept(rig):
    """A write carries its width's bytes: a value over 32 bits (or negative) in a 4-byte write to
    the MSI-X table, common cfg or device config neither raises nor leaks into the next field."""
    with no_faults(rig.dev):
        rig.t.write(Space.BAR, 0x4000 + 16 + 8, 4, 0xAB_1234_5678)        # used to raise OverflowError
        assert rig.t.read(Space.BAR, 0x4000 + 16 + 8, 4) == 0x1234_5678
        assert rig.t.read(Space.BAR, 0x4000 + 16 + 12, 4) == 0
        rig.t.write(Space.BAR, 0x4000, 4, -1)
        assert rig.t.read(Space.BAR, 0x4000, 4) == 0xFFFF_FFFF
        rig.t.write(Space.CONFIG, 0x04, 2, 0x1_0006)
        assert rig.t.read(Space.CONFIG, 0x04, 2) & 0xFFFF == 0x0006


# ---------------------------------------------------------------------------- common cfg: features


async def test_device_feature_select_reads_back(rig):
    """device_feature_select reads back on PCI (it is write-only on MMIO); the feature words
    themselves are in test_transport_common.py."""
    with no_faults(rig.dev):
        assert rig.r(DFSELECT, 4) == 0
        for word in (1, 2, 3, 4, 0xFFFFFFFF, 0):
            rig.w(DFSELECT, 4, word)
            assert rig.r(DFSELECT, 4) == word


async def test_driver_feature_read_back(rig):
    with no_faults(rig.dev):
        rig.w(GFSELECT, 4, 0)
        rig.w(GF, 4, 0x3000_0004)
        rig.w(GFSELECT, 4, 1)
        assert rig.r(GFSELECT, 4) == 1
        rig.w(GF, 4, 0x1)
        assert rig.r(GF, 4) == 0x1
        rig.w(GFSELECT, 4, 0)
        assert rig.r(GF, 4) == 0x3000_0004
        rig.w(GF, 4, 0x4)                              # rewriting one word keeps the other
        rig.w(GFSELECT, 4, 1)
        assert rig.r(GF, 4) == 0x1
    assert rig.dev.driver_features == (1 << 32) | 0x4
    with faults(rig.dev, {GuestFault.FEATURES_REFUSED: 1}):
        rig.w(GFSELECT, 4, 4)                          # past the last word
        rig.w(GF, 4, 0xFFFFFFFF)
        assert rig.r(GF, 4) == 0
    assert rig.dev.driver_features == (1 << 32) | 0x4


# ---------------------------------------------------------------------------- common cfg: device fields


async def test_config_msix_vector(rig):
    with no_faults(rig.dev):
        assert rig.r(MSIX, 2) == NO_VECTOR
        for valid in range(VECTORS):
            rig.w(MSIX, 2, valid)
            assert rig.r(MSIX, 2) == valid
        for invalid in (VECTORS, 0x7FF, 0x800, 0xFFFE):
            rig.w(MSIX, 2, 1)
            rig.w(MSIX, 2, invalid)
            assert rig.r(MSIX, 2) == NO_VECTOR     # mapping failure reads back NO_VECTOR
        rig.w(MSIX, 2, NO_VECTOR)
        assert rig.r(MSIX, 2) == NO_VECTOR


async def test_num_queues_and_admin_fields(rig):
    with no_faults(rig.dev):
        assert rig.r(NUMQ, 2) == NUM_QUEUES
        assert rig.r(ADM_Q_IDX, 2) == NUM_QUEUES
        assert rig.r(ADM_Q_NUM, 2) == 0


async def test_guest_config_read_uses_generation(rig):
    g = rig.guest()
    assert g.config_int(0, 8) == CAPACITY_SECTORS
    calls = []
    gt = g.transport
    original = gt.read_config

    def racing_read(offset, width):
        # the device changes its config in the middle of the guest's multi-access read
        if not calls:
            rig.dev.update_config(struct.pack("<Q", 0x1_0000_0002) + bytes(rig.dev.config[8:]))
        calls.append((offset, width))
        return original(offset, width)

    gt.read_config = racing_read
    assert g.config_int(0, 8) == 0x1_0000_0002         # torn read detected and retried
    assert len(calls) == 4


# ---------------------------------------------------------------------------- common cfg: queue fields


async def test_queue_select(rig):
    with no_faults(rig.dev):
        assert rig.r(Q_SELECT, 2) == 0
        rig.select(1)
        assert rig.r(Q_SELECT, 2) == 1
        assert rig.dev.selected_queue().index == 1
        rig.select(0xFFFF)
        assert rig.r(Q_SELECT, 2) == 0xFFFF
        assert rig.dev.selected_queue() is None


async def test_queue_size(rig):
    for q in range(NUM_QUEUES):
        rig.select(q)
        assert rig.r(Q_SIZE, 2) == QUEUE_MAX
    rig.select(1)
    with no_faults(rig.dev):
        rig.w(Q_SIZE, 2, 64)
        assert rig.r(Q_SIZE, 2) == 64
        rig.w(Q_SIZE, 2, 1)
        assert rig.r(Q_SIZE, 2) == 1
        rig.w(Q_SIZE, 2, 128)
    with faults(rig.dev, {GuestFault.QUEUE_SIZE: 4}):
        rig.w(Q_SIZE, 2, 100)                           # not a power of 2
        rig.w(Q_SIZE, 2, 0)
        rig.w(Q_SIZE, 2, 512)                           # above max
        rig.w(Q_SIZE, 2, 0xFFFF)
    assert rig.r(Q_SIZE, 2) == 128
    rig.select(0)
    assert rig.r(Q_SIZE, 2) == QUEUE_MAX                # per-queue
    rig.w(STATUS, 1, 0)                                 # reset: back to max
    rig.select(1)
    assert rig.r(Q_SIZE, 2) == QUEUE_MAX


async def test_queue_msix_vector(rig):
    with no_faults(rig.dev):
        for q in range(NUM_QUEUES):
            rig.select(q)
            assert rig.r(Q_MSIX, 2) == NO_VECTOR
        rig.select(1)
        rig.w(Q_MSIX, 2, 2)
        assert rig.r(Q_MSIX, 2) == 2
        rig.select(0)
        rig.w(Q_MSIX, 2, 0)
        assert rig.r(Q_MSIX, 2) == 0
        rig.select(1)
        assert rig.r(Q_MSIX, 2) == 2
        rig.w(Q_MSIX, 2, VECTORS)                       # no such vector
        assert rig.r(Q_MSIX, 2) == NO_VECTOR


async def test_queue_address_halves_are_independent(rig):
    rig.select(1)
    with no_faults(rig.dev):
        for lo, hi in ((Q_DESCLO, Q_DESCHI), (Q_AVAILLO, Q_AVAILHI), (Q_USEDLO, Q_USEDHI)):
            assert rig.r(lo, 4) == 0 and rig.r(hi, 4) == 0
            rig.w(hi, 4, 0x0000_00AB)                   # high half first
            assert rig.r(lo, 4) == 0 and rig.r(hi, 4) == 0xAB
            rig.w(lo, 4, 0x1234_5000)
            assert rig.r(lo, 4) == 0x1234_5000 and rig.r(hi, 4) == 0xAB
            rig.w(hi, 4, 0)                             # rewriting one half keeps the other
            assert rig.r(lo, 4) == 0x1234_5000 and rig.r(hi, 4) == 0
            rig.w(hi, 4, 0xFFFF_FFFF)
    q1 = rig.dev.queues[1]
    assert q1.desc == q1.driver == q1.device == 0xFFFF_FFFF_1234_5000
    q0 = rig.dev.queues[0]
    assert q0.desc == q0.driver == q0.device == 0


async def test_queue_enable(rig):
    rig.negotiate(int(Feature.VERSION_1))
    rig.select(0)
    assert rig.r(Q_ENABLE, 2) == 0
    rig.w(Q_SIZE, 2, 16)
    # a misaligned descriptor table or one outside guest memory cannot be enabled
    with faults(rig.dev, {GuestFault.QUEUE_SIZE: 2}):
        rig.w(Q_DESCLO, 4, 0x10008)
        rig.w(Q_ENABLE, 2, 1)
        rig.w(Q_DESCLO, 4, 0)
        rig.w(Q_DESCHI, 4, 1)                           # 4 GiB: beyond the 32 MiB guest
        rig.w(Q_ENABLE, 2, 1)
    assert rig.r(Q_ENABLE, 2) == 0
    with no_faults(rig.dev):
        rig.w(Q_DESCHI, 4, 0)
        for off, value in ((Q_DESCLO, 0x10000), (Q_AVAILLO, 0x11000), (Q_USEDLO, 0x12000)):
            rig.w(off, 4, value)
        rig.w(Q_ENABLE, 2, 1)
        assert rig.r(Q_ENABLE, 2) == 1
        rig.w(Q_ENABLE, 2, 1)                           # idempotent
        rig.select(1)
        assert rig.r(Q_ENABLE, 2) == 0
        rig.select(0)
    with faults(rig.dev, {GuestFault.QUEUE_DISABLE: 1, GuestFault.QUEUE_LIVE: 2}):
        rig.w(Q_ENABLE, 2, 0)                           # the driver must not write 0
        rig.w(Q_SIZE, 2, 32)                            # live queue fields are frozen
        rig.w(Q_DESCLO, 4, 0x20000)
    assert rig.r(Q_ENABLE, 2) == 1
    assert rig.r(Q_SIZE, 2) == 16 and rig.r(Q_DESCLO, 4) == 0x10000


async def test_queue_notify_off_and_notify_data(rig):
    with no_faults(rig.dev):
        for q in range(NUM_QUEUES):
            rig.select(q)
            assert rig.r(Q_NOFF, 2) == q
            assert rig.r(Q_NDATA, 2) == q


async def test_queue_reset(rig):
    g = rig.guest()
    await g.initialize(int(Feature.RING_RESET), queue_size=16)
    await rig.dev.settle()
    assert rig.dev.negotiated(Feature.RING_RESET)
    gt: PciGuestTransport = g.transport
    backend_ring = rig.dev.backend.rings[0]
    assert backend_ring.enabled
    rig.select(0)
    assert rig.r(Q_RESET, 2) == 0
    with no_faults(rig.dev):
        gt.reset_queue(0)
        assert rig.r(Q_RESET, 2) == 1                    # in progress
        assert rig.r(Q_ENABLE, 2) == 1
    await rig.dev.settle()
    assert rig.r(Q_RESET, 2) == 0
    assert rig.r(Q_ENABLE, 2) == 0
    assert rig.r(Q_SIZE, 2) == QUEUE_MAX
    assert (rig.r(Q_DESCLO, 4), rig.r(Q_AVAILLO, 4), rig.r(Q_USEDLO, 4)) == (0, 0, 0)
    assert not backend_ring.enabled and backend_ring.queue is None
    rig.select(1)
    assert rig.r(Q_ENABLE, 2) == 1                       # the other queue is untouched
    assert rig.dev.backend.rings[1].enabled
    # re-enable queue 0 with a fresh ring and use it
    size = 16
    d, a, u = SplitLayout.area_sizes(size)
    layout = SplitLayout(size, g.alloc.alloc(d, 16), g.alloc.alloc(a, 2), g.alloc.alloc(u, 4))
    ring = SplitDriverQueue(g.memory, layout)
    gt.setup_queue(0, size, layout.desc, layout.avail, layout.used, 1)
    gt.enable_queue(0)
    g.queues[0] = GuestQueue(g, 0, ring, 1)
    await rig.dev.settle()
    assert backend_ring.enabled
    fut, data = get_id(g, g.queues[0])
    g.queues[0].kick()
    assert await asyncio.wait_for(fut, 2) == len(SERIAL) + 1 + (20 - len(SERIAL))
    assert g.memory.read(data, len(SERIAL)) == SERIAL


async def test_queue_reset_reads_back_registers_of_right_queue(rig):
    """While queue 0 resets, the guest can select and program another queue."""
    g = rig.guest()
    await g.initialize(int(Feature.RING_RESET), queue_size=16)
    g.transport.reset_queue(1)
    rig.select(0)
    assert rig.r(Q_RESET, 2) == 0
    rig.select(1)
    assert rig.r(Q_RESET, 2) == 1
    await rig.dev.settle()
    assert rig.r(Q_RESET, 2) == 0 and rig.r(Q_ENABLE, 2) == 0
    rig.select(0)
    assert rig.r(Q_ENABLE, 2) == 1


# ---------------------------------------------------------------------------- bad accesses


async def test_unknown_offsets(rig):
    with faults(rig.dev, {GuestFault.UNKNOWN_OFFSET: 7}):
        assert rig.r(0x44, 4) == 0                      # past the end of common cfg
        rig.w(0x44, 4, 1)
        assert rig.r(0x02, 2) == 0                      # inside device_feature_select
        rig.w(0x13, 1, 1)                               # inside num_queues
        assert rig.t.read(Space.BAR, 0x6000, 4) == 0    # past the MSI-X PBA
        rig.t.write(Space.BAR, 0x9000, 4, 1)            # past the BAR
        assert rig.t.read(Space.BAR, -4, 4) == 0
    assert rig.r(DFSELECT, 4) == 0 and rig.r(NUMQ, 2) == NUM_QUEUES


async def test_wrong_widths(rig):
    with faults(rig.dev, {GuestFault.BAD_WIDTH: 7}):
        assert rig.r(STATUS, 2) == 0                    # 8-bit field read as 16
        assert rig.r(DF, 2) == 0
        assert rig.r(NUMQ, 4) == 0
        rig.w(Q_SELECT, 4, 1)
        rig.w(STATUS, 4, 1)
        rig.w(Q_DESCLO, 8, 0x1000)                      # 64-bit fields are two 32-bit halves
        rig.w(MSIX, 1, 0)
    assert rig.r(Q_SELECT, 2) == 0
    assert rig.r(STATUS, 1) == 0
    assert rig.r(Q_DESCLO, 4) == 0
    assert rig.r(MSIX, 2) == NO_VECTOR


async def test_writes_to_read_only_fields(rig):
    with faults(rig.dev, {GuestFault.READ_ONLY: 7}):
        rig.w(DF, 4, 0)
        rig.w(NUMQ, 2, 7)
        rig.w(CFGGEN, 1, 9)
        rig.w(Q_NOFF, 2, 5)
        rig.w(Q_NDATA, 2, 5)
        rig.w(ADM_Q_IDX, 2, 0)
        rig.w(ADM_Q_NUM, 2, 4)
    assert rig.r(DF, 4) == BLK_OFFERED & 0xFFFFFFFF
    assert rig.r(NUMQ, 2) == NUM_QUEUES
    assert rig.r(CFGGEN, 1) == 0
    assert rig.r(Q_NOFF, 2) == 0
    assert rig.r(ADM_Q_IDX, 2) == NUM_QUEUES and rig.r(ADM_Q_NUM, 2) == 0


@pytest.mark.parametrize("sel", [NUM_QUEUES, 0x7FFF, 0xFFFF])
async def test_queue_select_out_of_range(rig, sel):
    before = [(q.size, q.msix_vector, q.enabled, q.desc, q.driver, q.device) for q in rig.dev.queues]
    rig.select(sel)
    with no_faults(rig.dev):
        for off, width in ((Q_SIZE, 2), (Q_ENABLE, 2), (Q_NOFF, 2), (Q_NDATA, 2), (Q_RESET, 2),
                           (Q_DESCLO, 4), (Q_DESCHI, 4), (Q_AVAILLO, 4), (Q_AVAILHI, 4),
                           (Q_USEDLO, 4), (Q_USEDHI, 4)):
            assert rig.r(off, width) == 0, hex(off)
        # a vector for a queue that does not exist is "no vector"
        assert rig.r(Q_MSIX, 2) == NO_VECTOR
    with faults(rig.dev, {GuestFault.QUEUE_SELECT: 9}):
        rig.w(Q_SIZE, 2, 16)
        rig.w(Q_MSIX, 2, 1)
        rig.w(Q_ENABLE, 2, 1)
        for off in (Q_DESCLO, Q_DESCHI, Q_AVAILLO, Q_AVAILHI, Q_USEDLO, Q_USEDHI):
            rig.w(off, 4, 0x1000)
    after = [(q.size, q.msix_vector, q.enabled, q.desc, q.driver, q.device) for q in rig.dev.queues]
    assert after == before


async def test_queue_reset_with_queue_select_out_of_range_counts_queue_select(rig):
    g = rig.guest()
    await g.initialize(int(Feature.RING_RESET), queue_size=16)
    rig.select(NUM_QUEUES)
    with faults(rig.dev, {GuestFault.QUEUE_SELECT: 1}):
        rig.w(Q_RESET, 2, 1)


async def test_isr_and_notify_misuse(rig):
    with faults(rig.dev, {GuestFault.READ_ONLY: 1, GuestFault.BAD_WIDTH: 3,
                          GuestFault.WRITE_ONLY: 1, GuestFault.NOTIFY_INVALID: 2}):
        rig.t.write(Space.BAR, ISR, 1, 1)               # ISR is read-only
        assert rig.t.read(Space.BAR, ISR, 4) == 0       # ISR is 8-bit
        rig.t.write(Space.BAR, NOTIFY, 4, 0)            # notify is a 16-bit write
        rig.t.write(Space.BAR, NOTIFY + 2, 2, 0)        # not at a notify_off * multiplier
        assert rig.t.read(Space.BAR, NOTIFY, 2) == 0    # notify is write-only
        rig.t.write(Space.BAR, NOTIFY, 2, 0)            # queue 0 not enabled
        rig.t.write(Space.BAR, NOTIFY + 4 * NUM_QUEUES, 2, NUM_QUEUES)   # no such queue
    assert rig.dev.stats.kicks == 0


# ---------------------------------------------------------------------------- interrupts


async def test_isr_read_to_clear_with_intx(rig):
    g = rig.guest(msix=False)
    await g.initialize(0, queue_size=16)
    assert rig.dev.interrupts.msix_enabled is False
    g.close()                                            # the test takes the interrupts itself
    ints = rig.dev.interrupts
    # queue interrupt: ISR bit 0
    fut, data = get_id(g, g.queues[1])
    g.queues[1].kick()
    assert await wait_fd(ints.intx_fd) == 1
    assert not any(signalled(fd) for fd in ints.vector_fds)
    assert rig.t.read(Space.BAR, ISR, 1) == ISR_QUEUE
    assert rig.t.read(Space.BAR, ISR, 1) == 0            # the read cleared it
    assert g.queues[1].reap() == 1
    assert fut.result() == 21
    assert g.memory.read(data, len(SERIAL)) == SERIAL
    # config interrupt: ISR bit 1
    rig.dev.update_config(struct.pack("<Q", 5) + bytes(rig.dev.config[8:]))
    assert signalled(ints.intx_fd)
    assert rig.t.read(Space.BAR, ISR, 1) == ISR_CONFIG
    assert rig.t.read(Space.BAR, ISR, 1) == 0


async def test_intx_guest_driver_completes_requests(rig):
    g = rig.guest(msix=False)
    await g.initialize(0, queue_size=16)
    fut, data = get_id(g, g.queues[0])
    g.queues[0].kick()
    assert await asyncio.wait_for(fut, 2) == 21
    assert rig.dev.stats.interrupts >= 1
    assert rig.dev.isr == 0                             # the guest's ISR read cleared it


async def test_intx_mirrors_isr_into_pci_status(rig):
    g = rig.guest(msix=False)
    await g.initialize(0, queue_size=16)
    g.close()
    assert rig.cfg(0x06, 2) & 0x08 == 0
    rig.dev.update_config(struct.pack("<Q", 5) + bytes(rig.dev.config[8:]))
    assert rig.cfg(0x06, 2) & 0x08 == 0x08
    rig.t.read(Space.BAR, ISR, 1)
    assert rig.cfg(0x06, 2) & 0x08 == 0


async def test_msix_interrupts_arrive_on_vector_fds(rig):
    g = rig.guest(msix=True)
    await g.initialize(0, queue_size=16)
    assert rig.dev.interrupts.msix_enabled is True
    gt: PciGuestTransport = g.transport
    assert [gt.queue_vector(q) for q in range(NUM_QUEUES)] == [1, 2]
    assert rig.r(MSIX, 2) == 0
    g.close()
    ints = rig.dev.interrupts
    fut, _ = get_id(g, g.queues[1])
    g.queues[1].kick()
    assert await wait_fd(ints.vector_fds[2]) == 1
    assert not signalled(ints.vector_fds[1]) and not signalled(ints.vector_fds[0])
    assert not signalled(ints.intx_fd)
    assert rig.dev.isr == 0                              # ISR unused under MSI-X
    assert g.queues[1].reap() == 1 and fut.result() == 21
    # config change -> config vector 0, no ISR
    rig.dev.update_config(struct.pack("<Q", 5) + bytes(rig.dev.config[8:]))
    assert signalled(ints.vector_fds[0])
    assert not signalled(ints.intx_fd)
    assert rig.t.read(Space.BAR, ISR, 1) == 0


async def test_msix_no_vector_means_no_interrupt(rig):
    g = rig.guest(msix=True)
    await g.initialize(0, queue_size=16)
    g.close()
    ints = rig.dev.interrupts
    rig.select(0)
    rig.w(Q_MSIX, 2, NO_VECTOR)                          # allowed on a live queue
    rig.w(MSIX, 2, NO_VECTOR)
    await rig.dev.settle()
    fut, _ = get_id(g, g.queues[0])
    g.queues[0].kick()
    await wait_until(g.queues[0].reap, timeout=0.2, what="the request to be reaped")
    assert fut.done() and fut.result() == 21
    await asyncio.sleep(0.01)                            # a while for a stray interrupt to show
    assert not any(signalled(fd) for fd in ints.vector_fds)
    assert not signalled(ints.intx_fd)
    rig.dev.update_config(struct.pack("<Q", 5) + bytes(rig.dev.config[8:]))
    assert not any(signalled(fd) for fd in ints.vector_fds)


async def test_msix_guest_driver_completes_requests(rig):
    g = rig.guest(msix=True)
    await g.initialize(0, queue_size=16)
    for q in g.queues:
        fut, data = get_id(g, q)
        q.kick()
        assert await asyncio.wait_for(fut, 2) == 21
    assert [q.completed for q in g.queues] == [1, 1]


# ---------------------------------------------------------------------------- PCI_CFG access window


def window(rig: Rig, bar: int, offset: int, length: int) -> int:
    cap = rig.t.pci_cfg_cap
    rig.t.write(Space.CONFIG, cap + 4, 1, bar)
    rig.t.write(Space.CONFIG, cap + 8, 4, offset)
    rig.t.write(Space.CONFIG, cap + 12, 4, length)
    return cap + 16


async def test_pci_cfg_window_reads_and_writes_bar_registers(rig):
    cap = rig.t.pci_cfg_cap
    with no_faults(rig.dev):
        data = window(rig, 4, COMMON + NUMQ, 2)
        assert rig.cfg(cap + 4, 1) == 4                     # window fields read back
        assert rig.cfg(cap + 8, 4) == NUMQ
        assert rig.cfg(cap + 12, 4) == 2
        assert rig.cfg(data, 4) == NUM_QUEUES
        data = window(rig, 4, COMMON + DF, 4)
        assert rig.cfg(data, 4) == BLK_OFFERED & 0xFFFFFFFF
        data = window(rig, 4, COMMON + Q_SELECT, 2)
        rig.t.write(Space.CONFIG, data, 4, 1)
        assert rig.r(Q_SELECT, 2) == 1                      # same register as the BAR
        rig.select(0)
        assert rig.cfg(data, 4) == 0
        data = window(rig, 4, COMMON + STATUS, 1)
        rig.t.write(Space.CONFIG, data, 4, Status.ACKNOWLEDGE)
        assert rig.r(STATUS, 1) == Status.ACKNOWLEDGE
        assert rig.cfg(data, 4) == Status.ACKNOWLEDGE
        data = window(rig, 4, DEVCFG, 4)                    # device config via the window
        assert rig.cfg(data, 4) == CAPACITY_SECTORS
        data = window(rig, 4, DEVCFG + 32, 1)
        assert rig.cfg(data, 4) == 1


async def test_pci_cfg_window_bad_settings_counted(rig):
    with faults(rig.dev, {GuestFault.BAD_WIDTH: 4}):
        data = window(rig, 0, COMMON + NUMQ, 2)             # wrong BAR
        assert rig.cfg(data, 4) == 0
        data = window(rig, 4, COMMON + NUMQ, 3)             # bad length
        assert rig.cfg(data, 4) == 0
        data = window(rig, 4, COMMON + STATUS + 1, 2)       # offset not a multiple of length
        assert rig.cfg(data, 4) == 0
        data = window(rig, 4, COMMON + Q_SELECT, 8)
        rig.t.write(Space.CONFIG, data, 4, 1)
    assert rig.r(Q_SELECT, 2) == 0


async def test_pci_config_space_bad_access(rig):
    with faults(rig.dev, {GuestFault.BAD_WIDTH: 3}):
        assert rig.cfg(0x01, 2) == 0xFFFF                   # misaligned
        assert rig.cfg(0xFE, 4) == 0xFFFFFFFF               # past the end
        rig.t.write(Space.CONFIG, 0x3C, 3, 1)
    assert rig.cfg(0x00, 2) == 0x1AF4


# ---------------------------------------------------------------------------- device reset


async def test_device_reset_restores_defaults(rig):
    g = rig.guest(msix=True)
    await g.initialize(int(BlkFeature.FLUSH), queue_size=16)
    await rig.dev.settle()
    assert rig.dev.started and rig.r(STATUS, 1) == 0x0F
    rig.w(DFSELECT, 4, 1)
    rig.w(GFSELECT, 4, 1)
    rig.select(1)
    assert rig.r(Q_ENABLE, 2) == 1 and rig.r(Q_SIZE, 2) == 16 and rig.r(Q_MSIX, 2) == 2
    rig.w(STATUS, 1, 0)
    await rig.dev.settle()
    assert rig.r(STATUS, 1) == 0
    assert not rig.dev.started and not rig.dev.rings_running
    assert rig.r(DFSELECT, 4) == 0 and rig.r(GFSELECT, 4) == 0
    assert rig.r(GF, 4) == 0 and rig.dev.driver_features == 0
    assert rig.r(MSIX, 2) == NO_VECTOR
    for q in range(NUM_QUEUES):
        rig.select(q)
        assert rig.r(Q_SIZE, 2) == QUEUE_MAX
        assert rig.r(Q_MSIX, 2) == NO_VECTOR
        assert rig.r(Q_ENABLE, 2) == 0
        assert rig.r(Q_RESET, 2) == 0
        for off in (Q_DESCLO, Q_DESCHI, Q_AVAILLO, Q_AVAILHI, Q_USEDLO, Q_USEDHI):
            assert rig.r(off, 4) == 0
        assert rig.r(Q_NOFF, 2) == q                       # not a register the reset changes
    assert rig.r(NUMQ, 2) == NUM_QUEUES
    assert rig.t.read(Space.BAR, ISR, 1) == 0
    assert rig.dev.backend.rings == {}
    # the device can be brought up again after the reset
    await g.initialize(0, queue_size=16)
    fut, _ = get_id(g, g.queues[0])
    g.queues[0].kick()
    assert await asyncio.wait_for(fut, 2) == 21


async def test_guest_reset_waits_for_status_zero(rig):
    g = rig.guest()
    await g.initialize(0, queue_size=16)
    await rig.dev.settle()
    await g.reset()
    assert g.transport.status_log.values[-1] == 0
    assert rig.r(STATUS, 1) == 0
