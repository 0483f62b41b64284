"""A member device's side of the administration commands (v1.4 §2.12.1.4, §2.13).

An owner's admin queue (:mod:`.adminq`) stops and resumes a member
(DEV_MODE_SET) and reads and restores its device parts. The stop is a third
source next to the VMM's transparent stop and the guest's dialect stop: it
only changes what the reconcile is asked (:meth:`~.sequencer.SequencerMixin._op_reconcile`),
so the same drain-and-capture routine stops the rings, and the status the
member's guest reads never changes.

Parts emitted, in the exchange order (v1.4 §2.12.1.4 "Device parts order"):
DEV_FEATURES (optional), DRV_FEATURES, DEVICE_STATUS, then per queue VQ_CFG
followed by shadowvmm's VQ_STATE (optional, see :mod:`shadowvmm.virtio.admin`),
then per queue VQ_NOTIFY_CFG. PCI_COMMON_CFG is neither emitted nor accepted
(every field it could carry is in the other parts or read-only).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..errors import AdminFormatError, GuestMemoryError, RingError
from ..virtio.admin import (
    DEVICE_STATUS,
    FEATURE_WORDS,
    VQ_PARTS,
    VQ_STATE,
    AdminQualifier,
    Part,
    PartFlag,
    PartType,
    VqCfg,
    VqNotifyCfg,
    in_order,
    pack_features,
    unpack_features,
)
from ..virtio.constants import NO_VECTOR, Feature, Status
from ..virtio.packed import PackedLayout
from ..virtio.split import SplitLayout
from ..virtio.vring import RingState
from .ops import Op, OpKind
from .persistence import PersistenceMixin

log = logging.getLogger(__name__)

#: Status bits a DEVICE_STATUS part may carry: the driver's own (a suspend or stop of the guest's
#: dialect, and NEEDS_RESET, are device states a restore does not take).
SETTABLE_STATUS = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK | Status.FAILED)
_STATUS_ORDER = ((Status.DRIVER, Status.ACKNOWLEDGE), (Status.FEATURES_OK, Status.DRIVER),
                 (Status.DRIVER_OK, Status.FEATURES_OK))


def _invalid(message: str) -> AdminFormatError:
    return AdminFormatError(message, AdminQualifier.INVALID_FIELD)


class PartsMixin(PersistenceMixin):
    """Stopped mode and device parts of a member device (module docstring)."""

    # ------------------------------------------------------------------ mode

    @property
    def admin_stopped(self) -> bool:
        return self._admin_stop

    async def set_admin_mode(self, stopped: bool) -> None:
        """DEV_MODE_SET (v1.4 §2.12.1.4): returns once the rings are stopped (every observed
        buffer used, bases captured) or running again. Repeating a mode succeeds; a member the
        guest has not started is only marked stopped (its rings will not start until resumed)."""
        self._require_realized()
        if stopped == self._admin_stop and not self._ops and not self._op_running:
            return
        self._admin_stop = stopped
        log.info("%s: %s by the owner's admin queue", self.name, "stopped" if stopped else "resumed")
        await self._submit_wait(Op(OpKind.RECONCILE, ("admin-mode",)))

    # ------------------------------------------------------------------ get

    def device_parts(self) -> list[Part]:
        """Every part, in the exchange order. VQ_STATE holds the captured base while stopped
        (a fresh ring's before the first start); while running it is the last one captured."""
        parts = [Part(PartType.DEV_FEATURES, pack_features(self.device_features), flags=PartFlag.OPTIONAL),
                 Part(PartType.DRV_FEATURES, pack_features(self.driver_features)),
                 Part(PartType.DEVICE_STATUS, DEVICE_STATUS.pack(self.shadow.guest_status))]
        for q in self.queues:
            cfg = VqCfg(q.size, q.msix_vector, int(q.enabled), q.desc, q.driver, q.device)
            parts.append(Part(PartType.VQ_CFG, cfg.pack(), q.index))
            parts.append(Part(PartType.VQ_STATE, VQ_STATE.pack(self._saved_base(q.index)), q.index,
                              PartFlag.OPTIONAL))
        for q in self.queues:
            parts.append(Part(PartType.VQ_NOTIFY_CFG, VqNotifyCfg(q.notify_off, q.index).pack(), q.index))
        return parts

    # ------------------------------------------------------------------ set

    def set_device_parts(self, parts: Sequence[Part]) -> None:
        """DEV_PARTS_SET (v1.4 §2.12.1.4): check every part, then apply them all (a refused set
        has no side effect). The caller made sure the member is stopped. Raises
        :class:`AdminFormatError` (status EINVAL) for a part this device refuses."""
        plan = self._check_parts(parts)
        features, status, cfgs, bases = plan
        if features is not None:
            self.driver_features = features
        for index, cfg in cfgs.items():
            q = self.queues[index]
            q.size, q.msix_vector, q.enabled = cfg.size, cfg.vector, bool(cfg.enabled)
            q.desc, q.driver, q.device = cfg.desc, cfg.driver, cfg.device
        for index, base in bases.items():
            self.ring_states[index] = RingState(index, base)
        if status is not None:
            shadow = self.shadow
            shadow.guest_status = status
            dialect = self.policy.dialect.feature
            shadow.dialect_negotiated = bool(status & Status.FEATURES_OK and dialect
                                             and self.driver_features & dialect)
        log.info("%s: %d device parts restored", self.name, len(parts))

    def _check_parts(self, parts: Sequence[Part]
                     ) -> tuple[int | None, int | None, dict[int, VqCfg], dict[int, int]]:
        if not in_order(parts):
            raise _invalid("parts out of the exchange order")
        seen: set[tuple[int, int]] = set()
        features: int | None = None
        status: int | None = None
        cfgs: dict[int, VqCfg] = {}
        bases: dict[int, int] = {}
        for part in parts:
            key = (part.part_type, part.selector if part.part_type in VQ_PARTS else 0)
            if key in seen:
                raise _invalid(f"part {part.part_type:#x} selector {key[1]} given twice")
            seen.add(key)
            kind = part.part_type
            if kind == PartType.DEV_FEATURES:
                if self._features(part) != self.device_features:
                    raise _invalid("DEV_FEATURES differ from the member's")
            elif kind == PartType.DRV_FEATURES:
                features = self._features(part)
            elif kind == PartType.DEVICE_STATUS:
                status = self._status(part)
            elif kind in VQ_PARTS:
                self._check_queue_part(part, cfgs, bases)
            elif not part.flags & PartFlag.OPTIONAL:
                raise _invalid(f"part type {kind:#x} not supported")
        self._check_negotiation(features, status, cfgs, bases)
        return features, status, cfgs, bases

    @staticmethod
    def _features(part: Part) -> int:
        if len(part.value) != 8 * FEATURE_WORDS:
            raise _invalid(f"features part of {len(part.value)} bytes, the member's has {8 * FEATURE_WORDS}")
        return unpack_features(part.value)

    @staticmethod
    def _status(part: Part) -> int:
        if len(part.value) != DEVICE_STATUS.size:
            raise _invalid(f"DEVICE_STATUS of {len(part.value)} bytes")
        (status,) = DEVICE_STATUS.unpack(part.value)
        if status & ~SETTABLE_STATUS:
            raise _invalid(f"DEVICE_STATUS {status:#x} carries device-owned bits")
        for bit, needs in _STATUS_ORDER:
            if status & bit and not status & needs:
                raise _invalid(f"DEVICE_STATUS {status:#x}: {bit.name} without {needs.name}")
        return status

    def _check_queue_part(self, part: Part, cfgs: dict[int, VqCfg], bases: dict[int, int]) -> None:
        index = part.selector
        if index >= len(self.queues):
            raise _invalid(f"part {part.part_type:#x} for queue {index}; the member has {len(self.queues)}")
        q = self.queues[index]
        if part.part_type == PartType.VQ_CFG:
            cfg = VqCfg.unpack(part.value)
            if not 0 < cfg.size <= q.max_size:
                raise _invalid(f"queue {index} size {cfg.size} (max {q.max_size})")
            assert self.interrupts is not None
            if cfg.vector != NO_VECTOR and cfg.vector >= self.interrupts.vectors:
                raise _invalid(f"queue {index} vector {cfg.vector}")
            cfgs[index] = cfg
        elif part.part_type == PartType.VQ_STATE:
            if len(part.value) != VQ_STATE.size:
                raise _invalid(f"VQ_STATE of {len(part.value)} bytes")
            bases[index] = VQ_STATE.unpack(part.value)[0]
        else:
            notify = VqNotifyCfg.unpack(part.value)
            if notify != VqNotifyCfg(q.notify_off, q.index):
                raise _invalid(f"queue {index} notify cfg {notify} differs from the member's (read-only)")

    def _check_negotiation(self, features: int | None, status: int | None, cfgs: dict[int, VqCfg],
                           bases: dict[int, int]) -> None:
        """What the parts describe together: features the member offers, a ring layout that fits
        guest memory, no renegotiation under a started backend session."""
        drv = self.driver_features if features is None else features
        if drv & ~self.device_features:
            raise _invalid(f"DRV_FEATURES {drv:#x} not offered ({self.device_features:#x})")
        if status is not None and status & Status.FEATURES_OK and not drv & Feature.VERSION_1:
            raise _invalid("FEATURES_OK without VERSION_1")
        if self.started and drv != self.driver_features:
            raise _invalid("DRV_FEATURES change under a started backend session (reset the member first)")
        packed = bool(drv & Feature.RING_PACKED)
        for index, base in bases.items():
            if not packed and base > 0xFFFF:
                raise _invalid(f"queue {index} split ring base {base:#x} past 16 bits")
        for index, cfg in cfgs.items():
            if not packed and cfg.size & (cfg.size - 1):
                raise _invalid(f"queue {index} split ring size {cfg.size} not a power of 2")
            if cfg.enabled:
                self._check_ring(index, cfg, packed)

    def _check_ring(self, index: int, cfg: VqCfg, packed: bool) -> None:
        layout: PackedLayout | SplitLayout
        if packed:
            layout = PackedLayout(cfg.size, cfg.desc, cfg.driver, cfg.device)
        else:
            layout = SplitLayout(cfg.size, cfg.desc, cfg.driver, cfg.device)
        try:
            layout.validate()
            layout.check_memory(self.memory)
        except (RingError, GuestMemoryError) as exc:
            raise _invalid(f"queue {index} ring: {exc}") from exc
