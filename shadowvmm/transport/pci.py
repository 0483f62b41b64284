"""virtio-pci modern transport (virtio v1.4 §4.1).

One memory BAR (BAR 4, 64-bit, 32 KiB) holds every virtio structure; the
PCI configuration space carries an MSI-X capability and the virtio vendor
capabilities pointing into it:

======  ========  ==============================================
offset  size      structure
======  ========  ==============================================
0x0000  0x1000    common configuration (``virtio_pci_common_cfg``)
0x1000  0x1000    ISR status
0x2000  0x1000    device-specific configuration
0x3000  0x1000    notifications (``notify_off_multiplier`` = 4)
0x4000  0x1000    MSI-X table
0x5000  0x1000    MSI-X pending bit array
======  ========  ==============================================

Every guest access enters through :meth:`PciTransport.read` /
:meth:`PciTransport.write` (the one intercept path).
"""

from __future__ import annotations

import enum
import struct

from ..device import VirtioDevice
from ..errors import ArgumentError
from ..shadow import GuestFault
from ..state import TransportImage
from ..virtio.constants import DeviceId
from .registers import WIDTH_MASK, Access, Register, RegisterFile

VENDOR_ID = 0x1AF4
DEVICE_ID_BASE = 0x1040            #: v1.4 §4.1.2: 0x1040 + virtio device ID
BAR_INDEX = 4
BAR_SIZE = 0x8000
COMMON_OFF, ISR_OFF, DEVICE_OFF, NOTIFY_OFF, MSIX_TABLE_OFF, MSIX_PBA_OFF = (
    0x0000, 0x1000, 0x2000, 0x3000, 0x4000, 0x5000)
REGION_SIZE = 0x1000
_REGION_MASK, _OFFSET_MASK = ~(REGION_SIZE - 1), REGION_SIZE - 1      #: a BAR offset's region, offset in it
NOTIFY_MULTIPLIER = 4
#: v1.3+ structure (ends after admin_queue_num at 0x3E) plus shadowvmm's le32 queue_ring_state at
#: 0x40 (VIRTIO_F_RING_STATE, docs/nested.md), always covered: without the feature it reads 0.
COMMON_CFG_SIZE = 0x44
QUEUE_RING_STATE = 0x40
CONFIG_SPACE_SIZE = 256


class Space(enum.Enum):
    """Address spaces a guest accesses on a PCI function."""

    CONFIG = "pci-config"
    BAR = "bar4"


class CapType(enum.IntEnum):
    """virtio vendor capability cfg_type values (v1.4 §4.1.4)."""

    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI_CFG = 5
    SHARED_MEMORY = 8
    VENDOR = 9


PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11
MSIX_CTRL_ENABLE = 0x8000
MSIX_CTRL_MASKALL = 0x4000

#: PCI class code per device type (base class, subclass), as QEMU assigns them.
CLASS_CODES = {DeviceId.NET: 0x0200, DeviceId.BLOCK: 0x0180, DeviceId.FS: 0x0180,
               DeviceId.RNG: 0x00FF, DeviceId.CONSOLE: 0x0780}

_VIRTIO_CAP = struct.Struct("<BBBBBBxxII")   #: struct virtio_pci_cap (v1.4 §4.1.4)


class PciTransport:
    """virtio-pci modern register emulation for one :class:`VirtioDevice`."""

    def __init__(self, device: VirtioDevice) -> None:
        if device.interrupts is None:
            raise ArgumentError("realize the device before building its transport")
        self.device = device
        self.faults = device.faults
        self.config_space = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        self.msix_table = bytearray(16 * device.interrupts.vectors)
        self.common = RegisterFile("common_cfg", self._common_table(), self.faults)
        self.isr = RegisterFile("isr", [Register(0, 1, "isr", Access.R, device.read_isr)],
                                self.faults)
        self._build_config_space()

    # ------------------------------------------------------------------ state

    def save_state(self) -> TransportImage:
        """The PCI function's own state: config space, its guest-writable mask, MSI-X table."""
        return TransportImage("pci", bytes(self.config_space), bytes(self.wmask), bytes(self.msix_table))

    def load_state(self, image: TransportImage) -> None:
        """Take a saved config space and MSI-X table (the same sizes as this function's: see
        :meth:`~shadowvmm.device.VirtioDevice.check_import`); the writable mask is this function's own."""
        if image.kind != "pci" or image.pci_config_space is None or image.msix_table is None:
            raise ArgumentError(f"a PCI transport cannot load the state of a {image.kind} transport")
        self.config_space[:] = image.pci_config_space
        self.msix_table[:] = image.msix_table

    # ------------------------------------------------------------------ tables

    def _common_table(self) -> list[Register]:
        d = self.device
        R, RW = Access.R, Access.RW

        def sel(attr: str):
            return lambda v: setattr(d, attr, v)

        def qget(attr: str, default: int = 0):
            def read() -> int:
                q = d.selected_queue()
                return default if q is None else int(getattr(q, attr))
            return read

        def addr(field_name: str, high: bool):
            def read() -> int:
                q = d.selected_queue()
                value = 0 if q is None else getattr(q, field_name)
                return value >> 32 if high else value & 0xFFFFFFFF
            return read

        def addr_write(field_name: str, high: bool):
            return lambda v: d.write_queue_addr(field_name, v, high)

        regs = [
            Register(0x00, 4, "device_feature_select", RW, lambda: d.device_feature_select,
                     sel("device_feature_select")),
            Register(0x04, 4, "device_feature", R, d.read_device_features),
            Register(0x08, 4, "driver_feature_select", RW, lambda: d.driver_feature_select,
                     sel("driver_feature_select")),
            Register(0x0C, 4, "driver_feature", RW, d.read_driver_features,
                     d.write_driver_features),
            Register(0x10, 2, "config_msix_vector", RW, lambda: d.config_msix_vector,
                     d.write_config_vector),
            Register(0x12, 2, "num_queues", R, lambda: d.num_queues),
            Register(0x14, 1, "device_status", RW, d.read_status, d.write_status),
            Register(0x15, 1, "config_generation", R, lambda: d.config_generation),
            Register(0x16, 2, "queue_select", RW, lambda: d.queue_select, sel("queue_select")),
            Register(0x18, 2, "queue_size", RW, qget("size"), d.write_queue_size),
            Register(0x1A, 2, "queue_msix_vector", RW, qget("msix_vector", 0xFFFF),
                     d.write_queue_vector),
            Register(0x1C, 2, "queue_enable", RW, qget("enabled"), d.write_queue_enable),
            Register(0x1E, 2, "queue_notify_off", R, qget("notify_off")),
            Register(0x38, 2, "queue_notify_data", R, qget("index")),
            Register(0x3A, 2, "queue_reset", RW, qget("resetting"), d.write_queue_reset),
            # The admin queue follows the others (v1.4 §4.1.4.3); num_queues does not count it.
            Register(0x3C, 2, "admin_queue_index", R, lambda: d.num_queues),
            Register(0x3E, 2, "admin_queue_num", R, lambda: int(d.admin_queue is not None)),
            Register(QUEUE_RING_STATE, 4, "queue_ring_state", RW, d.read_ring_state, d.write_ring_state),
        ]
        for base, name in ((0x20, "desc"), (0x28, "driver"), (0x30, "device")):
            regs.append(Register(base, 4, f"queue_{name}_lo", RW, addr(name, False),
                                 addr_write(name, False)))
            regs.append(Register(base + 4, 4, f"queue_{name}_hi", RW, addr(name, True),
                                 addr_write(name, True)))
        return regs

    def _build_config_space(self) -> None:
        d = self.device
        cs = self.config_space
        struct.pack_into("<HH", cs, 0x00, VENDOR_ID, DEVICE_ID_BASE + int(d.device_id))
        struct.pack_into("<H", cs, 0x06, 0x0010)                # status: capabilities list
        cs[0x08] = 1                                            # revision >= 1 (non-transitional)
        struct.pack_into("<H", cs, 0x0A, CLASS_CODES.get(d.device_id, 0xFF00))
        struct.pack_into("<I", cs, 0x10 + 4 * BAR_INDEX, 0x0C)  # 64-bit prefetchable memory BAR
        struct.pack_into("<HH", cs, 0x2C, VENDOR_ID, 0x40 + int(d.device_id) % 0x10000)
        cs[0x34] = 0x40                                          # capabilities pointer
        cs[0x3D] = 1                                             # interrupt pin INTA
        self.wmask[0x04:0x06] = b"\x06\x04"                      # command: memory, master, INTx disable
        self.wmask[0x3C] = 0xFF                                  # interrupt line
        bar = 0x10 + 4 * BAR_INDEX
        struct.pack_into("<II", self.wmask, bar, ~(BAR_SIZE - 1) & 0xFFFFFFF0, 0xFFFFFFFF)
        vectors = d.interrupts.vectors if d.interrupts else 1
        # MSI-X capability (PCI Local Bus 3.0 §6.8.2)
        struct.pack_into("<BBHII", cs, 0x40, PCI_CAP_ID_MSIX, 0x50, vectors - 1,
                         MSIX_TABLE_OFF | BAR_INDEX, MSIX_PBA_OFF | BAR_INDEX)
        struct.pack_into("<H", self.wmask, 0x42, MSIX_CTRL_ENABLE | MSIX_CTRL_MASKALL)
        caps = [(CapType.COMMON, COMMON_OFF, COMMON_CFG_SIZE, b""),
                (CapType.NOTIFY, NOTIFY_OFF,
                 max(2, NOTIFY_MULTIPLIER * (d.num_queues + int(d.admin_queue is not None))),
                 struct.pack("<I", NOTIFY_MULTIPLIER)),
                (CapType.ISR, ISR_OFF, 1, b"")]
        if d.config:
            caps.append((CapType.DEVICE, DEVICE_OFF, len(d.config), b""))
        caps.append((CapType.PCI_CFG, 0, 0, b"\0\0\0\0"))
        pos = 0x50
        self.pci_cfg_cap = 0
        for i, (cfg_type, offset, length, extra) in enumerate(caps):
            cap_len = _VIRTIO_CAP.size + len(extra)
            nxt = 0 if i == len(caps) - 1 else (pos + cap_len + 3) & ~3
            bar = 0 if cfg_type is CapType.PCI_CFG else BAR_INDEX
            _VIRTIO_CAP.pack_into(cs, pos, PCI_CAP_ID_VNDR, nxt, cap_len, cfg_type, bar, 0,
                                  offset, length)
            cs[pos + _VIRTIO_CAP.size:pos + cap_len] = extra
            if cfg_type is CapType.PCI_CFG:
                self.pci_cfg_cap = pos
                self.wmask[pos + 4] = 0xFF                       # bar
                self.wmask[pos + 8:pos + 16] = b"\xff" * 8       # offset, length
                self.wmask[pos + 16:pos + 20] = b"\xff" * 4      # pci_cfg_data
            pos = nxt

    # ------------------------------------------------------------------ intercept path

    def read(self, space: Space, offset: int, width: int) -> int:
        """Every guest read enters here."""
        if space is Space.BAR:
            if offset & _REGION_MASK == COMMON_OFF:        # the common case, one call shorter
                return self.common.read(offset & _OFFSET_MASK, width)
            return self.bar_read(offset, width)
        return self.config_read(offset, width)

    def write(self, space: Space, offset: int, width: int, value: int) -> None:
        """Every guest write enters here; a write carries *width* bytes, so the value is
        truncated to them (a bus cannot deliver more)."""
        mask = WIDTH_MASK.get(width)
        if mask is not None:
            value = int(value) & mask
        if space is Space.BAR:
            if offset & _REGION_MASK == COMMON_OFF:        # the common case, one call shorter
                self.common.write(offset & _OFFSET_MASK, width, value)
            else:
                self.bar_write(offset, width, value)
        else:
            self.config_write(offset, width, value)

    def bar_read(self, offset: int, width: int) -> int:
        region, off = offset & _REGION_MASK, offset & _OFFSET_MASK
        if region == COMMON_OFF:
            return self.common.read(off, width)
        if region == DEVICE_OFF:
            return self.device.read_config(off, width) if width in (1, 2, 4) else self._bad_width(offset, width)
        if region == ISR_OFF:
            return self.isr.read(off, width)
        if region == MSIX_TABLE_OFF and width == 4 and off + 4 <= len(self.msix_table):
            return int.from_bytes(self.msix_table[off:off + 4], "little")
        if region == MSIX_PBA_OFF:
            return 0
        if region == NOTIFY_OFF:
            self.faults(GuestFault.WRITE_ONLY, f"notify read at {offset:#x}")
            return 0
        self.faults(GuestFault.UNKNOWN_OFFSET, f"bar read {offset:#x}")
        return 0

    def bar_write(self, offset: int, width: int, value: int) -> None:
        region, off = offset & _REGION_MASK, offset & _OFFSET_MASK
        if region == NOTIFY_OFF:
            if width != 2 or off % NOTIFY_MULTIPLIER:
                self.faults(GuestFault.BAD_WIDTH, f"notify write {off:#x}/{width}")
                return
            self.device.notify(off // NOTIFY_MULTIPLIER)
        elif region == COMMON_OFF:
            self.common.write(off, width, value)
        elif region == DEVICE_OFF:
            if width in (1, 2, 4):
                self.device.write_config(off, width, value)
            else:
                self._bad_width(offset, width)
        elif region == MSIX_TABLE_OFF and width == 4 and off + 4 <= len(self.msix_table):
            self.msix_table[off:off + 4] = value.to_bytes(4, "little")
        elif region == ISR_OFF:
            self.faults(GuestFault.READ_ONLY, "isr")
        else:
            self.faults(GuestFault.UNKNOWN_OFFSET, f"bar write {offset:#x}")

    def _bad_width(self, offset: int, width: int) -> int:
        self.faults(GuestFault.BAD_WIDTH, f"bar {offset:#x} width {width}")
        return 0

    def config_read(self, offset: int, width: int) -> int:
        if width not in (1, 2, 4) or offset % width or offset + width > CONFIG_SPACE_SIZE:
            self.faults(GuestFault.BAD_WIDTH, f"config read {offset:#x}/{width}")
            return 0xFFFFFFFF >> (32 - 8 * width) if width in (1, 2, 4) else 0
        cap = self.pci_cfg_cap
        if cap and offset == cap + 16:
            return self._pci_cfg_window(None)
        value = int.from_bytes(self.config_space[offset:offset + width], "little")
        if offset <= 0x06 < offset + width:
            value |= self._interrupt_status() << (8 * (0x06 - offset))
        return value

    def _interrupt_status(self) -> int:
        """PCI Status bit 3 mirrors the ISR while INTx is in use (v1.4 §4.1.4.5.1)."""
        ints = self.device.interrupts
        return 0x08 if self.device.isr and ints is not None and not ints.msix_enabled else 0

    def config_write(self, offset: int, width: int, value: int) -> None:
        if width not in (1, 2, 4) or offset % width or offset + width > CONFIG_SPACE_SIZE:
            self.faults(GuestFault.BAD_WIDTH, f"config write {offset:#x}/{width}")
            return
        cap = self.pci_cfg_cap
        if cap and offset == cap + 16:
            self._pci_cfg_window(value)
            return
        cs, wm = self.config_space, self.wmask
        for i in range(width):
            byte = value >> (8 * i) & 0xFF
            cs[offset + i] = (cs[offset + i] & ~wm[offset + i]) | (byte & wm[offset + i])
        if offset <= 0x42 < offset + width or offset <= 0x43 < offset + width:
            self._msix_control_changed()

    def _msix_control_changed(self) -> None:
        ctrl = struct.unpack_from("<H", self.config_space, 0x42)[0]
        enabled = bool(ctrl & MSIX_CTRL_ENABLE)
        ints = self.device.interrupts
        if ints is not None and ints.msix_enabled != enabled:
            ints.msix_enabled = enabled
            self.device.interrupt_routing_changed()

    def _pci_cfg_window(self, value: int | None) -> int:
        """VIRTIO_PCI_CAP_PCI_CFG access window (v1.4 §4.1.4.9)."""
        cap = self.pci_cfg_cap
        bar = self.config_space[cap + 4]
        offset, length = struct.unpack_from("<II", self.config_space, cap + 8)
        if bar != BAR_INDEX or length not in (1, 2, 4) or offset % length:
            self.faults(GuestFault.BAD_WIDTH, f"pci_cfg window bar {bar} len {length}")
            return 0
        if value is None:
            return self.bar_read(offset, length)
        self.bar_write(offset, length, value & ((1 << (8 * length)) - 1))
        return 0
