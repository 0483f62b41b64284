"""The guest side of a scenario: a driver for the device's type, I/O with exactly-once accounting.

blk writes blocks and reads every block written so far back (data checked against what was
written); rng reads entropy; fs writes a file through FUSE and reads it back; net sends frames
and expects each back once (a looping back-end: testpmd in io mode, vdpasim_net); any other
type is initialised through the generic driver core and does no I/O. Every request is
counted when submitted and its completion when the guest's queue reaps it: at the end the two
are equal and the guest saw no ring protocol violation.
"""

from __future__ import annotations

import asyncio

from ..guest.blk import WANTED as BLK_WANTED
from ..guest.blk import BlkDriver
from ..guest.driver import GuestDevice
from ..guest.fs import WANTED as FS_WANTED
from ..guest.fs import FsDriver
from ..guest.net import WANTED as NET_WANTED
from ..guest.net import NetDriver
from ..guest.rng import RngDriver
from ..virtio.constants import DeviceId, Feature, Status
from ..workload import block_pattern
from .context import ScenarioReport

BLOCK_BYTES = 4096
#: Blocks written per round (spread over the queues).
BLOCKS_PER_ROUND = 8
#: Frames sent per round (net), and the bytes of the file written per round (fs).
FRAMES_PER_ROUND = 16
FILE_BYTES = 1024


class GuestIo:
    """A guest driver for *guest*'s device, accounting into *report*."""

    def __init__(self, guest: GuestDevice, device_id: DeviceId, report: ScenarioReport, *,
                 packed: bool = False, queue_size: int = 64) -> None:
        self.guest, self.device_id, self.report = guest, device_id, report
        self.packed, self.queue_size = packed, queue_size
        self.blk = BlkDriver(guest) if device_id is DeviceId.BLOCK else None
        self.rng = RngDriver(guest) if device_id is DeviceId.RNG else None
        self.fs = FsDriver(guest) if device_id is DeviceId.FS else None
        self.net = NetDriver(guest, ctrl_timeout=1.0) if device_id is DeviceId.NET else None
        self.expected: dict[int, bytes] = {}
        self.rounds = 0
        report.workload = {DeviceId.BLOCK: "blk write + read-back", DeviceId.RNG: "rng read",
                           DeviceId.FS: "fs FUSE write + read-back",
                           DeviceId.NET: "net frames out and back"}.get(device_id, "none")

    @property
    def wanted(self) -> int:
        """The device-type features the driver asks for (VERSION_1 aside)."""
        if self.blk is not None:
            return BLK_WANTED
        if self.net is not None:
            return NET_WANTED
        return FS_WANTED if self.fs is not None else 0

    async def start(self, extra_features: int = 0) -> int:
        """The full initialisation (a reset first): v1.4 §3.1.1."""
        if self.blk is not None:
            return await self.blk.start(packed=self.packed, queue_size=self.queue_size, extra_features=extra_features)
        if self.rng is not None:
            return await self.rng.start(packed=self.packed, queue_size=self.queue_size, extra_features=extra_features)
        if self.fs is not None:
            await self.fs.start(queue_size=self.queue_size, extra_features=extra_features)
            return self.guest.features
        if self.net is not None:
            return await self.net.start(packed=self.packed, queue_size=self.queue_size, extra_features=extra_features)
        return await self.guest.initialize(extra_features, packed=self.packed, queue_size=self.queue_size)

    def _queue_count(self) -> int:
        """The queues the guest's driver sets up for what it negotiated."""
        if self.rng is not None:
            return 1
        if self.net is not None:
            return self.net.queue_count(self.guest.features)
        if self.fs is not None:
            return self.fs.queue_count()
        return self.guest.transport.num_queues()

    async def finish_init(self, extra_features: int = 0) -> int:
        """Finish v1.4 §3.1.1 from wherever the guest left off, without a reset (scenario 2.3):
        the missing status steps and queues, DRIVER_OK, then the type's driver takes the device
        (blk its request slots, net its buffers with the receive queues filled, fs FUSE_INIT)."""
        guest, t = self.guest, self.guest.transport
        status = guest.status()
        if not status & Status.ACKNOWLEDGE:
            t.set_status(Status.ACKNOWLEDGE)
        if not status & Status.DRIVER:
            t.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        if not status & Status.FEATURES_OK:
            accepted = t.device_features() & (self.wanted | extra_features | Feature.VERSION_1)
            t.set_driver_features(accepted)
            t.set_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
            guest.features = accepted
        guest._start_interrupts()
        t.set_config_vector(0)
        count = self._queue_count()
        for index in range(len(guest.queues), count):
            guest.queues.append(guest._setup_queue(index, self.queue_size))
        guest.driver_ok()
        await guest.started()
        if self.blk is not None:
            self.blk.attach()
        elif self.rng is not None:
            self.rng.buffer = guest.alloc.alloc(self.rng.buffer_size, 16)
        elif self.net is not None:
            self.net.attach()
        elif self.fs is not None:
            await self.fs.attach()
        return guest.features

    def _completed(self) -> int:
        return sum(q.completed for q in self.guest.queues)

    async def _requests(self, count: int, work: asyncio.Future | asyncio.Task) -> None:
        before = self._completed()
        self.report.submitted += count
        await work
        self.report.completed += self._completed() - before

    async def io(self, timeout: float = 10.0) -> None:
        """One round: blk writes BLOCKS_PER_ROUND new blocks, then reads back all written so far."""
        self.rounds += 1
        async with asyncio.timeout(timeout):
            if self.blk is not None:
                await self._blk_round(self.blk)
            elif self.rng is not None:
                data = await self._counted_rng(self.rng)
                self.report.check(len(data) == 64, f"rng returned {len(data)} bytes, not 64")
            elif self.fs is not None:
                await self._fs_round(self.fs)
            elif self.net is not None:
                await self._net_round(self.net)
        self.report.violations = list(self.guest.violations)

    async def _counted_rng(self, rng: RngDriver) -> bytes:
        before = self._completed()
        data = await rng.read(64)
        done = self._completed() - before
        self.report.submitted += done       # one request per buffer the device filled
        self.report.completed += done
        return data

    async def _blk_round(self, blk: BlkDriver) -> None:
        queues = len(self.guest.queues)
        first = (self.rounds - 1) * BLOCKS_PER_ROUND
        sectors = BLOCK_BYTES // 512
        for block in range(first, first + BLOCKS_PER_ROUND):
            data = block_pattern(block, self.rounds, BLOCK_BYTES)
            await self._requests(1, asyncio.ensure_future(blk.write(block * sectors, data, block % queues)))
            self.expected[block] = data
        await self.verify()

    async def verify(self) -> None:
        """Read back every block written so far and compare (blk; a no-op otherwise)."""
        blk = self.blk
        if blk is None:
            return
        queues = len(self.guest.queues)
        sectors = BLOCK_BYTES // 512
        bad = 0
        for block, want in sorted(self.expected.items()):
            read = asyncio.ensure_future(blk.read(block * sectors, BLOCK_BYTES, block % queues))
            await self._requests(1, read)
            bad += read.result() != want
        self.report.verified = len(self.expected)
        self.report.mismatches += bad

    async def _fs_round(self, fs: FsDriver) -> None:
        """Write a new file through FUSE, read it back: every request completed once, none left."""
        data = block_pattern(self.rounds, self.rounds, FILE_BYTES)
        before = self._completed()
        await fs.write_file(f"scenario-{self.rounds}.bin", data)
        read = await fs.read_file(f"scenario-{self.rounds}.bin")
        done = self._completed() - before
        left = sum(q.ring.in_flight for q in self.guest.queues)
        self.report.submitted += done + left
        self.report.completed += done
        self.report.verified += 1
        self.report.mismatches += read != data

    async def _net_round(self, net: NetDriver) -> None:
        """Send FRAMES_PER_ROUND frames; each must come back exactly once, in order, unchanged."""
        src = net.mac
        frames = [b"\xff" * 6 + src + b"\x88\xb5" + bytes([self.rounds & 0xFF, i]) + bytes(44)
                  for i in range(FRAMES_PER_ROUND)]
        sent = await net.send(frames)
        got = await net.receive(len(frames), timeout=5.0)
        extra = await net.receive(1, timeout=0.02)
        self.report.submitted += 2 * len(frames)
        self.report.completed += sent + len(got) + len(extra)
        self.report.verified += len(frames)
        self.report.mismatches += sum(a != b for a, b in zip(got, frames, strict=False))
        self.report.check(not extra, f"round {self.rounds}: a frame came back twice")
