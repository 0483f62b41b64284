"""Device state model for migration, serialized with msgpack.

The records live in :mod:`shadowvmm.state` (below the device, which exports
and imports them) and are re-exported here; :class:`Destination`, the check of
a state against the device that is to load it, is the migration layer's own.

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

An admin-queue owner, or a member its DEV_MODE_SET left stopped, also carries an
:class:`~shadowvmm.state.AdminState` (format 2, :mod:`shadowvmm.state.admin`).

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

from dataclasses import dataclass
from typing import ClassVar

from ..errors import GuestMemoryError, IncompatibleStateError, StateFormatError, UnknownRequiredFieldError
from ..memory import GuestMemory
from ..state import EMPTY_TRANSPORT as _EMPTY_TRANSPORT
from ..state import (
    FORMAT_VERSION,
    MIN_FORMAT_VERSION,
    REQUIRED,
    STANDARD_TYPES,
    BlkStandard,
    DeviceState,
    FieldSpec,
    FsStandard,
    NetStandard,
    OpaquePart,
    QueueState,
    RingPart,
    RngStandard,
    Section,
    Standard,
    TransportState,
    shown,
)
from ..state import STANDARD_BY_ID as _STANDARD_BY_ID
from ..state import STANDARD_BY_NAME as _STANDARD_BY_NAME
from ..state import U16 as _U16
from ..state import U32 as _U32
from ..state import U64 as _U64
from ..state import check_range as _check_range
from ..state.standard import _field
from ..virtio.constants import ISR_CONFIG, ISR_QUEUE, MAX_QUEUE_SIZE, NO_VECTOR, DeviceId, Feature, Status
from ..virtio.packed import PackedLayout
from ..virtio.split import SplitLayout
from ..virtio.vring import RingState

__all__ = [
    # the state records (shadowvmm.state), as they were importable from here
    "FORMAT_VERSION", "MIN_FORMAT_VERSION", "REQUIRED", "STANDARD_TYPES", "BlkStandard", "DeviceState",
    "FieldSpec", "FsStandard", "NetStandard", "OpaquePart", "QueueState", "RingPart", "RngStandard", "Section",
    "Standard", "TransportState", "shown", "_EMPTY_TRANSPORT", "_STANDARD_BY_ID", "_STANDARD_BY_NAME", "_U16",
    "_U32", "_U64", "_check_range", "_field",
    # names this module imported and others imported from it
    "GuestMemory", "GuestMemoryError", "IncompatibleStateError", "StateFormatError", "UnknownRequiredFieldError",
    "ISR_CONFIG", "ISR_QUEUE", "MAX_QUEUE_SIZE", "NO_VECTOR", "DeviceId", "Feature", "Status", "PackedLayout",
    "SplitLayout", "RingState",
    # the migration layer's own
    "Destination",
]


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
