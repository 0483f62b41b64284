"""What virtio-pci (v1.4 §4.1) and virtio-mmio (§4.2) expose alike, one suite run over both:
feature words, FEATURES_OK negotiation, the status sequence, the config generation, the
device config space and a queue reset without VIRTIO_F_RING_RESET. Each transport's register
layout is data (:data:`FIELDS`); transport-specific behaviour stays in test_transport_pci.py
and test_transport_mmio.py."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from helpers import faults, no_faults, wait_until

from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.backends.inproc_models import BlkModel
from shadowvmm.config import DeviceConfig
from shadowvmm.device import VirtioDevice
from shadowvmm.guest.driver import GuestDevice
from shadowvmm.guest.transport import GuestTransport
from shadowvmm.machine import Machine
from shadowvmm.shadow import GuestFault
from shadowvmm.transport.mmio import CONFIG_OFF, MmioTransport
from shadowvmm.transport.pci import PciTransport, Space
from shadowvmm.virtio.constants import BlkFeature, Feature, Status

NUM_QUEUES = 2
DISK_BYTES = 1 << 20
CAPACITY_SECTORS = DISK_BYTES // 512                 #: 2048 = 0x800
BLK_OFFERED = int(BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH
                  | BlkFeature.CONFIG_WCE | BlkFeature.MQ | Feature.INDIRECT_DESC
                  | Feature.EVENT_IDX | Feature.VERSION_1 | Feature.RING_PACKED
                  | Feature.RING_RESET)
ADS = Status.ACKNOWLEDGE | Status.DRIVER
PCI_DEVCFG = 0x2000                                  #: device config in BAR 4


@dataclass(frozen=True)
class Field:
    offset: int
    width: int
    readable: bool = True


#: The registers both transports have: PCI common cfg (§4.1.4.3) and MMIO (§4.2.2).
FIELDS: dict[str, dict[str, Field]] = {
    "pci": {
        "device_feature_select": Field(0x00, 4), "device_feature": Field(0x04, 4),
        "driver_feature_select": Field(0x08, 4), "driver_feature": Field(0x0C, 4),
        "status": Field(0x14, 1), "config_generation": Field(0x15, 1),
        "queue_select": Field(0x16, 2), "queue_size": Field(0x18, 2), "queue_ready": Field(0x1C, 2),
        "queue_desc_lo": Field(0x20, 4), "queue_desc_hi": Field(0x24, 4),
        "queue_driver_lo": Field(0x28, 4), "queue_driver_hi": Field(0x2C, 4),
        "queue_device_lo": Field(0x30, 4), "queue_device_hi": Field(0x34, 4),
        "queue_reset": Field(0x3A, 2),
    },
    "mmio": {
        "device_feature_select": Field(0x014, 4, readable=False), "device_feature": Field(0x010, 4),
        "driver_feature_select": Field(0x024, 4, readable=False),
        "driver_feature": Field(0x020, 4, readable=False),
        "status": Field(0x070, 4), "config_generation": Field(0x0FC, 4),
        "queue_select": Field(0x030, 4, readable=False), "queue_size": Field(0x038, 4, readable=False),
        "queue_ready": Field(0x044, 4),
        "queue_desc_lo": Field(0x080, 4, readable=False), "queue_desc_hi": Field(0x084, 4, readable=False),
        "queue_driver_lo": Field(0x090, 4, readable=False), "queue_driver_hi": Field(0x094, 4, readable=False),
        "queue_device_lo": Field(0x0A0, 4, readable=False), "queue_device_hi": Field(0x0A4, 4, readable=False),
        "queue_reset": Field(0x0C0, 4),
    },
}


@dataclass
class Rig:
    kind: str
    m: Machine
    dev: VirtioDevice
    t: PciTransport | MmioTransport
    name: str
    guests: list[GuestDevice] = field(default_factory=list)

    def readable(self, name: str) -> bool:
        return FIELDS[self.kind][name].readable

    def r(self, name: str) -> int:
        f = FIELDS[self.kind][name]
        if isinstance(self.t, PciTransport):
            return self.t.read(Space.BAR, f.offset, f.width)
        return self.t.read(f.offset, f.width)

    def w(self, name: str, value: int) -> None:
        f = FIELDS[self.kind][name]
        if isinstance(self.t, PciTransport):
            self.t.write(Space.BAR, f.offset, f.width, value)
        else:
            self.t.write(f.offset, f.width, value)

    def config_read(self, offset: int, width: int) -> int:
        """Raw device config read at the intercept, any width."""
        if isinstance(self.t, PciTransport):
            return self.t.read(Space.BAR, PCI_DEVCFG + offset, width)
        return self.t.read(CONFIG_OFF + offset, width)

    def config_write(self, offset: int, width: int, value: int) -> None:
        if isinstance(self.t, PciTransport):
            self.t.write(Space.BAR, PCI_DEVCFG + offset, width, value)
        else:
            self.t.write(CONFIG_OFF + offset, width, value)

    def backend(self) -> InProcBackend:
        assert isinstance(self.dev.backend, InProcBackend)
        return self.dev.backend

    def blk(self) -> BlkModel:
        model = self.backend().model
        assert isinstance(model, BlkModel)
        return model

    def guest_transport(self) -> GuestTransport:
        return self.m.guest_transport(self.name)

    def guest(self) -> GuestDevice:
        g = self.m.guest(self.name)
        self.guests.append(g)
        return g

    def negotiate(self, features: int) -> None:
        """Raw init up to FEATURES_OK with *features* (ACKNOWLEDGE|DRIVER set if not yet)."""
        if self.r("status") != ADS:
            self.w("status", Status.ACKNOWLEDGE)
            self.w("status", ADS)
        for word in range(2):
            self.w("driver_feature_select", word)
            self.w("driver_feature", features >> (32 * word) & 0xFFFFFFFF)
        self.w("status", ADS | Status.FEATURES_OK)

    def program_queue(self, index: int, size: int, base: int) -> None:
        """Program queue *index* with rings at *base* (desc), +0x1000 (driver), +0x2000 (device)."""
        self.w("queue_select", index)
        self.w("queue_size", size)
        for area, addr in (("desc", base), ("driver", base + 0x1000), ("device", base + 0x2000)):
            self.w(f"queue_{area}_lo", addr & 0xFFFFFFFF)
            self.w(f"queue_{area}_hi", addr >> 32)


async def make_rig(kind: str, device: str = "blk") -> Rig:
    m = Machine(32 << 20)
    options = ({"device": "blk", "queues": NUM_QUEUES, "size": DISK_BYTES} if device == "blk"
               else {"device": device})
    name = f"{device}0"
    dev = await m.add_device(DeviceConfig(name, "inproc", options, transport=kind))
    return Rig(kind, m, dev, m.slots[name].transport, name)


async def close_rig(r: Rig) -> None:
    for g in r.guests:
        g.close()
    await r.m.close()


@pytest.fixture
async def rig(transport: str) -> AsyncIterator[Rig]:
    r = await make_rig(transport)
    yield r
    await close_rig(r)


@pytest.fixture
async def rng(transport: str) -> AsyncIterator[Rig]:
    r = await make_rig(transport, "rng")
    yield r
    await close_rig(r)


# ---------------------------------------------------------------------------- features


async def test_device_feature_words(rig: Rig) -> None:
    with no_faults(rig.dev):
        assert rig.r("device_feature") == BLK_OFFERED & 0xFFFFFFFF == 0x3000_1A44
        rig.w("device_feature_select", 1)
        assert rig.r("device_feature") == BLK_OFFERED >> 32 == 0x105
        for word in (2, 3, 4, 0xFFFFFFFF):
            rig.w("device_feature_select", word)
            assert rig.r("device_feature") == 0
        rig.w("device_feature_select", 0)
        assert rig.r("device_feature") == 0x3000_1A44
    assert rig.guest_transport().device_features() == BLK_OFFERED


async def test_driver_feature_words(rig: Rig) -> None:
    with no_faults(rig.dev):
        rig.w("driver_feature_select", 1)
        rig.w("driver_feature", 0x1)
        rig.w("driver_feature_select", 0)
        rig.w("driver_feature", int(BlkFeature.FLUSH))
    assert rig.dev.driver_features == int(Feature.VERSION_1 | BlkFeature.FLUSH)
    with faults(rig.dev, {GuestFault.FEATURES_REFUSED: 1}):
        rig.w("driver_feature_select", 4)                  # past the last word
        rig.w("driver_feature", 0xFFFFFFFF)
    assert rig.dev.driver_features == int(Feature.VERSION_1 | BlkFeature.FLUSH)


async def test_features_ok_with_unoffered_feature_does_not_stick(rig: Rig) -> None:
    with faults(rig.dev, {GuestFault.FEATURES_REFUSED: 1}):
        rig.negotiate(int(Feature.VERSION_1 | BlkFeature.GEOMETRY))   # bit 4, not offered
        assert rig.r("status") == ADS
    with faults(rig.dev, {GuestFault.FEATURES_REFUSED: 1}):
        rig.negotiate(int(Feature.VERSION_1 | Feature.IN_ORDER))     # transport bit, not offered
        assert rig.r("status") == ADS
    with faults(rig.dev, {GuestFault.FEATURES_REFUSED: 1}):
        rig.negotiate(int(BlkFeature.FLUSH))           # offered, but VERSION_1 missing
        assert rig.r("status") == ADS
    with no_faults(rig.dev):
        rig.negotiate(int(Feature.VERSION_1 | BlkFeature.FLUSH))
        assert rig.r("status") == ADS | Status.FEATURES_OK


@pytest.mark.parametrize("bit", [44, 50, 63])
async def test_features_ok_with_unoffered_high_bit_does_not_stick(rig: Rig, bit: int) -> None:
    """Regression: offered features held as a Feature IntFlag made `~offered` cover bits 0..43 only."""
    with faults(rig.dev, {GuestFault.FEATURES_REFUSED: 1}):
        rig.negotiate(int(Feature.VERSION_1) | 1 << bit)
        assert rig.r("status") == ADS


async def test_refused_features_ok_with_driver_ok_in_one_write(rig: Rig) -> None:
    """Regression: a refused FEATURES_OK written with DRIVER_OK left DRIVER_OK set (status 0x07)."""
    rig.w("status", Status.ACKNOWLEDGE)
    rig.w("status", ADS)
    rig.w("driver_feature_select", 0)
    rig.w("driver_feature", int(BlkFeature.GEOMETRY))  # not offered, and no VERSION_1
    with faults(rig.dev, {GuestFault.FEATURES_REFUSED: 1}):
        rig.w("status", ADS | Status.FEATURES_OK | Status.DRIVER_OK)
    assert rig.r("status") == ADS
    await rig.dev.settle()
    assert not rig.dev.started and rig.r("status") == ADS


async def test_features_ok_and_driver_ok_in_one_write_starts_device(rig: Rig) -> None:
    """Regression: the DRIVER_OK of a combined FEATURES_OK|DRIVER_OK write never started the device."""
    rig.w("status", Status.ACKNOWLEDGE)
    rig.w("status", ADS)
    rig.w("driver_feature_select", 1)
    rig.w("driver_feature", 1)                         # VERSION_1
    rig.w("status", ADS | Status.FEATURES_OK | Status.DRIVER_OK)
    assert rig.r("status") == 0x0F
    # no settle(): it would queue a reconcile itself
    await wait_until(lambda: rig.dev.started, timeout=0.2, what="the device to start")


async def test_driver_features_after_features_ok_ignored(rig: Rig) -> None:
    rig.negotiate(int(Feature.VERSION_1))
    assert rig.r("status") == ADS | Status.FEATURES_OK
    with faults(rig.dev, {GuestFault.FEATURES_LATE: 2}):
        rig.w("driver_feature_select", 0)
        rig.w("driver_feature", int(BlkFeature.FLUSH))
        rig.w("driver_feature_select", 1)
        rig.w("driver_feature", 0)
    if rig.readable("driver_feature"):                 # write-only on MMIO
        assert rig.r("driver_feature") == 1
        rig.w("driver_feature_select", 0)
        assert rig.r("driver_feature") == 0
    assert rig.dev.driver_features == Feature.VERSION_1


# ---------------------------------------------------------------------------- status


async def test_device_status_sequence(rig: Rig) -> None:
    with no_faults(rig.dev):
        assert rig.r("status") == 0
        rig.w("status", Status.ACKNOWLEDGE)
        assert rig.r("status") == 0x01
        rig.w("status", ADS)
        assert rig.r("status") == 0x03
        rig.w("driver_feature", 0)
        rig.w("driver_feature_select", 1)
        rig.w("driver_feature", 1)                     # VERSION_1
        rig.w("status", ADS | Status.FEATURES_OK)
        assert rig.r("status") == 0x0B
        rig.w("status", ADS | Status.FEATURES_OK | Status.DRIVER_OK)
        assert rig.r("status") == 0x0F
        await rig.dev.settle()
        assert rig.dev.started and rig.r("status") == 0x0F
    with faults(rig.dev, {GuestFault.STATUS_CLEAR: 1}):
        rig.w("status", 0x03)
    assert rig.r("status") == 0x0F
    rig.w("status", 0)
    await rig.dev.settle()
    assert rig.r("status") == 0 and not rig.dev.started


async def test_status_bits_out_of_order_refused(rig: Rig) -> None:
    with faults(rig.dev, {GuestFault.STATUS_ORDER: 1}):
        rig.w("status", Status.ACKNOWLEDGE | Status.DRIVER_OK)
    assert rig.r("status") == Status.ACKNOWLEDGE


async def test_status_bits_cleared_without_reset_ignored(rig: Rig) -> None:
    rig.negotiate(int(Feature.VERSION_1))
    with faults(rig.dev, {GuestFault.STATUS_CLEAR: 2}):
        rig.w("status", Status.ACKNOWLEDGE)
        rig.w("status", Status.DRIVER | Status.FEATURES_OK)
    assert rig.r("status") == ADS | Status.FEATURES_OK


async def test_reset_before_driver_ok_is_immediate(rig: Rig) -> None:
    rig.negotiate(int(Feature.VERSION_1))
    rig.w("status", 0)
    assert rig.r("status") == 0


# ---------------------------------------------------------------------------- config generation and space


async def test_config_generation(rig: Rig) -> None:
    assert rig.r("config_generation") == 0
    new = bytearray(rig.dev.config)
    new[0:8] = struct.pack("<Q", 1234)
    rig.dev.update_config(bytes(new))
    assert rig.r("config_generation") == 1
    assert rig.config_read(0, 4) == 1234
    rig.dev.update_config(bytes(new))                  # no change, no bump
    assert rig.r("config_generation") == 1
    # a change the backend makes on its own (writeback toggled), picked up by the worker
    assert rig.config_read(32, 1) == 1
    rig.backend().change_config(writeback=0)
    await rig.dev.settle()
    assert rig.r("config_generation") == 2
    assert rig.config_read(32, 1) == 0
    with faults(rig.dev, {GuestFault.READ_ONLY: 1}):
        rig.w("config_generation", 5)
    assert rig.r("config_generation") == 2
    # 8-bit counter wraps
    rig.dev.config_generation = 0xFF
    rig.dev.update_config(bytes(64))
    assert rig.r("config_generation") == 0


async def test_device_config_widths(rig: Rig) -> None:
    gt = rig.guest_transport()
    with no_faults(rig.dev):
        assert gt.read_config(0, 4) == CAPACITY_SECTORS       # 0x800
        assert gt.read_config(4, 4) == 0
        assert gt.read_config(0, 2) == 0x800
        assert gt.read_config(2, 2) == 0
        assert gt.read_config(1, 1) == 0x08
        assert gt.read_config(0, 1) == 0
        assert gt.read_config(12, 4) == 126                    # seg_max
        assert gt.read_config(20, 4) == 512                    # blk_size
        assert gt.read_config(32, 1) == 1                      # writeback
        assert gt.read_config(34, 2) == NUM_QUEUES             # num_queues
        assert gt.read_config(56, 4) == 0                      # last in-range dword
    with faults(rig.dev, {GuestFault.BAD_WIDTH: 3}):
        assert rig.config_read(0, 8) == 0
        assert rig.config_read(0, 3) == 0
        rig.config_write(0, 3, 0xFFFFFF)
    assert rig.config_read(0, 4) == CAPACITY_SECTORS


async def test_device_config_out_of_range(rig: Rig) -> None:
    gt = rig.guest_transport()
    with faults(rig.dev, {GuestFault.CONFIG_RANGE: 6}):
        assert gt.read_config(58, 4) == 0                      # straddles the end (60 bytes)
        assert gt.read_config(60, 1) == 0
        assert gt.read_config(0x100, 4) == 0
        assert gt.read_config(0xFFC, 4) == 0
        gt.write_config(59, 2, 0xFFFF)
        gt.write_config(60, 1, 0xFF)
    assert bytes(rig.dev.config[56:60]) == bytes(4)


async def test_device_config_write_reaches_backend(rig: Rig) -> None:
    gt = rig.guest_transport()
    with no_faults(rig.dev):
        gt.write_config(32, 1, 0)                              # writeback -> writethrough
        assert gt.read_config(32, 1) == 0
    await rig.dev.settle()
    assert rig.blk().writeback == 0


async def test_rng_has_no_config_space(rng: Rig) -> None:
    with faults(rng.dev, {GuestFault.CONFIG_RANGE: 1}):
        assert rng.config_read(0, 4) == 0


# ---------------------------------------------------------------------------- queues


async def test_queue_reset_requires_ring_reset(rig: Rig) -> None:
    rig.negotiate(int(Feature.VERSION_1))
    rig.program_queue(0, 16, 0x1_0000)
    rig.w("queue_ready", 1)
    with faults(rig.dev, {GuestFault.READ_ONLY: 1}):
        rig.w("queue_reset", 1)
    assert rig.r("queue_reset") == 0 and rig.r("queue_ready") == 1
