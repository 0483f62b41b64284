"""Device state model for migration, serialized with msgpack.

A :class:`DeviceState` has four parts:

* :class:`TransportState`: everything the guest can see through the transport
  (status shadow and its flags, feature words and selects, MSI-X vectors and
  enable, config generation and bytes, per-queue registers; for PCI the
  config space bytes and the MSI-X table);
* :class:`RingPart` per started ring: the vhost base encoding the backend
  returned at stop (split: next avail index; packed: index + wrap counters);
* a standard part per device type (:class:`BlkStandard`, :class:`NetStandard`,
  :class:`FsStandard`, :class:`RngStandard`): the device-type state any
  implementation understands;
* an optional :class:`OpaquePart`: implementation state (for vhost-user the
  DEVICE_STATE blob) that only the same implementation may load.

Versioning. The envelope carries :data:`FORMAT_VERSION`. Every field is
declared in a schema (:class:`FieldSpec`) with the format version that
introduced it. On the wire a required field's key is prefixed with ``!``;
a reader ignores unknown optional keys, refuses unknown required keys
(:class:`UnknownRequiredFieldError`), and fills fields newer than the
state's format with their defaults, so newer readers accept older states.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import msgpack

from ..backends.base import RingState
from ..errors import IncompatibleStateError, MigrationError
from ..virtio.constants import DeviceId, Feature

#: Current state format. Bump when a field is added; mark it required only if
#: an older reader must refuse a state that carries it.
FORMAT_VERSION = 1
#: Wire-key prefix of a field the reader must understand.
REQUIRED = "!"


class StateFormatError(MigrationError):
    """A serialized device state is malformed (wrong type, missing field)."""


class UnknownRequiredFieldError(IncompatibleStateError):
    """A state carries a required field this reader does not know."""




@dataclass(frozen=True)
class FieldSpec:
    """One field of a state section: its type, whether it is required, since when it exists.

    ``kind`` is a scalar type or a :class:`Section` subclass; ``many``: a list
    of them; ``optional``: ``None`` is allowed.
    """

    name: str
    kind: Any
    required: bool = True
    since: int = 1
    default: Any = None
    many: bool = False
    optional: bool = False

    @property
    def key(self) -> str:
        return (REQUIRED if self.required else "") + self.name

    def encode(self, value: Any) -> Any:
        if value is None:
            return None
        if self.many:
            return [self._encode_one(v) for v in value]
        return self._encode_one(value)

    def _encode_one(self, value: Any) -> Any:
        if isinstance(self.kind, type) and issubclass(self.kind, Section):
            return value.to_wire()
        if self.kind is bytes:
            return bytes(value)
        return value

    def decode(self, value: Any, version: int, where: str) -> Any:
        if value is None:
            if self.optional:
                return None
            raise StateFormatError(f"{where}.{self.name}: must not be null")
        if self.many:
            if not isinstance(value, list):
                raise StateFormatError(f"{where}.{self.name}: expected a list, got {type(value).__name__}")
            return tuple(self._decode_one(v, version, f"{where}.{self.name}[{i}]")
                         for i, v in enumerate(value))
        return self._decode_one(value, version, f"{where}.{self.name}")

    def _decode_one(self, value: Any, version: int, where: str) -> Any:
        kind = self.kind
        if isinstance(kind, type) and issubclass(kind, Section):
            return kind.from_wire(value, version, where)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise StateFormatError(f"{where}: expected {kinds[0].__name__}, got bool")
        if not isinstance(value, kinds):
            raise StateFormatError(f"{where}: expected {kinds[0].__name__}, got {type(value).__name__}")
        return value


class Section:
    """A frozen dataclass whose fields are declared in ``SCHEMA``."""

    SCHEMA: ClassVar[tuple[FieldSpec, ...]]

    def validate(self) -> None:
        """Semantic checks; raise :class:`StateFormatError`."""

    def to_wire(self) -> dict[str, Any]:
        self.validate()
        return {spec.key: spec.encode(getattr(self, spec.name)) for spec in self.SCHEMA}

    @classmethod
    def from_wire(cls, data: Any, version: int, where: str) -> Self:
        if not isinstance(data, dict):
            raise StateFormatError(f"{where}: expected a map, got {type(data).__name__}")
        known = {spec.name: spec for spec in cls.SCHEMA}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if not isinstance(key, str) or not key.lstrip(REQUIRED):
                raise StateFormatError(f"{where}: bad key {key!r}")
            required = key.startswith(REQUIRED)
            name = key[len(REQUIRED):] if required else key
            spec = known.get(name)
            if spec is None:
                if required:
                    raise UnknownRequiredFieldError(
                        f"{where}: required field {name!r} (state format {version}) is unknown to this "
                        f"reader (format {FORMAT_VERSION})")
                continue
            values[name] = spec.decode(value, version, where)
        for spec in cls.SCHEMA:
            if spec.name in values:
                continue
            if spec.required and spec.since <= version:
                raise StateFormatError(f"{where}: required field {spec.name!r} is missing")
            values[spec.name] = spec.default
        obj = cls(**values)
        obj.validate()
        return obj


def _check_range(where: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise StateFormatError(f"{where}: {value} is outside [{low}, {high}]")


@dataclass(frozen=True)
class QueueState(Section):
    """Guest-visible registers of one virtqueue."""

    index: int
    size: int
    enabled: bool
    desc: int
    driver: int
    device: int
    msix_vector: int
    max_size: int = 0

    SCHEMA: ClassVar = (
        FieldSpec("index", int), FieldSpec("size", int), FieldSpec("enabled", bool),
        FieldSpec("desc", int), FieldSpec("driver", int), FieldSpec("device", int),
        FieldSpec("msix_vector", int), FieldSpec("max_size", int, required=False, default=0),
    )

    def validate(self) -> None:
        _check_range(f"queue {self.index}.index", self.index, 0, 0xFFFF)
        _check_range(f"queue {self.index}.size", self.size, 0, 0x8000)
        _check_range(f"queue {self.index}.msix_vector", self.msix_vector, 0, 0xFFFF)
        for name in ("desc", "driver", "device"):
            _check_range(f"queue {self.index}.{name}", getattr(self, name), 0, (1 << 64) - 1)


@dataclass(frozen=True)
class TransportState(Section):
    """What the guest sees through the transport (status shadow included)."""

    kind: str
    guest_status: int
    dialect_negotiated: bool
    guest_stop_requested: bool
    guest_stopped: bool
    device_features: int
    driver_features: int
    device_feature_select: int
    driver_feature_select: int
    queue_select: int
    config_msix_vector: int
    msix_enabled: bool
    config_generation: int
    config: bytes
    isr: int
    queues: tuple[QueueState, ...]
    pci_config_space: bytes | None = None
    msix_table: bytes | None = None

    KINDS: ClassVar = ("pci", "mmio", "none")
    SCHEMA: ClassVar = (
        FieldSpec("kind", str), FieldSpec("guest_status", int), FieldSpec("dialect_negotiated", bool),
        FieldSpec("guest_stop_requested", bool), FieldSpec("guest_stopped", bool),
        FieldSpec("device_features", int), FieldSpec("driver_features", int),
        FieldSpec("device_feature_select", int), FieldSpec("driver_feature_select", int),
        FieldSpec("queue_select", int), FieldSpec("config_msix_vector", int),
        FieldSpec("msix_enabled", bool), FieldSpec("config_generation", int), FieldSpec("config", bytes),
        FieldSpec("isr", int), FieldSpec("queues", QueueState, many=True),
        FieldSpec("pci_config_space", bytes, optional=True), FieldSpec("msix_table", bytes, optional=True),
    )

    def validate(self) -> None:
        if self.kind not in self.KINDS:
            raise StateFormatError(f"transport.kind: {self.kind!r} is not one of {self.KINDS}")
        _check_range("transport.guest_status", self.guest_status, 0, 0xFF)
        _check_range("transport.config_generation", self.config_generation, 0, 0xFF)
        _check_range("transport.isr", self.isr, 0, 0xFF)
        for name in ("device_features", "driver_features"):
            _check_range(f"transport.{name}", getattr(self, name), 0, (1 << 128) - 1)
        if [q.index for q in self.queues] != list(range(len(self.queues))):
            raise StateFormatError("transport.queues: indexes must be 0..n-1 in order")
        if self.kind == "pci" and self.pci_config_space is None:
            raise StateFormatError("transport: a PCI transport state needs pci_config_space")

    @property
    def packed(self) -> bool:
        return bool(self.driver_features & Feature.RING_PACKED)


@dataclass(frozen=True)
class RingPart(Section):
    """A stopped ring in the vhost base encoding (vhost-user SET_VRING_BASE)."""

    index: int
    layout: str
    base: int

    SCHEMA: ClassVar = (FieldSpec("index", int), FieldSpec("layout", str), FieldSpec("base", int))

    def validate(self) -> None:
        if self.layout not in ("split", "packed"):
            raise StateFormatError(f"ring {self.index}: layout {self.layout!r} is not split or packed")
        _check_range(f"ring {self.index}.base", self.base, 0, 0xFFFF if self.layout == "split" else 0xFFFFFFFF)

    @classmethod
    def from_ring_state(cls, state: RingState, packed: bool) -> "RingPart":
        return cls(state.index, "packed" if packed else "split", state.base)

    def ring_state(self) -> RingState:
        return RingState(self.index, self.base)

    def describe(self) -> dict[str, int | bool]:
        """The decoded position: split next avail idx, or packed indexes + wraps."""
        if self.layout == "split":
            return {"avail_idx": self.base}
        avail, avail_wrap, used, used_wrap = RingState(self.index, self.base).unpack_packed()
        return {"avail_idx": avail, "avail_wrap": avail_wrap, "used_idx": used, "used_wrap": used_wrap}


# ---------------------------------------------------------------------- standard parts

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


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
    def capture(cls, config: bytes, transport: TransportState) -> "BlkStandard":
        wce = config[cls.WRITEBACK_OFFSET] if len(config) > cls.WRITEBACK_OFFSET else 1
        return cls(_field(config, _U64, 0), wce & 1)

    def check_destination(self, config: bytes, name: str) -> None:
        capacity = _field(config, _U64, 0)
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
    def capture(cls, config: bytes, transport: TransportState) -> "NetStandard":
        queues = transport.queues
        pairs = sum(1 for i in range(0, len(queues) - 1, 2) if queues[i].enabled and queues[i + 1].enabled)
        return cls(bytes(config[:6]).ljust(6, b"\0"), _field(config, _U16, 6), pairs)


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
    def capture(cls, config: bytes, transport: TransportState) -> "FsStandard":
        tag = bytes(config[:cls.TAG_BYTES]).split(b"\0", 1)[0].decode(errors="replace")
        return cls(tag, _field(config, _U32, cls.TAG_BYTES))

    def check_destination(self, config: bytes, name: str) -> None:
        theirs = FsStandard.capture(config, _EMPTY_TRANSPORT) if config else None
        if theirs is not None and theirs.tag != self.tag:
            raise IncompatibleStateError(f"{name}: destination tag {theirs.tag!r}, the source {self.tag!r}")


@dataclass(frozen=True)
class RngStandard(Standard):
    """virtio-rng (v1.4 §5.4): no device state."""

    TYPE: ClassVar = "rng"
    DEVICE_ID: ClassVar = DeviceId.RNG
    SCHEMA: ClassVar = ()

    @classmethod
    def capture(cls, config: bytes, transport: TransportState) -> "RngStandard":
        return cls()


STANDARD_TYPES: dict[DeviceId, type[Standard]] = {
    cls.DEVICE_ID: cls for cls in (BlkStandard, NetStandard, FsStandard, RngStandard)}
_STANDARD_BY_NAME: dict[str, type[Standard]] = {cls.TYPE: cls for cls in STANDARD_TYPES.values()}

_EMPTY_TRANSPORT = TransportState("none", 0, False, False, False, 0, 0, 0, 0, 0, 0, False, 0, b"", 0, ())


@dataclass(frozen=True)
class OpaquePart(Section):
    """Implementation state only the same implementation can load."""

    implementation: str
    version: int
    blob: bytes

    SCHEMA: ClassVar = (FieldSpec("implementation", str), FieldSpec("version", int), FieldSpec("blob", bytes))

    def check_loadable(self, implementation: str, version: int, name: str) -> None:
        """Refuse loading into another implementation, or into an older version of it."""
        if implementation != self.implementation:
            raise IncompatibleStateError(
                f"{name}: opaque state of implementation {self.implementation!r} (v{self.version}) "
                f"cannot be loaded into implementation {implementation!r}")
        if version < self.version:
            raise IncompatibleStateError(
                f"{name}: opaque state of {self.implementation!r} v{self.version} is newer than the "
                f"destination's v{version}")


@dataclass(frozen=True)
class DeviceState(Section):
    """The migratable state of one device."""

    name: str
    device_id: int
    transport: TransportState
    rings: tuple[RingPart, ...] = ()
    standard: Standard | None = None
    opaque: OpaquePart | None = None
    format: int = field(default=FORMAT_VERSION, compare=False)

    SCHEMA: ClassVar = (
        FieldSpec("name", str), FieldSpec("device_id", int), FieldSpec("transport", TransportState),
        FieldSpec("rings", RingPart, many=True),
        FieldSpec("opaque", OpaquePart, optional=True),
    )

    def validate(self) -> None:
        queues = len(self.transport.queues)
        seen = set()
        for ring in self.rings:
            if ring.index >= queues or ring.index in seen:
                raise StateFormatError(f"{self.name}: ring {ring.index} is not a distinct queue of {queues}")
            if (ring.layout == "packed") != self.transport.packed:
                raise StateFormatError(f"{self.name}: ring {ring.index} layout {ring.layout} does not match "
                                       "the negotiated ring format")
            seen.add(ring.index)
        if self.standard is not None and self.standard.DEVICE_ID != self.device_id:
            raise StateFormatError(f"{self.name}: standard part {self.standard.TYPE} for device id {self.device_id}")

    def ring_states(self) -> dict[int, RingState]:
        return {ring.index: ring.ring_state() for ring in self.rings}

    def to_wire(self) -> dict[str, Any]:
        out = super().to_wire()
        if self.standard is not None:
            out[REQUIRED + "standard"] = {REQUIRED + "type": self.standard.TYPE, **self.standard.to_wire()}
        return out

    @classmethod
    def from_wire(cls, data: Any, version: int, where: str) -> "DeviceState":
        if not isinstance(data, dict):
            raise StateFormatError(f"{where}: expected a map, got {type(data).__name__}")
        rest = dict(data)
        raw_standard = rest.pop(REQUIRED + "standard", rest.pop("standard", None))
        state = super().from_wire(rest, version, where)
        standard = None
        if raw_standard is not None:
            if not isinstance(raw_standard, dict):
                raise StateFormatError(f"{where}.standard: expected a map")
            body = dict(raw_standard)
            kind_name = body.pop(REQUIRED + "type", None)
            kind = _STANDARD_BY_NAME.get(kind_name) if isinstance(kind_name, str) else None
            if kind is None:
                raise UnknownRequiredFieldError(f"{where}.standard: device type {kind_name!r} is unknown "
                                                f"to this reader (format {FORMAT_VERSION})")
            standard = kind.from_wire(body, version, f"{where}.standard")
        obj = cls(state.name, state.device_id, state.transport, state.rings, standard, state.opaque, version)
        obj.validate()
        return obj

    def pack(self) -> bytes:
        """msgpack bytes: ``{"!format": N, "!device": {...}}``."""
        return msgpack.packb({REQUIRED + "format": FORMAT_VERSION, REQUIRED + "device": self.to_wire()},
                             use_bin_type=True)

    @classmethod
    def unpack(cls, blob: bytes) -> "DeviceState":
        """Decode and validate; raises :class:`StateFormatError` or :class:`IncompatibleStateError`."""
        try:
            data = msgpack.unpackb(blob, raw=False, strict_map_key=True)
        except (ValueError, msgpack.UnpackException, TypeError) as exc:
            raise StateFormatError(f"device state is not valid msgpack: {exc}") from exc
        if not isinstance(data, dict):
            raise StateFormatError("device state: expected a map")
        version = data.get(REQUIRED + "format")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise StateFormatError(f"device state: bad format version {version!r}")
        for key in data:
            if isinstance(key, str) and key.startswith(REQUIRED) and key not in (REQUIRED + "format",
                                                                                 REQUIRED + "device"):
                raise UnknownRequiredFieldError(f"device state: required field {key[1:]!r} (format {version}) "
                                                f"is unknown to this reader (format {FORMAT_VERSION})")
        if REQUIRED + "device" not in data:
            raise StateFormatError("device state: no device section")
        return cls.from_wire(data[REQUIRED + "device"], version, "device")
