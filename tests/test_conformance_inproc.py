"""The conformance kit (shadowvmm.testing.conformance) passes the in-process backend and reports
what a broken backend gets wrong, step by step; its pytest form runs one test per step."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import pytest

from shadowvmm.backends.base import Backend, Capability, RingState
from shadowvmm.backends.inproc import BlkModel, InProcBackend
from shadowvmm.guest.driver import GuestDevice
from shadowvmm.memory import GuestMemory
from shadowvmm.testing.conformance import (
    STEP_NAMES,
    Outcome,
    conformance_suite,
    expected_outcomes,
    not_offered,
    run_conformance,
)
from shadowvmm.virtio.constants import DeviceId
from shadowvmm.virtio.split import DescChain

PASS, FAIL, SKIP = Outcome.PASS, Outcome.FAIL, Outcome.SKIP


#: What the in-process backend skips.
INPROC_SKIPS = not_offered(InProcBackend({"device": "blk"}).capabilities())


def inproc(device: str, **config: Any) -> Callable[[], Backend]:
    return lambda: InProcBackend({"device": device, **config})


def outcomes_except(skips: set[str], **fails: Outcome) -> dict[str, Outcome]:
    """The kit's outcomes with *skips* not offered and the steps named in *fails* (with _ for -)
    failing: the steps needing them skipped."""
    return expected_outcomes(fail=tuple(name.replace("_", "-") for name in fails), skip=skips)


@pytest.mark.parametrize("device", ["blk", "rng"])
@pytest.mark.parametrize("transport", ["pci", "mmio"])
async def test_inproc_passes(device: str, transport: str) -> None:
    report = await run_conformance(inproc(device, queues=2) if device == "blk" else inproc(device), device,
                                   transport=transport)
    assert not report.failed, report.format()
    assert report.outcomes() == outcomes_except(INPROC_SKIPS), report.format()
    assert report.implementation == f"inproc-{device}"
    assert "2 queue(s), I/O verified on each" in report["queues"].detail if device == "blk" else True
    text = report.format()
    assert all(name in text for name in STEP_NAMES) and "0 failed" in text


async def test_inproc_packed_rings_pass() -> None:
    report = await run_conformance(inproc("blk"), "blk", packed=True)
    assert not report.failed, report.format()


# ---------------------------------------------------------------------- broken backends


class NoSuspend(InProcBackend):
    """Offers SUSPEND but has no suspend() at all."""

    suspend = None  # type: ignore[assignment]


class NoSuspendCapability(InProcBackend):
    def capabilities(self) -> Capability:
        return super().capabilities() & ~(Capability.SUSPEND | Capability.RESUME)


class WrongDevice(InProcBackend):
    async def connect(self) -> None:
        await super().connect()
        self.device_id = DeviceId.NET


class NoVersion1(InProcBackend):
    async def get_features(self) -> int:
        return (await super().get_features()) & ~(1 << 32)


class OffByOneBase(InProcBackend):
    """GET_VRING_BASE answers one past where the ring stopped."""

    async def get_vring_base(self, index: int) -> RingState:
        state = await super().get_vring_base(index)
        return RingState(state.index, state.base + 1)


class CorruptingModel(BlkModel):
    """Reads come back with their first byte flipped."""

    def handle(self, memory: GuestMemory, chain: DescChain) -> int:
        written = super().handle(memory, chain)
        if written > 1:
            gpa, _ = chain.writable[0]
            memory.write(gpa, bytes([memory.read(gpa, 1)[0] ^ 0xFF]))
        return written


class Corrupting(InProcBackend):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.model = CorruptingModel({})


class LosesRingsOnStop(InProcBackend):
    """Stops its rings for good at a suspend: the resume brings nothing back."""

    async def suspend(self) -> None:
        await super().suspend()
        self.suspended = False      # get_vring_base then stops each ring (vhost-user semantics)


class ForgetfulReset(InProcBackend):
    """A device reset wipes the disk."""

    async def reset(self) -> None:
        await super().reset()
        image = getattr(self.model, "image", None)
        if image is not None:
            image[:] = bytes(len(image))


class NoState(InProcBackend):
    """Claims DEVICE_STATE, saves nothing."""

    async def save_state(self) -> bytes | None:
        return None


class LeaksFd(InProcBackend):
    async def connect(self) -> None:
        await super().connect()
        self.leaked = os.eventfd(0, os.EFD_CLOEXEC)


class HangsOnResume(InProcBackend):
    async def resume(self) -> None:
        await asyncio.sleep(3600)


def broken(cls: type[InProcBackend], device: str = "blk") -> Callable[[], Backend]:
    return lambda: cls({"device": device})


@pytest.mark.leaks_fds
async def test_broken_backends_fail_the_right_steps() -> None:
    """Each defect fails the step that checks it; the steps that need a failed one are skipped
    naming it; the others still run (and pass)."""
    cases: list[tuple[type[InProcBackend], dict[str, Outcome]]] = [
        (NoSuspend, outcomes_except(INPROC_SKIPS, contract=FAIL, driver_init=FAIL, close=FAIL)),
        (WrongDevice, {**{n: SKIP for n in STEP_NAMES}, "contract": PASS, "connect": FAIL}),
        (NoVersion1, outcomes_except(INPROC_SKIPS, features=FAIL, realize=FAIL)),
        (OffByOneBase, outcomes_except(INPROC_SKIPS, stop_resume=FAIL, suspend_resume=FAIL, device_state=FAIL)),
        (Corrupting, outcomes_except(INPROC_SKIPS, io=FAIL)),
        (LosesRingsOnStop, outcomes_except(INPROC_SKIPS, stop_resume=FAIL, suspend_resume=FAIL)),
        (ForgetfulReset, outcomes_except(INPROC_SKIPS, reset_reinit=FAIL)),
        (NoState, outcomes_except(INPROC_SKIPS, device_state=FAIL)),
        (LeaksFd, outcomes_except(INPROC_SKIPS, close=FAIL)),
    ]
    for cls, wanted in cases:
        report = await run_conformance(broken(cls), "blk", step_timeout=5, io_timeout=0.5)
        assert report.outcomes() == wanted, f"{cls.__name__}:\n{report.format()}"
        for step in report:
            if step.outcome is SKIP and step.detail.startswith("needs"):
                assert report[step.detail.split()[1].rstrip(",")].outcome is not PASS
    details = {cls.__name__: (await run_conformance(broken(cls), "blk", steps=(step,), io_timeout=0.5))[step].detail
               for cls, step in [(NoSuspend, "contract"), (OffByOneBase, "stop-resume"),
                                 (Corrupting, "io"), (NoState, "device-state"), (LeaksFd, "close"),
                                 (LosesRingsOnStop, "stop-resume"), (ForgetfulReset, "reset-reinit"),
                                 (WrongDevice, "connect"), (NoVersion1, "features")]}
    assert details["NoSuspend"] == "missing method suspend()"
    assert "base 3" in details["OffByOneBase"] and "used idx 2" in details["OffByOneBase"]
    assert "differs from what was written" in details["Corrupting"]
    assert "no opaque state" in details["NoState"]
    assert "fd(s) left open after close" in details["LeaksFd"]
    assert "no completion within 0.5 s" in details["LosesRingsOnStop"]
    assert details["WrongDevice"] == "device_id is <DeviceId.NET: 1>, the run is for BLOCK"
    assert "lack VERSION_1" in details["NoVersion1"]
    assert "differs from what was written" in details["ForgetfulReset"]


async def test_a_hanging_operation_fails_its_step_by_timeout() -> None:
    report = await run_conformance(broken(HangsOnResume), "blk", step_timeout=0.5,
                                   steps=("io", "stop-resume", "reset-reinit"))
    assert [(s.name, s.outcome) for s in report] == [("io", PASS), ("stop-resume", FAIL), ("reset-reinit", PASS)]
    assert report["stop-resume"].detail == "timed out after 0.5 s"
    assert 0.5 <= report["stop-resume"].seconds < 5


async def test_steps_subset_and_device_type_checks() -> None:
    report = await run_conformance(inproc("rng"), DeviceId.RNG, steps=("io", "suspend-resume"))
    assert [(s.name, s.outcome) for s in report] == [("io", PASS), ("suspend-resume", PASS)]
    hidden = await run_conformance(broken(NoSuspendCapability, "rng"), "rng", steps=("suspend-resume",))
    assert [(s.outcome, s.detail) for s in hidden] == [(SKIP, "not offered: Capability.SUSPEND")]
    with pytest.raises(ValueError, match="device type 'gpu'"):
        await run_conformance(inproc("rng"), "gpu")
    net = await run_conformance(inproc("rng"), "net", steps=("io",))
    assert net["io"].outcome is SKIP and "net_echo" in net["io"].detail


async def test_guest_driver_models_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kit drives the device through the guest driver models: a guest reset that never
    completes fails the reset step, not the run."""
    async def stuck(self: GuestDevice, timeout: float = 5.0) -> None:
        raise TimeoutError("reset stuck")
    report = await run_conformance(inproc("blk"), "blk", steps=("io",))
    assert report["io"].outcome is PASS
    monkeypatch.setattr(GuestDevice, "reset", stuck)
    report = await run_conformance(inproc("blk"), "blk", steps=("driver-init", "reset-reinit"))
    assert report["driver-init"].outcome is FAIL
    assert report["reset-reinit"].outcome is FAIL


@pytest.fixture
def blk_factory() -> Callable[[], Backend]:
    return inproc("blk", queues=2)


@pytest.fixture
async def rng_factory() -> Callable[[], Backend]:
    await asyncio.sleep(0)
    return inproc("rng")


test_conformance_blk = conformance_suite("blk_factory", "blk")
test_conformance_rng = conformance_suite("rng_factory", "rng", transport="mmio")
