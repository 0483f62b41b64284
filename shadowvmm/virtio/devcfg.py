"""Device-specific configuration layouts (virtio v1.4 §5.x "Device configuration layout").

Each layout is a frozen dataclass described by a field table (name, struct
code) from which it builds its :class:`struct.Struct`. A config space
shorter than the full layout (an older device, or a VMM that serves only
the fields it offers) unpacks with the missing fields at their defaults,
and :meth:`pack` can be cut to the size a device serves. Everything is little-endian (v1.4 §2.5 "Device
Configuration Space": VERSION_1 devices use ``le`` fields).

virtio-blk's layout is in :mod:`shadowvmm.guest.blk` and is not repeated here.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self

from ..errors import ArgumentError


class _Layout:
    """Mixin: a frozen dataclass whose fields are laid out by ``TABLE``.

    ``TABLE`` lists ``(field name, struct code)`` in wire order; fields are
    packed back to back (the virtio config structs are ``packed``).
    """

    TABLE: ClassVar[tuple[tuple[str, str], ...]] = ()
    STRUCT: ClassVar[struct.Struct]
    SIZE: ClassVar[int]
    _OFFSETS: ClassVar[dict[str, tuple[int, struct.Struct]]]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        offsets: dict[str, tuple[int, struct.Struct]] = {}
        pos = 0
        for name, code in cls.TABLE:
            item = struct.Struct("<" + code)
            offsets[name] = (pos, item)
            pos += item.size
        cls._OFFSETS = offsets
        cls.STRUCT = struct.Struct("<" + "".join(code for _, code in cls.TABLE))
        cls.SIZE = cls.STRUCT.size

    @classmethod
    def offset(cls, name: str) -> int:
        """Byte offset of field *name* in the config space."""
        return cls._OFFSETS[name][0]

    def _wire(self) -> dict[str, object]:
        """Field values as the struct codes take them."""
        return {name: getattr(self, name) for name, _ in self.TABLE}

    @classmethod
    def _from_wire(cls, values: dict[str, object]) -> Self:
        return cls(**values)

    def pack(self, size: int | None = None) -> bytes:
        """The config bytes; *size* cuts them after a field (default: the whole layout)."""
        wire = self._wire()
        out = self.STRUCT.pack(*(wire[name] for name, _ in self.TABLE))
        if size is None:
            return out
        if size not in {off + item.size for off, item in self._OFFSETS.values()}:
            raise ArgumentError(f"{type(self).__name__}: {size} does not end a field of the layout")
        return out[:size]

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        """Parse config bytes; fields past the end of *data* keep their defaults."""
        if len(data) >= cls.SIZE:
            return cls._from_wire(dict(zip((name for name, _ in cls.TABLE), cls.STRUCT.unpack_from(data))))
        values: dict[str, object] = {}
        for name, (off, item) in cls._OFFSETS.items():
            if off + item.size <= len(data):
                (values[name],) = item.unpack_from(data, off)
        return cls._from_wire(values)


FS_TAG_BYTES = 36


@dataclass(frozen=True)
class FsConfig(_Layout):
    """``virtio_fs_config`` (v1.4 §5.11.4).

    ``tag`` is UTF-8, NUL-padded, and not NUL-terminated when it fills all
    36 bytes. ``num_request_queues`` is at least 1. ``notify_buf_size`` is
    only valid with ``VIRTIO_FS_F_NOTIFICATION``; the 40-byte layout
    (:data:`FS_CONFIG_BASE_SIZE`) without it is what Linux's uapi
    ``virtio_fs.h`` and vhost-user front-ends serve.
    """

    tag: str
    num_request_queues: int = 1
    notify_buf_size: int = 0

    TABLE = (("tag", f"{FS_TAG_BYTES}s"), ("num_request_queues", "I"), ("notify_buf_size", "I"))

    def __post_init__(self) -> None:
        raw = self.tag.encode()
        if not raw or len(raw) > FS_TAG_BYTES or b"\0" in raw:
            raise ArgumentError(f"virtio-fs tag must be 1..{FS_TAG_BYTES} UTF-8 bytes without NUL: {self.tag!r}")
        if not 1 <= self.num_request_queues <= 0xFFFFFFFF:
            raise ArgumentError(f"num_request_queues must be 1..2**32-1, not {self.num_request_queues}")
        if not 0 <= self.notify_buf_size <= 0xFFFFFFFF:
            raise ArgumentError(f"notify_buf_size out of range: {self.notify_buf_size}")

    def _wire(self) -> dict[str, object]:
        return {**super()._wire(), "tag": self.tag.encode()}

    @classmethod
    def _from_wire(cls, values: dict[str, object]) -> Self:
        raw = values.get("tag", b"")
        assert isinstance(raw, bytes)
        fields: dict[str, Any] = {**values, "tag": raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")}
        return cls(**fields)


FS_CONFIG_BASE_SIZE = FsConfig.offset("notify_buf_size")


class NetStatus(enum.IntFlag):
    """``virtio_net_config.status`` bits (v1.4 §5.1.4)."""

    LINK_UP = 1     #: VIRTIO_NET_S_LINK_UP
    ANNOUNCE = 2    #: VIRTIO_NET_S_ANNOUNCE


NET_SPEED_UNKNOWN = 0xFFFFFFFF   #: v1.4 §5.1.4: any value above INT_MAX means unknown
NET_DUPLEX_HALF = 0x00
NET_DUPLEX_FULL = 0x01
NET_DUPLEX_UNKNOWN = 0xFF        #: v1.4 §5.1.4: any other value means unknown


@dataclass(frozen=True)
class NetConfig(_Layout):
    """``virtio_net_config`` (v1.4 §5.1.4).

    Which fields are valid depends on the negotiated features: ``mac``
    (MAC), ``status`` (STATUS), ``max_virtqueue_pairs`` (MQ or RSS), ``mtu``
    (MTU), ``speed``/``duplex`` (SPEED_DUPLEX), the RSS fields (RSS or
    HASH_REPORT). Config spaces are usually served cut after ``mtu``
    (:data:`NET_CONFIG_BASE_SIZE`, 12 bytes).
    """

    mac: bytes = bytes(6)
    status: int = NetStatus.LINK_UP
    max_virtqueue_pairs: int = 1
    mtu: int = 1500
    speed: int = NET_SPEED_UNKNOWN
    duplex: int = NET_DUPLEX_UNKNOWN
    rss_max_key_size: int = 0
    rss_max_indirection_table_length: int = 0
    supported_hash_types: int = 0

    TABLE = (("mac", "6s"), ("status", "H"), ("max_virtqueue_pairs", "H"), ("mtu", "H"),
             ("speed", "I"), ("duplex", "B"), ("rss_max_key_size", "B"),
             ("rss_max_indirection_table_length", "H"), ("supported_hash_types", "I"))

    def __post_init__(self) -> None:
        if len(self.mac) != 6:
            raise ArgumentError(f"a MAC address is 6 bytes, not {len(self.mac)}")
        if not 1 <= self.max_virtqueue_pairs <= 0x8000:
            raise ArgumentError(f"max_virtqueue_pairs must be 1..0x8000, not {self.max_virtqueue_pairs}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and value < 0:
                raise ArgumentError(f"{f.name} must not be negative")

    @property
    def mac_str(self) -> str:
        return ":".join(f"{b:02x}" for b in self.mac)

    @staticmethod
    def parse_mac(text: str) -> bytes:
        """``"52:54:00:12:34:56"`` -> 6 bytes."""
        parts = text.split(":")
        if len(parts) != 6:
            raise ArgumentError(f"not a MAC address: {text!r}")
        return bytes(int(p, 16) for p in parts)


NET_CONFIG_BASE_SIZE = NetConfig.offset("speed")


class CtrlClass(enum.IntEnum):
    """``virtio_net_ctrl_hdr.class`` (v1.4 §5.1.6.5)."""

    RX = 0
    MAC = 1
    VLAN = 2
    ANNOUNCE = 3
    MQ = 4
    GUEST_OFFLOADS = 5


class CtrlMq(enum.IntEnum):
    """Commands of class MQ (v1.4 §5.1.6.5.5/6)."""

    VQ_PAIRS_SET = 0
    RSS_CONFIG = 1
    HASH_CONFIG = 2


CTRL_HEADER = struct.Struct("<BB")     #: virtio_net_ctrl_hdr: class, command
CTRL_MQ = struct.Struct("<H")          #: virtio_net_ctrl_mq: virtqueue_pairs
CTRL_OK = 0                            #: virtio_net_ctrl_ack
CTRL_ERR = 1
CTRL_MQ_PAIRS_MAX = 0x8000
