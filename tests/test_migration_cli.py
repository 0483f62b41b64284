"""``shadowvmm migrate`` in one process: a file endpoint with the default ``--role both``, and
an ``ok`` that reflects every mismatch the guest's reads found."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import pytest

from shadowvmm.migration import cli as migration_cli
from shadowvmm.migration.harness import BlkLoad


def machine_config(path: Path, image: Path) -> Path:
    path.write_text(f"""
[machine]
memory_mib = 24

[[device]]
name = "blk0"
backend = "inproc"
queue_size = 64

[device.backend_config]
device = "blk"
image = "{image}"
size = 4194304
queues = 2
""")
    return path


def args(tmp: Path, to: str, mode: str, **kw: Any) -> argparse.Namespace:
    image = tmp / "disk.img"
    values = dict(source_config=str(machine_config(tmp / "src.toml", image)),
                  dest_config=str(machine_config(tmp / "dst.toml", image)), to=to, mode=mode, role="both",
                  warmup=0.2, after=0.2, read_share=0.4, stop_timeout_ms=100.0, max_rounds=4, digest=False,
                  accept_timeout=5.0, json=True, fs_remount=False)
    values.update(kw)
    return argparse.Namespace(**values)


async def run(namespace: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()
    code = await migration_cli.run(namespace, out=out, err=io.StringIO())
    return code, json.loads(out.getvalue())


@pytest.mark.parametrize("mode", ["copy", "local"])
async def test_file_endpoint_with_both_roles(tmp_path: Path, mode: str) -> None:
    """The source finishes (and closes) the file before the destination reads it; the
    destination's report is the confirmation the source checks."""
    code, report = await run(args(tmp_path, f"file:{tmp_path / 'm.stream'}", mode, digest=mode == "copy"))
    assert code == 0 and report["ok"] and report["confirmed"], report
    assert report["destination"]["applied"]["devices"].keys() == {"blk0"}
    if mode == "copy":
        assert report["memory_identical"] is True
        assert report["destination"]["pages_received"] == report["pages_sent"] > 0
    else:
        assert report["mismatches"] == 0 and report["verified_blocks"] > 0


@pytest.mark.parametrize("found", [{"load": 1}, {"readback": 2}, {"load": 1, "readback": 2}])
async def test_ok_is_false_on_any_mismatch_and_counts_them_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              found: dict[str, int]) -> None:
    """Reads during the load and the final read-back both count; either makes ``ok`` false."""
    original = BlkLoad.verify

    async def verify(self: BlkLoad) -> list[int]:
        self.stats.read_mismatches.extend([1] * found.get("load", 0))
        return list(await original(self)) + [2] * found.get("readback", 0)
    monkeypatch.setattr(BlkLoad, "verify", verify)
    code, report = await run(args(tmp_path, f"unix:{tmp_path / 'm.sock'}", "local"))
    assert code == 1 and report["ok"] is False
    assert report["mismatches"] == sum(found.values())
