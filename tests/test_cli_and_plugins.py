"""The command line (`run`, `probe`) and backend plugin discovery."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from shadowvmm import cli, config
from shadowvmm.backends import base
from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.errors import PluginError
from shadowvmm.testing.peers import QsdBlk
from shadowvmm.testing.plugin import require_peer

ROOT = Path(__file__).resolve().parent.parent


def test_registered_backends_load() -> None:
    eps = base.available_backends()
    assert {"inproc", "vhost-user", "vdpa"} <= set(eps)
    assert base.load_backend("inproc") is InProcBackend
    for name in ("vhost-user", "vdpa"):
        factory = base.load_backend(name)
        assert callable(factory)


def test_unknown_backend_is_a_typed_error() -> None:
    with pytest.raises(PluginError, match="no backend named 'nope'"):
        base.load_backend("nope")


def test_plugin_import_error_is_raised_with_its_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = metadata.EntryPoint("broken", "shadowvmm_no_such_module:Backend", base.ENTRY_POINT_GROUP)
    monkeypatch.setattr(base, "available_backends", lambda: {"broken": broken})
    with pytest.raises(PluginError) as err:
        base.load_backend("broken")
    assert isinstance(err.value.__cause__, ModuleNotFoundError)


async def test_run_default_config_passes() -> None:
    out = io.StringIO()
    rc = await cli.run(config.load(ROOT / "configs" / "default.toml"), out=out)
    text = out.getvalue()
    assert rc == 0, text
    assert "RESULT: PASS" in text
    assert "0 mismatches" in text
    assert "values seen: 0x0f (ACKNOWLEDGE|DRIVER|DRIVER_OK|FEATURES_OK)" in text
    assert "requests in flight" in text and " 0 requests in flight" not in text


def test_run_rejects_bad_config_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[device]]\nname = "d"\nbackend = "inproc"\nqueue_size = 100\n')
    proc = subprocess.run([sys.executable, "-m", "shadowvmm.cli", "run", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "device[0].queue_size" in proc.stderr


def test_probe_against_qemu_storage_daemon(tmp_path: Path) -> None:
    binary = require_peer("qemu-storage-daemon")
    with QsdBlk(tmp_path, size=64 << 20, num_queues=2, binary=binary) as peer:
        proc = subprocess.run([sys.executable, "-m", "shadowvmm.cli", "probe", "--json",
                               str(peer.socket_path)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        info = json.loads(proc.stdout)
        assert info["queue_num"] == 2
        assert "VERSION_1" in info["feature_names"]
        assert {"MQ", "CONFIG", "REPLY_ACK"} <= set(info["protocol_feature_names"])
        assert info["max_mem_slots"] >= 8
        assert info["config"]["size"] >= 36
        text = subprocess.run([sys.executable, "-m", "shadowvmm.cli", "probe", str(peer.socket_path)],
                              capture_output=True, text=True, timeout=60)
        assert text.returncode == 0 and "VERSION_1" in text.stdout
