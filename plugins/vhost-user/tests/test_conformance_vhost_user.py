"""The backend conformance kit (shadowvmm.testing.conformance) on the vhost-user backend, one pytest
test per step: against the reference back-end in its own process (RefBlk: DEVICE_STATE, INFLIGHT,
RESET_DEVICE, STATUS; a second one on the same image takes the migrated state) and against
qemu-storage-daemon. A missing qemu-storage-daemon skips, and fails under ``CI=true``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shadowvmm.backends.base import Backend, load_backend
from shadowvmm.testing.conformance import conformance_suite, run_conformance
from shadowvmm.testing.peers import QsdBlk, RefBlk

IMAGE_BYTES = 16 << 20
QUEUES = 2


def vhost_user_blk(socket: Path, queues: int = QUEUES) -> Callable[[], Backend]:
    """Fresh, unconnected vhost-user-blk backends on *socket*, built through the entry point."""
    factory = load_backend("vhost-user")
    return lambda: factory({"socket": str(socket), "device": "blk", "queues": queues, "timeout": 5.0})


@pytest.fixture
def refblk_pair(tmp_path: Path) -> Iterator[tuple[RefBlk, RefBlk]]:
    """Two reference back-ends on one image: the second serves the device-state step's destination
    (the reference back-end serves one front-end at a time)."""
    image = tmp_path / "disk.img"
    with RefBlk(tmp_path, image=image, size=IMAGE_BYTES, queues=QUEUES, name="src") as src, \
            RefBlk(tmp_path, image=image, size=IMAGE_BYTES, create=False, queues=QUEUES, name="dst") as dst:
        yield src, dst


@pytest.fixture
def refblk_factory(refblk_pair: tuple[RefBlk, RefBlk]) -> Callable[[], Backend]:
    return vhost_user_blk(refblk_pair[0].socket_path)


@pytest.fixture
def refblk_destination(refblk_pair: tuple[RefBlk, RefBlk]) -> Callable[[], Backend]:
    return vhost_user_blk(refblk_pair[1].socket_path)


@pytest.fixture
def qsd_factory(qsd_blk_file: QsdBlk) -> Callable[[], Backend]:
    return vhost_user_blk(qsd_blk_file.socket_path)


test_conformance_qsd = conformance_suite("qsd_factory", "blk")
test_conformance_qsd_mmio_packed = conformance_suite("qsd_factory", "blk", transport="mmio", packed=True)


async def test_conformance_refblk_whole_run(refblk_factory: Callable[[], Backend],
                                            refblk_destination: Callable[[], Backend]) -> None:
    """Every step in one run; what the reference back-end offers runs and passes."""
    report = await run_conformance(refblk_factory, "blk", destination_factory=refblk_destination)
    print(report.format())
    assert not report.failed, report.format()
    assert report["device-state"].detail.endswith("loaded into a fresh backend; I/O after"), report.format()
    skipped = {s.name for s in report if s.detail.startswith("not offered")}
    assert skipped <= {"suspend-resume", "dirty-log", "events"}, report.format()


test_conformance_refblk = conformance_suite("refblk_factory", "blk", destination_fixture="refblk_destination")
