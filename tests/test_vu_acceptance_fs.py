"""Acceptance (vhost-user issue), virtio-fs: guest model -> device layer -> VhostUserBackend ->
the real C virtiofsd, checked on the host directory.

tests/test_guest_fs.py already covers the FUSE wire format, INIT, the single operations (create,
write, read, mkdir, readdir, rename within and across directories, RENAME2 flags, unlink, rmdir),
whole-file helpers and DESTROY + disconnect on an otherwise idle session. Here: the semantics it
leaves out (rename over an existing file, unlink of an open file, host-side changes seen by the
guest, a guest-built tree moved and torn down), and a stream of fs requests across transparent
stop/resume cycles, after which DESTROY and the disconnect leave no virtiofsd process behind.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import wait_until

from shadowvmm.config import DeviceConfig
from shadowvmm.device import VirtioDevice
from shadowvmm.guest import fuse
from shadowvmm.guest.fs import FsDriver, FuseRequest
from shadowvmm.guest.fuse import FuseError, MkdirIn, Opcode, WriteIn, WriteOut
from shadowvmm.machine import Machine
from shadowvmm.shadow import RunState
from shadowvmm.testing.guards import guarded
from shadowvmm.testing.peers import Virtiofsd
from shadowvmm.virtio.constants import Status
from shadowvmm.virtio.devcfg import FS_CONFIG_BASE_SIZE, FsConfig
from shadowvmm.workload import StatusWatcher
from shadowvmm_vhost_user.backend import VhostUserBackend

TAG = "accept"
LIVE = Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK
BATCHES = 300              #: stream length: each batch is RECORDS appends + MKDIRS mkdirs
RECORDS = 6
MKDIRS = 2
STOP_AT = (30, 80, 140, 200, 250)   #: stop/resume right after these batches were made available
STOPPED_FOR = 0.02


@dataclass
class FsRig:
    machine: Machine
    device: VirtioDevice
    driver: FsDriver
    share: Path
    peer: Virtiofsd


@pytest.fixture
async def fs(virtiofsd: Virtiofsd) -> AsyncIterator[FsRig]:
    machine = Machine(memory_bytes=64 << 20)
    cfg = {"socket": str(virtiofsd.socket_path), "device": "fs", "timeout": 5.0}
    device = await machine.add_device(DeviceConfig("fs0", "vhost-user", cfg), backend=VhostUserBackend(cfg),
                                      config_override=FsConfig(TAG).pack(FS_CONFIG_BASE_SIZE))
    driver = FsDriver(machine.guest("fs0"), request_timeout=10.0)
    try:
        await asyncio.wait_for(driver.start(), 10)
        yield FsRig(machine, device, driver, virtiofsd.source, virtiofsd)
    finally:
        if driver.init is not None and device.run_state is not RunState.FAILED:
            await asyncio.wait_for(driver.close(), 10)
        else:
            driver.dev.close()
        await machine.close()


def virtiofsd_processes(marker: str) -> list[int]:
    """Pids of live virtiofsd processes whose command line mentions *marker*."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and argv and argv[0].endswith(b"virtiofsd") and any(marker.encode() in a for a in argv):
            pids.append(int(entry.name))
    return pids


@pytest.mark.peer
async def test_fs_semantics_not_covered_elsewhere(fs: FsRig) -> None:
    d, share = fs.driver, fs.share

    # RENAME onto an existing file replaces it (no flags: rename(2) semantics).
    await d.write_file("old.txt", b"old content")
    await d.write_file("new.txt", b"new content")
    await d.rename_path("new.txt", "old.txt")
    assert (share / "old.txt").read_bytes() == b"new content" and not (share / "new.txt").exists()
    assert await d.read_file("old.txt") == b"new content"

    # UNLINK of an open file: gone from the directory, still readable through the open handle.
    entry = await d.lookup(fuse.FUSE_ROOT_ID, "old.txt")
    handle = await d.open(entry.nodeid, os.O_RDONLY)
    await d.unlink(fuse.FUSE_ROOT_ID, "old.txt")
    assert not (share / "old.txt").exists()
    assert await d.read(entry.nodeid, handle.fh, 4, 100) == b"content"
    await d.release(entry.nodeid, handle.fh)
    await d.forget([(entry.nodeid, 1)])
    with pytest.raises(FuseError) as err:
        await d.read_file("old.txt")
    assert err.value.errno == errno.ENOENT

    # Changes made on the host are what the guest reads, lists and stats.
    (share / "hostmade.bin").write_bytes(b"x" * 5000)
    assert (await d.stat("hostmade.bin")).size == 5000
    with open(share / "hostmade.bin", "r+b") as f:
        f.seek(4096)
        f.write(b"HOST")
    data = await d.read_file("hostmade.bin")
    assert len(data) == 5000 and data[4096:4100] == b"HOST" and data[:4096] == b"x" * 4096

    # A tree built by the guest: the host sees exactly it; moved as a whole; torn down by the guest.
    rng = random.Random(3)
    files = {f"t/{a}/{b}/f{i}": rng.randbytes(rng.randrange(0, 3000))
             for a in ("p", "q") for b in ("r", "s") for i in range(12)}
    for path in files:
        await d.makedirs(os.path.dirname(path))
    for path, content in files.items():
        await d.write_file(path, content, mode=0o640)
    for path, content in files.items():
        host = share / path
        assert host.read_bytes() == content
        assert stat.S_IMODE(host.stat().st_mode) == 0o640
    host_names = sorted(os.listdir(share / "t/p/r"))
    assert sorted(await d.listdir("t/p/r")) == host_names == sorted(f"f{i}" for i in range(12))
    await d.makedirs("moved")
    await d.rename_path("t/p", "moved/p2")
    assert not (share / "t/p").exists()
    for path, content in files.items():
        if path.startswith("t/p/"):
            assert (share / "moved/p2" / path[4:]).read_bytes() == content
            assert await d.read_file("moved/p2/" + path[4:]) == content
    for top in ("moved/p2", "t/q"):
        for sub in ("r", "s"):
            for i in range(12):
                await d.remove(f"{top}/{sub}/f{i}")
            await d.rmdir_path(f"{top}/{sub}")
        await d.rmdir_path(top)
    await d.rmdir_path("moved")
    await d.rmdir_path("t")
    assert sorted(p.name for p in share.iterdir()) == ["hello.txt", "hostmade.bin"]
    assert sorted(await d.listdir()) == ["hello.txt", "hostmade.bin"]
    assert fs.device.faults.total == 0


@pytest.mark.peer
async def test_fs_stream_across_transparent_stops(fs: FsRig) -> None:
    d, share, device = fs.driver, fs.share, fs.device
    guest = d.dev
    created = await d.create(fuse.FUSE_ROOT_ID, "log.txt", 0o644, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    node, fh = created.entry.nodeid, created.open.fh
    top = await d.mkdir(fuse.FUSE_ROOT_ID, "dirs", 0o755)
    request_queue = guest.queues[1]
    completed_before = request_queue.completed

    submitted = 0
    results: list[bytes | FuseError] = []
    pauses: list[asyncio.Task] = []
    stops: list[tuple[int, int]] = []   # (requests in flight when the stop began, status while stopped)

    def append(record: bytes) -> FuseRequest:
        return FuseRequest(Opcode.WRITE, node, WriteIn(fh, 0, len(record)), payload=record)

    async def pause(n: int) -> None:
        """Stop; the guest submits more while the device is stopped; resume."""
        nonlocal submitted
        in_flight = request_queue.ring.in_flight
        await device.stop()
        assert device.run_state is RunState.STOPPED
        status = guest.status()
        extra = [append(b"stopped %d %d\n" % (n, i)) for i in range(2)]
        submitted += len(extra)
        late = asyncio.ensure_future(d.submit(extra))
        await asyncio.sleep(STOPPED_FOR)
        assert not late.done(), "a request completed while the device was stopped"
        await device.resume()
        results.extend(await late)
        stops.append((in_flight, status))

    async def stream() -> None:
        nonlocal submitted
        seq = 0
        marks = list(STOP_AT)
        for number in range(BATCHES):
            batch = []
            for _ in range(RECORDS):
                batch.append(append(b"rec %07d\n" % seq))
                seq += 1
            for _ in range(MKDIRS):
                batch.append(FuseRequest(Opcode.MKDIR, top.nodeid, MkdirIn(0o755, 0), (b"d%07d" % seq,)))
                seq += 1
            submitted += len(batch)
            answer = asyncio.ensure_future(d.submit(batch))
            if marks and number == marks[0]:
                marks.pop(0)
                await asyncio.sleep(0)      # submit() made the batch available and kicked
                pauses.append(asyncio.ensure_future(pause(number)))
            results.extend(await answer)
        await asyncio.gather(*pauses)

    watcher = StatusWatcher(guest.status, interval=0.0005).start()
    try:
        async with asyncio.timeout(40):
            await guarded(device, fs.peer.log_tail, stream())
    finally:
        for task in pauses:
            task.cancel()
        await watcher.stop()

    # Every request was answered once, without error, and the guest saw only DRIVER_OK.
    assert len(stops) == len(STOP_AT) and all(n > 0 and s == LIVE for n, s in stops)
    assert watcher.values == {LIVE} and watcher.reads > 100
    assert [r for r in results if isinstance(r, FuseError)] == []
    assert len(results) == submitted == BATCHES * (RECORDS + MKDIRS) + 2 * len(STOP_AT)
    assert request_queue.completed - completed_before == submitted and request_queue.ring.in_flight == 0
    writes = [WriteOut.unpack(r).size for r in results if isinstance(r, bytes) and len(r) == WriteOut.SIZE]
    assert len(writes) == BATCHES * RECORDS + 2 * len(STOP_AT)
    assert device.stats.stops == len(STOP_AT) and device.faults.total == 0

    # The host directory holds each appended record exactly once and every directory made.
    await d.release(node, fh, os.O_WRONLY)
    log = (share / "log.txt").read_bytes().splitlines()
    expected_records = sorted([b"rec %07d" % (b * (RECORDS + MKDIRS) + i)
                               for b in range(BATCHES) for i in range(RECORDS)]
                              + [b"stopped %d %d" % (n, i) for n in STOP_AT for i in range(2)])
    assert sorted(log) == expected_records, "an append was lost or replayed"
    expected_dirs = sorted(f"d{b * (RECORDS + MKDIRS) + RECORDS + i:07d}"
                           for b in range(BATCHES) for i in range(MKDIRS))
    assert sorted(os.listdir(share / "dirs")) == expected_dirs
    assert sorted(await d.listdir("dirs")) == expected_dirs

    # DESTROY and the disconnect end virtiofsd: nothing of it is left running.
    await d.forget([(node, 1), (top.nodeid, 1)])
    marker = f"source={share}"
    assert virtiofsd_processes(marker) == [fs.peer.pid]
    await asyncio.wait_for(d.close(), 10)
    await fs.machine.close()
    await wait_until(lambda: not fs.peer.running, interval=0.01, what="virtiofsd to exit after DESTROY + disconnect")
    assert fs.peer.returncode == 0, "virtiofsd did not exit cleanly after DESTROY + disconnect"
    assert virtiofsd_processes(marker) == []
    assert len(log) == BATCHES * RECORDS + 2 * len(STOP_AT)
