"""The device under test: a fresh backend from the factory, realized on a :class:`Machine` and
driven by a guest workload, as the kit's steps build it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ...backends.base import Backend, Capability
from ...config import DeviceConfig
from ...device import VirtioDevice
from ...errors import ArgumentError
from ...guest.driver import GuestDevice
from ...machine import Machine
from ...memory import GuestMemory
from ...transport.mmio import MmioTransport
from ...transport.pci import PciTransport
from ...virtio.constants import DeviceId, Status
from .workloads import Workload, WorkloadOptions, workload_for

__all__ = ["LIVE", "ConformanceOptions", "Context", "Factory", "Rig", "close_rig", "open_rig", "rig"]

#: A callable returning a fresh, unconnected backend.
Factory = Callable[[], Backend]
LIVE = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
DEVICE = "dut"


@dataclass(frozen=True)
class ConformanceOptions:
    """How the kit builds and drives the device (keyword options of ``run_conformance``)."""

    transport: str = "pci"          #: ``pci`` or ``mmio``
    queue_size: int = 64
    packed: bool = False            #: packed rings (VIRTIO_F_RING_PACKED) instead of split
    net_echo: bool = False          #: virtio-net: the peer sends every frame back
    memory_mib: int = 32
    step_timeout: float = 60.0      #: a step taking longer fails
    io_timeout: float = 10.0        #: one request taking longer fails its step
    #: Builds the destination backend of the device-state step (default: the factory). A peer
    #: serving one front-end at a time needs a second one here (two sessions are open at once).
    destination_factory: Factory | None = None
    #: Run only these steps (default: all).
    steps: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.transport not in ("pci", "mmio"):
            raise ArgumentError(f"transport {self.transport!r} is not pci or mmio")

    def workload(self) -> WorkloadOptions:
        return WorkloadOptions(packed=self.packed, queue_size=self.queue_size, net_echo=self.net_echo,
                               timeout=self.io_timeout)


@dataclass
class Context:
    """One run: the factory, the device type, the options, and what earlier steps learnt."""

    factory: Factory
    device_id: DeviceId
    options: ConformanceOptions
    caps: Capability | None = None
    queue_num: int | None = None
    implementation: str = "?"
    tags: int = 0

    async def capabilities(self) -> Capability:
        """The capabilities a connected backend reports (connecting one if no step did yet)."""
        if self.caps is None:
            backend = self.factory()
            try:
                await backend.connect()
                self.caps = backend.capabilities()
                self.queue_num = await backend.get_queue_num()
            finally:
                await backend.close()
        return self.caps

    def tag(self) -> int:
        """A fresh data tag: the blocks and frames of different round trips differ."""
        self.tags += 1
        return self.tags


@dataclass
class Rig:
    machine: Machine
    device: VirtioDevice
    backend: Backend
    guest: GuestDevice
    workload: Workload

    @property
    def transport(self) -> PciTransport | MmioTransport:
        return self.machine.slots[DEVICE].transport

    def status(self) -> int:
        return self.guest.status()


async def open_rig(ctx: Context, *, start: bool = True, num_queues: int | None = None,
                   memory: GuestMemory | None = None, factory: Factory | None = None) -> Rig:
    """A realized device on a fresh backend (from *factory*, default the run's), on a new
    machine (on *memory* if given, which the caller keeps owning); with *start* the guest
    initialises it. Nothing is left behind when it fails."""
    if num_queues is None and ctx.device_id in (DeviceId.BLOCK, DeviceId.RNG, DeviceId.NET):
        num_queues = 2 if ctx.device_id is DeviceId.NET else 1
    opts = ctx.options
    machine = Machine(opts.memory_mib << 20) if memory is None else Machine(memory=memory)
    try:
        backend = (factory or ctx.factory)()
        config = DeviceConfig(DEVICE, "conformance", {}, transport=opts.transport, queue_size=opts.queue_size,
                              num_queues=num_queues, packed=opts.packed)
        device = await machine.add_device(config, backend)
        ctx.implementation = backend.implementation
        guest = machine.guest(DEVICE)
        built = Rig(machine, device, backend, guest, workload_for(ctx.device_id, guest, opts.workload()))
        if start:
            await built.workload.start(num_queues)
    except BaseException:
        await asyncio.wait_for(machine.close(), opts.step_timeout)
        raise
    return built


async def close_rig(ctx: Context, built: Rig) -> None:
    """Close the machine (guest, device, backend); a close that hangs fails the step."""
    await asyncio.wait_for(built.machine.close(), ctx.options.step_timeout)


@contextlib.asynccontextmanager
async def rig(ctx: Context, *, start: bool = True, num_queues: int | None = None) -> AsyncIterator[Rig]:
    """:func:`open_rig` ... :func:`close_rig`."""
    built = await open_rig(ctx, start=start, num_queues=num_queues)
    try:
        yield built
    finally:
        await close_rig(ctx, built)
