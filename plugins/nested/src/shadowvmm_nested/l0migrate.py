"""L0 live-migrates the machine an L1 hypervisor runs in; L1 and its L2 keep going.

The model (docs/nested.md, "L0 migrates L1"): L1's software (its :class:`Machine`, the
:class:`L1Backend`, L2's driver) lives in L0's guest RAM. Here it stays as Python objects,
and the migration is the local model (:func:`shadowvmm.migration.harness.machine_sharing`):
the destination L0 machine maps the same guest memory, so L2's RAM (a
:meth:`GuestMemory.alias` of a range of it) and L2's rings stay where they are. What moves
is L0's device: its state (status, queue registers, ring bases) in the DEVICE record and the
IOMMU table L1 programmed in the IOMMU record (:mod:`shadowvmm.migration.iommu`), applied
before the destination device starts. At switch-over L1's vCPUs reach the destination:
:func:`switch_over` points the L1 backend at the destination device's registers and
interrupt lines (:meth:`L1Backend.rebind`, the interrupts the source had raised delivered
first) and replays the kicks the stopped source held, as
:func:`~shadowvmm.migration.harness.move_guest` does for a plain guest.

:class:`L1Stack` is the L1 hypervisor as objects; :func:`build_l1` builds one on an L0
machine's device; :func:`migrate_l0` runs the migration with the switch-over wired.
"""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass
from pathlib import Path

from shadowvmm.config import DeviceConfig
from shadowvmm.device import VirtioDevice
from shadowvmm.errors import ArgumentError
from shadowvmm.guest.driver import GuestDevice
from shadowvmm.guest.transport import PciGuestTransport
from shadowvmm.machine import Machine
from shadowvmm.memory import GuestMemory
from shadowvmm.migration.harness import move_guest
from shadowvmm.migration.migrate import (
    DestinationReport,
    MigrationHooks,
    MigrationOptions,
    MigrationReport,
    migrate_in,
    migrate_out,
)
from shadowvmm.migration.stream import Endpoint
from shadowvmm.timeline import Timeline
from shadowvmm.transport.pci import PciTransport

from .backend import L1Backend
from .lower import LowerDevice
from .stoppath import StopPath

#: The levels on the timeline: L0's VMM and migration, L1's driver of its L0 device and
#: L1's own VMM, L2's driver.
L0, L1, L2 = "L0", "L1", "L2"


@dataclass
class L1Stack:
    """An L1 hypervisor on an L0 device: its backend of L2's device, L2's RAM, L1's machine
    and L2's driver core of the device."""

    backend: L1Backend
    l2_memory: GuestMemory
    l1: Machine
    device: VirtioDevice
    guest: GuestDevice

    @property
    def lower(self) -> LowerDevice:
        """L0's device as L1 sees it (after :func:`switch_over`, the destination's)."""
        return self.backend.lower

    async def close(self) -> None:
        await self.l1.close()
        self.l2_memory.close()


def _lower(l0: Machine, name: str) -> tuple[PciGuestTransport, LowerDevice]:
    transport = l0.guest_transport(name)
    interrupts = l0.device(name).interrupts
    if not isinstance(transport, PciGuestTransport) or interrupts is None:
        raise ArgumentError(f"{name}: L1 drives a virtio-pci L0 device")
    return transport, LowerDevice.pci(transport, interrupts, name=f"l0-{name}")


async def build_l1(l0: Machine, name: str, *, l2_base: int, l2_size: int, device: str = "blk0",
                   transport: str = "pci", timeline: Timeline | None = None,
                   stop_path: StopPath | None = None) -> L1Stack:
    """L1 on L0's device *name*: L2's RAM is L1 GPA ``[l2_base, l2_base + l2_size)`` at L2 GPA 0,
    L1's device *device* is backed by L0's. With a *timeline*, L1's reads of L0's device go on
    row ``(L1, name)``, L1's VMM's device on ``(L1, device)`` and L2's reads on ``(L2, device)``.
    *stop_path*: how L1 stops L0's device (default SUSPEND)."""
    pci, lower = _lower(l0, name)
    if timeline is not None:
        pci.status_log.timeline = timeline.tap(L1, name)
    backend = L1Backend(lower, l0.iommu(name), stop_path=stop_path)
    l2_memory = GuestMemory.alias(l0.memory, [(0, l2_base, l2_size)], name="l2")
    l1 = Machine(memory=l2_memory, timeline=timeline, level=L1)
    try:
        dev = await l1.add_device(DeviceConfig(device, "l1", {}, transport=transport), backend=backend)
        guest = l1.guest(device)
    except BaseException:
        await l1.close()
        l2_memory.close()
        raise
    if timeline is not None:
        guest.transport.status_log.timeline = timeline.tap(L2, device)
    return L1Stack(backend, l2_memory, l1, dev, guest)


def follow(lower: LowerDevice, dest: Machine, name: str) -> LowerDevice:
    """L1's view of its L0 device *lower*, now served by device *name* of *dest*.

    L1's driver keeps what it discovered (capability layout, the queues' notify offsets), its
    status log (and timeline row) and the record of its status writes: only the device behind
    the registers and the interrupt lines change, as for a guest that migrates
    (:func:`~shadowvmm.migration.harness.move_guest`). *lower* itself still reaches the source.
    """
    registers = dest.slots[name].transport
    interrupts = dest.device(name).interrupts
    if not isinstance(lower.transport, PciGuestTransport) or not isinstance(registers, PciTransport) \
            or interrupts is None:
        raise ArgumentError(f"{name}: L1 drives a virtio-pci L0 device")
    view = copy.copy(lower.transport)
    view.t = registers
    return LowerDevice(view, interrupts, lower.device_id, lower.config_size, lower.name, lower.writes)


def switch_over(stack: L1Stack, source: Machine, dest: Machine, name: str,
                owner: tuple[str, GuestDevice] | None = None) -> None:
    """What L0's VMM does at switch-over for its guest, L1: L1's register accesses and
    interrupts go to device *name* of *dest* (:meth:`L1Backend.rebind`), and the kicks L1
    wrote to the stopped source are replayed on the destination. *owner* (device name, L1's
    driver of it): the admin owner L1 stops *name* through; its driver moves too."""
    stack.backend.rebind(follow(stack.lower, dest, name), dest.iommu(name))
    for index in source.device(name).take_pending_kicks():
        dest.device(name).notify(index)
    if owner is not None:
        slot, guest = owner
        move_guest(guest, source.device(slot), dest.device(slot), dest.slots[slot].transport)


#: The options of :func:`migrate_l0`: the local model; a stop bound that a device behind a
#: busy external back-end (requests drained at L0 under L2's load) meets on a shared host.
L0_OPTIONS = MigrationOptions(mode="local", stop_timeout=2.0)


async def migrate_l0(source: Machine, dest: Machine, stack: L1Stack, name: str, workdir: Path, *,
                     timeline: Timeline | None = None,
                     options: MigrationOptions = L0_OPTIONS,
                     owner: tuple[str, GuestDevice] | None = None) -> tuple[MigrationReport, DestinationReport]:
    """Live-migrate L0's *source* machine to *dest* (the local model: *dest* shares its memory)
    over a unix socket in *workdir*; L1 moves at switch-over (:func:`switch_over`). With a
    *timeline* the phases, SWITCH_OVER and DEST_START go on row ``(L0, "migration")``; *owner*:
    see :func:`switch_over`."""
    endpoint = Endpoint.parse(f"unix:{workdir / 'l0-migrate.sock'}")
    tap = timeline.tap(L0, "migration") if timeline is not None else None
    hooks = MigrationHooks(switch_over=lambda: switch_over(stack, source, dest, name, owner))
    listener = await endpoint.listen()
    try:
        async def incoming() -> DestinationReport:
            return await migrate_in(dest, await listener.accept(10), timeline=tap)
        receiving = asyncio.ensure_future(incoming())
        try:
            report = await migrate_out(source, await endpoint.connect(), options, hooks, timeline=tap)
        except BaseException:
            receiving.cancel()          # a refused migration: the destination waits for nothing
            await asyncio.gather(receiving, return_exceptions=True)
            raise
        return report, await receiving
    finally:
        await listener.close()
