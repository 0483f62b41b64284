"""Opaque DEVICE_STATE end to end through the Python reference vhost-user back-end."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shadowvmm.config import DeviceConfig
from shadowvmm.errors import IncompatibleStateError, MigrationError
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.machine import Machine
from shadowvmm.migration.harness import machine_sharing, move_guest
from shadowvmm.migration.migrate import MigrationHooks, MigrationOptions, migrate_in, migrate_out
from shadowvmm.migration.stream import Endpoint
from shadowvmm.virtio.constants import Status
from shadowvmm_vhost_user import VhostUserBackend
from shadowvmm_vhost_user.refbackend import RefBlkServer

IMPL = "shadowvmm-refblk"


@dataclass
class Rig:
    tmp: Path
    image: Path
    src: Machine
    server: RefBlkServer

    def backend(self, path: Path) -> VhostUserBackend:
        return VhostUserBackend({"socket": str(path), "device": "blk", "queues": 2})

    async def server_for(self, name: str, implementation: str = IMPL) -> RefBlkServer:
        return await RefBlkServer(str(self.tmp / f"{name}.sock"), implementation=implementation,
                                  image=str(self.image), size=8 << 20).start()

    async def destination(self, server: RefBlkServer) -> Machine:
        dst = machine_sharing(self.src.memory)
        await dst.add_device(DeviceConfig("blk0", "vhost-user", {}, queue_size=64), self.backend(Path(server.path)))
        return dst


async def run_migration(src: Machine, dst: Machine, tmp: Path, hooks: MigrationHooks | None = None):
    endpoint = Endpoint.parse(f"unix:{tmp / 'm.sock'}")
    listener = await endpoint.listen()

    async def incoming():
        return await migrate_in(dst, await listener.accept(10))
    task = asyncio.ensure_future(incoming())
    try:
        report = await migrate_out(src, await endpoint.connect(), MigrationOptions(mode="local"), hooks)
    except MigrationError as exc:
        try:
            await task
        except Exception as dst_exc:  # the destination's own view of the refusal
            raise MigrationError(f"{exc} | destination: {dst_exc}") from exc
        raise
    else:
        return report, await task
    finally:
        await listener.close()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    server = await RefBlkServer(str(tmp_path / "src.sock"), implementation=IMPL, image=str(image),
                                size=8 << 20).start()
    src = Machine(32 << 20)
    rig = Rig(tmp_path, image, src, server)
    try:
        await src.add_device(DeviceConfig("blk0", "vhost-user", {}, queue_size=64),
                             rig.backend(tmp_path / "src.sock"))
        yield rig
    finally:
        await src.close()
        await server.close()


async def test_opaque_state_round_trips(rig: Rig) -> None:
    src = rig.src
    guest = src.guest("blk0")
    dst_server = await rig.server_for("dst")
    dst = await rig.destination(dst_server)
    try:
        driver = BlkDriver(guest)
        await driver.start(queue_size=64)
        data = os.urandom(4096)
        await driver.write(16, data, queue=1)
        guest.transport.write_config(32, 1, 0)
        await src.device("blk0").settle()
        assert rig.server.model.writeback == 0
        served = rig.server.requests
        sdev, ddev = src.device("blk0"), dst.device("blk0")
        hooks = MigrationHooks(switch_over=lambda: move_guest(guest, sdev, ddev, dst.slots["blk0"].transport))
        report, incoming = await run_migration(src, dst, rig.tmp, hooks)
        assert report.ok and report.device_state_bytes == incoming.device_state_bytes > 0
        assert dst_server.loaded_from == IMPL and dst_server.model.writeback == 0
        assert dst_server.requests == served
        assert await driver.read(16, 4096, queue=0) == data
        assert dst_server.requests > served and rig.server.requests == served
        assert guest.status() == Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK
    finally:
        guest.close()
        await dst.close()
        await dst_server.close()


async def test_other_implementation_refused_and_source_resumes(rig: Rig) -> None:
    src = rig.src
    guest = src.guest("blk0")
    other = await rig.server_for("other", implementation="another-blk")
    dst = await rig.destination(other)
    try:
        driver = BlkDriver(guest)
        await driver.start(queue_size=64)
        await driver.write(0, b"a" * 512)
        with pytest.raises(MigrationError, match="refused opaque state") as info:
            await run_migration(src, dst, rig.tmp)
        assert "CHECK_DEVICE_STATE" in str(info.value)
        assert "another-blk" in other.last_error and IMPL in other.last_error
        assert src.device("blk0").rings_running
        await driver.write(1, b"b" * 512)
        assert await driver.read(0, 1024) == b"a" * 512 + b"b" * 512
    finally:
        guest.close()
        await dst.close()
        await other.close()


async def test_frontend_refuses_opaque_state_of_another_implementation(rig: Rig) -> None:
    src = rig.src
    guest = src.guest("blk0")
    dst = machine_sharing(src.memory)
    await dst.add_device(DeviceConfig("blk0", "inproc", {"device": "blk", "image": str(rig.image), "queues": 2},
                                      queue_size=64))
    try:
        driver = BlkDriver(guest)
        await driver.start(queue_size=64)
        await driver.write(3, b"c" * 512)
        device = src.device("blk0")
        await device.stop()
        with_opaque = await device.export_state(src.slots["blk0"].transport)
        with pytest.raises(IncompatibleStateError, match="'vhost-user'.*'inproc-blk'"):
            dst.device("blk0").check_import(with_opaque, dst.slots["blk0"].transport)
        plain = await device.export_state(src.slots["blk0"].transport, include_opaque=False)
        assert plain.opaque is None
        ddev = dst.device("blk0")
        await ddev.import_state(plain, dst.slots["blk0"].transport)
        move_guest(guest, device, ddev, dst.slots["blk0"].transport)
        assert ddev.rings_running and ddev.backend.implementation == "inproc-blk"
        assert await driver.read(3, 512) == b"c" * 512
    finally:
        guest.close()
        await dst.close()


async def test_reference_backend_inflight_reset_and_status(rig: Rig) -> None:
    src = rig.src
    device = src.device("blk0")
    backend = device.backend
    assert isinstance(backend, VhostUserBackend)
    guest = src.guest("blk0")
    try:
        inflight, fd = await backend.get_inflight_fd(2, 64)
        assert fd is not None and inflight.mmap_size >= 2 * (16 + 16 * 64)
        await backend.set_inflight_fd(fd, inflight)
        os.close(fd)
        driver = BlkDriver(guest)
        await driver.start(queue_size=64)
        await driver.write(5, b"d" * 4096)
        assert rig.server.inflight_pending() == 0
        assert await backend.get_status() == Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK
        await guest.reset()
        assert 34 in rig.server.received  # RESET_DEVICE
        await driver.start(queue_size=64)
        assert await driver.read(5, 4096) == b"d" * 4096
    finally:
        guest.close()
