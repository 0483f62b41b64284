"""A machine: guest memory plus a set of shadowed virtio devices.

This is the assembly point the CLI, tests and benchmarks use: it builds each
device from its config (backend plugin -> :class:`VirtioDevice` ->
transport) and hands out the guest-side view of each one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .backends.base import Backend, load_backend
from .backends.deadlines import DeadlineTimer
from .config import DeviceConfig
from .device import DmaMap, VirtioDevice
from .errors import ArgumentError
from .guest.driver import GuestDevice
from .guest.transport import GuestTransport, MmioGuestTransport, PciGuestTransport
from .memory import GuestAllocator, GuestMemory
from .shadow import FeaturePolicy
from .timeline import Tap, Timeline
from .transport.mmio import MmioTransport
from .transport.pci import PciTransport
from .virtio.constants import Feature


@dataclass
class Slot:
    config: DeviceConfig
    device: VirtioDevice
    transport: PciTransport | MmioTransport
    #: The device's IOMMU translation (bypass until a driver maps something).
    iommu: DmaMap


class Machine:
    """Guest memory and devices; guest models attach through :meth:`guest`."""

    def __init__(self, memory_bytes: int = 64 << 20, *, memory: GuestMemory | None = None,
                 timeline: Timeline | None = None, level: str = "L0", suffix: str = "") -> None:
        """*memory* shares an existing guest memory (local migration); the caller keeps owning it.

        *timeline* records what each device and guest transport does (:mod:`.timeline`), on
        rows ``(level, name + suffix)`` for the devices and ``(level, name)`` for the guest's
        view (a migration destination takes a *suffix* such as ``"@dst"``: the guest that moves
        to it keeps its row)."""
        self.timeline = timeline
        self.level = level
        self.suffix = suffix
        self.owns_memory = memory is None
        self.memory = GuestMemory.create([(0, memory_bytes)]) if memory is None else memory
        self.allocator = GuestAllocator(self.memory, start=0x1000)
        self.slots: dict[str, Slot] = {}
        #: Guest driver cores handed out by :meth:`guest`; :meth:`close` closes them.
        self.guests: list[GuestDevice] = []
        #: One microsecond timer for every backend's own delays, made with the first device.
        self._timer: DeadlineTimer | None = None

    async def add_device(self, config: DeviceConfig, backend: Backend | None = None, *,
                         config_override: bytes | None = None) -> VirtioDevice:
        """Build, realize and attach a device; *config_override* supplies the device
        config space when the backend does not serve one (vhost-user without CONFIG)."""
        if config.name in self.slots:
            raise ArgumentError(f"machine already has a device named {config.name!r}")
        if config.admin_members and config.transport != "pci":
            raise ArgumentError(f"{config.name}: an admin queue exists on PCI only (v1.4 §2.12, "
                                f"VIRTIO_F_ADMIN_VQ); {config.transport} cannot own admin_members")
        if config.name in config.admin_members:
            raise ArgumentError(f"{config.name}: a device cannot be its own admin member")
        if backend is None:
            backend = load_backend(config.backend)(config.backend_config)
        if self._timer is None:
            self._timer = DeadlineTimer(asyncio.get_running_loop())
        backend.set_timer(self._timer)
        base = FeaturePolicy()
        owner = bool(config.admin_members)
        # VIRTIO_F_ADMIN_VQ is the VMM's: the admin queue never reaches the owner's backend.
        admin_bit = int(Feature.ADMIN_VQ) if owner else 0
        policy = FeaturePolicy(config.dialect_spec(),
                               vmm_emulated=base.vmm_emulated | config.vmm_features | admin_bit)
        device = VirtioDevice(backend, self.memory, name=config.name, num_queues=config.num_queues,
                              queue_size=config.queue_size, policy=policy,
                              config_override=config.config_space if config_override is None else config_override,
                              reconnect=config.reconnect,
                              timeline=self.tap(config.name + self.suffix), admin_queue=owner)
        await device.realize()
        try:
            transport = PciTransport(device) if config.transport == "pci" else MmioTransport(device)
        except BaseException:
            await device.close()
            raise
        self.slots[config.name] = Slot(config, device, transport, DmaMap(device, self.memory))
        self._attach_admin_groups()
        return device

    def _attach_admin_groups(self) -> None:
        """Wire every owner whose members are all present (config order may name them later)."""
        for slot in self.slots.values():
            d = slot.device
            names = slot.config.admin_members
            if names and d.admin is None and all(n in self.slots for n in names):
                members = [self.slots[n] for n in names]
                for member in members:
                    if member.config.transport != "pci":
                        raise ArgumentError(f"member {member.config.name!r} of {slot.config.name!r} is not PCI")
                d.attach_admin_members([m.device for m in members])

    def device(self, name: str) -> VirtioDevice:
        return self.slots[name].device

    def tap(self, row: str) -> Tap | None:
        """This machine's timeline bound to *row* at its level (None without a timeline)."""
        return None if self.timeline is None else self.timeline.tap(self.level, row)

    def iommu(self, name: str) -> DmaMap:
        """Device *name*'s IOMMU translation, which the driver owning the device programs
        (it stands in for virtio-iommu / intel-iommu MAP and UNMAP: :mod:`shadowvmm.device.dma`)."""
        return self.slots[name].iommu

    def guest_transport(self, name: str, *, msix: bool = True) -> GuestTransport:
        slot = self.slots[name]
        transport: GuestTransport
        if isinstance(slot.transport, PciTransport):
            transport = PciGuestTransport(slot.transport, msix=msix)
        else:
            transport = MmioGuestTransport(slot.transport)
        transport.status_log.timeline = self.tap(name)
        return transport

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
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        if self.owns_memory:
            self.memory.close()

