"""The backend conformance kit (shadowvmm.testing.conformance) on the vhost-vdpa backend against the
kernel's simulators, inside the VM lane, one pytest test per step: vdpa_sim_blk with RESUME (the
6.12 path) and told to drop RESUME and IOTLB_PERSIST (what 6.1 offers: stop by reset and replay),
and vdpa_sim_net, whose loopback sends every frame back (``net_echo``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from shadowvmm.backends.base import Backend, load_backend
from shadowvmm.testing.conformance import conformance_suite
from shadowvmm_vdpa.ioctl import BackendFeature

MAC = "02:5a:00:00:00:4c"
#: Guest memory of each machine the kit builds (the simulators map all of it).
MEMORY_MIB = 4


def vdpa(path: str, device: str, *, replay: bool = False) -> Callable[[], Backend]:
    """Fresh, unconnected vhost-vdpa backends on *path*, built through the entry point."""
    factory = load_backend("vdpa")
    config: dict[str, Any] = {"path": path, "device": device}
    if replay:
        config["backend_features"] = ~(BackendFeature.RESUME.mask | BackendFeature.IOTLB_PERSIST.mask)
    return lambda: factory(config)


@pytest.fixture
async def vdpa_blk(vdpa_device: Callable[..., contextlib.AbstractAsyncContextManager[str]]
                   ) -> AsyncIterator[Callable[[], Backend]]:
    async with vdpa_device("vblkc0", "vdpasim_blk") as path:
        yield vdpa(path, "blk")


@pytest.fixture
async def vdpa_blk_replay(vdpa_device: Callable[..., contextlib.AbstractAsyncContextManager[str]]
                          ) -> AsyncIterator[Callable[[], Backend]]:
    async with vdpa_device("vblkc1", "vdpasim_blk") as path:
        yield vdpa(path, "blk", replay=True)


@pytest.fixture
async def vdpa_net(vdpa_device: Callable[..., contextlib.AbstractAsyncContextManager[str]]
                   ) -> AsyncIterator[Callable[[], Backend]]:
    async with vdpa_device("vnetc0", "vdpasim_net", mac=MAC) as path:
        yield vdpa(path, "net")


test_conformance_vdpa_blk = conformance_suite("vdpa_blk", "blk", memory_mib=MEMORY_MIB, io_timeout=20)
test_conformance_vdpa_blk_replay = conformance_suite("vdpa_blk_replay", "blk", memory_mib=MEMORY_MIB,
                                                     io_timeout=20)
test_conformance_vdpa_net = conformance_suite("vdpa_net", "net", net_echo=True, memory_mib=MEMORY_MIB,
                                              io_timeout=20)
