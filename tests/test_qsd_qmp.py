"""qemu-storage-daemon under QMP control: close an export under a connected client, add it back; kill -9 and restart."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shadowvmm.testing.peers import PeerCommandError, QsdBlk, probe_features
from shadowvmm.testing.plugin import require_peer
from shadowvmm_vhost_user import protocol as vu

IMAGE_SIZE = 16 << 20
REPLY = vu.Header.STRUCT.size + vu.U64.STRUCT.size


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[QsdBlk]:
    binary = require_peer("qemu-storage-daemon")
    peer = QsdBlk(tmp_path, image=tmp_path / "disk.img", size=IMAGE_SIZE, create=True, num_queues=2,
                  qmp=True, binary=binary)
    with peer:
        yield peer


def get_features(sock: socket.socket) -> int:
    sock.sendall(vu.Header(vu.FrontendRequest.GET_FEATURES, vu.VERSION, 0).pack())
    data = b""
    while len(data) < REPLY:
        chunk = sock.recv(REPLY - len(data))
        assert chunk, "back-end closed the connection"
        data += chunk
    return vu.U64.unpack(data[vu.Header.STRUCT.size:]).value


def test_argv_export_and_monitor(tmp_path: Path) -> None:
    qsd = QsdBlk(tmp_path, size=1 << 30, num_queues=2, logical_block_size=4096, qmp=True, binary="/bin/true")
    argv = qsd.argv()
    assert argv[argv.index("--export") + 1] == (
        f"type=vhost-user-blk,id=exp0,node-name=n0,addr.type=unix,addr.path={qsd.socket_path},"
        "writable=on,num-queues=2,logical-block-size=4096")
    assert argv[-4:] == ["--chardev", f"socket,id=qmp0,path={qsd.qmp_path},server=on,wait=off",
                         "--monitor", "chardev=qmp0,mode=control"]
    assert "--monitor" not in QsdBlk(tmp_path, size=1 << 30, binary="/bin/true").argv()


@pytest.mark.peer
def test_close_export_gives_eof_and_add_export_serves_again(qsd: QsdBlk) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5.0)
        client.connect(os.fspath(qsd.socket_path))
        offered = get_features(client)
        assert offered & vu.F_PROTOCOL_FEATURES
        start = time.monotonic()
        qsd.close_export(0)
        client.settimeout(0.1)
        assert client.recv(1) == b"", "the connected client did not see EOF"
        assert time.monotonic() - start < 0.1
    assert qsd.qmp("query-block-exports") == []
    assert not qsd.socket_path.exists()

    qsd.add_export(0)
    assert [export["id"] for export in qsd.qmp("query-block-exports")] == ["exp0"]
    assert probe_features(qsd.socket_path, timeout=2.0) == offered
    assert qsd.running


@pytest.mark.peer
def test_qmp_errors_are_typed(qsd: QsdBlk, tmp_path: Path) -> None:
    with pytest.raises(PeerCommandError, match="exp9"):
        qsd.qmp("block-export-del", id="exp9")
    with pytest.raises(PeerCommandError, match="CommandNotFound"):
        qsd.qmp("no-such-command")
    assert qsd.qmp("query-block-exports")[0]["id"] == "exp0"
    plain = QsdBlk(tmp_path / "plain", size=1 << 20, binary=qsd.binary)
    with pytest.raises(PeerCommandError, match="without a QMP monitor"):
        plain.qmp("query-block-exports")


@pytest.mark.peer
def test_kill_9_and_restart_keeps_the_image(qsd: QsdBlk) -> None:
    assert qsd.image is not None
    with open(qsd.image, "r+b") as f:
        f.write(b"kept")
    pid = qsd.pid
    assert qsd.kill() == -signal.SIGKILL
    assert not qsd.running and qsd.socket_path.exists()
    qsd.restart()
    assert qsd.pid != pid and qsd.running
    assert probe_features(qsd.socket_path, timeout=2.0) & vu.F_PROTOCOL_FEATURES
    assert qsd.image.read_bytes()[:4] == b"kept" and qsd.image.stat().st_size == IMAGE_SIZE
    assert qsd.qmp("query-block-exports")[0]["id"] == "exp0"
    assert (qsd.workdir / f"{qsd.name}.1.log").exists()
