"""What a scenario is (:class:`Scenario`) and how one runs (:func:`run_scenario`)."""

from __future__ import annotations

import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config import MachineConfig
from ..errors import ScenarioError, ShadowVmmError
from ..timeline import Timeline
from .context import ScenarioContext, ScenarioReport
from .peers import PeerSource, StartedPeers

#: A scenario's body: it builds its machines through the context and checks into its report.
ScenarioBody = Callable[[ScenarioContext], Awaitable[None]]


@dataclass(frozen=True)
class Scenario:
    """A named scenario: a one-line summary and its body."""

    name: str
    summary: str
    run: ScenarioBody


async def run_scenario(scenarios: Mapping[str, Scenario], name: str, cfg: MachineConfig,
                       device: str | None = None, timeline: Timeline | None = None, *,
                       peers: PeerSource | None = None, admin: bool = False,
                       strict: bool = False) -> ScenarioReport:
    """Run scenario *name* against *device* of *cfg* (default: its first device).

    The config's ``[[peer]]`` processes are started first and stopped last (*peers*: another
    source of the device's backend, e.g. a test's running peer). *admin*: the guest's stops go
    through an owner's admin queue (:attr:`ScenarioContext.admin`). A device or driver failure
    fails the scenario with its reason, or with *strict* raises its typed error (a refusal
    asserted as such); a bad name or device raises :class:`ScenarioError`.
    """
    scenario = scenarios.get(name)
    if scenario is None:
        raise ScenarioError(f"no scenario {name!r} (known: {', '.join(scenarios)})")
    if not cfg.devices:
        raise ScenarioError("the config has no device")
    chosen = next((d for d in cfg.devices if d.name == device), None) if device else cfg.devices[0]
    if chosen is None:
        raise ScenarioError(f"no device {device!r} in the config ({', '.join(d.name for d in cfg.devices)})")
    report = ScenarioReport(name, chosen.name, chosen.backend, chosen.transport, chosen.stop_dialect.value)
    timeline = timeline if timeline is not None else Timeline()
    source = peers if peers is not None else StartedPeers(cfg)
    with source as started, tempfile.TemporaryDirectory(prefix="shadowvmm-scenario-") as tmp:
        ctx = ScenarioContext(name, cfg, chosen, started, timeline, Path(tmp), report, admin=admin)
        try:
            await scenario.run(ctx)
        except ScenarioError:
            raise
        except (ShadowVmmError, OSError, TimeoutError) as exc:
            if strict:
                raise
            report.check(False, f"{type(exc).__name__}: {exc}")
        finally:
            ctx.finish()
            await ctx.close()
    report.check(report.exactly_once, f"{report.submitted} requests, {report.completed} completions, "
                                      f"{len(report.violations)} ring violations: not exactly once")
    report.check(not report.mismatches, f"{report.mismatches} block reads returned other data than written "
                                        f"(an in-memory disk per backend does not migrate: give the backend an image)")
    for level, values in report.statuses.items():
        bad = [v for v in values if v & 0xC0]
        report.check(not bad, f"{level}: the guest read NEEDS_RESET or FAILED ({[hex(v) for v in bad]})")
    return report
