"""Concurrent virtio-blk writers whose every completed write can be checked on disk.

Each writer owns a disjoint range of blocks and keeps one request in flight,
so what a block may hold is always known: the last write the guest saw
complete, plus writes whose fate is unknown (submitted, then dropped by a
reset or a failed device: they may or may not have reached the disk). Reads
check the data against that set and narrow it. Written data embeds the block
number and a sequence number, so a lost, replayed or misplaced write shows.

A request waits at most ``bound`` seconds unless the device shows
DEVICE_NEEDS_RESET (``needs_reset``); a longer wait is a violation, recorded
in :attr:`Writers.violations` like a bad read.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import NeedsResetShown, ShadowVmmError
from ..guest.blk import BlkDriver, BlkOp
from ..virtio.constants import BlkRequestType

BLOCK = 4096
SECTORS = BLOCK // 512

T = TypeVar("T")


def pattern(block: int, seq: int) -> bytes:
    """A block's worth of ``(block, seq)`` pairs."""
    head = struct.pack("<QQ", block, seq)
    return head * (BLOCK // len(head))


@dataclass
class Block:
    """What a block may hold."""

    possible: set[bytes] = field(default_factory=lambda: {bytes(BLOCK)})


NeedsReset = NeedsResetShown

class Writers:
    """*writers* concurrent writers spread over *queues* queues of *driver* (module docstring)."""

    def __init__(self, driver: BlkDriver, *, queues: int, writers: int, blocks: int, seed: int = 1,
                 read_share: float = 0.3, think: float = 0.0, bound: float = 5.0,
                 needs_reset: Callable[[], bool] | None = None) -> None:
        self.driver = driver
        self.queues = queues
        self.writers = writers
        self.blocks = [Block() for _ in range(blocks)]
        self.span = blocks // writers
        self.seed = seed
        self.read_share = read_share
        self.think = think
        self.bound = bound
        self.needs_reset = needs_reset or (lambda: False)
        self.completed = 0
        self.writes = 0
        self.failed = 0
        self.violations: list[str] = []
        #: Bumped by :meth:`resume`: a writer whose request failed waits for the next one.
        self.generation = 0
        self._seq = 0
        self._gate = asyncio.Event()
        self._busy = [False] * writers
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> Writers:
        self._gate.set()
        self._tasks = [asyncio.get_running_loop().create_task(self._run(i)) for i in range(self.writers)]
        return self

    def resume(self) -> None:
        self.generation += 1
        self._gate.set()

    def freeze(self) -> None:
        """Submit nothing new; what is in flight stays in flight."""
        self._gate.clear()

    async def pause(self, timeout: float | None = None) -> None:
        """Submit nothing new and wait until nothing is in flight."""
        self._gate.clear()
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(self._busy):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("requests still in flight")
            await asyncio.sleep(0.001)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def bounded(self, awaitable: Awaitable[T], what: str, *, needs_reset_ends: bool = True) -> T:
        """Await *awaitable* at most :attr:`bound` s; :class:`NeedsReset` when the device shows
        DEVICE_NEEDS_RESET first (unless *needs_reset_ends* is False: a reset, which clears it)."""
        task = asyncio.ensure_future(awaitable)
        deadline = time.monotonic() + self.bound
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.005)
                if done:
                    return task.result()
                if needs_reset_ends and self.needs_reset():
                    raise NeedsReset(what)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what} waited more than {self.bound:g} s without DEVICE_NEEDS_RESET")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _run(self, index: int) -> None:
        rnd = random.Random(self.seed * 1000 + index)
        first = index * self.span
        queue = index % self.queues
        while True:
            await self._gate.wait()
            generation = self.generation
            block = first + rnd.randrange(self.span)
            state = self.blocks[block]
            write = rnd.random() >= self.read_share or state.possible == {bytes(BLOCK)}
            if write:
                self._seq += 1
                data = pattern(block, self._seq)
                op = BlkOp(BlkRequestType.OUT, block * SECTORS, data=data)
                state.possible.add(data)
            else:
                op = BlkOp(BlkRequestType.IN, block * SECTORS, length=BLOCK)
            self._busy[index] = True
            try:
                result = await self.bounded(self.driver.submit([op], queue),
                                            f"{'write' if write else 'read'} of block {block} on queue {queue}")
            except TimeoutError as exc:
                self.violations.append(str(exc))
                self._busy[index] = False
                return
            except (NeedsReset, ShadowVmmError, IndexError, KeyError):
                self._busy[index] = False
                self.failed += 1          # fate unknown: the data stays possible
                while self.generation == generation:
                    await asyncio.sleep(0.002)
                continue
            self._busy[index] = False
            self.completed += 1
            if write:
                self.writes += 1
                state.possible = {data}
            elif result[0] not in state.possible:
                self.violations.append(f"block {block} read back {result[0][:16].hex()}, expected one of "
                                       f"{sorted(p[:16].hex() for p in state.possible)}")
            else:
                state.possible = {result[0]}
            if self.think:
                await asyncio.sleep(rnd.random() * self.think)

    def check_image(self, image: bytes) -> list[int]:
        """Blocks of *image* (read on the host) holding something no write could have left."""
        return [b for b, state in enumerate(self.blocks) if image[b * BLOCK:(b + 1) * BLOCK] not in state.possible]

    async def check_through(self, driver: BlkDriver, batch: int = 4) -> list[int]:
        """Read every block back through *driver*; the blocks that are wrong (then narrowed)."""
        bad = []
        for start in range(0, len(self.blocks), batch):
            ops = [BlkOp(BlkRequestType.IN, b * SECTORS, length=BLOCK)
                   for b in range(start, min(start + batch, len(self.blocks)))]
            datas = await self.bounded(driver.submit(ops, (start // batch) % self.queues), "read-back")
            for offset, data in enumerate(datas):
                state = self.blocks[start + offset]
                if data not in state.possible:
                    bad.append(start + offset)
                state.possible = {data}
        return bad
