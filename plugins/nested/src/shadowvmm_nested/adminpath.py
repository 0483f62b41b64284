"""An owner device's admin virtqueue as the L1's stop path (docs/nested.md "Admin virtqueue";
virtio 1.4 §2.12 "Device groups", §2.13 "Device parts").

L0 gives the L1 an owner device (PCI, ``admin_members = [...]``) besides the member devices.
The L1 drives the owner through L0's transport like any device (an
:class:`~shadowvmm.guest.admin.AdminClient` on it) and addresses a member by its group member
id (SR-IOV: 1..N in the order the owner's config lists them). The members themselves need no
stop dialect and no extra feature bit:

* stop: DEV_MODE_SET (STOPPED) on the member; it completes once the member used every buffer
  it observed (the member's status keeps DRIVER_OK);
* capture: DEV_PARTS_GET of every part (through a temporary GET object: RESOURCE_OBJ_CREATE,
  DEV_PARTS_METADATA_GET size, DEV_PARTS_GET, RESOURCE_OBJ_DESTROY). The VQ_CFG parts carry
  each ring's addresses, size and vector, the shadowvmm-private VQ_STATE part its exact base;
* resume in place: DEV_MODE_SET (0);
* move: the destination is another member of the same owner. It is reset, put in stopped
  mode, given the captured parts with DEV_PARTS_SET (features, DRIVER_OK status, VQ_CFG and
  VQ_STATE: the same ring memory, at the same IOVAs through its own IOMMU table), its config
  vector (msix_config is not a part: v1.4 §2.13 leaves PCI config space and MSI-X to the
  hypervisor) and resumed with DEV_MODE_SET (0): its backend starts at the captured bases.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Mapping
from typing import TypeVar

from shadowvmm.backends.base import RingState, VringAddr
from shadowvmm.errors import ArgumentError, BackendError, RefusedError
from shadowvmm.guest.admin import AdminClient
from shadowvmm.memory import GuestMemory
from shadowvmm.timeline import EventKind, Tap
from shadowvmm.virtio.admin import VQ_STATE, Part, PartType

from .lower import LowerDevice
from .stoppath import Derived, StartPlan, fresh_base

T = TypeVar("T")


class AdminPath:
    """DEV_MODE_SET / DEV_PARTS_GET / DEV_PARTS_SET through an owner's admin queue (module
    docstring). *members* maps a lower device's name to its member id; *tap* records every
    command on a timeline (:attr:`EventKind.ADMIN_COMMAND`)."""

    name = "admin"
    feature = 0

    def __init__(self, client: AdminClient, members: Mapping[str, int], *, tap: Tap | None = None) -> None:
        self.client = client
        self.members = dict(members)
        self.tap = tap
        #: The parts captured at each member's last stop, by lower device name.
        self.captured: dict[str, list[Part]] = {}
        #: Admin commands (queue requests) of the last stop + capture, and of the last start.
        self.stop_commands = 0
        self.start_commands = 0

    def member(self, lower: LowerDevice) -> int:
        member = self.members.get(lower.name)
        if member is None:
            raise ArgumentError(f"{lower.name} is no member of the owner's group (members: {self.members})")
        return member

    def _sent(self) -> int:
        queue = self.client.queue
        return 0 if queue is None else queue.completed

    async def _command(self, what: str, member: int, work: Awaitable[T]) -> T:
        before, start = self._sent(), time.perf_counter()
        result = await work
        if self.tap is not None:
            self.tap.record(EventKind.ADMIN_COMMAND, opcode=what, member=member, commands=self._sent() - before,
                            ms=round((time.perf_counter() - start) * 1e3, 3))
        return result

    async def stop(self, lower: LowerDevice) -> None:
        member, before = self.member(lower), self._sent()
        await self._command("DEV_MODE_SET", member, self.client.dev_mode_set(member, True))
        self.captured[lower.name] = await self._command("DEV_PARTS_GET", member, self.client.parts_get(member))
        self.stop_commands = self._sent() - before

    async def resume(self, lower: LowerDevice, plan: StartPlan) -> None:
        member = self.member(lower)
        await self._command("DEV_MODE_SET", member, self.client.dev_mode_set(member, False))

    def ring_state(self, lower: LowerDevice, memory: GuestMemory, addr: VringAddr, num: int,
                   packed: bool) -> Derived:
        for part in self.captured.get(lower.name, ()):
            if part.part_type == PartType.VQ_STATE and part.selector == addr.index:
                return Derived(RingState(addr.index, VQ_STATE.unpack(part.value)[0]))
        raise BackendError(f"{lower.name}: no VQ_STATE part captured for ring {addr.index}")

    def queue_base(self, lower: LowerDevice, index: int, state: RingState, packed: bool) -> None:
        if state != fresh_base(index, packed):
            raise RefusedError(f"{lower.name}: ring {index} would start at {state.base:#x}: the admin path sets "
                               "ring bases only with DEV_PARTS_SET on a stopped member (a move)")

    async def start(self, lower: LowerDevice, plan: StartPlan, source: LowerDevice) -> None:
        parts = self.captured.get(source.name)
        if parts is None:
            raise BackendError(f"{source.name}: no parts captured (the member was not stopped on this path)")
        member, old = self.member(lower), self.member(source)
        if member == old:
            raise ArgumentError(f"{lower.name}: the destination is the source member {member}")
        captured = {p.selector: VQ_STATE.unpack(p.value)[0] for p in parts if p.part_type == PartType.VQ_STATE}
        wanted = {index: state.base for index, state in plan.states.items() if index in captured}
        if wanted != {index: captured[index] for index in wanted}:
            raise BackendError(f"{source.name}: the states {wanted} differ from the captured parts {captured}")
        before = self._sent()
        await lower.reset()
        await self._command("DEV_MODE_SET", member, self.client.dev_mode_set(member, True))
        await self._command("DEV_PARTS_SET", member, self.client.parts_set(member, parts))
        lower.transport.set_config_vector(0)
        await self._command("DEV_MODE_SET", member, self.client.dev_mode_set(member, False))
        self.start_commands = self._sent() - before
