"""Acceptance (vhost-user issue), virtio-blk: guest model -> device layer -> VhostUserBackend ->
the real qemu-storage-daemon exporting a raw file image over two queues.

One run writes 10,000 random 4 KiB blocks in phases of queue depth 1, 4, 16 and 32 on both
queues at once, stops and resumes the device transparently several times while requests are in
flight (the guest keeps submitting while it is stopped), reads every block of the disk back at
varied depths, FLUSHes, and then compares every byte of the image file, read directly on the
host, with the reference model. What tests/test_vhost_user_qsd.py already covers (a GET_ID
through a hand-built ring, one stop between two small write/verify runs) is not repeated.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import wait_until, wait_value

from shadowvmm.backends.base import RingState
from shadowvmm.config import DeviceConfig
from shadowvmm.device import VirtioDevice
from shadowvmm.guest.blk import BlkDriver, BlkOp
from shadowvmm.machine import Machine
from shadowvmm.shadow import RunState
from shadowvmm.testing.guards import guarded
from shadowvmm.testing.peers import QsdBlk
from shadowvmm.testing.plugin import require_peer
from shadowvmm.virtio.constants import BlkFeature, BlkRequestType, Status
from shadowvmm.workload import StatusWatcher, block_pattern
from shadowvmm_vhost_user import VhostUserBackend
from shadowvmm_vhost_user.probe import probe

IMAGE_BYTES = 64 << 20
BLOCK = 4096
SECTORS_PER_BLOCK = BLOCK // 512
BLOCKS = IMAGE_BYTES // BLOCK
QUEUES = 2
CONFIG_BYTES = 60          #: virtio_blk_config up to unused1[3] (what qsd serves)
WRITE_PHASES = ((1, 600), (4, 1400), (16, 3000), (32, 5000))   #: (depth per queue, writes); 10,000 in all
READ_DEPTHS = (32, 16, 4, 1)       #: the whole disk is read back in four slices at these depths
                                   #: (16 and 32 as a sliding window, 1 and 4 as batches)
STOP_AT = (300, 1200, 2500, 4200, 6000, 8000)   #: stop/resume once the writes completed pass each mark
STOPPED_FOR = 0.02
LIVE = Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[QsdBlk]:
    """A fresh 64 MiB sparse raw image exported twice (exp0 for the guest, exp1 for the probe)."""
    binary = require_peer("qemu-storage-daemon")
    with QsdBlk(tmp_path, image=tmp_path / "disk.img", size=IMAGE_BYTES, create=True, num_queues=QUEUES,
                exports=2, binary=binary) as peer:
        yield peer


@dataclass
class Run:
    """The reference model and the request accounting of one workload run."""

    expected: dict[int, bytes] = field(default_factory=dict)
    busy: set[int] = field(default_factory=set)   #: blocks with a request in flight
    submitted: list[int] = field(default_factory=lambda: [0] * QUEUES)
    writes_done: int = 0
    seq: int = 0


class Workload:
    def __init__(self, driver: BlkDriver, run: Run, seed: int) -> None:
        self.driver = driver
        self.run = run
        self.rng = random.Random(seed)

    def _free_block(self) -> int:
        """A random block no in-flight request touches (so the final content is defined)."""
        while (block := self.rng.randrange(BLOCKS)) in self.run.busy:
            pass
        return block

    async def _batch(self, ops: list[BlkOp], blocks: list[int], queue: int) -> list[bytes]:
        run = self.run
        run.busy.update(blocks)
        run.submitted[queue] += len(ops)
        try:
            return await self.driver.submit(ops, queue)
        finally:
            run.busy.difference_update(blocks)

    async def writes(self, queue: int, depth: int, count: int) -> None:
        run = self.run
        left = count
        while left:
            blocks, ops = [], []
            for _ in range(min(depth, left)):
                block = self._free_block()
                run.busy.add(block)
                run.seq += 1
                data = block_pattern(block, run.seq, BLOCK)
                run.expected[block] = data
                blocks.append(block)
                ops.append(BlkOp(BlkRequestType.OUT, block * SECTORS_PER_BLOCK, data=data))
            await self._batch(ops, blocks, queue)
            left -= len(ops)
            run.writes_done += len(ops)

    async def reads(self, queue: int, depth: int, blocks: list[int], mismatches: list[int]) -> None:
        zero = bytes(BLOCK)
        if depth >= 16:
            # A sliding window: BlkDriver.pipeline refills each batch of completions at once.
            def check(op: BlkOp, data: bytes) -> None:
                block = op.sector // SECTORS_PER_BLOCK
                if data != self.run.expected.get(block, zero):
                    mismatches.append(block)

            self.run.submitted[queue] += len(blocks)
            ops = (BlkOp(BlkRequestType.IN, b * SECTORS_PER_BLOCK, length=BLOCK) for b in blocks)
            assert await self.driver.pipeline(ops, depth, queue, sink=check) == len(blocks)
            return
        for start in range(0, len(blocks), depth):
            chunk = blocks[start:start + depth]
            datas = await self._batch([BlkOp(BlkRequestType.IN, b * SECTORS_PER_BLOCK, length=BLOCK)
                                       for b in chunk], chunk, queue)
            mismatches += [b for b, got in zip(chunk, datas) if got != self.run.expected.get(b, zero)]


@dataclass
class StopRecord:
    in_flight_at_stop: int
    in_flight_after_stop: int
    states: list[RingState]
    status_while_stopped: int
    submitted_while_stopped: int


async def stopper(device: VirtioDevice, driver: BlkDriver, run: Run, records: list[StopRecord]) -> None:
    """Stop/resume at each mark, at a moment the guest has requests in the rings."""
    guest = driver.dev

    def in_flight() -> int:
        return sum(q.ring.in_flight for q in guest.queues)

    def due(mark: int) -> bool:
        return run.writes_done >= mark and in_flight() > 0

    for mark in STOP_AT:
        await wait_until(functools.partial(due, mark), timeout=30, interval=0,
                         what=f"{mark} writes done and requests in the rings")
        before = in_flight()
        submitted = sum(run.submitted)
        states = await device.stop()
        assert device.run_state is RunState.STOPPED
        after = in_flight()
        status = guest.status()
        await asyncio.sleep(STOPPED_FOR)     # the guest keeps submitting and kicking meanwhile
        records.append(StopRecord(before, after, states, status, sum(run.submitted) - submitted))
        await device.resume()
        assert device.run_state is RunState.RUNNING


@pytest.mark.peer
async def test_blk_acceptance(qsd: QsdBlk) -> None:
    info = await probe(qsd.socket_paths[1], device="blk")
    assert info["config"] is not None and info["config"]["size"] == CONFIG_BYTES
    daemon_config = bytes.fromhex(info["config"]["hex"])

    machine = Machine(64 << 20)
    backend = VhostUserBackend({"socket": str(qsd.socket_path), "device": "blk", "queues": QUEUES, "timeout": 5.0})
    device = await machine.add_device(DeviceConfig("blk0", "vhost-user", {}, transport="pci"), backend)
    guest = machine.guest("blk0")
    watcher: StatusWatcher | None = None
    try:
        driver = BlkDriver(guest)
        features = await driver.start()
        assert features & (BlkFeature.SEG_MAX | BlkFeature.MQ | BlkFeature.FLUSH | BlkFeature.BLK_SIZE) == \
            BlkFeature.SEG_MAX | BlkFeature.MQ | BlkFeature.FLUSH | BlkFeature.BLK_SIZE
        assert len(guest.queues) == QUEUES

        # Config through the guest's device-config registers == what the daemon serves.
        assert guest.read_config(0, CONFIG_BYTES) == daemon_config
        cfg = driver.config
        assert cfg is not None
        assert cfg.capacity == IMAGE_BYTES // 512
        assert cfg.num_queues == QUEUES
        assert cfg.seg_max == int.from_bytes(daemon_config[12:16], "little") > 0
        assert cfg.blk_size == int.from_bytes(daemon_config[20:24], "little") == 512

        assert await driver.get_id() == "vhost_user_blk"
        assert await driver.get_id(queue=1) == "vhost_user_blk"

        watcher = StatusWatcher(guest.status, interval=0.0005).start()
        before = [q.completed for q in guest.queues]
        run = Run()
        work = Workload(driver, run, seed=20261125)
        records: list[StopRecord] = []

        async def writes() -> None:
            for depth, count in WRITE_PHASES:
                per_queue = [count // QUEUES + (q < count % QUEUES) for q in range(QUEUES)]
                await asyncio.gather(*(work.writes(q, depth, n) for q, n in enumerate(per_queue)))

        async with asyncio.timeout(60):
            await guarded(device, qsd.log_tail, writes(), stopper(device, driver, run, records))
        assert run.writes_done == 10_000
        for q in range(QUEUES):
            run.submitted[q] += 1
            await driver.flush(queue=q)

        mismatches: list[int] = []
        order = list(range(BLOCKS))
        random.Random(7).shuffle(order)
        slice_len = BLOCKS // len(READ_DEPTHS)
        async with asyncio.timeout(60):
            for i, depth in enumerate(READ_DEPTHS):
                part = order[i * slice_len:(i + 1) * slice_len]
                half = len(part) // 2
                await guarded(device, qsd.log_tail, work.reads(0, depth, part[:half], mismatches),
                              work.reads(1, depth, part[half:], mismatches))
        assert mismatches == []

        # The stops were transparent and really landed on requests in flight.
        assert len(records) == len(STOP_AT)
        assert all(r.in_flight_at_stop > 0 for r in records)
        assert all(r.status_while_stopped == LIVE for r in records)
        assert any(r.submitted_while_stopped > 0 for r in records), "the guest never submitted while stopped"
        for r in records:
            assert [s.index for s in r.states] == list(range(QUEUES))
        await watcher.stop()
        assert watcher.values == {LIVE} and watcher.reads > 100
        assert set(guest.transport.status_log.values[-1:]) == {LIVE}
        assert device.stats.stops == len(STOP_AT)
        assert device.faults.total == 0

        # Nothing lost or duplicated: every request the guest made available completed exactly once
        # (the guest reaps by head; a duplicate or unknown head raises), and the daemon consumed
        # exactly as many as were made available (its last_avail_idx at a final stop).
        assert sum(run.submitted) == 10_000 + BLOCKS + QUEUES
        assert [q.completed - b for q, b in zip(guest.queues, before)] == run.submitted
        assert all(q.ring.in_flight == 0 for q in guest.queues)
        final = await device.stop()
        assert [s.base for s in final] == [(b + n) & 0xFFFF for b, n in zip(before, run.submitted)]
        await device.resume()

        # Every byte of the image, read on the host after FLUSH, is what the model says.
        assert qsd.image is not None
        fd = os.open(qsd.image, os.O_RDONLY)
        try:
            assert os.fstat(fd).st_size == IMAGE_BYTES
            zero = bytes(BLOCK)
            bad = [b for b in range(BLOCKS) if os.pread(fd, BLOCK, b * BLOCK) != run.expected.get(b, zero)]
        finally:
            os.close(fd)
        assert bad == []
        assert len(run.expected) > 5000
    finally:
        if watcher is not None:
            await watcher.stop()
        guest.close()
        await machine.close()


@pytest.mark.peer
async def test_blk_stop_while_the_daemon_holds_requests(tmp_path: Path) -> None:
    """A slow disk: each stop lands while the daemon itself still has requests in flight.

    vhost-user requires the back-end to finish in-flight requests before it answers
    GET_VRING_BASE; libvhost-user 7.2 (qsd) does not, and closes its call fd there, so the
    front-end must not stop a ring under in-flight requests. Nothing may be lost, nothing
    done twice, and the daemon must survive.
    """
    binary = require_peer("qemu-storage-daemon")
    size = 4 << 20
    # QEMU's throttle lets a burst of iops/10 through, then meters the rest
    with QsdBlk(tmp_path, image=tmp_path / "slow.img", size=size, create=True, num_queues=QUEUES,
                iops=50, binary=binary) as peer:
        machine = Machine(32 << 20)
        backend = VhostUserBackend({"socket": str(peer.socket_path), "device": "blk", "queues": QUEUES})
        device = await machine.add_device(DeviceConfig("blk0", "vhost-user", {}, transport="pci"), backend)
        guest = machine.guest("blk0")
        watcher: StatusWatcher | None = None
        try:
            driver = BlkDriver(guest)
            await driver.start()
            watcher = StatusWatcher(guest.status, interval=0.0005).start()
            expected: dict[int, bytes] = {}
            in_flight_at_stop = []

            def writes(cycle: int, queue: int, first: int, count: int) -> Awaitable[list[bytes]]:
                ops = []
                for block in range(first, first + count):
                    expected[block] = block_pattern(block, cycle, BLOCK)
                    ops.append(BlkOp(BlkRequestType.OUT, block * SECTORS_PER_BLOCK, data=expected[block]))
                return asyncio.ensure_future(driver.submit(ops, queue))

            async def cycles() -> None:
                for cycle in range(3):
                    before = [writes(cycle, q, 64 * q + 16 * cycle, 4) for q in range(QUEUES)]
                    in_flight_at_stop.append(await wait_value(
                        lambda: sum(q.ring.in_flight for q in guest.queues), bool, interval=0.0005,
                        what="the writes in the rings"))
                    await device.stop()
                    assert guest.status() == LIVE
                    during = [writes(cycle, q, 64 * q + 16 * cycle + 8, 2) for q in range(QUEUES)]
                    await asyncio.sleep(STOPPED_FOR)
                    await device.resume()
                    await asyncio.gather(*before, *during)

            async with asyncio.timeout(30):
                await guarded(device, peer.log_tail, cycles())
            await watcher.stop()
            assert peer.running, f"qemu-storage-daemon died:\n{peer.log_tail()}"
            assert all(n > 0 for n in in_flight_at_stop)
            assert watcher.values == {LIVE}
            for q in range(QUEUES):
                await driver.flush(queue=q)
            blocks = sorted(expected)
            got = await driver.submit([BlkOp(BlkRequestType.IN, b * SECTORS_PER_BLOCK, length=BLOCK)
                                       for b in blocks[:32]])
            got += await driver.submit([BlkOp(BlkRequestType.IN, b * SECTORS_PER_BLOCK, length=BLOCK)
                                        for b in blocks[32:]], queue=1)
            assert got == [expected[b] for b in blocks]
            assert peer.image is not None
            with open(peer.image, "rb") as f:
                for block in blocks:
                    assert os.pread(f.fileno(), BLOCK, block * BLOCK) == expected[block]
            # per queue: 3 cycles x (4 + 2) writes, one FLUSH, the read-back
            assert [q.completed for q in guest.queues] == [3 * 6 + 1 + 32, 3 * 6 + 1 + len(blocks) - 32]
            assert device.faults.total == 0
        finally:
            if watcher is not None:
                await watcher.stop()
            guest.close()
            await machine.close()
