"""Every scenario on the in-process backend (PCI and MMIO): what the guest read, exactly-once
completion, the data; scenario 2.2 over qemu-storage-daemon through the CLI with a plot and a
timeline; the registry and the CLI's refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from shadowvmm import config
from shadowvmm.cli import main
from shadowvmm.config import DeviceConfig, MachineConfig
from shadowvmm.scenarios import SCENARIOS, run_scenario
from shadowvmm.shadow import StopDialect
from shadowvmm.testing.plugin import require_peer
from shadowvmm.timeline import EventKind, Timeline

ROOT = Path(__file__).resolve().parents[1]
R, ACK_DRV, FEAT, LIVE = 0x00, 0x03, 0x0B, 0x0F
SUSPENDED = 0x1B        # ACKNOWLEDGE|DRIVER|FEATURES_OK|SUSPEND (v1.4: DRIVER_OK cleared)
STOPPED = 0x2F          # 2021 STOP dialect: DRIVER_OK|STOP
#: What the guest reads, scenario by scenario (dialect SUSPEND unless named).
EXPECTED = {
    "1": [R, FEAT, LIVE],
    "2": [R, FEAT, LIVE, SUSPENDED, LIVE],
    "2.1": [R, FEAT, LIVE],
    "2.2": [R, FEAT, LIVE, SUSPENDED, LIVE],
    "2.2-reset": [R, FEAT, LIVE, SUSPENDED, R, FEAT, LIVE],
    "2.3": [R, LIVE, R, ACK_DRV, LIVE, R, FEAT, LIVE],
}


def inproc(tmp_path: Path, transport: str, dialect: StopDialect = StopDialect.SUSPEND) -> MachineConfig:
    backend = {"device": "blk", "image": str(tmp_path / "disk.img"), "size": 4 << 20, "queues": 2}
    return MachineConfig(memory_mib=32, devices=(DeviceConfig("blk0", "inproc", backend, transport=transport,
                                                              queue_size=64, stop_dialect=dialect),))


def test_the_registry_names_the_seed_scenarios() -> None:
    # the built-ins first, then those of installed plugins (entry points "shadowvmm.scenarios")
    assert list(SCENARIOS)[:6] == ["1", "2", "2.1", "2.2", "2.2-reset", "2.3"]
    assert all(s.summary and s.name == name for name, s in SCENARIOS.items())


@pytest.mark.parametrize("transport", ["pci", "mmio"])
@pytest.mark.parametrize("name", list(EXPECTED))
async def test_scenario_on_inproc(tmp_path: Path, transport: str, name: str) -> None:
    timeline = Timeline()
    report = await run_scenario(SCENARIOS, name, inproc(tmp_path, transport), timeline=timeline)
    assert report.ok, report.reasons
    assert report.statuses == {"L0": EXPECTED[name]}
    assert report.submitted == report.completed > 0 and report.exactly_once
    assert report.mismatches == 0 and report.verified > 0
    migrating = name in ("2.1", "2.2", "2.2-reset", "2.3")
    assert bool(timeline.of(EventKind.SWITCH_OVER)) == migrating
    if name == "1":
        assert report.faults == {"DIALECT_NOT_OFFERED": 2}
        assert not timeline.of(EventKind.STOP_START)
    else:
        assert report.faults == {}
    if name in ("2", "2.1", "2.2", "2.2-reset"):
        assert report.stop_ms is not None and report.downtime_ms is not None and report.downtime_ms > 0
        assert [e.detail["ring"] for e in timeline.of(EventKind.GET_VRING_BASE, device="blk0")][:2] == [0, 1]
    if name == "2.1":
        assert {e.detail["by"] for e in timeline.of(EventKind.STOP_START)} == {"vmm"}


async def test_stop_dialect_variants(tmp_path: Path) -> None:
    report = await run_scenario(SCENARIOS, "2", inproc(tmp_path, "pci", StopDialect.STOP))
    assert report.ok, report.reasons
    assert report.statuses == {"L0": [R, FEAT, LIVE, STOPPED, R, FEAT, LIVE]}     # STOP is left by a reset
    report = await run_scenario(SCENARIOS, "2.2-reset", inproc(tmp_path, "pci", StopDialect.STOP))
    assert report.ok and report.statuses == {"L0": [R, FEAT, LIVE, STOPPED, R, FEAT, LIVE]}
    report = await run_scenario(SCENARIOS, "2", inproc(tmp_path, "pci", StopDialect.NONE))
    assert report.ok and report.dialect == "suspend" and "SUSPEND used" in report.notes[0]


async def test_rng_runs_without_a_data_check(tmp_path: Path) -> None:
    cfg = MachineConfig(memory_mib=16, devices=(DeviceConfig("rng0", "inproc", {"device": "rng"}, transport="mmio",
                                                             queue_size=64),))
    report = await run_scenario(SCENARIOS, "2.1", cfg)
    assert report.ok, report.reasons
    assert report.workload == "rng read" and report.submitted == report.completed > 0 and report.verified == 0


async def test_an_in_memory_disk_that_does_not_migrate_fails_the_data_check(tmp_path: Path) -> None:
    cfg = inproc(tmp_path, "pci")
    device = cfg.devices[0]
    cfg = replace(cfg, devices=(replace(device, backend_config={"device": "blk", "size": 4 << 20}),))
    report = await run_scenario(SCENARIOS, "2.2", cfg)
    assert not report.ok and report.mismatches > 0
    assert any("read back" in r or "other data" in r for r in report.reasons)


@pytest.mark.leaks_fds     # uvloop's first event loop in a process keeps a process-wide pipe pair
def test_cli_list_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["scenario", "--list"]) == 0
    assert "2.2-reset" in capsys.readouterr().out
    assert main(["scenario", "9.9", "--config", str(ROOT / "configs/default.toml")]) == 2
    assert "no scenario '9.9'" in capsys.readouterr().err
    assert main(["scenario", "2.2", "--config", str(ROOT / "configs/default.toml"), "--device", "nope"]) == 2
    path = tmp_path / "stop.toml"
    path.write_text('[[device]]\nname = "b"\nbackend = "inproc"\nstop_dialect = "stop"\n'
                    '[device.backend_config]\ndevice = "blk"\n')
    assert main(["scenario", "2.2", "--config", str(path)]) == 2       # the STOP bit is an opt-in
    assert "stop_feature_bit" in capsys.readouterr().err
    path.write_text('[[device]]\nname = "b"\nbackend = "inproc"\nstop_dialect = "stop"\nstop_feature_bit = 44\n'
                    '[device.backend_config]\ndevice = "blk"\n')
    assert main(["scenario", "2.2", "--config", str(path)]) == 2       # STOP is cleared by reset only
    assert "SUSPEND" in capsys.readouterr().err.upper()


def test_peer_config_is_checked() -> None:
    bad = {"peer": [{"name": "q", "kind": "qemu-storage-daemon"}],
           "device": [{"name": "b", "backend": "vhost-user", "peer": "other", "backend_config": {"device": "blk"}}]}
    with pytest.raises(config.ConfigError, match=r"device\[0\]\.peer: no \[\[peer\]\] named 'other'"):
        config.parse(bad)
    cfg = config.load(ROOT / "configs/nested-qsd.toml")
    assert cfg.peers[0].name == "qsd0" and cfg.devices[0].peer == "qsd0"
    assert "socket" not in cfg.devices[0].backend_config


@pytest.mark.peer
def test_scenario_2_2_over_qsd_through_the_cli(tmp_path: Path) -> None:
    require_peer("qemu-storage-daemon")
    png, js = tmp_path / "t.png", tmp_path / "t.json"
    res = subprocess.run([sys.executable, "-m", "shadowvmm.cli", "scenario", "2.2", "--config",
                          str(ROOT / "configs/nested-qsd.toml"), "--plot", str(png), "--timeline", str(js),
                          "--json"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and report["backend"] == "vhost-user" and report["exactly_once"]
    assert report["statuses"] == {"L0": ["0x00", "0x0b", "0x0f", "0x1b", "0x0f"]}
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    timeline = Timeline.from_json(js.read_text())
    rings = [e.detail["ring"] for e in timeline.of(EventKind.GET_VRING_BASE, device="blk0")]
    assert rings == [0, 1]          # the guest's suspend: one GET_VRING_BASE per ring
    assert len(timeline.of(EventKind.SWITCH_OVER)) == 1 and timeline.of(EventKind.DEST_START)
