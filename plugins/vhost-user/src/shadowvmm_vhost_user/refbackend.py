"""A reference vhost-user back-end in Python: virtio-blk over a file or a memory image.

It exists to test the paths no packaged back-end offers (lab trace
"Not exercised": INFLIGHT_SHMFD, RESET_DEVICE, STATUS, DEVICE_STATE) end to
end through a real unix socket. It serves one front-end session at a time
on an asyncio unix server (:class:`RefBlkServer`); further clients wait in
the listen backlog. It runs in the test's process or its own
(``python -m shadowvmm_vhost_user.refbackend SOCKET``, launcher
:class:`shadowvmm.testing.peers.RefBlk`), where SIGUSR1 drops the session
(:meth:`RefBlkServer.drop_session`) and SIGTERM exits.

Implemented: the realize handshake (GET/SET_FEATURES, GET/SET_PROTOCOL_FEATURES,
GET_QUEUE_NUM, SET_OWNER), SET_MEM_TABLE, the ring messages
(NUM/ADDR/BASE/KICK/CALL/ERR/ENABLE, GET_VRING_BASE), GET/SET_CONFIG,
REPLY_ACK, LOG_SHMFD (SET_LOG_BASE; with LOG_ALL every guest-memory write,
buffers and used ring, is marked with atomic OR), INFLIGHT_SHMFD
(GET/SET_INFLIGHT_FD in the libvhost-user split layout, with its
resubmission on reconnect), RESET_DEVICE, STATUS and DEVICE_STATE
(SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE). Requests are served by the shared
device-side split ring code and the in-process blk model; ``latency_us``
holds each popped request that long before it is executed and used, so
stops and crashes land mid-I/O (with ``latency_data_only`` only reads and
writes wait: other requests are used at once, ahead of them, out of order as
a device may). The opaque state names its implementation
id; a state of another id is refused at CHECK_DEVICE_STATE (reason in
:attr:`RefBlkServer.last_error`).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import fcntl
import logging
import mmap
import os
import signal
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from shadowvmm.backends.inproc import BlkModel
from shadowvmm.errors import (
    ArgumentError,
    GuestMemoryError,
    IncompatibleStateError,
    ProtocolError,
    RingError,
    ShadowVmmError,
)
from shadowvmm.memory import DirtyLog, GuestMemory, MemoryRegion
from shadowvmm.virtio.constants import BlkRequestType, Feature
from shadowvmm.virtio.split import DescChain, SplitDeviceQueue, SplitLayout

from . import protocol as vu

log = logging.getLogger(__name__)

FR = vu.FrontendRequest
PF = vu.ProtocolFeature

PROTOCOL_FEATURES = (PF.MQ | PF.LOG_SHMFD | PF.REPLY_ACK | PF.CONFIG | PF.INFLIGHT_SHMFD
                     | PF.RESET_DEVICE | PF.STATUS | PF.DEVICE_STATE)
STATE_VERSION = 1
#: libvhost-user ``INFLIGHT_ALIGNMENT`` and ``INFLIGHT_VERSION``.
INFLIGHT_ALIGN = 64
INFLIGHT_VERSION = 1
#: ``VuVirtqInflight`` header: u64 features, u16 version, u16 desc_num, u16 last_batch_head, u16 used_idx.
INFLIGHT_HEADER = struct.Struct("<QHHHH")
#: ``VuDescStateSplit``: u8 inflight, u8 padding[5], u16 next, u64 counter.
INFLIGHT_DESC = struct.Struct("<B5xHQ")
#: Byte offsets of the fields written one at a time (header, then descriptor).
_VERSION, _DESC_NUM, _LAST_BATCH_HEAD, _USED_IDX = 8, 10, 12, 14
_DESC_INFLIGHT, _DESC_COUNTER = 0, 8
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_ANC = socket.CMSG_SPACE(32 * 4)
_DEVICE_STATE_NOFD = vu.DEVICE_STATE_NOFD
#: virtio-blk request types held by ``latency_data_only`` (v1.4 §5.2.6).
_DATA_REQUESTS = frozenset({BlkRequestType.IN, BlkRequestType.OUT})


def inflight_queue_bytes(queue_size: int) -> int:
    """Per-queue split region size, libvhost-user's ``vu_inflight_queue_size``.

    ``ALIGN_UP(16 * queue_size + 2, 64)``: it counts a u16 where the 16-byte
    header goes, but since the descriptors are 16 bytes each the rounding
    always leaves room for the header.
    """
    raw = INFLIGHT_DESC.size * queue_size + _U16.size
    return (raw + INFLIGHT_ALIGN - 1) // INFLIGHT_ALIGN * INFLIGHT_ALIGN


class InflightHeader(NamedTuple):
    features: int
    version: int
    desc_num: int
    last_batch_head: int
    used_idx: int


class InflightQueue:
    """One split queue's part of the inflight region (libvhost-user ``VuVirtqInflight``).

    "Inflight I/O tracking" (vhost-user.rst): a head is marked when it is
    fetched (:meth:`get`) and cleared once its used entry is published
    (:meth:`pre_put` / :meth:`post_put`), every field written singly in
    libvhost-user's order, so a back-end killed at any point leaves a region
    :meth:`recover` can repair. Works over any buffer (the front-end can map
    the same memfd to inspect it).
    """

    def __init__(self, buf: Any, offset: int, queue_size: int) -> None:
        if offset + INFLIGHT_HEADER.size + INFLIGHT_DESC.size * queue_size > len(buf):
            raise ProtocolError(f"inflight region of {len(buf)} bytes is too small for queue at {offset}")
        self.buf = buf
        self.offset = offset
        self.queue_size = queue_size
        self.counter = 0

    def header(self) -> InflightHeader:
        return InflightHeader(*INFLIGHT_HEADER.unpack_from(self.buf, self.offset))

    def desc(self, head: int) -> tuple[int, int, int]:
        """``(inflight, next, counter)`` of descriptor *head*."""
        return INFLIGHT_DESC.unpack_from(self.buf, self._desc(head))

    def _desc(self, head: int) -> int:
        if not 0 <= head < self.queue_size:
            raise RingError(f"inflight descriptor {head} out of range ({self.queue_size})")
        return self.offset + INFLIGHT_HEADER.size + INFLIGHT_DESC.size * head

    def _set16(self, field_offset: int, value: int) -> None:
        _U16.pack_into(self.buf, self.offset + field_offset, value & 0xFFFF)

    def set_desc_num(self) -> None:
        """What SET_INFLIGHT_FD does to every queue (``desc_num = queue_size``)."""
        self._set16(_DESC_NUM, self.queue_size)

    def pending(self) -> list[int]:
        """Heads with ``inflight == 1``, in increasing ``counter`` order."""
        heads = []
        for head in range(self.queue_size):
            inflight, _, counter = self.desc(head)
            if inflight == 1:
                heads.append((counter, head))
        return [head for _, head in sorted(heads)]

    def get(self, head: int) -> None:
        """Head fetched from the avail ring (``vu_queue_inflight_get``)."""
        at = self._desc(head)
        _U64.pack_into(self.buf, at + _DESC_COUNTER, self.counter)
        self.counter += 1
        self.buf[at + _DESC_INFLIGHT] = 1

    def pre_put(self, head: int) -> None:
        """Before the used index moves: record the head (``vu_queue_inflight_pre_put``)."""
        self._set16(_LAST_BATCH_HEAD, head)

    def post_put(self, head: int, used_idx: int) -> None:
        """After the used index moved: clear the head, copy the index (``vu_queue_inflight_post_put``)."""
        self.buf[self._desc(head) + _DESC_INFLIGHT] = 0
        self._set16(_USED_IDX, used_idx)

    def recover(self, used_idx: int) -> list[int] | None:
        """A ring starts (``vu_check_queue_inflights``): the heads to resubmit, by counter.

        ``None`` for a region never used (version 0, now initialised). A head
        whose used entry was published just before a crash is still marked;
        the region's used_idx then differs from *used_idx* (read from the
        used ring) and that head, ``last_batch_head``, is cleared.
        """
        header = self.header()
        if header.version == 0:
            self._set16(_VERSION, INFLIGHT_VERSION)
            return None
        if header.used_idx != used_idx:
            self.buf[self._desc(header.last_batch_head) + _DESC_INFLIGHT] = 0
            self._set16(_USED_IDX, used_idx)
        heads = self.pending()
        self.counter = self.desc(heads[-1])[2] + 1 if heads else 0
        return heads


@dataclass
class _Inflight:
    """The inflight region: one :class:`InflightQueue` per queue, back to back."""

    fd: int
    buf: mmap.mmap
    num_queues: int
    queue_size: int
    queues: list[InflightQueue] = field(init=False)

    def __post_init__(self) -> None:
        step = inflight_queue_bytes(self.queue_size)
        self.queues = [InflightQueue(self.buf, q * step, self.queue_size) for q in range(self.num_queues)]

    def close(self) -> None:
        self.buf.close()
        os.close(self.fd)


@dataclass
class _Delayed:
    """Popped chains waiting out the latency; ``done`` resolves when they are used (or dropped)."""

    chains: list[DescChain]
    done: asyncio.Future[None]
    timer: asyncio.TimerHandle | None = None


@dataclass
class _Ring:
    index: int
    num: int = 0
    base: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    log: bool = False
    kick: int = -1
    call: int = -1
    enabled: bool = False
    queue: SplitDeviceQueue | None = None      #: started while set
    resubmit: collections.deque[int] = field(default_factory=collections.deque)
    delayed: list[_Delayed] = field(default_factory=list)


@dataclass
class _Session:
    sock: socket.socket
    features: int = 0
    protocol: int = 0
    status: int = 0
    memory: GuestMemory | None = None
    uaddr: list[tuple[int, int, int]] = field(default_factory=list)
    rings: dict[int, _Ring] = field(default_factory=dict)
    log_buf: mmap.mmap | None = None
    inflight: _Inflight | None = None
    transfer: asyncio.Task | None = None
    transfer_error: str = ""
    buf: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)


class RefBlkServer:
    """The back-end: a unix socket server serving one session at a time."""

    def __init__(self, path: str, *, implementation: str = "shadowvmm-refblk", queues: int = 2,
                 size: int = 16 << 20, image: str | None = None, serial: str = "refblk",
                 latency_us: int = 0, latency_data_only: bool = False) -> None:
        if latency_us < 0:
            raise ArgumentError(f"latency_us {latency_us} is negative")
        self.path = path
        self.implementation = implementation
        self.queues = queues
        self.latency_us = latency_us
        self.latency_data_only = latency_data_only
        options: dict[str, Any] = {"queues": queues, "size": size, "serial": serial}
        if image:
            options["image"] = image
        self.model = BlkModel(options)
        self.requests = 0
        self.resubmitted = 0
        self.sessions = 0
        self.last_error = ""
        self.received: list[int] = []
        self.loaded_from: str | None = None
        self._listener: socket.socket | None = None
        self._session: _Session | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[_Session, vu.Header, bytes, list[int]]] = asyncio.Queue()
        self._worker: asyncio.Task | None = None

    # ------------------------------------------------------------------ server

    async def start(self) -> RefBlkServer:
        self._loop = asyncio.get_running_loop()
        if os.path.exists(self.path):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        listener.bind(self.path)
        listener.listen(4)
        self._listener = listener
        self._loop.add_reader(listener.fileno(), self._accept)
        self._worker = self._loop.create_task(self._work())
        return self

    async def close(self) -> None:
        if self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        self._end_session()
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        self.model.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    @property
    def serving(self) -> bool:
        """Whether a front-end session is open."""
        return self._session is not None

    async def __aenter__(self) -> RefBlkServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _accept(self) -> None:
        """Take one front-end; the listener is not watched until its session ends."""
        assert self._listener is not None and self._loop is not None
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        self._loop.remove_reader(self._listener.fileno())
        sock.setblocking(False)
        self._session = _Session(sock)
        self.sessions += 1
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def drop_session(self) -> None:
        """Close the session as a crashing peer would, and wait for the next front-end.

        Everything of the session goes (socket, memory, rings, fds); requests
        popped but not yet used stay marked in the inflight region, which the
        front-end keeps.
        """
        self._end_session()

    def _end_session(self) -> None:
        s = self._session
        if s is None:
            return
        self._session = None
        assert self._loop is not None
        self._loop.remove_reader(s.sock.fileno())
        s.sock.close()
        self._reset_rings(s)
        self._drop_memory(s)
        if s.log_buf is not None:
            s.log_buf.close()
        if s.inflight is not None:
            s.inflight.close()
        if s.transfer is not None:
            s.transfer.cancel()
        for fd in s.fds:
            os.close(fd)
        s.fds = []
        if self._listener is not None:
            self._loop.add_reader(self._listener.fileno(), self._accept)

    def _on_readable(self) -> None:
        s = self._session
        if s is None:
            return
        try:
            data, anc, _, _ = s.sock.recvmsg(65536, _ANC, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError:
            data, anc = b"", []
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(blob[:len(blob) - len(blob) % fds.itemsize])
                s.fds.extend(fds)
        if not data:
            self._end_session()
            return
        s.buf += data
        while len(s.buf) >= vu.Header.STRUCT.size:
            header = vu.Header(*vu.Header.STRUCT.unpack_from(s.buf))
            end = vu.Header.STRUCT.size + header.size
            if len(s.buf) < end:
                break
            body = bytes(s.buf[vu.Header.STRUCT.size:end])
            del s.buf[:end]
            fds, s.fds = s.fds, []
            self._queue.put_nowait((s, header, body, fds))

    async def _work(self) -> None:
        while True:
            session, header, body, fds = await self._queue.get()
            if session is not self._session:
                for fd in fds:
                    os.close(fd)
                continue
            try:
                await self._handle(session, header, body, fds)
            except (ShadowVmmError, OSError, ValueError, KeyError) as exc:
                log.error("refblk: %s failed: %s", header.request, exc)
                self.last_error = f"request {header.request}: {exc}"
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                if header.flags & vu.HeaderFlags.NEED_REPLY:
                    self._reply(session, header.request, vu.U64(1).pack())

    def _reply(self, s: _Session, request: int, payload: bytes, fds: list[int] | None = None) -> None:
        """Send a reply; dropped if its session has ended meanwhile (e.g. while GET_VRING_BASE waited)."""
        if s is not self._session:
            return
        data = vu.Header(request, vu.VERSION | vu.HeaderFlags.REPLY, len(payload)).pack() + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        s.sock.setblocking(True)
        try:
            sent = s.sock.sendmsg([data], anc, socket.MSG_NOSIGNAL)
            if sent < len(data):
                s.sock.sendall(data[sent:], socket.MSG_NOSIGNAL)
        except OSError as exc:
            log.warning("refblk: reply to %s lost: %s", request, exc)
        finally:
            s.sock.setblocking(False)

    # ------------------------------------------------------------------ messages

    def features(self) -> int:
        return int(self.model.features() | Feature.VERSION_1 | Feature.INDIRECT_DESC | Feature.EVENT_IDX
                   | vu.F_PROTOCOL_FEATURES | vu.F_LOG_ALL)

    async def _handle(self, s: _Session, header: vu.Header, body: bytes, fds: list[int]) -> None:
        request = FR(header.request)
        self.received.append(int(request))
        spec = vu.FRONTEND_SPECS[request]
        payload = vu.decode_payload(spec.request, body)
        reply = await self._dispatch(s, request, payload, fds)
        if reply is not None:
            data, out_fds = reply
            self._reply(s, request, data, out_fds)
            for fd in out_fds:
                os.close(fd)
        elif spec.reply is None and header.flags & vu.HeaderFlags.NEED_REPLY:
            self._reply(s, request, vu.U64(0).pack())

    async def _dispatch(self, s: _Session, request: FR, p: Any, fds: list[int]) -> tuple[bytes, list[int]] | None:
        if request is FR.GET_FEATURES:
            return vu.U64(self.features()).pack(), []
        if request is FR.SET_FEATURES:
            s.features = p.value
            self._update_logging(s)
        elif request is FR.GET_PROTOCOL_FEATURES:
            return vu.U64(int(PROTOCOL_FEATURES)).pack(), []
        elif request is FR.SET_PROTOCOL_FEATURES:
            s.protocol = p.value
        elif request is FR.GET_QUEUE_NUM:
            return vu.U64(self.queues).pack(), []
        elif request in (FR.SET_OWNER, FR.RESET_OWNER):
            pass
        elif request is FR.SET_MEM_TABLE:
            self._set_mem_table(s, p.regions, fds)
        elif request is FR.SET_LOG_BASE:
            self._set_log_base(s, p, fds[0])
            return vu.U64(0).pack(), []
        elif request is FR.SET_VRING_NUM:
            self._ring(s, p.index).num = p.num
        elif request is FR.SET_VRING_BASE:
            self._ring(s, p.index).base = p.num
        elif request is FR.SET_VRING_ADDR:
            self._set_vring_addr(s, p)
        elif request is FR.GET_VRING_BASE:
            return vu.VringState(p.index, await self._stop_ring(self._ring(s, p.index))).pack(), []
        elif request is FR.SET_VRING_KICK:
            self._set_kick(s, self._ring(s, p.index), -1 if p.nofd else fds[0])
        elif request is FR.SET_VRING_CALL:
            ring = self._ring(s, p.index)
            if ring.call >= 0:
                os.close(ring.call)
            ring.call = -1 if p.nofd else fds[0]
        elif request is FR.SET_VRING_ERR:
            for fd in fds:
                os.close(fd)
        elif request is FR.SET_VRING_ENABLE:
            self._set_enable(s, self._ring(s, p.index), bool(p.num))
        elif request is FR.GET_CONFIG:
            data = self.model.config()[p.offset:p.offset + p.size]
            return vu.Config(p.offset, len(data), 0, data).pack(), []
        elif request is FR.SET_CONFIG:
            self.model.set_config(p.offset, p.payload)
        elif request is FR.GET_INFLIGHT_FD:
            return self._get_inflight(s, p)
        elif request is FR.SET_INFLIGHT_FD:
            self._set_inflight(s, p, fds[0])
        elif request is FR.RESET_DEVICE:
            self._reset_rings(s)
            s.features = s.status = 0
            self._update_logging(s)
        elif request is FR.SET_STATUS:
            s.status = p.value
        elif request is FR.GET_STATUS:
            return vu.U64(s.status).pack(), []
        elif request is FR.SET_DEVICE_STATE_FD:
            return vu.DeviceStateResult(self._start_transfer(s, p, fds[0])).pack(), []
        elif request is FR.CHECK_DEVICE_STATE:
            return vu.U64(await self._check_transfer(s)).pack(), []
        else:
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"{request.name} is not implemented by the reference back-end")
        return None

    def _ring(self, s: _Session, index: int) -> _Ring:
        if not 0 <= index < self.queues:
            raise ProtocolError(f"vring {index} out of range (0..{self.queues - 1})")
        return s.rings.setdefault(index, _Ring(index))

    # ------------------------------------------------------------------ memory and log

    def _drop_memory(self, s: _Session) -> None:
        if s.memory is not None:
            s.memory.close()
            s.memory = None
        s.uaddr = []

    def _set_mem_table(self, s: _Session, regions: tuple[vu.MemRegion, ...], fds: list[int]) -> None:
        if len(fds) != len(regions):
            raise ProtocolError(f"{len(regions)} regions with {len(fds)} fds")
        self._drop_memory(s)
        mapped = []
        for region, fd in zip(regions, fds):
            buf = mmap.mmap(fd, region.memory_size, mmap.MAP_SHARED, offset=region.mmap_offset)
            mapped.append(MemoryRegion(region.guest_phys_addr, region.memory_size, fd, buf, region.mmap_offset))
            s.uaddr.append((region.userspace_addr, region.memory_size, region.guest_phys_addr))
        s.memory = GuestMemory(mapped)
        self._update_logging(s)
        for ring in s.rings.values():
            if ring.queue is not None:
                ring.queue = self._new_queue(s, ring, ring.queue.last_avail_idx)

    def _gpa(self, s: _Session, uaddr: int) -> int:
        for start, size, gpa in s.uaddr:
            if start <= uaddr < start + size:
                return gpa + uaddr - start
        raise GuestMemoryError(f"user address {uaddr:#x} is in no memory region")

    def _set_log_base(self, s: _Session, p: vu.Log, fd: int) -> None:
        if s.log_buf is not None:
            s.log_buf.close()
        try:
            s.log_buf = mmap.mmap(fd, p.mmap_size, mmap.MAP_SHARED, offset=p.mmap_offset)
        finally:
            os.close(fd)
        self._update_logging(s)

    def _update_logging(self, s: _Session) -> None:
        if s.memory is None:
            return
        if s.features & vu.F_LOG_ALL and s.log_buf is not None:
            s.memory.dirty_log = DirtyLog.over(s.log_buf, len(s.log_buf) & ~7)
        else:
            s.memory.dirty_log = None

    # ------------------------------------------------------------------ rings

    def _set_vring_addr(self, s: _Session, p: vu.VringAddr) -> None:
        ring = self._ring(s, p.index)
        ring.desc, ring.avail, ring.used = self._gpa(s, p.desc), self._gpa(s, p.avail), self._gpa(s, p.used)
        ring.log = bool(p.flags & vu.VRING_F_LOG)

    def _set_kick(self, s: _Session, ring: _Ring, fd: int) -> None:
        """SET_VRING_KICK starts the ring ("Ring states"); a stopped ring with an
        inflight region first recovers what a previous back-end left in flight."""
        self._unwatch(ring)
        if ring.kick >= 0:
            os.close(ring.kick)
        ring.kick = fd
        if s.memory is None or not ring.num or not ring.desc:
            raise ProtocolError(f"vring {ring.index} kicked before it was configured")
        if ring.queue is None:
            ring.queue = self._new_queue(s, ring, ring.base)
            self._check_inflights(s, ring)
        if not s.features & vu.F_PROTOCOL_FEATURES:
            ring.enabled = True
        if fd >= 0:
            assert self._loop is not None
            self._loop.add_reader(fd, self._on_kick, ring)
        self._process(ring)

    @staticmethod
    def _new_queue(s: _Session, ring: _Ring, last_avail_idx: int) -> SplitDeviceQueue:
        assert s.memory is not None
        layout = SplitLayout(ring.num, ring.desc, ring.avail, ring.used)
        return SplitDeviceQueue(s.memory, layout, event_idx=bool(s.features & Feature.EVENT_IDX),
                                indirect=bool(s.features & Feature.INDIRECT_DESC), last_avail_idx=last_avail_idx)

    def _inflight_queue(self, s: _Session | None, ring: _Ring) -> InflightQueue | None:
        if s is None or s.inflight is None or not s.protocol & PF.INFLIGHT_SHMFD:
            return None
        return s.inflight.queues[ring.index] if ring.index < s.inflight.num_queues else None

    def _check_inflights(self, s: _Session, ring: _Ring) -> None:
        """libvhost-user ``vu_check_queue_inflights``: resume after the heads in flight.

        The next avail index becomes used idx + heads in flight (the front-end's
        SET_VRING_BASE is ignored); those heads are served first, by counter.
        """
        inflight = self._inflight_queue(s, ring)
        if inflight is None or ring.queue is None:
            return
        heads = inflight.recover(ring.queue.used_idx)
        if heads is None:
            return
        ring.queue.last_avail_idx = (ring.queue.used_idx + len(heads)) & 0xFFFF
        ring.resubmit = collections.deque(heads)
        self.resubmitted += len(heads)

    def _set_enable(self, s: _Session, ring: _Ring, enabled: bool) -> None:
        """SET_VRING_ENABLE; a started ring then serves what is already available ("Ring states")."""
        ring.enabled = enabled
        if enabled:
            self._process(ring)

    def _unwatch(self, ring: _Ring) -> None:
        if ring.kick >= 0 and self._loop is not None:
            self._loop.remove_reader(ring.kick)

    def _halt(self, ring: _Ring) -> None:
        """Stop watching kicks and close the kick fd (no new request is popped)."""
        self._unwatch(ring)
        if ring.kick >= 0:
            os.close(ring.kick)
            ring.kick = -1

    async def _stop_ring(self, ring: _Ring) -> int:
        """GET_VRING_BASE: stop the ring; requests already popped are used first, then the reply."""
        self._halt(ring)
        queue, ring.queue = ring.queue, None
        while ring.delayed:
            await asyncio.shield(ring.delayed[0].done)
        if queue is not None:
            ring.base = queue.last_avail_idx
        ring.resubmit.clear()
        return ring.base

    def _reset_rings(self, s: _Session) -> None:
        """Forget every ring; delayed requests are dropped (they stay in the inflight region)."""
        for ring in s.rings.values():
            self._halt(ring)
            for batch in ring.delayed:
                if batch.timer is not None:
                    batch.timer.cancel()
                if not batch.done.done():
                    batch.done.set_result(None)
            ring.delayed.clear()
            ring.queue = None
            if ring.call >= 0:
                os.close(ring.call)
                ring.call = -1
        s.rings.clear()

    def _on_kick(self, ring: _Ring) -> None:
        try:
            os.eventfd_read(ring.kick)
        except (BlockingIOError, OSError):
            pass
        self._process(ring)

    def _process(self, ring: _Ring) -> None:
        """Pop what is available (resubmitted heads first) if the ring is started and enabled."""
        s = self._session
        queue = ring.queue
        if s is None or queue is None or s.memory is None or not ring.enabled:
            return
        inflight = self._inflight_queue(s, ring)
        chains: list[DescChain] = []
        try:
            while ring.resubmit:
                chains.append(queue.chain_at(ring.resubmit.popleft()))
            while (chain := queue.pop()) is not None:
                if inflight is not None:
                    inflight.get(chain.head)
                chains.append(chain)
        except (RingError, GuestMemoryError) as exc:
            log.error("refblk: vring %d broken: %s", ring.index, exc)
            self._unwatch(ring)
        if not self.latency_us:
            self._complete(ring, queue, chains)
            return
        if self.latency_data_only:
            data = [self._is_data(s.memory, chain) for chain in chains]
            self._complete(ring, queue, [chain for chain, held in zip(chains, data) if not held])
            chains = [chain for chain, held in zip(chains, data) if held]
        if not chains:
            return
        assert self._loop is not None
        batch = _Delayed(chains, self._loop.create_future())
        batch.timer = self._loop.call_later(self.latency_us / 1e6, self._finish, ring, queue, batch)
        ring.delayed.append(batch)

    @staticmethod
    def _is_data(memory: GuestMemory, chain: DescChain) -> bool:
        """Whether *chain* is a virtio-blk read or write (its header's ``type``)."""
        if not chain.readable or chain.readable[0][1] < 4:
            return False
        return memory.load_u32(chain.readable[0][0]) in _DATA_REQUESTS

    def _finish(self, ring: _Ring, queue: SplitDeviceQueue, batch: _Delayed) -> None:
        ring.delayed.remove(batch)
        try:
            self._complete(ring, ring.queue or queue, batch.chains)
        finally:
            batch.done.set_result(None)

    def _complete(self, ring: _Ring, queue: SplitDeviceQueue, chains: list[DescChain]) -> None:
        """Execute *chains* and use them, then one call if the driver wants it.

        With an inflight region each head is published on its own, between
        ``pre_put`` and ``post_put`` as libvhost-user's ``vu_queue_push``, so
        a crash leaves at most ``last_batch_head`` ambiguous.
        """
        s = self._session
        if s is None or s.memory is None:
            return
        inflight = self._inflight_queue(s, ring)
        done: list[tuple[int, int]] = []
        try:
            for chain in chains:
                done.append((chain.head, self.model.handle(s.memory, chain)))
                self.requests += 1
        except (RingError, GuestMemoryError) as exc:
            log.error("refblk: vring %d broken: %s", ring.index, exc)
            self._unwatch(ring)
        if not done:
            return
        if inflight is None:
            queue.push_batch(done)
        else:
            for head, written in done:
                inflight.pre_put(head)
                queue.push(head, written)
                inflight.post_put(head, queue.used_idx)
        if queue.should_notify() and ring.call >= 0:
            os.eventfd_write(ring.call, 1)

    # ------------------------------------------------------------------ inflight

    def _get_inflight(self, s: _Session, p: vu.Inflight) -> tuple[bytes, list[int]]:
        """GET_INFLIGHT_FD: a zeroed, sealed memfd (libvhost-user ``vu_get_inflight_fd``)."""
        size = inflight_queue_bytes(p.queue_size) * p.num_queues
        fd = os.memfd_create("refblk-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        if s.inflight is not None:
            s.inflight.close()
        s.inflight = _Inflight(os.dup(fd), mmap.mmap(fd, size, mmap.MAP_SHARED), p.num_queues, p.queue_size)
        return vu.Inflight(size, 0, p.num_queues, p.queue_size).pack(), [fd]

    def _set_inflight(self, s: _Session, p: vu.Inflight, fd: int) -> None:
        """SET_INFLIGHT_FD: map the front-end's region (possibly of a crashed back-end)."""
        if p.num_queues > self.queues or p.mmap_size < inflight_queue_bytes(p.queue_size) * p.num_queues:
            os.close(fd)
            raise ProtocolError(f"inflight region of {p.mmap_size} bytes for {p.num_queues}x{p.queue_size}")
        buf = mmap.mmap(fd, p.mmap_size, mmap.MAP_SHARED, offset=p.mmap_offset)
        if s.inflight is not None:
            s.inflight.close()
        s.inflight = _Inflight(fd, buf, p.num_queues, p.queue_size)
        for queue in s.inflight.queues:
            queue.set_desc_num()

    def inflight_pending(self) -> int:
        """Heads marked in flight in the current session's region, all queues."""
        s = self._session
        if s is None or s.inflight is None:
            return 0
        return sum(len(queue.pending()) for queue in s.inflight.queues)

    def delayed(self) -> int:
        """Requests popped and waiting out the latency, all rings."""
        s = self._session
        if s is None:
            return 0
        return sum(len(batch.chains) for ring in s.rings.values() for batch in ring.delayed)

    # ------------------------------------------------------------------ device state

    def state_blob(self) -> bytes:
        return msgpack.packb({"implementation": self.implementation, "version": STATE_VERSION,
                              "writeback": self.model.writeback, "requests": self.requests,
                              "serial": self.model.serial}, use_bin_type=True)

    def load_blob(self, blob: bytes) -> None:
        data = msgpack.unpackb(blob, raw=False)
        theirs = data.get("implementation")
        if theirs != self.implementation:
            raise IncompatibleStateError(f"state of implementation {theirs!r} cannot be loaded into "
                                         f"{self.implementation!r}")
        if data.get("version", 0) > STATE_VERSION:
            raise IncompatibleStateError(f"state version {data.get('version')} is newer than {STATE_VERSION}")
        self.model.writeback = int(data["writeback"])
        self.requests = int(data["requests"])
        self.loaded_from = theirs

    def _start_transfer(self, s: _Session, p: vu.DeviceStateTransfer, fd: int) -> int:
        if any(ring.queue is not None for ring in s.rings.values()):
            os.close(fd)
            self.last_error = "device state transfer while rings are started"
            return 1 | _DEVICE_STATE_NOFD
        s.transfer_error = ""
        assert self._loop is not None
        if p.direction == vu.TransferDirection.SAVE:
            s.transfer = self._loop.create_task(self._save(s, fd))
        else:
            s.transfer = self._loop.create_task(self._load(s, fd))
        return _DEVICE_STATE_NOFD

    async def _save(self, s: _Session, fd: int) -> None:
        view = memoryview(self.state_blob())
        os.set_blocking(fd, False)
        try:
            while view:
                try:
                    view = view[os.write(fd, view[:65536]):]
                except BlockingIOError:
                    await asyncio.sleep(0.0005)
        except OSError as exc:
            s.transfer_error = f"save: {exc}"
        finally:
            os.close(fd)

    async def _load(self, s: _Session, fd: int) -> None:
        os.set_blocking(fd, False)
        chunks = []
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    await asyncio.sleep(0.0005)
                    continue
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(fd)
        try:
            self.load_blob(b"".join(chunks))
        except (ShadowVmmError, ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            s.transfer_error = str(exc)
            self.last_error = str(exc)

    async def _check_transfer(self, s: _Session) -> int:
        if s.transfer is None:
            return 1
        await s.transfer
        s.transfer = None
        return 1 if s.transfer_error else 0



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="shadowvmm reference vhost-user-blk back-end "
                                                 "(SIGUSR1: drop the session, SIGTERM: exit)")
    parser.add_argument("socket")
    parser.add_argument("--image")
    parser.add_argument("--size", type=int, default=16 << 20)
    parser.add_argument("--queues", type=int, default=2)
    parser.add_argument("--latency-us", type=int, default=0, help="hold every request this long before using it")
    parser.add_argument("--latency-data-only", action="store_true",
                        help="hold only reads and writes; other requests are used at once")
    parser.add_argument("--implementation", default="shadowvmm-refblk")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        server = RefBlkServer(args.socket, implementation=args.implementation, queues=args.queues,
                              size=args.size, image=args.image, latency_us=args.latency_us,
                              latency_data_only=args.latency_data_only)
        loop.add_signal_handler(signal.SIGUSR1, server.drop_session)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with server:
            log.info("refblk: serving %s (latency %d us)", args.socket, args.latency_us)
            await stop.wait()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
