"""Guest workloads with a reference model, shared by ``shadowvmm run``, tests and benchmarks.

:func:`blk_write_verify` keeps what every block should contain, writes random
blocks at a given queue depth across the queues, then reads every written
block back and compares. Each request's data embeds its block number and a
sequence number, so a lost, duplicated or misplaced write is caught.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .guest.blk import BlkDriver, BlkOp
from .virtio.constants import BlkRequestType

STAMP = struct.Struct("<QQ")


@dataclass
class BlkResult:
    writes: int = 0
    reads: int = 0
    mismatches: list[int] = field(default_factory=list)
    expected: dict[int, bytes] = field(default_factory=dict)


def block_pattern(block: int, seq: int, size: int) -> bytes:
    head = STAMP.pack(block, seq)
    rng = random.Random(block * 1_000_003 + seq)
    return head + rng.randbytes(size - len(head))


async def blk_write_verify(driver: BlkDriver, *, requests: int, queue_depth: int, block_bytes: int,
                           seed: int = 1, blocks: int | None = None,
                           on_progress: Callable[[int], Awaitable[None] | None] | None = None,
                           result: BlkResult | None = None) -> BlkResult:
    """*requests* random block writes at *queue_depth* per queue, then a full read-back."""
    res = result or BlkResult()
    sectors_per_block = block_bytes // 512
    total_blocks = driver.capacity_bytes // block_bytes
    if blocks is not None:
        total_blocks = min(total_blocks, blocks)
    rng = random.Random(seed)
    nqueues = len(driver.dev.queues)
    seq = 0
    done = 0
    while done < requests:
        batch_tasks: list[Awaitable[list[bytes]]] = []
        in_batch: set[int] = set()      # writes in flight together never share a block: a device
        for q in range(nqueues):        # may complete them in any order (v1.4 §5.2.6.4)
            ops: list[BlkOp] = []
            for _ in range(min(queue_depth, requests - done)):     # done counts the queues before
                block = rng.randrange(total_blocks)
                while block in in_batch and len(in_batch) < total_blocks:
                    block = rng.randrange(total_blocks)
                in_batch.add(block)
                seq += 1
                data = block_pattern(block, seq, block_bytes)
                res.expected[block] = data
                ops.append(BlkOp(BlkRequestType.OUT, block * sectors_per_block, data=data))
            if ops:
                batch_tasks.append(driver.submit(ops, q))
                done += len(ops)
            if done >= requests:
                break
        await asyncio.gather(*batch_tasks)
        res.writes = done
        if on_progress is not None:
            maybe = on_progress(done)
            if maybe is not None:
                await maybe
    await blk_read_verify(driver, res, queue_depth=queue_depth, block_bytes=block_bytes)
    return res


async def blk_read_verify(driver: BlkDriver, res: BlkResult, *, queue_depth: int,
                          block_bytes: int) -> None:
    """Read back every block in ``res.expected`` and record mismatches."""
    sectors_per_block = block_bytes // 512
    items = sorted(res.expected.items())
    nqueues = len(driver.dev.queues)
    for start in range(0, len(items), queue_depth * nqueues):
        chunk = items[start:start + queue_depth * nqueues]
        tasks = []
        groups = []
        for q in range(nqueues):
            group = chunk[q * queue_depth:(q + 1) * queue_depth]
            if group:
                groups.append(group)
                tasks.append(driver.submit([BlkOp(BlkRequestType.IN, b * sectors_per_block,
                                                  length=block_bytes) for b, _ in group], q))
        for group, datas in zip(groups, await asyncio.gather(*tasks)):
            for (block, want), got in zip(group, datas):
                res.reads += 1
                if got != want:
                    res.mismatches.append(block)


class StatusWatcher:
    """Reads device_status in a loop, as a guest polling its device would."""

    def __init__(self, read: Callable[[], int], interval: float = 0.001) -> None:
        self.read = read
        self.interval = interval
        self.values: set[int] = set()
        self.reads = 0
        self._task: asyncio.Task | None = None

    def start(self) -> StatusWatcher:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            self.values.add(self.read())
            self.reads += 1
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
