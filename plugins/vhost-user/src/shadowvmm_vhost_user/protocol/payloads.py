"""vhost-user payloads as data (QEMU ``docs/interop/vhost-user.rst``; section names are quoted).

Each payload is a frozen dataclass owning its ``struct.Struct``: ``pack()``,
``unpack(buf)`` (exact size, then ``validate()``) and ``validate()``, which
raises :class:`~shadowvmm.errors.ProtocolError`.
"""

from __future__ import annotations

import enum
import functools
import operator
import struct
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields
from typing import ClassVar, Self, cast
from uuid import UUID

from shadowvmm.errors import ProtocolError

from .codes import (
    DEVICE_STATE_ERROR_MASK,
    DEVICE_STATE_NOFD,
    MAX_CONFIG_SIZE,
    MAX_MSG_SIZE,
    MEMORY_BASELINE_NREGIONS,
    VRING_F_LOG,
    VRING_IDX_MASK,
    VRING_NOFD,
    ConfigFlags,
    IotlbPerm,
    IotlbType,
    TransferDirection,
    TransferPhase,
)


def _is_member(kind: type[enum.IntEnum], value: int) -> bool:
    try:
        kind(value)
    except ValueError:
        return False
    return True


_PACK_PLANS: dict[type, tuple[Callable[[object], tuple[object, ...]], bool]] = {}


@functools.cache
def _field_getter(kind: Hashable) -> Callable[[object], tuple[object, ...]]:
    """A function returning the field values of dataclass *kind* as a tuple (field order)."""
    names = [f.name for f in fields(cast(type, kind))]
    if len(names) == 1:
        single = operator.attrgetter(names[0])
        return lambda obj: (single(obj),)
    if not names:
        return lambda _obj: ()
    many = operator.attrgetter(*names)
    return lambda obj: cast(tuple[object, ...], many(obj))


def _pack_plan(kind: type[Payload]) -> tuple[Callable[[object], tuple[object, ...]], bool]:
    """How :meth:`Payload.pack` encodes *kind*: its field getter, and whether it adds no checks."""
    plan = (_field_getter(cast(Hashable, kind)), kind.validate is Payload.validate)
    _PACK_PLANS[kind] = plan
    return plan


class Payload:
    """Base of the fixed-size payloads: one struct, fields in declaration order."""

    __slots__ = ()
    STRUCT: ClassVar[struct.Struct]

    @classmethod
    def accepts_size(cls, size: int) -> bool:
        """Whether a payload of *size* bytes can be this type."""
        return size == cls.STRUCT.size

    @classmethod
    def max_size(cls) -> int:
        return cls.STRUCT.size

    def _values(self) -> tuple[object, ...]:
        """The fields in declaration order (IntEnum/IntFlag members pack as their value)."""
        return _field_getter(cast(Hashable, type(self)))(self)

    def pack(self) -> bytes:
        """Validate, then encode (one struct pack when the subclass adds no checks)."""
        cls = type(self)
        plan = _PACK_PLANS.get(cls) or _pack_plan(cls)
        values = plan[0](self)
        if plan[1]:
            try:
                return self.STRUCT.pack(*values)
            except struct.error as exc:
                raise ProtocolError(f"{cls.__name__}: {exc}") from None
        self.validate()
        return self.STRUCT.pack(*values)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> Self:
        """Decode exactly one payload; values a struct produced always fit it, so only a
        subclass's own checks run."""
        if not cls.accepts_size(len(buf)):
            raise ProtocolError(f"{cls.__name__}: payload of {len(buf)} bytes, expected {cls.STRUCT.size}")
        obj = cls(*cls.STRUCT.unpack(buf))
        if cls.validate is not Payload.validate:
            obj.validate()
        return obj

    def validate(self) -> None:
        """Every field fits its wire type; subclasses add semantic checks."""
        try:
            self.STRUCT.pack(*self._values())
        except struct.error as exc:
            raise ProtocolError(f"{type(self).__name__}: {exc}") from None

    def expected_fds(self) -> int | None:
        """File descriptors this payload says accompany it (``None``: the table decides)."""
        return None


@dataclass(frozen=True, slots=True)
class Empty(Payload):
    """A payload of zero bytes (a reply that carries only a header, or fds)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<")


@dataclass(frozen=True, slots=True)
class U64(Payload):
    """"A single 64-bit integer"."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Q")
    value: int


@dataclass(frozen=True, slots=True)
class FdResult(Payload):
    """u64 status with a fd on success (SHARED_OBJECT lookups: "no fd" on failure)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Q")
    value: int

    def expected_fds(self) -> int:
        return 0 if self.value else 1


@dataclass(frozen=True, slots=True)
class DeviceStateResult(Payload):
    """SET_DEVICE_STATE_FD reply: bits 0-7 error, bit 8 "no fd returned"."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Q")
    value: int

    @property
    def error(self) -> int:
        return self.value & DEVICE_STATE_ERROR_MASK

    @property
    def has_fd(self) -> bool:
        return not self.error and not self.value & DEVICE_STATE_NOFD

    def validate(self) -> None:
        Payload.validate(self)
        if self.value & ~(DEVICE_STATE_ERROR_MASK | DEVICE_STATE_NOFD):
            raise ProtocolError(f"SET_DEVICE_STATE_FD reply has reserved bits set ({self.value:#x})")

    def expected_fds(self) -> int:
        return 1 if self.has_fd else 0


@dataclass(frozen=True, slots=True)
class VringState(Payload):
    """"A vring state description": index, num (also the split/packed vring base)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II")
    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringFile(Payload):
    """SET_VRING_KICK/CALL/ERR u64: bits 0-7 vring index, bit 8 "no fd" (poll)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Q")
    index: int
    nofd: bool = False

    def pack(self) -> bytes:
        self.validate()
        return self.STRUCT.pack(self.index | (VRING_NOFD if self.nofd else 0))

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> Self:
        if not cls.accepts_size(len(buf)):
            raise ProtocolError(f"VringFile: payload of {len(buf)} bytes, expected 8")
        (value,) = cls.STRUCT.unpack(buf)
        if value & ~(VRING_IDX_MASK | VRING_NOFD):
            raise ProtocolError(f"vring file payload has reserved bits set ({value:#x})")
        return cls(value & VRING_IDX_MASK, bool(value & VRING_NOFD))

    def validate(self) -> None:
        if not 0 <= self.index <= VRING_IDX_MASK:
            raise ProtocolError(f"vring index {self.index} does not fit 8 bits")

    def expected_fds(self) -> int:
        return 0 if self.nofd else 1


@dataclass(frozen=True, slots=True)
class VringAddr(Payload):
    """"A vring address description": user addresses (IOVAs with ACCESS_PLATFORM)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int

    def validate(self) -> None:
        Payload.validate(self)
        if self.flags & ~VRING_F_LOG:
            raise ProtocolError(f"vring {self.index}: unknown address flags {self.flags:#x}")
        if self.desc & 0xF or self.avail & 0x1 or self.used & 0x3:
            raise ProtocolError(f"vring {self.index}: misaligned ring address")

    @property
    def log_enabled(self) -> bool:
        return bool(self.flags & VRING_F_LOG)


@dataclass(frozen=True, slots=True)
class MemRegion(Payload):
    """"Memory region description" (without the XEN_MMAP fields)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQQQ")
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def validate(self) -> None:
        Payload.validate(self)
        if self.memory_size == 0:
            raise ProtocolError("memory region of size 0")
        limit = 1 << 64
        for name in ("guest_phys_addr", "userspace_addr", "mmap_offset"):
            if getattr(self, name) + self.memory_size > limit:
                raise ProtocolError(f"memory region {name} + size overflows 64 bits")


@dataclass(frozen=True, slots=True)
class MemoryTable(Payload):
    """"Multiple Memory regions description": u32 nregions, u32 padding, regions.

    Only ``nregions`` regions are sent (QEMU's size), one fd per region.
    """

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II")
    regions: tuple[MemRegion, ...]

    @classmethod
    def accepts_size(cls, size: int) -> bool:
        body = size - cls.STRUCT.size
        return body >= 0 and body % MemRegion.STRUCT.size == 0 and cls.max_size() >= size

    @classmethod
    def max_size(cls) -> int:
        return cls.STRUCT.size + MEMORY_BASELINE_NREGIONS * MemRegion.STRUCT.size

    def pack(self) -> bytes:
        self.validate()
        return self.STRUCT.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> Self:
        if not cls.accepts_size(len(buf)):
            raise ProtocolError(f"memory table of {len(buf)} bytes")
        nregions, padding = cls.STRUCT.unpack_from(buf)
        step = MemRegion.STRUCT.size
        if padding or nregions * step != len(buf) - cls.STRUCT.size:
            raise ProtocolError(f"memory table says {nregions} regions in {len(buf)} bytes")
        regions = tuple(MemRegion.unpack(buf[cls.STRUCT.size + i * step:cls.STRUCT.size + (i + 1) * step])
                        for i in range(nregions))
        table = cls(regions)
        table.validate()
        return table

    def validate(self) -> None:
        if not 1 <= len(self.regions) <= MEMORY_BASELINE_NREGIONS:
            raise ProtocolError(f"memory table of {len(self.regions)} regions (1..{MEMORY_BASELINE_NREGIONS})")
        for region in self.regions:
            region.validate()

    def expected_fds(self) -> int:
        return len(self.regions)


@dataclass(frozen=True, slots=True)
class SingleMemRegion(Payload):
    """"Single memory region description": u64 padding, region (ADD/REM_MEM_REG)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Q")
    region: MemRegion

    @classmethod
    def accepts_size(cls, size: int) -> bool:
        return size == cls.max_size()

    @classmethod
    def max_size(cls) -> int:
        return cls.STRUCT.size + MemRegion.STRUCT.size

    def pack(self) -> bytes:
        return self.STRUCT.pack(0) + self.region.pack()

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> Self:
        if not cls.accepts_size(len(buf)):
            raise ProtocolError(f"single memory region of {len(buf)} bytes, expected {cls.max_size()}")
        return cls(MemRegion.unpack(buf[cls.STRUCT.size:]))

    def validate(self) -> None:
        self.region.validate()


@dataclass(frozen=True, slots=True)
class Log(Payload):
    """"Log description": mmap_size, mmap_offset of the dirty log in the fd."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQ")
    mmap_size: int
    mmap_offset: int

    def validate(self) -> None:
        Payload.validate(self)
        if self.mmap_size == 0 or self.mmap_offset + self.mmap_size > 1 << 64:
            raise ProtocolError(f"bad log area size {self.mmap_size:#x} offset {self.mmap_offset:#x}")


@dataclass(frozen=True, slots=True)
class Config(Payload):
    """"Virtio device config space": offset, size, flags, then ``size`` bytes."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<III")
    offset: int
    size: int
    flags: int
    payload: bytes

    @classmethod
    def accepts_size(cls, size: int) -> bool:
        return cls.STRUCT.size < size <= cls.max_size()

    @classmethod
    def max_size(cls) -> int:
        return cls.STRUCT.size + MAX_CONFIG_SIZE

    @classmethod
    def read(cls, offset: int, size: int) -> Self:
        """A GET_CONFIG request: the payload is ``size`` zero bytes."""
        return cls(offset, size, ConfigFlags.WRITABLE, bytes(size))

    def pack(self) -> bytes:
        self.validate()
        return self.STRUCT.pack(self.offset, self.size, self.flags) + self.payload

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> Self:
        if not cls.accepts_size(len(buf)):
            raise ProtocolError(f"config payload of {len(buf)} bytes (max {cls.max_size()})")
        offset, size, flags = cls.STRUCT.unpack_from(buf)
        config = cls(offset, size, flags, bytes(buf[cls.STRUCT.size:]))
        config.validate()
        return config

    def validate(self) -> None:
        try:
            self.STRUCT.pack(self.offset, self.size, self.flags)
        except struct.error as exc:
            raise ProtocolError(f"Config: {exc}") from None
        if not 1 <= self.size <= MAX_CONFIG_SIZE:
            raise ProtocolError(f"config access of {self.size} bytes (1..{MAX_CONFIG_SIZE})")
        if len(self.payload) != self.size:
            raise ProtocolError(f"config size field {self.size} but {len(self.payload)} payload bytes")
        if self.flags not in (ConfigFlags.WRITABLE, ConfigFlags.MIGRATION):
            raise ProtocolError(f"config flags {self.flags} not 0 (writable) or 1 (migration)")


@dataclass(frozen=True, slots=True)
class Inflight(Payload):
    """"Inflight description": mmap_size, mmap_offset, num_queues, queue_size (+4 pad)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQHH4x")
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    def expected_fds(self) -> int:
        return 1 if self.mmap_size else 0


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer(Payload):
    """"Device state transfer parameters": direction, phase."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II")
    direction: int
    phase: int

    def validate(self) -> None:
        if not _is_member(TransferDirection, self.direction) or not _is_member(TransferPhase, self.phase):
            raise ProtocolError(f"device state transfer direction {self.direction} phase {self.phase}")


@dataclass(frozen=True, slots=True)
class IotlbMsg(Payload):
    """"An IOTLB message" (``struct vhost_iotlb_msg``, padded to 32 bytes)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQQBB6x")
    iova: int
    size: int
    uaddr: int
    perm: int
    type: int

    def validate(self) -> None:
        Payload.validate(self)
        if not _is_member(IotlbPerm, self.perm) or not _is_member(IotlbType, self.type):
            raise ProtocolError(f"IOTLB message perm {self.perm} type {self.type}")


@dataclass(frozen=True, slots=True)
class VringArea(Payload):
    """"Vring area description": u64 (index bits 0-7, bit 8 no fd), size, offset."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQQ")
    u64: int
    size: int
    offset: int

    @property
    def index(self) -> int:
        return self.u64 & VRING_IDX_MASK

    @property
    def nofd(self) -> bool:
        return bool(self.u64 & VRING_NOFD)

    def validate(self) -> None:
        Payload.validate(self)
        if self.u64 & ~(VRING_IDX_MASK | VRING_NOFD):
            raise ProtocolError(f"vring area u64 has reserved bits set ({self.u64:#x})")

    def expected_fds(self) -> int:
        return 0 if self.nofd else 1


@dataclass(frozen=True, slots=True)
class SharedObject(Payload):
    """"VhostUserShared": a 16-byte UUID, first three components big-endian."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<16s")
    uuid: bytes

    @classmethod
    def from_uuid(cls, value: UUID) -> Self:
        return cls(value.bytes)

    def as_uuid(self) -> UUID:
        return UUID(bytes=self.uuid)

    def validate(self) -> None:
        if not isinstance(self.uuid, bytes) or len(self.uuid) != 16:
            raise ProtocolError("shared object UUID must be 16 bytes")


@dataclass(frozen=True, slots=True)
class Opaque(Payload):
    """A payload shadowvmm does not interpret (crypto sessions); bounded by MAX_MSG_SIZE."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<")
    data: bytes

    @classmethod
    def accepts_size(cls, size: int) -> bool:
        return 0 <= size <= MAX_MSG_SIZE

    @classmethod
    def max_size(cls) -> int:
        return MAX_MSG_SIZE

    def pack(self) -> bytes:
        self.validate()
        return self.data

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> Self:
        if not cls.accepts_size(len(buf)):
            raise ProtocolError(f"opaque payload of {len(buf)} bytes")
        return cls(bytes(buf))

    def validate(self) -> None:
        if len(self.data) > MAX_MSG_SIZE:
            raise ProtocolError(f"opaque payload of {len(self.data)} bytes")
