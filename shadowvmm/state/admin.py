"""The admin group part of a device state (v1.4 §2.12): what an owner's admin queue and a
member's stopped mode carry across a migration.

An owner (a device with VIRTIO_F_ADMIN_VQ, :mod:`shadowvmm.device.adminq`) saves its group as
an :class:`AdminGroup`: the members by name in member-id order (1..N), the opcodes the driver
declared with LIST_USE, the device parts resource objects it created, its admin queue's
registers and the position the VMM reached on that ring (vhost base encoding: split next avail
index; packed indexes + wrap counters). The owner's queue is quiesced by the VMM stop, so no
command is half-done and the ring position is everything pending: a command the driver posted
after it is popped by the destination. A member saves whether the owner's DEV_MODE_SET left it
stopped (:attr:`AdminState.stopped`): the destination keeps its rings stopped until a
DEV_MODE_SET resumes it there.

Written as the required key ``!admin`` of a device state (format 2), and only when there is
something to carry: a reader that does not know it refuses the state rather than drop a group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import StateFormatError
from ..virtio.admin import AdminOpcode, DevPartsObjKind
from .records import QueueState
from .schema import FieldSpec, Section, check_range

#: The format version that introduced the admin part.
ADMIN_SINCE = 2
#: Members a group may name (an SR-IOV group's member ids are 16-bit VF numbers, v1.4 §2.12.1.1).
MAX_MEMBERS = 0xFFFF
#: Resource object ids per member (:data:`shadowvmm.device.adminq.OBJECTS_PER_MEMBER` is smaller).
MAX_OBJECT_ID = 0xFFFFFFFF


@dataclass(frozen=True)
class AdminObject(Section):
    """One device parts resource object (v1.4 §2.12.1.3): its member, id and kind (GET/SET)."""

    member_id: int
    obj_id: int
    kind: int

    SCHEMA: ClassVar = (FieldSpec("member_id", int), FieldSpec("obj_id", int), FieldSpec("kind", int))

    def validate(self) -> None:
        check_range("admin.objects.member_id", self.member_id, 1, MAX_MEMBERS)
        check_range("admin.objects.obj_id", self.obj_id, 0, MAX_OBJECT_ID)
        if self.kind not in DevPartsObjKind._value2member_map_:
            raise StateFormatError(f"admin.objects.kind: {self.kind} is not a device parts object type "
                                   "(0 GET, 1 SET; v1.4 §2.12.1.4)")


@dataclass(frozen=True)
class AdminGroup(Section):
    """An owner's group and its admin queue (module docstring)."""

    members: tuple[str, ...]
    used: tuple[int, ...]
    objects: tuple[AdminObject, ...]
    queue: QueueState
    ring_base: int
    packed: bool = False

    SCHEMA: ClassVar = (
        FieldSpec("members", str, many=True), FieldSpec("used", int, many=True),
        FieldSpec("objects", AdminObject, many=True), FieldSpec("queue", QueueState),
        FieldSpec("ring_base", int), FieldSpec("packed", bool),
    )

    def validate(self) -> None:
        if not 0 < len(self.members) <= MAX_MEMBERS or len(set(self.members)) != len(self.members):
            raise StateFormatError(f"admin.members: {len(self.members)} names, expected 1..{MAX_MEMBERS} "
                                   "distinct ones")
        if not set(self.used) <= set(AdminOpcode._value2member_map_):
            raise StateFormatError(f"admin.used: unknown opcodes {sorted(set(self.used) - set(AdminOpcode))}")
        if not {AdminOpcode.LIST_QUERY, AdminOpcode.LIST_USE} <= set(self.used):
            raise StateFormatError("admin.used: LIST_QUERY and LIST_USE are always in use (v1.4 §2.12.1)")
        keys = [(o.member_id, o.obj_id) for o in self.objects]
        if len(set(keys)) != len(keys):
            raise StateFormatError("admin.objects: a resource object is listed twice")
        for obj in self.objects:
            if obj.member_id > len(self.members):
                raise StateFormatError(f"admin.objects: member {obj.member_id} outside the group of "
                                       f"{len(self.members)}")
        check_range("admin.ring_base", self.ring_base, 0, 0xFFFFFFFF if self.packed else 0xFFFF)
        if self.queue.enabled:
            self.queue.check_ring(self.packed)

    def object_kinds(self) -> dict[tuple[int, int], DevPartsObjKind]:
        return {(o.member_id, o.obj_id): DevPartsObjKind(o.kind) for o in self.objects}


@dataclass(frozen=True)
class AdminState(Section):
    """A device's admin part: its group if it is an owner, its stopped mode if it is a member."""

    group: AdminGroup | None = None
    #: The owner's DEV_MODE_SET left this member stopped (v1.4 §2.12.1.4).
    stopped: bool = False

    SCHEMA: ClassVar = (FieldSpec("group", AdminGroup, optional=True), FieldSpec("stopped", bool))

    def validate(self) -> None:
        if self.group is None and not self.stopped:
            raise StateFormatError("admin: an admin part with neither a group nor a stopped member")
