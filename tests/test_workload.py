"""The blk write-and-verify workload never has two writes to one block in flight together.

A device may complete requests in flight together in any order (v1.4 §5.2.6.4: requests
are independent); two writes of one block in one batch make the expected content a guess.
qemu-storage-daemon completed such a pair out of order across an admin-queue stop and the
read-back reported a mismatch that was the workload's, not the device's.
"""

from __future__ import annotations

from types import SimpleNamespace

from shadowvmm.guest.blk import BlkOp
from shadowvmm.virtio.constants import BlkRequestType
from shadowvmm.workload import blk_write_verify


class RecordingDriver:
    """Completes every request at once, remembering each batch of writes per submit round."""

    def __init__(self, queues: int, blocks: int) -> None:
        self.dev = SimpleNamespace(queues=[object()] * queues)
        self.capacity_bytes = blocks * 4096
        self.disk: dict[int, bytes] = {}
        self.rounds: list[list[int]] = [[]]

    async def submit(self, ops: list[BlkOp], queue: int) -> list[bytes]:
        out = []
        for op in ops:
            block = op.sector // 8
            if op.kind is BlkRequestType.OUT:
                self.rounds[-1].append(block)
                self.disk[block] = op.data
                out.append(b"")
            else:
                out.append(self.disk.get(block, bytes(4096)))
        return out

    def next_round(self, _done: int) -> None:
        self.rounds.append([])


async def test_no_two_writes_of_one_block_in_a_batch() -> None:
    driver = RecordingDriver(queues=2, blocks=64)
    res = await blk_write_verify(driver, requests=4000, queue_depth=16, block_bytes=4096, seed=7,  # type: ignore[arg-type]
                                 on_progress=driver.next_round)
    batches = [r for r in driver.rounds if r]
    assert len(batches) == 4000 // 32
    assert all(len(set(batch)) == len(batch) == 32 for batch in batches)
    assert res.mismatches == [] and res.reads == len(res.expected)
