"""virtio-blk guest driver model (virtio v1.4 §5.2).

Requests are ``header (16 B, device-readable) | data | status (1 B,
device-writable)``. Each queue owns a pool of request slots in guest memory
(header+status area and a data buffer) whose host mapping and descriptor
lists are resolved once, so a request only writes its header (and OUT data)
and reads its status (and IN data). :meth:`BlkDriver.submit` makes a batch
available and kicks once; :meth:`BlkDriver.pipeline` keeps a queue depth,
refilling every batch of completions with one kick.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import cast

from ..errors import BlkIOError, DeviceStateError, RingError
from ..memory import DirtyLog, GuestMemory
from ..virtio.constants import BLK_ID_BYTES, BLK_SECTOR_SIZE, BlkFeature, BlkRequestType, BlkStatus, Feature
from ..virtio.packed import PackedLayout
from ..virtio.split import DescFlags, SplitDriverQueue, SplitLayout
from .driver import GuestDevice, GuestQueue

HEADER = struct.Struct("<IIQ")
#: Data lengths whose descriptor lists a slot keeps (a workload uses a few sizes).
_CACHED_LENGTHS = 16

#: Features the model asks for (it understands all of them).
WANTED = int(BlkFeature.SEG_MAX | BlkFeature.SIZE_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH
             | BlkFeature.CONFIG_WCE | BlkFeature.MQ | BlkFeature.RO | BlkFeature.TOPOLOGY
             | Feature.INDIRECT_DESC | Feature.EVENT_IDX)


@dataclass
class BlkConfig:
    """The fields of ``virtio_blk_config`` the model uses (v1.4 §5.2.4)."""

    capacity: int
    size_max: int
    seg_max: int
    blk_size: int
    writeback: int
    num_queues: int


class Slot:
    """One request's guest memory: header + status area and a data buffer.

    The host mapping and offset of both areas are resolved once, so a request writes its
    header and reads its status and data without translating guest addresses again, and the
    descriptor lists handed to the ring are built once per slot (and per data length).
    """

    __slots__ = ("meta", "data", "size", "_meta_map", "_meta_off", "_data_map", "_data_off",
                 "_header", "_status", "_in", "_out")

    def __init__(self, memory: GuestMemory, meta: int, data: int, size: int) -> None:
        self.meta = meta    #: 16-byte header followed by the status byte
        self.data = data    #: data buffer
        self.size = size
        region, self._meta_off = memory.translate(meta, HEADER.size + 1)
        self._meta_map = region.mmap
        region, self._data_off = memory.translate(data, size)
        self._data_map = region.mmap
        self._header = [(meta, HEADER.size)]
        self._status = [(meta + HEADER.size, 1)]
        self._in: dict[int, list[tuple[int, int]]] = {}
        self._out: dict[int, list[tuple[int, int]]] = {}

    def __repr__(self) -> str:
        return f"Slot(meta={self.meta:#x}, data={self.data:#x}, size={self.size})"

    def inp(self, length: int) -> list[tuple[int, int]]:
        """Device-writable descriptors: *length* data bytes, then the status byte."""
        cached = self._in.get(length)
        if cached is None:
            cached = [(self.data, length), (self.meta + HEADER.size, 1)]
            if len(self._in) < _CACHED_LENGTHS:
                self._in[length] = cached
        return cached

    def out(self, length: int) -> list[tuple[int, int]]:
        """Device-readable descriptors: the header, then *length* data bytes."""
        cached = self._out.get(length)
        if cached is None:
            cached = [(self.meta, HEADER.size), (self.data, length)]
            if len(self._out) < _CACHED_LENGTHS:
                self._out[length] = cached
        return cached

    def status(self) -> int:
        return self._meta_map[self._meta_off + HEADER.size]

    def read_data(self, length: int) -> bytes:
        off = self._data_off
        return self._data_map[off:off + length]


@dataclass(frozen=True)
class BlkOp:
    """One request for :meth:`BlkDriver.submit`."""

    kind: BlkRequestType
    sector: int = 0
    data: bytes = b""      #: OUT payload
    length: int = 0        #: IN length


_IN, _OUT, _GET_ID = int(BlkRequestType.IN), int(BlkRequestType.OUT), int(BlkRequestType.GET_ID)
_NEXT, _WRITE_NEXT = int(DescFlags.NEXT), int(DescFlags.NEXT | DescFlags.WRITE)
#: Descriptors of a request: header, data, status.
_CHAIN = 3


class _Tag:
    """A request tag of :meth:`BlkDriver.pipeline`: a slot and its reserved descriptor chain
    ``header (readable) -> data -> status (writable)``; only the data descriptor's length
    and direction are rewritten, and only when they change."""

    __slots__ = ("ring", "slot", "chain", "head", "data_len", "data_flags", "op")

    def __init__(self, ring: SplitDriverQueue, slot: Slot, length: int) -> None:
        self.ring = ring
        self.slot = slot
        self.chain = ring.reserve(slot._header, [(slot.data, length), (slot.meta + HEADER.size, 1)])
        self.head = self.chain[0]
        self.data_len, self.data_flags = length, _WRITE_NEXT
        self.op: BlkOp | None = None

    def set_data(self, length: int, flags: int) -> None:
        self.ring.rewrite(self.chain[1], self.slot.data, length, flags, self.chain[2])
        self.data_len, self.data_flags = length, flags

    def retire(self, pool: list[Slot]) -> None:
        self.ring.release(self.chain)
        pool.append(self.slot)


class _TagRun:
    """One :meth:`BlkDriver.pipeline` run on a split ring.

    Every request in flight is a :class:`_Tag`; :meth:`fill` writes headers (and OUT data)
    into free tags and posts them in batches with one kick each, :meth:`harvest` checks a
    batch of completions (status, IN data to the sink) and frees their tags, :meth:`run`
    alternates the two, sleeping only when the device has used nothing (NAPI-style).
    """

    def __init__(self, q: GuestQueue, ring: SplitDriverQueue, pool: list[Slot], depth: int,
                 ops: Iterable[BlkOp], max_request: int, log: DirtyLog | None,
                 sink: Callable[[BlkOp, bytes], None] | None) -> None:
        self.q, self.ring = q, ring
        self.free_tags = [_Tag(ring, pool.pop(), max_request) for _ in range(depth)]
        self.tags = list(self.free_tags)
        #: Completions not harvested yet: tags, and futures of a concurrent submit() on the queue.
        self.ready: list[tuple[object, int]] = []
        self.waiter: asyncio.Future[None] | None = None
        self.source = iter(ops)
        self.max_request, self.log, self.sink = max_request, log, sink
        self.kick_every = max(depth // 4, 8)

    def wake(self, used: list[tuple[object, int]]) -> None:
        self.ready.extend(used)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def dropped(self, error: RingError) -> None:
        self.wake([])

    def fill(self, count: int) -> int:
        """Make up to *count* more requests available; returns how many."""
        ring, q, free_tags, log = self.ring, self.q, self.free_tags, self.log
        max_request, kick_every = self.max_request, self.kick_every
        pack, status_at = HEADER.pack_into, HEADER.size
        heads: list[int] = []
        posted: list[object] = []
        n = 0
        try:
            for op in islice(self.source, count):
                kind = op.kind
                if kind == _IN:
                    length, flags = op.length, _WRITE_NEXT
                elif kind == _OUT:
                    length, flags = len(op.data), _NEXT
                elif kind == _GET_ID:
                    length, flags = BLK_ID_BYTES, _WRITE_NEXT
                else:
                    length, flags = 0, 0
                if flags and not 0 < length <= max_request:
                    raise DeviceStateError(f"request of {length} bytes (limit {max_request})")
                tag = free_tags.pop()
                tag.op = op
                slot = tag.slot
                meta, off = slot._meta_map, slot._meta_off
                pack(meta, off, kind, 0, op.sector)
                meta[off + status_at] = 0xFF
                if log is not None:
                    log.mark(slot.meta, status_at + 1)
                if not flags:           # FLUSH and other data-less requests: a chain of two
                    if heads:
                        ring.post(heads, posted)
                        heads, posted = [], []
                    ring.add(slot._header, slot._status, tag)
                    n += 1
                    continue
                if kind == _OUT:
                    doff = slot._data_off
                    slot._data_map[doff:doff + length] = op.data
                    if log is not None:
                        log.mark(slot.data, length)
                if length != tag.data_len or flags != tag.data_flags:
                    tag.set_data(length, flags)
                heads.append(tag.head)
                posted.append(tag)
                n += 1
                if len(heads) == kick_every:    # let the device start while we fill on
                    ring.post(heads, posted)
                    heads, posted = [], []
                    q.kick()
        finally:
            if heads:
                ring.post(heads, posted)
            if n:
                q.kick()
        return n

    def harvest(self) -> int:
        """Check every completion in :attr:`ready`; returns how many of them were tags."""
        batch = self.ready[:]
        self.ready.clear()
        free_tags, sink, status_at = self.free_tags, self.sink, HEADER.size
        harvested = 0
        try:
            for token, written in batch:
                if not isinstance(token, _Tag):     # a concurrent submit() on this queue
                    future = cast("asyncio.Future[int]", token)
                    if not future.done():
                        future.set_result(written)
                    continue
                harvested += 1
                free_tags.append(token)
                slot = token.slot
                status = slot._meta_map[slot._meta_off + status_at]
                op = token.op
                assert op is not None
                if status != BlkStatus.OK:
                    raise BlkIOError(status, f"{op.kind.name} sector {op.sector}")
                if sink is not None and op.kind == _IN:
                    sink(op, slot.read_data(op.length))
        except BaseException:
            self.ready[:0] = batch       # _retire_tags resolves the concurrent futures among them
            raise
        return harvested

    async def run(self, loop: asyncio.AbstractEventLoop) -> int:
        """Keep the queue full until the ops run out; returns how many requests completed."""
        q, ring = self.q, self.ring
        completed = 0
        in_flight = self.fill(len(self.tags))
        while in_flight:
            if not self.ready and q.error is None:
                if ring.has_used():
                    q.reap()        # poll before sleeping (NAPI-style): no loop round trip
                if not self.ready:
                    waiter = self.waiter = loop.create_future()
                    await waiter
                    self.waiter = None
            if q.error is not None:
                raise RingError(f"queue {q.index} reset with {in_flight} requests in flight") from q.error
            harvested = self.harvest()
            in_flight -= harvested
            completed += harvested
            in_flight += self.fill(harvested)
        return completed


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
                    num_queues: int | None = None, extra_features: int = 0,
                    ring_states: Mapping[int, int] | None = None,
                    layouts: Mapping[int, SplitLayout | PackedLayout] | None = None) -> int:
        """Initialise the device (*ring_states*, *layouts*: :meth:`GuestDevice.initialize`)."""
        features = await self.dev.initialize(WANTED | extra_features, packed=packed,
                                             queue_size=queue_size, num_queues=num_queues,
                                             ring_states=ring_states, layouts=layouts)
        self.attach()
        return features

    def attach(self) -> None:
        """Take the device as its core initialised it (:meth:`start`, or a driver that finished
        an initialisation begun elsewhere): read the config, give each queue its request slots."""
        self.config = self.read_config()
        alloc, memory = self.dev.alloc, self.dev.memory
        self._slots = {}        # the reset gave back the previous slots' memory
        for queue in self.dev.queues:
            self._slots[queue.index] = [
                Slot(memory, alloc.alloc(32, 16), alloc.alloc(self.max_request, 4096), self.max_request)
                for _ in range(min(queue.size, self.slots_per_queue))]

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
        return self.dev.queue(index)

    def _check(self, queue: GuestQueue, ops: list[BlkOp]) -> None:
        """Refuse a batch before anything of it reaches the ring."""
        if queue.error is not None:
            raise DeviceStateError(f"queue {queue.index} is reset") from queue.error
        pool = self._slots[queue.index]
        if len(ops) > len(pool):
            raise DeviceStateError(f"queue {queue.index}: {len(ops)} requests, {len(pool)} free request slots")
        for op in ops:
            if op.kind == BlkRequestType.OUT:
                length = len(op.data)
            elif op.kind == BlkRequestType.IN:
                length = op.length
            else:
                continue
            if length > self.max_request:
                raise DeviceStateError(f"request of {length} bytes exceeds {self.max_request}")

    def _prepare(self, queue: GuestQueue, op: BlkOp) -> tuple[asyncio.Future, Slot]:
        """Write one request into a free slot and add it to the ring (not yet published)."""
        slot = self._slots[queue.index].pop()
        kind = op.kind
        meta, off = slot._meta_map, slot._meta_off
        HEADER.pack_into(meta, off, kind, 0, op.sector)
        meta[off + HEADER.size] = 0xFF
        log = self.dev.memory.dirty_log
        if log is not None:
            log.mark(slot.meta, HEADER.size + 1)
        if kind == BlkRequestType.IN:
            return queue.add(slot._header, slot.inp(op.length)), slot
        if kind == BlkRequestType.OUT:
            data = op.data
            length = len(data)
            doff = slot._data_off
            slot._data_map[doff:doff + length] = data
            if log is not None:
                log.mark(slot.data, length)
            return queue.add(slot.out(length), slot._status), slot
        if kind == BlkRequestType.GET_ID:
            return queue.add(slot._header, slot.inp(BLK_ID_BYTES)), slot
        return queue.add(slot._header, slot._status), slot

    @staticmethod
    def _result(op: BlkOp, slot: Slot) -> bytes:
        status = slot.status()
        if status != BlkStatus.OK:
            raise BlkIOError(status, f"{op.kind.name} sector {op.sector}")
        if op.kind == BlkRequestType.IN:
            return slot.read_data(op.length)
        if op.kind == BlkRequestType.GET_ID:
            return slot.read_data(BLK_ID_BYTES)
        return b""

    async def submit(self, ops: list[BlkOp], queue: int = 0) -> list[bytes]:
        """Submit a batch with one kick; returns the data read (``b""`` for non-reads)."""
        q = self.queue(queue)
        self._check(q, ops)
        pool = self._slots[q.index]
        pending = [self._prepare(q, op) for op in ops]
        q.kick()
        try:
            for future, _ in pending:
                # Completions arrive in batches: this suspends at most once per interrupt,
                # never once per request (no gather, no per-request callback).
                if not future.done():
                    await future
                future.result()
            return [self._result(op, slot) for op, (_, slot) in zip(ops, pending)]
        finally:
            for future, slot in pending:
                if future.done():
                    pool.append(slot)

    async def pipeline(self, ops: Iterable[BlkOp], depth: int, queue: int = 0,
                       sink: Callable[[BlkOp, bytes], None] | None = None) -> int:
        """Run *ops* keeping *depth* requests in flight on *queue*; returns how many completed.

        The first *depth* requests go out with one kick. After each wake-up every completed
        request is harvested (status checked, IN data handed to *sink* if given) and as many
        new requests are added, again with one kick: one wake-up and one notification per
        batch of completions, as a blk-mq driver does. On a split ring each in-flight slot is
        a tag with a reserved descriptor chain (:meth:`SplitDriverQueue.reserve`), so a
        request writes its 16-byte header and one avail entry and no future is created.
        """
        q = self.queue(queue)
        if q.error is not None:
            raise DeviceStateError(f"queue {q.index} is reset") from q.error
        if isinstance(q.ring, SplitDriverQueue):
            return await self._pipeline_tags(q, q.ring, ops, depth, sink)
        return await self._pipeline_generic(q, ops, depth, sink)

    async def _pipeline_tags(self, q: GuestQueue, ring: SplitDriverQueue, ops: Iterable[BlkOp], depth: int,
                             sink: Callable[[BlkOp, bytes], None] | None) -> int:
        """:meth:`pipeline` on a split ring: one :class:`_Tag` per request in flight (:class:`_TagRun`)."""
        if q.on_used is not None:
            raise DeviceStateError(f"queue {q.index} already runs a pipeline")
        pool = self._slots[q.index]
        depth = min(depth, len(pool), ring.num_free // _CHAIN)
        if depth < 1:
            raise DeviceStateError(f"queue {q.index}: no room for a request")
        run = _TagRun(q, ring, pool, depth, ops, self.max_request, self.dev.memory.dirty_log, sink)
        q.on_used = run.wake
        q.on_drop = run.dropped
        try:
            return await run.run(self.dev.loop)
        finally:
            self._retire_tags(q, run.tags, run.ready, pool)

    @staticmethod
    def _retire_tags(q: GuestQueue, tags: list[_Tag], ready: list[tuple[object, int]],
                     pool: list[Slot]) -> None:
        """Give back the slots and chains; tags the device still holds retire as they complete,
        or all at once if the queue is reset (its ring is gone, only the slots are kept)."""
        error = q.error
        for token, written in ready:
            if isinstance(token, _Tag):
                continue
            future = cast("asyncio.Future[int]", token)
            if not future.done():
                if error is None:
                    future.set_result(written)
                else:
                    future.set_exception(RingError(f"queue {q.index} reset with the request in flight"))
        if error is not None:
            pool.extend(tag.slot for tag in tags)
            return
        held = {id(token) for token in q.ring.tokens.values()}
        pending = {id(tag): tag for tag in tags if id(tag) in held}
        for tag in tags:
            if id(tag) not in pending:
                tag.retire(pool)
        if not pending:
            q.on_used = q.on_drop = None
            return

        def late(used: list[tuple[object, int]]) -> None:
            for token, written in used:
                if isinstance(token, _Tag):
                    token.retire(pool)
                    pending.pop(id(token), None)
                elif not (future := cast("asyncio.Future[int]", token)).done():
                    future.set_result(written)
            if not pending:
                q.on_used = q.on_drop = None

        def dropped(_: RingError) -> None:
            pool.extend(tag.slot for tag in pending.values())
            pending.clear()

        q.on_used = late
        q.on_drop = dropped

    async def _pipeline_generic(self, q: GuestQueue, ops: Iterable[BlkOp], depth: int,
                                sink: Callable[[BlkOp, bytes], None] | None) -> int:
        """:meth:`pipeline` with one future per request (packed rings)."""
        pool = self._slots[q.index]
        depth = min(depth, len(pool), q.num_free // _CHAIN)
        if depth < 1:
            raise DeviceStateError(f"queue {q.index}: no room for a request")
        source = iter(ops)
        inflight: deque[tuple[asyncio.Future, Slot, BlkOp]] = deque()
        prepare = self._prepare
        completed = 0

        def fill(count: int) -> int:
            batch = list(islice(source, count))
            if batch:
                self._check(q, batch)
                for op in batch:
                    future, slot = prepare(q, op)
                    inflight.append((future, slot, op))
                q.kick()
            return len(batch)

        fill(depth)
        try:
            while inflight:
                head = inflight[0][0]
                if not head.done():
                    await head
                finished = [entry for entry in inflight if entry[0].done()]
                inflight = deque(entry for entry in inflight if not entry[0].done())
                for _, slot, _ in finished:
                    pool.append(slot)
                for future, slot, op in finished:
                    future.result()
                    status = slot.status()
                    if status != BlkStatus.OK:
                        raise BlkIOError(status, f"{op.kind.name} sector {op.sector}")
                    if sink is not None and op.kind == BlkRequestType.IN:
                        sink(op, slot.read_data(op.length))
                completed += len(finished)
                fill(len(finished))
        finally:
            for future, slot, _ in inflight:
                if future.done():
                    pool.append(slot)
        return completed

    async def read(self, sector: int, length: int, queue: int = 0) -> bytes:
        return (await self.submit([BlkOp(BlkRequestType.IN, sector, length=length)], queue))[0]

    async def write(self, sector: int, data: bytes, queue: int = 0) -> None:
        await self.submit([BlkOp(BlkRequestType.OUT, sector, data=data)], queue)

    async def flush(self, queue: int = 0) -> None:
        await self.submit([BlkOp(BlkRequestType.FLUSH)], queue)

    async def get_id(self, queue: int = 0) -> str:
        raw = (await self.submit([BlkOp(BlkRequestType.GET_ID)], queue))[0]
        return raw.split(b"\0", 1)[0].decode(errors="replace")
