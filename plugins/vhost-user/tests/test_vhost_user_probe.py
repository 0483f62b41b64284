"""probe()/format_probe(): against the real qemu-storage-daemon, and edge cases on the fake."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shadowvmm import cli
from shadowvmm.errors import BackendDisconnected, BackendTimeout, ProbeRefused
from shadowvmm.testing.peers import QsdBlk, Virtiofsd
from shadowvmm.testing.plugin import require_peer
from shadowvmm.virtio.constants import Feature
from shadowvmm_vhost_user import format_probe, probe
from shadowvmm_vhost_user import protocol as vu
from shadowvmm_vhost_user.fake import SILENT, FakeBackend

QSD_FEATURES = 0x175007E46
IMAGE_SIZE = 67108864


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[QsdBlk]:
    """qemu-storage-daemon: null-co of 64 MiB, read-zeroes=off, vhost-user-blk export, 2 queues, writable.

    A missing binary skips the test, or fails it when ``CI=true``.
    """
    binary = require_peer("qemu-storage-daemon")
    with QsdBlk(tmp_path, size=IMAGE_SIZE, num_queues=2, writable=True, binary=binary) as peer:
        assert "driver=null-co,node-name=n0,size=67108864,read-zeroes=off" in peer.argv()
        yield peer


@pytest.fixture
def plain_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop keeps a pipe per process from its first loop on, which the fd check would count."""
    monkeypatch.setattr(cli, "_runner", asyncio.Runner)


@pytest.mark.peer
async def test_probe_real_qsd(qsd: QsdBlk) -> None:
    info = await probe(qsd.socket_path, 5.0)
    assert info["features"] == QSD_FEATURES
    virtio = QSD_FEATURES & ~(vu.F_PROTOCOL_FEATURES | vu.F_LOG_ALL)
    assert info["virtio_features"] == virtio and virtio & Feature.VERSION_1
    assert "VERSION_1" in info["feature_names"] and "UNUSED_30" not in info["feature_names"]
    assert info["vhost_features"] == ["PROTOCOL_FEATURES", "LOG_ALL"]
    protocol = vu.ProtocolFeature(info["protocol_features"])
    assert vu.ProtocolFeature.CONFIG in protocol and vu.ProtocolFeature.MQ in protocol
    assert {"CONFIG", "MQ", "REPLY_ACK", "CONFIGURE_MEM_SLOTS"} <= set(info["protocol_feature_names"])
    assert info["queue_num"] == 2
    assert info["max_mem_slots"] in (32, 509)
    config = info["config"]
    assert config is not None and config["size"] == 60
    assert int.from_bytes(bytes.fromhex(config["hex"])[:8], "little") == IMAGE_SIZE // 512 == 131072
    text = format_probe(info)
    assert "0x175007e46" in text and "VERSION_1" in text and "CONFIG" in text and "60 bytes" in text


@pytest.mark.peer
async def test_probe_real_qsd_as_blk(qsd: QsdBlk) -> None:
    info = await probe(qsd.socket_path, 5.0, device="blk")
    assert {"SIZE_MAX", "SEG_MAX", "BLK_SIZE", "FLUSH", "MQ", "VERSION_1"} <= set(info["feature_names"])
    assert info["config"]["size"] == 60
    again = await probe(qsd.socket_path, 5.0, config_size=8)
    assert int.from_bytes(bytes.fromhex(again["config"]["hex"]), "little") == 131072


async def test_probe_without_protocol_features() -> None:
    fake = FakeBackend(features=QSD_FEATURES & ~vu.F_PROTOCOL_FEATURES)
    try:
        info = await probe("fake.sock", 1.0, connector=fake.connector)
    finally:
        fake.stop()
    assert info["protocol_features"] is None and info["queue_num"] is None and info["config"] is None
    assert "not offered" in format_probe(info)


async def test_probe_tries_config_sizes_until_one_is_accepted() -> None:
    fake = FakeBackend(config=bytearray(range(40)))
    try:
        info = await probe("fake.sock", 1.0, connector=fake.connector)
    finally:
        fake.stop()
    assert info["config"] == {"offset": 0, "size": 40, "hex": bytes(range(40)).hex()}
    assert info["acked_protocol_features"] == 0x822B


async def test_probe_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(BackendDisconnected):
        await probe(tmp_path / "missing.sock", 1.0)
    fake = FakeBackend().on(vu.FrontendRequest.GET_QUEUE_NUM, SILENT)
    start = time.monotonic()
    try:
        with pytest.raises(BackendTimeout):
            await probe("fake.sock", 0.2, connector=fake.connector)
    finally:
        fake.stop()
    assert time.monotonic() - start < 1.0


async def test_probe_reference_backend_process(tmp_path: Path) -> None:
    """The reference back-end refuses a config read past its config space (zero-size reply, as
    qsd does); the probe then asks for less instead of losing the session."""
    from shadowvmm.testing.peers import RefBlk
    ref = RefBlk(tmp_path, queues=2)
    ref.start()
    try:
        info = await probe(ref.socket_path, 5.0)
    finally:
        ref.stop()
    assert info["queue_num"] == 2
    assert info["config"] is not None and info["config"]["size"] == 60
    assert int.from_bytes(bytes.fromhex(info["config"]["hex"])[:8], "little") > 0


@pytest.mark.peer
async def test_probe_finds_the_listener_and_names_its_device_bits(qsd: QsdBlk) -> None:
    """Without --device the listening process (found without connecting) gives the type."""
    info = await probe(qsd.socket_path, 5.0)
    assert info["listener"]["name"] == "qemu-storage-daemon" and info["listener"]["pid"] == qsd.pid
    assert info["device"] == "blk" and {"BLK_SIZE", "SEG_MAX", "MQ"} <= set(info["feature_names"])
    assert not any(name.startswith("bit ") for name in info["feature_names"])
    assert any("one front-end at a time" in note for note in info["notes"])
    assert "listener           qemu-storage-daemon" in format_probe(info)


@pytest.mark.peer
def test_probe_device_option_and_json(qsd: QsdBlk, capsys: pytest.CaptureFixture[str], plain_asyncio: None) -> None:
    assert cli.main(["probe", "--device", "net", "--json", str(qsd.socket_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device"] == "net" and not any("assumed" in note for note in info["notes"])
    assert "GUEST_CSUM" in info["feature_names"]   # bit 1 read as a net bit: what --device asked for


@pytest.mark.peer
def test_probe_says_why_a_held_qsd_export_times_out(qsd: QsdBlk, capsys: pytest.CaptureFixture[str],
                                                   plain_asyncio: None) -> None:
    with socket.socket(socket.AF_UNIX) as holder:      # a front-end holding the export
        holder.connect(str(qsd.socket_path))
        assert cli.main(["probe", "--timeout", "0.3", str(qsd.socket_path)]) == 2
    err = capsys.readouterr().err
    assert "no reply within 0.3 s" in err and "serves one front-end at a time" in err


@pytest.mark.peer
async def test_probe_refuses_to_use_up_virtiofsd_unless_forced(virtiofsd: Virtiofsd) -> None:
    with pytest.raises(ProbeRefused, match="virtiofsd serves one front-end session and exits"):
        await probe(virtiofsd.socket_path, 5.0)
    assert virtiofsd.running
    info = await probe(virtiofsd.socket_path, 5.0, force=True)
    assert info["device"] == "fs" and info["listener"]["name"] == "virtiofsd"
    assert "VERSION_1" in info["feature_names"]
    deadline = time.monotonic() + 5
    while virtiofsd.running and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not virtiofsd.running, "virtiofsd outlived the probe's session"
