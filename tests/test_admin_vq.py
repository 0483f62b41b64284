"""The administration virtqueue (v1.4 §2.12, §2.13): an owner stops a member and reads and
restores its device parts; the wire format; every malformed command's status."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import pytest

from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.config import DeviceConfig, parse
from shadowvmm.device import VirtioDevice
from shadowvmm.errors import AdminCommandFailed, AdminFormatError, ArgumentError, ConfigError
from shadowvmm.guest.admin import AdminClient
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.machine import Machine
from shadowvmm.migration.harness import move_guest
from shadowvmm.testing.peers import QsdBlk
from shadowvmm.testing.plugin import require_peer
from shadowvmm.transport.pci import MSIX_CTRL_ENABLE, Space
from shadowvmm.virtio.admin import (
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
    Part,
    PartFlag,
    PartHeader,
    PartsRequest,
    PartsSetData,
    PartType,
    VqCfg,
    VqNotifyCfg,
    pack_opcode_list,
    unpack_opcode_list,
    unpack_parts,
)
from shadowvmm.virtio.constants import Feature, Status
from shadowvmm.workload import StatusWatcher, blk_write_verify
from shadowvmm_vhost_user import VhostUserBackend

LIVE = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
SUPPORTED = {0x0, 0x1, 0xA, 0xD, 0xE, 0xF, 0x10, 0x11}


# ---------------------------------------------------------------------- wire format

def test_wire_round_trips() -> None:
    cmd = AdminCommand(AdminOpcode.DEV_MODE_SET, GroupType.SRIOV, 3, b"\x01")
    raw = cmd.pack()
    assert len(raw) == 25 and raw[:4] == b"\x11\x00\x01\x00" and raw[16:24] == struct.pack("<Q", 3)
    assert AdminCommand.unpack(raw) == cmd
    assert AdminResult.unpack(AdminResult(16, 1, b"xy").pack()) == AdminResult(16, 1, b"xy")
    hdr = PartHeader(PartType.VQ_CFG, int(PartFlag.OPTIONAL), 7, 32)
    assert hdr.pack() == struct.pack("<HBBH6xI", 0x104, 1, 0, 7, 32)   # le16 vq index @4, length @12
    assert PartHeader.unpack(hdr.pack()) == hdr
    cfg = VqCfg(256, 2, 1, 0x1000, 0x2000, 0x3000)
    assert len(cfg.pack()) == 32 and VqCfg.unpack(cfg.pack()) == cfg
    assert len(VqNotifyCfg(1, 1).pack()) == 8
    assert len(DevPartsObjCreate(2, DevPartsObjKind.SET).pack()) == 24
    assert DevPartsObjCreate.unpack(DevPartsObjCreate(2, DevPartsObjKind.SET).pack()).obj_id == 2
    req = PartsRequest(1, MetadataKind.LIST)
    assert len(req.pack()) == 16 and PartsRequest.unpack(req.pack()) == req
    parts = [Part(PartType.DRV_FEATURES, bytes(16)), Part(PartType.VQ_STATE, b"\x05\x00\x00\x00", 1, 1)]
    assert unpack_parts(b"".join(p.pack() for p in parts)) == parts
    assert PartsSetData.unpack(PartsSetData(0, tuple(parts)).pack()).parts == tuple(parts)
    # v1.3 §2.12.1's own example: 0x3 in word 0 and 0x1 in word 1 = opcodes 0, 1 and 64
    assert pack_opcode_list({0, 1, 64}) == struct.pack("<QQ", 3, 1)
    assert unpack_opcode_list(struct.pack("<QQQ", 3, 1, 0)) == {0, 1, 64}


@pytest.mark.parametrize("make", [
    lambda: AdminCommand.unpack(b"\x00" * 23),
    lambda: unpack_parts(PartHeader(PartType.VQ_CFG, 0, 0, 32).pack() + bytes(31)),
    lambda: unpack_parts(PartHeader(PartType.VQ_CFG, 0, 0, 0).pack()[:15]),
    lambda: PartHeader.unpack(struct.pack("<HBBIII", 0x104, 0, 1, 0, 0, 0)),
    lambda: PartHeader.unpack(struct.pack("<HBBIII", 0x104, 0, 0, 0, 1, 0)),
    lambda: PartHeader.unpack(PartHeader(PartType.VQ_CFG, 0, 0x10000, 0).pack()),
    lambda: PartHeader.unpack(PartHeader(PartType.VQ_CFG, 2, 0, 0).pack()),
    lambda: VqCfg.unpack(bytes(31)),
    lambda: VqCfg.unpack(VqCfg(8, 0, 2, 0, 0, 0).pack()),
    lambda: DevModeSet.unpack(b"\x02"),
    lambda: unpack_opcode_list(b"\x01\x02"),
    lambda: DevPartsObjCreate.unpack(struct.pack("<H2xIQB7x", 1, 0, 0, 0)),
])
def test_wire_validation(make) -> None:
    with pytest.raises(AdminFormatError) as exc:
        make()
    assert exc.value.status == AdminStatus.EINVAL
    assert exc.value.qualifier in (AdminQualifier.INVALID_COMMAND, AdminQualifier.INVALID_FIELD)


# ---------------------------------------------------------------------- rigs

async def group(members: dict[str, dict], *, backends: dict[str, object] | None = None,
                queue_size: int = 128) -> tuple[Machine, VirtioDevice, AdminClient]:
    machine = Machine(64 << 20)
    owner = await machine.add_device(DeviceConfig("owner", "inproc", {"device": "rng"},
                                                  admin_members=tuple(members)))
    for name, options in members.items():
        backend = (backends or {}).get(name)
        await machine.add_device(DeviceConfig(name, "inproc", options, queue_size=queue_size),
                                 backend)  # type: ignore[arg-type]
    client = AdminClient(machine.guest("owner"))
    await client.start()
    return machine, owner, client


async def started_blk(machine: Machine, name: str) -> BlkDriver:
    driver = BlkDriver(machine.guest(name))
    await driver.start(queue_size=128)
    return driver


async def test_owner_offers_admin_vq_and_keeps_it_from_the_backend() -> None:
    machine, owner, client = await group({"blk0": {"device": "blk"}})
    t = client.guest.transport
    assert owner.driver_features & Feature.ADMIN_VQ
    assert not owner.backend_feature_word() & Feature.ADMIN_VQ
    assert t.num_queues() == 1 and t.admin_queues() == (1, 1)     # type: ignore[attr-defined]
    assert machine.guest_transport("blk0").admin_queues() == (1, 0)  # type: ignore[attr-defined]
    assert not machine.device("blk0").device_features & Feature.ADMIN_VQ
    assert len(client.guest.queues) == 2 and owner.admin_queue is not None and owner.admin_queue.enabled
    await machine.close()


async def test_list_query_bitmap_and_list_use() -> None:
    machine, owner, client = await group({"blk0": {"device": "blk"}})
    raw = await client.command(AdminOpcode.LIST_QUERY)
    assert raw == struct.pack("<Q", sum(1 << op for op in SUPPORTED))
    # before LIST_USE only LIST_QUERY and LIST_USE may be used (v1.3 §2.12.1)
    with pytest.raises(AdminCommandFailed) as exc:
        await client.dev_mode_set(1, True)
    assert (exc.value.status, exc.value.qualifier) == (AdminStatus.EINVAL, AdminQualifier.INVALID_OPCODE)
    with pytest.raises(AdminCommandFailed) as exc:
        await client.list_use({0, 1, 2})                 # LEGACY_COMMON_CFG_WRITE is not offered
    assert (exc.value.status, exc.value.qualifier) == (AdminStatus.EINVAL, AdminQualifier.INVALID_FIELD)
    assert await client.list_use() == SUPPORTED
    await client.dev_mode_set(1, True)
    await client.dev_mode_set(1, True)                   # repeating a mode succeeds
    assert machine.device("blk0").admin_stopped
    # an owner reset forgets LIST_USE and does nothing to the members
    await client.start()
    assert machine.device("blk0").admin_stopped
    with pytest.raises(AdminCommandFailed):
        await client.dev_mode_set(1, False)
    await client.list_use()
    await client.dev_mode_set(1, False)
    assert not machine.device("blk0").admin_stopped
    await machine.close()


async def test_malformed_commands_get_their_status_and_the_owner_keeps_serving() -> None:
    machine, owner, client = await group({"blk0": {"device": "blk"}})
    await started_blk(machine, "blk0")
    await client.list_use()
    srv = AdminOpcode

    def cmd(op: int, member: int = 1, data: bytes = b"", group_type: int = GroupType.SRIOV) -> bytes:
        return AdminCommand(op, group_type, member, data).pack()

    get0 = PartsRequest(0, 1).pack()
    cases = [
        (b"\x00" * 10, AdminStatus.EINVAL, AdminQualifier.INVALID_COMMAND),
        (cmd(srv.LIST_QUERY, group_type=0), AdminStatus.EINVAL, AdminQualifier.INVALID_GROUP),
        (cmd(0x7FFF), AdminStatus.EINVAL, AdminQualifier.INVALID_OPCODE),
        (cmd(srv.LEGACY_DEV_CFG_READ), AdminStatus.EINVAL, AdminQualifier.INVALID_OPCODE),
        (cmd(srv.DEV_MODE_SET, 0, b"\x01"), AdminStatus.EINVAL, AdminQualifier.INVALID_MEMBER),
        (cmd(srv.DEV_MODE_SET, 2, b"\x01"), AdminStatus.EINVAL, AdminQualifier.INVALID_MEMBER),
        (cmd(srv.DEV_MODE_SET, 1, b"\x03"), AdminStatus.EINVAL, AdminQualifier.INVALID_FIELD),
        (cmd(srv.DEV_MODE_SET, 1, b""), AdminStatus.EINVAL, AdminQualifier.INVALID_COMMAND),
        (cmd(srv.DEV_PARTS_GET, 1, get0), AdminStatus.ENXIO, AdminQualifier.INVALID_FIELD),
        (cmd(srv.RESOURCE_OBJ_CREATE, 1, DevPartsObjCreate(9, 0).pack()), AdminStatus.EINVAL,
         AdminQualifier.INVALID_FIELD),
        (cmd(srv.RESOURCE_OBJ_DESTROY, 1, struct.pack("<H2xI", 0, 3)), AdminStatus.ENXIO,
         AdminQualifier.INVALID_FIELD),
    ]
    for request, status, qualifier in cases:
        result = await client.raw(request)
        assert (result.status, result.qualifier) == (status, qualifier), request.hex()
    await client.create_parts_object(1, DevPartsObjKind.SET, 1)
    with pytest.raises(AdminCommandFailed) as exc:
        await client.create_parts_object(1, DevPartsObjKind.GET, 1)
    assert exc.value.status == AdminStatus.EEXIST
    # DEV_PARTS_SET on a running member: EBUSY (v1.4 §2.12.1.4: the device SHOULD fail it)
    parts = await client.parts_get(1)
    with pytest.raises(AdminCommandFailed) as exc:
        await client.parts_set(1, parts, obj_id=1)
    assert exc.value.status == AdminStatus.EBUSY
    await client.dev_mode_set(1, True)
    bad_sets = [
        parts[:1] + [Part(PartType.DRV_FEATURES, bytes(8))],             # wrong length
        [Part(PartType.VQ_CFG, VqCfg(128, 1, 1, 0, 0, 0).pack()[:30])],     # wrong length
        [Part(PartType.VQ_CFG, VqCfg(128, 1, 1, 0, 0, 0).pack(), 5)],       # no queue 5
        [Part(PartType.VQ_CFG, VqCfg(100, 1, 0, 0, 0, 0).pack())],          # split size not 2^n
        [Part(PartType.VQ_CFG, VqCfg(128, 1, 1, 1 << 40, 0, 0).pack())],    # ring outside memory
        [Part(PartType.DEVICE_STATUS, bytes([Status.DRIVER_OK]))],          # out of order
        [Part(PartType.DEVICE_STATUS, bytes([LIVE | Status.NEEDS_RESET]))],
        [Part(PartType.DEV_FEATURES, bytes(16), flags=1)],                 # not the member's features
        [Part(PartType.VQ_NOTIFY_CFG, VqNotifyCfg(3, 0).pack())],           # read-only, differs
        [Part(PartType.PCI_COMMON_CFG, b"\x00\x00", 0x12)],
        [parts[-1], parts[0]],                                              # out of order
        [parts[1], parts[1]],                                               # twice
    ]
    before = machine.device("blk0").device_parts()
    for bad in bad_sets:
        with pytest.raises(AdminCommandFailed) as exc:
            await client.parts_set(1, bad, obj_id=1)
        assert (exc.value.status, exc.value.qualifier) == (AdminStatus.EINVAL, AdminQualifier.INVALID_FIELD), bad
    assert machine.device("blk0").device_parts() == before      # no side effect
    truncated = cmd(srv.DEV_PARTS_SET, 1, PartsSetData(1, ()).pack() + PartHeader(0x104, 0, 0, 32).pack())
    result = await client.raw(truncated)
    assert (result.status, result.qualifier) == (AdminStatus.EINVAL, AdminQualifier.INVALID_FIELD)
    # a result buffer too small for the parts: ENOMEM
    await client.create_parts_object(1, DevPartsObjKind.GET, 2)
    result = await client.raw(cmd(srv.DEV_PARTS_GET, 1, PartsRequest(2, 1).pack()), 32)
    assert result.status == AdminStatus.ENOMEM
    result = await client.raw(cmd(srv.DEV_PARTS_METADATA_GET, 1, PartsRequest(1, 0).pack()))
    assert (result.status, result.qualifier) == (AdminStatus.EINVAL, AdminQualifier.INVALID_FIELD)  # SET object
    assert await client.list_query() == SUPPORTED
    assert owner.faults.total == 0
    await machine.close()


async def test_parts_metadata_and_selected_get() -> None:
    machine, owner, client = await group({"blk0": {"device": "blk", "queues": 2}})
    await started_blk(machine, "blk0")
    await client.list_use()
    parts = await client.parts_get(1)
    kinds = [(p.part_type, p.selector) for p in parts]
    assert kinds == [(0x100, 0), (0x101, 0), (0x103, 0), (0x104, 0), (PartType.VQ_STATE, 0), (0x104, 1),
                     (PartType.VQ_STATE, 1), (0x105, 0), (0x105, 1)]
    assert parts[2].value == bytes([LIVE])
    assert VqCfg.unpack(parts[3].value).enabled == 1
    meta = await client.parts_metadata(1)
    assert meta.value == len(parts) and [h.part_type for h in meta.headers] == [k for k, _ in kinds]
    size = await client.parts_metadata(1, MetadataKind.SIZE)
    assert size.value == sum(16 + len(p.value) for p in parts)
    selected = await client.parts_get(1, [PartHeader(PartType.VQ_CFG, 0, 1), PartHeader(PartType.VQ_CFG, 0, 9)])
    assert selected == [parts[5]]                                 # queue 9 does not exist: skipped
    await machine.close()


# ---------------------------------------------------------------------- stop under I/O

async def stop_cycles_under_io(machine: Machine, client: AdminClient, member: VirtioDevice,
                               driver: BlkDriver, count_requests, requests: int, *, cycles: int = 4,
                               depth: int = 16) -> None:
    guest = driver.dev
    watcher = StatusWatcher(guest.status, interval=0).start()
    done: list[int] = []
    finished = asyncio.Event()

    async def stopper() -> None:
        loop = asyncio.get_running_loop()
        while len(done) < cycles and not finished.is_set():
            await asyncio.sleep(0.004)
            # stop while the guest has requests out: a fast back-end (qsd) may have completed
            # every one by the time this task runs, the guest not having posted the next yet
            deadline = loop.time() + 1.0
            while not (in_flight := sum(q.ring.in_flight for q in guest.queues)) and loop.time() < deadline \
                    and not finished.is_set():
                await asyncio.sleep(0)
            await client.dev_mode_set(1, True)
            assert member.admin_stopped and not member.rings_running
            # every observed buffer was used: the used idx caught up with what the backend took
            before = count_requests()
            await asyncio.sleep(0.005)
            assert count_requests() == before
            done.append(in_flight)
            await client.dev_mode_set(1, False)
            assert member.rings_running

    task = asyncio.create_task(stopper())
    res = await blk_write_verify(driver, requests=requests, queue_depth=depth, block_bytes=4096, seed=3,
                                 blocks=1024)
    finished.set()
    await task
    await watcher.stop()
    assert len(done) == cycles and any(done), "no stop landed with requests in flight"
    assert res.mismatches == []
    assert sum(q.completed for q in guest.queues) == res.writes + res.reads == count_requests()
    assert watcher.values == {LIVE}                         # the member's guest never saw a thing
    assert member.faults.total == 0 and not guest.violations


async def test_dev_mode_set_stops_an_inproc_member_under_io() -> None:
    machine, owner, client = await group({"blk0": {"device": "blk", "queues": 2, "latency_us": 800}})
    await client.list_use()
    driver = await started_blk(machine, "blk0")
    member = machine.device("blk0")
    backend = member.backend
    assert isinstance(backend, InProcBackend)
    await stop_cycles_under_io(machine, client, member, driver, lambda: backend.requests, 2000)
    await machine.close()


async def test_dev_mode_set_stops_a_qsd_member_under_io(tmp_path: Path) -> None:
    binary = require_peer("qemu-storage-daemon")
    with QsdBlk(tmp_path, image=tmp_path / "disk.img", size=16 << 20, create=True, num_queues=2,
                binary=binary) as qsd:
        backend = VhostUserBackend({"socket": str(qsd.socket_path), "device": "blk", "queues": 2, "timeout": 3.0})
        machine, owner, client = await group({"blk0": {"device": "blk"}}, backends={"blk0": backend})
        await client.list_use()
        driver = await started_blk(machine, "blk0")
        member = machine.device("blk0")
        guest = driver.dev
        await stop_cycles_under_io(machine, client, member, driver,
                                   lambda: sum(q.completed for q in guest.queues), 1500, cycles=2, depth=8)
        await machine.close()


async def test_a_member_not_started_can_be_stopped_and_starts_on_resume() -> None:
    machine, owner, client = await group({"blk0": {"device": "blk"}})
    await client.list_use()
    member = machine.device("blk0")
    guest = machine.guest("blk0")
    await guest.initialize(0, queue_size=128, set_driver_ok=False)
    await client.dev_mode_set(1, True)              # FEATURES_OK, not DRIVER_OK: may be stopped
    assert member.admin_stopped
    guest.driver_ok()
    await asyncio.sleep(0.01)
    assert guest.status() == LIVE and not member.started    # stopped mode: the rings do not start
    await client.dev_mode_set(1, False)
    await guest.started()
    assert member.started and member.rings_running
    # a member reset clears its stopped mode (v1.4 §2.12.1.4: parts back to their defaults)
    await client.dev_mode_set(1, True)
    await guest.reset()
    assert not member.admin_stopped
    await machine.close()


# ---------------------------------------------------------------------- parts to a second member

async def test_parts_get_set_moves_the_rings_to_a_second_member_from_their_indices(tmp_path: Path) -> None:
    image = str(tmp_path / "disk.img")
    opts = {"device": "blk", "image": image, "size": 8 << 20, "queues": 2}
    machine, owner, client = await group({"blk0": opts, "blk1": opts})
    await client.list_use()
    src, dst = machine.device("blk0"), machine.device("blk1")
    driver = await started_blk(machine, "blk0")
    guest = driver.dev
    first = await blk_write_verify(driver, requests=300, queue_depth=8, block_bytes=4096, seed=1, blocks=512)
    assert first.mismatches == []
    await client.dev_mode_set(1, True)
    parts = await client.parts_get(1)
    bases = {p.selector: struct.unpack("<I", p.value)[0] for p in parts if p.part_type == PartType.VQ_STATE}
    assert bases == {i: s.base for i, s in src.ring_states.items()}
    assert bases[0] > 0 and bases[1] > 0                    # a restore from 0 would replay them
    with pytest.raises(AdminCommandFailed) as exc:
        await client.parts_set(2, parts)                    # blk1 runs (not stopped)
    assert exc.value.status == AdminStatus.EBUSY
    await client.dev_mode_set(2, True)                      # never initialised: may be stopped
    await client.parts_set(2, parts)
    assert dst.shadow.guest_status == LIVE and not dst.started
    assert {i: s.base for i, s in dst.ring_states.items()} == bases
    # the L1 hypervisor moves the guest's function: MSI-X enable (not a part), notifications
    dst_t = machine.slots["blk1"].transport
    dst_t.write(Space.CONFIG, 0x42, 2, MSIX_CTRL_ENABLE)
    move_guest(guest, src, dst, dst_t)
    await client.dev_mode_set(2, False)
    assert dst.started and dst.rings_running
    dst_backend = dst.backend
    assert isinstance(dst_backend, InProcBackend) and dst_backend.requests == 0   # nothing replayed
    second = await blk_write_verify(driver, requests=200, queue_depth=8, block_bytes=4096, seed=2, blocks=512)
    assert second.mismatches == [] and not guest.violations
    assert dst_backend.requests == second.writes + second.reads
    for block, data in first.expected.items():              # written through blk0, read through blk1
        if block not in second.expected:
            assert await driver.read(block * 8, 4096) == data
            break
    assert guest.status() == LIVE and src.admin_stopped
    await machine.close()


# ---------------------------------------------------------------------- config

def test_mmio_owner_is_refused_in_config() -> None:
    doc = {"device": [{"name": "blk0", "backend": "inproc", "backend_config": {"device": "blk"}},
                      {"name": "own", "backend": "inproc", "backend_config": {"device": "rng"},
                       "transport": "mmio", "admin_members": ["blk0"]}]}
    with pytest.raises(ConfigError) as exc:
        parse(doc)
    assert exc.value.key == "device[1].admin_members" and "PCI only" in exc.value.message
    doc["device"][1]["transport"] = "pci"
    doc["device"][1]["admin_members"] = ["nope"]
    with pytest.raises(ConfigError, match="no device named 'nope'"):
        parse(doc)
    doc["device"][1]["admin_members"] = ["blk0"]
    assert parse(doc).devices[1].admin_members == ("blk0",)


async def test_mmio_owner_is_refused_by_the_machine() -> None:
    machine = Machine(16 << 20)
    with pytest.raises(ArgumentError, match="PCI only"):
        await machine.add_device(DeviceConfig("own", "inproc", {"device": "rng"}, transport="mmio",
                                              admin_members=("blk0",)))
    await machine.close()
