"""A reference vhost-user back-end in Python: virtio-blk over a file or a memory image.

It exists to test the paths no packaged back-end offers (lab trace
"Not exercised": INFLIGHT_SHMFD, RESET_DEVICE, STATUS, DEVICE_STATE) end to
end through a real unix socket. It serves one front-end session at a time
on an asyncio unix server (:class:`RefBlkServer`), in the test's process or
its own (``python -m shadowvmm.testing.refbackend SOCKET``).

Implemented: the realize handshake (GET/SET_FEATURES, GET/SET_PROTOCOL_FEATURES,
GET_QUEUE_NUM, SET_OWNER), SET_MEM_TABLE, the ring messages
(NUM/ADDR/BASE/KICK/CALL/ERR/ENABLE, GET_VRING_BASE), GET/SET_CONFIG,
REPLY_ACK, LOG_SHMFD (SET_LOG_BASE; with LOG_ALL every guest-memory write,
buffers and used ring, is marked with atomic OR), INFLIGHT_SHMFD
(GET/SET_INFLIGHT_FD in the libvhost-user split layout), RESET_DEVICE,
STATUS and DEVICE_STATE (SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE). Requests
are served by the shared device-side split ring code and the in-process
blk model. The opaque state names its implementation id; a state of
another id is refused at CHECK_DEVICE_STATE (reason in :attr:`RefBlkServer.last_error`).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import logging
import mmap
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ..backends.inproc import BlkModel
from ..backends.vhost_user import protocol as vu
from ..errors import GuestMemoryError, ProtocolError, RingError, ShadowVmmError
from ..memory import DirtyLog, GuestMemory, MemoryRegion
from ..virtio.constants import Feature
from ..virtio.split import SplitDeviceQueue, SplitLayout

log = logging.getLogger(__name__)

FR = vu.FrontendRequest
PF = vu.ProtocolFeature

PROTOCOL_FEATURES = (PF.MQ | PF.LOG_SHMFD | PF.REPLY_ACK | PF.CONFIG | PF.INFLIGHT_SHMFD
                     | PF.RESET_DEVICE | PF.STATUS | PF.DEVICE_STATE)
STATE_VERSION = 1
INFLIGHT_ALIGN = 64
INFLIGHT_HEADER = struct.Struct("<QHHHH")    #: features, version, desc_num, last_batch_head, used_idx
INFLIGHT_DESC = struct.Struct("<B5xHQ")      #: inflight, pad, next, counter
_ANC = socket.CMSG_SPACE(32 * 4)
_DEVICE_STATE_NOFD = vu.DEVICE_STATE_NOFD


def inflight_queue_bytes(queue_size: int) -> int:
    """libvhost-user's per-queue split inflight region size."""
    raw = INFLIGHT_HEADER.size + INFLIGHT_DESC.size * queue_size
    return (raw + INFLIGHT_ALIGN - 1) // INFLIGHT_ALIGN * INFLIGHT_ALIGN


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
    queue: SplitDeviceQueue | None = None


@dataclass
class _Inflight:
    fd: int
    buf: mmap.mmap
    num_queues: int
    queue_size: int
    counter: int = 0

    def offset(self, queue: int) -> int:
        return queue * inflight_queue_bytes(self.queue_size)

    def init_queue(self, queue: int) -> None:
        off = self.offset(queue)
        if struct.unpack_from("<H", self.buf, off + 8)[0] == 0:
            INFLIGHT_HEADER.pack_into(self.buf, off, 0, 1, self.queue_size, 0, 0)

    def fetched(self, queue: int, head: int) -> None:
        self.counter += 1
        INFLIGHT_DESC.pack_into(self.buf, self.offset(queue) + INFLIGHT_HEADER.size + INFLIGHT_DESC.size * head,
                                1, 0, self.counter)

    def completed(self, queue: int, heads: list[int], used_idx: int) -> None:
        off = self.offset(queue)
        for head in heads:
            self.buf[off + INFLIGHT_HEADER.size + INFLIGHT_DESC.size * head] = 0
        struct.pack_into("<H", self.buf, off + 14, used_idx)

    def pending(self, queue: int) -> int:
        off = self.offset(queue) + INFLIGHT_HEADER.size
        return sum(self.buf[off + INFLIGHT_DESC.size * i] for i in range(self.queue_size))

    def close(self) -> None:
        self.buf.close()
        os.close(self.fd)


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


class RefBlkServer:
    """The back-end: a unix socket server serving one session at a time."""

    def __init__(self, path: str, *, implementation: str = "shadowvmm-refblk", queues: int = 2,
                 size: int = 16 << 20, image: str | None = None, serial: str = "refblk") -> None:
        self.path = path
        self.implementation = implementation
        self.queues = queues
        options: dict[str, Any] = {"queues": queues, "size": size, "serial": serial}
        if image:
            options["image"] = image
        self.model = BlkModel(options)
        self.requests = 0
        self.last_error = ""
        self.received: list[int] = []
        self.loaded_from: str | None = None
        self._listener: socket.socket | None = None
        self._session: _Session | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buf = bytearray()
        self._fds: list[int] = []
        self._queue: asyncio.Queue[tuple[vu.Header, bytes, list[int]]] = asyncio.Queue()
        self._worker: asyncio.Task | None = None

    # ------------------------------------------------------------------ server

    async def start(self) -> "RefBlkServer":
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

    async def __aenter__(self) -> "RefBlkServer":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _accept(self) -> None:
        assert self._listener is not None and self._loop is not None
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self._session is not None:
            sock.close()
            return
        sock.setblocking(False)
        self._session = _Session(sock)
        self._buf = bytearray()
        self._loop.add_reader(sock.fileno(), self._on_readable)

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
        for fd in self._fds:
            os.close(fd)
        self._fds = []

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
                self._fds.extend(fds)
        if not data:
            self._end_session()
            return
        self._buf += data
        while len(self._buf) >= vu.Header.STRUCT.size:
            header = vu.Header(*vu.Header.STRUCT.unpack_from(self._buf))
            end = vu.Header.STRUCT.size + header.size
            if len(self._buf) < end:
                break
            body = bytes(self._buf[vu.Header.STRUCT.size:end])
            del self._buf[:end]
            fds, self._fds = self._fds, []
            self._queue.put_nowait((header, body, fds))

    async def _work(self) -> None:
        while True:
            header, body, fds = await self._queue.get()
            session = self._session
            if session is None:
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
        data = vu.Header(request, vu.VERSION | vu.HeaderFlags.REPLY, len(payload)).pack() + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        s.sock.setblocking(True)
        try:
            sent = s.sock.sendmsg([data], anc)
            if sent < len(data):
                s.sock.sendall(data[sent:])
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
            self._ring(p.index).num = p.num
        elif request is FR.SET_VRING_BASE:
            self._ring(p.index).base = p.num
        elif request is FR.SET_VRING_ADDR:
            self._set_vring_addr(s, p)
        elif request is FR.GET_VRING_BASE:
            return vu.VringState(p.index, self._stop_ring(self._ring(p.index))).pack(), []
        elif request is FR.SET_VRING_KICK:
            self._set_kick(s, self._ring(p.index), -1 if p.nofd else fds[0])
        elif request is FR.SET_VRING_CALL:
            ring = self._ring(p.index)
            if ring.call >= 0:
                os.close(ring.call)
            ring.call = -1 if p.nofd else fds[0]
        elif request is FR.SET_VRING_ERR:
            for fd in fds:
                os.close(fd)
        elif request is FR.SET_VRING_ENABLE:
            self._ring(p.index).enabled = bool(p.num)
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

    def _ring(self, index: int) -> _Ring:
        if not 0 <= index < self.queues:
            raise ProtocolError(f"vring {index} out of range (0..{self.queues - 1})")
        s = self._session
        assert s is not None
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
        ring = self._ring(p.index)
        ring.desc, ring.avail, ring.used = self._gpa(s, p.desc), self._gpa(s, p.avail), self._gpa(s, p.used)
        ring.log = bool(p.flags & vu.VRING_F_LOG)

    def _set_kick(self, s: _Session, ring: _Ring, fd: int) -> None:
        self._unwatch(ring)
        if ring.kick >= 0:
            os.close(ring.kick)
        ring.kick = fd
        if s.memory is None or not ring.num or not ring.desc:
            raise ProtocolError(f"vring {ring.index} kicked before it was configured")
        layout = SplitLayout(ring.num, ring.desc, ring.avail, ring.used)
        ring.queue = SplitDeviceQueue(s.memory, layout, event_idx=bool(s.features & Feature.EVENT_IDX),
                                      indirect=bool(s.features & Feature.INDIRECT_DESC), last_avail_idx=ring.base)
        if s.inflight is not None and ring.index < s.inflight.num_queues:
            s.inflight.init_queue(ring.index)
        if not s.features & vu.F_PROTOCOL_FEATURES:
            ring.enabled = True
        if fd >= 0:
            assert self._loop is not None
            self._loop.add_reader(fd, self._on_kick, ring)
        self._process(ring)

    def _unwatch(self, ring: _Ring) -> None:
        if ring.kick >= 0 and self._loop is not None:
            self._loop.remove_reader(ring.kick)

    def _stop_ring(self, ring: _Ring) -> int:
        self._unwatch(ring)
        if ring.kick >= 0:
            os.close(ring.kick)
            ring.kick = -1
        if ring.queue is not None:
            ring.base = ring.queue.last_avail_idx
            ring.queue = None
        return ring.base

    def _reset_rings(self, s: _Session) -> None:
        for ring in s.rings.values():
            self._stop_ring(ring)
            if ring.call >= 0:
                os.close(ring.call)
        s.rings.clear()

    def _on_kick(self, ring: _Ring) -> None:
        try:
            os.eventfd_read(ring.kick)
        except (BlockingIOError, OSError):
            pass
        self._process(ring)

    def _process(self, ring: _Ring) -> None:
        s = self._session
        queue = ring.queue
        if s is None or queue is None or s.memory is None or not ring.enabled:
            return
        inflight = s.inflight if s.inflight is not None and ring.index < s.inflight.num_queues else None
        done: list[tuple[int, int]] = []
        try:
            while (chain := queue.pop()) is not None:
                if inflight is not None:
                    inflight.fetched(ring.index, chain.head)
                done.append((chain.head, self.model.handle(s.memory, chain)))
                self.requests += 1
        except (RingError, GuestMemoryError) as exc:
            log.error("refblk: vring %d broken: %s", ring.index, exc)
            self._unwatch(ring)
        if done:
            queue.push_batch(done)
            if inflight is not None:
                inflight.completed(ring.index, [head for head, _ in done], queue.used_idx)
            if queue.should_notify() and ring.call >= 0:
                os.eventfd_write(ring.call, 1)

    # ------------------------------------------------------------------ inflight

    def _get_inflight(self, s: _Session, p: vu.Inflight) -> tuple[bytes, list[int]]:
        size = inflight_queue_bytes(p.queue_size) * p.num_queues
        fd = os.memfd_create("refblk-inflight", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        if s.inflight is not None:
            s.inflight.close()
        s.inflight = _Inflight(os.dup(fd), mmap.mmap(fd, size, mmap.MAP_SHARED), p.num_queues, p.queue_size)
        return vu.Inflight(size, 0, p.num_queues, p.queue_size).pack(), [fd]

    def _set_inflight(self, s: _Session, p: vu.Inflight, fd: int) -> None:
        if s.inflight is not None:
            s.inflight.close()
        buf = mmap.mmap(fd, p.mmap_size, mmap.MAP_SHARED, offset=p.mmap_offset)
        s.inflight = _Inflight(fd, buf, p.num_queues, p.queue_size)

    def inflight_pending(self) -> int:
        s = self._session
        if s is None or s.inflight is None:
            return 0
        return sum(s.inflight.pending(q) for q in range(s.inflight.num_queues))

    # ------------------------------------------------------------------ device state

    def state_blob(self) -> bytes:
        return msgpack.packb({"implementation": self.implementation, "version": STATE_VERSION,
                              "writeback": self.model.writeback, "requests": self.requests,
                              "serial": self.model.serial}, use_bin_type=True)

    def load_blob(self, blob: bytes) -> None:
        data = msgpack.unpackb(blob, raw=False)
        theirs = data.get("implementation")
        if theirs != self.implementation:
            raise ValueError(f"state of implementation {theirs!r} cannot be loaded into {self.implementation!r}")
        if data.get("version", 0) > STATE_VERSION:
            raise ValueError(f"state version {data.get('version')} is newer than {STATE_VERSION}")
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
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            s.transfer_error = str(exc)
            self.last_error = str(exc)

    async def _check_transfer(self, s: _Session) -> int:
        if s.transfer is None:
            return 1
        await s.transfer
        s.transfer = None
        return 1 if s.transfer_error else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="shadowvmm reference vhost-user-blk back-end")
    parser.add_argument("socket")
    parser.add_argument("--image")
    parser.add_argument("--size", type=int, default=16 << 20)
    parser.add_argument("--queues", type=int, default=2)
    parser.add_argument("--implementation", default="shadowvmm-refblk")
    args = parser.parse_args(argv)

    async def serve() -> None:
        async with RefBlkServer(args.socket, implementation=args.implementation, queues=args.queues,
                                size=args.size, image=args.image):
            await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
