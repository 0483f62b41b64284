"""virtio-mmio version 2 transport (virtio v1.4 §4.2.2).

Control registers are 32-bit only; the device config space at 0x100 takes
natural-width accesses. MMIO has no MSI-X: every interrupt sets
InterruptStatus and raises the single interrupt line (``intx_fd``).
"""

from __future__ import annotations

from collections.abc import Callable

from ..device import VirtioDevice
from ..errors import ArgumentError
from ..shadow import GuestFault
from ..state import TransportImage
from .registers import WIDTH_MASK, Access, Register, RegisterFile

MAGIC = 0x74726976          #: "virt"
VERSION = 2
VENDOR_ID = 0x554D4551      #: "QEMU", as QEMU's virtio-mmio reports
CONFIG_OFF = 0x100
REGION_SIZE = 0x200
QUEUE_RING_STATE = 0x0C4    #: shadowvmm's QueueRingState (VIRTIO_F_RING_STATE, docs/nested.md)


class MmioTransport:
    """virtio-mmio v2 register emulation for one :class:`VirtioDevice`."""

    def __init__(self, device: VirtioDevice) -> None:
        if device.interrupts is None:
            raise ArgumentError("realize the device before building its transport")
        if device.admin_queue is not None:
            raise ArgumentError(f"{device.name}: virtio-mmio has no administration queue (v1.4 §2.12: PCI only)")
        self.device = device
        self.faults = device.faults
        device.interrupts.msix_enabled = False
        self.shm_select = 0
        self.regs = RegisterFile("mmio", self._table(), self.faults)

    def save_state(self) -> TransportImage:
        """virtio-mmio keeps nothing beyond the device's registers (SHMSel selects no region)."""
        return TransportImage("mmio")

    def load_state(self, image: TransportImage) -> None:
        if image.kind != "mmio":
            raise ArgumentError(f"an MMIO transport cannot load the state of a {image.kind} transport")

    def _table(self) -> list[Register]:
        d = self.device
        R, W, RW = Access.R, Access.W, Access.RW

        def sel(attr: str):
            return lambda v: setattr(d, attr, v)

        def qget(attr: str):
            def read() -> int:
                q = d.selected_queue()
                return 0 if q is None else int(getattr(q, attr))
            return read

        def addr_write(field_name: str, high: bool) -> Callable[[int], None]:
            return lambda v: d.write_queue_addr(field_name, v, high)

        def ready_write(value: int) -> None:
            if value:
                d.write_queue_enable(1)
                return
            q = d.selected_queue()
            if q is not None and q.enabled:
                d.reset_queue(q)     # v1.4 §4.2.2.2: writing 0 stops the queue

        regs = [
            Register(0x000, 4, "MagicValue", R, lambda: MAGIC),
            Register(0x004, 4, "Version", R, lambda: VERSION),
            Register(0x008, 4, "DeviceID", R, lambda: int(d.device_id)),
            Register(0x00C, 4, "VendorID", R, lambda: VENDOR_ID),
            Register(0x010, 4, "DeviceFeatures", R, d.read_device_features),
            Register(0x014, 4, "DeviceFeaturesSel", W, write=sel("device_feature_select")),
            Register(0x020, 4, "DriverFeatures", W, write=d.write_driver_features),
            Register(0x024, 4, "DriverFeaturesSel", W, write=sel("driver_feature_select")),
            Register(0x030, 4, "QueueSel", W, write=sel("queue_select")),
            Register(0x034, 4, "QueueSizeMax", R, qget("max_size")),
            Register(0x038, 4, "QueueSize", W, write=d.write_queue_size),
            Register(0x044, 4, "QueueReady", RW, qget("enabled"), ready_write),
            Register(0x050, 4, "QueueNotify", W, write=d.notify),
            Register(0x060, 4, "InterruptStatus", R, lambda: d.isr),
            Register(0x064, 4, "InterruptACK", W, write=d.ack_interrupt),
            Register(0x070, 4, "Status", RW, d.read_status, d.write_status),
            Register(0x0AC, 4, "SHMSel", W, write=lambda v: setattr(self, "shm_select", v)),
            Register(0x0B0, 4, "SHMLenLow", R, lambda: 0xFFFFFFFF),
            Register(0x0B4, 4, "SHMLenHigh", R, lambda: 0xFFFFFFFF),
            Register(0x0B8, 4, "SHMBaseLow", R, lambda: 0xFFFFFFFF),
            Register(0x0BC, 4, "SHMBaseHigh", R, lambda: 0xFFFFFFFF),
            Register(0x0C0, 4, "QueueReset", RW, qget("resetting"), d.write_queue_reset),
            Register(QUEUE_RING_STATE, 4, "QueueRingState", RW, d.read_ring_state, d.write_ring_state),
            Register(0x0FC, 4, "ConfigGeneration", R, lambda: d.config_generation),
        ]
        for base, name in ((0x080, "Desc"), (0x090, "Driver"), (0x0A0, "Device")):
            regs.append(Register(base, 4, f"Queue{name}Low", W, write=addr_write(name.lower(), False)))
            regs.append(Register(base + 4, 4, f"Queue{name}High", W, write=addr_write(name.lower(), True)))
        return regs

    def read(self, offset: int, width: int) -> int:
        """Every guest read enters here."""
        if offset >= CONFIG_OFF:
            if width not in (1, 2, 4):
                self.faults(GuestFault.BAD_WIDTH, f"config read width {width}")
                return 0
            return self.device.read_config(offset - CONFIG_OFF, width)
        return self.regs.read(offset, width)

    def write(self, offset: int, width: int, value: int) -> None:
        """Every guest write enters here; the value is truncated to the access *width*."""
        mask = WIDTH_MASK.get(width)
        if mask is not None:
            value = int(value) & mask
        if offset >= CONFIG_OFF:
            if width not in (1, 2, 4):
                self.faults(GuestFault.BAD_WIDTH, f"config write width {width}")
                return
            self.device.write_config(offset - CONFIG_OFF, width, value)
        else:
            self.regs.write(offset, width, value)
