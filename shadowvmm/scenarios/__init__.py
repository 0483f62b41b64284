"""Scenarios: the seed's stop and migration cases, runnable against any configured device.

``shadowvmm scenario NAME --config FILE`` runs one (:func:`run_scenario`): it starts the
config's ``[[peer]]`` processes, builds the chosen device with :class:`~shadowvmm.machine.Machine`
(and a second machine as a migration destination, on the same guest memory), drives a guest
(:mod:`.guestio`: blk writes and reads back, rng reads), and reports what the guest read in
``device_status``, exactly-once completion, the data check, the stop latency and the downtime
(:class:`ScenarioReport`), with a :class:`~shadowvmm.timeline.Timeline` of it all.

:data:`SCENARIOS` is the registry: a mapping from name to :class:`Scenario`. To add scenarios,
write a module here whose bodies take a :class:`ScenarioContext` (build machines with
``ctx.machine()`` / ``ctx.destination()``, migrate with ``ctx.migrate()``, check with
``ctx.report.check(condition, reason)``) and that exports its own dict of
:class:`Scenario` s, then merge that dict into :data:`SCENARIOS` below, e.g.
``SCENARIOS = MappingProxyType({**BASIC, **NESTED})`` for ``l1-moves-l2`` and ``l0-migrates-l1``.
A body that runs a nested level records on the same timeline with its own level
(``Machine(timeline=ctx.timeline, level="L1")``) and adds its guests with ``ctx.guest(machine, "L1")``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from .basic import BASIC
from .context import LIVE, ScenarioContext, ScenarioReport
from .registry import Scenario, ScenarioBody, run_scenario

#: Every scenario by name (read-only; see the module docstring to add some).
SCENARIOS: Mapping[str, Scenario] = MappingProxyType({**BASIC})

__all__ = ["LIVE", "SCENARIOS", "Scenario", "ScenarioBody", "ScenarioContext", "ScenarioReport", "run_scenario"]
