"""The device under test: a fresh backend from the factory, realized on a :class:`Machine` and
driven by a guest workload, as the kit's steps build it.

With :attr:`ConformanceOptions.single_session` (a peer that serves one session and exits,
virtiofsd) every step shares one device on one session instead: :func:`open_rig` hands out
the run's shared rig (the guest resets and re-initialises it when a step wants a started
device) and :func:`close_rig` leaves it open until the ``close`` step or the end of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from ...backends.base import Backend, Capability
from ...config import DeviceConfig
from ...device import VirtioDevice
from ...errors import ArgumentError
from ...guest.driver import GuestDevice
from ...machine import Machine
from ...memory import GuestMemory
from ...shadow import RunState
from ...transport.mmio import MmioTransport
from ...transport.pci import PciTransport
from ...virtio.constants import DeviceId, Status
from ...virtio.devcfg import FS_CONFIG_BASE_SIZE, FsConfig
from ..fds import open_fds
from .workloads import Workload, WorkloadOptions, workload_for

__all__ = ["LIVE", "ConformanceOptions", "Context", "Factory", "Rig", "close_rig", "close_shared", "open_rig",
           "rig", "session_backend"]

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
    #: Builds the destination of the migrate step (a second socket: ``--migrate-to``); None skips it.
    migrate_factory: Factory | None = None
    #: Why the peer serves one session only (it exits after it: virtiofsd). Every step then runs
    #: on one shared device and session; the reconnect and device-state steps are skipped with it.
    single_session: str | None = None
    #: virtio-fs: the tag of the config space the VMM serves (as QEMU's vhost-user-fs device does).
    fs_tag: str = "shadowvmm-check"

    def __post_init__(self) -> None:
        if self.transport not in ("pci", "mmio"):
            raise ArgumentError(f"transport {self.transport!r} is not pci or mmio")

    def workload(self, extra_features: int = 0) -> WorkloadOptions:
        return WorkloadOptions(packed=self.packed, queue_size=self.queue_size, net_echo=self.net_echo,
                               timeout=self.io_timeout, extra_features=extra_features)


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
    #: The one device of a single-session run (:attr:`ConformanceOptions.single_session`).
    shared: Rig | None = None
    #: The fds and tasks open before the first device of the run (the close step's reference in a
    #: single-session run, where the device opens long before that step).
    baseline: tuple[dict[int, str], set[asyncio.Task[Any]]] | None = None

    async def capabilities(self) -> Capability:
        """The capabilities a connected backend reports (connecting one if no step did yet)."""
        if self.caps is None:
            async with session_backend(self) as backend:
                self.caps = backend.capabilities()
                self.queue_num = await backend.get_queue_num()
        assert self.caps is not None
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


def _fs_config(ctx: Context) -> bytes | None:
    if ctx.device_id is not DeviceId.FS:
        return None
    return FsConfig(ctx.options.fs_tag).pack(FS_CONFIG_BASE_SIZE)


async def _build(ctx: Context, num_queues: int | None, memory: GuestMemory | None, factory: Factory | None,
                 features: int) -> Rig:
    opts = ctx.options
    machine = Machine(opts.memory_mib << 20) if memory is None else Machine(memory=memory)
    try:
        backend = (factory or ctx.factory)()
        config = DeviceConfig(DEVICE, "conformance", {}, transport=opts.transport, queue_size=opts.queue_size,
                              num_queues=num_queues, packed=opts.packed)
        device = await machine.add_device(config, backend, config_override=_fs_config(ctx))
        ctx.implementation = backend.implementation
        guest = machine.guest(DEVICE)
        return Rig(machine, device, backend, guest, workload_for(ctx.device_id, guest, opts.workload(features)))
    except BaseException:
        await asyncio.wait_for(machine.close(), opts.step_timeout)
        raise


async def open_rig(ctx: Context, *, start: bool = True, num_queues: int | None = None,
                   memory: GuestMemory | None = None, factory: Factory | None = None,
                   features: int = 0) -> Rig:
    """A realized device on a fresh backend (from *factory*, default the run's), on a new
    machine (on *memory* if given, which the caller keeps owning); with *start* the guest
    initialises it, asking for *features* beyond the workload's. Nothing is left behind when
    it fails. A single-session run hands out its shared device instead (unless *memory* or
    *factory* asks for another one)."""
    if num_queues is None and ctx.device_id in (DeviceId.BLOCK, DeviceId.RNG, DeviceId.NET):
        num_queues = 2 if ctx.device_id is DeviceId.NET else 1
    if ctx.options.single_session and memory is None and factory is None:
        if ctx.shared is None:
            gc.collect()
            ctx.baseline = (open_fds(), asyncio.all_tasks())
            ctx.shared = await _build(ctx, num_queues, None, None, features)
        built = ctx.shared
        built.workload.options = replace(built.workload.options, extra_features=features)
    else:
        built = await _build(ctx, num_queues, memory, factory, features)
    if start:
        try:
            await built.workload.start(num_queues)
        except BaseException:
            await close_rig(ctx, built)
            raise
    return built


async def close_rig(ctx: Context, built: Rig) -> None:
    """Close the machine (guest, device, backend); a close that hangs fails the step. The shared
    device of a single-session run stays open (:func:`close_shared`)."""
    if built is ctx.shared:
        return
    await _close(ctx, built)


async def _close(ctx: Context, built: Rig) -> None:
    try:
        if built.device.run_state is RunState.RUNNING and built.status() == LIVE:
            await asyncio.wait_for(built.workload.cleanup(), ctx.options.io_timeout)
    finally:
        await asyncio.wait_for(built.machine.close(), ctx.options.step_timeout)


async def close_shared(ctx: Context) -> None:
    """Close the shared device of a single-session run, if it is open."""
    built, ctx.shared = ctx.shared, None
    if built is not None:
        await _close(ctx, built)


@contextlib.asynccontextmanager
async def rig(ctx: Context, *, start: bool = True, num_queues: int | None = None,
              features: int = 0) -> AsyncIterator[Rig]:
    """:func:`open_rig` ... :func:`close_rig`."""
    built = await open_rig(ctx, start=start, num_queues=num_queues, features=features)
    try:
        yield built
    finally:
        await close_rig(ctx, built)


@contextlib.asynccontextmanager
async def session_backend(ctx: Context) -> AsyncIterator[Backend]:
    """A connected backend: a fresh one from the factory (closed after), or the shared device's
    in a single-session run (realized, so connected, and kept)."""
    if ctx.options.single_session:
        yield (await open_rig(ctx, start=False)).backend
        return
    backend = ctx.factory()
    try:
        await backend.connect()
        yield backend
    finally:
        await backend.close()
