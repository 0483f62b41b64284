"""The reference back-end's server: the unix socket, one session at a time, the message
handlers (a dispatch table) and the opaque device state.

The opaque state names its implementation id; a state of another id is
refused at CHECK_DEVICE_STATE (reason in :attr:`RefBlkServer.last_error`).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

import msgpack

from shadowvmm.errors import IncompatibleStateError, ProtocolError, ShadowVmmError
from shadowvmm.virtio.constants import Feature

from .. import protocol as vu
from .rings import BlkRings, Session

log = logging.getLogger(__name__)

FR = vu.FrontendRequest
PF = vu.ProtocolFeature

PROTOCOL_FEATURES = (PF.MQ | PF.LOG_SHMFD | PF.REPLY_ACK | PF.CONFIG | PF.INFLIGHT_SHMFD
                     | PF.RESET_DEVICE | PF.STATUS | PF.DEVICE_STATE)
STATE_VERSION = 1
_ANC = socket.CMSG_SPACE(32 * 4)
_DEVICE_STATE_NOFD = vu.DEVICE_STATE_NOFD


#: What a handler answers: reply payload bytes and fds to send (the server closes them), or
#: None (no reply body; an ack if the front-end asked for one).
Answer = tuple[bytes, list[int]] | None


class RefBlkServer(BlkRings):
    """The back-end: a unix socket server serving one session at a time."""

    def __init__(self, path: str, *, implementation: str = "shadowvmm-refblk", queues: int = 2,
                 size: int = 16 << 20, image: str | None = None, serial: str = "refblk",
                 latency_us: int = 0, latency_data_only: bool = False) -> None:
        super().__init__(queues=queues, size=size, image=image, serial=serial, latency_us=latency_us,
                         latency_data_only=latency_data_only)
        self.path = path
        self.implementation = implementation
        self.sessions = 0
        self.last_error = ""
        self.received: list[int] = []
        self.loaded_from: str | None = None
        self._listener: socket.socket | None = None
        self._queue: asyncio.Queue[tuple[Session, vu.Header, bytes, list[int]]] = asyncio.Queue()
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
        self._session = Session(sock)
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
        """Read one message: exactly its header, then exactly its body, so the fds that came
        with it ("fds ride with the first byte of the header") are never given to another
        message sent right before or after it (a front-end that pipelines)."""
        s = self._session
        if s is None:
            return
        hsize = vu.Header.STRUCT.size
        want = hsize - len(s.buf) if len(s.buf) < hsize else \
            hsize + vu.Header.STRUCT.unpack_from(s.buf)[2] - len(s.buf)
        try:
            data, anc, _, _ = s.sock.recvmsg(max(want, 1), _ANC, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError:
            data, anc = b"", []
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                items = array.array("i")
                items.frombytes(blob[:len(blob) - len(blob) % items.itemsize])
                s.fds.extend(items)
        if not data:
            self._end_session()
            return
        s.buf += data
        if len(s.buf) < hsize:
            return
        header = vu.Header(*vu.Header.STRUCT.unpack_from(s.buf))
        if len(s.buf) < hsize + header.size:
            return
        body = bytes(s.buf[hsize:])
        s.buf.clear()
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

    def _reply(self, s: Session, request: int, payload: bytes, fds: list[int] | None = None) -> None:
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

    async def _handle(self, s: Session, header: vu.Header, body: bytes, fds: list[int]) -> None:
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

    async def _dispatch(self, s: Session, request: FR, p: Any, fds: list[int]) -> Answer:
        handler = HANDLERS.get(request)
        if handler is None:
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"{request.name} is not implemented by the reference back-end")
        answer = handler(self, s, p, fds)
        return await answer if isinstance(answer, Awaitable) else answer

    # ------------------------------------------------------------------ handlers (HANDLERS)

    def _u64(self, value: int) -> Answer:
        return vu.U64(value).pack(), []

    def _on_get_features(self, s: Session, p: None, fds: list[int]) -> Answer:
        return self._u64(self.features())

    def _on_set_features(self, s: Session, p: vu.U64, fds: list[int]) -> Answer:
        s.features = p.value
        self._update_logging(s)
        return None

    def _on_set_protocol_features(self, s: Session, p: vu.U64, fds: list[int]) -> Answer:
        s.protocol = p.value
        return None

    def _on_owner(self, s: Session, p: None, fds: list[int]) -> Answer:
        return None

    def _on_set_mem_table(self, s: Session, p: vu.MemoryTable, fds: list[int]) -> Answer:
        self._set_mem_table(s, p.regions, fds)
        return None

    def _on_set_log_base(self, s: Session, p: vu.Log, fds: list[int]) -> Answer:
        self._set_log_base(s, p, fds[0])
        return self._u64(0)

    def _on_set_vring_num(self, s: Session, p: vu.VringState, fds: list[int]) -> Answer:
        self._ring(s, p.index).num = p.num
        return None

    def _on_set_vring_base(self, s: Session, p: vu.VringState, fds: list[int]) -> Answer:
        self._ring(s, p.index).base = p.num
        return None

    def _on_set_vring_addr(self, s: Session, p: vu.VringAddr, fds: list[int]) -> Answer:
        self._set_vring_addr(s, p)
        return None

    async def _on_get_vring_base(self, s: Session, p: vu.VringState, fds: list[int]) -> Answer:
        return vu.VringState(p.index, await self._stop_ring(self._ring(s, p.index))).pack(), []

    def _on_set_vring_kick(self, s: Session, p: vu.VringFile, fds: list[int]) -> Answer:
        self._set_kick(s, self._ring(s, p.index), -1 if p.nofd else fds[0])
        return None

    def _on_set_vring_call(self, s: Session, p: vu.VringFile, fds: list[int]) -> Answer:
        ring = self._ring(s, p.index)
        if ring.call >= 0:
            os.close(ring.call)
        ring.call = -1 if p.nofd else fds[0]
        return None

    def _on_set_vring_err(self, s: Session, p: vu.VringFile, fds: list[int]) -> Answer:
        for fd in fds:
            os.close(fd)
        return None

    def _on_set_vring_enable(self, s: Session, p: vu.VringState, fds: list[int]) -> Answer:
        self._set_enable(s, self._ring(s, p.index), bool(p.num))
        return None

    def _on_get_config(self, s: Session, p: vu.Config, fds: list[int]) -> Answer:
        """A read past the config space is refused with a zero-size reply, as libvhost-user's
        blk server does (the front-end then asks for less)."""
        config = self.model.config()
        if p.offset + p.size > len(config):
            return b"", []
        return vu.Config(p.offset, p.size, 0, config[p.offset:p.offset + p.size]).pack(), []

    def _on_set_config(self, s: Session, p: vu.Config, fds: list[int]) -> Answer:
        self.model.set_config(p.offset, p.payload)
        return None

    def _on_get_inflight_fd(self, s: Session, p: vu.Inflight, fds: list[int]) -> Answer:
        return self._get_inflight(s, p)

    def _on_set_inflight_fd(self, s: Session, p: vu.Inflight, fds: list[int]) -> Answer:
        self._set_inflight(s, p, fds[0])
        return None

    def _on_reset_device(self, s: Session, p: None, fds: list[int]) -> Answer:
        self._reset_rings(s)
        s.features = s.status = 0
        self._update_logging(s)
        return None

    def _on_set_status(self, s: Session, p: vu.U64, fds: list[int]) -> Answer:
        s.status = p.value
        return None

    def _on_set_device_state_fd(self, s: Session, p: vu.DeviceStateTransfer, fds: list[int]) -> Answer:
        return vu.DeviceStateResult(self._start_transfer(s, p, fds[0])).pack(), []

    async def _on_check_device_state(self, s: Session, p: None, fds: list[int]) -> Answer:
        return self._u64(await self._check_transfer(s))

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

    def _start_transfer(self, s: Session, p: vu.DeviceStateTransfer, fd: int) -> int:
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

    async def _save(self, s: Session, fd: int) -> None:
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

    async def _load(self, s: Session, fd: int) -> None:
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

    async def _check_transfer(self, s: Session) -> int:
        if s.transfer is None:
            return 1
        await s.transfer
        s.transfer = None
        return 1 if s.transfer_error else 0


Handler = Callable[[RefBlkServer, Session, Any, list[int]], Answer | Awaitable[Answer]]

#: The front-end requests the reference back-end implements; any other is refused.
HANDLERS: Mapping[FR, Handler] = MappingProxyType({
    FR.GET_FEATURES: RefBlkServer._on_get_features,
    FR.SET_FEATURES: RefBlkServer._on_set_features,
    FR.GET_PROTOCOL_FEATURES: lambda server, s, p, fds: server._u64(int(PROTOCOL_FEATURES)),
    FR.SET_PROTOCOL_FEATURES: RefBlkServer._on_set_protocol_features,
    FR.GET_QUEUE_NUM: lambda server, s, p, fds: server._u64(server.queues),
    FR.SET_OWNER: RefBlkServer._on_owner,
    FR.RESET_OWNER: RefBlkServer._on_owner,
    FR.SET_MEM_TABLE: RefBlkServer._on_set_mem_table,
    FR.SET_LOG_BASE: RefBlkServer._on_set_log_base,
    FR.SET_VRING_NUM: RefBlkServer._on_set_vring_num,
    FR.SET_VRING_BASE: RefBlkServer._on_set_vring_base,
    FR.SET_VRING_ADDR: RefBlkServer._on_set_vring_addr,
    FR.GET_VRING_BASE: RefBlkServer._on_get_vring_base,
    FR.SET_VRING_KICK: RefBlkServer._on_set_vring_kick,
    FR.SET_VRING_CALL: RefBlkServer._on_set_vring_call,
    FR.SET_VRING_ERR: RefBlkServer._on_set_vring_err,
    FR.SET_VRING_ENABLE: RefBlkServer._on_set_vring_enable,
    FR.GET_CONFIG: RefBlkServer._on_get_config,
    FR.SET_CONFIG: RefBlkServer._on_set_config,
    FR.GET_INFLIGHT_FD: RefBlkServer._on_get_inflight_fd,
    FR.SET_INFLIGHT_FD: RefBlkServer._on_set_inflight_fd,
    FR.RESET_DEVICE: RefBlkServer._on_reset_device,
    FR.SET_STATUS: RefBlkServer._on_set_status,
    FR.GET_STATUS: lambda server, s, p, fds: server._u64(s.status),
    FR.SET_DEVICE_STATE_FD: RefBlkServer._on_set_device_state_fd,
    FR.CHECK_DEVICE_STATE: RefBlkServer._on_check_device_state,
})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shadowvmm_vhost_user.refbackend",
                                     description="shadowvmm reference vhost-user-blk back-end "
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
