"""The guest's view of a virtio transport: register reads and writes only.

A guest driver model talks to the device exclusively through the VMM's
intercept path (:meth:`PciTransport.read`/``write``, :meth:`MmioTransport.read`/
``write``), exactly as a guest kernel's virtio_pci / virtio_mmio drivers do.
Every ``device_status`` value the guest reads is recorded in
:attr:`GuestTransport.status_log` so tests can check what the guest saw; with a
:class:`~shadowvmm.timeline.Tap` in :attr:`timeline`, the status writes and every change of
the value read go on the timeline too.
"""

from __future__ import annotations

from typing import Protocol

from ..errors import ArgumentError
from ..timeline import EventKind, Tap
from ..transport.mmio import QUEUE_RING_STATE as MMIO_RING_STATE
from ..transport.mmio import MmioTransport
from ..transport.pci import (
    BAR_INDEX,
    DEVICE_OFF,
    MSIX_CTRL_ENABLE,
    PCI_CAP_ID_MSIX,
    PCI_CAP_ID_VNDR,
    QUEUE_RING_STATE,
    CapType,
    PciTransport,
    Space,
)


class StatusLog:
    """Distinct consecutive status values the guest read, with counts.

    With a *timeline*, each read of a new value is recorded as STATUS_READ (``value``, and
    ``reads``: the reads so far; a driver polls, so unchanged values are not repeated).
    """

    def __init__(self) -> None:
        self.reads = 0
        self.values: list[int] = []
        self.timeline: Tap | None = None

    def record(self, value: int) -> None:
        self.reads += 1
        if not self.values or self.values[-1] != value:
            self.values.append(value)
            if self.timeline is not None:
                self.timeline.record(EventKind.STATUS_READ, value=value, reads=self.reads)

    def wrote(self, value: int) -> None:
        """The guest wrote *value* to device_status (recorded on the timeline, if any)."""
        if self.timeline is not None:
            self.timeline.record(EventKind.STATUS_WRITE, value=value)


class GuestTransport(Protocol):
    """Transport-independent register operations a virtio driver needs."""

    status_log: StatusLog
    uses_msix: bool

    def get_status(self) -> int: ...
    def set_status(self, value: int) -> None: ...
    def device_features(self) -> int: ...
    def set_driver_features(self, value: int) -> None: ...
    def num_queues(self) -> int: ...
    def queue_max_size(self, index: int) -> int: ...
    def setup_queue(self, index: int, size: int, desc: int, driver: int, device: int,
                    vector: int) -> None: ...
    def enable_queue(self, index: int) -> None: ...
    def reset_queue(self, index: int) -> None: ...
    def ring_state(self, index: int) -> int: ...
    def set_ring_state(self, index: int, value: int) -> None: ...
    def notify(self, index: int) -> None: ...
    def config_generation(self) -> int: ...
    def read_config(self, offset: int, width: int) -> int: ...
    def write_config(self, offset: int, width: int, value: int) -> None: ...
    def set_config_vector(self, vector: int) -> None: ...
    def interrupt_status(self) -> int: ...
    async def settle(self) -> None: ...


class PciGuestTransport:
    """A virtio_pci modern driver's register accesses (v1.4 §4.1.3-4.1.5).

    It discovers the structures by walking the vendor capability list in PCI
    config space, like Linux's ``virtio_pci_modern_probe``.
    """

    def __init__(self, transport: PciTransport, *, msix: bool = True) -> None:
        self.t = transport
        self.status_log = StatusLog()
        self.uses_msix = msix
        self.caps: dict[int, tuple[int, int, int]] = {}
        self.notify_multiplier = 0
        self.msix_cap = 0
        pos = self.t.read(Space.CONFIG, 0x34, 1)
        while pos:
            cap_id = self.t.read(Space.CONFIG, pos, 1)
            nxt = self.t.read(Space.CONFIG, pos + 1, 1)
            if cap_id == PCI_CAP_ID_VNDR:
                cfg_type = self.t.read(Space.CONFIG, pos + 3, 1)
                bar = self.t.read(Space.CONFIG, pos + 4, 1)
                offset = self.t.read(Space.CONFIG, pos + 8, 4)
                length = self.t.read(Space.CONFIG, pos + 12, 4)
                if cfg_type not in self.caps and (bar == BAR_INDEX or cfg_type == CapType.PCI_CFG):
                    self.caps[cfg_type] = (bar, offset, length)
                if cfg_type == CapType.NOTIFY:
                    self.notify_multiplier = self.t.read(Space.CONFIG, pos + 16, 4)
            elif cap_id == PCI_CAP_ID_MSIX:
                self.msix_cap = pos
            pos = nxt
        for needed in (CapType.COMMON, CapType.NOTIFY, CapType.ISR):
            if needed not in self.caps:
                raise ArgumentError(f"virtio-pci capability {needed.name} missing")
        self.common = self.caps[CapType.COMMON][1]
        self.notify_base = self.caps[CapType.NOTIFY][1]
        self.isr_off = self.caps[CapType.ISR][1]
        self.device_off = self.caps.get(CapType.DEVICE, (0, DEVICE_OFF, 0))[1]
        self._status_off = self.common + 0x14
        self._notify_offs: dict[int, int] = {}
        if msix and self.msix_cap:
            ctrl = self.t.read(Space.CONFIG, self.msix_cap + 2, 2)
            self.t.write(Space.CONFIG, self.msix_cap + 2, 2, ctrl | MSIX_CTRL_ENABLE)
        else:
            self.uses_msix = False

    def _r(self, off: int, width: int) -> int:
        return self.t.read(Space.BAR, self.common + off, width)

    def _w(self, off: int, width: int, value: int) -> None:
        self.t.write(Space.BAR, self.common + off, width, value)

    def get_status(self) -> int:
        value = self.t.read(Space.BAR, self._status_off, 1)
        self.status_log.record(value)
        return value

    def set_status(self, value: int) -> None:
        self.status_log.wrote(value)
        self.t.write(Space.BAR, self._status_off, 1, value)

    def device_features(self) -> int:
        value = 0
        for word in range(2):
            self._w(0x00, 4, word)
            value |= self._r(0x04, 4) << (32 * word)
        return value

    def set_driver_features(self, value: int) -> None:
        for word in range(2):
            self._w(0x08, 4, word)
            self._w(0x0C, 4, value >> (32 * word) & 0xFFFFFFFF)

    def driver_features(self) -> int:
        value = 0
        for word in range(2):
            self._w(0x08, 4, word)
            value |= self._r(0x0C, 4) << (32 * word)
        return value

    def num_queues(self) -> int:
        return self._r(0x12, 2)

    def queue_max_size(self, index: int) -> int:
        self._w(0x16, 2, index)
        return self._r(0x18, 2)

    def setup_queue(self, index: int, size: int, desc: int, driver: int, device: int,
                    vector: int) -> None:
        self._w(0x16, 2, index)
        self._w(0x18, 2, size)
        for off, value in ((0x20, desc), (0x28, driver), (0x30, device)):
            self._w(off, 4, value & 0xFFFFFFFF)
            self._w(off + 4, 4, value >> 32)
        if self.uses_msix:
            self._w(0x1A, 2, vector)
        self._notify_offs[index] = self.queue_notify_off(index)

    def queue_notify_off(self, index: int) -> int:
        """Where queue *index*'s notifications go in the notify structure: queue_notify_off times
        notify_off_multiplier (v1.4 §4.1.4.4); read-only, readable at any time."""
        self._w(0x16, 2, index)
        return self._r(0x1E, 2) * self.notify_multiplier

    def admin_queues(self) -> tuple[int, int]:
        """``(admin_queue_index, admin_queue_num)`` of the common cfg (v1.4 §4.1.4.3)."""
        return self._r(0x3C, 2), self._r(0x3E, 2)

    def queue_vector(self, index: int) -> int:
        self._w(0x16, 2, index)
        return self._r(0x1A, 2)

    def enable_queue(self, index: int) -> None:
        self._w(0x16, 2, index)
        self._w(0x1C, 2, 1)

    def queue_enabled(self, index: int) -> bool:
        self._w(0x16, 2, index)
        return bool(self._r(0x1C, 2))

    def reset_queue(self, index: int) -> None:
        self._w(0x16, 2, index)
        self._w(0x3A, 2, 1)

    def queue_resetting(self, index: int) -> bool:
        self._w(0x16, 2, index)
        return bool(self._r(0x3A, 2))

    def ring_state(self, index: int) -> int:
        """queue_ring_state (VIRTIO_F_RING_STATE, docs/nested.md): the vhost base encoding."""
        self._w(0x16, 2, index)
        return self._r(QUEUE_RING_STATE, 4)

    def set_ring_state(self, index: int, value: int) -> None:
        self._w(0x16, 2, index)
        self._w(QUEUE_RING_STATE, 4, value)

    def notify(self, index: int) -> None:
        """Notify queue *index*; a queue this driver did not set up itself (its configuration
        restored by an owner's DEV_PARTS_SET) has its offset read on first use."""
        off = self._notify_offs.get(index)
        if off is None:
            off = self._notify_offs[index] = self.queue_notify_off(index)
        self.t.write(Space.BAR, self.notify_base + off, 2, index)

    def config_generation(self) -> int:
        return self._r(0x15, 1)

    def read_config(self, offset: int, width: int) -> int:
        return self.t.read(Space.BAR, self.device_off + offset, width)

    def write_config(self, offset: int, width: int, value: int) -> None:
        self.t.write(Space.BAR, self.device_off + offset, width, value)

    def set_config_vector(self, vector: int) -> None:
        if self.uses_msix:
            self._w(0x10, 2, vector)

    def interrupt_status(self) -> int:
        return self.t.read(Space.BAR, self.isr_off, 1)

    async def settle(self) -> None:
        """Wait until the device has acted on every access so far (:meth:`VirtioDevice.settle`)."""
        await self.t.device.settle()


class MmioGuestTransport:
    """A virtio_mmio v2 driver's register accesses (v1.4 §4.2.3)."""

    def __init__(self, transport: MmioTransport) -> None:
        self.t = transport
        self.status_log = StatusLog()
        self.uses_msix = False
        magic, version = self.t.read(0x000, 4), self.t.read(0x004, 4)
        if magic != 0x74726976 or version != 2:
            raise ArgumentError(f"not a virtio-mmio v2 device (magic {magic:#x}, version {version})")

    def get_status(self) -> int:
        value = self.t.read(0x070, 4)
        self.status_log.record(value)
        return value

    def set_status(self, value: int) -> None:
        self.status_log.wrote(value)
        self.t.write(0x070, 4, value)

    def device_features(self) -> int:
        value = 0
        for word in range(2):
            self.t.write(0x014, 4, word)
            value |= self.t.read(0x010, 4) << (32 * word)
        return value

    def set_driver_features(self, value: int) -> None:
        for word in range(2):
            self.t.write(0x024, 4, word)
            self.t.write(0x020, 4, value >> (32 * word) & 0xFFFFFFFF)

    def num_queues(self) -> int:
        count = 0
        while self.queue_max_size(count):
            count += 1
        return count

    def queue_max_size(self, index: int) -> int:
        self.t.write(0x030, 4, index)
        return self.t.read(0x034, 4)

    def setup_queue(self, index: int, size: int, desc: int, driver: int, device: int,
                    vector: int) -> None:
        self.t.write(0x030, 4, index)
        self.t.write(0x038, 4, size)
        for off, value in ((0x080, desc), (0x090, driver), (0x0A0, device)):
            self.t.write(off, 4, value & 0xFFFFFFFF)
            self.t.write(off + 4, 4, value >> 32)

    def enable_queue(self, index: int) -> None:
        self.t.write(0x030, 4, index)
        self.t.write(0x044, 4, 1)

    def reset_queue(self, index: int) -> None:
        self.t.write(0x030, 4, index)
        self.t.write(0x0C0, 4, 1)

    def ring_state(self, index: int) -> int:
        """QueueRingState (VIRTIO_F_RING_STATE, docs/nested.md): the vhost base encoding."""
        self.t.write(0x030, 4, index)
        return self.t.read(MMIO_RING_STATE, 4)

    def set_ring_state(self, index: int, value: int) -> None:
        self.t.write(0x030, 4, index)
        self.t.write(MMIO_RING_STATE, 4, value)

    def notify(self, index: int) -> None:
        self.t.write(0x050, 4, index)

    def config_generation(self) -> int:
        return self.t.read(0x0FC, 4)

    def read_config(self, offset: int, width: int) -> int:
        return self.t.read(0x100 + offset, width)

    def write_config(self, offset: int, width: int, value: int) -> None:
        self.t.write(0x100 + offset, width, value)

    def set_config_vector(self, vector: int) -> None:
        pass

    def interrupt_status(self) -> int:
        value = self.t.read(0x060, 4)
        if value:
            self.t.write(0x064, 4, value)
        return value

    async def settle(self) -> None:
        """Wait until the device has acted on every access so far (:meth:`VirtioDevice.settle`)."""
        await self.t.device.settle()

