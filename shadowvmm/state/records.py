"""Guest-visible records of a device state: its queues, its transport registers, its rings.

:class:`TransportState` is everything the guest can see through the transport
(status shadow and its flags, feature words and selects, MSI-X vectors and
enable, config generation and bytes, per-queue registers; for PCI the config
space bytes and the MSI-X table); :class:`RingPart` is a stopped ring in the
vhost base encoding (split: next avail index; packed: index + wrap counters).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import StateFormatError
from ..virtio.constants import ISR_CONFIG, ISR_QUEUE, MAX_QUEUE_SIZE, Feature, Status
from ..virtio.packed import PackedLayout
from ..virtio.split import SplitLayout
from ..virtio.vring import RingState
from .schema import FieldSpec, Section, check_range


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
    #: The ring state the driver wrote (VIRTIO_F_RING_STATE, vhost base encoding); None: none
    #: written (and what a state written before this field existed means).
    ring_base: int | None = None

    SCHEMA: ClassVar = (
        FieldSpec("index", int), FieldSpec("size", int), FieldSpec("enabled", bool),
        FieldSpec("desc", int), FieldSpec("driver", int), FieldSpec("device", int),
        FieldSpec("msix_vector", int), FieldSpec("max_size", int, required=False, default=0),
        FieldSpec("ring_base", int, required=False, default=None, optional=True),
    )

    def validate(self) -> None:
        check_range(f"queue {self.index}.index", self.index, 0, 0xFFFF)
        check_range(f"queue {self.index}.max_size", self.max_size, 0, MAX_QUEUE_SIZE)
        check_range(f"queue {self.index}.size", self.size, 1, self.max_size or MAX_QUEUE_SIZE)
        check_range(f"queue {self.index}.msix_vector", self.msix_vector, 0, 0xFFFF)
        for name in ("desc", "driver", "device"):
            check_range(f"queue {self.index}.{name}", getattr(self, name), 0, (1 << 64) - 1)
        if self.ring_base is not None:
            check_range(f"queue {self.index}.ring_base", self.ring_base, 0, 0xFFFFFFFF)

    def check_ring_base(self, packed: bool) -> None:
        """A written ring state fits the ring: split 16 bits, packed idx fields below the size."""
        base = self.ring_base
        if base is None:
            return
        if packed and not ((base & 0x7FFF) < self.size and (base >> 16 & 0x7FFF) < self.size):
            raise StateFormatError(f"queue {self.index}.ring_base: {base:#x} has an index beyond the "
                                   f"{self.size}-entry packed ring")
        if not packed and base > 0xFFFF:
            raise StateFormatError(f"queue {self.index}.ring_base: {base:#x} is wider than a split ring's "
                                   "16-bit avail index")

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
        check_range("transport.guest_status", self.guest_status, 0, 0xFF)
        check_range("transport.config_generation", self.config_generation, 0, 0xFF)
        check_range("transport.isr", self.isr, 0, 0xFF)
        for name in ("device_feature_select", "driver_feature_select"):
            check_range(f"transport.{name}", getattr(self, name), 0, 0xFFFFFFFF)
        check_range("transport.queue_select", self.queue_select, 0, 0xFFFF)
        check_range("transport.config_msix_vector", self.config_msix_vector, 0, 0xFFFF)
        for name in ("device_features", "driver_features"):
            check_range(f"transport.{name}", getattr(self, name), 0, (1 << 128) - 1)
        if self.isr & ~self.ISR_BITS:
            raise StateFormatError(f"transport.isr: {self.isr:#x} has bits outside the queue and config "
                                   f"interrupt bits {self.ISR_BITS:#x} (v1.4 §4.1.4.5)")
        self._check_status()
        if [q.index for q in self.queues] != list(range(len(self.queues))):
            raise StateFormatError("transport.queues: indexes must be 0..n-1 in order")
        for q in self.queues:
            if q.enabled:
                q.check_ring(self.packed)
            q.check_ring_base(self.packed)
        if self.kind == "pci" and self.pci_config_space is None:
            raise StateFormatError("transport: a PCI transport state needs pci_config_space")

    def _check_status(self) -> None:
        status = self.guest_status
        for bit, needs in self.STATUS_ORDER:
            if status & bit.value and not status & needs.value:    # plain ints: enum & costs µs
                raise StateFormatError(f"transport.guest_status: {status:#x} has {bit.name} without "
                                       f"{needs.name} (v1.4 §3.1.1)")
        if status & Status.FEATURES_OK.value:
            extra = self.driver_features & ~self.device_features
            if extra:
                raise StateFormatError(f"transport.driver_features: {self.driver_features:#x} accepts bits "
                                       f"{extra:#x} the device did not offer ({self.device_features:#x})")
            if not self.driver_features & Feature.VERSION_1.value:
                raise StateFormatError(f"transport.driver_features: {self.driver_features:#x} lacks VERSION_1 "
                                       "with FEATURES_OK set (the device refuses such a driver)")
        elif self.dialect_negotiated:
            raise StateFormatError("transport.dialect_negotiated: set without FEATURES_OK")
        stopping = (self.guest_stop_requested or self.guest_stopped
                    or status & (Status.SUSPEND.value | Status.STOP.value))
        if stopping and not self.dialect_negotiated:
            raise StateFormatError(f"transport: a guest stop (status {status:#x}) without a negotiated "
                                   "stop dialect")

    @property
    def packed(self) -> bool:
        return bool(self.driver_features & Feature.RING_PACKED.value)


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
        check_range(f"ring {self.index}.base", self.base, 0, 0xFFFF if self.layout == "split" else 0xFFFFFFFF)

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

