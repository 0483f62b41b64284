"""The status shadow and the feature policy.

What the guest reads in ``device_status`` is a shadow (the 2021 thread:
"The guest won't see the real device status bit. VMM will shadow the device
status bit"). Two fields are kept apart:

* :attr:`StatusShadow.guest_status`: the byte the guest reads; it only
  changes through guest writes, a completed reset, a stop dialect the guest
  itself drove, or DEVICE_NEEDS_RESET raised by the device;
* :class:`RunState`: the backend's run state, driven by the VMM
  (transparent stop/resume for migration) and by the guest.

The :class:`FeaturePolicy` decides which features are offered to the guest
and which bits the VMM owns (the stop feature of a dialect, emulated on top
of backend primitives and never forwarded to the backend).
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from dataclasses import dataclass, field

from .errors import ConfigError
from .virtio.constants import TRANSPORT_FEATURE_MASK, Feature, Status

log = logging.getLogger(__name__)


class RunState(enum.Enum):
    """Backend run state (separate from what the guest reads)."""

    RUNNING = "running"    #: backend may run (rings live once the guest set DRIVER_OK)
    STOPPING = "stopping"  #: a stop is being carried out
    STOPPED = "stopped"    #: backend rings stopped, ring state captured
    FAILED = "failed"      #: backend failed; guest sees DEVICE_NEEDS_RESET


class StopDialect(enum.Enum):
    """How (and whether) a stop feature is offered to the guest."""

    NONE = "none"        #: transparent VMM stop only; guest stop bits are ignored
    SUSPEND = "suspend"  #: virtio 1.4 VIRTIO_F_SUSPEND (bit 43), status SUSPEND 0x10
    STOP = "stop"        #: 2021 STOP proposal: status 0x20, feature bit configurable


#: Bits the 2021 STOP dialect (and its VIRTIO_F_RING_STATE companion) may use without colliding
#: with published ones. virtio 1.4 §6 reserves 44-49 "for future use": a future spec may assign
#: them, so a config must name the bit it takes (see :mod:`shadowvmm.config`).
STOP_FEATURE_BITS = range(44, 50)

#: What a ring-state register reads while the device is not stopped (docs/nested.md): never a
#: valid state, since a packed state's index fields (bits 0-14, 16-30) would be 0x7FFF, above any
#: queue size (at most 0x8000 entries, v1.4 §2.8), and a split state has bits 16-31 clear.
RING_STATE_RUNNING_VALUE = 0xFFFFFFFF


@dataclass(frozen=True)
class DialectSpec:
    """The feature bit and status bit a stop dialect exposes.

    ``ring_state`` is the VIRTIO_F_RING_STATE mask (2021 proposal, shadowvmm-private bit): the
    per-queue ring-state registers; only with the STOP dialect. The VMM owns both bits.
    """

    dialect: StopDialect
    feature: int = 0
    status: int = 0
    ring_state: int = 0

    @classmethod
    def make(cls, dialect: StopDialect, stop_feature_bit: int = 44, *, ring_state: bool = False,
             ring_state_feature_bit: int | None = None) -> DialectSpec:
        """The spec of *dialect*; ConfigError (keys ``device.*``) for bits that cannot be used."""
        if ring_state and dialect is not StopDialect.STOP:
            raise ConfigError("device.ring_state",
                              f'needs stop_dialect = "stop" (the ring-state registers are read while the '
                              f'guest has the device stopped), got "{dialect.value}"')
        if dialect is StopDialect.SUSPEND:
            return cls(dialect, int(Feature.SUSPEND), int(Status.SUSPEND))
        if dialect is StopDialect.STOP:
            if stop_feature_bit not in STOP_FEATURE_BITS:
                raise ConfigError("device.stop_feature_bit",
                                  f"{stop_feature_bit} collides with a published bit; use 44..49")
            ring = 0
            if ring_state:
                bit = stop_feature_bit + 1 if ring_state_feature_bit is None else ring_state_feature_bit
                if bit not in STOP_FEATURE_BITS or bit == stop_feature_bit:
                    raise ConfigError("device.ring_state_feature_bit",
                                      f"{bit} is not usable: give a bit in 44..49 other than stop_feature_bit "
                                      f"{stop_feature_bit} (default: stop_feature_bit + 1)")
                ring = 1 << bit
            return cls(dialect, 1 << stop_feature_bit, int(Status.STOP), ring)
        return cls(dialect)


@dataclass(frozen=True)
class FeaturePolicy:
    """Which backend features the guest is offered, and which the VMM owns."""

    dialect: DialectSpec = field(default_factory=lambda: DialectSpec(StopDialect.NONE))
    #: Device-type bits hidden from the guest (e.g. a feature we cannot migrate).
    mask: int = 0
    #: Transport bits the VMM-side transport and rings implement (passed through when offered).
    transport_supported: int = int(Feature.VERSION_1 | Feature.INDIRECT_DESC | Feature.EVENT_IDX
                                   | Feature.RING_PACKED | Feature.IN_ORDER)
    #: Transport bits the VMM emulates itself on top of backend ring operations.
    vmm_emulated: int = int(Feature.RING_RESET)

    @property
    def vmm_owned(self) -> int:
        """Bits emulated by the VMM and never forwarded to the backend."""
        return self.dialect.feature | self.dialect.ring_state | self.vmm_emulated

    def offer(self, backend_features: int) -> int:
        """Features offered to the guest for a backend offering *backend_features*."""
        device_bits = backend_features & ~TRANSPORT_FEATURE_MASK & ~self.mask
        transport_bits = backend_features & TRANSPORT_FEATURE_MASK & self.transport_supported
        return int(device_bits | transport_bits | self.vmm_owned)

    def to_backend(self, driver_features: int) -> int:
        """What is forwarded to the backend: the guest's choice minus VMM-owned bits."""
        return int(driver_features) & ~self.vmm_owned


class GuestFault(enum.Enum):
    """Guest mistakes the transport ignores, counts and logs (documented choice)."""

    UNKNOWN_OFFSET = "unknown register offset"
    BAD_WIDTH = "access width not allowed for the register"
    READ_ONLY = "write to a read-only register"
    WRITE_ONLY = "read of a write-only register"
    QUEUE_SELECT = "queue_select out of range"
    QUEUE_SIZE = "queue size invalid (0, above max or not a power of 2)"
    QUEUE_LIVE = "queue field written while the queue is enabled"
    QUEUE_DISABLE = "driver wrote 0 to queue_enable"
    STATUS_CLEAR = "status bits cleared without reset"
    STATUS_ORDER = "status bit set out of order"
    FEATURES_REFUSED = "FEATURES_OK with features the device did not offer"
    FEATURES_LATE = "driver features written after FEATURES_OK"
    DIALECT_NOT_OFFERED = "stop/suspend status bit written but not negotiated"
    DEVICE_OWNED_BIT = "driver wrote a device-owned status bit"
    NOTIFY_INVALID = "notification for a queue that is not enabled"
    CONFIG_RANGE = "device config access out of range"
    CONFIG_WHILE_STOPPED = "device config written while suspended or stopped (v1.4 §3.4)"
    RING_STATE_NOT_NEGOTIATED = "ring-state register accessed without VIRTIO_F_RING_STATE negotiated"
    RING_STATE_RUNNING = "ring-state register read while the device is not stopped"
    RING_STATE_WRITE_TIME = "ring-state register written outside FEATURES_OK..DRIVER_OK"
    RING_STATE_INVALID = "ring-state value invalid for the queue (split: above 16 bits; packed: idx >= size)"


class FaultCounter:
    """Counts and logs ignored guest accesses; never raises."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: Counter[GuestFault] = Counter()

    def __call__(self, fault: GuestFault, detail: str = "") -> None:
        self.counts[fault] += 1
        if self.counts[fault] <= 8:
            log.warning("%s: guest fault: %s %s", self.name, fault.value, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class GuestStatusAction(enum.Enum):
    """What a guest status write asks the device layer to do."""

    NONE = enum.auto()
    RESET = enum.auto()
    FEATURES_OK = enum.auto()
    DRIVER_OK = enum.auto()
    GUEST_STOP = enum.auto()
    GUEST_RESUME = enum.auto()


_NEEDS_RESET = int(Status.NEEDS_RESET)
_FEATURES_OK = int(Status.FEATURES_OK)
_DRIVER_OK = int(Status.DRIVER_OK)
_STOP_BITS = int(Status.SUSPEND | Status.STOP)
#: A bit may only be set once the bit it depends on is set (v1.4 §3.1.1).
_ORDER = ((int(Status.DRIVER), int(Status.ACKNOWLEDGE)),
          (_FEATURES_OK, int(Status.DRIVER)),
          (_DRIVER_OK, _FEATURES_OK))


class StatusShadow:
    """The guest-visible status byte and its transition rules (v1.4 §2.1, §3.1)."""

    def __init__(self, dialect: DialectSpec, faults: FaultCounter) -> None:
        self.dialect = dialect
        self.faults = faults
        self._status = 0
        #: Guest negotiated the dialect's feature bit (set at FEATURES_OK).
        self.dialect_negotiated = False
        #: Guest asked the device to stop through its dialect and it has not resumed.
        self.guest_stop_requested = False
        #: The guest-requested stop is complete (status shows it).
        self.guest_stopped = False
        self.reset_pending = False

    @property
    def guest_status(self) -> int:
        return self._status

    @guest_status.setter
    def guest_status(self, value: int) -> None:
        self._status = int(value) & 0xFF

    def read(self) -> int:
        return self._status

    def write(self, value: int) -> GuestStatusAction:
        """Apply a guest write; returns the action for the device layer.

        Plain ints on this path: IntFlag arithmetic costs microseconds.
        """
        value = int(value) & 0xFF
        if value == 0:
            self.reset_pending = True
            return GuestStatusAction.RESET
        old = self._status
        if value == old:
            return GuestStatusAction.NONE
        if value & _NEEDS_RESET and not old & _NEEDS_RESET:
            self.faults(GuestFault.DEVICE_OWNED_BIT, f"{value:#x}")
        value = (value & ~_NEEDS_RESET) | (old & _NEEDS_RESET)
        dialect_bit = self.dialect.status
        foreign = _STOP_BITS & ~dialect_bit
        if value & foreign or (value & dialect_bit and not self.dialect_negotiated):
            self.faults(GuestFault.DIALECT_NOT_OFFERED, f"{value:#x}")
            value &= ~(foreign | (0 if self.dialect_negotiated else dialect_bit))
        if dialect_bit and self.dialect_negotiated:
            action = self._dialect_write(old, value)
            if action is not None:
                return action
        cleared = old & ~value & ~dialect_bit
        if cleared:
            self.faults(GuestFault.STATUS_CLEAR, f"{old:#x} -> {value:#x}")
            return GuestStatusAction.NONE
        new_bits = value & ~old
        for bit, needs in _ORDER:
            if new_bits & bit and not value & needs:
                self.faults(GuestFault.STATUS_ORDER, f"{Status(bit).name} without {Status(needs).name}")
                new_bits &= ~bit
                value &= ~bit
        self._status = old | new_bits
        if new_bits & _FEATURES_OK:
            return GuestStatusAction.FEATURES_OK
        if new_bits & _DRIVER_OK:
            return GuestStatusAction.DRIVER_OK
        return GuestStatusAction.NONE

    def _dialect_write(self, old: int, value: int) -> GuestStatusAction | None:
        bit = self.dialect.status
        if self.dialect.dialect is StopDialect.SUSPEND:
            if self.guest_stop_requested:
                if value & Status.DRIVER_OK and (self.guest_stopped or not old & Status.DRIVER_OK):
                    self.guest_stop_requested = False
                    return GuestStatusAction.GUEST_RESUME
                return GuestStatusAction.NONE
            if value & bit and not old & bit:
                if not old & Status.DRIVER_OK:
                    self.faults(GuestFault.STATUS_ORDER, "SUSPEND before DRIVER_OK")
                    return GuestStatusAction.NONE
                self.guest_stop_requested = True
                return GuestStatusAction.GUEST_STOP
            return None
        if value & bit and not old & bit:
            if not old & Status.DRIVER_OK:
                self.faults(GuestFault.STATUS_ORDER, "STOP before DRIVER_OK")
                return GuestStatusAction.NONE
            self.guest_stop_requested = True
            return GuestStatusAction.GUEST_STOP
        if old & bit and not value & bit:
            self.faults(GuestFault.STATUS_CLEAR, "STOP is cleared only by reset")
            return GuestStatusAction.NONE
        return None

    def guest_stop_done(self) -> None:
        """The device finished a guest-requested stop: reflect it in the status."""
        if not self.guest_stop_requested:
            return
        self.guest_stopped = True
        if self.dialect.dialect is StopDialect.SUSPEND:
            self.guest_status = (self.guest_status | Status.SUSPEND) & ~Status.DRIVER_OK
        else:
            self.guest_status |= Status.STOP

    def guest_resume_done(self) -> None:
        """A SUSPEND-dialect resume completed (v1.4: SUSPEND=0, DRIVER_OK=1)."""
        self.guest_stopped = False
        self.guest_status = (self.guest_status & ~Status.SUSPEND) | Status.DRIVER_OK

    def refuse_features(self) -> None:
        """FEATURES_OK is refused by not letting the bit stick (v1.4 §3.1.1 step 6).

        A DRIVER_OK written together with the refused FEATURES_OK is dropped too
        (DRIVER_OK requires FEATURES_OK).
        """
        self.guest_status &= ~int(Status.FEATURES_OK | Status.DRIVER_OK)

    def reset_done(self) -> None:
        self.guest_status = 0
        self.reset_pending = False
        self.dialect_negotiated = False
        self.guest_stop_requested = False
        self.guest_stopped = False

    def needs_reset(self) -> None:
        """The device failed (v1.4 §2.1.2: DEVICE_NEEDS_RESET)."""
        self.guest_status |= Status.NEEDS_RESET

    @property
    def driver_ok(self) -> bool:
        return bool(self.guest_status & _DRIVER_OK) or self.guest_stopped
