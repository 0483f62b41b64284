"""What ``shadowvmm run`` reports: one :class:`DeviceReport` per device, the :class:`RunReport`.

Units follow the project's one convention: durations in milliseconds with an ``_ms`` suffix,
sizes in bytes with ``_bytes``. :meth:`RunReport.as_dict` is the ``--json`` document; the text
report prints the same values. A device whose type has no workload is ``SKIPPED``, never
``PASS``; the run passes when every device with a workload passed (``SKIPPED`` when none had one).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ..config import DeviceConfig
from ..shadow import StopDialect
from ..virtio.constants import Feature


class Outcome(enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIPPED = "SKIPPED"


@dataclass
class DeviceReport:
    """One device's run: what it is, what was negotiated, what the workload measured."""

    name: str
    device_type: str = ""
    transport: str = ""
    backend: str = ""
    implementation: str = ""
    workload: str = "none"
    outcome: Outcome = Outcome.SKIPPED
    reason: str = ""
    negotiated: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    guest_faults: int = 0
    #: Workload measurements (counts, ``_ms`` durations, ``_bytes`` sizes).
    measurements: dict[str, Any] = field(default_factory=dict)
    #: The text report's lines for the measurements.
    lines: list[str] = field(default_factory=list)

    def fail(self, reason: str) -> None:
        self.outcome = Outcome.FAIL
        self.reason = reason

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "device_type": self.device_type, "transport": self.transport,
                "backend": self.backend, "implementation": self.implementation, "workload": self.workload,
                "outcome": self.outcome.value, "reason": self.reason, "negotiated": self.negotiated,
                "warnings": self.warnings, "guest_faults": self.guest_faults,
                "measurements": self.measurements}

    def text(self) -> list[str]:
        out = [f"== {self.name}: {self.device_type} over {self.transport}, backend {self.backend} "
               f"({self.implementation})"]
        if self.negotiated:
            out.append(f"   negotiated: {', '.join(self.negotiated)}")
        out.extend(f"   WARNING: {w}" for w in self.warnings)
        out.extend(f"   {line}" for line in self.lines)
        if self.outcome is Outcome.SKIPPED:
            out.append(f"   SKIPPED: {self.reason}")
        elif self.outcome is Outcome.FAIL:
            out.append(f"   FAILED: {self.reason}")
        out.append(f"   guest faults counted: {self.guest_faults}")
        return out


@dataclass
class RunReport:
    """Every device of one ``shadowvmm run``."""

    config: str
    devices: list[DeviceReport] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(d.outcome is Outcome.FAIL for d in self.devices)

    @property
    def result(self) -> Outcome:
        if self.failures:
            return Outcome.FAIL
        return Outcome.PASS if any(d.outcome is Outcome.PASS for d in self.devices) else Outcome.SKIPPED

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def as_dict(self) -> dict[str, Any]:
        return {"config": self.config, "result": self.result.value, "failures": self.failures,
                "devices": [d.as_dict() for d in self.devices]}

    def result_line(self) -> str:
        if self.result is Outcome.FAIL:
            return f"RESULT: FAIL ({self.failures})"
        if self.result is Outcome.SKIPPED:
            return "RESULT: SKIPPED (no device has a workload)"
        skipped = sum(d.outcome is Outcome.SKIPPED for d in self.devices)
        return "RESULT: PASS" + (f" ({skipped} device(s) skipped)" if skipped else "")


def not_negotiated(dev_cfg: DeviceConfig, offered: int, negotiated: int) -> list[str]:
    """What *dev_cfg* asks for that the guest did not end up with: packed rings, the stop
    dialect's feature, VIRTIO_F_RING_STATE (each says whether the device offered it)."""
    spec = dev_cfg.dialect_spec()
    wanted: list[tuple[str, int, str]] = []
    if dev_cfg.packed:
        wanted.append(("packed = true", int(Feature.RING_PACKED), "VIRTIO_F_RING_PACKED"))
    if spec.dialect is not StopDialect.NONE:
        bit = spec.feature.bit_length() - 1
        wanted.append((f'stop_dialect = "{spec.dialect.value}"', spec.feature, f"its feature bit {bit}"))
    if spec.ring_state:
        bit = spec.ring_state.bit_length() - 1
        wanted.append(("ring_state = true", spec.ring_state, f"VIRTIO_F_RING_STATE (bit {bit})"))
    out = []
    for asked, mask, what in wanted:
        if negotiated & mask:
            continue
        why = "the device offered it but the guest driver did not accept it" if offered & mask \
            else "the device did not offer it"
        fallback = " (split rings used)" if mask == Feature.RING_PACKED else ""
        out.append(f"{asked} asked for, {what} not negotiated{fallback}: {why}")
    return out
