"""L1 moves its L2's device to another L0 device under L2 I/O, on each stop path and backend.

* suspend: refused with RefusedError (no ring base can be set on a fresh device), L2 runs on;
* ring-state: STOP, the ring-state registers read, and written on the destination before
  DRIVER_OK (the same L2 rings, reached through the destination's IOMMU table);
* admin: DEV_MODE_SET / DEV_PARTS_GET on the source member, DEV_PARTS_SET and DEV_MODE_SET
  on another member of the same owner.

Backends: the in-process one on an image file both L0 devices open, and qemu-storage-daemon
with two exports of one image file. L2 reads DRIVER_OK throughout, every request completes
exactly once (counted at L2 and, in process, at the L0 backends), and the data is in the image.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from l1chain import L2_BASE, L2_SIZE, LIVE, Chain, nested_chain

from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.device import DmaMapping
from shadowvmm.errors import RefusedError
from shadowvmm.shadow import RunState
from shadowvmm.testing.peers import QsdBlk
from shadowvmm.testing.plugin import require_peer
from shadowvmm.timeline import EventKind, Timeline
from shadowvmm.workload import BlkResult, StatusWatcher, blk_write_verify
from shadowvmm_nested import AdminPath, RingStatePath, move_device

IMAGE_SIZE = 16 << 20
BLOCK = 4096
BLOCKS = 1024


@dataclass
class Disk:
    """Two L0 device configs on one image file."""

    backend: str
    configs: tuple[dict[str, Any], dict[str, Any]]
    image: Path
    in_process: bool


@pytest.fixture(params=["inproc", "qsd"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Disk]:
    image = tmp_path / "disk.img"
    if request.param == "inproc":
        cfg = {"device": "blk", "image": str(image), "size": IMAGE_SIZE, "queues": 2, "latency_us": 200}
        yield Disk("inproc", (cfg, dict(cfg)), image, True)
        return
    binary = require_peer("qemu-storage-daemon")
    with QsdBlk(tmp_path, image=image, size=IMAGE_SIZE, create=True, num_queues=2, exports=2,
                binary=binary) as qsd:
        sockets = list(qsd.socket_paths)
        yield Disk("vhost-user", tuple({"socket": str(s), "device": "blk", "queues": 2, "timeout": 5.0}
                                       for s in sockets), image, False)   # type: ignore[arg-type]


async def _move_under_io(c: Chain, *, expect_refusal: bool) -> tuple[BlkResult, StatusWatcher, float]:
    """L2 writes 400 blocks and reads them back; the move starts after 160 writes, with L2's
    requests in flight."""
    assert c.lower2 is not None
    watcher = StatusWatcher(c.driver.dev.status, interval=0).start()
    took: list[float] = []
    tasks: list[asyncio.Task[None]] = []

    async def mover() -> None:
        start = time.perf_counter()
        assert c.lower2 is not None
        if expect_refusal:
            with pytest.raises(RefusedError, match="SUSPEND offers no way to set ring bases"):
                await move_device(c.device, c.lower2, c.l0.iommu("vblk1"))
        else:
            await move_device(c.device, c.lower2, c.l0.iommu("vblk1"))
        took.append(time.perf_counter() - start)

    def progress(done: int) -> None:
        if done >= 160 and not tasks:
            tasks.append(asyncio.create_task(mover()))

    res = await blk_write_verify(c.driver, requests=400, queue_depth=8, block_bytes=BLOCK, seed=11,
                                 blocks=BLOCKS, on_progress=progress)
    await asyncio.gather(*tasks)
    await watcher.stop()
    return res, watcher, took[0]


def _on_disk(image: Path, res: BlkResult) -> list[int]:
    """Blocks whose bytes in the image file differ from the last write."""
    with open(image, "rb") as f:
        bad = []
        for block, data in res.expected.items():
            f.seek(block * BLOCK)
            if f.read(BLOCK) != data:
                bad.append(block)
    return bad


@pytest.mark.parametrize("path", ["suspend", "ring-state", "admin"])
async def test_l1_moves_l2s_device_under_l2_io(path: str, disk: Disk) -> None:
    timeline = Timeline()
    async with nested_chain(disk.backend, disk.configs[0], path=path, second=disk.configs[1],
                            timeline=timeline, l2_queue_size=64) as c:
        old, new = c.l0_device, c.l0.device("vblk1")
        res, watcher, took = await _move_under_io(c, expect_refusal=path == "suspend")
        guest = c.driver.dev
        assert res.mismatches == [] and not guest.violations
        assert sum(q.completed for q in guest.queues) == res.writes + res.reads == 400 + len(res.expected)
        assert all(q.ring.in_flight == 0 for q in guest.queues)
        assert watcher.values == {LIVE} and watcher.reads > 20       # L2 read DRIVER_OK throughout
        seen = guest.transport.status_log.values
        assert seen[seen.index(LIVE):] == [LIVE]
        assert c.device.run_state is RunState.RUNNING and c.device.faults.total == 0
        if disk.in_process:
            a, b = old.backend, new.backend
            assert isinstance(a, InProcBackend) and isinstance(b, InProcBackend)
            assert a.requests + b.requests == res.writes + res.reads     # each request served once
        if path == "suspend":
            assert c.backend.lower is c.lower and c.lower2 is not None and c.lower2.status() == 0
            assert not c.l0.iommu("vblk1").translated
            if disk.in_process:
                assert new.backend.requests == 0  # type: ignore[union-attr]
        else:
            assert c.backend.lower is c.lower2 and c.lower.status() == 0 and c.lower2.status() == LIVE
            assert not c.l0.iommu("vblk0").translated
            assert c.l0.iommu("vblk1").mappings == [DmaMapping(0, L2_BASE, L2_SIZE)]
            bases = {i: s.base for i, s in new.ring_states.items()} if not new.rings_running else None
            assert bases is None                                          # the destination runs
            if disk.in_process:
                assert old.backend.requests > 0 and new.backend.requests > 0  # type: ignore[union-attr]
            # the destination's rings continued where L2's stood, not from 0
            if path == "ring-state":
                ops = [(e.detail["op"], e.detail["ring"], e.detail["value"])
                       for e in timeline.events if e.kind is EventKind.RING_STATE]
                reads = [(ring, value) for op, ring, value in ops if op == "read"]
                writes = [(ring, value) for op, ring, value in ops if op == "write"]
                assert reads == writes and len(writes) == 2 and any(value > 0 for _, value in writes)
            else:
                ops = [(e.detail["opcode"], e.detail["member"])
                       for e in timeline.of(EventKind.ADMIN_COMMAND, level="L1")]
                assert ops == [("DEV_MODE_SET", 1), ("DEV_PARTS_GET", 1), ("DEV_MODE_SET", 2),
                               ("DEV_PARTS_SET", 2), ("DEV_MODE_SET", 2)]
                assert isinstance(c.path, AdminPath)
                assert c.path.stop_commands == 5 and c.path.start_commands == 5
        await c.driver.flush()
        assert _on_disk(disk.image, res) == []
        print(f"\n{path} on {disk.backend}: move {took * 1e3:.2f} ms, stop "
              f"{_stop_ms(timeline):.3f} ms, {_accesses(c)}")


def _stop_ms(timeline: Timeline) -> float:
    starts = [e.t for e in timeline.events if e.kind is EventKind.STOP_START and e.level == "L1"]
    ends = [e.t for e in timeline.events if e.kind is EventKind.STOP_END and e.level == "L1"]
    return (ends[0] - starts[0]) * 1e3 if starts and ends else float("nan")


def _accesses(c: Chain) -> str:
    if isinstance(c.path, RingStatePath):
        return f"stop+capture register accesses {c.path.stop_accesses}, ring-state writes {c.path.base_writes}"
    if isinstance(c.path, AdminPath):
        return f"admin commands: stop+capture {c.path.stop_commands}, start {c.path.start_commands}"
    return "suspend: refused"


@pytest.mark.parametrize("path", ["ring-state", "admin"])
async def test_in_place_stop_and_resume_under_l2_io(path: str, tmp_path: Path) -> None:
    """L1's transparent stop and resume on the same L0 device: on the ring-state path the resume
    is a reset and a start at the registers' states (STOP is left only by a reset), on the
    admin path DEV_MODE_SET twice. L2 reads DRIVER_OK throughout, nothing is lost or replayed."""
    cfg = {"device": "blk", "image": str(tmp_path / "d.img"), "size": IMAGE_SIZE, "queues": 2, "latency_us": 300}
    async with nested_chain("inproc", cfg, path=path, l2_queue_size=64) as c:
        inner = c.l0_device.backend
        assert isinstance(inner, InProcBackend)
        watcher = StatusWatcher(c.driver.dev.status, interval=0).start()
        bases: list[int] = []
        finished = asyncio.Event()

        async def stopper() -> None:
            while len(bases) < 3 and not finished.is_set():
                await asyncio.sleep(0.01)
                states = await c.device.stop()
                bases.append(states[0].base)
                await c.device.resume()

        task = asyncio.create_task(stopper())
        res = await blk_write_verify(c.driver, requests=300, queue_depth=8, block_bytes=BLOCK, seed=4, blocks=BLOCKS)
        finished.set()
        await task
        await watcher.stop()
        guest = c.driver.dev
        assert len(bases) == 3 and bases == sorted(bases) and bases[-1] > 0
        assert res.mismatches == [] and not guest.violations
        assert inner.requests == res.writes + res.reads == sum(q.completed for q in guest.queues)
        assert watcher.values == {LIVE} and c.lower.status() == LIVE
