"""The nested chain against qemu-storage-daemon: L2 -> L1 -> L0 -> vhost-user -> qsd on a file image.
qsd maps the L0 memfd at the IOMMU table's offsets (vhost-user mmap_offset) and reads L2's
rings and buffers at L2 addresses. A missing qemu-storage-daemon skips (fails under CI=true)."""

from __future__ import annotations

import asyncio

import pytest
from l1chain import LIVE, nested_chain

from shadowvmm.testing.peers import QsdBlk
from shadowvmm.workload import StatusWatcher, blk_write_verify
from shadowvmm_nested import Phase

pytestmark = pytest.mark.peer


def vhost_user(qsd: QsdBlk) -> dict[str, object]:
    return {"socket": str(qsd.socket_path), "device": "blk", "queues": 2, "timeout": 5.0}


async def test_l2_io_through_l1_reaches_qsds_image(qsd_blk_file: QsdBlk) -> None:
    async with nested_chain("vhost-user", vhost_user(qsd_blk_file)) as c:
        assert len(c.driver.dev.queues) == 2
        blocks = {0: b"\x4c\x32" * 2048, 4096: bytes(range(256)) * 16, 65_000: b"\xee" * 4096}
        for index, (sector, data) in enumerate(blocks.items()):
            await c.driver.write(sector, data, queue=index % 2)
        await c.driver.flush()
        for sector, data in blocks.items():
            assert await c.driver.read(sector, len(data), queue=1) == data
        with open(qsd_blk_file.image, "rb") as image:     # type: ignore[arg-type]
            for sector, data in blocks.items():
                image.seek(sector * 512)
                assert image.read(len(data)) == data


async def test_l1_stops_and_resumes_its_qsd_backed_device_under_l2_io(qsd_blk_file: QsdBlk) -> None:
    async with nested_chain("vhost-user", vhost_user(qsd_blk_file)) as c:
        watcher = StatusWatcher(c.driver.dev.status, interval=0).start()
        stops = 0
        finished = asyncio.Event()

        async def stopper() -> None:
            nonlocal stops
            while stops < 3 and not finished.is_set():
                await asyncio.sleep(0.003)
                await c.device.stop()
                assert c.backend.phase is Phase.STOPPED
                await asyncio.sleep(0.002)
                await c.device.resume()
                stops += 1

        task = asyncio.create_task(stopper())
        res = await blk_write_verify(c.driver, requests=1500, queue_depth=8, block_bytes=4096, seed=9)
        finished.set()
        await task
        await watcher.stop()
        assert stops == 3 and res.mismatches == []
        completed = sum(q.completed for q in c.driver.dev.queues)
        assert completed == res.writes + res.reads                 # each request exactly once
        assert watcher.values == {LIVE}
