"""The in-process virtio-blk model serves a request whatever its buffer layout (v1.4 §2.7.4:
the device makes no assumption about how the driver splits the header and data): the header
alone in its own buffer (its fast path), split across buffers, sharing a buffer with the data,
or empty buffers among the data, each written and read back the same."""

from __future__ import annotations

import itertools

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


@pytest.mark.parametrize("rtype", [BlkRequestType.IN, BlkRequestType.OUT, BlkRequestType.FLUSH, 99])
@pytest.mark.parametrize("shape", ["read", "write", "both", "aliased read"])
def test_the_usual_shapes_take_the_same_course_as_the_general_path(rtype: int, shape: str) -> None:
    """Header | data | status chains, served by the short path for reads and writes on an image
    in memory: the same bytes in guest memory and on the disk, the same status and length used
    as the general path gives, for good requests and for each kind of bad one (past the end, a
    read-only disk, a segment over size_max, an empty data buffer, a status buffer of 2 bytes,
    an unknown type), every combination of them."""
    disk = 64 << 10
    for sector, length, status_len, read_only, size_max in itertools.product(
            [0, 1, 120, 127, 128, 1 << 40], [0, 1, 512, 4096, 8192], [1, 2], [False, True], [0, 4096]):
        outcomes = []
        for fast in (True, False):
            memory = GuestMemory.create([(0, 1 << 16)])
            model = BlkModel({"size": disk, "read_only": read_only})
            model.size_max = size_max
            if not fast:
                model._data_fast = lambda *args: -1  # type: ignore[method-assign]
            try:
                model.image[:] = bytes(range(256)) * (disk // 256)  # type: ignore[index]
                memory.write(HDR, BLK_REQ_HEADER.pack(rtype, 0, sector))
                memory.write(DATA, bytes((7 * k + 3) & 0xFF for k in range(256)) * 32)
                data = (HDR, 16 + length) if shape == "aliased read" else (DATA, length)
                readable = [(HDR, 16)] + ([data] if shape in ("write", "both") else [])
                writable = ([data] if shape != "write" else []) + [(STATUS, status_len)]
                used = model.handle(memory, DescChain(0, readable, writable))
                outcomes.append((used, memory.read(0, 1 << 16), bytes(model.image)))  # type: ignore[arg-type]
            finally:
                model.close()
                memory.close()
        assert outcomes[0] == outcomes[1], (sector, length, status_len, read_only, size_max)
