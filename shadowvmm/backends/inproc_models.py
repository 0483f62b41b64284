"""Device models of the in-process backend (:mod:`.inproc`): virtio-blk and virtio-rng.

A model serves one request at a time from guest memory (:meth:`DeviceModel.handle`);
the backend owns the rings, kicks and interrupts. A guest sizes its buffers as it
likes: each request is checked against the model's limits before any data moves
(:data:`BLK_MAX_TRANSFER` and seg_max, :data:`RNG_REQUEST_MAX`), and blk data is
streamed between the disk and guest memory, never copied whole.
"""

from __future__ import annotations

import logging
import mmap
import operator
import os
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError
from ..memory import GuestMemory, MemoryRegion
from ..options import MAX_QUEUES, Option, OptionSchema
from ..virtio.constants import BLK_ID_BYTES, BLK_SECTOR_SIZE, BlkFeature, BlkRequestType, BlkStatus, DeviceId
from ..virtio.split import DescChain

BLK_REQ_HEADER = struct.Struct("<IIQ")   #: virtio_blk_req header (v1.4 §5.2.6)
_LENGTH = operator.itemgetter(1)         #: of a ``(gpa, length)`` buffer
BLK_CONFIG = struct.Struct("<QIIHBBIBBHIBBH")  #: virtio_blk_config up to num_queues (v1.4 §5.2.4)
BLK_CONFIG_SIZE = 60
#: Data bytes one virtio-blk read or write may carry. With seg_max 126 and no size_max
#: advertised this is what bounds a request; Linux's default max_sectors_kb (1280 KiB to
#: 4 MiB) stays far below it. Larger requests complete with IOERR.
BLK_MAX_TRANSFER = 32 << 20
#: Entropy one virtio-rng request gets at most, whatever its buffers' size: the device may
#: use less than the whole buffer (v1.4 §5.4.6.2) and says how much in the used length.
RNG_REQUEST_MAX = 64 << 10

log = logging.getLogger(__name__)


class DeviceModel(Protocol):
    """One device's request handling behind :class:`~.inproc.InProcBackend`."""

    device_id: DeviceId
    #: Request queues the model serves.
    queues: int

    def features(self) -> int: ...

    def config(self) -> bytes: ...

    def set_config(self, offset: int, data: bytes) -> None: ...

    def handle(self, memory: GuestMemory, chain: DescChain) -> int:
        """Carry out one request; returns bytes written into the chain.

        A model may defer its data transfers to the completion of a delayed request: its
        ``handle`` then takes a keyword ``later`` (a list; the backend passes it only with
        ``latency_us``), appends what each transfer needs instead of moving the data, and its
        ``finish(memory, later)`` carries them out in order when the latency has passed. The
        request is checked, and its outcome and byte count fixed, at ``handle``; the guest
        sees nothing before the buffer is used either way (:class:`BlkModel` does this)."""

    def state(self) -> dict: ...

    def load(self, state: dict) -> None: ...

    def close(self) -> None: ...


class RngModel:
    """virtio-rng (v1.4 §5.4): entropy into the writable buffers, up to a per-request cap."""

    device_id = DeviceId.RNG
    #: No options of its own (``device`` and ``latency_us`` are :class:`~.inproc.InProcBackend`'s).
    OPTIONS = OptionSchema()

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.OPTIONS.validate(options)
        self.queues = 1

    def features(self) -> int:
        return 0

    def config(self) -> bytes:
        return b""

    def set_config(self, offset: int, data: bytes) -> None:
        pass

    def handle(self, memory: GuestMemory, chain: DescChain) -> int:
        """Fill the writable buffers with at most :data:`RNG_REQUEST_MAX` random bytes."""
        return chain.write(memory, os.urandom(min(chain.writable_len, RNG_REQUEST_MAX)))

    def state(self) -> dict:
        return {}

    def load(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


_STATUS: dict[int, bytes] = {status: bytes([status]) for status in BlkStatus}
_OK = _STATUS[BlkStatus.OK]
_OK_BYTE = int(BlkStatus.OK)
_IN, _OUT = int(BlkRequestType.IN), int(BlkRequestType.OUT)
_HEADER = BLK_REQ_HEADER.size
#: (readable, writable) buffer counts of a write (header, data | status) and of a read
#: (header | data, status): the shapes :meth:`BlkModel._data_fast` serves.
_DATA_SHAPES = frozenset({(2, 1), (1, 2)})

#: Largest blk image: its capacity in sectors must fit virtio_blk_config.capacity (le64).
MAX_IMAGE_BYTES = 1 << 60
#: What a path is when it cannot be an image (stat predicate, words).
_NOT_IMAGES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"))


def _not_an_image(path: str, mode: int) -> str | None:
    kind = next((words for test, words in _NOT_IMAGES if test(mode)), None)
    return f"{path} is {kind}, not a regular file or block device" if kind else None


def _image_problem(path: str) -> str | None:
    """What a look at *path* tells makes it unusable as an image (opening it may still fail)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        return None if os.path.isdir(parent) else f"{path}: directory {parent} does not exist"
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if problem := _not_an_image(path, mode):
        return problem
    return None if os.access(path, os.R_OK) else f"{path} is not readable"


def _sectors(value: int) -> str | None:
    return None if value % BLK_SECTOR_SIZE == 0 else f"must be a multiple of {BLK_SECTOR_SIZE}"


def _open_image(path: str, size: int | None, read_only: bool) -> tuple[int, int]:
    """Open an image (created unless *read_only*), extended to *size* when shorter: ``(fd, bytes)``."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR | os.O_CREAT) | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        raise ConfigError("image", f"{path}: {exc.strerror}") from exc
    try:
        if problem := _not_an_image(path, os.fstat(fd).st_mode):
            raise ConfigError("image", problem)
        os.set_blocking(fd, True)
        actual = os.lseek(fd, 0, os.SEEK_END)
        if size is not None and actual < size and not read_only:
            try:
                os.ftruncate(fd, size)
            except OSError as exc:
                raise ConfigError("size", f"cannot extend {path} to {size} bytes: {exc.strerror}") from exc
            actual = size
        if actual % BLK_SECTOR_SIZE:
            raise ConfigError("image", f"{path} holds {actual} bytes, not a multiple of {BLK_SECTOR_SIZE}")
    except BaseException:
        os.close(fd)
        raise
    return fd, actual


class BlkModel:
    """virtio-blk (v1.4 §5.2) over a file or an in-memory image."""

    device_id = DeviceId.BLOCK
    #: Largest data segment in bytes; advertised (VIRTIO_BLK_F_SIZE_MAX) and enforced when set.
    size_max = 0

    #: Options of the blk model (``device = "blk"``).
    OPTIONS = OptionSchema(
        Option("image", Path, None, "backing file or block device, created unless read_only "
               "(default: an image in memory)", check=_image_problem),
        Option("size", int, None, "bytes (default: the file's size, or 64 MiB in memory); "
               "a shorter file is extended", min=BLK_SECTOR_SIZE, max=MAX_IMAGE_BYTES, check=_sectors),
        Option("queues", int, 1, "request queues", min=1, max=MAX_QUEUES),
        Option("read_only", bool, False, "refuse writes (VIRTIO_BLK_F_RO)"),
        Option("serial", str, "shadowvmm-blk", f"GET_ID answer (its first {BLK_ID_BYTES} bytes)"),
    )

    def __init__(self, options: Mapping[str, Any]) -> None:
        """*options* as :attr:`OPTIONS` says; an image that cannot be opened or sized is a
        ConfigError (key ``image`` or ``size``)."""
        opts = self.OPTIONS.validate(options)
        self.queues = opts["queues"]
        self.read_only = opts["read_only"]
        self.serial = opts["serial"].encode()[:BLK_ID_BYTES]
        self.writeback = 1
        self.seg_max = 126
        self.fd = -1
        #: An image in memory: an anonymous mapping, zero pages until written (a zero-filled
        #: bytearray would make the whole disk resident at once); unmapped with the model, so
        #: its bytes outlive a close as a bytearray's did.
        self.image: mmap.mmap | None = None
        if opts["image"] is not None:
            self.fd, self.size = _open_image(opts["image"], opts["size"], self.read_only)
        else:
            self.size = opts["size"] or 64 << 20
            try:
                self.image = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            except OSError as exc:
                raise ConfigError("size", f"no memory for a {self.size}-byte image: {exc.strerror}") from None

    def features(self) -> int:
        bits = (BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH
                | BlkFeature.CONFIG_WCE | BlkFeature.MQ)
        if self.size_max:
            bits |= BlkFeature.SIZE_MAX
        if self.read_only:
            bits |= BlkFeature.RO
        return int(bits)

    def config(self) -> bytes:
        raw = BLK_CONFIG.pack(self.size // BLK_SECTOR_SIZE, self.size_max, self.seg_max, 0, 0, 0,
                              BLK_SECTOR_SIZE, 0, 0, 0, 0, self.writeback, 0, self.queues)
        return raw.ljust(BLK_CONFIG_SIZE, b"\0")

    def set_config(self, offset: int, data: bytes) -> None:
        if offset <= 32 < offset + len(data):
            self.writeback = data[32 - offset] & 1

    def handle(self, memory: GuestMemory, chain: DescChain, *, later: list | None = None) -> int:
        """Carry out one request (v1.4 §5.2.6); returns bytes written into the chain (with
        *later*, a read or write of the usual shape moves its data in :meth:`finish`).

        The status is the last byte of the last device-writable buffer. A chain whose last
        writable buffer is empty (or that has none) leaves no room for it: the request is
        not carried out and is used with 0 bytes written (the driver gets its descriptors
        back; nothing is written, in the chain or next to it). Everything else gets a status.
        """
        writable = chain.writable
        if not writable or writable[-1][1] == 0:
            log.debug("virtio-blk request %d has no status byte: used unprocessed", chain.head)
            return 0
        readable = chain.readable
        if self.image is not None and (len(readable), len(writable)) in _DATA_SHAPES \
                and readable[0][1] == _HEADER and writable[-1][1] == 1:
            done = self._data_fast(memory, readable, writable, later)
            if done >= 0:
                return done
        status, written = self._serve(memory, chain)
        gpa, length = writable[-1]
        memory.write(gpa + length - 1, _STATUS[status])
        return written + 1

    def _data_fast(self, memory: GuestMemory, readable: list[tuple[int, int]],
                   writable: list[tuple[int, int]], later: list | None) -> int:
        """The usual shape on an image in memory: a header buffer, one data buffer (read or
        written) and a one-byte status buffer; a read or write that succeeds is carried out
        here with the checks of :meth:`_transfer` (bytes written into the chain), or left to
        :meth:`finish` through *later*; anything else is left to the general path (-1)."""
        assert self.image is not None
        region, at = memory.translate(readable[0][0], _HEADER)
        rtype, _, sector = BLK_REQ_HEADER.unpack_from(region.mmap, at)
        inbound = rtype == _IN
        if inbound != (len(writable) == 2) or (not inbound and rtype != _OUT):
            return -1
        data, length = writable[0] if inbound else readable[1]
        offset = sector * BLK_SECTOR_SIZE
        if length == 0 or (self.read_only and not inbound) or length > BLK_MAX_TRANSFER \
                or offset + length > self.size or (self.size_max and length > self.size_max):
            return -1
        at = data - region.gpa
        if at < 0 or at + length > region.size:     # not in the header's region
            region, at = memory.translate(data, length)
        if later is None:
            self._move(memory, inbound, region, at, data, offset, length)
        else:
            later.append((inbound, region, at, data, offset, length))
        # The status is the guest's only once the buffer is used: it can be written now.
        status = writable[-1][0]
        at = status - region.gpa
        if memory.dirty_log is None and 0 <= at < region.size:
            region.mmap[at] = _OK_BYTE
        else:
            memory.write(status, _OK)
        return length + 1 if inbound else 1

    def finish(self, memory: GuestMemory, later: list) -> None:
        """Carry out the transfers :meth:`handle` left in *later*, in order."""
        move = self._move
        for inbound, region, at, data, offset, length in later:
            move(memory, inbound, region, at, data, offset, length)

    def _move(self, memory: GuestMemory, inbound: bool, region: MemoryRegion, at: int, data: int,
              offset: int, length: int) -> None:
        """The data of a checked read or write of the fast path."""
        image = self.image
        assert image is not None
        if inbound:
            region.mmap[at:at + length] = image[offset:offset + length]
            if memory.dirty_log is not None:
                memory.dirty_log.mark(data, length)
        else:
            image[offset:offset + length] = region.view[at:at + length]

    def _serve(self, memory: GuestMemory, chain: DescChain) -> tuple[int, int]:
        """``(status, data bytes written into the chain)`` of one request."""
        readable = chain.readable
        readable_len = sum(map(_LENGTH, readable))
        if readable_len < BLK_REQ_HEADER.size:
            return BlkStatus.IOERR, 0
        gpa, length = readable[0]
        raw = memory.read(gpa, BLK_REQ_HEADER.size) if length >= BLK_REQ_HEADER.size \
            else chain.read(memory, BLK_REQ_HEADER.size)
        rtype, _, sector = BLK_REQ_HEADER.unpack(raw)
        if rtype == BlkRequestType.IN or rtype == BlkRequestType.OUT:
            return self._transfer(memory, chain, rtype == BlkRequestType.IN, sector * BLK_SECTOR_SIZE, readable_len)
        if rtype == BlkRequestType.FLUSH:
            if self.fd >= 0:
                try:
                    os.fdatasync(self.fd)
                except OSError as exc:
                    log.warning("virtio-blk flush failed: %s", exc)
                    return BlkStatus.IOERR, 0
            return BlkStatus.OK, 0
        if rtype == BlkRequestType.GET_ID:
            room = chain.writable_len - 1
            return BlkStatus.OK, chain.write(memory, self.serial.ljust(BLK_ID_BYTES, b"\0")[:room])
        return BlkStatus.UNSUPP, 0

    def _transfer(self, memory: GuestMemory, chain: DescChain, inbound: bool,
                  offset: int, readable_len: int) -> tuple[int, int]:
        """A read (*inbound*) or write: checked against the device's limits before any data
        moves (:data:`BLK_MAX_TRANSFER`; seg_max segments, each at most size_max if set,
        v1.4 §5.2.4), then streamed segment by segment between the disk and guest memory."""
        if inbound:
            length = chain.writable_len - 1
        else:
            length = readable_len - BLK_REQ_HEADER.size
        if (self.read_only and not inbound) or length > BLK_MAX_TRANSFER or offset + length > self.size:
            return BlkStatus.IOERR, 0
        if inbound:
            segments = chain.segments(True, 0, length)
        elif chain.readable[0][1] == BLK_REQ_HEADER.size and all(map(_LENGTH, chain.readable)):
            segments = chain.readable[1:]     # the header alone in the first buffer (the usual layout)
        else:
            segments = chain.segments(False, BLK_REQ_HEADER.size)
        if len(segments) > self.seg_max or (self.size_max and max(map(_LENGTH, segments), default=0) > self.size_max):
            return BlkStatus.IOERR, 0
        try:
            if inbound:
                self._read(memory, offset, segments)
            else:
                self._write(memory, offset, segments)
                if not self.writeback and self.fd >= 0:
                    os.fdatasync(self.fd)
        except OSError as exc:
            log.warning("virtio-blk %s of %d bytes at %d failed: %s",
                        "read" if inbound else "write", length, offset, exc)
            return BlkStatus.IOERR, 0
        return BlkStatus.OK, length if inbound else 0

    def _read(self, memory: GuestMemory, offset: int, segments: list[tuple[int, int]]) -> None:
        """Disk bytes from *offset* on straight into the guest's *segments* (dirty-logged)."""
        dirty = memory.dirty_log
        for gpa, length in segments:
            view = memory.view(gpa, length)
            if self.image is not None:
                with memoryview(self.image) as image:
                    view[:] = image[offset:offset + length]
            else:
                done = 0
                while done < length:
                    count = os.preadv(self.fd, [view[done:]], offset + done)
                    if count == 0:          # past the end of a file that shrank: zeros
                        view[done:] = bytes(length - done)
                        break
                    done += count
            if dirty is not None:
                dirty.mark(gpa, length)
            offset += length

    def _write(self, memory: GuestMemory, offset: int, segments: list[tuple[int, int]]) -> None:
        """The guest's *segments* to the disk from *offset* on, from guest memory views."""
        image = self.image
        for gpa, length in segments:
            view = memory.view(gpa, length)
            if image is not None:
                image[offset:offset + length] = view
            else:
                done = 0
                while done < length:
                    done += os.pwrite(self.fd, view[done:], offset + done)
            offset += length

    def state(self) -> dict:
        return {"writeback": self.writeback}

    def load(self, state: dict) -> None:
        self.writeback = int(state.get("writeback", 1))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


#: Model name (the backend's ``device`` option) -> model class.
MODELS: dict[str, type[BlkModel] | type[RngModel]] = {"blk": BlkModel, "rng": RngModel}
