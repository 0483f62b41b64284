"""Scenario ``l1-moves-l2`` (entry point group ``shadowvmm.scenarios``; docs/nested.md
"Running the scenarios").

L0 is a machine with two devices built from the configured one (its peer's two endpoints: the
device's and a destination's, :class:`~shadowvmm.scenarios.peers.PeerSource` role 0 and 1) and,
on the admin path, an owner device (rng) whose members they are. L1 is an
:class:`~.backend.L1Backend` on the first; L2 is a guest whose RAM lies inside L1's and that does
I/O through L1's device (blk write and read back, fs a FUSE file, net frames out and back). Under
that I/O the L1 moves its L2's device to the second L0 device with :func:`~.move.move_device`.

The stop path comes from the config: a device with ``stop_dialect = "stop"`` and ``ring_state
= true`` uses :class:`~.ringstate.RingStatePath` (its reads and writes recorded as RING_STATE);
the admin path (``run_scenario(admin=True)``) or a device with no dialect the owner's admin
queue, :class:`~.adminpath.AdminPath` (its commands recorded as ADMIN_COMMAND); SUSPEND the
:class:`~.stoppath.SuspendPath`, which cannot start rings past their start: the move is
refused (:class:`~shadowvmm.errors.RefusedError`) and L2's device resumes on the first.

The report's levels: ``L2`` (L2's reads of its device), ``L1`` and ``L1 dst`` (L1's reads of
the two L0 devices), ``L1 owner`` (L1's admin driver of the owner, admin path).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from shadowvmm.config import DeviceConfig
from shadowvmm.errors import ScenarioError
from shadowvmm.guest.admin import AdminClient
from shadowvmm.guest.transport import PciGuestTransport
from shadowvmm.machine import Machine
from shadowvmm.memory import GuestMemory
from shadowvmm.scenarios.context import LIVE, ScenarioContext
from shadowvmm.scenarios.guestio import GuestIo
from shadowvmm.scenarios.peers import StartedPeers
from shadowvmm.scenarios.registry import Scenario
from shadowvmm.shadow import StopDialect
from shadowvmm.workload import StatusWatcher

from .adminpath import AdminPath
from .backend import L1Backend
from .lower import LowerDevice
from .move import move_device
from .ringstate import RingStatePath
from .stoppath import StopPath, SuspendPath

L0_NAMES = ("vblk0", "vblk1")
#: The report's levels for L1's reads of the two L0 devices and of the admin owner.
SOURCE_LEVEL, TARGET_LEVEL, OWNER_LEVEL = "L1", "L1 dst", "L1 owner"
#: I/O rounds at most while the move runs (GuestIo rounds: blk 8 blocks written and all read back,
#: fs a file, net 16 frames).
MAX_ROUNDS = 20


def _lower(l0: Machine, name: str) -> LowerDevice:
    transport = l0.guest_transport(name)
    interrupts = l0.device(name).interrupts
    if not isinstance(transport, PciGuestTransport) or interrupts is None:
        raise ScenarioError(f"l1-moves-l2 needs a PCI device at L0 ({name})")
    return LowerDevice.pci(transport, interrupts, name=f"l0-{name}")


async def _l0(ctx: ScenarioContext, admin: bool) -> Machine:
    l0 = Machine(ctx.cfg.memory_mib << 20, timeline=ctx.timeline, level="L0")
    ctx.machines.append(l0)
    if ctx.device.transport != "pci":
        raise ScenarioError(f"l1-moves-l2 needs transport = \"pci\" ({ctx.device.name} has {ctx.device.transport!r})")
    if admin:
        await l0.add_device(DeviceConfig("owner", "inproc", {"device": "rng"}, admin_members=L0_NAMES))
    peers = ctx.peers
    for role, name in enumerate(L0_NAMES):
        if isinstance(peers, StartedPeers):     # the config's [[peer]]: its exports are the device's
            await l0.add_device(replace(peers.device(ctx.device, role), name=name))
        else:
            await peers.add(l0, replace(ctx.device, name=name), role)
    return l0


def _admin(ctx: ScenarioContext) -> bool:
    """The admin path: asked for, or the only one a device with no stop dialect has."""
    return ctx.admin or ctx.device.stop_dialect is StopDialect.NONE


async def _path(ctx: ScenarioContext, l0: Machine) -> StopPath:
    dev = ctx.device
    if dev.stop_dialect is StopDialect.STOP and dev.ring_state and not ctx.admin:
        return RingStatePath(dev.stop_feature_bit, dev.ring_state_feature_bit, tap=ctx.timeline.tap("L1", dev.name))
    if not _admin(ctx):
        return SuspendPath()
    client = AdminClient(l0.guest("owner"))
    ctx.guests.append((OWNER_LEVEL, client.guest))
    await client.start()
    await client.list_use()
    return AdminPath(client, {f"l0-{name}": member for member, name in enumerate(L0_NAMES, 1)},
                     tap=ctx.timeline.tap("L1", "owner"))


async def l1_moves_l2(ctx: ScenarioContext) -> None:
    """L1 moves its L2's device to another L0 device under L2 I/O (module docstring)."""
    dev = ctx.device
    l0 = await _l0(ctx, admin=_admin(ctx))
    path = await _path(ctx, l0)
    ctx.report.notes.append(f"stop path: {path.name}")
    lower, target = _lower(l0, L0_NAMES[0]), _lower(l0, L0_NAMES[1])
    half = (ctx.cfg.memory_mib << 20) // 2
    l2_memory = GuestMemory.alias(l0.memory, [(0, half, half)], name="l2")
    l1 = Machine(memory=l2_memory, timeline=ctx.timeline, level="L1")
    try:
        backend = L1Backend(lower, l0.iommu(L0_NAMES[0]), stop_path=path)
        await l1.add_device(DeviceConfig(dev.name, "l1", {}, queue_size=dev.queue_size), backend=backend)
        guest = ctx.guest(l1, "L2")
        io = GuestIo(guest, backend.device_id, ctx.report, queue_size=min(dev.queue_size, 64))
        await io.start()
        await io.io()
        watcher = StatusWatcher(guest.status, interval=0).start()     # L2 polls its status meanwhile
        start = time.perf_counter()
        mover = asyncio.ensure_future(move_device(l1.device(dev.name), target, l0.iommu(L0_NAMES[1])))
        rounds = 0
        try:
            while not mover.done() and rounds < MAX_ROUNDS:
                await io.io()
                rounds += 1
            await mover
        finally:
            await watcher.stop()
        took = (time.perf_counter() - start) * 1e3
        await io.io()
        if io.blk is not None:
            await io.blk.flush()
        await io.verify()
        _check(ctx, backend, target, guest.transport.status_log.values)
        ctx.report.notes.append(f"moved {L0_NAMES[0]} -> {L0_NAMES[1]} in {took:.3f} ms with {rounds} I/O "
                                f"rounds during the move; {_cost(path)}")
    finally:
        for fault, count in l1.device(dev.name).faults.counts.items() if dev.name in l1.slots else ():
            ctx.report.faults[fault.name] = ctx.report.faults.get(fault.name, 0) + count
        for level, seen in ((SOURCE_LEVEL, lower), (TARGET_LEVEL, target)):
            ctx.report.statuses[level] = list(seen.transport.status_log.values)
            ctx.report.status_reads += seen.transport.status_log.reads
        await l1.close()
        l2_memory.close()


def _check(ctx: ScenarioContext, backend: L1Backend, target: LowerDevice, seen: list[int]) -> None:
    report = ctx.report
    report.check(backend.lower is target, f"L1's device is not on {target.name} after the move")
    report.check(target.status() == LIVE, f"{target.name} reads {target.status():#x}, not DRIVER_OK")
    live = seen[seen.index(LIVE):] if LIVE in seen else seen
    report.check(live == [LIVE], f"L2 read {[hex(v) for v in live]} after DRIVER_OK, not DRIVER_OK throughout")


def _cost(path: StopPath) -> str:
    if isinstance(path, RingStatePath):
        return f"{path.stop_accesses} register accesses to stop and capture, {path.base_writes} ring-state writes"
    if isinstance(path, AdminPath):
        return f"{path.stop_commands} admin commands to stop and capture, {path.start_commands} to start"
    return ""


#: The scenarios of this plugin (the ``nested`` entry point of ``shadowvmm.scenarios``).
NESTED = {
    "l1-moves-l2": Scenario("l1-moves-l2", "L1 moves its L2's device to another L0 device under L2 I/O "
                            "(ring-state registers or the admin queue; SUSPEND refused)", l1_moves_l2),
}
