"""Scenarios: the seed's stop and migration cases, runnable against any configured device.

``shadowvmm scenario NAME --config FILE`` runs one (:func:`run_scenario`): it starts the
config's ``[[peer]]`` processes, builds the chosen device with :class:`~shadowvmm.machine.Machine`
(and a second machine as a migration destination, on the same guest memory), drives a guest
(:mod:`.guestio`: blk writes and reads back, rng reads), and reports what the guest read in
``device_status``, exactly-once completion, the data check, the stop latency and the downtime
(:class:`ScenarioReport`), with a :class:`~shadowvmm.timeline.Timeline` of it all.

:data:`SCENARIOS` is the registry: a mapping from name to :class:`Scenario`, the built-in
ones (:mod:`.basic`) and those of every installed plugin. A plugin exports a dict of
:class:`Scenario` s (name -> scenario) as an entry point of group :data:`ENTRY_POINT_GROUP`
(``shadowvmm.scenarios``); its bodies take a :class:`ScenarioContext` (build machines with
``ctx.machine()`` / ``ctx.destination()``, migrate with ``ctx.migrate()``, check with
``ctx.report.check(condition, reason)``). The plugin module is imported while this package
initialises, so it imports :mod:`.registry` and :mod:`.context`, not this package. A plugin that
fails to import, exports something else or reuses a name is an error, never silently missing.
A body that runs a nested level records on the same timeline with its own level
(``Machine(timeline=ctx.timeline, level="L1")``) and adds its guests with ``ctx.guest(machine, "L1")``.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from types import MappingProxyType

from ..errors import ScenarioError
from .basic import BASIC
from .context import LIVE, ScenarioContext, ScenarioReport
from .registry import Scenario, ScenarioBody, run_scenario

#: Entry-point group of scenario plugins: each entry point is a dict name -> :class:`Scenario`.
ENTRY_POINT_GROUP = "shadowvmm.scenarios"


def plugin_scenarios(known: Mapping[str, Scenario]) -> dict[str, Scenario]:
    """The scenarios of every installed plugin (import errors are raised as they are)."""
    found: dict[str, Scenario] = {}
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        table = entry.load()
        if not isinstance(table, Mapping) or not all(
                isinstance(s, Scenario) and s.name == name for name, s in table.items()):
            raise ScenarioError(f"scenario plugin {entry.name!r} ({entry.value}) is not a dict name -> Scenario")
        clash = sorted(set(table) & (set(known) | set(found)))
        if clash:
            raise ScenarioError(f"scenario plugin {entry.name!r} reuses the names {clash}")
        found.update(table)
    return found


#: Every scenario by name, built-in then the plugins' (read-only; see the module docstring).
SCENARIOS: Mapping[str, Scenario] = MappingProxyType({**BASIC, **plugin_scenarios(BASIC)})

__all__ = ["ENTRY_POINT_GROUP", "LIVE", "SCENARIOS", "Scenario", "ScenarioBody", "ScenarioContext",
           "ScenarioReport", "plugin_scenarios", "run_scenario"]
