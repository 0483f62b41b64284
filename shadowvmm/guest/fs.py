"""virtio-fs guest driver model (virtio v1.4 §5.11), speaking FUSE (:mod:`.fuse`).

Queue 0 is the high-priority queue (FORGET goes there), queues 1.. are the
request queues (v1.4 §5.11.2). Every request is one device-readable buffer
(``fuse_in_header`` + args + names + payload) followed by one
device-writable buffer (``fuse_out_header`` + reply), except FORGET, which
has no reply (v1.4 §5.11.6.1). Each queue owns a pool of request slots
allocated once in guest memory, like :mod:`.blk`; :meth:`FsDriver.submit`
makes a batch available with one kick.

Nodes come from LOOKUP/CREATE/MKDIR, each of which takes a lookup
reference on the server; the path helpers (:meth:`FsDriver.read_file`,
:meth:`~FsDriver.write_file`, :meth:`~FsDriver.listdir`, ...) resolve paths
from the root node (nodeid 1) and FORGET what they looked up.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import ArgumentError, DeviceStateError, ProtocolError
from ..virtio.constants import Feature
from ..virtio.devcfg import FS_CONFIG_BASE_SIZE, FsConfig
from . import fspath, fuse
from .driver import GuestDevice, GuestQueue
from .fuse import (
    FUSE_ROOT_ID,
    AttrOut,
    CreateIn,
    CreateOut,
    Dirent,
    EntryOut,
    FlushIn,
    ForgetIn,
    FsyncIn,
    FuseError,
    GetattrIn,
    InitFlag,
    InitIn,
    InitOut,
    MkdirIn,
    Opcode,
    OpenIn,
    OpenOut,
    ReadIn,
    ReleaseIn,
    Rename2In,
    RenameIn,
    StatfsOut,
    Wire,
    WriteIn,
    WriteOut,
)

HIPRIO_QUEUE = 0
FIRST_REQUEST_QUEUE = 1

#: Transport features the model asks for. EVENT_IDX is left out by default: GuestQueue.reap does
#: not re-read used->idx after arming used_event, so a completion published in between would not
#: be signalled (Linux re-checks, virtqueue_enable_cb). Pass it in ``extra_features`` to use it.
WANTED = int(Feature.INDIRECT_DESC)

#: INIT flags the model asks for; it understands every one of them.
INIT_FLAGS = int(InitFlag.ASYNC_READ | InitFlag.BIG_WRITES | InitFlag.ATOMIC_O_TRUNC
                 | InitFlag.MAX_PAGES | InitFlag.PARALLEL_DIROPS)

#: Request bytes reserved before the payload: header + largest args (InitIn) + two names.
REQUEST_HEADROOM = fuse.InHeader.SIZE + InitIn.SIZE + 2 * (fuse.FUSE_NAME_MAX + 1)
#: Largest fixed-size reply body (CREATE's).
MAX_FIXED_REPLY = max(spec.reply.SIZE for spec in fuse.OPS.values() if spec.reply is not None)


@dataclass
class Slot:
    """One request's guest memory: a device-readable and a device-writable area."""

    request: int
    reply: int


@dataclass(frozen=True)
class FuseRequest:
    """One request for :meth:`FsDriver.submit`; *data_size* is the room for READ/READDIR data."""

    opcode: Opcode
    nodeid: int = 0
    args: Wire | None = None
    names: tuple[bytes, ...] = ()
    payload: bytes = b""
    data_size: int = 0
    what: str = ""


def _name(name: str | bytes) -> bytes:
    return fuse.check_name(os.fsencode(name))


class FsDriver:
    """virtio-fs on a :class:`GuestDevice`."""

    def __init__(self, device: GuestDevice, *, max_payload: int = 128 << 10, slots_per_queue: int = 16,
                 hiprio_slots: int = 16, request_timeout: float | None = 30.0, uid: int | None = None,
                 gid: int | None = None, pid: int | None = None) -> None:
        if max_payload < fuse.FUSE_MIN_READ_BUFFER:
            raise ArgumentError(f"max_payload must be at least {fuse.FUSE_MIN_READ_BUFFER}")
        self.dev = device
        self.max_payload = max_payload
        self.slots_per_queue = slots_per_queue
        self.hiprio_slots = hiprio_slots
        self.request_timeout = request_timeout
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.pid = os.getpid() if pid is None else pid
        self.config: FsConfig | None = None
        self.init: InitOut | None = None
        self.minor = 0
        self.max_write = 0
        self._unique = 0
        self._slots: dict[int, list[Slot]] = {}
        self._capacity: dict[int, int] = {}     #: slots allocated per queue
        self._request_queues: list[int] = []
        self._next_queue = 0
        self._freed = asyncio.Event()   #: set whenever slots go back to a queue's pool

    # ------------------------------------------------------------------ setup

    async def start(self, *, queue_size: int = 128, request_queues: int | None = None,
                    extra_features: int = 0, max_readahead: int = 128 << 10,
                    init_flags: int = INIT_FLAGS) -> InitOut:
        """Initialise the device, set up hiprio + request queues and send FUSE_INIT."""
        await self.dev.initialize(WANTED | extra_features, queue_size=queue_size,
                                  num_queues=self.queue_count(request_queues))
        return await self.attach(max_readahead=max_readahead, init_flags=init_flags)

    def queue_count(self, request_queues: int | None = None) -> int:
        """hiprio and the request queues a driver sets up (v1.4 §5.11.2): *request_queues*, at
        most what the config and the transport offer."""
        transport = self.dev.transport
        config = self.read_config()
        available = transport.num_queues() - FIRST_REQUEST_QUEUE
        wanted = config.num_request_queues if request_queues is None else request_queues
        count = min(wanted, config.num_request_queues, available)
        if count < 1:
            raise DeviceStateError(f"virtio-fs device has no request queue ({transport.num_queues()} queues)")
        return FIRST_REQUEST_QUEUE + count

    async def attach(self, *, max_readahead: int = 128 << 10, init_flags: int = INIT_FLAGS) -> InitOut:
        """Take the device as its core initialised it (:meth:`start`, or a driver that finished,
        on a migration destination, an initialisation begun before: scenario 2.3): slots for
        hiprio and each request queue set up, then FUSE_INIT (v1.4 §5.11.6)."""
        queues = self.dev.queues
        if len(queues) <= FIRST_REQUEST_QUEUE:
            raise DeviceStateError(f"virtio-fs: {len(queues)} queue(s) set up, no request queue")
        self.config = self.read_config()
        self._slots = {HIPRIO_QUEUE: [self._alloc_slot(fuse.InHeader.SIZE + ForgetIn.SIZE, 0)
                                      for _ in range(min(self.hiprio_slots, queues[HIPRIO_QUEUE].size))]}
        self._request_queues = [q.index for q in queues[FIRST_REQUEST_QUEUE:]]
        for index in self._request_queues:
            size = queues[index].size
            self._slots[index] = [self._alloc_slot(REQUEST_HEADROOM + self.max_payload,
                                                   fuse.OutHeader.SIZE + max(self.max_payload, MAX_FIXED_REPLY))
                                  for _ in range(min(size, self.slots_per_queue))]
        self._capacity = {index: len(slots) for index, slots in self._slots.items()}
        return await self._fuse_init(max_readahead, init_flags)

    async def remount(self, *, max_readahead: int = 128 << 10, init_flags: int = INIT_FLAGS) -> InitOut:
        """A new FUSE session on the same queues, as a guest mounting the file system again
        (Linux virtio_fs keeps its virtqueues across mounts): FUSE_INIT, no device reset."""
        if not self._request_queues:
            raise DeviceStateError("virtio-fs: remount before start")
        return await self._fuse_init(max_readahead, init_flags)

    def _alloc_slot(self, request_bytes: int, reply_bytes: int) -> Slot:
        alloc = self.dev.alloc
        return Slot(alloc.alloc(request_bytes, 64), alloc.alloc(reply_bytes, 64) if reply_bytes else 0)

    def read_config(self) -> FsConfig:
        """``virtio_fs_config`` (v1.4 §5.11.4); notify_buf_size only with VIRTIO_FS_F_NOTIFICATION."""
        try:
            return FsConfig.unpack(self.dev.read_config(0, FS_CONFIG_BASE_SIZE))
        except ValueError as exc:
            raise DeviceStateError(f"bad virtio-fs config space: {exc}") from exc

    async def _fuse_init(self, max_readahead: int, flags: int) -> InitOut:
        low, high = flags & 0xFFFFFFFF, flags >> 32
        if high:
            low |= InitFlag.INIT_EXT
        body = await self.call(FuseRequest(Opcode.INIT, 0, InitIn(max_readahead=max_readahead, flags=low,
                                                                   flags2=high)))
        reply = InitOut.unpack(body.ljust(InitOut.SIZE, b"\0"))
        if reply.major != fuse.FUSE_KERNEL_VERSION:
            raise ProtocolError(f"FUSE_INIT: device speaks major {reply.major}, not {fuse.FUSE_KERNEL_VERSION}")
        self.minor = min(reply.minor, fuse.FUSE_KERNEL_MINOR_VERSION)
        if self.minor < fuse.FUSE_MIN_MINOR_VERSION:
            raise ProtocolError(f"FUSE_INIT: device speaks 7.{reply.minor}, "
                                f"virtio-fs needs 7.{fuse.FUSE_MIN_MINOR_VERSION}")
        self.init = reply
        self.max_write = min(reply.max_write or 4096, self.max_payload)
        return reply

    # ------------------------------------------------------------------ requests

    def _next_unique(self) -> int:
        self._unique += 1
        return self._unique

    def _pick_queue(self, request: FuseRequest) -> int:
        if request.opcode is Opcode.FORGET:
            return HIPRIO_QUEUE
        if not self._request_queues:
            raise DeviceStateError("virtio-fs driver is not started")
        return self._request_queues[self._next_queue % len(self._request_queues)]

    def _encode(self, request: FuseRequest) -> tuple[bytes, int, int]:
        """(request bytes, reply room, unique), validated before anything touches a ring."""
        if len(request.payload) > self.max_payload or request.data_size > self.max_payload:
            raise ArgumentError(f"{request.opcode.name}: more than {self.max_payload} bytes of data")
        unique = self._next_unique()
        raw = fuse.encode_request(request.opcode, unique, request.nodeid, request.args, request.names,
                                  request.payload, uid=self.uid, gid=self.gid, pid=self.pid)
        return raw, fuse.reply_room(request.opcode, request.data_size), unique

    def _add(self, queue: GuestQueue, raw: bytes, room: int) -> tuple[asyncio.Future, Slot]:
        slot = self._slots[queue.index].pop()
        memory = self.dev.memory
        memory.write(slot.request, raw)
        inp = [(slot.reply, room)] if room else []
        if room:
            memory.write(slot.reply, bytes(fuse.OutHeader.SIZE))
        return queue.add([(slot.request, len(raw))], inp), slot

    async def submit(self, requests: Sequence[FuseRequest]) -> list[bytes | FuseError]:
        """Submit a batch with one kick per queue; each result is the reply body or its FuseError.

        FORGET goes to the hiprio queue and yields ``b""``; the rest share one request queue
        (queues rotate between batches). A batch waits for free slots while other callers'
        requests hold them (a full virtqueue makes a driver wait, v1.4 §2.7.13); one larger than
        a queue's slots is refused.
        """
        groups: dict[int, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(self._pick_queue(request), []).append(i)
        self._next_queue += 1
        await self._room(groups)
        encoded = [self._encode(request) for request in requests]
        pending: list[tuple[int, GuestQueue, asyncio.Future, Slot]] = []
        try:
            for index, members in groups.items():
                queue = self.dev.queues[index]
                for i in members:
                    raw, room, _ = encoded[i]
                    future, slot = self._add(queue, raw, room)
                    pending.append((i, queue, future, slot))
            for index in groups:
                self.dev.queues[index].kick()
            everything = asyncio.gather(*(future for _, _, future, _ in pending))
            try:
                await asyncio.wait_for(asyncio.shield(everything), self.request_timeout)
            except TimeoutError:
                everything.add_done_callback(lambda f: f.cancelled() or f.exception())
                raise DeviceStateError(f"virtio-fs: {len(pending)} request(s) unanswered after "
                                       f"{self.request_timeout:g} s") from None
            results: list[bytes | FuseError] = [b""] * len(requests)
            memory = self.dev.memory
            for i, _, future, slot in pending:
                request = requests[i]
                _, room, unique = encoded[i]
                if not room:
                    continue
                data = memory.read(slot.reply, min(future.result(), room))
                try:
                    results[i] = fuse.decode_reply(data, unique, request.opcode, request.what)
                except FuseError as exc:
                    results[i] = exc
            return results
        finally:
            for _, queue, future, slot in pending:
                if future.done():
                    self._slots[queue.index].append(slot)
            if pending:
                self._freed.set()

    def _fits(self, groups: Mapping[int, Sequence[int]]) -> bool:
        return all(len(members) <= min(len(self._slots[index]), self.dev.queues[index].num_free // 2)
                   for index, members in groups.items())

    async def _room(self, groups: Mapping[int, Sequence[int]]) -> None:
        """Wait until every queue of the batch has free slots for its share (at most
        :attr:`request_timeout`); a share larger than the queue's slots is refused at once."""
        for index, members in groups.items():
            capacity = min(self._capacity.get(index, 0), self.dev.queues[index].size // 2)
            if len(members) > capacity:
                raise DeviceStateError(f"queue {index}: a batch of {len(members)} requests; the queue "
                                       f"holds {capacity}")
        if self._fits(groups):
            return
        try:
            async with asyncio.timeout(self.request_timeout):
                while not self._fits(groups):
                    self._freed.clear()
                    await self._freed.wait()
        except TimeoutError:
            raise DeviceStateError(f"virtio-fs: no free slots within {self.request_timeout:g} s "
                                   "(requests of other callers still unanswered)") from None

    async def call(self, request: FuseRequest) -> bytes:
        """One request; its reply body, or raise :class:`FuseError`."""
        (result,) = await self.submit([request])
        if isinstance(result, FuseError):
            raise result
        return result

    @staticmethod
    def _checked(results: Sequence[bytes | FuseError]) -> list[bytes]:
        for result in results:
            if isinstance(result, FuseError):
                raise result
        return list(results)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ FUSE operations

    async def lookup(self, parent: int, name: str | bytes) -> EntryOut:
        """LOOKUP: takes one lookup reference on the node (release it with :meth:`forget`)."""
        body = await self.call(FuseRequest(Opcode.LOOKUP, parent, names=(_name(name),), what=repr(name)))
        return EntryOut.unpack(body)

    async def forget(self, nodes: Iterable[tuple[int, int]]) -> None:
        """FORGET ``(nodeid, nlookup)`` pairs on the hiprio queue, batched, one kick."""
        todo = [FuseRequest(Opcode.FORGET, nodeid, ForgetIn(count)) for nodeid, count in nodes
                if nodeid != FUSE_ROOT_ID and count]
        batch = len(self._slots[HIPRIO_QUEUE]) or 1
        for start in range(0, len(todo), batch):
            await self.submit(todo[start:start + batch])

    async def getattr(self, nodeid: int, fh: int | None = None) -> AttrOut:
        args = GetattrIn(fuse.GETATTR_FH, fh) if fh is not None else GetattrIn()
        return AttrOut.unpack(await self.call(FuseRequest(Opcode.GETATTR, nodeid, args)))

    async def statfs(self, nodeid: int = FUSE_ROOT_ID) -> StatfsOut:
        return StatfsOut.unpack(await self.call(FuseRequest(Opcode.STATFS, nodeid)))

    async def open(self, nodeid: int, flags: int = os.O_RDONLY) -> OpenOut:
        """OPEN an existing node. O_CREAT/O_EXCL/O_NOCTTY are dropped as the kernel drops them
        (virtiofsd 7.2 aborts on an O_CREAT open without a mode); O_TRUNC is passed, which
        servers granting FUSE_ATOMIC_O_TRUNC honour."""
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY)
        return OpenOut.unpack(await self.call(FuseRequest(Opcode.OPEN, nodeid, OpenIn(flags))))

    async def opendir(self, nodeid: int, flags: int = os.O_RDONLY | os.O_DIRECTORY) -> OpenOut:
        return OpenOut.unpack(await self.call(FuseRequest(Opcode.OPENDIR, nodeid, OpenIn(flags))))

    async def create(self, parent: int, name: str | bytes, mode: int = 0o644,
                     flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC, umask: int = 0) -> CreateOut:
        """CREATE (open with O_CREAT); the reply holds the new entry and its open file handle.

        Like the kernel, send it for names that LOOKUP did not find: virtiofsd 7.2 answers
        CREATE of an existing name without O_EXCL by re-opening it with O_CREAT and aborts.
        """
        args = CreateIn(flags | os.O_CREAT, stat.S_IFREG | (mode & 0o7777), umask)
        body = await self.call(FuseRequest(Opcode.CREATE, parent, args, (_name(name),), what=repr(name)))
        return CreateOut.unpack(body)

    async def mkdir(self, parent: int, name: str | bytes, mode: int = 0o755, umask: int = 0) -> EntryOut:
        body = await self.call(FuseRequest(Opcode.MKDIR, parent, MkdirIn(mode & 0o7777, umask), (_name(name),),
                                           what=repr(name)))
        return EntryOut.unpack(body)

    async def read(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        """READ up to *size* bytes (at most ``max_payload``); short at end of file."""
        return await self.call(FuseRequest(Opcode.READ, nodeid, ReadIn(fh, offset, size), data_size=size))

    async def write(self, nodeid: int, fh: int, offset: int, data: bytes) -> int:
        """WRITE (at most ``max_write`` bytes); returns what the device wrote."""
        if len(data) > self.max_write:
            raise ArgumentError(f"WRITE of {len(data)} bytes exceeds max_write {self.max_write}")
        body = await self.call(FuseRequest(Opcode.WRITE, nodeid, WriteIn(fh, offset, len(data)), payload=data))
        return WriteOut.unpack(body).size

    async def readdir(self, nodeid: int, fh: int, offset: int = 0, size: int | None = None) -> list[Dirent]:
        """One READDIR: the entries after *offset* that fit in *size* bytes (empty at the end)."""
        size = min(self.max_payload, 16 << 10) if size is None else size
        body = await self.call(FuseRequest(Opcode.READDIR, nodeid, ReadIn(fh, offset, size), data_size=size))
        return fuse.parse_dirents(body)

    async def release(self, nodeid: int, fh: int, flags: int = 0, flush: bool = False) -> None:
        args = ReleaseIn(fh, flags, fuse.RELEASE_FLUSH if flush else 0)
        await self.call(FuseRequest(Opcode.RELEASE, nodeid, args))

    async def releasedir(self, nodeid: int, fh: int) -> None:
        await self.call(FuseRequest(Opcode.RELEASEDIR, nodeid, ReleaseIn(fh, os.O_RDONLY | os.O_DIRECTORY)))

    async def flush(self, nodeid: int, fh: int, lock_owner: int = 0) -> None:
        await self.call(FuseRequest(Opcode.FLUSH, nodeid, FlushIn(fh, lock_owner)))

    async def fsync(self, nodeid: int, fh: int, datasync: bool = False) -> None:
        args = FsyncIn(fh, fuse.FSYNC_FDATASYNC if datasync else 0)
        await self.call(FuseRequest(Opcode.FSYNC, nodeid, args))

    async def unlink(self, parent: int, name: str | bytes) -> None:
        """UNLINK; virtiofsd wants the node looked up (held) first, see :meth:`remove`."""
        await self.call(FuseRequest(Opcode.UNLINK, parent, names=(_name(name),), what=repr(name)))

    async def rmdir(self, parent: int, name: str | bytes) -> None:
        await self.call(FuseRequest(Opcode.RMDIR, parent, names=(_name(name),), what=repr(name)))

    async def rename(self, parent: int, name: str | bytes, newparent: int, newname: str | bytes,
                     flags: int = 0) -> None:
        """RENAME, or RENAME2 when renameat2 *flags* (``fuse.RENAME_*``) are given."""
        names = (_name(name), _name(newname))
        what = f"{name!r} -> {newname!r}"
        if flags:
            request = FuseRequest(Opcode.RENAME2, parent, Rename2In(newparent, flags), names, what=what)
        else:
            request = FuseRequest(Opcode.RENAME, parent, RenameIn(newparent), names, what=what)
        await self.call(request)

    async def destroy(self) -> None:
        """DESTROY: the session ends; only a reset and a new INIT make the device usable again."""
        await self.call(FuseRequest(Opcode.DESTROY))
        self.init = None

    # ------------------------------------------------------------------ batches

    async def read_all(self, nodeid: int, fh: int, offset: int = 0, length: int | None = None) -> bytes:
        """Read from *offset* to end of file (or *length* bytes), one batch of READs per kick."""
        chunk = self.max_payload
        batch = max(1, len(self._slots[self._request_queues[0]]))
        out = bytearray()
        pos = offset
        while length is None or len(out) < length:
            sizes: list[int] = []
            for _ in range(batch):
                want = chunk if length is None else min(chunk, length - len(out) - sum(sizes))
                if want <= 0:
                    break
                sizes.append(want)
            requests = []
            at = pos
            for size in sizes:
                requests.append(FuseRequest(Opcode.READ, nodeid, ReadIn(fh, at, size), data_size=size))
                at += size
            bodies = self._checked(await self.submit(requests))
            for size, body in zip(sizes, bodies):
                out += body
                pos += len(body)
                if len(body) < size:
                    return bytes(out)
            if not sizes:
                break
        return bytes(out)

    async def write_all(self, nodeid: int, fh: int, data: bytes, offset: int = 0) -> int:
        """Write *data* at *offset* in ``max_write`` chunks, one batch of WRITEs per kick."""
        chunk = self.max_write
        batch = max(1, len(self._slots[self._request_queues[0]]))
        done = 0
        while done < len(data):
            pieces = [(offset + done + i * chunk, data[done + i * chunk:done + (i + 1) * chunk])
                      for i in range(batch) if done + i * chunk < len(data)]
            requests = [FuseRequest(Opcode.WRITE, nodeid, WriteIn(fh, at, len(piece)), payload=piece)
                        for at, piece in pieces]
            bodies = self._checked(await self.submit(requests))
            for (_, piece), body in zip(pieces, bodies):
                written = WriteOut.unpack(body).size
                done += written
                if written < len(piece):
                    return done
        return done

    async def readdir_all(self, nodeid: int) -> list[Dirent]:
        """OPENDIR, READDIR until an empty reply, RELEASEDIR."""
        handle = await self.opendir(nodeid)
        entries: list[Dirent] = []
        try:
            offset = 0
            while batch := await self.readdir(nodeid, handle.fh, offset):
                entries += batch
                offset = batch[-1].off
        finally:
            await self.releasedir(nodeid, handle.fh)
        return entries

    # ------------------------------------------------------------------ paths (:mod:`.fspath`)

    async def stat(self, path: str | bytes) -> fuse.Attr:
        return await fspath.stat(self, path)

    async def read_file(self, path: str | bytes) -> bytes:
        """The whole content of the file at *path*."""
        return await fspath.read_file(self, path)

    async def write_file(self, path: str | bytes, data: bytes, mode: int = 0o644) -> None:
        """Truncate (OPEN O_TRUNC) or CREATE the file at *path*, write *data*, FLUSH, RELEASE."""
        await fspath.write_file(self, path, data, mode)

    async def listdir(self, path: str | bytes = "/") -> list[str]:
        """Names in the directory at *path*, without ``.`` and ``..``, in device order."""
        return await fspath.listdir(self, path)

    async def makedirs(self, path: str | bytes, mode: int = 0o755) -> None:
        """``mkdir -p``."""
        await fspath.makedirs(self, path, mode)

    async def mkdir_path(self, path: str | bytes, mode: int = 0o755) -> None:
        await fspath.mkdir_path(self, path, mode)

    async def remove(self, path: str | bytes) -> None:
        """UNLINK the file at *path*."""
        await fspath.remove(self, path)

    async def rmdir_path(self, path: str | bytes) -> None:
        await fspath.rmdir_path(self, path)

    async def rename_path(self, old: str | bytes, new: str | bytes, flags: int = 0) -> None:
        """RENAME (RENAME2 with *flags*) *old* to *new*; both are paths from the root."""
        await fspath.rename_path(self, old, new, flags)

    # ------------------------------------------------------------------ teardown

    async def close(self) -> None:
        """DESTROY (if the session is up), reset the device and stop taking interrupts."""
        try:
            if self.init is not None:
                await self.destroy()
            await self.dev.reset()
        finally:
            self.dev.close()
