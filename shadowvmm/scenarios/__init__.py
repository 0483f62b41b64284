"""Scenarios: the seed's stop and migration cases, runnable against any configured device.

``shadowvmm scenario NAME --config FILE`` runs one (:func:`run_scenario`): it starts the
config's ``[[peer]]`` processes, builds the chosen device with :class:`~shadowvmm.machine.Machine`
(and a second machine as a migration destination, on the same guest memory), drives a guest
(:mod:`.guestio`: blk writes and reads back, rng reads), and reports what the guest read in
``device_status``, exactly-once completion, the data check, the stop latency and the downtime
(:class:`ScenarioReport`), with a :class:`~shadowvmm.timeline.Timeline` of it all.

:data:`SCENARIOS` holds the built-in ones; :func:`all_scenarios` adds those plugins register
in the entry-point group ``shadowvmm.scenarios`` (each entry point: a mapping from name to
:class:`Scenario`, e.g. ``nested = "shadowvmm_nested.scenario:NESTED"`` for ``l1-moves-l2``),
so the core never imports a plugin. A scenario body takes a :class:`ScenarioContext` (build
machines with ``ctx.machine()`` / ``ctx.destination()``, migrate with ``ctx.migrate()``, check
with ``ctx.report.check(condition, reason)``). A body that runs a nested level records on the
same timeline with its own level (``Machine(timeline=ctx.timeline, level="L1")``) and adds its
guests with ``ctx.guest(machine, "L1")``.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from types import MappingProxyType

from ..errors import PluginError
from .basic import BASIC
from .context import LIVE, ScenarioContext, ScenarioReport
from .registry import Scenario, ScenarioBody, run_scenario

#: The built-in scenarios by name (read-only; :func:`all_scenarios` adds the plugins').
SCENARIOS: Mapping[str, Scenario] = MappingProxyType({**BASIC})
#: Where plugins register scenarios: each entry point loads a mapping of name to Scenario.
ENTRY_POINT_GROUP = "shadowvmm.scenarios"


def all_scenarios() -> Mapping[str, Scenario]:
    """The built-in scenarios and every plugin's (:data:`ENTRY_POINT_GROUP`). A plugin that fails
    to import, exports something else than Scenarios, or reuses a name raises PluginError."""
    found: dict[str, Scenario] = dict(SCENARIOS)
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        try:
            exported = ep.load()
        except Exception as exc:
            raise PluginError(f"scenarios {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        if not isinstance(exported, Mapping):
            raise PluginError(f"scenarios {ep.name!r} ({ep.value}) is not a mapping of name to Scenario")
        for name, scenario in exported.items():
            if not isinstance(scenario, Scenario) or scenario.name != name:
                raise PluginError(f"scenarios {ep.name!r}: {name!r} is not a Scenario of that name")
            if name in found:
                raise PluginError(f"scenarios {ep.name!r}: {name!r} is already registered")
            found[name] = scenario
    return MappingProxyType(found)


__all__ = ["ENTRY_POINT_GROUP", "LIVE", "SCENARIOS", "Scenario", "ScenarioBody", "ScenarioContext",
           "ScenarioReport", "all_scenarios", "run_scenario"]
