"""vhost-vdpa wire formats: ioctl numbers, argument layouts, IOTLB messages.

Sources: Linux ``include/uapi/linux/vhost.h`` (ioctls, magic ``VHOST_VIRTIO``
0xAF) and ``include/uapi/linux/vhost_types.h`` (structs, backend feature bits,
``struct vhost_msg_v2``), as of 6.12. Numbers use the generic ``_IOC``
encoding of x86/arm64/riscv (``asm-generic/ioctl.h``): direction in bits
30-31, argument size in bits 16-29, magic in bits 8-15, number in bits 0-7.

Every argument layout is a frozen dataclass that owns its ``struct.Struct``
(native byte order: the kernel reads host-endian C structs).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import struct
from dataclasses import astuple, dataclass
from typing import ClassVar, TypeVar

from shadowvmm.errors import ArgumentError, ArgumentTypeError, VdpaIoctlError

VHOST_VIRTIO = 0xAF

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_TYPESHIFT = _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS


class IocDir(enum.IntEnum):
    """``_IOC`` direction (asm-generic/ioctl.h), from userspace's point of view."""

    NONE = 0    #: _IO
    WRITE = 1   #: _IOW: userspace writes the argument
    READ = 2    #: _IOR: the kernel fills the argument
    READ_WRITE = 3  #: _IOWR


def ioc(direction: IocDir, magic: int, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)``."""
    if not 0 <= size < 1 << _IOC_SIZEBITS:
        raise ArgumentError(f"ioctl argument size {size} does not fit {_IOC_SIZEBITS} bits")
    return direction << _IOC_DIRSHIFT | size << _IOC_SIZESHIFT | magic << _IOC_TYPESHIFT | nr


L = TypeVar("L", bound="Layout")


class Layout:
    """A C struct: dataclass fields in order, packed by the class's ``STRUCT``."""

    STRUCT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        return self.STRUCT.pack(*astuple(self))  # type: ignore[call-overload]

    @classmethod
    def unpack(cls: type[L], data: bytes | bytearray | memoryview) -> L:
        return cls(*cls.STRUCT.unpack_from(data))

    @classmethod
    def struct_size(cls) -> int:
        return cls.STRUCT.size


@dataclass(frozen=True, slots=True)
class U64(Layout):
    """``__u64`` (features, backend features)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=Q")
    value: int = 0


@dataclass(frozen=True, slots=True)
class U32(Layout):
    """``__u32`` / ``unsigned int`` (device id, config size, vq count, ...)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=I")
    value: int = 0


@dataclass(frozen=True, slots=True)
class U16(Layout):
    """``__u16`` (VHOST_VDPA_GET_VRING_NUM)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=H")
    value: int = 0


@dataclass(frozen=True, slots=True)
class U8(Layout):
    """``__u8`` (the virtio status byte)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=B")
    value: int = 0


@dataclass(frozen=True, slots=True)
class Int(Layout):
    """``int`` (an eventfd, -1 to unbind)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=i")
    value: int = -1


@dataclass(frozen=True, slots=True)
class VringState(Layout):
    """``struct vhost_vring_state {unsigned int index, num}``."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=II")
    index: int
    num: int = 0


@dataclass(frozen=True, slots=True)
class VringFile(Layout):
    """``struct vhost_vring_file {unsigned int index; int fd}`` (fd -1 unbinds)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=Ii")
    index: int
    fd: int = -1


VHOST_VRING_F_LOG = 0  #: bit number in ``vhost_vring_addr.flags``


@dataclass(frozen=True, slots=True)
class VringAddrArg(Layout):
    """``struct vhost_vring_addr`` (40 bytes); for vhost-vdpa the addresses are IOVAs."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=IIQQQQ")
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int = 0


@dataclass(frozen=True, slots=True)
class IovaRange(Layout):
    """``struct vhost_vdpa_iova_range {__u64 first, last}`` (both inclusive)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=QQ")
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class VdpaConfig(Layout):
    """``struct vhost_vdpa_config {__u32 off, len; __u8 buf[]}``.

    The ioctl size field encodes only the 8-byte header; ``buf`` follows it in
    the same buffer (``len`` bytes).
    """

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=II")
    off: int
    len: int
    buf: bytes = b""

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.off, self.len) + self.buf.ljust(self.len, b"\0")[:self.len]

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> VdpaConfig:
        off, length = cls.STRUCT.unpack_from(data)
        return cls(off, length, bytes(data[cls.STRUCT.size:cls.STRUCT.size + length]))


class Ioctl(enum.Enum):
    """vhost-vdpa ioctls as data: ``(direction, nr, argument layout)``; ``number`` is computed.

    Names are the uapi macro names (vhost.h). ``arg`` is ``None`` for ``_IO``.
    """

    VHOST_GET_FEATURES = (IocDir.READ, 0x00, U64)
    VHOST_SET_FEATURES = (IocDir.WRITE, 0x00, U64)
    VHOST_SET_OWNER = (IocDir.NONE, 0x01, None)
    VHOST_RESET_OWNER = (IocDir.NONE, 0x02, None)
    VHOST_SET_VRING_NUM = (IocDir.WRITE, 0x10, VringState)
    VHOST_SET_VRING_ADDR = (IocDir.WRITE, 0x11, VringAddrArg)
    VHOST_SET_VRING_BASE = (IocDir.WRITE, 0x12, VringState)
    VHOST_GET_VRING_BASE = (IocDir.READ_WRITE, 0x12, VringState)
    VHOST_SET_VRING_KICK = (IocDir.WRITE, 0x20, VringFile)
    VHOST_SET_VRING_CALL = (IocDir.WRITE, 0x21, VringFile)
    VHOST_SET_VRING_ERR = (IocDir.WRITE, 0x22, VringFile)
    VHOST_SET_BACKEND_FEATURES = (IocDir.WRITE, 0x25, U64)
    VHOST_GET_BACKEND_FEATURES = (IocDir.READ, 0x26, U64)
    VHOST_VDPA_GET_DEVICE_ID = (IocDir.READ, 0x70, U32)
    VHOST_VDPA_GET_STATUS = (IocDir.READ, 0x71, U8)
    VHOST_VDPA_SET_STATUS = (IocDir.WRITE, 0x72, U8)
    VHOST_VDPA_GET_CONFIG = (IocDir.READ, 0x73, VdpaConfig)
    VHOST_VDPA_SET_CONFIG = (IocDir.WRITE, 0x74, VdpaConfig)
    VHOST_VDPA_SET_VRING_ENABLE = (IocDir.WRITE, 0x75, VringState)
    VHOST_VDPA_GET_VRING_NUM = (IocDir.READ, 0x76, U16)
    VHOST_VDPA_SET_CONFIG_CALL = (IocDir.WRITE, 0x77, Int)
    VHOST_VDPA_GET_IOVA_RANGE = (IocDir.READ, 0x78, IovaRange)
    VHOST_VDPA_GET_CONFIG_SIZE = (IocDir.READ, 0x79, U32)
    VHOST_VDPA_GET_AS_NUM = (IocDir.READ, 0x7A, U32)
    VHOST_VDPA_GET_VRING_GROUP = (IocDir.READ_WRITE, 0x7B, VringState)
    VHOST_VDPA_SET_GROUP_ASID = (IocDir.WRITE, 0x7C, VringState)
    VHOST_VDPA_SUSPEND = (IocDir.NONE, 0x7D, None)
    VHOST_VDPA_RESUME = (IocDir.NONE, 0x7E, None)
    VHOST_VDPA_GET_VRING_DESC_GROUP = (IocDir.READ_WRITE, 0x7F, VringState)
    VHOST_VDPA_GET_VQS_COUNT = (IocDir.READ, 0x80, U32)
    VHOST_VDPA_GET_GROUP_NUM = (IocDir.READ, 0x81, U32)
    VHOST_VDPA_GET_VRING_SIZE = (IocDir.READ_WRITE, 0x82, VringState)

    def __init__(self, direction: IocDir, nr: int, arg: type[Layout] | None) -> None:
        self.direction = direction
        self.nr = nr
        self.arg = arg
        self.number = ioc(direction, VHOST_VIRTIO, nr, arg.struct_size() if arg else 0)

    def call(self, fd: int, arg: Layout | None = None) -> Layout | None:
        """Issue the ioctl on *fd*; returns the kernel's copy of the argument for _IOR/_IOWR.

        Raises :class:`VdpaIoctlError` with the kernel's errno.
        """
        try:
            if self.arg is None:
                fcntl.ioctl(fd, self.number, 0)
                return None
            if arg is None:
                if self.direction != IocDir.READ:
                    raise ArgumentTypeError(f"{self.name} needs a {self.arg.__name__} argument")
                given = self.arg.unpack(bytes(self.arg.struct_size()))
            elif not isinstance(arg, self.arg):
                raise ArgumentTypeError(f"{self.name} takes {self.arg.__name__}, not {type(arg).__name__}")
            else:
                given = arg
            buf = bytearray(given.pack())
            fcntl.ioctl(fd, self.number, buf, True)
        except OSError as exc:
            raise VdpaIoctlError(self.name, exc.errno or errno.EIO) from exc
        if self.direction & IocDir.READ:
            return self.arg.unpack(buf)
        return None


class BackendFeature(enum.IntEnum):
    """``VHOST_BACKEND_F_*`` (vhost_types.h): these are bit NUMBERS, use :attr:`mask`."""

    IOTLB_MSG_V2 = 0x1            #: IOTLB messages are ``struct vhost_msg_v2``
    IOTLB_BATCH = 0x2             #: BATCH_BEGIN/BATCH_END hints accepted
    IOTLB_ASID = 0x3              #: ``vhost_msg_v2.asid`` selects the address space
    SUSPEND = 0x4                 #: VHOST_VDPA_SUSPEND
    RESUME = 0x5                  #: VHOST_VDPA_RESUME (Linux 6.4+)
    ENABLE_AFTER_DRIVER_OK = 0x6  #: SET_VRING_ENABLE allowed after DRIVER_OK
    DESC_ASID = 0x7               #: descriptor areas may use their own vq group / ASID
    IOTLB_PERSIST = 0x8           #: IOTLB mappings survive a device reset

    @property
    def mask(self) -> int:
        return 1 << self.value

    @classmethod
    def decode(cls, word: int) -> list[str]:
        """Names of the bits set in a backend-feature word (unknown ones as ``bit N``)."""
        names = []
        for bit in range(64):
            if word >> bit & 1:
                names.append(cls(bit).name if bit in cls._value2member_map_ else f"bit {bit}")
        return names


VHOST_IOTLB_MSG = 0x1     #: legacy ``struct vhost_msg`` type
VHOST_IOTLB_MSG_V2 = 0x2  #: ``struct vhost_msg_v2`` type


class IotlbType(enum.IntEnum):
    """``vhost_iotlb_msg.type`` (vhost_types.h)."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4
    BATCH_BEGIN = 5
    BATCH_END = 6


class Access(enum.IntFlag):
    """``vhost_iotlb_msg.perm``: ``VHOST_ACCESS_RO/WO/RW``."""

    RO = 0x1
    WO = 0x2
    RW = 0x3


@dataclass(frozen=True, slots=True)
class IotlbMsgV2(Layout):
    """``struct vhost_msg_v2`` (72 bytes), written to the vhost-vdpa fd.

    ``{__u32 type; __u32 asid; union {struct vhost_iotlb_msg iotlb; __u8 padding[64];}}``
    with ``vhost_iotlb_msg {__u64 iova, size, uaddr; __u8 perm, type}``.
    """

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=IIQQQBB38x")
    type: int
    asid: int
    iova: int
    size: int
    uaddr: int
    perm: int
    iotlb_type: int

    @classmethod
    def update(cls, iova: int, size: int, uaddr: int, perm: Access = Access.RW,
               asid: int = 0) -> IotlbMsgV2:
        return cls(VHOST_IOTLB_MSG_V2, asid, iova, size, uaddr, perm, IotlbType.UPDATE)

    @classmethod
    def invalidate(cls, iova: int, size: int, asid: int = 0) -> IotlbMsgV2:
        return cls(VHOST_IOTLB_MSG_V2, asid, iova, size, 0, 0, IotlbType.INVALIDATE)

    @classmethod
    def batch_begin(cls, asid: int = 0) -> IotlbMsgV2:
        return cls(VHOST_IOTLB_MSG_V2, asid, 0, 0, 0, 0, IotlbType.BATCH_BEGIN)

    @classmethod
    def batch_end(cls, asid: int = 0) -> IotlbMsgV2:
        return cls(VHOST_IOTLB_MSG_V2, asid, 0, 0, 0, 0, IotlbType.BATCH_END)

    def write(self, fd: int) -> None:
        """Write the message; the kernel must take all 72 bytes."""
        data = self.pack()
        name = f"IOTLB {IotlbType(self.iotlb_type).name}"
        try:
            written = os.write(fd, data)
        except OSError as exc:
            raise VdpaIoctlError(name, exc.errno or errno.EIO,
                                 f"iova {self.iova:#x} size {self.size:#x}") from exc
        if written != len(data):
            raise VdpaIoctlError(name, errno.EIO, f"short write {written}/{len(data)}")
