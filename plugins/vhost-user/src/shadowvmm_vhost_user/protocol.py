"""vhost-user wire formats, as data.

Everything here follows QEMU's ``docs/interop/vhost-user.rst`` ("the spec";
section names are quoted). Integers are native-endian on the wire; shadowvmm
only runs on little-endian hosts, so every layout is written ``<``.

Each payload is a frozen dataclass owning its ``struct.Struct``: ``pack()``,
``unpack(buf)`` (exact size, then ``validate()``) and ``validate()``, which
raises :class:`~shadowvmm.errors.ProtocolError`. :data:`FRONTEND_SPECS` and
:data:`BACKEND_SPECS` map every request code to its payload types, reply and
file-descriptor counts, so connections check messages from these tables
rather than from per-request code.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import ClassVar, Self
from uuid import UUID

from shadowvmm.errors import ProtocolError

#: "Header": the lower two flag bits carry the protocol version, currently 1.
VERSION = 0x1
VERSION_MASK = 0x3
#: Every defined header flag bit (version, REPLY, NEED_REPLY); the rest are reserved.
KNOWN_FLAGS = 0xF
#: Largest payload accepted from a peer (rust-vmm ``MAX_MSG_SIZE``).
MAX_MSG_SIZE = 0x1000
#: Most fds accepted with one message (rust-vmm ``MAX_ATTACHED_FD_ENTRIES``).
MAX_FDS = 32
#: "Multiple Memory regions description": at most 8 regions in SET_MEM_TABLE.
MEMORY_BASELINE_NREGIONS = 8
#: QEMU's ``VHOST_USER_MAX_CONFIG_SIZE``: largest GET/SET_CONFIG access.
MAX_CONFIG_SIZE = 256
#: "Back-end communication": at most 8 fds per back-end message (BACKEND_SEND_FD).
BACKEND_MAX_FDS = 8
#: "Migration": dirty-log page size (``VHOST_LOG_PAGE``).
LOG_PAGE = 0x1000

#: Virtio feature bit 30 reused as ``VHOST_USER_F_PROTOCOL_FEATURES`` ("Communication").
F_PROTOCOL_FEATURES = 1 << 30
#: ``VHOST_F_LOG_ALL`` ("Migration"): dirty logging switch inside SET_FEATURES.
F_LOG_ALL = 1 << 26
#: Feature bits that belong to vhost(-user) itself, never to the virtio device.
VHOST_ONLY_FEATURES = F_PROTOCOL_FEATURES | F_LOG_ALL
#: ``VIRTIO_F_ACCESS_PLATFORM`` (``IOMMU_PLATFORM``), gate of the IOTLB messages.
F_ACCESS_PLATFORM = 1 << 33

#: "A vring address description" flags: ``VHOST_VRING_F_LOG``.
VRING_F_LOG = 0x1
#: "VHOST_USER_SET_VRING_KICK": bits 0-7 vring index, bit 8 invalid-FD flag.
VRING_IDX_MASK = 0xFF
VRING_NOFD = 1 << 8
#: "VHOST_USER_SET_DEVICE_STATE_FD" reply: bits 0-7 error, bit 8 invalid-FD flag.
DEVICE_STATE_ERROR_MASK = 0xFF
DEVICE_STATE_NOFD = 1 << 8


class HeaderFlags(enum.IntFlag):
    """"Header" flags (spec: "flags: 32-bit bit field")."""

    VERSION_1 = 0x1    #: version field value 1 (bits 0-1)
    REPLY = 0x4        #: bit 2: set on every reply
    NEED_REPLY = 0x8   #: bit 3: sender wants a reply ("REPLY_ACK")


class FrontendRequest(enum.IntEnum):
    """Front-end message types ("Front-end message types", ``:id:``)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4            #: deprecated ("no longer used")
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21    #: previous name SET_SLAVE_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44      #: rust-vmm ``FrontendReq``; not in QEMU's spec yet (SHMEM proposal)


class BackendRequest(enum.IntEnum):
    """Back-end message types ("Back-end message types"; previous prefix SLAVE_)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9              #: rust-vmm ``BackendReq``; SHMEM proposal, not in QEMU's spec yet
    SHMEM_UNMAP = 10           #: rust-vmm ``BackendReq``; SHMEM proposal, not in QEMU's spec yet


class ProtocolFeature(enum.IntFlag):
    """Protocol feature bits ("Protocol features", ``VHOST_USER_PROTOCOL_F_*``).

    Bits 20 and up are not named: bit 20 is GET_VRING_BASE_INFLIGHT in QEMU's
    current spec but SHMEM in rust-vmm releases, so a name would be a guess.
    """

    MQ = 1 << 0                     #: "Multiple queue support": GET_QUEUE_NUM
    LOG_SHMFD = 1 << 1              #: "Migration": SET_LOG_BASE carries a shared-memory fd
    RARP = 1 << 2                   #: "VHOST_USER_SEND_RARP"
    REPLY_ACK = 1 << 3              #: "VHOST_USER_PROTOCOL_F_REPLY_ACK": need_reply on any request
    NET_MTU = 1 << 4                #: "VHOST_USER_NET_SET_MTU" (spec name ``F_MTU``)
    BACKEND_REQ = 1 << 5            #: "Back-end communication" channel (old SLAVE_REQ)
    CROSS_ENDIAN = 1 << 6           #: "VHOST_USER_SET_VRING_ENDIAN"
    CRYPTO_SESSION = 1 << 7         #: "VHOST_USER_CREATE_CRYPTO_SESSION"
    PAGEFAULT = 1 << 8              #: "Migration" (postcopy): POSTCOPY_ADVISE/LISTEN/END
    CONFIG = 1 << 9                 #: "VHOST_USER_GET_CONFIG"/SET_CONFIG, CONFIG_CHANGE_MSG
    BACKEND_SEND_FD = 1 << 10       #: "Back-end communication": fds on the back-end channel
    HOST_NOTIFIER = 1 << 11         #: "VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG"
    INFLIGHT_SHMFD = 1 << 12        #: "Inflight I/O tracking": GET/SET_INFLIGHT_FD
    RESET_DEVICE = 1 << 13          #: "VHOST_USER_RESET_DEVICE"
    INBAND_NOTIFICATIONS = 1 << 14  #: "In-band notifications": VRING_KICK, BACKEND_VRING_CALL/ERR
    CONFIGURE_MEM_SLOTS = 1 << 15   #: "VHOST_USER_GET_MAX_MEM_SLOTS", ADD_MEM_REG, REM_MEM_REG
    STATUS = 1 << 16                #: "VHOST_USER_SET_STATUS"/GET_STATUS
    XEN_MMAP = 1 << 17              #: "Memory region description" Xen fields
    SHARED_OBJECT = 1 << 18         #: "VHOST_USER_GET_SHARED_OBJECT", BACKEND_SHARED_OBJECT_*
    DEVICE_STATE = 1 << 19          #: "Migrating back-end state": SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE


class ConfigFlags(enum.IntEnum):
    """"Virtio device config space" ``flags`` (a value, not a bit mask)."""

    WRITABLE = 0    #: front-end forwards a guest write of writable fields
    MIGRATION = 1   #: live-migration restore; may touch read-only fields


class IotlbPerm(enum.IntEnum):
    """"An IOTLB message" permission flags."""

    NONE = 0
    RO = 1
    WO = 2
    RW = 3


class IotlbType(enum.IntEnum):
    """"An IOTLB message" type."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


class TransferDirection(enum.IntEnum):
    """"Device state transfer parameters": transfer direction."""

    SAVE = 0   #: back-end -> front-end (migration source)
    LOAD = 1   #: front-end -> back-end (migration destination)


class TransferPhase(enum.IntEnum):
    """"Device state transfer parameters": migration phase."""

    STOPPED = 0   #: the device is suspended (all rings stopped)


def _plain(value: int) -> int:
    """An IntEnum/IntFlag member as a plain int (for struct packing)."""
    return int(value)


def _is_member(kind: type[enum.IntEnum], value: int) -> bool:
    try:
        kind(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Header:
    """"Header": request, flags, size (12 bytes)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<III")

    request: int
    flags: int
    size: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.request, self.flags, self.size)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> Self:
        if len(buf) != cls.STRUCT.size:
            raise ProtocolError(f"header is {len(buf)} bytes, not {cls.STRUCT.size}")
        header = cls(*cls.STRUCT.unpack(buf))
        header.validate()
        return header

    def validate(self) -> None:
        """Version 1, no reserved flag bits, payload no larger than :data:`MAX_MSG_SIZE`."""
        if self.flags & VERSION_MASK != VERSION:
            raise ProtocolError(f"request {self.request}: protocol version {self.flags & VERSION_MASK}, not 1")
        if self.flags & ~KNOWN_FLAGS:
            raise ProtocolError(f"request {self.request}: reserved flag bits set ({self.flags:#x})")
        if not 0 <= self.size <= MAX_MSG_SIZE:
            raise ProtocolError(f"request {self.request}: payload size {self.size} exceeds {MAX_MSG_SIZE}")

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)


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
        return tuple(_plain(v) if isinstance(v, int) else v
                     for v in (getattr(self, f.name) for f in fields(self)))  # type: ignore[arg-type]

    def pack(self) -> bytes:
        self.validate()
        return self.STRUCT.pack(*self._values())

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> Self:
        if not cls.accepts_size(len(buf)):
            raise ProtocolError(f"{cls.__name__}: payload of {len(buf)} bytes, expected {cls.STRUCT.size}")
        obj = cls(*cls.STRUCT.unpack(buf))
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


#: No protocol feature needed.
NO_GATE = ProtocolFeature(0)

#: Consistency of a reply with its request: returns a complaint, or None if consistent.
ReplyCheck = Callable[[Payload | None, Payload], str | None]


def _same_ring(request: Payload | None, reply: Payload) -> str | None:
    assert isinstance(request, VringState) and isinstance(reply, VringState)
    if reply.index != request.index:
        return f"reply is for vring {reply.index}, asked for {request.index}"
    return None


def _same_config_window(request: Payload | None, reply: Payload) -> str | None:
    assert isinstance(request, Config)
    if isinstance(reply, Empty):
        return None
    assert isinstance(reply, Config)
    if (reply.offset, reply.size) != (request.offset, request.size):
        return (f"reply covers config [{reply.offset}, +{reply.size}), "
                f"asked for [{request.offset}, +{request.size})")
    return None


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """How one request code looks on the wire.

    ``request``: payload type (``None``: no payload). ``reply``: reply payload
    type (``None``: no reply body; with REPLY_ACK the back-end then answers a
    need_reply request with a :class:`U64` ack). ``reply_may_be_empty``: a
    zero-byte reply is also legal (error or implementation variant).
    ``fds``/``reply_fds``: file descriptors that travel with the message
    (``None``: the payload's :meth:`Payload.expected_fds` decides).
    ``gate``: protocol features that must be negotiated; ``virtio_gate``:
    virtio/vhost feature bits that must be offered (front-end requests) or
    acknowledged (back-end requests). ``check``: reply-vs-request consistency.
    """

    request: type[Payload] | None
    reply: type[Payload] | None = None
    fds: int | None = 0
    reply_fds: int | None = 0
    gate: ProtocolFeature = NO_GATE
    virtio_gate: int = 0
    reply_may_be_empty: bool = False
    check: ReplyCheck | None = None

    @property
    def has_reply(self) -> bool:
        """The peer always answers with a body (REPLY_ACK changes nothing)."""
        return self.reply is not None

    @property
    def carries_fds(self) -> bool:
        return self.fds != 0

    def request_fds(self, payload: Payload | None) -> int:
        """Exact fd count for a request with *payload*."""
        if self.fds is not None:
            return self.fds
        assert payload is not None
        expected = payload.expected_fds()
        assert expected is not None
        return expected

    def reply_fd_count(self, payload: Payload) -> int:
        """Exact fd count for a reply with *payload*."""
        if self.reply_fds is not None:
            return self.reply_fds
        expected = payload.expected_fds()
        return 0 if expected is None else expected


F = FrontendRequest
P = ProtocolFeature

#: Every front-end request ("Front-end message types"), except GET_SHMEM_CONFIG.
FRONTEND_SPECS: Mapping[FrontendRequest, MessageSpec] = MappingProxyType({
    F.GET_FEATURES: MessageSpec(None, U64),
    F.SET_FEATURES: MessageSpec(U64),
    F.SET_OWNER: MessageSpec(None),
    F.RESET_OWNER: MessageSpec(None),
    F.SET_MEM_TABLE: MessageSpec(MemoryTable, fds=None),
    F.SET_LOG_BASE: MessageSpec(Log, U64, fds=1, gate=P.LOG_SHMFD, reply_may_be_empty=True),
    F.SET_LOG_FD: MessageSpec(None, fds=1),
    F.SET_VRING_NUM: MessageSpec(VringState),
    F.SET_VRING_ADDR: MessageSpec(VringAddr),
    F.SET_VRING_BASE: MessageSpec(VringState),
    F.GET_VRING_BASE: MessageSpec(VringState, VringState, check=_same_ring),
    F.SET_VRING_KICK: MessageSpec(VringFile, fds=None),
    F.SET_VRING_CALL: MessageSpec(VringFile, fds=None),
    F.SET_VRING_ERR: MessageSpec(VringFile, fds=None),
    F.GET_PROTOCOL_FEATURES: MessageSpec(None, U64, virtio_gate=F_PROTOCOL_FEATURES),
    F.SET_PROTOCOL_FEATURES: MessageSpec(U64, virtio_gate=F_PROTOCOL_FEATURES),
    F.GET_QUEUE_NUM: MessageSpec(None, U64, gate=P.MQ),
    F.SET_VRING_ENABLE: MessageSpec(VringState, virtio_gate=F_PROTOCOL_FEATURES),
    F.SEND_RARP: MessageSpec(U64, gate=P.RARP),
    F.NET_SET_MTU: MessageSpec(U64, gate=P.NET_MTU),
    F.SET_BACKEND_REQ_FD: MessageSpec(None, fds=1, gate=P.BACKEND_REQ),
    F.IOTLB_MSG: MessageSpec(IotlbMsg, U64, virtio_gate=F_ACCESS_PLATFORM),
    F.SET_VRING_ENDIAN: MessageSpec(VringState, gate=P.CROSS_ENDIAN),
    F.GET_CONFIG: MessageSpec(Config, Config, gate=P.CONFIG, reply_may_be_empty=True,
                              check=_same_config_window),
    F.SET_CONFIG: MessageSpec(Config, gate=P.CONFIG),
    F.CREATE_CRYPTO_SESSION: MessageSpec(Opaque, Opaque, gate=P.CRYPTO_SESSION),
    F.CLOSE_CRYPTO_SESSION: MessageSpec(U64, gate=P.CRYPTO_SESSION),
    F.POSTCOPY_ADVISE: MessageSpec(None, Empty, reply_fds=1, gate=P.PAGEFAULT),
    F.POSTCOPY_LISTEN: MessageSpec(None, gate=P.PAGEFAULT),
    F.POSTCOPY_END: MessageSpec(None, U64, gate=P.PAGEFAULT),
    F.GET_INFLIGHT_FD: MessageSpec(Inflight, Inflight, reply_fds=None, gate=P.INFLIGHT_SHMFD),
    F.SET_INFLIGHT_FD: MessageSpec(Inflight, fds=1, gate=P.INFLIGHT_SHMFD),
    F.GPU_SET_SOCKET: MessageSpec(None, fds=1),
    F.RESET_DEVICE: MessageSpec(None, gate=P.RESET_DEVICE),
    F.VRING_KICK: MessageSpec(VringState, gate=P.INBAND_NOTIFICATIONS),
    F.GET_MAX_MEM_SLOTS: MessageSpec(None, U64, gate=P.CONFIGURE_MEM_SLOTS),
    F.ADD_MEM_REG: MessageSpec(SingleMemRegion, fds=1, gate=P.CONFIGURE_MEM_SLOTS),
    F.REM_MEM_REG: MessageSpec(SingleMemRegion, gate=P.CONFIGURE_MEM_SLOTS),
    F.SET_STATUS: MessageSpec(U64, gate=P.STATUS),
    F.GET_STATUS: MessageSpec(None, U64, gate=P.STATUS),
    F.GET_SHARED_OBJECT: MessageSpec(SharedObject, FdResult, reply_fds=None, gate=P.SHARED_OBJECT),
    F.SET_DEVICE_STATE_FD: MessageSpec(DeviceStateTransfer, DeviceStateResult, fds=1, reply_fds=None,
                                       gate=P.DEVICE_STATE),
    F.CHECK_DEVICE_STATE: MessageSpec(None, U64, gate=P.DEVICE_STATE),
})

B = BackendRequest

#: Every back-end request ("Back-end message types") except the SHMEM proposal.
BACKEND_SPECS: Mapping[BackendRequest, MessageSpec] = MappingProxyType({
    B.IOTLB_MSG: MessageSpec(IotlbMsg, virtio_gate=F_ACCESS_PLATFORM),
    B.CONFIG_CHANGE_MSG: MessageSpec(None, gate=P.CONFIG),
    B.VRING_HOST_NOTIFIER_MSG: MessageSpec(VringArea, fds=None, gate=P.HOST_NOTIFIER),
    B.VRING_CALL: MessageSpec(VringState, gate=P.INBAND_NOTIFICATIONS),
    B.VRING_ERR: MessageSpec(VringState, gate=P.INBAND_NOTIFICATIONS),
    B.SHARED_OBJECT_ADD: MessageSpec(SharedObject, gate=P.SHARED_OBJECT),
    B.SHARED_OBJECT_REMOVE: MessageSpec(SharedObject, gate=P.SHARED_OBJECT),
    B.SHARED_OBJECT_LOOKUP: MessageSpec(SharedObject, FdResult, reply_fds=None, gate=P.SHARED_OBJECT),
})

del F, P, B

#: Front-end requests whose wire format is only proposed (no spec entry yet).
UNSPECIFIED_FRONTEND = frozenset({FrontendRequest.GET_SHMEM_CONFIG})
UNSPECIFIED_BACKEND = frozenset({BackendRequest.SHMEM_MAP, BackendRequest.SHMEM_UNMAP})

#: Front-end requests that carry file descriptors (fixed or payload-dependent count).
FD_REQUESTS = frozenset(code for code, spec in FRONTEND_SPECS.items() if spec.carries_fds)


def decode_payload(kind: type[Payload] | None, buf: bytes | bytearray | memoryview) -> Payload | None:
    """Decode *buf* as *kind* (``None``: the payload must be empty)."""
    if kind is None:
        if len(buf):
            raise ProtocolError(f"expected no payload, got {len(buf)} bytes")
        return None
    return kind.unpack(buf)


def decode_reply(request: FrontendRequest, spec: MessageSpec, sent: Payload | None, header: Header,
                 body: bytes | bytearray | memoryview, nfds: int, acked: bool) -> Payload:
    """Check a reply against the table and decode it.

    *acked*: the request went out with NEED_REPLY and has no reply body of its
    own, so the reply is a :class:`U64` ack. Raises :class:`ProtocolError` on a
    wrong code, flags, size, fd count or inconsistent content.
    """
    if header.request != request:
        raise ProtocolError(f"{request.name}: reply carries request code {header.request}")
    if header.flags != VERSION | HeaderFlags.REPLY:
        raise ProtocolError(f"{request.name}: reply flags {header.flags:#x}, expected {VERSION | HeaderFlags.REPLY:#x}")
    if header.size != len(body):
        raise ProtocolError(f"{request.name}: header says {header.size} bytes, got {len(body)}")
    kind = U64 if acked else spec.reply
    if kind is None:
        raise ProtocolError(f"{request.name}: back-end replied to a request that has no reply")
    payload: Payload
    if not acked and spec.reply_may_be_empty and not body:
        payload = Empty()
        expected_fds = 0
    else:
        if not kind.accepts_size(len(body)):
            raise ProtocolError(f"{request.name}: reply payload of {len(body)} bytes does not fit {kind.__name__}")
        payload = kind.unpack(body)
        expected_fds = 0 if acked else spec.reply_fd_count(payload)
    if nfds != expected_fds:
        raise ProtocolError(f"{request.name}: reply carries {nfds} fds, expected {expected_fds}")
    if not acked and spec.check is not None and (complaint := spec.check(sent, payload)):
        raise ProtocolError(f"{request.name}: {complaint}")
    return payload
