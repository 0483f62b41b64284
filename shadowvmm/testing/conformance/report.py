"""What a conformance run reports: one :class:`StepResult` per step, each with the spec section it checks."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ConformanceReport", "Outcome", "StepResult"]


class Outcome(enum.Enum):
    PASS = "PASS"
    FAIL = "FAIL"   #: the backend (or the device driving it) did something wrong: ``detail`` says what
    SKIP = "SKIP"   #: not applicable: a capability not offered, or a step it needs failed


@dataclass(frozen=True)
class StepResult:
    name: str
    outcome: Outcome
    detail: str = ""
    seconds: float = 0.0
    #: The spec section the step checks (``"virtio 1.2 §3.1.1"``, ``"vhost-user: GET_VRING_BASE"``).
    spec: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.name, "outcome": self.outcome.value, "spec": self.spec, "detail": self.detail,
                "seconds": round(self.seconds, 3)}


@dataclass
class ConformanceReport:
    """The steps of one run, in the order they ran; *warnings* are notes on the peer (a
    single-session peer) that change what the run could check."""

    implementation: str
    device_type: str
    steps: list[StepResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[StepResult]:
        return iter(self.steps)

    def __getitem__(self, name: str) -> StepResult:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    def outcomes(self) -> dict[str, Outcome]:
        """Step name -> outcome."""
        return {step.name: step.outcome for step in self.steps}

    @property
    def failed(self) -> list[StepResult]:
        """The steps that failed (empty: the backend conforms, as far as the run went)."""
        return [step for step in self.steps if step.outcome is Outcome.FAIL]

    def summary(self) -> str:
        return (f"conformance of {self.implementation} ({self.device_type}): "
                f"{sum(s.outcome is Outcome.PASS for s in self.steps)} passed, {len(self.failed)} failed, "
                f"{sum(s.outcome is Outcome.SKIP for s in self.steps)} skipped")

    def format(self) -> str:
        """A table: step, outcome, seconds, spec section, detail; the warnings after it."""
        width = max((len(step.name) for step in self.steps), default=4)
        spec = max((len(step.spec) for step in self.steps), default=4)
        lines = [self.summary(), f"{'step'.ljust(width)}  outcome  seconds  {'spec'.ljust(spec)}  detail"]
        for step in self.steps:
            lines.append(f"{step.name.ljust(width)}  {step.outcome.value:<7}  {step.seconds:7.3f}  "
                         f"{step.spec.ljust(spec)}  {step.detail}")
        lines.extend(f"warning: {text}" for text in self.warnings)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (what ``shadowvmm check --json`` prints)."""
        return {"implementation": self.implementation, "device_type": self.device_type,
                "passed": not self.failed, "warnings": list(self.warnings),
                "steps": [step.to_dict() for step in self.steps]}
