"""The device of the layer below, as an L1 guest driver sees it: a transport and its interrupts.

:class:`LowerDevice` is what Linux's vp_vdpa gets from virtio_pci_modern in an L1: register
accesses on the L0 device's transport (common config, notify, ISR, device config) and the
interrupt lines (one eventfd per MSI-X vector, or INTx). Every status change the L1 makes is
a register write followed by polling the status until the device shows it (v1.4 §3.1.1,
§4.1.4.3.2 for reset, §3.4 for SUSPEND), so nothing here reaches into the L0 VMM.

:class:`Iommu` is what the L1 programs so that the L0 device's DMA uses L2 addresses: the
L0 machine's per-device :class:`~shadowvmm.device.DmaMap` (virtio-iommu MAP/UNMAP stand-in).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from shadowvmm.device import DmaMapping, Interrupts
from shadowvmm.errors import ArgumentError, BackendError, BackendTimeout
from shadowvmm.guest.transport import GuestTransport, PciGuestTransport
from shadowvmm.transport.pci import DEVICE_ID_BASE, CapType, Space
from shadowvmm.virtio.constants import DeviceId, Status

#: How long the lower device may take to show a status change (reset, FEATURES_OK, SUSPEND).
STATUS_TIMEOUT = 5.0
_POLL = 0.0002
_PCI_DEVICE_ID = 0x02


class Iommu(Protocol):
    """The IOMMU translation of the lower device's DMA (:class:`shadowvmm.device.DmaMap`)."""

    mappings: list[DmaMapping]

    async def program(self, mappings: list[DmaMapping]) -> None: ...


@dataclass
class LowerDevice:
    """An L0 device seen from L1: its transport, interrupts, type and config size."""

    transport: GuestTransport
    interrupts: Interrupts
    device_id: DeviceId
    config_size: int
    name: str = "lower"
    #: Every status value written, in order (tests read it).
    writes: list[int] = field(default_factory=list)
    #: How many times the status was read (the stop paths count their register accesses).
    status_reads: int = 0

    @classmethod
    def pci(cls, transport: PciGuestTransport, interrupts: Interrupts, name: str = "lower") -> LowerDevice:
        """Probe a virtio-pci device as virtio_pci_modern does: the device type from the PCI
        device id (0x1040 + type, v1.4 §4.1.2), the config size from the DEVICE_CFG capability's
        length (vp_vdpa's ``get_config_size``)."""
        pci_id = transport.t.read(Space.CONFIG, _PCI_DEVICE_ID, 2)
        try:
            device_id = DeviceId(pci_id - DEVICE_ID_BASE)
        except ValueError as exc:
            raise ArgumentError(f"{name}: PCI device id {pci_id:#x} is not a modern virtio device") from exc
        size = transport.caps.get(CapType.DEVICE, (0, 0, 0))[2]
        return cls(transport, interrupts, device_id, size, name)

    # ------------------------------------------------------------------ status

    def status(self) -> int:
        self.status_reads += 1
        return self.transport.get_status()

    def write_status(self, value: int) -> None:
        self.writes.append(value)
        self.transport.set_status(value)

    async def wait_status(self, done: Callable[[int], bool], what: str,
                          timeout: float = STATUS_TIMEOUT) -> int:
        """Poll the status until *done* holds; NEEDS_RESET or the deadline is a typed error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        spins = 0
        while True:
            value = self.status()
            if done(value):
                return value
            if value & Status.NEEDS_RESET:
                raise BackendError(f"{self.name}: device set DEVICE_NEEDS_RESET during {what} (status {value:#x})")
            if loop.time() > deadline:
                raise BackendTimeout(f"{self.name}: {what} not shown within {timeout} s (status {value:#x})")
            spins += 1
            await asyncio.sleep(0 if spins < 8 else _POLL)

    async def reset(self) -> None:
        """Write 0 and wait to read 0 (v1.4 §4.1.4.3.2)."""
        self.write_status(0)
        await self.wait_status(lambda value: value == 0, "reset")

    async def probe(self) -> None:
        """Reset, then ACKNOWLEDGE and DRIVER (v1.4 §3.1.1 steps 1-3)."""
        await self.reset()
        self.write_status(Status.ACKNOWLEDGE)
        self.write_status(Status.ACKNOWLEDGE | Status.DRIVER)

    async def negotiate(self, features: int) -> None:
        """Write the driver features and FEATURES_OK; the device must keep it (§3.1.1 step 6)."""
        self.transport.set_driver_features(features)
        wanted = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        self.write_status(wanted)
        if not self.status() & Status.FEATURES_OK:
            self.write_status(wanted | Status.FAILED)
            raise BackendError(f"{self.name}: device refused features {features:#x}")
        self.transport.set_config_vector(0)

    def read_config(self, offset: int, size: int) -> bytes:
        """Config bytes read consistently with config_generation (v1.4 §2.5.1)."""
        t = self.transport
        for _ in range(100):
            before = t.config_generation()
            data = b"".join(t.read_config(pos, 1).to_bytes(1, "little") for pos in range(offset, offset + size))
            if t.config_generation() == before:
                return data
        raise BackendError(f"{self.name}: config_generation never settled")

    def write_config(self, offset: int, data: bytes) -> None:
        for pos, byte in enumerate(data):
            self.transport.write_config(offset + pos, 1, byte)
