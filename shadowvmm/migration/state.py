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
A format newer than :data:`FORMAT_VERSION` is refused
(:class:`IncompatibleStateError` naming both versions).

Checks. Decoding checks what a state says about itself (value ranges,
the status bit order of v1.4 §3.1.1, negotiated features within the
offered ones, ISR bits, queue sizes and ring alignment of v1.4 §2.7/§2.8
for enabled queues, packed ring positions within the ring);
:class:`Destination` checks it against the device that is to load it
(queue maxima, MSI-X vectors, ring areas inside guest memory, transport
kind, PCI read-only config bytes, MSI-X enable). A migration destination
runs both before it applies anything. :meth:`DeviceState.digest` is the
sha256 of the canonical encoding at the state's own format: what a
destination applied, confirmed to the source.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import msgpack

from ..errors import GuestMemoryError, IncompatibleStateError, StateFormatError, UnknownRequiredFieldError
from ..memory import GuestMemory
from ..virtio.constants import ISR_CONFIG, ISR_QUEUE, MAX_QUEUE_SIZE, NO_VECTOR, DeviceId, Feature, Status
from ..virtio.packed import PackedLayout
from ..virtio.split import SplitLayout
from ..virtio.vring import RingState

#: Current state format. Bump when a field is added (a reader refuses formats newer than its
#: own); mark it required only if a reader must refuse a state that carries it unknown.
FORMAT_VERSION = 1
#: Oldest format this reader accepts.
MIN_FORMAT_VERSION = 1
#: Wire-key prefix of a field the reader must understand.
REQUIRED = "!"


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

    def encode(self, value: Any, version: int = FORMAT_VERSION) -> Any:
        if value is None:
            return None
        if self.many:
            return [self._encode_one(v, version) for v in value]
        return self._encode_one(value, version)

    def _encode_one(self, value: Any, version: int) -> Any:
        if isinstance(self.kind, type) and issubclass(self.kind, Section):
            return value.to_wire(version)
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

    def to_wire(self, version: int = FORMAT_VERSION) -> dict[str, Any]:
        """The wire map of format *version*: fields added after it are left out."""
        self.validate()
        return {spec.key: spec.encode(getattr(self, spec.name), version)
                for spec in self.SCHEMA if spec.since <= version}

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


def shown(text: str, limit: int = 64) -> str:
    """*text* (a name a peer sent) cut to *limit* characters for a message."""
    return text if len(text) <= limit else text[:limit] + "..."


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
        _check_range(f"queue {self.index}.max_size", self.max_size, 0, MAX_QUEUE_SIZE)
        _check_range(f"queue {self.index}.size", self.size, 1, self.max_size or MAX_QUEUE_SIZE)
        _check_range(f"queue {self.index}.msix_vector", self.msix_vector, 0, 0xFFFF)
        for name in ("desc", "driver", "device"):
            _check_range(f"queue {self.index}.{name}", getattr(self, name), 0, (1 << 64) - 1)

    def layout(self, packed: bool) -> SplitLayout | PackedLayout:
        """The ring's placement (v1.4 §2.7 split, §2.8 packed)."""
        kind = PackedLayout if packed else SplitLayout
        return kind(self.size, self.desc, self.driver, self.device)

    def check_ring(self, packed: bool) -> None:
        """An enabled queue's ring: size (split: a power of 2) and area alignments (v1.4 §2.7, §2.8.10.1)."""
        if not packed and self.size & (self.size - 1):
            raise StateFormatError(f"queue {self.index}.size: {self.size} is not a power of 2, which a split "
                                   "ring needs (v1.4 §2.7)")
        for area, addr, _, align in self.layout(packed).areas():
            if addr % align:
                raise StateFormatError(f"queue {self.index}.{area}: {addr:#x} is not {align}-byte aligned "
                                       f"({'packed' if packed else 'split'} ring, v1.4 §2.7/§2.8)")


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

    #: A status bit may only be set with the bit it depends on (v1.4 §3.1.1; the stop
    #: bits of both dialects come after FEATURES_OK).
    STATUS_ORDER: ClassVar = ((Status.DRIVER, Status.ACKNOWLEDGE), (Status.FEATURES_OK, Status.DRIVER),
                              (Status.DRIVER_OK, Status.FEATURES_OK), (Status.SUSPEND, Status.FEATURES_OK),
                              (Status.STOP, Status.FEATURES_OK))
    ISR_BITS: ClassVar = ISR_QUEUE | ISR_CONFIG

    def validate(self) -> None:
        if self.kind not in self.KINDS:
            raise StateFormatError(f"transport.kind: {self.kind!r} is not one of {self.KINDS}")
        _check_range("transport.guest_status", self.guest_status, 0, 0xFF)
        _check_range("transport.config_generation", self.config_generation, 0, 0xFF)
        _check_range("transport.isr", self.isr, 0, 0xFF)
        for name in ("device_feature_select", "driver_feature_select"):
            _check_range(f"transport.{name}", getattr(self, name), 0, 0xFFFFFFFF)
        _check_range("transport.queue_select", self.queue_select, 0, 0xFFFF)
        _check_range("transport.config_msix_vector", self.config_msix_vector, 0, 0xFFFF)
        for name in ("device_features", "driver_features"):
            _check_range(f"transport.{name}", getattr(self, name), 0, (1 << 128) - 1)
        if self.isr & ~self.ISR_BITS:
            raise StateFormatError(f"transport.isr: {self.isr:#x} has bits outside the queue and config "
                                   f"interrupt bits {self.ISR_BITS:#x} (v1.4 §4.1.4.5)")
        self._check_status()
        if [q.index for q in self.queues] != list(range(len(self.queues))):
            raise StateFormatError("transport.queues: indexes must be 0..n-1 in order")
        for q in self.queues:
            if q.enabled:
                q.check_ring(self.packed)
        if self.kind == "pci" and self.pci_config_space is None:
            raise StateFormatError("transport: a PCI transport state needs pci_config_space")

    def _check_status(self) -> None:
        status = self.guest_status
        for bit, needs in self.STATUS_ORDER:
            if status & bit and not status & needs:
                raise StateFormatError(f"transport.guest_status: {status:#x} has {bit.name} without "
                                       f"{needs.name} (v1.4 §3.1.1)")
        if status & Status.FEATURES_OK:
            extra = self.driver_features & ~self.device_features
            if extra:
                raise StateFormatError(f"transport.driver_features: {self.driver_features:#x} accepts bits "
                                       f"{extra:#x} the device did not offer ({self.device_features:#x})")
            if not self.driver_features & Feature.VERSION_1:
                raise StateFormatError(f"transport.driver_features: {self.driver_features:#x} lacks VERSION_1 "
                                       "with FEATURES_OK set (the device refuses such a driver)")
        elif self.dialect_negotiated:
            raise StateFormatError("transport.dialect_negotiated: set without FEATURES_OK")
        stopping = self.guest_stop_requested or self.guest_stopped or status & (Status.SUSPEND | Status.STOP)
        if stopping and not self.dialect_negotiated:
            raise StateFormatError(f"transport: a guest stop (status {status:#x}) without a negotiated "
                                   "stop dialect")

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
    def from_ring_state(cls, state: RingState, packed: bool) -> RingPart:
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
    def capture(cls, config: bytes, transport: TransportState) -> BlkStandard:
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
    def capture(cls, config: bytes, transport: TransportState) -> NetStandard:
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
    def capture(cls, config: bytes, transport: TransportState) -> FsStandard:
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
    def capture(cls, config: bytes, transport: TransportState) -> RngStandard:
        return cls()


STANDARD_TYPES: dict[DeviceId, type[Standard]] = {
    cls.DEVICE_ID: cls for cls in (BlkStandard, NetStandard, FsStandard, RngStandard)}
_STANDARD_BY_NAME: dict[str, type[Standard]] = {cls.TYPE: cls for cls in STANDARD_TYPES.values()}
_STANDARD_BY_ID: dict[int, type[Standard]] = {int(cls.DEVICE_ID): cls for cls in STANDARD_TYPES.values()}

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
            if ring.layout == "packed":
                size = self.transport.queues[ring.index].size
                position = ring.describe()
                for key in ("avail_idx", "used_idx"):
                    if position[key] >= size:
                        raise StateFormatError(f"{self.name}: ring {ring.index}.{key}: {position[key]} is "
                                               f"outside the packed ring of {size} entries (v1.4 §2.8)")
            seen.add(ring.index)
        if self.standard is not None and self.standard.DEVICE_ID != self.device_id:
            raise StateFormatError(f"{self.name}: standard part {self.standard.TYPE} for device id {self.device_id}")

    def ring_states(self) -> dict[int, RingState]:
        return {ring.index: ring.ring_state() for ring in self.rings}

    def to_wire(self, version: int = FORMAT_VERSION) -> dict[str, Any]:
        out = super().to_wire(version)
        if self.standard is not None:
            out[REQUIRED + "standard"] = {REQUIRED + "type": self.standard.TYPE, **self.standard.to_wire(version)}
        return out

    @classmethod
    def from_wire(cls, data: Any, version: int, where: str) -> DeviceState:
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

    def encode(self, version: int = FORMAT_VERSION) -> bytes:
        """msgpack bytes of format *version*: ``{"!format": N, "!device": {...}}``."""
        return msgpack.packb({REQUIRED + "format": version, REQUIRED + "device": self.to_wire(version)},
                             use_bin_type=True)

    def pack(self) -> bytes:
        """The wire encoding (this writer's format)."""
        return self.encode(FORMAT_VERSION)

    def digest(self) -> str:
        """sha256 (hex) of the canonical encoding at the state's own format: a decoded state
        digests like the blob its writer packed, so a destination can confirm what it applied."""
        return hashlib.sha256(self.encode(self.format)).hexdigest()

    @classmethod
    def unpack(cls, blob: bytes) -> DeviceState:
        """Decode and validate; raises :class:`StateFormatError` or :class:`IncompatibleStateError`,
        the message prefixed with the device's name when the blob carries one."""
        try:
            data = msgpack.unpackb(blob, raw=False, strict_map_key=True)
        except (ValueError, msgpack.UnpackException, TypeError) as exc:
            raise StateFormatError(f"device state is not valid msgpack: {exc}") from exc
        if not isinstance(data, dict):
            raise StateFormatError("device state: expected a map")
        body = data.get(REQUIRED + "device")
        name = body.get(REQUIRED + "name") if isinstance(body, dict) else None
        where = shown(name) if isinstance(name, str) else "device state"
        try:
            return cls._unpack(data, body)
        except (StateFormatError, IncompatibleStateError) as exc:
            raise type(exc)(f"{where}: {exc}") from None

    @classmethod
    def _unpack(cls, data: dict[Any, Any], body: Any) -> DeviceState:
        version = data.get(REQUIRED + "format")
        if isinstance(version, bool) or not isinstance(version, int):
            raise StateFormatError(f"bad format version {version!r}")
        if version < MIN_FORMAT_VERSION:
            raise StateFormatError(f"format version {version} is older than the oldest this reader knows "
                                   f"({MIN_FORMAT_VERSION})")
        if version > FORMAT_VERSION:
            raise IncompatibleStateError(f"state format {version} is newer than this reader supports "
                                         f"(formats {MIN_FORMAT_VERSION}..{FORMAT_VERSION})")
        for key in data:
            if isinstance(key, str) and key.startswith(REQUIRED) and key not in (REQUIRED + "format",
                                                                                 REQUIRED + "device"):
                raise UnknownRequiredFieldError(f"required field {key[1:]!r} (format {version}) "
                                                f"is unknown to this reader (format {FORMAT_VERSION})")
        if body is None:
            raise StateFormatError("no device section")
        return cls.from_wire(body, version, "device")


@dataclass(frozen=True)
class Destination:
    """The device a migrated state is to load into, as data: what :meth:`check` holds the state to.

    ``kind`` is its transport (pci, mmio or none), ``max_sizes`` its queues' maxima,
    ``vectors`` its MSI-X vectors, ``dialect_status``/``dialect_feature`` its stop dialect's
    bits (0: none). ``pci_config_space``/``pci_writable`` are the PCI config space and its
    guest-writable mask, ``msix_control`` the offset of the MSI-X Message Control word.
    """

    name: str
    device_id: int
    kind: str
    max_sizes: tuple[int, ...]
    vectors: int
    device_features: int
    config: bytes
    memory: GuestMemory
    dialect_status: int = 0
    dialect_feature: int = 0
    pci_config_space: bytes | None = None
    pci_writable: bytes | None = None
    msix_control: int | None = None
    msix_table_size: int | None = None

    #: MSI-X Message Control: the enable bit (PCI Local Bus 3.0 §6.8.2.3).
    MSIX_ENABLE: ClassVar = 0x8000

    def check(self, state: DeviceState) -> None:
        """Refuse (:class:`IncompatibleStateError`) a state this device cannot take; changes nothing."""
        regs = state.transport
        name = self.name
        if state.device_id != self.device_id:
            raise IncompatibleStateError(f"{name}: state of device id {state.device_id}, the destination is "
                                         f"device id {self.device_id}")
        if regs.kind != self.kind:
            raise IncompatibleStateError(f"{name}: state of a {regs.kind} transport, the destination's is "
                                         f"{self.kind}")
        if len(regs.queues) != len(self.max_sizes):
            raise IncompatibleStateError(f"{name}: state has {len(regs.queues)} queues, the destination "
                                         f"{len(self.max_sizes)}")
        self._check_vector("config_msix_vector", regs.config_msix_vector)
        for q, max_size in zip(regs.queues, self.max_sizes):
            if q.size > max_size:
                raise IncompatibleStateError(f"{name}: queue {q.index} size {q.size} exceeds the destination's "
                                             f"maximum {max_size}")
            self._check_vector(f"queue {q.index} msix_vector", q.msix_vector)
            if q.enabled:
                self._check_areas(q, regs.packed)
        if regs.guest_status & Status.FEATURES_OK:
            missing = regs.driver_features & ~self.device_features
            if missing:
                raise IncompatibleStateError(f"{name}: the guest negotiated features {missing:#x} the "
                                             f"destination does not offer ({self.device_features:#x})")
        self._check_dialect(regs)
        if regs.config and len(regs.config) != len(self.config):
            raise IncompatibleStateError(f"{name}: config space of {len(regs.config)} bytes, the destination "
                                         f"serves {len(self.config)}")
        standard = _STANDARD_BY_ID.get(state.device_id)
        if standard is not None and regs.config and self.config:
            standard.capture(regs.config, regs).check_destination(self.config, name)
        if regs.kind == "pci":
            self._check_pci(regs)
        elif regs.msix_enabled:
            raise IncompatibleStateError(f"{name}: MSI-X enabled on a {regs.kind} transport, which has none")

    def _check_vector(self, field_name: str, vector: int) -> None:
        if vector != NO_VECTOR and vector >= self.vectors:
            raise IncompatibleStateError(f"{self.name}: {field_name} {vector} is beyond the MSI-X table "
                                         f"({self.vectors} vectors: 0..{self.vectors - 1}, or NO_VECTOR "
                                         f"{NO_VECTOR:#x})")

    def _check_areas(self, q: QueueState, packed: bool) -> None:
        for area, addr, length, _ in q.layout(packed).areas():
            try:
                self.memory.translate(addr, length)
            except GuestMemoryError:
                regions = ", ".join(f"[{r.gpa:#x}, {r.end:#x})" for r in self.memory)
                raise IncompatibleStateError(
                    f"{self.name}: queue {q.index} {area} area [{addr:#x}, +{length:#x}) of a "
                    f"{q.size}-entry ring lies outside guest memory ({regions})") from None

    def _check_dialect(self, regs: TransportState) -> None:
        if not regs.dialect_negotiated:
            return
        if not self.dialect_feature or not regs.driver_features & self.dialect_feature:
            raise IncompatibleStateError(f"{self.name}: the guest negotiated a stop dialect the destination "
                                         f"does not offer (its stop feature {self.dialect_feature:#x})")
        foreign = regs.guest_status & (Status.SUSPEND | Status.STOP) & ~self.dialect_status
        if foreign:
            raise IncompatibleStateError(f"{self.name}: guest_status {regs.guest_status:#x} has stop bit "
                                         f"{foreign:#x}, the destination's dialect uses {self.dialect_status:#x}")

    def _check_pci(self, regs: TransportState) -> None:
        ours, writable, theirs = self.pci_config_space, self.pci_writable, regs.pci_config_space or b""
        if ours is None or writable is None:
            raise IncompatibleStateError(f"{self.name}: PCI state needs a PCI transport on the destination")
        if len(theirs) != len(ours):
            raise IncompatibleStateError(f"{self.name}: PCI config space of {len(theirs)} bytes, the "
                                         f"destination's is {len(ours)}")
        for offset, (a, b, mask) in enumerate(zip(theirs, ours, writable)):
            if (a ^ b) & ~mask & 0xFF:
                raise IncompatibleStateError(f"{self.name}: PCI config byte {offset:#x} is {a:#04x}, a read-only "
                                             f"value the destination has as {b:#04x}")
        table = len(regs.msix_table or b"")
        if table != self.msix_table_size:
            raise IncompatibleStateError(f"{self.name}: MSI-X table of {table} bytes, the destination's is "
                                         f"{self.msix_table_size}")
        if self.msix_control is None:
            if regs.msix_enabled:
                raise IncompatibleStateError(f"{self.name}: MSI-X enabled, the destination's PCI function has "
                                             "no MSI-X capability")
            return
        control = _U16.unpack_from(theirs, self.msix_control)[0]
        if bool(control & self.MSIX_ENABLE) != regs.msix_enabled:
            raise IncompatibleStateError(f"{self.name}: msix_enabled {regs.msix_enabled} contradicts the MSI-X "
                                         f"control word {control:#06x} in the PCI config space")
