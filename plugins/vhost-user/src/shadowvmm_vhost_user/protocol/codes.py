"""vhost-user message codes, header flags and wire limits ("Header", "Front-end message types",
"Back-end message types" in QEMU's ``docs/interop/vhost-user.rst``).

Integers are native-endian on the wire; shadowvmm only runs on little-endian
hosts, so every layout is written ``<``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Self

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
