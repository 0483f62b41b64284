"""L0 live-migrates the machine L1 runs in while L2 does I/O through the L1 plugin (the seed's
2.1, 2.2 and 2.3 one level down), on an in-process blk with an image file and on
qemu-storage-daemon (two exports of one image). Local memory model: the destination L0
machine maps the same guest memory, so L2's RAM and rings stay put; L0's device state and the
IOMMU table L1 programmed move. Checked: L2 reads only its own status values, L1's reads of
its L0 device show what the seed says, every L2 request completes exactly once, the data reads
back and lies in the image file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.config import DeviceConfig
from shadowvmm.device import DmaMapping
from shadowvmm.errors import BackendError
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.machine import Machine
from shadowvmm.migration.harness import BlkLoad
from shadowvmm.shadow import RunState, StopDialect
from shadowvmm.testing.peers import QsdBlk
from shadowvmm.testing.plugin import require_peer
from shadowvmm.testing.waits import wait_until
from shadowvmm.timeline import EventKind, Timeline
from shadowvmm.virtio.constants import Status
from shadowvmm.workload import StatusWatcher
from shadowvmm_nested import L1Stack, Phase, build_l1, follow, migrate_l0

MiB = 1 << 20
L0_MEMORY = 48 * MiB
L2_BASE, L2_SIZE = 20 * MiB, 12 * MiB
IMAGE_BYTES = 16 * MiB
BLOCK = 4096
LIVE = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
SUSPENDED = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.SUSPEND)
PROBED = int(Status.ACKNOWLEDGE | Status.DRIVER)


@dataclass
class Backing:
    """The L0 device's backend on the source (role 0) and the destination (role 1), one image."""

    backend: str
    configs: tuple[dict[str, Any], dict[str, Any]]
    image: Path


@pytest.fixture(params=["inproc", pytest.param("qsd", marks=pytest.mark.peer)])
def backing(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backing]:
    image = tmp_path / "disk.img"
    if request.param == "inproc":
        config = {"device": "blk", "image": str(image), "size": IMAGE_BYTES, "queues": 2}
        yield Backing("inproc", (config, config), image)
        return
    binary = require_peer("qemu-storage-daemon")
    with QsdBlk(tmp_path, image=image, size=IMAGE_BYTES, create=True, num_queues=2, exports=2,
                binary=binary) as qsd:
        yield Backing("vhost-user", tuple(  # type: ignore[arg-type]
            {"socket": str(path), "device": "blk", "queues": 2, "timeout": 5.0} for path in qsd.socket_paths[:2]),
            image)


@dataclass
class World:
    src: Machine
    dst: Machine
    stack: L1Stack
    timeline: Timeline

    def requests(self) -> int | None:
        """Requests L0's backends served (in-process only: qsd does not tell)."""
        backends = [m.device("vblk0").backend for m in (self.src, self.dst)]
        if not all(isinstance(b, InProcBackend) for b in backends):
            return None
        return sum(b.requests for b in backends)  # type: ignore[attr-defined]


@asynccontextmanager
async def world(backing: Backing) -> AsyncIterator[World]:
    timeline = Timeline()
    src = Machine(L0_MEMORY, timeline=timeline, level="L0")
    dst = Machine(memory=src.memory, timeline=timeline, level="L0", suffix="@dst")
    stack: L1Stack | None = None
    try:
        for machine, config in zip((src, dst), backing.configs):
            await machine.add_device(DeviceConfig("vblk0", backing.backend, config, queue_size=64,
                                                  stop_dialect=StopDialect.SUSPEND))
        stack = await build_l1(src, "vblk0", l2_base=L2_BASE, l2_size=L2_SIZE, timeline=timeline)
        yield World(src, dst, stack, timeline)
    finally:
        if stack is not None:
            await stack.close()
        await dst.close()
        await src.close()


async def grow(count: Callable[[], int], by: int, what: str) -> None:
    start = count()
    await wait_until(lambda: count() >= start + by, timeout=10, what=what)


@pytest.mark.parametrize("case", ["2.1", "2.2", "2.3"])
async def test_l0_migrates_l1_while_l2_does_io(case: str, backing: Backing, tmp_path: Path) -> None:
    async with world(backing) as w:
        stack, src_dev, dst_dev = w.stack, w.src.device("vblk0"), w.dst.device("vblk0")
        guest, l1_log = stack.guest, stack.lower.transport.status_log
        driver = BlkDriver(guest)
        load = BlkLoad(driver, blocks_per_queue=128, depth=4, seed=11)
        l2_watch = StatusWatcher(guest.status, interval=0.0005)
        l1_watch = StatusWatcher(lambda: stack.lower.status(), interval=0.0005)
        if case != "2.3":
            await driver.start(queue_size=64)
            load.start()
            await grow(lambda: load.completed, 40, "L2 I/O before the migration")
            l2_watch.start()
        table = [DmaMapping(0, L2_BASE, L2_SIZE)] if case != "2.3" else []
        assert w.src.iommu("vblk0").mappings == table and not w.dst.iommu("vblk0").mappings
        if case == "2.2":
            await stack.device.stop()               # L1's VMM stops its device: SUSPEND at L0
            assert stack.backend.phase is Phase.STOPPED and stack.lower.status() == SUSPENDED
            await asyncio.sleep(0.01)               # L2 reaps what completed before the stop
        if case == "2.1":
            l1_watch.start()
        l2_mark, l1_mark = len(guest.transport.status_log.values), len(l1_log.values)
        before = (load.completed, sum(q.completed for q in guest.queues))
        old_lower = stack.lower

        try:
            report, incoming = await migrate_l0(w.src, w.dst, stack, "vblk0", tmp_path, timeline=w.timeline)
        except BaseException:
            await asyncio.gather(load.abandon(), l1_watch.stop(), l2_watch.stop())
            raise

        assert report.ok and report.confirmed and incoming.devices == ["vblk0"]
        assert stack.lower is not old_lower and stack.lower.transport.t is w.dst.slots["vblk0"].transport
        assert stack.lower.transport.status_log is l1_log          # L1's view carried on
        assert w.dst.iommu("vblk0").mappings == table              # the IOMMU record moved it
        assert src_dev.run_state is RunState.STOPPED
        if case == "2.2":
            # nothing ran while L1 had it suspended
            assert (load.completed, sum(q.completed for q in guest.queues)) == before
            assert stack.lower.status() == SUSPENDED                # the destination presents the stop
            assert l1_log.values[l1_mark - 1:] == [SUSPENDED]
            await stack.device.resume()                             # L1 resumes it on the destination
            assert stack.backend.phase is Phase.RUNNING and stack.lower.status() == LIVE
            assert l1_log.values[l1_mark - 1:][-1] == LIVE
        if case == "2.3":
            assert stack.lower.status() == PROBED and l1_log.values[-1] == PROBED
            assert not src_dev.started and not dst_dev.started
            await driver.start(queue_size=64)                       # L2 initialises on the destination
            assert w.dst.iommu("vblk0").mappings == [DmaMapping(0, L2_BASE, L2_SIZE)]
            load.start()
        await grow(lambda: load.completed, 60, "L2 I/O on the destination")
        await l1_watch.stop()
        await l2_watch.stop()
        await load.stop()
        assert dst_dev.rings_running and not src_dev.rings_running

        # data: no error, every read of the load matched, every block reads back, and lies on disk
        assert not load.stats.errors and load.stats.read_mismatches == []
        assert await load.verify() == []
        with open(backing.image, "rb") as image:
            for block, data in load.expected.items():
                image.seek(block * BLOCK)
                assert image.read(BLOCK) == data, f"block {block} on disk"
        # exactly once: what L2 submitted completed once (no loss: nothing in flight; no replay:
        # no used id twice), and L0's backends served exactly that many
        total = load.completed + len(load.expected)
        assert sum(q.completed for q in guest.queues) == total
        assert all(q.ring.in_flight == 0 for q in guest.queues) and guest.violations == []
        served = w.requests()
        assert served is None or served == total
        if served is not None and case != "2.3":
            assert src_dev.backend.requests > 0 and dst_dev.backend.requests > 0  # type: ignore[attr-defined]

        # statuses: L2 read only its own DRIVER_OK; L1 what the seed says
        if case != "2.3":
            assert guest.transport.status_log.values[l2_mark - 1:] == [LIVE]
            assert l2_watch.values == {LIVE} and l2_watch.reads > 5
        else:
            assert guest.transport.status_log.values[-1] == LIVE
        if case == "2.1":
            assert l1_watch.values == {LIVE} and l1_watch.reads > 5
        assert src_dev.faults.total == 0 and dst_dev.faults.total == 0 and stack.device.faults.total == 0

        # the timeline: L0's migration phases, L1's and L2's status reads
        tl = w.timeline
        assert {s.phase for s in tl.spans() if s.level == "L0" and s.device == "migration"} >= {
            "setup", "pre-copy", "stop-and-copy", "switch-over"}
        assert tl.of(EventKind.SWITCH_OVER, level="L0") and tl.of(EventKind.DEST_START, level="L0")
        assert tl.of(EventKind.STATUS_READ, level="L1", device="vblk0")
        assert tl.of(EventKind.STATUS_READ, level="L2", device="blk0")[-1].detail["value"] == LIVE
        if case == "2.2":
            dest_start = tl.of(EventKind.DEST_START, level="L0")[0].t
            reads = tl.of(EventKind.STATUS_READ, level="L1", device="vblk0")    # changes of value only
            assert [e.detail["value"] for e in reads if e.t < dest_start][-1] == SUSPENDED
            assert [e.detail["value"] for e in reads if e.t >= dest_start][-1:] == [LIVE]


async def test_rebind_refuses_a_device_without_l1s_iommu_table(tmp_path: Path) -> None:
    """The destination's IOMMU table must be the one L1 programmed: a switch-over to a device in
    bypass is refused before L1 lets go of its device."""
    config = {"device": "blk", "image": str(tmp_path / "disk.img"), "size": IMAGE_BYTES}
    async with world(Backing("inproc", (config, config), tmp_path / "disk.img")) as w:
        await BlkDriver(w.stack.guest).start(queue_size=64)
        old = w.stack.lower
        with pytest.raises(BackendError, match="not the one L1 programmed"):
            w.stack.backend.rebind(follow(old, w.dst, "vblk0"), w.dst.iommu("vblk0"))
        assert w.stack.lower is old and w.stack.backend.phase is Phase.RUNNING
