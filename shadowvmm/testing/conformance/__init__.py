"""The backend conformance kit: drive a backend through the public API in named steps.

Give it a *factory* (a callable returning a fresh, unconnected backend honouring
:class:`~shadowvmm.backends.base.Backend`) and the device type; every step
builds what it needs from a fresh backend, so one failure is reported and the
later steps still run, except those that need the failed one (reported SKIP,
naming it)::

    report = await run_conformance(lambda: MyBackend({"device": "blk"}), "blk")
    assert not report.failed, report.format()

The steps (:data:`STEP_NAMES`, in order): ``contract`` (:func:`check_backend`,
close before connect), ``connect``, ``features`` (VERSION_1, queue count, config
size), ``realize`` (:meth:`Machine.add_device`), ``driver-init`` (DRIVER_OK, rings
started), ``io`` (verified round trips: virtio-blk writes then reads back),
``stop-resume`` (a VMM stop: ring bases checked against what the guest made
available, a request made while stopped completes after the resume),
``suspend-resume`` (:attr:`Capability.SUSPEND`: stops with requests in flight),
``reset-reinit`` (guest reset, re-initialisation, I/O; a disk keeps its data),
``queues`` (:attr:`Capability.MQ`: every queue the backend reports, I/O on each),
``device-state`` (:attr:`Capability.DEVICE_STATE`: export, import into a fresh
backend, the guest moves there, I/O), ``dirty-log`` (:attr:`Capability.DIRTY_LOG`
or ``SHARED_MEMORY``: a page the device writes is logged), ``events``
(:attr:`Capability.EVENTS`: nothing reported that nobody caused), ``close``
(every fd and task released).

In a plugin's tests, :func:`conformance_suite` makes one pytest test per step (imported on
first use: the kit itself runs without pytest installed).
"""

from __future__ import annotations

from typing import Any

from .report import ConformanceReport, Outcome, StepResult
from .rig import ConformanceOptions, Factory
from .runner import STEP_NAMES, expected_outcomes, not_offered, run_conformance

__all__ = ["STEP_NAMES", "ConformanceOptions", "ConformanceReport", "Factory", "Outcome", "StepResult",
           "conformance_suite", "expected_outcomes", "not_offered", "run_conformance"]


def __getattr__(name: str) -> Any:
    if name == "conformance_suite":
        from .suite import conformance_suite
        return conformance_suite
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
