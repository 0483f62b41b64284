"""The later conformance steps: config space, per-queue reset, reconnect, migration.

Each returns what it saw or raises AssertionError (see :mod:`.steps`); each one's
applicability hook (``*_applies``) says why it does not apply to this run (None: it does).
"""

from __future__ import annotations

import asyncio

from ...backends.base import Capability
from ...memory import GuestMemory
from ...migration.harness import move_guest
from ...shadow import RunState
from ...virtio.constants import BlkFeature, DeviceId, Feature
from .rig import LIVE, Context, Rig, close_rig, open_rig, rig
from .steps import check_bases, expect

__all__ = ["config", "migrate", "migrate_applies", "queue_reset", "reconnect", "reconnect_applies"]

#: virtio-blk ``writeback`` (v1.2 §5.2.4, with VIRTIO_BLK_F_CONFIG_WCE).
BLK_WRITEBACK = 32


async def _config_interrupt(ctx: Context, r: Rig, data: bytes, what: str) -> None:
    """Deliver a device-side config change of *data*; the guest gets the configuration change
    interrupt, config_generation moves and a generation-checked read returns *data*."""
    guest, transport = r.guest, r.guest.transport
    changes, generation = guest.config_changes, transport.config_generation()
    r.device.update_config(data)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ctx.options.io_timeout
    while guest.config_changes == changes:
        expect(loop.time() < deadline, f"{what}: no configuration change interrupt within "
                                       f"{ctx.options.io_timeout} s")
        await asyncio.sleep(0.001)
    expect(transport.config_generation() != generation, f"{what}: config_generation stayed {generation}")
    expect(guest.read_config(0, len(data)) == data, f"{what}: the guest reads other config bytes")


async def _config_write(ctx: Context, r: Rig) -> str:
    """virtio-blk writeback toggled by the guest reaches a backend that serves the config."""
    if not (ctx.device_id is DeviceId.BLOCK and r.guest.features & BlkFeature.CONFIG_WCE
            and r.device.backend_caps & Capability.CONFIG):
        return "no guest-writable field negotiated"
    transport = r.guest.transport
    before = transport.read_config(BLK_WRITEBACK, 1)
    try:
        for value in (before ^ 1, before):
            transport.write_config(BLK_WRITEBACK, 1, value)
            await r.device.settle()
            # from offset 0, as QEMU reads it: libvhost-user (qemu-storage-daemon) ignores the offset
            got = (await r.backend.get_config(0, BLK_WRITEBACK + 1))[BLK_WRITEBACK]
            expect(got == value, f"the guest wrote writeback={value}; the backend's GET_CONFIG reads {got}")
    finally:
        transport.write_config(BLK_WRITEBACK, 1, before)
    return "writeback toggled by the guest and read back from the backend"


async def config(ctx: Context) -> str:
    """The guest's config read against the backend's; a guest write; two device-side changes.

    The changes are delivered by the VMM (:meth:`VirtioDevice.update_config`), as a backend's
    config-change notification is (v1.2 §2.5.1): the kit cannot make an arbitrary backend change
    its config, so this checks the notification path with the backend in place, not the backend's.
    """
    async with rig(ctx) as r:
        size = len(r.device.config)
        if not size:
            return "the device type has no device-specific config space (nothing to read or change)"
        original = r.guest.read_config(0, size)
        expect(original == bytes(r.device.config), "the guest's generation-checked config read differs from "
                                                   "the device's config space")
        source = "VMM-served"
        if ctx.device_id is not DeviceId.FS and r.device.backend_caps & Capability.CONFIG:
            served = await r.backend.get_config(0, min(size, r.backend.config_size()))
            expect(original.startswith(served), f"the guest reads {original[:16].hex()}..., the backend's "
                                                f"GET_CONFIG gives {served[:16].hex()}...")
            source = "backend-served"
        wrote = await _config_write(ctx, r)
        changed = bytes([original[0] ^ 1]) + original[1:]
        await _config_interrupt(ctx, r, changed, "config change")
        await _config_interrupt(ctx, r, original, "config change back")
        if r.workload.no_io is None:
            await r.workload.round_trip(ctx.tag())
        return (f"{size}-byte {source} config read; {wrote}; 2 device-side changes (delivered by the VMM): "
                f"interrupt, config_generation "
                f"{r.guest.transport.config_generation()}, new bytes read" +
                ("; I/O after" if r.workload.no_io is None else ""))


async def queue_reset(ctx: Context) -> str:
    async with rig(ctx, features=int(Feature.RING_RESET)) as r:
        expect(r.guest.features & Feature.RING_RESET, "the device did not offer VIRTIO_F_RING_RESET although "
                                                      "the backend restarts rings (Capability.RING_RESTART)")
        w = r.workload
        index = w.reset_index
        first = ctx.tag()
        await w.round_trip(first)
        await r.guest.reset_queue(index)
        expect(r.device.run_state is RunState.RUNNING, f"run state {r.device.run_state.value} after the "
                                                       f"queue reset")
        await r.guest.restart_queue(index)
        w.made_available[index] = 0
        try:
            await w.round_trip(ctx.tag())
        except AssertionError as exc:
            raise AssertionError(f"after the reset of queue {index}: {exc}{await _diagnose(ctx, r)}") from None
        if w.keeps_data:
            await w.verify(first)
        return f"queue {index} reset (queue_reset read back 0), set up again; I/O verified after"


async def _diagnose(ctx: Context, r: Rig) -> str:
    """Whether a whole-device stop and resume (every ring restarted) brings the I/O back."""
    try:
        await r.device.stop()
        await r.device.resume()
        await r.workload.round_trip(ctx.tag())
    except Exception:       # a diagnosis only: the step fails either way
        return ""
    return ("; a whole-device stop and resume restores it: the backend takes GET_VRING_BASE of one ring "
            "as a stop of the whole device (DPDK's vhost library does), so a single ring cannot restart")


async def reconnect_applies(ctx: Context) -> str | None:
    if ctx.options.single_session:
        return f"single-session peer: {ctx.options.single_session}"
    return None


async def reconnect(ctx: Context) -> str:
    """A second session after the first closed; with :attr:`Capability.RECONNECT` (a new session
    reaches the same backend) a disk's data written in the first one is read back."""
    first = ctx.tag()
    r = await open_rig(ctx)
    try:
        await r.workload.round_trip(first)
    finally:
        await close_rig(ctx, r)
    async with rig(ctx) as again:
        expect(again.status() == LIVE, f"status {again.status():#x} on the new session")
        same = bool(again.device.backend_caps & Capability.RECONNECT) and again.workload.durable
        if same:
            await again.workload.verify(first)
        await again.workload.round_trip(ctx.tag())
        return ("session closed, a new one opened on the same endpoint; I/O after" +
                (", data from the first session intact" if same else ""))


async def migrate_applies(ctx: Context) -> str | None:
    if ctx.options.migrate_factory is None:
        return "not requested: no destination (--migrate-to)"
    if ctx.options.single_session:
        return f"single-session peer: {ctx.options.single_session}"
    if ctx.device_id is DeviceId.FS and not await ctx.capabilities() & Capability.DEVICE_STATE:
        return "not offered: a virtio-fs session moves only with Capability.DEVICE_STATE"
    return None


async def migrate(ctx: Context) -> str:
    memory = GuestMemory.create([(0, ctx.options.memory_mib << 20)])
    src = dst = None
    try:
        src = await open_rig(ctx, memory=memory)
        w = src.workload
        tag = ctx.tag()
        await w.round_trip(tag)
        bases = check_bases(src, await src.device.stop(), quiet=True)
        state = await src.device.export_state(src.transport)
        dst = await open_rig(ctx, start=False, memory=src.machine.memory, factory=ctx.options.migrate_factory)
        await dst.device.import_state(state, dst.transport)
        move_guest(src.guest, src.device, dst.device, dst.transport)
        expect(dst.status() == LIVE, f"the destination reads status {dst.status():#x}")
        if w.keeps_data:
            await w.verify(tag)
        await w.round_trip(ctx.tag())
        opaque = f"{len(state.opaque.blob)}-byte opaque state" if state.opaque is not None else "no opaque state"
        return (f"stopped at ring bases {bases}; {opaque}; started on the destination from them; "
                + ("data written before read back there; " if w.keeps_data else "") + "I/O after")
    finally:
        if src is not None:
            await close_rig(ctx, src)
        if dst is not None:
            await close_rig(ctx, dst)
        memory.close()
