"""An owner device's administration virtqueue, served by the VMM (v1.4 §2.12, §4.1.4.3).

The owner offers VIRTIO_F_ADMIN_VQ (VMM-owned, never forwarded to its
backend); its admin queue sits at index ``num_queues`` (common cfg
``admin_queue_index``, ``admin_queue_num`` = 1). Members are other devices of
the same machine, group type SR-IOV (0x1), member ids 1..N in the order the
owner's config names them. Each command is carried out on the member device
(:mod:`.parts`) one at a time in ring order, and completes only when done: a
DEV_MODE_SET stop completes once the member's rings are stopped.

A command never raises out of the queue: a malformed one is answered with its
status and qualifier (v1.4 §2.12.1 device requirements), and the owner keeps
serving. What the spec leaves open and is chosen here: only the SR-IOV group
type (SELF answers INVALID_GROUP); resource object ids 0..:data:`OBJECTS_PER_MEMBER`-1
per member without the capability commands; an owner reset clears LIST_USE and
destroys every resource object, and does nothing to the members.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import (
    AdminFormatError,
    AdminStatusError,
    GuestMemoryError,
    IncompatibleStateError,
    RingError,
    ShadowVmmError,
)
from ..memory import GuestMemory
from ..state import AdminGroup, AdminObject, QueueState
from ..timeline import EventKind, Tap
from ..virtio.admin import (
    AdminCommand,
    AdminOpcode,
    AdminQualifier,
    AdminResult,
    AdminStatus,
    DevModeSet,
    DevPartsObjCreate,
    DevPartsObjKind,
    GroupType,
    MetadataKind,
    MetadataResult,
    Part,
    PartsGetKind,
    PartsRequest,
    PartsSetData,
    ResourceObjHeader,
    pack_opcode_list,
    pack_parts,
    unpack_opcode_list,
)
from ..virtio.constants import Feature, Status
from ..virtio.packed import PackedDeviceQueue, PackedLayout
from ..virtio.split import DescChain, SplitDeviceQueue, SplitLayout
from ..virtio.vring import RingState
from .vmmqueue import RingRegs


class AdminRingRegs(RingRegs, Protocol):
    """The admin queue's registers: where its ring is, and whether the driver enabled it."""

    @property
    def enabled(self) -> bool: ...

log = logging.getLogger(__name__)

#: Device parts resource objects a member may have at once (ids 0..3); the spec's limit comes
#: from VIRTIO_DEV_PARTS_CAP, whose capability commands are not served here.
OBJECTS_PER_MEMBER = 4
#: Device-readable bytes a command may have (a DEV_PARTS_SET of 1024 queues is ~60 KiB).
ADMIN_REQUEST_MAX = 256 << 10


class Member(Protocol):
    """What an admin command needs of a member device (:class:`~.parts.PartsMixin`)."""

    @property
    def name(self) -> str: ...
    @property
    def admin_stopped(self) -> bool: ...

    async def set_admin_mode(self, stopped: bool) -> None: ...
    def device_parts(self) -> list[Part]: ...
    def set_device_parts(self, parts: Sequence[Part]) -> None: ...


class OwnerHost(Protocol):
    """What the admin queue needs of its owner device."""

    @property
    def name(self) -> str: ...
    @property
    def memory(self) -> GuestMemory: ...
    @property
    def driver_features(self) -> int: ...
    @property
    def admin_queue(self) -> AdminRingRegs | None: ...
    @property
    def timeline(self) -> Tap | None: ...

    def read_status(self) -> int: ...
    def call_fd(self, index: int) -> int: ...


@dataclass(frozen=True)
class Command:
    """A dispatch table entry: the handler and whether it addresses a member."""

    run: Callable[[AdminCommand, Member | None, int], Awaitable[bytes]]
    uses_member: bool = True


class AdminServer:
    """The owner's admin queue: pop, carry out on the member, write the result, interrupt."""

    def __init__(self, owner: OwnerHost, index: int, kick_fd: int, members: Sequence[Member]) -> None:
        self.owner = owner
        self.index = index
        self.kick_fd = kick_fd
        self.members = list(members)
        self.table: dict[AdminOpcode, Command] = {
            AdminOpcode.LIST_QUERY: Command(self._list_query, uses_member=False),
            AdminOpcode.LIST_USE: Command(self._list_use, uses_member=False),
            AdminOpcode.RESOURCE_OBJ_CREATE: Command(self._obj_create),
            AdminOpcode.RESOURCE_OBJ_DESTROY: Command(self._obj_destroy),
            AdminOpcode.DEV_PARTS_METADATA_GET: Command(self._metadata_get),
            AdminOpcode.DEV_PARTS_GET: Command(self._parts_get),
            AdminOpcode.DEV_PARTS_SET: Command(self._parts_set),
            AdminOpcode.DEV_MODE_SET: Command(self._mode_set),
        }
        self.used: frozenset[int] = frozenset({AdminOpcode.LIST_QUERY, AdminOpcode.LIST_USE})
        self.objects: dict[tuple[int, int], DevPartsObjKind] = {}
        self.results: list[tuple[int, int, int]] = []     #: (opcode, status, qualifier) per command
        self._ring: SplitDeviceQueue | PackedDeviceQueue | None = None
        self._pending: deque[DescChain] = deque()
        #: Where the next ring opens (vhost base encoding): None for a fresh ring, or what a
        #: migration restored.
        self._base: int | None = None
        #: The owner is stopped by the VMM: nothing is popped until :meth:`release`.
        self._held = False
        self._task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(kick_fd, self._on_kick)

    def close(self) -> None:
        self._loop.remove_reader(self.kick_fd)
        if self._task is not None:
            self._task.cancel()
        self.reset()

    def reset(self) -> None:
        """The owner was reset: the ring is gone, LIST_USE and the resource objects are forgotten;
        a command still running on a member completes there, its result is dropped."""
        self._ring = None
        self._pending.clear()
        self._base = None
        self.used = frozenset({AdminOpcode.LIST_QUERY, AdminOpcode.LIST_USE})
        self.objects.clear()

    # ------------------------------------------------------------------ VMM stop and migration

    async def hold(self) -> None:
        """The owner's VMM stop: pop nothing more, and let the commands already popped complete
        (a DEV_MODE_SET completes once its member stopped), so no command is half-done."""
        self._held = True
        task = self._task
        if task is not None and not task.done():
            await asyncio.shield(task)

    def release(self) -> None:
        """The owner runs again: serve its kicks, and look at the ring for what was posted meanwhile."""
        if self._held:
            self._held = False
            self._loop.add_reader(self.kick_fd, self._on_kick)
            self.poll()

    def poll(self) -> None:
        """Look at the ring as if kicked (spurious notifications are allowed, v1.4 §2.7.13)."""
        os.eventfd_write(self.kick_fd, 1)

    def ring_position(self) -> tuple[int, bool]:
        """Where the VMM is on the admin ring (vhost base encoding), and whether it is packed."""
        packed = bool(self.owner.driver_features & Feature.RING_PACKED)
        ring = self._ring
        if isinstance(ring, SplitDeviceQueue):
            return ring.last_avail_idx, False
        if isinstance(ring, PackedDeviceQueue):
            return ring.ring_state(self.index).base, True
        if self._base is not None:
            return self._base, packed
        return (RingState.packed(self.index, 0, True, 0, True).base if packed else 0), packed

    def snapshot(self, queue: QueueState) -> AdminGroup:
        """The group as a state record (:class:`~shadowvmm.state.AdminGroup`); the owner is held."""
        base, packed = self.ring_position()
        objects = tuple(AdminObject(member, obj, int(kind)) for (member, obj), kind in sorted(self.objects.items()))
        return AdminGroup(tuple(m.name for m in self.members), tuple(sorted(self.used)), objects, queue, base, packed)

    def check_restore(self, group: AdminGroup) -> None:
        """Refuse (:class:`IncompatibleStateError`) a group this owner does not serve."""
        names = tuple(m.name for m in self.members)
        if group.members != names:
            raise IncompatibleStateError(f"{self.owner.name}: the source's admin group is {list(group.members)}, "
                                         f"the destination's {list(names)}")
        unsupported = set(group.used) - self.supported()
        if unsupported:
            raise IncompatibleStateError(f"{self.owner.name}: the driver uses admin opcodes "
                                         f"{sorted(unsupported)} the destination does not serve")
        if any(o.obj_id >= OBJECTS_PER_MEMBER for o in group.objects):
            raise IncompatibleStateError(f"{self.owner.name}: resource object ids beyond {OBJECTS_PER_MEMBER - 1}")

    def restore(self, group: AdminGroup) -> None:
        """Take the source's group: LIST_USE, the resource objects, the ring position (the ring
        opens there at the next kick, or at :meth:`release`)."""
        self.check_restore(group)
        self._ring = None
        self._pending.clear()
        self.used = frozenset(group.used)
        self.objects = group.object_kinds()
        self._base = group.ring_base

    # ------------------------------------------------------------------ ring

    def _on_kick(self) -> None:
        if self._held:      # the kick stays in the eventfd: a migration replays it on the destination
            self._loop.remove_reader(self.kick_fd)
            return
        try:
            os.eventfd_read(self.kick_fd)
        except BlockingIOError:
            pass
        ring = self._ring or self._open_ring()
        if ring is None:
            return
        try:
            while (chain := ring.pop()) is not None:
                self._pending.append(chain)
        except (RingError, GuestMemoryError) as exc:
            log.error("%s: admin queue broken: %s", self.owner.name, exc)
            self._ring = None
            return
        if self._pending and (self._task is None or self._task.done()):
            self._task = self._loop.create_task(self._serve(ring), name=f"{self.owner.name}-adminq")

    def _open_ring(self) -> SplitDeviceQueue | PackedDeviceQueue | None:
        q = self.owner.admin_queue
        if q is None or not self.owner.read_status() & Status.DRIVER_OK or not q.enabled:
            return None
        memory = self.owner.memory
        event_idx = bool(self.owner.driver_features & Feature.EVENT_IDX)
        base = self._base
        if self.owner.driver_features & Feature.RING_PACKED:
            state = RingState.packed(self.index, 0, True, 0, True) if base is None else RingState(self.index, base)
            self._ring = PackedDeviceQueue(memory, PackedLayout(q.size, q.desc, q.driver, q.device),
                                           event_idx=event_idx, state=state)
        else:
            self._ring = SplitDeviceQueue(memory, SplitLayout(q.size, q.desc, q.driver, q.device),
                                          event_idx=event_idx, last_avail_idx=base or 0)
        return self._ring

    async def _serve(self, ring: SplitDeviceQueue | PackedDeviceQueue) -> None:
        memory = self.owner.memory
        while self._pending and self._ring is ring:
            chain = self._pending.popleft()
            written = await self._one(memory, chain)
            if self._ring is not ring:
                return      # the owner was reset meanwhile
            try:
                ring.push(chain.head, written)
                notify = ring.should_notify()
            except (RingError, GuestMemoryError) as exc:
                log.error("%s: admin queue broken: %s", self.owner.name, exc)
                self._ring = None
                return
            if notify:
                os.eventfd_write(self.owner.call_fd(self.index), 1)

    async def _one(self, memory: GuestMemory, chain: DescChain) -> int:
        room = chain.writable_len
        if room < AdminResult.STRUCT.size:
            log.warning("%s: admin command without room for its result (%d bytes)", self.owner.name, room)
            return 0
        request = b""
        if chain.readable_len > ADMIN_REQUEST_MAX:
            result = AdminResult.error(AdminStatus.EINVAL, AdminQualifier.INVALID_COMMAND)
            opcode = -1
        else:
            request = chain.read(memory)
            opcode = int.from_bytes(request[:2], "little") if len(request) >= 2 else -1
            result = await self.execute(request, room - AdminResult.STRUCT.size)
        self.results.append((opcode, result.status, result.qualifier))
        self._record(opcode, request, result)
        return chain.write(memory, result.pack())

    def _record(self, opcode: int, request: bytes, result: AdminResult) -> None:
        """An ADMIN_COMMAND event on the owner's timeline row: the opcode's name (its number if
        unknown, -1 if unread), the member id, the status and qualifier of the result."""
        tap = self.owner.timeline
        if tap is None:
            return
        known = AdminOpcode._value2member_map_.get(opcode)
        member = AdminCommand.unpack(request).member_id if len(request) >= AdminCommand.STRUCT.size else -1
        tap.record(EventKind.ADMIN_COMMAND, opcode=known.name if isinstance(known, AdminOpcode) else opcode,
                   member=member, status=int(result.status), qualifier=int(result.qualifier), by="device")

    # ------------------------------------------------------------------ commands

    async def execute(self, request: bytes, room: int) -> AdminResult:
        """One command: its result (never raises, v1.4 §2.12.1 device requirements)."""
        try:
            cmd = AdminCommand.unpack(request)
            if cmd.group_type != GroupType.SRIOV:
                raise AdminFormatError(f"group type {cmd.group_type}", AdminQualifier.INVALID_GROUP)
            entry = self.table.get(AdminOpcode(cmd.opcode)) if cmd.opcode in AdminOpcode._value2member_map_ else None
            if entry is None or cmd.opcode not in self.used:
                raise AdminFormatError(f"opcode {cmd.opcode:#x} unsupported or not in LIST_USE",
                                       AdminQualifier.INVALID_OPCODE)
            member = self._member(cmd.member_id) if entry.uses_member else None
            data = await entry.run(cmd, member, room)
        except AdminStatusError as exc:
            log.info("%s: admin command refused: %s", self.owner.name, exc)
            return AdminResult(exc.status, exc.qualifier)
        except ShadowVmmError as exc:
            log.warning("%s: admin command failed on the member: %s", self.owner.name, exc)
            return AdminResult.error(AdminStatus.EAGAIN, AdminQualifier.TRYAGAIN)
        if len(data) > room:
            return AdminResult.error(AdminStatus.ENOMEM, AdminQualifier.NORESOURCE)
        return AdminResult(AdminStatus.OK, AdminQualifier.OK, data)

    def _member(self, member_id: int) -> Member:
        if not 1 <= member_id <= len(self.members):
            raise AdminFormatError(f"member {member_id} (the group has 1..{len(self.members)})",
                                   AdminQualifier.INVALID_MEMBER)
        return self.members[member_id - 1]

    def supported(self) -> frozenset[int]:
        return frozenset(int(op) for op in self.table)

    async def _list_query(self, cmd: AdminCommand, member: Member | None, room: int) -> bytes:
        return pack_opcode_list(self.supported())

    async def _list_use(self, cmd: AdminCommand, member: Member | None, room: int) -> bytes:
        used = unpack_opcode_list(cmd.data)
        if used - self.supported():
            raise AdminFormatError(f"LIST_USE names unsupported opcodes {sorted(used - self.supported())}",
                                   AdminQualifier.INVALID_FIELD)
        self.used = used
        return b""

    def _object(self, cmd: AdminCommand, obj_id: int, kind: DevPartsObjKind) -> None:
        have = self.objects.get((cmd.member_id, obj_id))
        if have is None:
            raise AdminStatusError(f"no resource object {obj_id}", AdminStatus.ENXIO, AdminQualifier.INVALID_FIELD)
        if have is not kind:
            raise AdminFormatError(f"resource object {obj_id} is a {have.name} object", AdminQualifier.INVALID_FIELD)

    async def _obj_create(self, cmd: AdminCommand, member: Member | None, room: int) -> bytes:
        data = DevPartsObjCreate.unpack(cmd.data)
        if data.obj_id >= OBJECTS_PER_MEMBER:
            raise AdminFormatError(f"resource object id {data.obj_id} >= {OBJECTS_PER_MEMBER}",
                                   AdminQualifier.INVALID_FIELD)
        if (cmd.member_id, data.obj_id) in self.objects:
            raise AdminStatusError(f"resource object {data.obj_id} exists", AdminStatus.EEXIST,
                                   AdminQualifier.INVALID_FIELD)
        self.objects[(cmd.member_id, data.obj_id)] = DevPartsObjKind(data.kind)
        return b""

    async def _obj_destroy(self, cmd: AdminCommand, member: Member | None, room: int) -> bytes:
        hdr = ResourceObjHeader.unpack(cmd.data)
        hdr.validate()
        if self.objects.pop((cmd.member_id, hdr.obj_id), None) is None:
            raise AdminStatusError(f"no resource object {hdr.obj_id}", AdminStatus.ENXIO,
                                   AdminQualifier.INVALID_FIELD)
        return b""

    async def _metadata_get(self, cmd: AdminCommand, member: Member | None, room: int) -> bytes:
        assert member is not None
        req = PartsRequest.unpack(cmd.data)
        self._object(cmd, req.obj_id, DevPartsObjKind.GET)
        if req.headers or req.kind not in MetadataKind._value2member_map_:
            raise AdminFormatError(f"metadata request type {req.kind}", AdminQualifier.INVALID_FIELD)
        parts = member.device_parts()
        kind = MetadataKind(req.kind)
        if kind is MetadataKind.SIZE:
            return MetadataResult(len(pack_parts(parts))).pack()
        if kind is MetadataKind.COUNT:
            return MetadataResult(len(parts)).pack()
        return MetadataResult(len(parts), tuple(p.header for p in parts)).pack()

    async def _parts_get(self, cmd: AdminCommand, member: Member | None, room: int) -> bytes:
        assert member is not None
        req = PartsRequest.unpack(cmd.data)
        self._object(cmd, req.obj_id, DevPartsObjKind.GET)
        parts = member.device_parts()
        if req.kind == PartsGetKind.ALL and not req.headers:
            return pack_parts(parts)
        if req.kind != PartsGetKind.SELECTED or not req.headers:
            raise AdminFormatError(f"parts get type {req.kind} with {len(req.headers)} headers",
                                   AdminQualifier.INVALID_FIELD)
        wanted = {(h.part_type, h.selector) for h in req.headers}
        return pack_parts(p for p in parts if (p.part_type, p.selector) in wanted)

    async def _parts_set(self, cmd: AdminCommand, member: Member | None, room: int) -> bytes:
        assert member is not None
        data = PartsSetData.unpack(cmd.data)
        self._object(cmd, data.obj_id, DevPartsObjKind.SET)
        if not member.admin_stopped:
            raise AdminStatusError(f"{member.name} is not stopped", AdminStatus.EBUSY, AdminQualifier.INVALID_COMMAND)
        member.set_device_parts(data.parts)
        return b""

    async def _mode_set(self, cmd: AdminCommand, member: Member | None, room: int) -> bytes:
        assert member is not None
        mode = DevModeSet.unpack(cmd.data)
        await member.set_admin_mode(mode.stopped)
        return b""
