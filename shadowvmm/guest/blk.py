"""virtio-blk guest driver model (virtio v1.4 §5.2).

Requests are ``header (16 B, device-readable) | data | status (1 B,
device-writable)``. Each queue owns a pool of request slots in guest memory
(header+status area and a data buffer), so steady-state I/O allocates
nothing. :meth:`BlkDriver.submit` makes a batch available and kicks once.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from ..errors import DeviceStateError, ShadowVmmError
from ..virtio.constants import (BLK_ID_BYTES, BLK_SECTOR_SIZE, BlkFeature, BlkRequestType,
                                BlkStatus, Feature)
from .driver import GuestDevice, GuestQueue

HEADER = struct.Struct("<IIQ")

#: Features the model asks for (it understands all of them).
WANTED = int(BlkFeature.SEG_MAX | BlkFeature.SIZE_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH
             | BlkFeature.CONFIG_WCE | BlkFeature.MQ | BlkFeature.RO | BlkFeature.TOPOLOGY
             | Feature.INDIRECT_DESC | Feature.EVENT_IDX)


class BlkIOError(ShadowVmmError):
    """The device completed a request with a non-OK status."""

    def __init__(self, status: int, what: str) -> None:
        super().__init__(f"{what}: virtio-blk status {status}")
        self.status = status


@dataclass
class BlkConfig:
    """The fields of ``virtio_blk_config`` the model uses (v1.4 §5.2.4)."""

    capacity: int
    size_max: int
    seg_max: int
    blk_size: int
    writeback: int
    num_queues: int


@dataclass
class Slot:
    meta: int     #: 16-byte header followed by the status byte
    data: int     #: data buffer
    size: int


@dataclass(frozen=True)
class BlkOp:
    """One request for :meth:`BlkDriver.submit`."""

    kind: BlkRequestType
    sector: int = 0
    data: bytes = b""      #: OUT payload
    length: int = 0        #: IN length


class BlkDriver:
    """virtio-blk on a :class:`GuestDevice`."""

    def __init__(self, device: GuestDevice, *, max_request: int = 64 << 10,
                 slots_per_queue: int = 64) -> None:
        self.dev = device
        self.max_request = max_request
        self.slots_per_queue = slots_per_queue
        self.config: BlkConfig | None = None
        self._slots: dict[int, list[Slot]] = {}

    async def start(self, *, packed: bool = False, queue_size: int = 256,
                    num_queues: int | None = None, extra_features: int = 0) -> int:
        features = await self.dev.initialize(WANTED | extra_features, packed=packed,
                                             queue_size=queue_size, num_queues=num_queues)
        self.config = self.read_config()
        for queue in self.dev.queues:
            self._slots[queue.index] = [
                Slot(self.dev.alloc.alloc(32, 16), self.dev.alloc.alloc(self.max_request, 4096),
                     self.max_request) for _ in range(min(queue.size, self.slots_per_queue))]
        return features

    def read_config(self) -> BlkConfig:
        f = self.dev.features
        cfg = self.dev
        return BlkConfig(
            capacity=cfg.config_int(0, 8),
            size_max=cfg.config_int(8, 4) if f & BlkFeature.SIZE_MAX else 0,
            seg_max=cfg.config_int(12, 4) if f & BlkFeature.SEG_MAX else 0,
            blk_size=cfg.config_int(20, 4) if f & BlkFeature.BLK_SIZE else BLK_SECTOR_SIZE,
            writeback=cfg.config_int(32, 1) if f & BlkFeature.CONFIG_WCE else 1,
            num_queues=cfg.config_int(34, 2) if f & BlkFeature.MQ else 1)

    @property
    def capacity_bytes(self) -> int:
        assert self.config is not None
        return self.config.capacity * BLK_SECTOR_SIZE

    def queue(self, index: int = 0) -> GuestQueue:
        return self.dev.queues[index]

    def _prepare(self, queue: GuestQueue, op: BlkOp) -> tuple[asyncio.Future, Slot]:
        pool = self._slots[queue.index]
        if not pool:
            raise DeviceStateError(f"queue {queue.index}: no free request slot")
        slot = pool.pop()
        memory = self.dev.memory
        memory.write(slot.meta, HEADER.pack(int(op.kind), 0, op.sector))
        memory.write(slot.meta + 16, b"\xff")
        out = [(slot.meta, 16)]
        inp: list[tuple[int, int]] = []
        if op.kind == BlkRequestType.OUT:
            if len(op.data) > slot.size:
                raise DeviceStateError(f"request of {len(op.data)} bytes exceeds {slot.size}")
            memory.write(slot.data, op.data)
            out.append((slot.data, len(op.data)))
        elif op.kind in (BlkRequestType.IN, BlkRequestType.GET_ID):
            length = op.length if op.kind == BlkRequestType.IN else BLK_ID_BYTES
            if length > slot.size:
                raise DeviceStateError(f"request of {length} bytes exceeds {slot.size}")
            inp.append((slot.data, length))
        inp.append((slot.meta + 16, 1))
        return queue.add(out, inp), slot

    async def submit(self, ops: list[BlkOp], queue: int = 0) -> list[bytes]:
        """Submit a batch with one kick; returns the data read (``b""`` for non-reads)."""
        q = self.queue(queue)
        pending = [self._prepare(q, op) for op in ops]
        q.kick()
        results = []
        memory = self.dev.memory
        pool = self._slots[q.index]
        try:
            await asyncio.gather(*(future for future, _ in pending))
            for op, (_, slot) in zip(ops, pending):
                status = memory.read(slot.meta + 16, 1)[0]
                if status != BlkStatus.OK:
                    raise BlkIOError(status, f"{op.kind.name} sector {op.sector}")
                if op.kind == BlkRequestType.IN:
                    results.append(memory.read(slot.data, op.length))
                elif op.kind == BlkRequestType.GET_ID:
                    results.append(memory.read(slot.data, BLK_ID_BYTES))
                else:
                    results.append(b"")
        finally:
            for future, slot in pending:
                if future.done():
                    pool.append(slot)
        return results

    async def read(self, sector: int, length: int, queue: int = 0) -> bytes:
        return (await self.submit([BlkOp(BlkRequestType.IN, sector, length=length)], queue))[0]

    async def write(self, sector: int, data: bytes, queue: int = 0) -> None:
        await self.submit([BlkOp(BlkRequestType.OUT, sector, data=data)], queue)

    async def flush(self, queue: int = 0) -> None:
        await self.submit([BlkOp(BlkRequestType.FLUSH)], queue)

    async def get_id(self, queue: int = 0) -> str:
        raw = (await self.submit([BlkOp(BlkRequestType.GET_ID)], queue))[0]
        return raw.split(b"\0", 1)[0].decode(errors="replace")
