"""Scenario l1-moves-l2 through the ``shadowvmm scenario`` CLI against qemu-storage-daemon: the
ring-state path (configs/nested-l1-qsd.toml) and the admin path (configs/nested-qsd.toml), with
the timeline's RING_STATE / ADMIN_COMMAND events; the registry loads it from the plugin's entry
point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shadowvmm.scenarios import SCENARIOS, all_scenarios
from shadowvmm.testing.plugin import require_peer
from shadowvmm.timeline import EventKind, Timeline
from shadowvmm_nested.scenario import NESTED

ROOT = Path(__file__).resolve().parents[3]


def test_the_registry_finds_the_plugins_scenario_through_its_entry_point() -> None:
    assert "l1-moves-l2" not in SCENARIOS                       # the core does not import the plugin
    found = all_scenarios()
    assert found["l1-moves-l2"] is NESTED["l1-moves-l2"] and set(SCENARIOS) < set(found)


@pytest.mark.peer
@pytest.mark.parametrize("config,path,kind", [
    ("nested-l1-qsd.toml", "ring-state", EventKind.RING_STATE),
    ("nested-admin-qsd.toml", "admin", EventKind.ADMIN_COMMAND),
])
def test_l1_moves_l2_over_qsd_through_the_cli(config: str, path: str, kind: EventKind, tmp_path: Path) -> None:
    require_peer("qemu-storage-daemon")
    js = tmp_path / "t.json"
    res = subprocess.run([sys.executable, "-m", "shadowvmm.cli", "scenario", "l1-moves-l2", "--config",
                          str(ROOT / "configs" / config), "--timeline", str(js), "--json"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] and report["exactly_once"] and report["submitted"] > 0 and report["mismatches"] == 0
    assert report["verified_blocks"] > 0 and f"stop path: {path}" in report["notes"]
    assert report["statuses"]["L2"] == ["0x00", "0x0b", "0x0f"] and report["status_reads"] > 10
    events = Timeline.from_json(js.read_text()).of(kind, level="L1")
    if path == "ring-state":
        ops = [(e.detail["op"], e.detail["ring"], e.detail["value"]) for e in events]
        reads = [(ring, value) for op, ring, value in ops[:2] if op == "read"]
        assert len(reads) == 2 and [("write", ring, value) for ring, value in reads] == ops[2:4]
        assert any(value > 0 for _, value in reads)            # the destination did not start at 0
    else:
        ops = [(e.detail["opcode"], e.detail["member"]) for e in events]
        assert ops[:5] == [("DEV_MODE_SET", 1), ("DEV_PARTS_GET", 1), ("DEV_MODE_SET", 2),
                           ("DEV_PARTS_SET", 2), ("DEV_MODE_SET", 2)]
