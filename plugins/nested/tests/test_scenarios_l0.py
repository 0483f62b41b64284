"""The "L0 migrates L1" scenarios through the core's registry (entry point group
``shadowvmm.scenarios``): on the in-process blk with an image file, and 2.2 over
qemu-storage-daemon through the CLI with its timeline."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.config import DeviceConfig, MachineConfig
from shadowvmm.errors import MigrationError, ScenarioError
from shadowvmm.scenarios import all_scenarios, run_scenario
from shadowvmm.shadow import StopDialect
from shadowvmm.testing.plugin import require_peer
from shadowvmm.timeline import EventKind, Timeline

SCENARIOS = all_scenarios()

ROOT = Path(__file__).resolve().parents[3]
R, PROBED, FEAT, LIVE, SUSPENDED = 0x00, 0x03, 0x0B, 0x0F, 0x1B
#: What L1 reads of its L0 device and L2 of its own, scenario by scenario.
EXPECTED = {
    "l0-migrates-l1": {"L1": [R, FEAT, LIVE], "L2": [R, FEAT, LIVE]},
    "l0-migrates-l1-2.2": {"L1": [R, FEAT, LIVE, SUSPENDED, LIVE], "L2": [R, FEAT, LIVE]},
    "l0-migrates-l1-2.3": {"L1": [R, PROBED, FEAT, LIVE], "L2": [R, FEAT, LIVE]},
}


def inproc(tmp_path: Path, transport: str = "pci") -> MachineConfig:
    backend = {"device": "blk", "image": str(tmp_path / "disk.img"), "size": 4 << 20, "queues": 2}
    return MachineConfig(memory_mib=32, devices=(DeviceConfig("vblk0", "inproc", backend, transport=transport,
                                                              queue_size=64, stop_dialect=StopDialect.SUSPEND),))


def test_the_plugin_registers_its_scenarios() -> None:
    assert [name for name in SCENARIOS if name.startswith("l0-")] == list(EXPECTED)
    assert SCENARIOS["l0-migrates-l1"].summary.startswith("2.1")


@pytest.mark.parametrize("name", list(EXPECTED))
async def test_scenario_on_inproc(tmp_path: Path, name: str) -> None:
    timeline = Timeline()
    report = await run_scenario(SCENARIOS, name, inproc(tmp_path), timeline=timeline)
    assert report.ok, report.reasons
    assert report.statuses == EXPECTED[name]
    assert report.submitted == report.completed > 0 and report.exactly_once
    assert report.mismatches == 0 and report.verified > 0 and report.faults == {}
    phases = {s.phase for s in timeline.spans() if (s.level, s.device) == ("L0", "migration")}
    assert {"setup", "pre-copy", "stop-and-copy", "switch-over"} <= phases
    assert timeline.of(EventKind.SWITCH_OVER, level="L0") and timeline.of(EventKind.DEST_START, level="L0")
    assert timeline.of(EventKind.STATUS_READ, level="L1", device="vblk0")
    assert timeline.of(EventKind.STATUS_READ, level="L2", device="vda")


async def test_an_mmio_l0_device_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="virtio-pci"):
        await run_scenario(SCENARIOS, "l0-migrates-l1", inproc(tmp_path, "mmio"))


@pytest.mark.peer
def test_l0_migrates_l1_2_2_over_qsd_through_the_cli(tmp_path: Path) -> None:
    require_peer("qemu-storage-daemon")
    js = tmp_path / "t.json"
    res = subprocess.run([sys.executable, "-m", "shadowvmm.cli", "scenario", "l0-migrates-l1-2.2", "--config",
                          str(ROOT / "configs/nested-qsd.toml"), "--timeline", str(js), "--json"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and report["backend"] == "vhost-user" and report["exactly_once"]
    assert report["statuses"] == {"L2": ["0x00", "0x0b", "0x0f"], "L1": ["0x00", "0x0b", "0x0f", "0x1b", "0x0f"]}
    timeline = Timeline.from_json(js.read_text())
    assert {level for level, _ in timeline.rows()} == {"L0", "L1", "L2"}


async def test_a_refused_l0_migration_returns_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend's migration blocker refuses before anything stops; the destination stops
    waiting for a stream that never comes (it used to wait out its 60 s)."""
    monkeypatch.setattr(InProcBackend, "migration_blockers", lambda self: ["held by the test"])
    async with asyncio.timeout(5):
        with pytest.raises(MigrationError, match="held by the test"):
            await run_scenario(SCENARIOS, "l0-migrates-l1", inproc(tmp_path), strict=True)
