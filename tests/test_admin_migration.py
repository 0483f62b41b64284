"""The admin group in the migration stream (shadowvmm.state.admin): the record's round trip and
its typed refusals, an owner and a stopped member exported and imported (LIST_USE, resource
objects, the admin ring's position, the member's stopped mode), a command posted while the
owner is stopped, and the owner's ADMIN_COMMAND events on the timeline."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from shadowvmm.config import DeviceConfig
from shadowvmm.device import VirtioDevice
from shadowvmm.errors import AdminCommandFailed, IncompatibleStateError, StateFormatError, UnknownRequiredFieldError
from shadowvmm.guest.admin import AdminClient
from shadowvmm.guest.driver import GuestDevice
from shadowvmm.machine import Machine
from shadowvmm.migration.harness import move_guest
from shadowvmm.state import AdminGroup, AdminObject, AdminState, DeviceState, QueueState, TransportState
from shadowvmm.timeline import EventKind, Timeline
from shadowvmm.virtio.admin import AdminOpcode, AdminQualifier, AdminStatus, DevPartsObjKind
from shadowvmm.virtio.constants import DeviceId, Feature

USED = (AdminOpcode.LIST_QUERY, AdminOpcode.LIST_USE, AdminOpcode.RESOURCE_OBJ_CREATE,
        AdminOpcode.RESOURCE_OBJ_DESTROY, AdminOpcode.DEV_MODE_SET)


# ---------------------------------------------------------------------- the record

def group(**kw: object) -> AdminGroup:
    fields: dict[str, object] = {
        "members": ("blk0", "blk1"), "used": tuple(int(op) for op in USED),
        "objects": (AdminObject(1, 2, int(DevPartsObjKind.GET)), AdminObject(2, 0, int(DevPartsObjKind.SET))),
        "queue": QueueState(1, 64, True, 0x20000, 0x21000, 0x22000, 2, 256), "ring_base": 9}
    fields.update(kw)
    return AdminGroup(**fields)  # type: ignore[arg-type]


def owner_state(admin: AdminState | None) -> DeviceState:
    features = int(Feature.VERSION_1 | Feature.ADMIN_VQ)
    regs = TransportState("mmio", 0x0F, False, False, False, features, features, 0, 0, 0, 0xFFFF, False, 0, b"",
                          0, (QueueState(0, 64, True, 0x10000, 0x11000, 0x12000, 0xFFFF, 256),))
    return DeviceState("owner", int(DeviceId.RNG), regs, admin=admin)


@pytest.mark.parametrize("admin", [AdminState(group()), AdminState(None, stopped=True),
                                   AdminState(group(packed=True, ring_base=0x8005_8009), stopped=True)])
def test_admin_part_round_trips(admin: AdminState) -> None:
    state = owner_state(admin)
    again = DeviceState.unpack(state.pack())
    assert again == state and again.admin == admin and again.format == 2
    assert again.digest() == state.digest()


def test_a_state_without_admin_part_has_no_admin_key() -> None:
    wire = msgpack.unpackb(owner_state(None).pack())
    assert "!admin" not in wire["!device"] and wire["!format"] == 2
    assert DeviceState.unpack(owner_state(None).encode(1)).admin is None     # format 1 still reads


def _rewrite(state: DeviceState, edit: object) -> bytes:
    wire = msgpack.unpackb(state.pack())
    edit(wire["!device"]["!admin"])  # type: ignore[operator]
    return msgpack.packb(wire, use_bin_type=True)


@pytest.mark.parametrize("edit,match", [
    (lambda a: a["!group"].update({"!members": "blk0"}), "members: expected a list"),
    (lambda a: a["!group"].update({"!members": ["blk0", "blk0"]}), "distinct"),
    (lambda a: a["!group"].update({"!used": [0, 1, 0x7F]}), "unknown opcodes"),
    (lambda a: a["!group"].update({"!used": [0x11]}), "always in use"),
    (lambda a: a["!group"]["!objects"].append({"!member_id": 3, "!obj_id": 0, "!kind": 0}), "outside the group"),
    (lambda a: a["!group"]["!objects"].append({"!member_id": 1, "!obj_id": 2, "!kind": 1}), "listed twice"),
    (lambda a: a["!group"]["!objects"].append({"!member_id": 1, "!obj_id": 3, "!kind": 7}), "not a device parts"),
    (lambda a: a["!group"].update({"!ring_base": 0x10000}), "ring_base"),
    (lambda a: a["!group"]["!queue"].update({"!desc": 0x20001}), "aligned"),
    (lambda a: a["!group"].pop("!queue"), "required field 'queue' is missing"),
    (lambda a: a.update({"!group": None, "!stopped": False}), "neither a group nor a stopped member"),
    (lambda a: a.update({"!stopped": 1}), "expected bool"),
])
def test_a_corrupt_admin_part_is_a_state_format_error(edit: object, match: str) -> None:
    blob = _rewrite(owner_state(AdminState(group())), edit)
    with pytest.raises(StateFormatError, match=match):
        DeviceState.unpack(blob)


def test_truncated_unknown_and_misversioned_admin_parts_are_refused() -> None:
    blob = owner_state(AdminState(group())).pack()
    for cut in (len(blob) // 2, len(blob) - 1):
        with pytest.raises(StateFormatError):
            DeviceState.unpack(blob[:cut])
    with pytest.raises(UnknownRequiredFieldError, match="'epoch'"):
        DeviceState.unpack(_rewrite(owner_state(AdminState(group())), lambda a: a.update({"!epoch": 1})))
    wire = msgpack.unpackb(blob)
    wire["!format"] = 1
    with pytest.raises(StateFormatError, match="format 1"):
        DeviceState.unpack(msgpack.packb(wire, use_bin_type=True))
    with pytest.raises(StateFormatError, match="needs state format 2"):
        owner_state(AdminState(group())).encode(1)


# ---------------------------------------------------------------------- an owner and its member migrated

async def rig(memory_from: Machine | None = None, member: str = "rng1",
              timeline: Timeline | None = None) -> Machine:
    machine = (Machine(32 << 20, timeline=timeline) if memory_from is None
               else Machine(memory=memory_from.memory, suffix="@dst"))
    await machine.add_device(DeviceConfig("owner", "inproc", {"device": "rng"}, admin_members=(member,)))
    await machine.add_device(DeviceConfig(member, "inproc", {"device": "rng"}))
    return machine


async def started_source() -> tuple[Machine, AdminClient, GuestDevice]:
    src = await rig()
    client = AdminClient(src.guest("owner"))
    await client.start()
    await client.list_use(int(op) for op in USED)
    member_guest = src.guest("rng1")
    await member_guest.initialize(0, queue_size=64)
    await member_guest.started()
    await client.create_parts_object(1, DevPartsObjKind.GET, 2)
    await client.dev_mode_set(1, True)
    return src, client, member_guest


async def export(machine: Machine, name: str) -> DeviceState:
    device = machine.device(name)
    await device.stop()
    return DeviceState.unpack((await device.export_state(machine.slots[name].transport)).pack())


async def test_owner_group_and_stopped_member_cross_a_migration() -> None:
    src, client, member_guest = await started_source()
    owner_st, member_st = await export(src, "owner"), await export(src, "rng1")
    group_st = owner_st.admin.group if owner_st.admin is not None else None
    assert group_st is not None and group_st.members == ("rng1",) and not owner_st.admin.stopped  # type: ignore[union-attr]
    assert group_st.used == tuple(sorted(int(op) for op in USED))
    assert group_st.objects == (AdminObject(1, 2, int(DevPartsObjKind.GET)),)
    assert group_st.ring_base == 3          # LIST_USE, RESOURCE_OBJ_CREATE, DEV_MODE_SET
    assert member_st.admin == AdminState(None, stopped=True)
    dst = await rig(src)
    for name, state in (("owner", owner_st), ("rng1", member_st)):
        await dst.device(name).import_state(state, dst.slots[name].transport)
    member: VirtioDevice = dst.device("rng1")
    assert member.admin_stopped and not member.rings_running and member.shadow.driver_ok
    for name, guest in (("owner", client.guest), ("rng1", member_guest)):
        move_guest(guest, src.device(name), dst.device(name), dst.slots[name].transport)
    # LIST_USE and the resource object came along; the ring continues where the source stopped
    with pytest.raises(AdminCommandFailed) as refused:
        await client.command(AdminOpcode.DEV_PARTS_GET, 1, bytes(16))
    assert refused.value.qualifier == AdminQualifier.INVALID_OPCODE
    with pytest.raises(AdminCommandFailed) as exists:
        await client.create_parts_object(1, DevPartsObjKind.GET, 2)
    assert exists.value.status == AdminStatus.EEXIST
    await client.dev_mode_set(1, False)
    assert not member.admin_stopped and member.rings_running
    server = dst.device("owner").admin
    assert server is not None and server.ring_position() == (6, False)   # type: ignore[attr-defined]
    await dst.close()
    await src.close()


async def test_a_destination_with_another_group_refuses_the_owner_state() -> None:
    src, _, _ = await started_source()
    owner_st = await export(src, "owner")
    dst = await rig(src, member="rng2")
    with pytest.raises(IncompatibleStateError, match=r"admin group is \['rng1'\].*\['rng2'\]"):
        await dst.device("owner").import_state(owner_st, dst.slots["owner"].transport)
    assert not dst.device("owner").shadow.guest_status      # refused before anything was applied
    await dst.close()
    await src.close()


async def test_a_command_posted_while_the_owner_is_stopped_is_served_at_its_resume() -> None:
    src, client, _ = await started_source()
    owner = src.device("owner")
    await owner.stop()
    pending = asyncio.ensure_future(client.list_query())
    await asyncio.sleep(0.02)
    assert not pending.done()
    await owner.resume()
    async with asyncio.timeout(2):
        assert AdminOpcode.DEV_MODE_SET in await pending
    await src.close()


async def test_the_owner_records_admin_commands_on_the_timeline() -> None:
    timeline = Timeline()
    src = await rig(timeline=timeline)
    client = AdminClient(src.guest("owner"))
    await client.start()
    await client.list_use()
    await client.dev_mode_set(1, True)
    with pytest.raises(AdminCommandFailed):
        await client.dev_mode_set(2, True)
    events = timeline.of(EventKind.ADMIN_COMMAND, level="L0", device="owner")
    got = [(e.detail["opcode"], e.detail["member"], e.detail["status"]) for e in events]
    assert got == [("LIST_QUERY", 0, 0), ("LIST_USE", 0, 0), ("DEV_MODE_SET", 1, 0),
                   ("DEV_MODE_SET", 2, int(AdminStatus.EINVAL))]
    assert events[-1].detail["qualifier"] == AdminQualifier.INVALID_MEMBER and events[0].detail["by"] == "device"
    await src.close()


async def test_a_command_posted_during_the_migration_is_served_by_the_destination() -> None:
    src, client, member_guest = await started_source()
    await src.device("owner").stop()
    pending = asyncio.ensure_future(client.list_query())     # kicks the held source owner
    await asyncio.sleep(0.02)
    states = {name: await export(src, name) for name in ("owner", "rng1")}
    assert not pending.done() and states["owner"].admin is not None
    assert states["owner"].admin.group is not None and states["owner"].admin.group.ring_base == 3
    dst = await rig(src)
    for name, state in states.items():
        await dst.device(name).import_state(state, dst.slots[name].transport)
    for name, guest in (("owner", client.guest), ("rng1", member_guest)):
        move_guest(guest, src.device(name), dst.device(name), dst.slots[name].transport)   # replays the kick
    async with asyncio.timeout(2):
        assert AdminOpcode.DEV_MODE_SET in await pending
    server = dst.device("owner").admin
    assert server is not None and server.ring_position() == (4, False)   # type: ignore[attr-defined]
    await dst.close()
    await src.close()
