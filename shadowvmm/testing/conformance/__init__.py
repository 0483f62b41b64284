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
started), ``io`` (verified round trips: virtio-blk writes then reads back, virtio-net
frames echoed and compared, virtio-fs FUSE_INIT then a file written and read back),
``config`` (the guest's generation-checked read against the backend's GET_CONFIG,
a guest write where one is negotiated, two device-side changes: configuration
change interrupt, config_generation, new bytes), ``stop-resume`` (a VMM stop:
ring bases checked against what the guest made available, a request made while
stopped completes after the resume), ``stop-in-flight`` (the same with round
trips in flight), ``suspend-resume`` (:attr:`Capability.SUSPEND`: stops with
requests in flight), ``reset-reinit`` (guest reset, re-initialisation, I/O; a
disk keeps its data), ``queue-reset`` (VIRTIO_F_RING_RESET, offered with
:attr:`Capability.RING_RESTART`: one queue reset and set up again, I/O),
``queues`` (:attr:`Capability.MQ`: every queue the backend reports, I/O on each),
``reconnect`` (the session closed, a new one on the same endpoint; with
:attr:`Capability.RECONNECT` a disk's data is still there), ``device-state``
(:attr:`Capability.DEVICE_STATE`: export, import into a fresh backend, the
guest moves there, I/O), ``dirty-log`` (:attr:`Capability.DIRTY_LOG` or
``SHARED_MEMORY``: a page the device writes is logged), ``events``
(:attr:`Capability.EVENTS`: nothing reported that nobody caused), ``migrate``
(with ``migrate_factory``: stopped, the state moved to a second backend, the
data written before read there), ``close`` (every fd and task released).
Every step names the spec section it checks (:attr:`StepResult.spec`).

A peer serving one session and exiting after it (virtiofsd) runs with
``single_session="why"``: every step then shares one device and session, and
the steps needing a second session are skipped with that reason. The
``shadowvmm check`` command (:mod:`.command`) runs the kit from the command line.

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
