"""Hypothesis stateful test: random guest register sequences, valid and invalid.

Invariants checked after every step:

* no exception escapes a register access (the guest can never crash the VMM);
* the guest-visible status only changes through a guest status write, a
  completed reset (-> 0) or DEVICE_NEEDS_RESET set by the device;
* the backend never sees features the guest did not accept (nor VMM-owned bits).
"""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.config import DeviceConfig
from shadowvmm.errors import DeviceStateError
from shadowvmm.machine import Machine
from shadowvmm.shadow import RunState, StopDialect
from shadowvmm.transport.pci import BAR_SIZE, COMMON_OFF, DEVICE_OFF, NOTIFY_OFF, PciTransport, Space
from shadowvmm.virtio.constants import Feature, Status

STATUS_OFF = COMMON_OFF + 0x14


class RecordingBackend(InProcBackend):
    """The reference backend, recording every feature word it was given."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.feature_writes: list[int] = []

    async def set_features(self, features: int) -> None:
        self.feature_writes.append(features)
        await super().set_features(features)


interesting_status = st.sampled_from([0, 1, 3, 0x0B, 0x0F, 0x1F, 0x2F, 0x4F, 0x80, 0x83, 0x07, 0x09])
widths = st.sampled_from([1, 2, 4, 8, 3])


class RegisterMachine(RuleBasedStateMachine):
    @initialize(dialect=st.sampled_from(list(StopDialect)), transport=st.sampled_from(["pci", "mmio"]))
    def setup(self, dialect: StopDialect, transport: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.vm = Machine(4 << 20)
        self.backend = RecordingBackend({"device": "blk", "queues": 2, "size": 1 << 20})
        cfg = DeviceConfig("d", "inproc", {}, transport=transport, queue_size=16,
                           stop_dialect=dialect)
        self.device = self.loop.run_until_complete(self.vm.add_device(cfg, backend=self.backend))
        self.transport = self.vm.slots["d"].transport
        self.pci = transport == "pci"
        self.accepted_at_features_ok: list[int] = []
        self.last_status = 0

    def teardown(self) -> None:
        if hasattr(self, "vm"):
            self.loop.run_until_complete(self.vm.close())
            self.loop.close()

    # -------------------------------------------------------------- helpers

    def read(self, offset: int, width: int) -> int:
        if isinstance(self.transport, PciTransport):
            return self.transport.read(Space.BAR, offset, width)
        return self.transport.read(offset, width)

    def write(self, offset: int, width: int, value: int) -> None:
        if isinstance(self.transport, PciTransport):
            self.transport.write(Space.BAR, offset, width, value)
        else:
            self.transport.write(offset, width, value)

    def status(self) -> int:
        return self.device.read_status()

    def settle(self) -> None:
        self.loop.run_until_complete(asyncio.wait_for(self.device.settle(), 5))

    # -------------------------------------------------------------- rules

    @rule(offset=st.integers(0, BAR_SIZE + 16), width=widths, value=st.integers(0, 2**64 - 1))
    def random_write(self, offset: int, width: int, value: int) -> None:
        if not self.pci:
            offset &= 0x1FF
        if self.pci and offset == STATUS_OFF or not self.pci and offset == 0x70:
            return self.status_write(value & 0xFF)
        self.write(offset, width, value & ((1 << (8 * width)) - 1))

    @rule(offset=st.integers(0, BAR_SIZE + 16), width=widths)
    def random_read(self, offset: int, width: int) -> None:
        self.read(offset if self.pci else offset & 0x1FF, width)

    @rule(value=interesting_status)
    def status_write(self, value: int) -> None:
        before = self.status()
        if self.pci:
            self.write(STATUS_OFF, 1, value)
        else:
            self.write(0x70, 4, value)
        after = self.status()
        if value and after & Status.FEATURES_OK and not before & Status.FEATURES_OK:
            self.accepted_at_features_ok.append(self.device.driver_features)
        self.last_status = after

    @rule(words=st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=2), subset=st.booleans())
    def driver_features(self, words: list[int], subset: bool) -> None:
        value = words[0] | words[1] << 32
        if subset:
            value &= self.device.device_features
            value |= int(Feature.VERSION_1)
        sel, val = (0x08, 0x0C) if self.pci else (0x24, 0x20)
        for word in range(2):
            self.write(COMMON_OFF + sel if self.pci else sel, 4, word)
            self.write(COMMON_OFF + val if self.pci else val, 4, value >> (32 * word) & 0xFFFFFFFF)

    @rule(queue=st.integers(0, 3), size=st.sampled_from([0, 1, 3, 8, 16, 32]),
          base=st.integers(0, (4 << 20) + 0x10000))
    def queue_setup(self, queue: int, size: int, base: int) -> None:
        base &= ~0xF
        if self.pci:
            c = COMMON_OFF
            self.write(c + 0x16, 2, queue)
            self.write(c + 0x18, 2, size)
            for off, value in ((0x20, base), (0x28, base + 0x400), (0x30, base + 0x800)):
                self.write(c + off, 4, value & 0xFFFFFFFF)
                self.write(c + off + 4, 4, value >> 32)
            self.write(c + 0x1A, 2, queue + 1)
            self.write(c + 0x1C, 2, 1)
        else:
            self.write(0x30, 4, queue)
            self.write(0x38, 4, size)
            for off, value in ((0x80, base), (0x90, base + 0x400), (0xA0, base + 0x800)):
                self.write(off, 4, value & 0xFFFFFFFF)
                self.write(off + 4, 4, value >> 32)
            self.write(0x44, 4, 1)

    @precondition(lambda self: self.pci)
    @rule(queue=st.integers(0, 5))
    def notify(self, queue: int) -> None:
        self.write(NOTIFY_OFF + 4 * queue, 2, queue)

    @rule(offset=st.integers(0, 80), width=st.sampled_from([1, 2, 4]), value=st.integers(0, 2**32 - 1))
    def config_access(self, offset: int, width: int, value: int) -> None:
        base = DEVICE_OFF if self.pci else 0x100
        self.read(base + offset, width)
        self.write(base + offset, width, value & ((1 << (8 * width)) - 1))

    @rule()
    def vmm_stop_resume(self) -> None:
        if self.device.run_state is RunState.FAILED:
            with pytest.raises(DeviceStateError):
                self.loop.run_until_complete(self.device.stop())
            return
        before = self.status()
        try:
            self.loop.run_until_complete(self.device.stop())
        except DeviceStateError:
            # a start queued before the stop failed first: stop is refused on a failed device
            assert self.device.run_state is RunState.FAILED
            self.check_settled(before)
            return
        self.check_settled(before)
        self.loop.run_until_complete(self.device.resume())
        self.check_settled(self.last_status)

    @rule()
    def run_worker(self) -> None:
        before = self.status()
        self.settle()
        self.check_settled(before)

    def check_settled(self, before: int) -> None:
        """After the worker ran: only a completed reset, NEEDS_RESET or a guest-driven stop."""
        after = self.status()
        reset_done = after == 0 and self.device.shadow.reset_pending is False
        needs_reset = after == before | Status.NEEDS_RESET
        dialect_done = self.device.shadow.guest_stop_requested or self.device.shadow.guest_stopped
        # a SUSPEND the guest ended (DRIVER_OK written) completes once the VMM lets the rings run
        resume_done = bool(before & Status.SUSPEND) and \
            after == (before & ~int(Status.SUSPEND)) | Status.DRIVER_OK
        assert after == before or reset_done or needs_reset or dialect_done or resume_done, (hex(before), hex(after))
        self.last_status = after

    # -------------------------------------------------------------- invariants

    @invariant()
    def status_changes_only_by_guest_or_device(self) -> None:
        if hasattr(self, "device"):
            assert self.status() == self.last_status

    @invariant()
    def backend_sees_only_accepted_features(self) -> None:
        if not hasattr(self, "backend"):
            return
        owned = self.device.policy.vmm_owned
        for word in self.backend.feature_writes:
            assert not word & owned
            assert any(word & ~accepted == 0 for accepted in self.accepted_at_features_ok)
            assert not word & ~self.device.device_features


RegisterMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("SHADOWVMM_FUZZ_EXAMPLES", "150")), stateful_step_count=50, deadline=None,
    derandomize=os.environ.get("CI") == "true",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_register_sequences = RegisterMachine.TestCase
