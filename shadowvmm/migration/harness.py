"""Pieces shared by the migrate CLI, the migration tests and the benchmark.

* :func:`machine_sharing` builds a destination :class:`~shadowvmm.machine.Machine`
  on the source's guest memory (the local model).
* :func:`move_guest` moves a guest driver model to the destination device:
  its register accesses, its interrupt eventfds, and the notifications and
  interrupts still pending on the source (platform state that moves with
  the vCPUs).
* :class:`BlkLoad` is a continuous random write+read load with a reference
  model, one disjoint block range per queue, that can be paused like vCPUs.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass, field

from ..device import VirtioDevice
from ..guest.blk import BlkDriver, BlkOp
from ..guest.driver import GuestDevice
from ..machine import Machine
from ..memory import GuestMemory
from ..virtio.constants import BlkRequestType
from ..workload import block_pattern


def machine_sharing(memory: GuestMemory) -> Machine:
    """A machine whose guest memory is *memory* itself (the same memfds and mappings)."""
    return Machine(memory=memory)


def _forward(src_fd: int, dst_fd: int) -> None:
    try:
        count = os.eventfd_read(src_fd)
    except BlockingIOError:
        return
    if count:
        os.eventfd_write(dst_fd, count)


def move_guest(guest: GuestDevice, source: VirtioDevice, dest: VirtioDevice, dest_transport: object) -> None:
    """Point *guest* at *dest*; replay what is pending on the stopped *source*."""
    src_ints, dst_ints = source.interrupts, dest.interrupts
    assert src_ints is not None and dst_ints is not None
    # the guest's transport view keeps its discovered layout and status log; only the device moves
    guest.transport.t = dest_transport  # type: ignore[attr-defined]
    for src_fd, dst_fd in zip(src_ints.vector_fds + [src_ints.intx_fd], dst_ints.vector_fds + [dst_ints.intx_fd]):
        _forward(src_fd, dst_fd)
    guest.rebind(guest.transport, dst_ints, settle=dest.settle)
    for index in source.take_pending_kicks():
        dest.notify(index)


@dataclass
class LoadStats:
    writes: int = 0
    reads: int = 0
    read_mismatches: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class BlkLoad:
    """Random writes and reads of already-written blocks on every queue, until stopped.

    Queue *q* owns blocks ``[q*blocks_per_queue, (q+1)*blocks_per_queue)``;
    a batch touches distinct blocks and each queue has one batch in flight,
    so the expected content of every block is known exactly. Each write's
    data embeds its block and a sequence number: a lost, replayed or
    misplaced write is caught by :meth:`verify`.
    """

    def __init__(self, driver: BlkDriver, *, blocks_per_queue: int = 256, block_bytes: int = 4096,
                 depth: int = 8, seed: int = 1, read_share: float = 0.4) -> None:
        self.driver = driver
        self.blocks_per_queue = blocks_per_queue
        self.block_bytes = block_bytes
        self.depth = depth
        self.read_share = read_share
        self.rng = random.Random(seed)
        self.expected: dict[int, bytes] = {}
        self.stats = LoadStats()
        self._seq = 0
        self._gate = asyncio.Event()
        self._gate.set()
        self._idle: list[asyncio.Event] = []
        self._stop = False
        self._tasks: list[asyncio.Task] = []

    def start(self) -> BlkLoad:
        queues = len(self.driver.dev.queues)
        self._idle = [asyncio.Event() for _ in range(queues)]
        self._tasks = [asyncio.get_running_loop().create_task(self._queue_loop(q)) for q in range(queues)]
        return self

    @property
    def completed(self) -> int:
        return self.stats.writes + self.stats.reads

    async def pause(self) -> None:
        """Stop submitting and wait until no request is in flight (vCPUs paused)."""
        self._gate.clear()
        await asyncio.gather(*(event.wait() for event in self._idle))

    def freeze(self) -> None:
        """Stop submitting new batches at once (vCPUs paused); what is in flight stays in flight."""
        self._gate.clear()

    def resume(self) -> None:
        self._gate.set()

    async def stop(self) -> None:
        self._stop = True
        self._gate.set()
        await asyncio.gather(*self._tasks)

    async def abandon(self, timeout: float = 1.0) -> None:
        """Stop without waiting for requests a stopped device will never complete."""
        self._stop = True
        self._gate.set()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _queue_loop(self, queue: int) -> None:
        sectors = self.block_bytes // 512
        first = queue * self.blocks_per_queue
        idle = self._idle[queue]
        while not self._stop:
            if not self._gate.is_set():
                idle.set()
                await self._gate.wait()
                continue
            idle.clear()
            blocks = self.rng.sample(range(first, first + self.blocks_per_queue), self.depth)
            ops: list[BlkOp] = []
            plan: list[tuple[int, bytes | None]] = []
            for block in blocks:
                if block in self.expected and self.rng.random() < self.read_share:
                    ops.append(BlkOp(BlkRequestType.IN, block * sectors, length=self.block_bytes))
                    plan.append((block, None))
                else:
                    self._seq += 1
                    data = block_pattern(block, self._seq, self.block_bytes)
                    ops.append(BlkOp(BlkRequestType.OUT, block * sectors, data=data))
                    plan.append((block, data))
            try:
                results = await self.driver.submit(ops, queue)
            except Exception as exc:  # recorded for the test to report, the loop ends
                self.stats.errors.append(f"queue {queue}: {type(exc).__name__}: {exc}")
                break
            for (block, wrote), got in zip(plan, results):
                if wrote is None:
                    self.stats.reads += 1
                    if got != self.expected[block]:
                        self.stats.read_mismatches.append(block)
                else:
                    self.stats.writes += 1
                    self.expected[block] = wrote
        idle.set()

    async def verify(self) -> list[int]:
        """Read back every written block; the blocks whose content is not the last completed write."""
        sectors = self.block_bytes // 512
        bad: list[int] = []
        queues = len(self.driver.dev.queues)
        items = sorted(self.expected.items())
        for start in range(0, len(items), self.depth):
            chunk = items[start:start + self.depth]
            queue = (start // self.depth) % queues
            got = await self.driver.submit([BlkOp(BlkRequestType.IN, b * sectors, length=self.block_bytes)
                                            for b, _ in chunk], queue)
            bad.extend(b for (b, want), data in zip(chunk, got) if data != want)
        return bad
