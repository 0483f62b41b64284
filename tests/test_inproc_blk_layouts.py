"""The in-process virtio-blk model serves a request whatever its buffer layout (v1.4 §2.7.4:
the device makes no assumption about how the driver splits the header and data): the header
alone in its own buffer (its fast path), split across buffers, sharing a buffer with the data,
or empty buffers among the data, each written and read back the same."""

from __future__ import annotations

import pytest

from shadowvmm.backends.inproc_models import BLK_REQ_HEADER, BlkModel
from shadowvmm.memory import GuestMemory
from shadowvmm.virtio.chain import DescChain
from shadowvmm.virtio.constants import BlkRequestType, BlkStatus

HDR, DATA, STATUS, READ = 0x1000, 0x4000, 0x9000, 0xA000


def buffers(start: int, cuts: list[int], total: int) -> list[tuple[int, int]]:
    """*total* bytes from *start*, cut at *cuts* (a 0-length piece where two cuts coincide)."""
    edges = [0, *cuts, total]
    return [(start + a, b - a) for a, b in zip(edges, edges[1:])]


@pytest.mark.parametrize("layout", ["header alone", "header split", "header with data", "empty pieces"])
def test_a_write_lands_the_same_whatever_its_layout(layout: str) -> None:
    memory = GuestMemory.create([(0, 1 << 20)])
    model = BlkModel({"size": 1 << 20})
    payload = bytes(range(256)) * 16
    try:
        memory.write(HDR, BLK_REQ_HEADER.pack(BlkRequestType.OUT, 0, 3) + payload)   # header, data end to end
        whole = buffers(HDR, [], 16 + len(payload))
        readable = {"header alone": buffers(HDR, [16], 16 + len(payload)),
                    "header split": buffers(HDR, [8, 20], 16 + len(payload)),
                    "header with data": whole,
                    "empty pieces": buffers(HDR, [16, 16, 1000, 1000], 16 + len(payload))}[layout]
        assert model.handle(memory, DescChain(0, readable, [(STATUS, 1)])) == 1
        assert memory.read(STATUS, 1)[0] == BlkStatus.OK
        memory.write(READ, BLK_REQ_HEADER.pack(BlkRequestType.IN, 0, 3))
        got = model.handle(memory, DescChain(1, [(READ, 16)], [(READ + 16, len(payload)), (STATUS, 1)]))
        assert got == len(payload) + 1 and memory.read(READ + 16, len(payload)) == payload
    finally:
        model.close()
        memory.close()


def test_a_header_shorter_than_16_bytes_is_an_io_error() -> None:
    memory = GuestMemory.create([(0, 1 << 20)])
    model = BlkModel({"size": 1 << 20})
    try:
        memory.write(HDR, BLK_REQ_HEADER.pack(BlkRequestType.OUT, 0, 0))
        assert model.handle(memory, DescChain(0, [(HDR, 8), (HDR + 8, 7)], [(STATUS, 1)])) == 1
        assert memory.read(STATUS, 1)[0] == BlkStatus.IOERR
    finally:
        model.close()
        memory.close()
