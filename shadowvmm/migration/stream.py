"""Migration stream: framed records over a unix socket, a TCP socket or a file.

Layout (little-endian)::

    header   magic "SVMMIGR\\n" (8) | version u16 | flags u16 | reserved u32
    record   type u16 | flags u16 | length u32 | crc32 u32 | payload[length]
    ...
    record   END (payload: msgpack {"records": n})

The CRC32 covers the record's type, flags and length and its payload. A
reader refuses (:class:`~shadowvmm.errors.StreamError`) a bad magic or
version, an unknown record type, an oversized record, a CRC mismatch, a
stream that ends inside a record or before END, and an END whose record
count disagrees. Record payloads are msgpack maps, except PAGES (binary,
:class:`PageBatch`).

The channels the stream runs over (sockets, files, ``tcp:``/``unix:``/``file:``
endpoints and their listeners) live in :mod:`.channels` and are importable
from here too.
"""

from __future__ import annotations

import asyncio
import enum
import struct
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import msgpack

from ..errors import StreamError
from ..memory import PAGE_SIZE
from .channels import Channel, Endpoint, FileChannel, Listener, PeerCredentials, SocketChannel

__all__ = [
    "MAGIC", "MAX_RECORD", "VERSION", "Channel", "Endpoint", "FileChannel", "Listener", "PageBatch",
    "PeerCredentials", "Record", "RecordHeader", "RecordType", "SocketChannel", "StreamHeader", "StreamReader",
    "StreamWriter", "pack_map",
]

MAGIC = b"SVMMIGR\n"
VERSION = 1
#: Largest record payload accepted (a PAGES batch of 1024 pages is ~4 MiB).
MAX_RECORD = 16 << 20


class RecordType(enum.IntEnum):
    """Record types; direction in brackets."""

    HELLO = 1      #: [src->dst] machine layout, memory model, devices
    READY = 2      #: [dst->src] destination set up and connected its backends
    PAGES = 3      #: [src->dst] a batch of guest pages (copy model)
    ROUND = 4      #: [src->dst] end of a pre-copy round
    DEVICE = 5     #: [src->dst] one device's state (DeviceState.pack())
    END = 6        #: [src->dst] end marker
    RESULT = 7     #: [dst->src] destination outcome: running, or refused and why
    ABORT = 8      #: [src->dst] the source abandoned the migration
    IOMMU = 9      #: [src->dst] the devices' IOMMU tables, before any DEVICE (:mod:`.iommu`)


@dataclass(frozen=True)
class StreamHeader:
    """The stream header."""

    STRUCT: ClassVar = struct.Struct("<8sHHI")

    version: int = VERSION
    flags: int = 0

    def pack(self) -> bytes:
        self.validate()
        return self.STRUCT.pack(MAGIC, self.version, self.flags, 0)

    @classmethod
    def unpack(cls, buf: bytes) -> Self:
        if len(buf) != cls.STRUCT.size:
            raise StreamError(f"stream header is {len(buf)} bytes, not {cls.STRUCT.size}")
        magic, version, flags, _ = cls.STRUCT.unpack(buf)
        if magic != MAGIC:
            raise StreamError(f"not a shadowvmm migration stream (magic {magic!r})")
        header = cls(version, flags)
        header.validate()
        return header

    def validate(self) -> None:
        if self.version != VERSION:
            raise StreamError(f"stream version {self.version} is not supported (this reader: {VERSION})")
        if self.flags:
            raise StreamError(f"unknown stream flags {self.flags:#x}")


@dataclass(frozen=True)
class RecordHeader:
    """One record's header; :meth:`check` verifies the payload against it."""

    STRUCT: ClassVar = struct.Struct("<HHII")

    type: int
    flags: int
    length: int
    crc: int

    @staticmethod
    def crc_of(rtype: int, flags: int, length: int, payload: bytes) -> int:
        return zlib.crc32(payload, zlib.crc32(struct.pack("<HHI", rtype, flags, length)))

    @classmethod
    def for_payload(cls, rtype: RecordType, payload: bytes) -> Self:
        return cls(int(rtype), 0, len(payload), cls.crc_of(int(rtype), 0, len(payload), payload))

    def pack(self) -> bytes:
        self.validate()
        return self.STRUCT.pack(self.type, self.flags, self.length, self.crc)

    @classmethod
    def unpack(cls, buf: bytes) -> Self:
        header = cls(*cls.STRUCT.unpack(buf))
        header.validate()
        return header

    def validate(self) -> None:
        try:
            RecordType(self.type)
        except ValueError:
            raise StreamError(f"unknown record type {self.type}") from None
        if self.flags:
            raise StreamError(f"record {self.type}: unknown flags {self.flags:#x}")
        if self.length > MAX_RECORD:
            raise StreamError(f"record {RecordType(self.type).name}: {self.length} bytes exceeds {MAX_RECORD}")

    def check(self, payload: bytes) -> None:
        if self.crc_of(self.type, self.flags, self.length, payload) != self.crc:
            raise StreamError(f"record {RecordType(self.type).name}: CRC32 mismatch (corrupt stream)")


@dataclass(frozen=True)
class Record:
    type: RecordType
    payload: bytes

    def decode(self) -> dict[str, Any]:
        """The payload as a msgpack map."""
        try:
            value = msgpack.unpackb(self.payload, raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise StreamError(f"record {self.type.name}: payload is not msgpack: {exc}") from exc
        if not isinstance(value, dict):
            raise StreamError(f"record {self.type.name}: payload is not a map")
        return value


def pack_map(value: dict[str, Any]) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


@dataclass(frozen=True)
class PageBatch:
    """PAGES payload: ``count u32 | (gpa u64, 4096 bytes) * count``."""

    COUNT: ClassVar = struct.Struct("<I")
    GPA: ClassVar = struct.Struct("<Q")

    pages: tuple[tuple[int, bytes], ...]

    def pack(self) -> bytes:
        self.validate()
        parts = [self.COUNT.pack(len(self.pages))]
        for gpa, data in self.pages:
            parts.append(self.GPA.pack(gpa))
            parts.append(data)
        return b"".join(parts)

    @classmethod
    def unpack(cls, buf: bytes) -> Self:
        if len(buf) < cls.COUNT.size:
            raise StreamError("PAGES record shorter than its count")
        (count,) = cls.COUNT.unpack_from(buf)
        entry = cls.GPA.size + PAGE_SIZE
        if len(buf) != cls.COUNT.size + count * entry:
            raise StreamError(f"PAGES record of {len(buf)} bytes does not hold {count} pages")
        view = memoryview(buf)
        pages = []
        for i in range(count):
            off = cls.COUNT.size + i * entry
            (gpa,) = cls.GPA.unpack_from(buf, off)
            pages.append((gpa, bytes(view[off + cls.GPA.size:off + entry])))
        batch = cls(tuple(pages))
        batch.validate()
        return batch

    def validate(self) -> None:
        for gpa, data in self.pages:
            if gpa % PAGE_SIZE or len(data) != PAGE_SIZE:
                raise StreamError(f"page at {gpa:#x}: not a whole aligned page")


class StreamWriter:
    """Writes the header, then records, then END.

    Each send must be taken by the peer within *send_timeout* seconds: a destination that
    stops reading (a full socket buffer) must not keep a source stopped for good.
    """

    def __init__(self, channel: Channel, *, send_timeout: float | None = None) -> None:
        self.channel = channel
        self.send_timeout = send_timeout
        self.records = 0
        self.bytes = 0
        self._started = False

    async def start(self) -> None:
        await self._send(StreamHeader().pack())
        self._started = True

    async def write(self, rtype: RecordType, payload: bytes) -> None:
        if not self._started:
            raise StreamError("stream header not written")
        await self._send(RecordHeader.for_payload(rtype, payload).pack() + payload)
        self.records += 1

    async def write_map(self, rtype: RecordType, value: dict[str, Any]) -> None:
        await self.write(rtype, pack_map(value))

    async def end(self) -> None:
        await self.write_map(RecordType.END, {"records": self.records})

    async def _send(self, data: bytes) -> None:
        try:
            async with asyncio.timeout(self.send_timeout):
                await self.channel.send(data)
        except TimeoutError:
            raise StreamError(f"the peer took none of {len(data)} bytes within {self.send_timeout:g} s "
                              "(it stopped reading)") from None
        self.bytes += len(data)


class StreamReader:
    """Reads and checks the header, then records; END is checked against the record count."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.records = 0
        self.bytes = 0
        self.ended = False

    async def start(self) -> StreamHeader:
        data = await self.channel.recv_exactly(StreamHeader.STRUCT.size)
        self.bytes += len(data)
        return StreamHeader.unpack(data)

    async def read(self) -> Record:
        if self.ended:
            raise StreamError("read past the END record")
        raw = await self.channel.recv_exactly(RecordHeader.STRUCT.size)
        header = RecordHeader.unpack(raw)
        payload = await self.channel.recv_exactly(header.length) if header.length else b""
        header.check(payload)
        self.bytes += len(raw) + len(payload)
        record = Record(RecordType(header.type), payload)
        if record.type is RecordType.END:
            count = record.decode().get("records")
            if count != self.records:
                raise StreamError(f"END says {count} records, {self.records} were read")
            self.ended = True
        else:
            self.records += 1
        return record

    async def expect(self, *types: RecordType) -> Record:
        record = await self.read()
        if record.type not in types:
            raise StreamError(f"expected {'/'.join(t.name for t in types)}, got {record.type.name}")
        return record
