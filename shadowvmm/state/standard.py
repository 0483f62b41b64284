"""The standard part of a device state: per device type, understood by every implementation.

:class:`BlkStandard`, :class:`NetStandard`, :class:`FsStandard` and
:class:`RngStandard` capture the device-type state from the config space and
the transport registers, check a destination's own config against it, and
say which config writes bring a destination backend to it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from ..errors import IncompatibleStateError, StateFormatError
from ..virtio.constants import DeviceId
from .records import TransportState
from .schema import FieldSpec, Section

U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")


def _field(config: bytes, fmt: struct.Struct, offset: int) -> int:
    return fmt.unpack_from(config, offset)[0] if len(config) >= offset + fmt.size else 0


class Standard(Section):
    """A device type's standard state: understood by every implementation of that type."""

    TYPE: ClassVar[str]
    DEVICE_ID: ClassVar[DeviceId]

    @classmethod
    def capture(cls, config: bytes, transport: TransportState) -> Self:
        raise NotImplementedError

    def check_destination(self, config: bytes, name: str) -> None:
        """Refuse a destination whose own device cannot take this state."""

    def backend_writes(self, backend_config: bytes) -> list[tuple[int, bytes]]:
        """Config writes that bring a destination backend serving *backend_config* to this state."""
        return []


@dataclass(frozen=True)
class BlkStandard(Standard):
    """virtio-blk (v1.4 §5.2.4): capacity in sectors and the writeback (WCE) mode."""

    capacity: int
    writeback: int

    TYPE: ClassVar = "blk"
    DEVICE_ID: ClassVar = DeviceId.BLOCK
    WRITEBACK_OFFSET: ClassVar = 32
    SCHEMA: ClassVar = (FieldSpec("capacity", int), FieldSpec("writeback", int))

    @classmethod
    def capture(cls, config: bytes, transport: TransportState) -> BlkStandard:
        wce = config[cls.WRITEBACK_OFFSET] if len(config) > cls.WRITEBACK_OFFSET else 1
        return cls(_field(config, U64, 0), wce & 1)

    def check_destination(self, config: bytes, name: str) -> None:
        capacity = _field(config, U64, 0)
        if config and capacity != self.capacity:
            raise IncompatibleStateError(
                f"{name}: destination disk has {capacity} sectors, the source {self.capacity}")

    def backend_writes(self, backend_config: bytes) -> list[tuple[int, bytes]]:
        offset = self.WRITEBACK_OFFSET
        if len(backend_config) > offset and backend_config[offset] & 1 != self.writeback:
            return [(offset, bytes([self.writeback]))]
        return []


@dataclass(frozen=True)
class NetStandard(Standard):
    """virtio-net (v1.4 §5.1.4): MAC, link status, active queue pairs."""

    mac: bytes
    status: int
    active_pairs: int

    TYPE: ClassVar = "net"
    DEVICE_ID: ClassVar = DeviceId.NET
    SCHEMA: ClassVar = (FieldSpec("mac", bytes), FieldSpec("status", int), FieldSpec("active_pairs", int))

    def validate(self) -> None:
        if len(self.mac) != 6:
            raise StateFormatError(f"net.mac: {len(self.mac)} bytes, not 6")

    @classmethod
    def capture(cls, config: bytes, transport: TransportState) -> NetStandard:
        queues = transport.queues
        pairs = sum(1 for i in range(0, len(queues) - 1, 2) if queues[i].enabled and queues[i + 1].enabled)
        return cls(bytes(config[:6]).ljust(6, b"\0"), _field(config, U16, 6), pairs)


@dataclass(frozen=True)
class FsStandard(Standard):
    """virtio-fs (v1.4 §5.11.4): tag and request queue count."""

    tag: str
    num_request_queues: int

    TYPE: ClassVar = "fs"
    DEVICE_ID: ClassVar = DeviceId.FS
    TAG_BYTES: ClassVar = 36
    SCHEMA: ClassVar = (FieldSpec("tag", str), FieldSpec("num_request_queues", int))

    @classmethod
    def capture(cls, config: bytes, transport: TransportState) -> FsStandard:
        tag = bytes(config[:cls.TAG_BYTES]).split(b"\0", 1)[0].decode(errors="replace")
        return cls(tag, _field(config, U32, cls.TAG_BYTES))

    def check_destination(self, config: bytes, name: str) -> None:
        theirs = FsStandard.capture(config, EMPTY_TRANSPORT) if config else None
        if theirs is not None and theirs.tag != self.tag:
            raise IncompatibleStateError(f"{name}: destination tag {theirs.tag!r}, the source {self.tag!r}")


@dataclass(frozen=True)
class RngStandard(Standard):
    """virtio-rng (v1.4 §5.4): no device state."""

    TYPE: ClassVar = "rng"
    DEVICE_ID: ClassVar = DeviceId.RNG
    SCHEMA: ClassVar = ()

    @classmethod
    def capture(cls, config: bytes, transport: TransportState) -> RngStandard:
        return cls()


STANDARD_TYPES: dict[DeviceId, type[Standard]] = {
    cls.DEVICE_ID: cls for cls in (BlkStandard, NetStandard, FsStandard, RngStandard)}
STANDARD_BY_NAME: dict[str, type[Standard]] = {cls.TYPE: cls for cls in STANDARD_TYPES.values()}
STANDARD_BY_ID: dict[int, type[Standard]] = {int(cls.DEVICE_ID): cls for cls in STANDARD_TYPES.values()}

EMPTY_TRANSPORT = TransportState("none", 0, False, False, False, 0, 0, 0, 0, 0, 0, False, 0, b"", 0, ())
