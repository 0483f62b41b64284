"""The kit's steps in order: what each needs, what it requires of the backend, and the spec
section it checks (the report's ``spec`` column)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ...backends.base import Capability
from . import lifecycle as later
from . import steps as s
from .rig import Context

__all__ = ["STEPS", "Step"]


@dataclass(frozen=True)
class Step:
    """One named step. It is skipped when a step it *needs* failed, when the backend offers
    none of *requires* (reported as *offered_as* when given), when *applies* gives a reason, or
    (with *io*) when the device type has no verified I/O."""

    name: str
    run: Callable[[Context], Awaitable[str]]
    needs: tuple[str, ...] = ()
    requires: Capability = Capability.NONE
    io: bool = False
    spec: str = ""
    offered_as: str = ""
    applies: Callable[[Context], Awaitable[str | None]] | None = None


STEPS: tuple[Step, ...] = (
    Step("contract", s.contract, spec="shadowvmm Backend contract (check_backend)"),
    Step("connect", s.connect, spec="vhost-user: SET_OWNER, GET/SET_PROTOCOL_FEATURES"),
    Step("features", s.features, ("connect",),
         spec="virtio 1.2 §2.2, §6.1; vhost-user: GET_FEATURES, GET_QUEUE_NUM, GET_CONFIG"),
    Step("realize", s.realize, ("connect",), spec="virtio 1.2 §4.1.4 (PCI), §4.2.2 (MMIO)"),
    Step("driver-init", s.driver_init, ("realize",), spec="virtio 1.2 §3.1.1"),
    Step("io", s.io, ("driver-init",), io=True, spec="virtio 1.2 §2.7.13, §2.7.14; device type §5"),
    Step("config", later.config, ("io",),
         spec="virtio 1.2 §2.5.1, §4.1.5.3; vhost-user: GET_CONFIG, SET_CONFIG"),
    Step("stop-resume", s.stop_resume, ("io",), io=True,
         spec="vhost-user: SET_VRING_ENABLE, GET_VRING_BASE, SET_VRING_BASE"),
    Step("stop-in-flight", s.stop_in_flight, ("stop-resume",), io=True,
         spec="vhost-user: SET_VRING_ENABLE 0, drain, GET_VRING_BASE with requests in flight"),
    Step("suspend-resume", s.suspend_resume, ("io",), Capability.SUSPEND, io=True,
         spec="vhost-vdpa: SUSPEND, RESUME; virtio 1.3 §2.1 (SUSPEND)"),
    Step("reset-reinit", s.reset_reinit, ("io",), io=True, spec="virtio 1.2 §2.4, §3.1.1; vhost-user: RESET_DEVICE"),
    Step("queue-reset", later.queue_reset, ("io",), Capability.RING_RESTART, io=True,
         spec="virtio 1.2 §2.6.1 (VIRTIO_F_RING_RESET)",
         offered_as="VIRTIO_F_RING_RESET (the backend lacks Capability.RING_RESTART)"),
    Step("queues", s.queues, ("io",), Capability.MQ, spec="vhost-user: GET_QUEUE_NUM (MQ); virtio 1.2 §5.2.3"),
    Step("reconnect", later.reconnect, ("io",), io=True, applies=later.reconnect_applies,
         spec="vhost-user: a new session (SET_OWNER .. SET_VRING_BASE)"),
    Step("device-state", s.device_state, ("io",), Capability.DEVICE_STATE, io=True,
         applies=later.reconnect_applies, spec="vhost-user: SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE"),
    Step("dirty-log", s.dirty_log, ("io",), Capability.DIRTY_LOG | Capability.SHARED_MEMORY, io=True,
         spec="vhost-user: SET_LOG_BASE, VHOST_F_LOG_ALL"),
    Step("events", s.events, ("stop-resume",), Capability.EVENTS, spec="vhost-user: back-end channel (BACKEND_REQ)"),
    Step("migrate", later.migrate, ("io",), io=True, applies=later.migrate_applies,
         spec="vhost-user: GET_VRING_BASE at the source, SET_VRING_BASE at the destination"),
    Step("close", s.close, ("realize",), spec="resource release: every fd and task"),
)
