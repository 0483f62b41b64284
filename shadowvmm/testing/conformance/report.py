"""What a conformance run reports: one :class:`StepResult` per step."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field

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


@dataclass
class ConformanceReport:
    """The steps of one run, in the order they ran."""

    implementation: str
    device_type: str
    steps: list[StepResult] = field(default_factory=list)

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

    def format(self) -> str:
        """A table: step, outcome, seconds, detail."""
        width = max((len(step.name) for step in self.steps), default=4)
        lines = [f"conformance of {self.implementation} ({self.device_type}): "
                 f"{sum(s.outcome is Outcome.PASS for s in self.steps)} passed, {len(self.failed)} failed, "
                 f"{sum(s.outcome is Outcome.SKIP for s in self.steps)} skipped",
                 f"{'step'.ljust(width)}  outcome  seconds  detail"]
        for step in self.steps:
            lines.append(f"{step.name.ljust(width)}  {step.outcome.value:<7}  {step.seconds:7.3f}  {step.detail}")
        return "\n".join(lines)
