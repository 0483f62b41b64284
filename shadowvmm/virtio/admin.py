"""Administration virtqueue wire format (virtio v1.4 §2.12 "Device groups", §2.13 "Device parts").

Every structure is a frozen dataclass owning its :class:`struct.Struct`, with
``pack``/``unpack``/``validate``; every code is an IntEnum or IntFlag. A
malformed buffer raises :class:`~shadowvmm.errors.AdminFormatError` carrying
the status qualifier the device answers with (v1.4 §2.12.1: status EINVAL,
qualifier INVALID_COMMAND / INVALID_FIELD).

shadowvmm-private: :attr:`PartType.VQ_STATE`, the ring position of one
virtqueue. v1.4 has no such part: its stop rule (DEV_MODE_SET "writes back any
associated descriptors for all observed buffers") makes a split ring's next
avail index derivable from guest memory (it equals the used idx once every
observed buffer is used), but not a packed ring's wrap counters, and a derived
index silently replays or skips when a backend fetched a buffer it has not
used. The explicit part makes a restore exact for both layouts. It sits in the
common part range the spec leaves reserved (0x106-0x1FF), flagged
:attr:`PartFlag.OPTIONAL` (v1.4 §2.13: a device may ignore an optional part),
selector = virtqueue index, value le32 in the vhost GET/SET_VRING_BASE
encoding (:class:`~shadowvmm.virtio.vring.RingState`): split bits 0-15 next
avail idx; packed bits 0-14 avail idx, 15 avail wrap, 16-30 used idx, 31 used
wrap. A device emits it right after the queue's VQ_CFG part.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

from ..errors import AdminFormatError


class AdminOpcode(enum.IntEnum):
    """Group administration command opcodes (v1.4 §2.12.1, table "opcode")."""

    LIST_QUERY = 0x0000               #: v1.3 §2.12.1 supported-opcode bitmap
    LIST_USE = 0x0001                 #: v1.3 §2.12.1 opcodes the driver uses
    LEGACY_COMMON_CFG_WRITE = 0x0002  #: v1.3 §2.12.1.1 (not served here)
    LEGACY_COMMON_CFG_READ = 0x0003   #: v1.3 §2.12.1.1 (not served here)
    LEGACY_DEV_CFG_WRITE = 0x0004     #: v1.3 §2.12.1.1 (not served here)
    LEGACY_DEV_CFG_READ = 0x0005      #: v1.3 §2.12.1.1 (not served here)
    LEGACY_NOTIFY_INFO = 0x0006       #: v1.3 §2.12.1.1 (not served here)
    CAP_ID_LIST_QUERY = 0x0007        #: v1.4 §2.12.1.2 (not served here)
    DEVICE_CAP_GET = 0x0008           #: v1.4 §2.12.1.2 (not served here)
    DRIVER_CAP_SET = 0x0009           #: v1.4 §2.12.1.2 (not served here)
    RESOURCE_OBJ_CREATE = 0x000A      #: v1.4 §2.12.1.3 create a resource object
    RESOURCE_OBJ_MODIFY = 0x000B      #: v1.4 §2.12.1.3 (not served here)
    RESOURCE_OBJ_QUERY = 0x000C       #: v1.4 §2.12.1.3 (not served here)
    RESOURCE_OBJ_DESTROY = 0x000D     #: v1.4 §2.12.1.3 destroy a resource object
    DEV_PARTS_METADATA_GET = 0x000E   #: v1.4 §2.12.1.4 size / count / list of part headers
    DEV_PARTS_GET = 0x000F            #: v1.4 §2.12.1.4 capture all or selected parts
    DEV_PARTS_SET = 0x0010            #: v1.4 §2.12.1.4 restore parts (member stopped)
    DEV_MODE_SET = 0x0011             #: v1.4 §2.12.1.4 stop / resume a member


class GroupType(enum.IntEnum):
    """Group type identifiers (v1.4 §2.12)."""

    SELF = 0x0   #: v1.4 §2.12 the owner itself (member id 0)
    SRIOV = 0x1  #: v1.3 §2.12 SR-IOV: PF owns its VFs, member id 1..NumVFs


class AdminStatus(enum.IntEnum):
    """``status`` of a command (v1.4 §2.12.1; Linux errno numbers)."""

    OK = 0        #: v1.3 §2.12.1 successful completion
    ENXIO = 6     #: v1.4 §2.12.1.3 no such resource object
    EAGAIN = 11   #: v1.3 §2.12.1 try again
    ENOMEM = 12   #: v1.3 §2.12.1 insufficient resources (result buffer too small)
    EBUSY = 16    #: v1.4 §2.12.1.3 busy (here: DEV_PARTS_SET on a running member)
    EEXIST = 17   #: v1.4 §2.12.1.3 resource object id already in use
    EINVAL = 22   #: v1.3 §2.12.1 invalid command
    ENOSPC = 28   #: v1.4 §2.12.1.3 no room for another resource object


class AdminQualifier(enum.IntEnum):
    """``status_qualifier`` of a command (v1.3 §2.12.1)."""

    OK = 0x00
    INVALID_COMMAND = 0x01
    INVALID_OPCODE = 0x02
    INVALID_FIELD = 0x03
    INVALID_GROUP = 0x04
    INVALID_MEMBER = 0x05
    NORESOURCE = 0x06
    TRYAGAIN = 0x07


def _need(buf: bytes, size: int, what: str) -> None:
    if len(buf) < size:
        raise AdminFormatError(f"{what}: {len(buf)} bytes, needs {size}", AdminQualifier.INVALID_COMMAND)


def _reserved_zero(value: bytes, what: str) -> None:
    if any(value):
        raise AdminFormatError(f"{what}: reserved bytes not zero", AdminQualifier.INVALID_FIELD)


@dataclass(frozen=True)
class AdminCommand:
    """``struct virtio_admin_cmd`` device-readable part (v1.3 §2.12.1): 24-byte header + data."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<HH12xQ")

    opcode: int
    group_type: int
    member_id: int = 0
    data: bytes = b""

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.opcode, self.group_type, self.member_id) + self.data

    @classmethod
    def unpack(cls, buf: bytes) -> Self:
        _need(buf, cls.STRUCT.size, "admin command")
        opcode, group_type, member = cls.STRUCT.unpack_from(buf)
        return cls(opcode, group_type, member, bytes(buf[cls.STRUCT.size:]))


@dataclass(frozen=True)
class AdminResult:
    """``struct virtio_admin_cmd`` device-writable part (v1.3 §2.12.1): 8-byte header + result."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<HH4x")

    status: int
    qualifier: int = 0
    data: bytes = b""

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.status, self.qualifier) + self.data

    @classmethod
    def unpack(cls, buf: bytes) -> Self:
        _need(buf, cls.STRUCT.size, "admin result")
        status, qualifier = cls.STRUCT.unpack_from(buf)
        return cls(status, qualifier, bytes(buf[cls.STRUCT.size:]))

    @classmethod
    def error(cls, status: AdminStatus, qualifier: AdminQualifier) -> Self:
        return cls(int(status), int(qualifier))


def pack_opcode_list(opcodes: Iterable[int]) -> bytes:
    """``struct virtio_admin_cmd_list``: le64 bitmaps, opcode N at bit N % 64 of word N // 64
    (v1.3 §2.12.1); DIV_ROUND_UP(max + 1, 64) words."""
    codes = sorted(set(int(op) for op in opcodes))
    words = (codes[-1] // 64 + 1) if codes else 1
    bits = [0] * words
    for op in codes:
        bits[op // 64] |= 1 << (op % 64)
    return struct.pack(f"<{words}Q", *bits)


def unpack_opcode_list(buf: bytes) -> frozenset[int]:
    """The opcodes set in a ``virtio_admin_cmd_list`` (a length not a multiple of 8 is malformed;
    trailing all-zero words are allowed, v1.3 §2.12.1)."""
    if len(buf) % 8 or not buf:
        raise AdminFormatError(f"opcode list of {len(buf)} bytes, not a non-empty multiple of 8",
                               AdminQualifier.INVALID_FIELD)
    words = struct.unpack(f"<{len(buf) // 8}Q", buf)
    return frozenset(64 * i + bit for i, word in enumerate(words) for bit in range(64) if word >> bit & 1)


# ---------------------------------------------------------------------- resource objects (v1.4 §2.12.1.3)

class ResourceObjType(enum.IntEnum):
    """Resource object types (v1.4 §2.12.1.3)."""

    DEV_PARTS = 0x000   #: v1.4 §2.12.1.4 VIRTIO_RESOURCE_OBJ_DEV_PARTS


class DevPartsObjKind(enum.IntEnum):
    """``virtio_resource_obj_dev_parts.type`` (v1.4 §2.12.1.4)."""

    GET = 0
    SET = 1


@dataclass(frozen=True)
class ResourceObjHeader:
    """``struct virtio_admin_cmd_resource_obj_cmd_hdr`` (v1.4 §2.12.1.3): le16 type, 2 reserved, le32 id."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<H2xI")

    obj_type: int
    obj_id: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.obj_type, self.obj_id)

    @classmethod
    def unpack(cls, buf: bytes) -> Self:
        _need(buf, cls.STRUCT.size, "resource object header")
        return cls(*cls.STRUCT.unpack_from(buf))

    def validate(self) -> None:
        if self.obj_type != ResourceObjType.DEV_PARTS:
            raise AdminFormatError(f"resource object type {self.obj_type:#x} unsupported",
                                   AdminQualifier.INVALID_FIELD)


@dataclass(frozen=True)
class DevPartsObjCreate:
    """RESOURCE_OBJ_CREATE data for a device parts object (v1.4 §2.12.1.3, §2.12.1.4):
    header, le64 flags (0), ``virtio_resource_obj_dev_parts`` {u8 type; u8 reserved[7]}."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<H2xIQB7s")

    obj_id: int
    kind: int
    flags: int = 0

    def pack(self) -> bytes:
        return self.STRUCT.pack(ResourceObjType.DEV_PARTS, self.obj_id, self.flags, self.kind, bytes(7))

    @classmethod
    def unpack(cls, buf: bytes) -> Self:
        _need(buf, cls.STRUCT.size, "RESOURCE_OBJ_CREATE data")
        obj_type, obj_id, flags, kind, reserved = cls.STRUCT.unpack_from(buf)
        ResourceObjHeader(obj_type, obj_id).validate()
        _reserved_zero(reserved, "dev parts object")
        made = cls(obj_id, kind, flags)
        made.validate()
        return made

    def validate(self) -> None:
        if self.flags:
            raise AdminFormatError(f"resource object flags {self.flags:#x} must be 0", AdminQualifier.INVALID_FIELD)
        if self.kind not in tuple(DevPartsObjKind):
            raise AdminFormatError(f"dev parts object type {self.kind}", AdminQualifier.INVALID_FIELD)


# ---------------------------------------------------------------------- device parts (v1.4 §2.13)

class PartType(enum.IntEnum):
    """``part_type`` (v1.4 §2.13.1 "Common device parts"); VQ_STATE is shadowvmm's (module docstring)."""

    DEV_FEATURES = 0x100     #: v1.4 §2.13.1.1 optional; SET only verifies it
    DRV_FEATURES = 0x101     #: v1.4 §2.13.1.2
    PCI_COMMON_CFG = 0x102   #: v1.4 §2.13.1.3 (not emitted here)
    DEVICE_STATUS = 0x103    #: v1.4 §2.13.1.4
    VQ_CFG = 0x104           #: v1.4 §2.13.1.5 per virtqueue
    VQ_NOTIFY_CFG = 0x105    #: v1.4 §2.13.1.6 per virtqueue
    VQ_STATE = 0x1F0         #: shadowvmm-private, reserved common range: ring base (le32, vhost encoding)


class PartFlag(enum.IntFlag):
    """``virtio_dev_part_hdr.flags`` (v1.4 §2.13)."""

    OPTIONAL = 1 << 0   #: VIRTIO_DEV_PART_F_OPTIONAL: a device may ignore it on SET


#: Parts whose selector is a virtqueue index.
VQ_PARTS = frozenset({PartType.VQ_CFG, PartType.VQ_NOTIFY_CFG, PartType.VQ_STATE})

#: The order parts are exchanged in (v1.4 §2.12.1.4 "Device parts order"); VQ_STATE follows VQ_CFG.
PART_ORDER = (PartType.DEV_FEATURES, PartType.DRV_FEATURES, PartType.PCI_COMMON_CFG,
              PartType.DEVICE_STATUS, PartType.VQ_CFG, PartType.VQ_STATE, PartType.VQ_NOTIFY_CFG)


@dataclass(frozen=True)
class PartHeader:
    """``struct virtio_dev_part_hdr`` (v1.4 §2.13), 16 bytes: le16 part_type @0, u8 flags @2,
    reserved @3, selector @4 (le32 offset or le16 vq index, zero-padded to 8), le32 length @12."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<HBBIII")

    part_type: int
    flags: int = 0
    selector: int = 0
    length: int = 0

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.part_type, self.flags, 0, self.selector, 0, self.length)

    @classmethod
    def unpack(cls, buf: bytes, offset: int = 0) -> Self:
        _need(buf[offset:], cls.STRUCT.size, "device part header")
        part_type, flags, reserved, selector, reserved2, length = cls.STRUCT.unpack_from(buf, offset)
        if reserved or reserved2:
            raise AdminFormatError("device part header: reserved bytes not zero", AdminQualifier.INVALID_FIELD)
        made = cls(part_type, flags, selector, length)
        made.validate()
        return made

    def validate(self) -> None:
        if self.flags & ~int(PartFlag.OPTIONAL):
            raise AdminFormatError(f"part flags {self.flags:#x}", AdminQualifier.INVALID_FIELD)
        if self.part_type in VQ_PARTS and self.selector > 0xFFFF:
            raise AdminFormatError(f"part {self.part_type:#x}: vq index {self.selector:#x} has reserved bits",
                                   AdminQualifier.INVALID_FIELD)


@dataclass(frozen=True)
class Part:
    """``struct virtio_dev_part`` (v1.4 §2.13): a header and ``length`` bytes of value."""

    part_type: int
    value: bytes
    selector: int = 0
    flags: int = 0

    @property
    def header(self) -> PartHeader:
        return PartHeader(self.part_type, self.flags, self.selector, len(self.value))

    def pack(self) -> bytes:
        return self.header.pack() + self.value


def pack_parts(parts: Iterable[Part]) -> bytes:
    return b"".join(part.pack() for part in parts)


def unpack_parts(buf: bytes) -> list[Part]:
    """Parts laid back to back; a truncated header or value is malformed."""
    parts = []
    pos = 0
    size = PartHeader.STRUCT.size
    while pos < len(buf):
        hdr = PartHeader.unpack(buf, pos)
        pos += size
        if pos + hdr.length > len(buf):
            raise AdminFormatError(f"part {hdr.part_type:#x}: length {hdr.length} past the buffer end",
                                   AdminQualifier.INVALID_FIELD)
        parts.append(Part(hdr.part_type, bytes(buf[pos:pos + hdr.length]), hdr.selector, hdr.flags))
        pos += hdr.length
    return parts


def unpack_headers(buf: bytes) -> list[PartHeader]:
    """A ``hdr_list[]`` (DEV_PARTS_GET selected, METADATA_GET list)."""
    size = PartHeader.STRUCT.size
    if len(buf) % size:
        raise AdminFormatError(f"header list of {len(buf)} bytes, not a multiple of {size}",
                               AdminQualifier.INVALID_FIELD)
    return [PartHeader.unpack(buf, pos) for pos in range(0, len(buf), size)]


#: Feature words a features part carries (128 bits: every select the transports decode).
FEATURE_WORDS = 2


def pack_features(bits: int) -> bytes:
    """``struct virtio_dev_part_features`` {le64 feature_bits[]} (v1.4 §2.13.1.1)."""
    return struct.pack(f"<{FEATURE_WORDS}Q", *((bits >> (64 * i)) & (2**64 - 1) for i in range(FEATURE_WORDS)))


def unpack_features(value: bytes) -> int:
    if len(value) % 8 or not value:
        raise AdminFormatError(f"features part of {len(value)} bytes", AdminQualifier.INVALID_FIELD)
    return sum(word << (64 * i) for i, word in enumerate(struct.unpack(f"<{len(value) // 8}Q", value)))


@dataclass(frozen=True)
class VqCfg:
    """``struct virtio_dev_part_vq_cfg`` (v1.4 §2.13.1.5), 32 bytes."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<HHHHQQQ")

    size: int
    vector: int
    enabled: int
    desc: int
    driver: int
    device: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.size, self.vector, self.enabled, 0, self.desc, self.driver, self.device)

    @classmethod
    def unpack(cls, buf: bytes) -> Self:
        if len(buf) != cls.STRUCT.size:
            raise AdminFormatError(f"VQ_CFG of {len(buf)} bytes", AdminQualifier.INVALID_FIELD)
        size, vector, enabled, reserved, desc, driver, device = cls.STRUCT.unpack(buf)
        if reserved:
            raise AdminFormatError("VQ_CFG: reserved not zero", AdminQualifier.INVALID_FIELD)
        made = cls(size, vector, enabled, desc, driver, device)
        made.validate()
        return made

    def validate(self) -> None:
        if self.enabled not in (0, 1):
            raise AdminFormatError(f"VQ_CFG enabled = {self.enabled}", AdminQualifier.INVALID_FIELD)


@dataclass(frozen=True)
class VqNotifyCfg:
    """``struct virtio_dev_part_vq_notify_data`` (v1.4 §2.13.1.6), 8 bytes."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<HH4x")

    notify_off: int
    notif_config_data: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.notify_off, self.notif_config_data)

    @classmethod
    def unpack(cls, buf: bytes) -> Self:
        if len(buf) != cls.STRUCT.size:
            raise AdminFormatError(f"VQ_NOTIFY_CFG of {len(buf)} bytes", AdminQualifier.INVALID_FIELD)
        return cls(*cls.STRUCT.unpack(buf))


#: VQ_STATE value: le32 ring base, vhost encoding (module docstring).
VQ_STATE = struct.Struct("<I")
#: DEVICE_STATUS value: the device_status byte (v1.4 §2.13.1.4).
DEVICE_STATUS = struct.Struct("<B")


# ---------------------------------------------------------------------- device parts commands (v1.4 §2.12.1.4)

class MetadataKind(enum.IntEnum):
    """``virtio_admin_cmd_dev_parts_metadata_data.type`` (v1.4 §2.12.1.4)."""

    SIZE = 0
    COUNT = 1
    LIST = 2


class PartsGetKind(enum.IntEnum):
    """``virtio_admin_cmd_dev_parts_get_data.type`` (v1.4 §2.12.1.4)."""

    SELECTED = 0
    ALL = 1


@dataclass(frozen=True)
class PartsRequest:
    """DEV_PARTS_METADATA_GET / DEV_PARTS_GET data (v1.4 §2.12.1.4): resource object header,
    u8 type, u8 reserved[7], then (GET selected only) ``hdr_list[]``."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<H2xIB7s")

    obj_id: int
    kind: int
    headers: tuple[PartHeader, ...] = ()

    def pack(self) -> bytes:
        return (self.STRUCT.pack(ResourceObjType.DEV_PARTS, self.obj_id, self.kind, bytes(7))
                + b"".join(h.pack() for h in self.headers))

    @classmethod
    def unpack(cls, buf: bytes) -> Self:
        _need(buf, cls.STRUCT.size, "device parts request")
        obj_type, obj_id, kind, reserved = cls.STRUCT.unpack_from(buf)
        ResourceObjHeader(obj_type, obj_id).validate()
        _reserved_zero(reserved, "device parts request")
        return cls(obj_id, kind, tuple(unpack_headers(buf[cls.STRUCT.size:])))


@dataclass(frozen=True)
class MetadataResult:
    """``virtio_admin_cmd_dev_parts_metadata_result`` (v1.4 §2.12.1.4): le32 size-or-count,
    le32 reserved, then (LIST) ``hdrs[]``."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<I4x")

    value: int
    headers: tuple[PartHeader, ...] = ()

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.value) + b"".join(h.pack() for h in self.headers)

    @classmethod
    def unpack(cls, buf: bytes, kind: MetadataKind) -> Self:
        _need(buf, cls.STRUCT.size, "metadata result")
        (value,) = cls.STRUCT.unpack_from(buf)
        if kind is not MetadataKind.LIST:
            return cls(value)
        rest = buf[cls.STRUCT.size:cls.STRUCT.size + value * PartHeader.STRUCT.size]
        return cls(value, tuple(unpack_headers(rest)))


@dataclass(frozen=True)
class PartsSetData:
    """DEV_PARTS_SET data (v1.4 §2.12.1.4): resource object header, then ``parts[]``."""

    obj_id: int
    parts: tuple[Part, ...]

    def pack(self) -> bytes:
        return ResourceObjHeader(ResourceObjType.DEV_PARTS, self.obj_id).pack() + pack_parts(self.parts)

    @classmethod
    def unpack(cls, buf: bytes) -> Self:
        hdr = ResourceObjHeader.unpack(buf)
        hdr.validate()
        return cls(hdr.obj_id, tuple(unpack_parts(buf[ResourceObjHeader.STRUCT.size:])))


class DevModeFlag(enum.IntFlag):
    """``virtio_admin_cmd_dev_mode_set_data.flags`` (v1.4 §2.12.1.4)."""

    STOPPED = 1 << 0   #: VIRTIO_ADMIN_CMD_DEV_MODE_F_STOPPED


@dataclass(frozen=True)
class DevModeSet:
    """``struct virtio_admin_cmd_dev_mode_set_data`` {u8 flags} (v1.4 §2.12.1.4)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<B")

    flags: int

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.flags)

    @classmethod
    def unpack(cls, buf: bytes) -> Self:
        _need(buf, cls.STRUCT.size, "DEV_MODE_SET data")
        made = cls(buf[0])
        made.validate()
        return made

    def validate(self) -> None:
        if self.flags & ~int(DevModeFlag.STOPPED):
            raise AdminFormatError(f"DEV_MODE_SET flags {self.flags:#x}", AdminQualifier.INVALID_FIELD)

    @property
    def stopped(self) -> bool:
        return bool(self.flags & DevModeFlag.STOPPED)


def part_rank(part_type: int) -> int:
    """Where a part goes in the exchange order (v1.4 §2.12.1.4 "Device parts order"): VQ_STATE
    ranks with VQ_CFG (it follows its queue's VQ_CFG); unknown types go last."""
    if part_type == PartType.VQ_STATE:
        part_type = PartType.VQ_CFG
    kinds = [int(k) for k in PART_ORDER if k is not PartType.VQ_STATE]
    return kinds.index(part_type) if part_type in kinds else len(kinds)


def in_order(parts: Sequence[Part]) -> bool:
    """Whether *parts* follow the exchange order."""
    ranks = [part_rank(p.part_type) for p in parts]
    return ranks == sorted(ranks)
