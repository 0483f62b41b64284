"""faulty wrapping the in-process backend: transparent without faults (the conformance kit
passes), and each injected fault reported by the kit at the step that meets it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from shadowvmm.backends.base import Backend, Capability, load_backend
from shadowvmm.errors import ConfigError
from shadowvmm.testing.conformance import (
    STEP_NAMES,
    ConformanceReport,
    Outcome,
    conformance_suite,
    expected_outcomes,
    not_offered,
    run_conformance,
)
from shadowvmm_faulty import FaultyBackend

PASS, FAIL, SKIP = Outcome.PASS, Outcome.FAIL, Outcome.SKIP
#: The steps the in-process backend itself skips (it offers none of what they require).
INNER_SKIPS = not_offered(load_backend("inproc")({"device": "blk"}).capabilities())
AFTER_IO = ("stop-resume", "suspend-resume", "reset-reinit", "queues", "device-state")


def faulty(device: str = "blk", **faults: Any) -> Callable[[], Backend]:
    factory = load_backend("faulty")
    return lambda: factory({"inner": "inproc", "inner_config": {"device": device}, **faults})


def expected(*, skip: tuple[str, ...] = (), fail: tuple[str, ...] = ()) -> dict[str, Outcome]:
    """The kit's outcomes with *fail* failing and *skip* hidden, on top of what inproc skips."""
    return expected_outcomes(fail=fail, skip={*INNER_SKIPS, *skip})


def check(report: ConformanceReport, wanted: dict[str, Outcome]) -> None:
    assert report.outcomes() == wanted, report.format()


async def run(device: str = "blk", **faults: Any) -> ConformanceReport:
    return await run_conformance(faulty(device, **faults), device, step_timeout=10, io_timeout=2)


def test_entry_point_and_options() -> None:
    assert load_backend("faulty") is FaultyBackend
    backend = FaultyBackend({"inner": "inproc", "inner_config": {"device": "rng"}, "hide": ["MQ"]})
    assert backend.implementation == "inproc-rng" and Capability.MQ not in backend.capabilities()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"inner": "inproc", "fail_op": "nope"}, "fail_op"),
        ({"inner": "inproc", "hide": ["SUSPEND", "FLYING"]}, "hide"),
        ({"inner": "inproc", "latency_ops": ["get_features", "x"]}, "latency_ops"),
        ({"inner": "inproc", "inner_config": {"device": "rng"}, "io_error_every": 3}, "io_error_every"),
        ({"inner": "inproc", "latency_ms": -1}, "latency_ms"),
        ({"fail_op": "reset"}, "inner"),
    ]
    for config, key in cases:
        with pytest.raises(ConfigError) as info:
            FaultyBackend(config)
        assert info.value.key == key
    assert "io_error_every" in "\n".join(FaultyBackend.OPTIONS.describe())


@pytest.mark.parametrize("device", ["blk", "rng"])
async def test_no_faults_conformance_passes_as_the_inner_backend(device: str) -> None:
    report = await run(device)
    plain = await run_conformance(lambda: load_backend("inproc")({"device": device}), device)
    assert not report.failed, report.format()
    assert report.outcomes() == plain.outcomes()
    assert report.implementation == plain.implementation == f"inproc-{device}"


async def test_latency_slows_the_steps_that_call_the_operation() -> None:
    report = await run(latency_ms=40, latency_ops=["get_vring_base"])
    check(report, expected())
    assert report["stop-resume"].seconds >= 0.04
    assert report["suspend-resume"].seconds >= 3 * 0.04
    everything = await run(latency_ms=2)
    check(everything, expected())


async def test_failure_at_connect_blocks_every_later_step() -> None:
    report = await run(fail_op="connect")
    check(report, {name: PASS if name == "contract" else FAIL if name == "connect" else SKIP
                   for name in STEP_NAMES})
    assert report["connect"].detail == "BackendError: faulty: injected failure of connect() (call 1)"
    assert report["realize"].detail == "needs connect, which failed"


async def test_failure_of_get_features() -> None:
    report = await run(fail_op="get_features", fail_error="timeout")
    check(report, expected(fail=("features", "realize")))
    assert all(outcome is SKIP for outcome in list(report.outcomes().values())[4:])
    assert report["features"].detail.startswith("BackendTimeout: faulty: injected failure of get_features()")


async def test_failure_of_save_state_fails_the_device_state_step_only() -> None:
    report = await run(fail_op="save_state", fail_error="protocol")
    check(report, expected(fail=("device-state",)))
    assert report["device-state"].detail == "ProtocolError: faulty: injected failure of save_state() (call 1)"


async def test_failure_of_resume_fails_the_stop_steps() -> None:
    report = await run(fail_op="resume")
    check(report, expected(fail=("stop-resume", "suspend-resume")))
    assert "injected failure of resume()" in report["stop-resume"].detail


async def test_failure_at_the_nth_call_only() -> None:
    """suspend fails at its 2nd call only: the first stop of a device works, the second fails."""
    report = await run(fail_op="suspend", fail_at=2)
    check(report, expected(fail=("suspend-resume",)))
    assert "injected failure of suspend() (call 2)" in report["suspend-resume"].detail
    once = await run(fail_op="resume", fail_at=2)
    check(once, expected(fail=("suspend-resume",)))
    every = await run(fail_op="resume", fail_at=2, fail_count=0)
    check(every, expected(fail=("suspend-resume",)))
    assert "injected failure of resume() (call 2)" in every["suspend-resume"].detail
    first_only = await run(fail_op="resume", fail_at=1, fail_count=1)
    check(first_only, expected(fail=("stop-resume", "suspend-resume")))


async def test_io_error_on_every_request() -> None:
    report = await run(io_error_every=1)
    check(report, expected(fail=("io",)))
    assert {name for name, outcome in report.outcomes().items() if outcome is SKIP} >= set(AFTER_IO)
    assert report["io"].detail.startswith("BlkIOError: OUT sector")
    assert report["stop-resume"].detail == "needs io, which failed"


async def test_io_error_every_seventh_request() -> None:
    """io makes 6 requests: it passes; the 7th request of a stop cycle fails it."""
    report = await run(io_error_every=7)
    check(report, expected(fail=("stop-resume", "suspend-resume")))
    assert "BlkIOError" in report["stop-resume"].detail


async def test_io_errors_leave_packed_rings_alone() -> None:
    """The documented limit: split rings only."""
    report = await run_conformance(faulty(io_error_every=1), "blk", packed=True, steps=("io",))
    assert report["io"].outcome is PASS, report.format()


async def test_hidden_capabilities_skip_their_steps() -> None:
    report = await run(hide=["SUSPEND", "RESUME", "DEVICE_STATE", "MQ"])
    check(report, expected(skip=("suspend-resume", "queues", "device-state")))
    assert report["suspend-resume"].detail == "not offered: Capability.SUSPEND"
    assert "stopped (get_vring_base)" in report["stop-resume"].detail
    restart = await run(hide=["SUSPEND", "RESUME", "RING_RESTART"])
    assert not restart.failed, restart.format()


@pytest.fixture
def faulty_blk() -> Callable[[], Backend]:
    return faulty("blk", latency_ms=1)


test_conformance_faulty_blk = conformance_suite("faulty_blk", "blk")
