"""pytest plugin of the vDPA backend (entry point ``pytest11: shadowvmm-vdpa``): ``vdpa_sim``.

``rd = await vdpa_sim("blk")`` (or ``"net"``) creates a device on the kernel's vDPA
simulator (``vdpasim_blk``, ``vdpasim_net``) over the ``vdpa`` generic-netlink family,
builds a shadowvmm device on its ``/dev/vhost-vdpa-N`` with the ``vdpa`` backend and
returns it ready (:class:`shadowvmm.testing.ready.ReadyDevice`: guest driver at
DRIVER_OK, backend started); every device is closed and its simulator device deleted at
teardown. The simulators exist only inside the vDPA VM lane (``SHADOWVMM_VDPA_VM=1``,
``python -m shadowvmm_vdpa.vm``); anywhere else the test is skipped, under ``CI=true`` too,
as the in-VM tests are: the lane's own test (``tests/test_vdpa_lane.py``) is the one that
fails under CI when the lane cannot run.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import pytest

from shadowvmm.testing.ready import ReadyDevice, ready_device

from .netlink import VdpaNetlink, vhost_vdpa_path
from .vm import ENV_IN_VM, in_vm

#: Device type -> the simulator's management device.
SIMULATORS: Final = {"blk": "vdpasim_blk", "net": "vdpasim_net"}
#: MAC address of a simulated net device.
SIM_MAC: Final = "02:5a:00:00:00:3c"
#: Guest memory and queue size of a simulated device: vhost-vdpa pins the guest memory it
#: maps, and Linux 6.1's vdpa_sim refuses (EFAULT on IOTLB UPDATE) 16 MiB in the lane's VM.
SIM_MEMORY: Final = 2 << 20
SIM_QUEUE_SIZE: Final = 64
#: Guest driver options that fit that memory (virtio-blk: 8 slots of 4 KiB per queue).
SIM_DRIVER: Final = {"blk": {"max_request": 4096, "slots_per_queue": 8}, "net": {}}

VdpaSimFactory = Callable[..., Awaitable[ReadyDevice]]


@contextlib.asynccontextmanager
async def vdpa_sim_device(nl: VdpaNetlink, device_type: str, name: str, **options: Any) -> AsyncIterator[ReadyDevice]:
    """A simulator device *name* of *device_type*, ready; deleted on leaving. *options*:
    :func:`shadowvmm.testing.ready.ready_device` keywords (``backend_features`` and other
    keys of the ``vdpa`` backend go in ``backend_config``)."""
    if device_type not in SIMULATORS:
        raise pytest.UsageError(f"vdpa_sim device type {device_type!r}: one of {', '.join(SIMULATORS)}")
    await nl.add_device(name, SIMULATORS[device_type], mac=SIM_MAC if device_type == "net" else None)
    try:
        path = str(vhost_vdpa_path(name))
        config = {"path": path, "device": device_type, **options.pop("backend_config", {})}
        options.setdefault("memory_bytes", SIM_MEMORY)
        options.setdefault("queue_size", SIM_QUEUE_SIZE)
        options.setdefault("start", {"queue_size": options["queue_size"]})
        options.setdefault("driver", SIM_DRIVER[device_type])
        async with ready_device(device_type, config, backend="vdpa", vmm_config=False, name=name,
                                **options) as rd:
            yield rd
    finally:
        await nl.delete_device(name)


def _fixture(function: Callable[..., Any]) -> Any:
    try:
        import pytest_asyncio
    except ImportError:
        return pytest.fixture(name=function.__name__)(_needs_pytest_asyncio)
    return pytest_asyncio.fixture(function)


def _needs_pytest_asyncio() -> None:
    pytest.fail("vdpa_sim needs pytest-asyncio: pip install 'shadowvmm[pytest]'", pytrace=False)


@_fixture
async def vdpa_sim() -> AsyncIterator[VdpaSimFactory]:
    """``await vdpa_sim(device_type="blk", **options)``: a ready device on a vDPA simulator
    (inside the vDPA VM lane only; skipped elsewhere)."""
    if not in_vm():
        pytest.skip(f"vdpa_sim runs inside the vDPA VM lane only ({ENV_IN_VM}=1; "
                    f"python -m shadowvmm_vdpa.vm, or plugins/vdpa/tests/test_vdpa_lane.py)")
    async with VdpaNetlink() as nl, contextlib.AsyncExitStack() as stack:
        count = 0

        async def build(device_type: str = "blk", **options: Any) -> ReadyDevice:
            nonlocal count
            count += 1
            name = options.pop("name", f"sim{device_type}{count}")
            return await stack.enter_async_context(vdpa_sim_device(nl, device_type, name, **options))

        yield build
