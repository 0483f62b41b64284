"""The state table of the two stops and the status shadow (docs/nested.md, generated from
:mod:`shadowvmm.testing.stoptable`): every row built on the inproc backend (a blk member of an
owner's group), what the guest reads and the backend's run state checked, then every action
from a fresh copy of the row, its outcome held to the table's."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shadowvmm.config import DeviceConfig
from shadowvmm.device import VirtioDevice
from shadowvmm.guest.admin import AdminClient
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.guest.driver import GuestDevice
from shadowvmm.machine import Machine
from shadowvmm.shadow import RunState
from shadowvmm.testing.stoptable import DIALECT_BIT, ROWS, Action, Guest, State, render, row_id
from shadowvmm.virtio.constants import Status

DOC = Path(__file__).resolve().parents[1] / "docs" / "nested.md"


async def build(row: State) -> tuple[Machine, VirtioDevice, GuestDevice]:
    """A machine whose member device is in *row*'s state (reached in the order admin, guest, VMM)."""
    machine = Machine(16 << 20)
    await machine.add_device(DeviceConfig("adm0", "inproc", {"device": "rng"}, admin_members=("dev0",)))
    dev = await machine.add_device(DeviceConfig("dev0", "inproc", {"device": "blk", "size": 1 << 20}, queue_size=16,
                                                stop_dialect=row.dialect, stop_feature_bit=44))
    owner = AdminClient(machine.guest("adm0"))
    await owner.start()
    await owner.list_use()
    guest = machine.guest("dev0")
    await BlkDriver(guest).start(queue_size=16, extra_features=dev.policy.dialect.feature)
    if row.admin_stopped:
        await owner.dev_mode_set(1, True)
    if row.guest is Guest.STOPPED:
        bit = DIALECT_BIT[row.dialect]
        guest.transport.set_status(guest.status() | bit)
        async with asyncio.timeout(2):
            while not guest.status() & bit:
                await asyncio.sleep(0.001)
    if row.vmm_stop:
        await dev.stop()
    await dev.settle()
    return machine, dev, guest


async def act(dev: VirtioDevice, guest: GuestDevice, action: Action) -> None:
    status, t = guest.status(), guest.transport
    writes = {Action.DRIVER_OK: (status & ~int(Status.SUSPEND | Status.STOP)) | int(Status.DRIVER_OK),
              Action.SUSPEND: status | int(Status.SUSPEND), Action.STOP: status | int(Status.STOP), Action.RESET: 0}
    if action is Action.VMM_STOP:
        await dev.stop()
    elif action is Action.VMM_RESUME:
        await dev.resume()
    else:
        t.set_status(writes[action])
    await dev.settle()


def observed(dev: VirtioDevice, reads: int, faults: dict[str, int]) -> State:
    shadow = dev.shadow
    if reads == 0:
        guest = Guest.RESET
    elif shadow.guest_stopped:
        guest = Guest.STOPPED if shadow.guest_stop_requested else Guest.RESUMING
    else:
        guest = Guest.LIVE
    fault = ",".join(sorted(faults)) or None
    return State(dev.policy.dialect.dialect, guest, dev.run_state is RunState.STOPPED, dev.admin_stopped, fault)


@pytest.mark.parametrize("row", ROWS, ids=row_id)
async def test_row(row: State) -> None:
    machine, dev, guest = await build(row)
    try:
        reads = guest.status()
        assert (reads, dev.run_state, dev.rings_running) == (row.reads, row.run_state, row.rings)
        assert observed(dev, reads, {}) == row
    finally:
        await machine.close()
    for action in Action:
        machine, dev, guest = await build(row)
        try:
            before = dict(dev.faults.counts)
            await act(dev, guest, action)
            new = {f.name: c for f, c in dev.faults.counts.items() if c > before.get(f, 0)}
            reads = guest.status()
            want = row.after(action)
            got = observed(dev, reads, new)
            assert (action, got, reads, dev.rings_running) == (action, want, want.reads, want.rings)
        finally:
            await machine.close()


def test_the_doc_shows_the_table() -> None:
    assert render() in DOC.read_text(), "docs/nested.md: paste `python -m shadowvmm.testing.stoptable`"
