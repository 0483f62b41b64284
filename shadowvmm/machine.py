"""A machine: guest memory plus a set of shadowed virtio devices.

This is the assembly point the CLI, tests and benchmarks use: it builds each
device from its config (backend plugin -> :class:`VirtioDevice` ->
transport) and hands out the guest-side view of each one.
"""

from __future__ import annotations

from dataclasses import dataclass

from .backends.base import Backend, load_backend
from .config import DeviceConfig
from .device import DmaMap, VirtioDevice
from .errors import ArgumentError
from .guest.driver import GuestDevice
from .guest.transport import GuestTransport, MmioGuestTransport, PciGuestTransport
from .memory import GuestAllocator, GuestMemory
from .shadow import DialectSpec, FeaturePolicy
from .transport.mmio import MmioTransport
from .transport.pci import PciTransport


@dataclass
class Slot:
    config: DeviceConfig
    device: VirtioDevice
    transport: PciTransport | MmioTransport
    #: The device's IOMMU translation (bypass until a driver maps something).
    iommu: DmaMap


class Machine:
    """Guest memory and devices; guest models attach through :meth:`guest`."""

    def __init__(self, memory_bytes: int = 64 << 20, *, memory: GuestMemory | None = None) -> None:
        """*memory* shares an existing guest memory (local migration); the caller keeps owning it."""
        self.owns_memory = memory is None
        self.memory = GuestMemory.create([(0, memory_bytes)]) if memory is None else memory
        self.allocator = GuestAllocator(self.memory, start=0x1000)
        self.slots: dict[str, Slot] = {}
        #: Guest driver cores handed out by :meth:`guest`; :meth:`close` closes them.
        self.guests: list[GuestDevice] = []

    async def add_device(self, config: DeviceConfig, backend: Backend | None = None, *,
                         config_override: bytes | None = None) -> VirtioDevice:
        """Build, realize and attach a device; *config_override* supplies the device
        config space when the backend does not serve one (vhost-user without CONFIG)."""
        if config.name in self.slots:
            raise ArgumentError(f"machine already has a device named {config.name!r}")
        if backend is None:
            backend = load_backend(config.backend)(config.backend_config)
        base = FeaturePolicy()
        policy = FeaturePolicy(DialectSpec.make(config.stop_dialect, config.stop_feature_bit),
                               vmm_emulated=base.vmm_emulated | config.vmm_features)
        device = VirtioDevice(backend, self.memory, name=config.name, num_queues=config.num_queues,
                              queue_size=config.queue_size, policy=policy,
                              config_override=config_override, reconnect=config.reconnect)
        await device.realize()
        try:
            transport = PciTransport(device) if config.transport == "pci" else MmioTransport(device)
        except BaseException:
            await device.close()
            raise
        self.slots[config.name] = Slot(config, device, transport, DmaMap(device, self.memory))
        return device

    def device(self, name: str) -> VirtioDevice:
        return self.slots[name].device

    def iommu(self, name: str) -> DmaMap:
        """Device *name*'s IOMMU translation, which the driver owning the device programs
        (it stands in for virtio-iommu / intel-iommu MAP and UNMAP: :mod:`shadowvmm.device.dma`)."""
        return self.slots[name].iommu

    def guest_transport(self, name: str, *, msix: bool = True) -> GuestTransport:
        slot = self.slots[name]
        if isinstance(slot.transport, PciTransport):
            return PciGuestTransport(slot.transport, msix=msix)
        return MmioGuestTransport(slot.transport)

    def guest(self, name: str, *, msix: bool = True) -> GuestDevice:
        """A guest driver core bound to device *name*; it waits for the device to act on
        DRIVER_OK through :meth:`VirtioDevice.settle`."""
        device = self.device(name)
        assert device.interrupts is not None
        guest = GuestDevice(self.guest_transport(name, msix=msix), self.memory, device.interrupts,
                            self.allocator, settle=device.settle)
        self.guests.append(guest)
        return guest

    async def close(self) -> None:
        """Close the guest driver cores, then the devices: a later device in this event loop
        gets the same eventfd numbers, which must not keep the closed guests' readers."""
        guests, self.guests = self.guests, []
        for guest in guests:
            guest.close()
        for slot in self.slots.values():
            await slot.device.close()
            slot.iommu.close()
        self.slots.clear()
        if self.owns_memory:
            self.memory.close()
