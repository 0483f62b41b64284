"""pytest plugin (entry point ``pytest11: shadowvmm``): fixtures for the real vhost-user peers.

Every fixture is function-scoped, starts its peer in the test's ``tmp_path``
and stops and reaps it at teardown. A missing peer skips the test, except
when ``CI=true``: in CI a missing peer is a failure, never a silent skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shadowvmm.testing.peers import DpdkTestpmd, PeerMissing, QsdBlk, Virtiofsd, find_peer

__all__ = ["qsd_blk_file", "qsd_blk_null", "require_peer", "testpmd", "virtiofsd"]

QSD_FILE_SIZE = 64 << 20
QSD_NULL_SIZE = 1 << 30
QSD_QUEUES = 2
SHARE_FILE = "hello.txt"
SHARE_TEXT = b"hello\n"


def in_ci() -> bool:
    """Whether the ``CI`` environment variable says we run in CI."""
    return os.environ.get("CI", "").strip().lower() == "true"


def require_peer(name: str) -> str:
    """Return the path of peer *name*; skip the test if missing (fail if ``CI=true``)."""
    try:
        return find_peer(name)
    except PeerMissing as exc:
        if in_ci():
            pytest.fail(f"CI=true and a real peer is missing: {exc}", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture
def qsd_blk_file(tmp_path: Path) -> Iterator[QsdBlk]:
    """qemu-storage-daemon exporting a fresh 64 MiB sparse raw image, 2 queues, writable."""
    binary = require_peer("qemu-storage-daemon")
    peer = QsdBlk(
        tmp_path, image=tmp_path / "disk.img", size=QSD_FILE_SIZE, create=True, num_queues=QSD_QUEUES, binary=binary
    )
    with peer:
        yield peer


@pytest.fixture
def qsd_blk_null(tmp_path: Path) -> Iterator[QsdBlk]:
    """qemu-storage-daemon exporting ``null-co`` (1 GiB, ``read-zeroes=off``), 2 queues."""
    binary = require_peer("qemu-storage-daemon")
    peer = QsdBlk(tmp_path, size=QSD_NULL_SIZE, num_queues=QSD_QUEUES, name="qsd-null", binary=binary)
    with peer:
        yield peer


@pytest.fixture
def virtiofsd(tmp_path: Path) -> Iterator[Virtiofsd]:
    """A one-shot virtiofsd sharing ``tmp_path/share`` (contains ``hello.txt`` = ``b"hello\\n"``)."""
    binary = require_peer("virtiofsd")
    share = tmp_path / "share"
    share.mkdir()
    (share / SHARE_FILE).write_bytes(SHARE_TEXT)
    peer = Virtiofsd(tmp_path, source=share, binary=binary)
    with peer:
        yield peer


@pytest.fixture
def testpmd(tmp_path: Path) -> Iterator[DpdkTestpmd]:
    """dpdk-testpmd vhost-user net backend in io mode, warmed up, forwarding started.

    io forwarding echoes every frame the frontend transmits back into its
    receive queue; it busy-polls one lcore while started.
    """
    binary = require_peer("dpdk-testpmd")
    peer = DpdkTestpmd(tmp_path, forward_mode="io", binary=binary)
    with peer:
        peer.start_forwarding()
        yield peer
