"""The state table of the two stops and the status shadow (docs/nested.md, "Stops and the status
shadow"), as data: one source for the table in the doc (``python -m shadowvmm.testing.stoptable``
prints it; a test keeps the doc in step) and for ``tests/test_stop_table.py``, which builds every
row on the inproc backend and checks what the guest reads, the backend's run state and the
outcome of every action.

A row is a state: the stop dialect the guest negotiated, whether the guest stopped the device
through it (SUSPEND 0x10, v1.4 §3.4; STOP 0x20, the 2021 proposal), whether the VMM's
transparent stop holds (:meth:`~shadowvmm.device.VirtioDevice.stop`), and the member's admin
mode (an owner's DEV_MODE_SET, v1.4 §2.12.1.4). The rings run only when none of the three
stops holds (:meth:`~shadowvmm.device.sequencer.SequencerMixin._op_reconcile`); the guest reads
only what it wrote and what its own stop completed (:class:`~shadowvmm.shadow.StatusShadow`).
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, replace
from enum import StrEnum

from ..shadow import RunState, StopDialect
from ..virtio.constants import Status

LIVE = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK)
#: What the guest reads once its stop completed: SUSPEND clears DRIVER_OK (v1.4 §3.4), STOP keeps it.
STOPPED_READS = {StopDialect.SUSPEND: (LIVE & ~int(Status.DRIVER_OK)) | int(Status.SUSPEND),
                 StopDialect.STOP: LIVE | int(Status.STOP)}
DIALECT_BIT = {StopDialect.SUSPEND: int(Status.SUSPEND), StopDialect.STOP: int(Status.STOP)}


class Action(StrEnum):
    """The columns: a guest status write (what it writes) or a VMM call."""

    DRIVER_OK = "DRIVER_OK"     #: the status with the stop bits cleared and DRIVER_OK set
    SUSPEND = "SUSPEND"         #: the status | SUSPEND
    STOP = "STOP"               #: the status | STOP
    RESET = "0 (reset)"         #: 0
    VMM_STOP = "VMM stop"
    VMM_RESUME = "VMM resume"


class Guest(StrEnum):
    """What the guest's own stop did: nothing, or completed."""

    LIVE = "live"
    STOPPED = "stopped"
    #: SUSPEND dialect: the guest wrote DRIVER_OK to resume while another stop holds; it keeps
    #: reading SUSPEND until the rings run again (the resume completes then).
    RESUMING = "resuming"
    RESET = "reset"


@dataclass(frozen=True)
class State:
    """A row's state, or an action's outcome."""

    dialect: StopDialect
    guest: Guest
    vmm_stop: bool
    admin_stopped: bool
    #: The guest fault an action counted (its name), None for none.
    fault: str | None = None

    @property
    def reads(self) -> int:
        if self.guest is Guest.RESET:
            return 0
        return LIVE if self.guest is Guest.LIVE else STOPPED_READS[self.dialect]

    @property
    def run_state(self) -> RunState:
        return RunState.STOPPED if self.vmm_stop else RunState.RUNNING

    @property
    def rings(self) -> bool:
        return self.guest is Guest.LIVE and not self.vmm_stop and not self.admin_stopped

    def after(self, action: Action) -> State:
        """The state *action* leads to (the model the test holds the device to)."""
        s = replace(self, fault=None)
        if action is Action.VMM_STOP:
            return replace(s, vmm_stop=True)
        if action is Action.VMM_RESUME:
            return replace(s, vmm_stop=False)._settled()
        if action is Action.RESET:      # a reset clears the member's stopped mode too (v1.4 §2.12.1.4)
            return replace(s, guest=Guest.RESET, admin_stopped=False)
        if action is Action.DRIVER_OK:
            if s.guest is Guest.STOPPED and s.dialect is StopDialect.STOP:
                return replace(s, fault="STATUS_CLEAR")     # STOP is left by a reset only
            if s.guest is Guest.STOPPED:
                return replace(s, guest=Guest.RESUMING)._settled()
            return s
        bit = Status.SUSPEND if action is Action.SUSPEND else Status.STOP
        if DIALECT_BIT[s.dialect] != bit:
            return replace(s, fault="DIALECT_NOT_OFFERED")
        return replace(s, guest=Guest.STOPPED) if s.guest is Guest.LIVE else s

    def _settled(self) -> State:
        """A pending SUSPEND resume completes once nothing else holds the rings."""
        if self.guest is Guest.RESUMING and not self.vmm_stop and not self.admin_stopped:
            return replace(self, guest=Guest.LIVE)
        return self

    # ------------------------------------------------------------------ the Markdown cells

    def backend(self) -> str:
        rings = "rings run" if self.rings else "rings stopped"
        return f"{self.run_state.value}, {rings}"

    def outcome(self, before: State) -> str:
        if self.fault is not None:
            return f"ignored (fault {self.fault})"
        if self == before:
            return "nothing changes"
        parts = [f"reads {self.reads:#04x}"]
        if self.guest is Guest.RESUMING:
            parts.append("resume waits for the other stop")
        if self.rings != before.rings:
            parts.append("rings " + ("start" if self.rings else "stop"))
        if self.run_state != before.run_state:
            parts.append(f"run state {self.run_state.value}")
        if self.admin_stopped != before.admin_stopped:
            parts.append("member mode cleared")
        return ", ".join(parts)


#: The rows: dialect x the guest's stop x the VMM's stop x the member's admin mode.
ROWS: tuple[State, ...] = tuple(
    State(dialect, guest, vmm, admin)
    for dialect, guest, vmm, admin in itertools.product((StopDialect.SUSPEND, StopDialect.STOP),
                                                         (Guest.LIVE, Guest.STOPPED), (False, True), (False, True)))


def row_id(row: State) -> str:
    return (f"{row.dialect.value}-{row.guest.value}-{'vmm' if row.vmm_stop else 'novmm'}-"
            f"{'adm' if row.admin_stopped else 'noadm'}")


def render() -> str:
    """The Markdown table of docs/nested.md."""
    actions = list(Action)
    head = ["dialect", "guest's stop", "VMM stop", "admin mode", "guest reads", "backend"]
    lines = ["| " + " | ".join(head + [f"guest writes {a.value}" if a.value.isupper() or a is Action.RESET
                                       else a.value for a in actions]) + " |",
             "| " + " | ".join("---" for _ in head + actions) + " |"]
    for row in ROWS:
        cells = [row.dialect.value, "completed" if row.guest is Guest.STOPPED else "none",
                 "held" if row.vmm_stop else "no", "stopped" if row.admin_stopped else "running",
                 f"{row.reads:#04x}", row.backend()]
        cells += [row.after(a).outcome(row) for a in actions]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
