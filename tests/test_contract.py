"""The backend contract: BackendBase defaults, the load-time check, the registry."""

from __future__ import annotations

from importlib import metadata

import pytest

from shadowvmm.backends import base
from shadowvmm.backends.base import BackendBase, Capability, check_backend, load_backend
from shadowvmm.errors import PluginError, UnsupportedError
from shadowvmm.virtio.constants import DeviceId


class Minimal(BackendBase):
    """Only the mandatory operations."""

    implementation = "minimal"
    device_id = DeviceId.RNG

    def capabilities(self) -> Capability:
        return Capability.NONE

    async def connect(self) -> None: ...
    async def get_features(self) -> int: return 0
    async def set_features(self, features: int) -> None: ...
    async def set_mem_table(self, memory) -> None: ...
    async def set_vring_num(self, index: int, num: int) -> None: ...
    async def set_vring_addr(self, addr) -> None: ...
    async def set_vring_base(self, index: int, base: int) -> None: ...
    async def get_vring_base(self, index: int): ...
    async def set_vring_kick(self, index: int, fd: int) -> None: ...
    async def set_vring_call(self, index: int, fd: int) -> None: ...
    async def set_vring_enable(self, index: int, enable: bool) -> None: ...
    async def reset(self) -> None: ...


class NoSuspend:
    """Written without the base class and missing two operations."""

    implementation = "nosuspend"
    implementation_version = 1

    def capabilities(self) -> Capability:
        return Capability.NONE


def test_the_mandatory_operations_are_enough_with_the_base_class() -> None:
    assert check_backend(Minimal) == []
    assert check_backend(Minimal()) == []


def test_the_check_names_every_missing_method() -> None:
    problems = check_backend(NoSuspend)
    assert "missing method suspend()" in problems
    assert "missing method get_vring_base()" in problems
    assert len(problems) == len(base.MANDATORY) + len(base.OPTIONAL) - 1


def test_a_coroutine_must_stay_a_coroutine() -> None:
    class Sync(Minimal):
        def reset(self) -> None:  # type: ignore[override]
            return None

    assert check_backend(Sync) == ["reset() must be a coroutine (async def)"]


async def test_base_defaults_are_those_of_a_backend_without_capabilities() -> None:
    b = Minimal()
    assert await b.get_queue_num() == 1
    assert b.config_size() == 0
    assert await b.save_state() is None
    assert b.peer_identity() is None
    assert b.set_busy_poll(0.5) == 0.0
    assert b.migration_blockers() == []
    assert b.lost_peer_alive() is None
    await b.load_state(b"")
    for call in (b.suspend(), b.resume(), b.set_log_base(3, 4096), b.set_dirty_logging(True),
                 b.prepare_inflight(1, 256), b.load_state(b"x")):
        with pytest.raises(UnsupportedError, match="minimal"):
            await call
    seen = []
    b.set_event_handler(seen.append)
    event = base.BackendEvent(base.BackendEventKind.CONFIG_CHANGED)
    b.emit(event)
    assert seen == [event]


def test_load_time_check_refuses_a_plugin_missing_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = metadata.EntryPoint("broken", f"{__name__}:NoSuspend", base.ENTRY_POINT_GROUP)
    monkeypatch.setattr(base, "available_backends", lambda: {"broken": ep})
    with pytest.raises(PluginError, match=r"does not honour the backend contract: .*missing method suspend\(\)"):
        load_backend("broken")


def test_every_registered_backend_honours_the_contract() -> None:
    names = sorted(base.available_backends())
    assert {"inproc", "vhost-user", "vdpa"} <= set(names)
    for name in names:
        factory = load_backend(name)
        assert check_backend(factory) == [], name
