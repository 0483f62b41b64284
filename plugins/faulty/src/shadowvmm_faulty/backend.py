"""``faulty``: a backend that wraps any other one and injects faults.

Config (``backend = "faulty"``)::

    [device.backend_config]
    inner = "inproc"                      # the wrapped backend (an entry point name)
    inner_config = { device = "blk" }
    latency_ms = 5                        # before every control-plane operation ...
    latency_ops = ["get_vring_base"]      # ... or only these
    fail_op = "set_vring_enable"          # this operation fails
    fail_at = 3                           # at its 3rd call (and fail_count - 1 calls after)
    fail_error = "backend"                # BackendError (see ERRORS)
    io_error_every = 10                   # virtio-blk: every 10th request completes with IOERR
    hide = ["SUSPEND", "DEVICE_STATE"]    # capabilities not offered

A hidden capability's operations behave as :class:`BackendBase`'s defaults (the
capability is not there). Written against the public API only.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from shadowvmm.backends.base import (
    MANDATORY,
    OPTIONAL,
    Backend,
    BackendBase,
    BackendEventHandler,
    Capability,
    PeerIdentity,
    RingState,
    VringAddr,
    load_backend,
)
from shadowvmm.errors import (
    BackendDisconnected,
    BackendError,
    BackendTimeout,
    ConfigError,
    ProtocolError,
    UnsupportedError,
)
from shadowvmm.memory import GuestMemory
from shadowvmm.options import REQUIRED, Option, OptionSchema
from shadowvmm.virtio.constants import DeviceId, Feature

from .ioerrors import IoErrorInjector

__all__ = ["ASYNC_OPS", "ERRORS", "OPTIONS", "FaultyBackend"]

T = TypeVar("T")

#: The contract's coroutine operations: what latency and failures apply to.
ASYNC_OPS: tuple[str, ...] = tuple(
    name for name in MANDATORY + OPTIONAL
    if name not in ("capabilities", "config_size", "lost_peer_alive", "set_event_handler", "set_busy_poll",
                    "peer_identity", "migration_blockers"))
#: ``fail_error`` -> the typed error raised.
ERRORS: dict[str, type[BackendError]] = {
    "backend": BackendError, "timeout": BackendTimeout, "disconnected": BackendDisconnected,
    "protocol": ProtocolError, "unsupported": UnsupportedError,
}
_CAPABILITIES = tuple(name for name in Capability.__members__ if name != "NONE")


def _ops_problem(value: list[Any]) -> str | None:
    bad = [op for op in value if op not in ASYNC_OPS]
    return f"{bad} not among the operations {', '.join(ASYNC_OPS)}" if bad else None


def _caps_problem(value: list[Any]) -> str | None:
    bad = [name for name in value if name not in _CAPABILITIES]
    return f"{bad} not among the capabilities {', '.join(_CAPABILITIES)}" if bad else None


OPTIONS = OptionSchema(
    Option("inner", str, REQUIRED, "the wrapped backend (a shadowvmm.backends entry point)"),
    Option("inner_config", dict, None, "the wrapped backend's config (default: empty)"),
    Option("latency_ms", float, 0.0, "delay before each delayed operation", min=0, max=60_000),
    Option("latency_ops", list, None, "the delayed operations (default: every control-plane operation)",
           check=_ops_problem),
    Option("fail_op", str, None, "the operation that fails (default: none)", choices=ASYNC_OPS),
    Option("fail_at", int, 1, "the call of fail_op that fails first (1: the first call)", min=1),
    Option("fail_count", int, 1, "how many calls fail from fail_at on (0: every one)", min=0),
    Option("fail_error", str, "backend", "the error raised", choices=tuple(ERRORS)),
    Option("io_error_every", int, 0, "virtio-blk, split rings: every Nth completed request ends with "
           "VIRTIO_BLK_S_IOERR (0: never)", min=0, max=1 << 32),
    Option("hide", list, None, "capabilities not offered (Capability names)", check=_caps_problem),
)


class FaultyBackend(BackendBase):
    """Wraps the backend named by ``inner`` (entry point ``faulty``)."""

    OPTIONS = OPTIONS

    def __init__(self, config: Mapping[str, Any]) -> None:
        opts = OPTIONS.validate(config)
        self.inner: Backend = load_backend(opts["inner"])(opts["inner_config"] or {})
        self.implementation = self.inner.implementation
        self.implementation_version = self.inner.implementation_version
        self.device_id = self.inner.device_id
        self.latency = opts["latency_ms"] / 1e3
        self.latency_ops = frozenset(opts["latency_ops"] or ASYNC_OPS)
        self.fail_op: str | None = opts["fail_op"]
        self.fail_at: int = opts["fail_at"]
        self.fail_count: int = opts["fail_count"]
        self.fail_error = ERRORS[opts["fail_error"]]
        self.hidden = Capability.NONE
        for name in opts["hide"] or ():
            self.hidden |= Capability[name]
        #: Calls per operation so far.
        self.calls: Counter[str] = Counter()
        self.io_errors: IoErrorInjector | None = None
        if opts["io_error_every"]:
            if self.device_id is not DeviceId.BLOCK:
                raise ConfigError("io_error_every", f"I/O errors are virtio-blk's; {opts['inner']} serves "
                                                    f"{self.device_id.name}")
            self.io_errors = IoErrorInjector(opts["io_error_every"])

    def _failing(self, call: int) -> bool:
        return call >= self.fail_at and (not self.fail_count or call < self.fail_at + self.fail_count)

    async def _op(self, name: str, call: Callable[..., Awaitable[T]], *args: Any) -> T:
        """One operation of the inner backend, with the faults configured for it."""
        self.calls[name] += 1
        if self.latency and name in self.latency_ops:
            await asyncio.sleep(self.latency)
        if name == self.fail_op and self._failing(self.calls[name]):
            raise self.fail_error(f"faulty: injected failure of {name}() (call {self.calls[name]})")
        return await call(*args)

    def _hides(self, capability: Capability) -> bool:
        return bool(self.hidden & capability)

    # ---------------------------------------------------------------- the contract

    def capabilities(self) -> Capability:
        return self.inner.capabilities() & ~self.hidden

    async def connect(self) -> None:
        await self._op("connect", self.inner.connect)
        self.implementation = self.inner.implementation

    async def close(self) -> None:
        try:
            await self._op("close", self.inner.close)
        finally:
            if self.io_errors is not None:
                self.io_errors.close()

    async def get_features(self) -> int:
        return await self._op("get_features", self.inner.get_features)

    async def set_features(self, features: int) -> None:
        if self.io_errors is not None:
            self.io_errors.packed = bool(features & Feature.RING_PACKED)
        await self._op("set_features", self.inner.set_features, features)

    async def get_queue_num(self) -> int:
        if self._hides(Capability.MQ):
            return await super().get_queue_num()
        return await self._op("get_queue_num", self.inner.get_queue_num)

    def config_size(self) -> int:
        return self.inner.config_size()

    async def set_mem_table(self, memory: GuestMemory) -> None:
        if self.io_errors is not None:
            self.io_errors.memory = memory
        await self._op("set_mem_table", self.inner.set_mem_table, memory)

    async def set_vring_num(self, index: int, num: int) -> None:
        if self.io_errors is not None:
            self.io_errors.ring(index).num = num
        await self._op("set_vring_num", self.inner.set_vring_num, index, num)

    async def set_vring_addr(self, addr: VringAddr) -> None:
        if self.io_errors is not None:
            self.io_errors.set_addr(addr)
        await self._op("set_vring_addr", self.inner.set_vring_addr, addr)

    async def set_vring_base(self, index: int, base: int) -> None:
        await self._op("set_vring_base", self.inner.set_vring_base, index, base)

    async def get_vring_base(self, index: int) -> RingState:
        try:
            return await self._op("get_vring_base", self.inner.get_vring_base, index)
        finally:
            if self.io_errors is not None:
                self.io_errors.flush()

    async def set_vring_kick(self, index: int, fd: int) -> None:
        await self._op("set_vring_kick", self.inner.set_vring_kick, index, fd)

    async def set_vring_call(self, index: int, fd: int) -> None:
        if self.io_errors is not None:
            fd = self.io_errors.call_fd(index, fd)
        await self._op("set_vring_call", self.inner.set_vring_call, index, fd)

    async def set_vring_enable(self, index: int, enable: bool) -> None:
        await self._op("set_vring_enable", self.inner.set_vring_enable, index, enable)

    async def get_config(self, offset: int, size: int) -> bytes:
        return await self._op("get_config", self.inner.get_config, offset, size)

    async def set_config(self, offset: int, data: bytes) -> None:
        if self._hides(Capability.CONFIG):
            return await super().set_config(offset, data)
        await self._op("set_config", self.inner.set_config, offset, data)

    async def set_status(self, status: int) -> None:
        if self._hides(Capability.STATUS):
            return await super().set_status(status)
        await self._op("set_status", self.inner.set_status, status)

    async def reset(self) -> None:
        await self._op("reset", self.inner.reset)
        if self.io_errors is not None:
            self.io_errors.forget_rings()

    async def suspend(self) -> None:
        if self._hides(Capability.SUSPEND):
            return await super().suspend()
        try:
            await self._op("suspend", self.inner.suspend)
        finally:
            if self.io_errors is not None:
                self.io_errors.flush()

    async def resume(self) -> None:
        if self._hides(Capability.RESUME):
            return await super().resume()
        await self._op("resume", self.inner.resume)

    async def save_state(self) -> bytes | None:
        if self._hides(Capability.DEVICE_STATE):
            return await super().save_state()
        return await self._op("save_state", self.inner.save_state)

    async def load_state(self, blob: bytes) -> None:
        if self._hides(Capability.DEVICE_STATE):
            return await super().load_state(blob)
        await self._op("load_state", self.inner.load_state, blob)

    async def prepare_inflight(self, num_queues: int, queue_size: int) -> None:
        if self._hides(Capability.INFLIGHT):
            return await super().prepare_inflight(num_queues, queue_size)
        await self._op("prepare_inflight", self.inner.prepare_inflight, num_queues, queue_size)

    async def wait_for_endpoint(self, timeout: float) -> bool:
        return await self._op("wait_for_endpoint", self.inner.wait_for_endpoint, timeout)

    def lost_peer_alive(self) -> bool | None:
        return self.inner.lost_peer_alive()

    def in_flight(self, index: int) -> int | None:
        return None if self._hides(Capability.INFLIGHT) else self.inner.in_flight(index)

    def disable_stops_fetch(self) -> bool:
        return self.inner.disable_stops_fetch()

    def set_event_handler(self, handler: BackendEventHandler | None) -> None:
        super().set_event_handler(handler)
        self.inner.set_event_handler(None if self._hides(Capability.EVENTS) else handler)

    async def set_log_base(self, log_fd: int, size: int) -> None:
        if self._hides(Capability.DIRTY_LOG):
            return await super().set_log_base(log_fd, size)
        await self._op("set_log_base", self.inner.set_log_base, log_fd, size)

    async def set_dirty_logging(self, enabled: bool) -> None:
        if self._hides(Capability.DIRTY_LOG):
            return await super().set_dirty_logging(enabled)
        await self._op("set_dirty_logging", self.inner.set_dirty_logging, enabled)

    def set_busy_poll(self, seconds: float) -> float:
        if self._hides(Capability.BUSY_POLL):
            return super().set_busy_poll(seconds)
        return self.inner.set_busy_poll(seconds)

    def peer_identity(self) -> PeerIdentity | None:
        if self._hides(Capability.PEER_IDENTITY):
            return None
        return self.inner.peer_identity()

    def migration_blockers(self) -> list[str]:
        return self.inner.migration_blockers()
