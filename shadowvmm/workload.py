"""Guest workloads with a reference model, shared by ``shadowvmm run``, tests and benchmarks.

:func:`blk_write_verify` keeps what every block should contain, writes random
blocks at a given queue depth across the queues, then reads every written
block back and compares. Each request's data embeds its block number and a
sequence number, so a lost, duplicated or misplaced write is caught.
:func:`fs_roundtrip` does FUSE file operations in a fresh directory of the share
(create, write, read back, readdir, unlink, rmdir); :func:`net_echo` sends numbered
frames to a looping back-end (testpmd in io mode) and checks each comes back once, unchanged.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .guest.blk import BlkDriver, BlkOp
from .guest.fs import FsDriver
from .guest.net import NetDriver
from .virtio.constants import BlkRequestType

STAMP = struct.Struct("<QQ")
#: A progress callback: units of work done so far.
OnProgress = Callable[[int], Awaitable[None] | None]
#: The net workload's frame: broadcast destination, the guest's MAC, IEEE local experimental type.
ETHERTYPE = b"\x88\xb5"
FRAME_SEQ = struct.Struct(">I")
FRAME_PAYLOAD = 46


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
                           on_progress: OnProgress | None = None,
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
        await _progress(on_progress, done)
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


async def _progress(on_progress: OnProgress | None, done: int) -> None:
    if on_progress is not None:
        maybe = on_progress(done)
        if maybe is not None:
            await maybe


@dataclass
class FsResult:
    """What :func:`fs_roundtrip` did: files and bytes, and every check that failed."""

    directory: str = ""
    files: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    mismatches: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches and not self.problems


async def fs_roundtrip(fs: FsDriver, *, files: int, file_bytes: int, seed: int = 1,
                       on_progress: OnProgress | None = None) -> FsResult:
    """In a new directory of the share: CREATE + WRITE *files* files of *file_bytes*, READ each
    back and compare, READDIR (exactly those names), UNLINK each, RMDIR, READDIR the root."""
    res = FsResult(directory=f"shadowvmm-run-{seed & 0xFFFFFFFF:08x}-{random.Random().getrandbits(32):08x}")
    await fs.mkdir_path(res.directory)
    names = [f"file-{i:05d}.bin" for i in range(files)]
    for i, name in enumerate(names):
        data = block_pattern(i, seed, max(file_bytes, STAMP.size))[:file_bytes]
        await fs.write_file(f"{res.directory}/{name}", data)
        res.bytes_written += len(data)
        back = await fs.read_file(f"{res.directory}/{name}")
        res.bytes_read += len(back)
        if back != data:
            res.mismatches.append(name)
        res.files += 1
        await _progress(on_progress, i + 1)
    listed = sorted(await fs.listdir(res.directory))
    if listed != names:
        res.problems.append(f"readdir listed {len(listed)} names, {files} files were created")
    for name in names:
        await fs.remove(f"{res.directory}/{name}")
    if await fs.listdir(res.directory):
        res.problems.append("files left after unlinking every one")
    await fs.rmdir_path(res.directory)
    if res.directory in await fs.listdir("/"):
        res.problems.append(f"{res.directory} still listed after rmdir")
    return res


@dataclass
class NetResult:
    """What :func:`net_echo` saw: frames sent and back, and what was wrong with them."""

    sent: int = 0
    received: int = 0
    mismatches: int = 0
    duplicates: int = 0
    missing: int = 0
    unexpected: int = 0

    @property
    def ok(self) -> bool:
        return self.sent == self.received and not (self.mismatches or self.duplicates or self.missing
                                                   or self.unexpected)


def echo_frame(mac: bytes, seq: int, seed: int) -> bytes:
    """Frame *seq* of :func:`net_echo`: its number, then a payload derived from it."""
    rng = random.Random(seed * 1_000_003 + seq)
    return b"\xff" * 6 + mac + ETHERTYPE + FRAME_SEQ.pack(seq) + rng.randbytes(FRAME_PAYLOAD)


async def net_echo(net: NetDriver, *, frames: int, batch: int = 64, seed: int = 1, timeout: float = 5.0,
                   on_progress: OnProgress | None = None) -> NetResult:
    """Send *frames* numbered frames in batches; a looping back-end returns each: every one must
    come back exactly once with its payload unchanged (counted by sequence number)."""
    res = NetResult()
    seen: set[int] = set()
    header = 14
    for first in range(0, frames, batch):
        out = [echo_frame(net.mac, seq, seed) for seq in range(first, min(first + batch, frames))]
        res.sent += await net.send(out)
        got = await net.receive(len(out), timeout=timeout)
        for frame in got:
            if len(frame) < header + FRAME_SEQ.size or frame[12:14] != ETHERTYPE:
                res.unexpected += 1
                continue
            res.received += 1
            (seq,) = FRAME_SEQ.unpack_from(frame, header)
            if seq in seen:
                res.duplicates += 1
            elif seq >= frames or frame != echo_frame(net.mac, seq, seed):
                res.mismatches += 1
            seen.add(seq)
        await _progress(on_progress, res.sent)
    res.unexpected += len(await net.receive(1, timeout=0.02))
    res.missing = frames - len(seen & set(range(frames)))
    return res


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
