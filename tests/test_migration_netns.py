"""Copy migration over TCP between two network namespaces (source and destination processes).

The source runs virtio-blk on a qemu-storage-daemon export under guest
read+write load, so the back-end writes guest memory during pre-copy; the
destination (another process, in its own namespace) reaches the same image
through the second export. Guest memory on the destination must be
byte-identical to the source's at switch-over: only possible if the
back-end's writes were logged (vhost-user LOG_SHMFD + LOG_ALL) and re-sent.
Addresses exist only inside the namespaces this test creates.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from shadowvmm.device import VirtioDevice
from shadowvmm.migration import cli as migration_cli
from shadowvmm.testing.peers import QsdBlk
from shadowvmm.testing.plugin import in_ci, require_peer

PORT = 47211


@dataclass(frozen=True)
class Netns:
    src: str
    dst: str
    src_addr: str
    dst_addr: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[Netns]:
    tag = secrets.token_hex(3)
    subnet = int(tag[:2], 16) % 200 + 20
    ns = Netns(f"svmm-src-{tag}", f"svmm-dst-{tag}", f"10.99.{subnet}.1", f"10.99.{subnet}.2")
    created: list[str] = []
    try:
        if os.geteuid() != 0:
            raise PermissionError("network namespaces need root")
        for name in (ns.src, ns.dst):
            _ip("netns", "add", name)
            created.append(name)
        _ip("link", "add", f"vs{tag}", "type", "veth", "peer", "name", f"vd{tag}")
        _ip("link", "set", f"vs{tag}", "netns", ns.src)
        _ip("link", "set", f"vd{tag}", "netns", ns.dst)
        for name, dev, addr in ((ns.src, f"vs{tag}", ns.src_addr), (ns.dst, f"vd{tag}", ns.dst_addr)):
            _ip("-n", name, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", name, "link", "set", dev, "up")
            _ip("-n", name, "link", "set", "lo", "up")
    except (OSError, subprocess.SubprocessError) as exc:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else exc
        if in_ci():
            pytest.fail(f"CI=true and network namespaces cannot be created: {detail}", pytrace=False)
        pytest.skip(f"network namespaces cannot be created: {detail}")
    try:
        yield ns
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=10)


def machine_config(path: Path, socket: Path) -> Path:
    path.write_text(f"""
[machine]
memory_mib = 48

[[device]]
name = "blk0"
backend = "vhost-user"
queue_size = 128

[device.backend_config]
socket = "{socket}"
device = "blk"
queues = 4
""")
    return path


@pytest.mark.peer
def test_copy_migration_between_namespaces(tmp_path: Path, netns: Netns) -> None:
    binary = require_peer("qemu-storage-daemon")
    with QsdBlk(tmp_path, image=tmp_path / "disk.img", size=32 << 20, create=True, num_queues=4, exports=2,
                binary=binary) as qsd:
        src_cfg = machine_config(tmp_path / "src.toml", qsd.socket_paths[0])
        dst_cfg = machine_config(tmp_path / "dst.toml", qsd.socket_paths[1])
        uri = f"tcp:{netns.dst_addr}:{PORT}"
        base = [sys.executable, "-m", "shadowvmm.cli", "migrate", str(src_cfg), str(dst_cfg), "--to", uri,
                "--mode", "copy", "--digest", "--json", "--read-share", "1.0"]
        dest = subprocess.Popen(["ip", "netns", "exec", netns.dst, *base, "--role", "destination",
                                 "--accept-timeout", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            source = subprocess.run(["ip", "netns", "exec", netns.src, *base, "--role", "source",
                                     "--warmup", "0.3"], capture_output=True, text=True, timeout=60)
            dest_out, dest_err = dest.communicate(timeout=30)
        finally:
            if dest.poll() is None:
                dest.kill()
                dest.wait()
        assert source.returncode == 0, source.stderr
        assert dest.returncode == 0, dest_err
        src_report, dst_report = json.loads(source.stdout), json.loads(dest_out)
    assert src_report["ok"] and src_report["mode"] == "copy"
    assert src_report["memory_digest"] and src_report["memory_digest"] == dst_report["memory_digest"]
    assert src_report["memory_identical"] is True
    assert sum(src_report["dirty_per_round"]) > 0, "nothing was dirtied during pre-copy"
    assert dst_report["pages_received"] == src_report["pages_sent"] > 0
    assert dst_report["running"] == {"blk0": True}
    assert src_report["rounds"] >= 1


@pytest.mark.peer
async def test_without_backend_log_memory_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: the same migration with the back-end's dirty log left off loses its writes."""
    binary = require_peer("qemu-storage-daemon")

    async def no_backend_log(self: VirtioDevice, log: object) -> None:
        return None
    monkeypatch.setattr(VirtioDevice, "start_dirty_log", no_backend_log)
    with QsdBlk(tmp_path, image=tmp_path / "disk.img", size=32 << 20, create=True, num_queues=4, exports=2,
                binary=binary) as qsd:
        args = argparse.Namespace(
            source_config=str(machine_config(tmp_path / "src.toml", qsd.socket_paths[0])),
            dest_config=str(machine_config(tmp_path / "dst.toml", qsd.socket_paths[1])),
            to=f"unix:{tmp_path / 'm.sock'}", mode="copy", role="both", warmup=0.3, after=0.0, read_share=1.0,
            stop_timeout_ms=100.0, max_rounds=16, digest=True, accept_timeout=10.0, json=True, fs_remount=False)
        out = io.StringIO()
        assert await migration_cli.run(args, out=out, err=io.StringIO()) == 1
    report = json.loads(out.getvalue())
    assert report["memory_identical"] is False
