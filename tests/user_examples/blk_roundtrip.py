"""A user's test file (copied as test_blk_roundtrip.py into an empty directory, no config)."""
import sys

DATA = bytes(range(256)) * 16


async def test_qsd_write_read(qsd_blk):
    await qsd_blk.blk.write(8, DATA)
    assert await qsd_blk.blk.read(8, len(DATA)) == DATA


async def test_my_daemon(vhost_user_daemon, vhost_user_device, tmp_path):
    sock = tmp_path / "ref.sock"
    vhost_user_daemon([sys.executable, "-m", "shadowvmm_vhost_user.refbackend", sock], sock)
    rd = await vhost_user_device(sock, "blk", queues=2)
    await rd.blk.write(0, DATA)
    assert await rd.blk.read(0, len(DATA)) == DATA
    assert rd.peer is not None and rd.peer.running
