"""Tests under plugins/vdpa/tests/vm/ run only inside the vDPA VM lane.

plugins/vdpa/tests/test_vdpa_lane.py boots the lane and runs ``pytest tests/vm/``
in the guest (from plugins/vdpa), where the launcher sets ``SHADOWVMM_VDPA_VM=1``;
anywhere else these tests are skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from shadowvmm_vdpa import VdpaNetlink, vhost_vdpa_path
from shadowvmm_vdpa.vm import ENV_IN_VM, in_vm

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = None if in_vm() else pytest.mark.skip(
        reason=f"runs inside the vDPA VM only ({ENV_IN_VM}=1, see plugins/vdpa/tests/test_vdpa_lane.py)")
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.vm)
            if skip is not None:
                item.add_marker(skip)


@pytest.fixture
async def nl() -> AsyncIterator[VdpaNetlink]:
    async with VdpaNetlink() as client:
        yield client


@pytest.fixture
def vdpa_device(nl: VdpaNetlink) -> Callable[..., contextlib.AbstractAsyncContextManager[str]]:
    """``async with vdpa_device(name, mgmtdev, **attrs) as path``: create, yield /dev/vhost-vdpa-N, delete."""

    @contextlib.asynccontextmanager
    async def make(name: str, mgmtdev: str, **attrs) -> AsyncIterator[str]:
        await nl.add_device(name, mgmtdev, **attrs)
        try:
            yield str(vhost_vdpa_path(name))
        finally:
            await nl.delete_device(name)

    return make
