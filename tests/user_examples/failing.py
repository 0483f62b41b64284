"""A user's failing test (copied as test_failing.py): its report shows the vhost-user trace
and the peer's log tail."""


async def test_reads_back_the_wrong_data(qsd_blk):
    await qsd_blk.blk.write(0, b"a" * 512)
    assert await qsd_blk.blk.read(0, 512) == b"b" * 512
