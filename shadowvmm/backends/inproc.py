"""In-process reference backend: virtio-blk and virtio-rng device models.

It implements the whole :class:`~shadowvmm.backends.base.Backend` contract
with vhost semantics (rings start on SET_VRING_ENABLE, GET_VRING_BASE stops a
ring after completing its in-flight requests) and is the embedded default
backend. Kicks arrive on eventfds watched with ``loop.add_reader``;
completions are signalled on the call eventfds.

``latency_us`` delays completions (requests stay in flight meanwhile), which
is what makes "stop in the middle of I/O" observable in tests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import msgpack

from ..errors import BackendError, ConfigError, IncompatibleStateError, RingError, GuestMemoryError
from ..memory import GuestMemory
from ..virtio.constants import (BLK_ID_BYTES, BLK_SECTOR_SIZE, BlkFeature, BlkRequestType,
                                BlkStatus, DeviceId, Feature)
from ..virtio.packed import PackedDeviceQueue, PackedLayout
from ..virtio.split import DescChain, SplitDeviceQueue, SplitLayout
from .base import BackendEvent, BackendEventHandler, BackendEventKind, Capability, RingState, VringAddr

BLK_REQ_HEADER = struct.Struct("<IIQ")   #: virtio_blk_req header (v1.4 §5.2.6)
BLK_CONFIG = struct.Struct("<QIIHBBIBBHIBBH")  #: virtio_blk_config up to num_queues (v1.4 §5.2.4)
BLK_CONFIG_SIZE = 60

log = logging.getLogger(__name__)


class DeviceModel(Protocol):
    device_id: DeviceId

    def features(self) -> int: ...

    def config(self) -> bytes: ...

    def set_config(self, offset: int, data: bytes) -> None: ...

    def handle(self, memory: GuestMemory, chain: DescChain) -> int:
        """Carry out one request; returns bytes written into the chain."""

    def state(self) -> dict: ...

    def load(self, state: dict) -> None: ...

    def close(self) -> None: ...


class RngModel:
    """virtio-rng (v1.4 §5.4): fill every writable buffer with entropy."""

    device_id = DeviceId.RNG

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.queues = 1

    def features(self) -> int:
        return 0

    def config(self) -> bytes:
        return b""

    def set_config(self, offset: int, data: bytes) -> None:
        pass

    def handle(self, memory: GuestMemory, chain: DescChain) -> int:
        return chain.write(memory, os.urandom(chain.writable_len))

    def state(self) -> dict:
        return {}

    def load(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


_STATUS_OK, _STATUS_IOERR = bytes([BlkStatus.OK]), bytes([BlkStatus.IOERR])


class BlkModel:
    """virtio-blk (v1.4 §5.2) over a file or an in-memory image."""

    device_id = DeviceId.BLOCK

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.queues = int(options.get("queues", 1))
        self.read_only = bool(options.get("read_only", False))
        self.serial = str(options.get("serial", "shadowvmm-blk")).encode()[:BLK_ID_BYTES]
        self.writeback = 1
        self.seg_max = 126
        self.fd = -1
        self.image: bytearray | None = None
        path = options.get("image")
        if path:
            flags = os.O_RDONLY if self.read_only else os.O_RDWR | os.O_CREAT
            self.fd = os.open(str(path), flags | os.O_CLOEXEC, 0o644)
            if "size" in options and not self.read_only and os.fstat(self.fd).st_size < int(options["size"]):
                os.ftruncate(self.fd, int(options["size"]))
            self.size = os.fstat(self.fd).st_size
        else:
            self.size = int(options.get("size", 64 << 20))
            self.image = bytearray(self.size)
        if self.size % BLK_SECTOR_SIZE:
            raise ConfigError("backend.size", f"{self.size} is not a multiple of {BLK_SECTOR_SIZE}")

    def features(self) -> int:
        bits = (BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH
                | BlkFeature.CONFIG_WCE | BlkFeature.MQ)
        if self.read_only:
            bits |= BlkFeature.RO
        return int(bits)

    def config(self) -> bytes:
        raw = BLK_CONFIG.pack(self.size // BLK_SECTOR_SIZE, 0, self.seg_max, 0, 0, 0,
                              BLK_SECTOR_SIZE, 0, 0, 0, 0, self.writeback, 0, self.queues)
        return raw.ljust(BLK_CONFIG_SIZE, b"\0")

    def set_config(self, offset: int, data: bytes) -> None:
        if offset <= 32 < offset + len(data):
            self.writeback = data[32 - offset] & 1

    def _read(self, offset: int, length: int) -> bytes:
        if self.image is not None:
            return bytes(self.image[offset:offset + length])
        return os.pread(self.fd, length, offset)

    def _write(self, offset: int, data: bytes) -> None:
        if self.image is not None:
            self.image[offset:offset + len(data)] = data
        else:
            os.pwrite(self.fd, data, offset)

    def handle(self, memory: GuestMemory, chain: DescChain) -> int:
        readable = chain.readable
        if (len(readable) > 1 and readable[0][1] == BLK_REQ_HEADER.size and chain.writable
                and self.image is not None and not self.read_only):
            # The usual layout (Linux, the guest model): the header alone in the first buffer;
            # OUT data goes from guest memory into the image without an intermediate copy.
            rtype, _, sector = BLK_REQ_HEADER.unpack(memory.read(readable[0][0], BLK_REQ_HEADER.size))
            if rtype == BlkRequestType.OUT:
                return self._write_direct(memory, chain, sector)
        out = chain.read(memory)
        if len(out) < BLK_REQ_HEADER.size or not chain.writable:
            raise RingError("virtio-blk request without header or status byte")
        rtype, _, sector = BLK_REQ_HEADER.unpack_from(out)
        data_room = chain.writable_len - 1
        status = BlkStatus.OK
        written = 0
        offset = sector * BLK_SECTOR_SIZE
        if rtype == BlkRequestType.IN:
            if offset + data_room > self.size:
                status = BlkStatus.IOERR
            else:
                written = chain.write(memory, self._read(offset, data_room))
        elif rtype == BlkRequestType.OUT:
            payload = out[BLK_REQ_HEADER.size:]
            if self.read_only:
                status = BlkStatus.IOERR
            elif offset + len(payload) > self.size:
                status = BlkStatus.IOERR
            else:
                self._write(offset, payload)
                if not self.writeback and self.fd >= 0:
                    os.fdatasync(self.fd)
        elif rtype == BlkRequestType.FLUSH:
            if self.fd >= 0:
                os.fdatasync(self.fd)
        elif rtype == BlkRequestType.GET_ID:
            written = chain.write(memory, self.serial.ljust(BLK_ID_BYTES, b"\0")[:data_room])
        else:
            status = BlkStatus.UNSUPP
        chain.write(memory, bytes([status]), skip=data_room)
        return written + 1

    def _write_direct(self, memory: GuestMemory, chain: DescChain, sector: int) -> int:
        """OUT into the in-memory image straight from the guest's data buffers."""
        assert self.image is not None
        offset = sector * BLK_SECTOR_SIZE
        data = chain.readable[1:]
        status = _STATUS_OK
        if offset + sum([length for _, length in data]) > self.size:
            status = _STATUS_IOERR
        else:
            image = self.image
            for gpa, length in data:
                image[offset:offset + length] = memory.view(gpa, length)
                offset += length
        gpa, length = chain.writable[-1]        # the status byte ends the writable area
        memory.write(gpa + length - 1, status)
        return 1

    def state(self) -> dict:
        return {"writeback": self.writeback}

    def load(self, state: dict) -> None:
        self.writeback = int(state.get("writeback", 1))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


MODELS: dict[str, type] = {"blk": BlkModel, "rng": RngModel}


@dataclass
class Ring:
    """One vring as the backend holds it (vhost semantics)."""

    index: int
    num: int = 0
    base: int = 0
    addr: VringAddr | None = None
    kick_fd: int = -1
    call_fd: int = -1
    enabled: bool = False
    queue: Any = None
    in_flight: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)


class InProcBackend:
    """The embedded reference backend (entry point ``inproc``)."""

    implementation = "inproc"
    implementation_version = 1

    def __init__(self, config: Mapping[str, Any]) -> None:
        kind = config.get("device", "blk")
        if kind not in MODELS:
            raise ConfigError("backend.device", f"inproc has no {kind!r} model ({', '.join(MODELS)})")
        self.kind = kind
        self.model: DeviceModel = MODELS[kind](config)
        self.device_id = self.model.device_id
        self.implementation = f"inproc-{kind}"
        self.latency = float(config.get("latency_us", 0)) / 1e6
        self.memory: GuestMemory | None = None
        self.features = 0
        self.status = 0
        self.suspended = False
        self.rings: dict[int, Ring] = {}
        self._events: BackendEventHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.requests = 0
        self.broken_rings: set[int] = set()

    # ------------------------------------------------------------------ contract

    def capabilities(self) -> Capability:
        return (Capability.CONFIG | Capability.STATUS | Capability.SUSPEND | Capability.RESUME
                | Capability.RING_RESTART | Capability.RESET_DEVICE | Capability.DEVICE_STATE
                | Capability.MQ)

    async def connect(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        for ring in self.rings.values():
            self._unwatch(ring)
        self.rings.clear()
        self.model.close()

    async def get_features(self) -> int:
        return int(self.model.features() | Feature.VERSION_1 | Feature.INDIRECT_DESC
                   | Feature.EVENT_IDX | Feature.RING_PACKED)

    async def set_features(self, features: int) -> None:
        offered = await self.get_features()
        if features & ~offered:
            raise BackendError(f"features {features & ~offered:#x} were not offered")
        self.features = features

    async def get_queue_num(self) -> int:
        return getattr(self.model, "queues", 1)

    def config_size(self) -> int:
        return len(self.model.config())

    async def set_mem_table(self, memory: GuestMemory) -> None:
        self.memory = memory

    def _ring(self, index: int) -> Ring:
        if not 0 <= index < 1024:
            raise BackendError(f"vring index {index} out of range")
        ring = self.rings.get(index)
        if ring is None:
            ring = self.rings[index] = Ring(index)
        return ring

    async def set_vring_num(self, index: int, num: int) -> None:
        self._ring(index).num = num

    async def set_vring_addr(self, addr: VringAddr) -> None:
        self._ring(addr.index).addr = addr

    async def set_vring_base(self, index: int, base: int) -> None:
        self._ring(index).base = base

    async def get_vring_base(self, index: int) -> RingState:
        """Suspended: read the state (vhost-vdpa semantics); else stop the ring (vhost-user)."""
        ring = self._ring(index)
        self._unwatch(ring)
        while ring.in_flight:
            ring.drained.clear()
            await ring.drained.wait()
        state = self._ring_state(ring)
        if self.suspended:
            return state
        ring.queue = None
        ring.enabled = False
        ring.base = state.base
        return state

    def _ring_state(self, ring: Ring) -> RingState:
        queue = ring.queue
        if queue is None:
            return RingState(ring.index, ring.base)
        if isinstance(queue, SplitDeviceQueue):
            return RingState(ring.index, queue.last_avail_idx)
        return queue.ring_state(ring.index)

    async def set_vring_kick(self, index: int, fd: int) -> None:
        ring = self._ring(index)
        self._unwatch(ring)
        ring.kick_fd = fd
        if ring.enabled:
            self._watch(ring)

    async def set_vring_call(self, index: int, fd: int) -> None:
        self._ring(index).call_fd = fd

    async def set_vring_enable(self, index: int, enable: bool) -> None:
        ring = self._ring(index)
        if not enable:
            self._unwatch(ring)
            ring.enabled = False
            return
        if ring.addr is None or ring.num == 0 or self.memory is None:
            raise BackendError(f"vring {index} enabled before it was configured")
        if ring.queue is None:
            ring.queue = self._make_queue(ring)
        ring.enabled = True
        self._watch(ring)

    def _make_queue(self, ring: Ring) -> Any:
        assert ring.addr is not None and self.memory is not None
        event_idx = bool(self.features & Feature.EVENT_IDX)
        indirect = bool(self.features & Feature.INDIRECT_DESC)
        try:
            if self.features & Feature.RING_PACKED:
                layout = PackedLayout(ring.num, ring.addr.desc, ring.addr.driver, ring.addr.device)
                return PackedDeviceQueue(self.memory, layout, event_idx=event_idx,
                                         indirect=indirect, state=RingState(ring.index, ring.base))
            layout = SplitLayout(ring.num, ring.addr.desc, ring.addr.driver, ring.addr.device)
            return SplitDeviceQueue(self.memory, layout, event_idx=event_idx, indirect=indirect,
                                    last_avail_idx=ring.base)
        except (RingError, GuestMemoryError) as exc:
            raise BackendError(f"vring {ring.index}: {exc}") from exc

    async def get_config(self, offset: int, size: int) -> bytes:
        return self.model.config()[offset:offset + size]

    async def set_config(self, offset: int, data: bytes) -> None:
        self.model.set_config(offset, data)

    async def set_status(self, status: int) -> None:
        self.status = status

    async def reset(self) -> None:
        for ring in list(self.rings.values()):
            self._unwatch(ring)
            while ring.in_flight:
                ring.drained.clear()
                await ring.drained.wait()
        self.rings.clear()
        self.features = 0
        self.status = 0
        self.suspended = False

    async def suspend(self) -> None:
        self.suspended = True
        for ring in self.rings.values():
            self._unwatch(ring)
        for ring in self.rings.values():
            while ring.in_flight:
                ring.drained.clear()
                await ring.drained.wait()

    async def resume(self) -> None:
        self.suspended = False
        for ring in self.rings.values():
            if ring.enabled and ring.queue is None:
                ring.queue = self._make_queue(ring)
            if ring.enabled:
                self._watch(ring)

    async def save_state(self) -> bytes | None:
        return msgpack.packb({"model": self.kind, "state": self.model.state()})

    async def load_state(self, blob: bytes) -> None:
        try:
            data = msgpack.unpackb(blob)
            kind, state = data["model"], data["state"]
        except Exception as exc:
            raise IncompatibleStateError(f"{self.implementation}: unreadable state: {exc}") from exc
        if kind != self.kind:
            raise IncompatibleStateError(f"state of inproc-{kind} cannot load into {self.implementation}")
        self.model.load(state)

    async def prepare_inflight(self, num_queues: int, queue_size: int) -> None:
        raise BackendError("inproc keeps no inflight area (no INFLIGHT capability)")

    async def wait_for_endpoint(self, timeout: float) -> bool:
        await asyncio.sleep(timeout)
        return False

    def lost_peer_alive(self) -> bool | None:
        return False

    def set_event_handler(self, handler: BackendEventHandler | None) -> None:
        """Config changes only: an in-process model has no session to lose."""
        self._events = handler

    def change_config(self, **changes: Any) -> None:
        """Device-side config change (e.g. a resize), as a real device would do."""
        for key, value in changes.items():
            setattr(self.model, key, value)
        if self._events is not None:
            self._events(BackendEvent(BackendEventKind.CONFIG_CHANGED))

    # ------------------------------------------------------------------ data path

    def _watch(self, ring: Ring) -> None:
        if ring.kick_fd >= 0 and not self.suspended and ring.queue is not None:
            assert self._loop is not None
            self._loop.add_reader(ring.kick_fd, self._on_kick, ring)
            self._process(ring)

    def _unwatch(self, ring: Ring) -> None:
        if ring.kick_fd >= 0 and self._loop is not None:
            self._loop.remove_reader(ring.kick_fd)

    def _on_kick(self, ring: Ring) -> None:
        try:
            os.eventfd_read(ring.kick_fd)
        except BlockingIOError:
            pass
        self._process(ring)

    def _process(self, ring: Ring) -> None:
        queue = ring.queue
        memory = self.memory
        if queue is None or memory is None:
            return
        done: list[tuple[int, int]] = []
        try:
            while (chain := queue.pop()) is not None:
                written = self.model.handle(memory, chain)
                self.requests += 1
                done.append((chain.head, written))
        except (RingError, GuestMemoryError) as exc:
            log.error("%s: vring %d broken, stopped: %s", self.implementation, ring.index, exc)
            self._unwatch(ring)
            ring.enabled = False
            self.broken_rings.add(ring.index)
        finally:
            if done:
                if self.latency:
                    ring.in_flight += len(done)
                    assert self._loop is not None
                    self._loop.call_later(self.latency, self._complete, ring, queue, done)
                else:
                    self._complete(ring, queue, done, False)

    def _complete(self, ring: Ring, queue: Any, done: list[tuple[int, int]],
                  deferred: bool = True) -> None:
        queue.push_batch(done)
        if deferred:
            ring.in_flight -= len(done)
            if not ring.in_flight:
                ring.drained.set()
        if queue.should_notify() and ring.call_fd >= 0:
            os.eventfd_write(ring.call_fd, 1)
