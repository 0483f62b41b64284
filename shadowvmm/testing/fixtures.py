"""Device fixtures of the ``shadowvmm`` pytest plugin: each yields a started device.

Every device fixture yields a :class:`~shadowvmm.testing.ready.ReadyDevice` (machine
built, device realized, guest driver at DRIVER_OK, backend started) and closes it, then
stops and reaps its peer, at teardown. They are thin wrappers around
:mod:`shadowvmm.testing.ready`, which works without pytest. A missing peer or plugin skips
the test, and fails it under ``CI=true``. If the test fails, its report shows the last
vhost-user messages and the tail of each peer's log (:mod:`shadowvmm.testing.report`).

* ``vhost_user_device(socket_path, device_type, **options)`` - any back-end already
  listening (``await`` it; ``options``: :func:`.ready.vhost_user_ready`);
* ``vhost_user_daemon(argv, socket_path, *, ready="socket", env=None, name="daemon",
  start_timeout=10.0)`` - launch your own back-end, wait for its socket, log its output;
* ``qsd_blk`` - qemu-storage-daemon, a 64 MiB image (``indirect`` parameter ``"null-co"``:
  a 1 GiB null-co node that reads back no data);
* ``virtiofsd_fs`` - virtiofsd sharing a temporary directory (``rd.peer.source``);
* ``dpdk_net`` - dpdk-testpmd forwarding in io mode (each frame sent comes back);
* ``reference_backend`` - the vhost-user plugin's reference vhost-user-blk back-end, 16 MiB.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import pytest
import pytest_asyncio

from .peers import Daemon, DpdkTestpmd, Peer, QsdBlk, RefBlk, StrPath, Virtiofsd
from .ready import ReadyDevice, vhost_user_ready
from .report import PEERS_KEY, record_peer
from .requires import require_backend, require_module, require_peer

__all__ = ["dpdk_net", "qsd_blk", "reference_backend", "vhost_user_daemon", "vhost_user_device", "virtiofsd_fs"]

QSD_IMAGE_BYTES: Final = 64 << 20
QSD_NULL_BYTES: Final = 1 << 30
QSD_DRIVERS: Final = ("file", "null-co")
REFBLK_BYTES: Final = 16 << 20
QUEUES: Final = 2
VHOST_USER_DIST: Final = "shadowvmm-vhost-user"

DaemonFactory = Callable[..., Daemon]
DeviceFactory = Callable[..., Awaitable[ReadyDevice]]


@pytest.fixture
def vhost_user_daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DaemonFactory]:
    """``vhost_user_daemon(argv, socket_path, *, ready="socket", env=None, name="daemon",
    start_timeout=10.0)`` launches your back-end and returns its :class:`~.peers.Daemon` once
    *socket_path* is ready (``ready``: ``"socket"`` the file is a socket, ``"listening"``
    it accepts a connection, ``"get_features"`` it answers GET_FEATURES); it logs to
    ``tmp_path/NAME.log`` (``daemon.log_tail()``). A daemon that exits or is not ready in
    time fails with its log tail. At teardown each one gets SIGTERM, then SIGKILL after 5 s,
    and is reaped."""
    daemons: list[Daemon] = []

    def launch(argv: Sequence[StrPath], socket_path: StrPath, **options: Any) -> Daemon:
        name = options.pop("name", "daemon" if not daemons else f"daemon{len(daemons)}")
        daemon = Daemon(tmp_path, [os.fspath(a) for a in argv], socket_path, name=name, **options)
        record_peer(request.node, daemon)
        daemons.append(daemon)
        return daemon.start()

    try:
        yield launch
    finally:
        for daemon in reversed(daemons):
            daemon.stop()


@pytest_asyncio.fixture
async def vhost_user_device(request: pytest.FixtureRequest,
                            vhost_user_daemon: DaemonFactory) -> AsyncIterator[DeviceFactory]:
    """``await vhost_user_device(socket_path, device_type, **options)`` builds a *device_type*
    (``blk``, ``fs``, ``net``, ``rng``) device on the vhost-user back-end listening on
    *socket_path* and returns it ready (:class:`~.ready.ReadyDevice`); every device built is
    closed at teardown, before any daemon from ``vhost_user_daemon`` is stopped. *options*:
    :func:`~.ready.vhost_user_ready` (``queues``, ``transport``, ``packed``, ``timeout`` the
    ready bound, ``request_timeout``, ``tag``, ``mac``, ...). A daemon launched on the same
    socket by ``vhost_user_daemon`` becomes ``rd.peer``."""
    require_backend("vhost-user", VHOST_USER_DIST)
    async with contextlib.AsyncExitStack() as stack:

        async def build(socket_path: StrPath, device_type: str, **options: Any) -> ReadyDevice:
            peer = options.pop("peer", None) or _peer_on(request.node, Path(socket_path))
            return await stack.enter_async_context(vhost_user_ready(socket_path, device_type, peer=peer, **options))

        yield build


def _peer_on(node: pytest.Item, socket_path: Path) -> Peer | None:
    for peer in node.stash.get(PEERS_KEY, []):
        if isinstance(peer, Daemon) and peer.socket_path == socket_path:
            return peer
    return None


@pytest_asyncio.fixture
async def qsd_blk(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ReadyDevice]:
    """virtio-blk on qemu-storage-daemon (2 queues): a fresh 64 MiB image file, or with
    ``@pytest.mark.parametrize("qsd_blk", ["null-co"], indirect=True)`` a 1 GiB ``null-co``
    node (writes are dropped, reads return no data)."""
    driver = getattr(request, "param", "file")
    if driver not in QSD_DRIVERS:
        raise pytest.UsageError(f"qsd_blk parameter {driver!r}: one of {', '.join(QSD_DRIVERS)}")
    require_backend("vhost-user", VHOST_USER_DIST)
    binary = require_peer("qemu-storage-daemon")
    if driver == "file":
        peer = QsdBlk(tmp_path, image=tmp_path / "disk.img", size=QSD_IMAGE_BYTES, create=True,
                      num_queues=QUEUES, binary=binary)
    else:
        peer = QsdBlk(tmp_path, size=QSD_NULL_BYTES, num_queues=QUEUES, name="qsd-null", binary=binary)
    with record_peer(request.node, peer):
        async with vhost_user_ready(peer.socket_path, "blk", peer=peer, queues=QUEUES) as rd:
            yield rd


@pytest_asyncio.fixture
async def virtiofsd_fs(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ReadyDevice]:
    """virtio-fs on virtiofsd sharing the empty directory ``rd.peer.source`` (``tmp_path/share``),
    tag ``shadowfs``; the FUSE session is initialised (``rd.fs.write_file``, ``read_file``, ...)."""
    require_backend("vhost-user", VHOST_USER_DIST)
    binary = require_peer("virtiofsd")
    share = tmp_path / "share"
    share.mkdir(exist_ok=True)
    peer = Virtiofsd(tmp_path, source=share, binary=binary)
    with record_peer(request.node, peer):
        async with vhost_user_ready(peer.socket_path, "fs", peer=peer) as rd:
            yield rd


@pytest_asyncio.fixture
async def dpdk_net(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ReadyDevice]:
    """virtio-net (one queue pair) on dpdk-testpmd forwarding in io mode: every frame the
    driver sends (``rd.net.send``) comes back on its receive queue (``rd.net.receive``).
    testpmd busy-polls one lcore while the test runs."""
    require_backend("vhost-user", VHOST_USER_DIST)
    binary = require_peer("dpdk-testpmd")
    peer = DpdkTestpmd(tmp_path, forward_mode="io", binary=binary)
    with record_peer(request.node, peer):
        peer.start_forwarding()
        async with vhost_user_ready(peer.socket_path, "net", peer=peer, queues=QUEUES) as rd:
            yield rd


@pytest_asyncio.fixture
async def reference_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ReadyDevice]:
    """virtio-blk (2 queues, 16 MiB image) on the vhost-user plugin's reference back-end
    (``python -m shadowvmm_vhost_user.refbackend``) in its own process: it offers INFLIGHT_SHMFD,
    RESET_DEVICE, STATUS and DEVICE_STATE, which no Debian peer does."""
    require_backend("vhost-user", VHOST_USER_DIST)
    require_module("shadowvmm_vhost_user.refbackend", VHOST_USER_DIST)
    peer = RefBlk(tmp_path, size=REFBLK_BYTES, queues=QUEUES, python=sys.executable)
    with record_peer(request.node, peer):
        async with vhost_user_ready(peer.socket_path, "blk", peer=peer, queues=QUEUES) as rd:
            yield rd
