"""The migratable state of one device, and its msgpack envelope.

A :class:`DeviceState` has four parts: the :class:`~.records.TransportState`,
a :class:`~.records.RingPart` per started ring, the standard part of its device
type (:mod:`.standard`) and an optional :class:`OpaquePart` (implementation
state, for vhost-user the DEVICE_STATE blob, that only the same implementation
may load); an admin-queue owner or a stopped admin member also carries an
:class:`~.admin.AdminState` (format 2). :meth:`DeviceState.digest` is the sha256 of the canonical encoding
at the state's own format: what a destination applied, confirmed to the source.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack

from ..errors import IncompatibleStateError, StateFormatError, UnknownRequiredFieldError
from ..virtio.vring import RingState
from .admin import ADMIN_SINCE, AdminState
from .records import RingPart, TransportState
from .schema import FORMAT_VERSION, MIN_FORMAT_VERSION, REQUIRED, FieldSpec, Section, shown
from .standard import STANDARD_BY_NAME, Standard


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
    #: The admin group part (:mod:`.admin`): an owner's group, a member's stopped mode.
    admin: AdminState | None = None

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
        if self.admin is not None:
            if version < ADMIN_SINCE:
                raise StateFormatError(f"{self.name}: the admin part needs state format {ADMIN_SINCE}, "
                                       f"asked for {version}")
            out[REQUIRED + "admin"] = self.admin.to_wire(version)
        return out

    @classmethod
    def from_wire(cls, data: Any, version: int, where: str) -> DeviceState:
        if not isinstance(data, dict):
            raise StateFormatError(f"{where}: expected a map, got {type(data).__name__}")
        rest = dict(data)
        raw_standard = rest.pop(REQUIRED + "standard", rest.pop("standard", None))
        raw_admin = rest.pop(REQUIRED + "admin", None)
        if raw_admin is not None and version < ADMIN_SINCE:
            raise StateFormatError(f"{where}.admin: in a state of format {version} (introduced in {ADMIN_SINCE})")
        state = super().from_wire(rest, version, where)
        standard = None
        if raw_standard is not None:
            if not isinstance(raw_standard, dict):
                raise StateFormatError(f"{where}.standard: expected a map")
            body = dict(raw_standard)
            kind_name = body.pop(REQUIRED + "type", None)
            kind = STANDARD_BY_NAME.get(kind_name) if isinstance(kind_name, str) else None
            if kind is None:
                raise UnknownRequiredFieldError(f"{where}.standard: device type {kind_name!r} is unknown "
                                                f"to this reader (format {FORMAT_VERSION})")
            standard = kind.from_wire(body, version, f"{where}.standard")
        admin = None if raw_admin is None else AdminState.from_wire(raw_admin, version, f"{where}.admin")
        obj = cls(state.name, state.device_id, state.transport, state.rings, standard, state.opaque, version, admin)
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
