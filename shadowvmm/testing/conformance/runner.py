"""Running the steps: one :class:`StepResult` each, in order; a step needing a failed one is skipped."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ...backends.base import Capability
from .catalog import STEPS, Step
from .report import ConformanceReport, Outcome, StepResult
from .rig import ConformanceOptions, Context, Factory, close_shared
from .workloads import device_id_of, io_unavailable

__all__ = ["STEP_NAMES", "expected_outcomes", "not_offered", "run_conformance"]

STEP_NAMES: tuple[str, ...] = tuple(step.name for step in STEPS)


def not_offered(caps: Capability, *, migrate: bool = False, single_session: bool = False) -> set[str]:
    """The steps a backend with *caps* skips: it offers none of the capabilities they require;
    ``migrate`` unless the run has a destination (``migrate_factory``); with *single_session*,
    those needing a second session."""
    skipped = {step.name for step in STEPS if step.requires and not caps & step.requires}
    if not migrate or single_session:
        skipped.add("migrate")
    if single_session:
        skipped |= {"reconnect", "device-state"}
    return skipped


def expected_outcomes(*, fail: tuple[str, ...] = (), skip: set[str] | tuple[str, ...] = ()) -> dict[str, Outcome]:
    """The outcomes of a run where the steps *fail* fail and *skip* are not offered: the
    others pass, except those needing a failed step, which the kit skips (for a fault
    injector's tests: assert ``report.outcomes() == expected_outcomes(...)``)."""
    wanted: dict[str, Outcome] = {}
    broken: set[str] = set()
    for step in STEPS:
        if step.name in fail or any(need in broken for need in step.needs):
            wanted[step.name] = Outcome.FAIL if step.name in fail else Outcome.SKIP
            broken.add(step.name)
        else:
            wanted[step.name] = Outcome.SKIP if step.name in skip else Outcome.PASS
    return wanted


def _error(exc: BaseException) -> str:
    if isinstance(exc, AssertionError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _why_not(ctx: Context, step: Step) -> str | None:
    """Why *step* does not apply to this backend (None: it does)."""
    if step.io and (reason := io_unavailable(ctx.device_id, ctx.options.workload())):
        return reason
    if step.requires:
        caps = await ctx.capabilities()
        if not caps & step.requires:
            wanted = " or ".join(f"Capability.{c.name}" for c in Capability if c and c in step.requires)
            return f"not offered: {step.offered_as or wanted}"
    if step.applies is not None:
        return await step.applies(ctx)
    return None


async def _run_step(ctx: Context, step: Step, broken: set[str]) -> StepResult:
    started = time.monotonic()

    def result(outcome: Outcome, detail: str) -> StepResult:
        return StepResult(step.name, outcome, detail, time.monotonic() - started, step.spec)

    blocked = [name for name in step.needs if name in broken]
    if blocked:
        broken.add(step.name)
        return result(Outcome.SKIP, f"needs {blocked[0]}, which failed")
    if ctx.options.single_session and broken and step.name != "close":
        return result(Outcome.SKIP, f"the single session failed at {min(broken, key=STEP_NAMES.index)}")
    timeout = ctx.options.step_timeout
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            if reason := await _why_not(ctx, step):
                return result(Outcome.SKIP, reason)
            detail = await step.run(ctx)
    except Exception as exc:
        broken.add(step.name)
        return result(Outcome.FAIL, f"timed out after {timeout} s" if deadline.expired() else _error(exc))
    return result(Outcome.PASS, detail)


async def run_conformance(factory: Factory, device_type: str | Any, **options: Any) -> ConformanceReport:
    """Run every step (or ``steps=(...)``) against backends from *factory*; *options* are
    :class:`ConformanceOptions` fields. *device_type*: ``"blk"``, ``"rng"``, ``"net"``,
    ``"fs"`` or a :class:`~shadowvmm.virtio.constants.DeviceId`."""
    opts = ConformanceOptions(**options)
    device_id = device_id_of(device_type)
    ctx = Context(factory, device_id, opts)
    report = ConformanceReport("?", device_id.name.lower())
    broken: set[str] = set()
    try:
        for step in STEPS:
            if opts.steps is not None and step.name not in opts.steps:
                continue
            report.steps.append(await _run_step(ctx, step, broken))
    finally:
        await close_shared(ctx)
    report.implementation = ctx.implementation
    if opts.single_session:
        report.warnings.append(f"single-session peer: {opts.single_session}; every step ran on one session")
    return report
