"""virtio-fs on virtiofsd 7.2 (no DEVICE_STATE): refused by default (the FUSE session stays in the
backend); with fs_session="remount" it migrates without open files and the guest mounts again."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shadowvmm.backends.base import Capability
from shadowvmm.config import DeviceConfig
from shadowvmm.errors import MigrationError
from shadowvmm.guest.fs import FsDriver
from shadowvmm.guest.fuse import FuseError
from shadowvmm.machine import Machine
from shadowvmm.migration.harness import machine_sharing, move_guest
from shadowvmm.migration.migrate import MigrationOptions, migrate_in, migrate_out
from shadowvmm.migration.stream import Endpoint
from shadowvmm.testing.peers import Virtiofsd
from shadowvmm.testing.plugin import require_peer
from shadowvmm.virtio.constants import Status
from shadowvmm.virtio.devcfg import FS_CONFIG_BASE_SIZE, FsConfig
from shadowvmm_vhost_user import VhostUserBackend

TAG = "migfs"
DRIVER_OK_STATUS = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)


@dataclass
class FsPair:
    src: Machine
    dst: Machine
    driver: FsDriver
    tmp: Path


async def add_fs(machine: Machine, peer: Virtiofsd) -> None:
    cfg = {"socket": str(peer.socket_path), "device": "fs", "timeout": 5.0}
    await machine.add_device(DeviceConfig("fs0", "vhost-user", cfg), backend=VhostUserBackend(cfg),
                             config_override=FsConfig(TAG).pack(FS_CONFIG_BASE_SIZE))


@pytest.fixture
async def fs_pair(tmp_path: Path) -> AsyncIterator[FsPair]:
    binary = require_peer("virtiofsd")
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello.txt").write_bytes(b"hello\n")
    with Virtiofsd(tmp_path, source=share, binary=binary, name="vfs-src") as src_peer, \
            Virtiofsd(tmp_path, source=share, binary=binary, name="vfs-dst") as dst_peer:
        src = Machine(64 << 20)
        dst = machine_sharing(src.memory)
        try:
            await add_fs(src, src_peer)
            await add_fs(dst, dst_peer)
            driver = FsDriver(src.guest("fs0"))
            await asyncio.wait_for(driver.start(), 10)
            yield FsPair(src, dst, driver, tmp_path)
        finally:
            await dst.close()
            await src.close()


async def run(pair: FsPair, fs_session: str = "refuse"):
    endpoint = Endpoint.parse(f"unix:{pair.tmp / 'm.sock'}")
    listener = await endpoint.listen()

    async def incoming():
        return await migrate_in(pair.dst, await listener.accept(5), timeout=5)
    task = asyncio.ensure_future(incoming())
    try:
        return await migrate_out(pair.src, await endpoint.connect(),
                                 MigrationOptions(mode="local", fs_session=fs_session))
    finally:
        task.cancel()
        try:
            result = await task
        except (asyncio.CancelledError, Exception):
            result = None
        await listener.close()
        if result is not None:
            pair.result = result  # type: ignore[attr-defined]


@pytest.mark.peer
async def test_fs_session_without_device_state_is_refused_by_default(fs_pair: FsPair) -> None:
    """The C virtiofsd keeps the FUSE session to itself: refused before anything stops."""
    driver = fs_pair.driver
    sdev = fs_pair.src.device("fs0")
    with pytest.raises(MigrationError) as info:
        await run(fs_pair)
    message = str(info.value)
    assert "before anything stopped" in message and "FUSE session" in message
    assert "DEVICE_STATE" in message and "remount" in message
    assert sdev.stats.stops == 0 and sdev.rings_running
    assert not fs_pair.dst.device("fs0").started
    assert await driver.read_file("hello.txt") == b"hello\n"


@pytest.mark.peer
async def test_fs_without_open_files_migrates_and_the_guest_remounts(fs_pair: FsPair) -> None:
    driver = fs_pair.driver
    assert await driver.read_file("hello.txt") == b"hello\n"
    sdev, ddev = fs_pair.src.device("fs0"), fs_pair.dst.device("fs0")
    assert not sdev.backend_caps & Capability.DEVICE_STATE
    report = await run(fs_pair, "remount")
    assert report.ok and report.device_state_bytes > 0
    assert sdev.run_state.value == "stopped"
    assert ddev.rings_running and ddev.read_status() == DRIVER_OK_STATUS
    assert ddev.ring_states == sdev.ring_states and ddev.ring_states
    assert ddev.config == sdev.config
    move_guest(driver.dev, sdev, ddev, fs_pair.dst.slots["fs0"].transport)
    # The destination virtiofsd has no session yet: EIO (not a hang), until the guest mounts again.
    with pytest.raises(FuseError) as info:
        await asyncio.wait_for(driver.read_file("hello.txt"), 5)
    assert info.value.errno == errno.EIO
    await asyncio.wait_for(driver.remount(), 5)
    assert await driver.read_file("hello.txt") == b"hello\n"
    await driver.write_file("after.txt", b"written on the destination\n")
    assert (fs_pair.tmp / "share" / "after.txt").read_bytes() == b"written on the destination\n"
    assert ddev.faults.total == 0


@pytest.mark.peer
async def test_fs_with_open_file_refused_before_stop(fs_pair: FsPair) -> None:
    driver = fs_pair.driver
    entry = await driver.lookup(1, "hello.txt")
    handle = await driver.open(entry.nodeid)
    sdev = fs_pair.src.device("fs0")
    with pytest.raises(MigrationError) as info:
        await run(fs_pair, "remount")
    message = str(info.value)
    assert "before anything stopped" in message and "open file handle" in message
    assert "hello.txt" in message and "DEVICE_STATE" in message
    assert sdev.stats.stops == 0 and sdev.rings_running
    assert not fs_pair.dst.device("fs0").started
    assert await driver.read(entry.nodeid, handle.fh, 0, 6) == b"hello\n"
    await driver.release(entry.nodeid, handle.fh)
