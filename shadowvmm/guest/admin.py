"""A guest's administration virtqueue driver for an owner device (v1.4 §2.12, §2.13).

:class:`AdminClient` runs on the owner's :class:`~.driver.GuestDevice`: it
negotiates VIRTIO_F_ADMIN_VQ, sets the admin queue up at
``admin_queue_index`` through the ordinary guest queue machinery, then sends
group administration commands (group type SR-IOV) and returns typed results;
a non-OK status raises :class:`~shadowvmm.errors.AdminCommandFailed`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..errors import AdminCommandFailed, DeviceStateError
from ..virtio.admin import (
    AdminCommand,
    AdminOpcode,
    AdminResult,
    AdminStatus,
    DevModeFlag,
    DevModeSet,
    DevPartsObjCreate,
    DevPartsObjKind,
    GroupType,
    MetadataKind,
    MetadataResult,
    Part,
    PartHeader,
    PartsGetKind,
    PartsRequest,
    PartsSetData,
    ResourceObjHeader,
    ResourceObjType,
    pack_opcode_list,
    unpack_opcode_list,
    unpack_parts,
)
from ..virtio.constants import Feature
from .driver import GuestDevice, GuestQueue
from .transport import PciGuestTransport

#: Result room for commands whose result is small (lists, metadata size or count).
SMALL_RESULT = 64


class AdminClient:
    """The owner's admin queue as a driver uses it (module docstring)."""

    def __init__(self, guest: GuestDevice, *, group_type: int = GroupType.SRIOV) -> None:
        self.guest = guest
        self.group_type = group_type
        self.queue: GuestQueue | None = None

    async def start(self, features: int = 0, *, queue_size: int = 64) -> int:
        """Initialise the owner with ADMIN_VQ and its admin queue (v1.4 §3.1.1); returns the
        negotiated features."""
        guest = self.guest
        t = guest.transport
        if not isinstance(t, PciGuestTransport):
            raise DeviceStateError("an admin queue needs the PCI transport (v1.4 §2.12)")
        accepted = await guest.initialize(features | Feature.ADMIN_VQ, set_driver_ok=False)
        if not accepted & Feature.ADMIN_VQ:
            raise DeviceStateError("the device does not offer VIRTIO_F_ADMIN_VQ")
        index, count = t.admin_queues()
        if count < 1 or index != t.num_queues():
            raise DeviceStateError(f"admin_queue_index {index}, admin_queue_num {count}")
        self.queue = guest.add_queue(index, queue_size)
        guest.driver_ok()
        await guest.started()
        return accepted

    # ------------------------------------------------------------------ transport

    async def raw(self, request: bytes, result_room: int = SMALL_RESULT) -> AdminResult:
        """Send *request* bytes as is; the device's result (status not checked)."""
        if self.queue is None:
            raise DeviceStateError("admin client not started")
        allocator = self.guest.alloc.allocator
        memory = self.guest.memory
        out = allocator.alloc(max(1, len(request)))
        inp = allocator.alloc(AdminResult.STRUCT.size + result_room)
        try:
            memory.write(out, request)
            readable = [(out, len(request))] if request else []
            written = await self.queue.request(readable, [(inp, AdminResult.STRUCT.size + result_room)])
            return AdminResult.unpack(memory.read(inp, written))
        finally:
            allocator.free(out)
            allocator.free(inp)

    async def command(self, opcode: AdminOpcode, member: int = 0, data: bytes = b"",
                      result_room: int = SMALL_RESULT) -> bytes:
        """One command; its command-specific result. Raises AdminCommandFailed on a non-OK status."""
        result = await self.raw(AdminCommand(opcode, self.group_type, member, data).pack(), result_room)
        if result.status != AdminStatus.OK:
            raise AdminCommandFailed(opcode, result.status, result.qualifier)
        return result.data

    # ------------------------------------------------------------------ commands

    async def list_query(self) -> frozenset[int]:
        return unpack_opcode_list(await self.command(AdminOpcode.LIST_QUERY))

    async def list_use(self, opcodes: Iterable[int] | None = None) -> frozenset[int]:
        """Declare the opcodes used (default: every one LIST_QUERY reports); returns them."""
        used = frozenset(opcodes) if opcodes is not None else await self.list_query()
        await self.command(AdminOpcode.LIST_USE, data=pack_opcode_list(used))
        return used

    async def dev_mode_set(self, member: int, stopped: bool) -> None:
        flags = DevModeFlag.STOPPED if stopped else DevModeFlag(0)
        await self.command(AdminOpcode.DEV_MODE_SET, member, DevModeSet(int(flags)).pack())

    async def create_parts_object(self, member: int, kind: DevPartsObjKind, obj_id: int = 0) -> int:
        await self.command(AdminOpcode.RESOURCE_OBJ_CREATE, member, DevPartsObjCreate(obj_id, kind).pack())
        return obj_id

    async def destroy_parts_object(self, member: int, obj_id: int = 0) -> None:
        hdr = ResourceObjHeader(ResourceObjType.DEV_PARTS, obj_id)
        await self.command(AdminOpcode.RESOURCE_OBJ_DESTROY, member, hdr.pack())

    async def parts_metadata(self, member: int, kind: MetadataKind = MetadataKind.LIST,
                             obj_id: int | None = None) -> MetadataResult:
        """DEV_PARTS_METADATA_GET through GET object *obj_id* (None: a temporary one)."""
        async with _Object(self, member, DevPartsObjKind.GET, obj_id) as oid:
            room = SMALL_RESULT
            if kind is MetadataKind.LIST:
                count = await self._metadata(member, oid, MetadataKind.COUNT, SMALL_RESULT)
                room = MetadataResult.STRUCT.size + count.value * PartHeader.STRUCT.size
            return await self._metadata(member, oid, kind, room)

    async def _metadata(self, member: int, oid: int, kind: MetadataKind, room: int) -> MetadataResult:
        data = await self.command(AdminOpcode.DEV_PARTS_METADATA_GET, member,
                                  PartsRequest(oid, kind).pack(), room)
        return MetadataResult.unpack(data, kind)

    async def parts_get(self, member: int, selected: Sequence[PartHeader] = (),
                        obj_id: int | None = None) -> list[Part]:
        """DEV_PARTS_GET: every part, or the *selected* ones the member has."""
        async with _Object(self, member, DevPartsObjKind.GET, obj_id) as oid:
            size = await self._metadata(member, oid, MetadataKind.SIZE, SMALL_RESULT)
            kind = PartsGetKind.SELECTED if selected else PartsGetKind.ALL
            data = await self.command(AdminOpcode.DEV_PARTS_GET, member,
                                      PartsRequest(oid, kind, tuple(selected)).pack(), max(size.value, 1))
            return unpack_parts(data)

    async def parts_set(self, member: int, parts: Sequence[Part], obj_id: int | None = None) -> None:
        """DEV_PARTS_SET (the member must be stopped)."""
        async with _Object(self, member, DevPartsObjKind.SET, obj_id) as oid:
            await self.command(AdminOpcode.DEV_PARTS_SET, member, PartsSetData(oid, tuple(parts)).pack())


class _Object:
    """A device parts resource object for one command: the given id, or a temporary one (id 0)
    created and destroyed around it."""

    def __init__(self, client: AdminClient, member: int, kind: DevPartsObjKind, obj_id: int | None) -> None:
        self.client = client
        self.member = member
        self.kind = kind
        self.given = obj_id

    async def __aenter__(self) -> int:
        if self.given is not None:
            return self.given
        return await self.client.create_parts_object(self.member, self.kind, 0)

    async def __aexit__(self, *exc: object) -> None:
        if self.given is None:
            await self.client.destroy_parts_object(self.member, 0)
