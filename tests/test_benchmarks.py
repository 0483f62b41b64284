"""The issue-14 benchmarks run with a tiny iteration count and print one JSON document with
the keys their readers use (figures, goals, met, the --profile table). No timing is asserted:
the figures come from a shared machine; only their shape and the protocol facts are checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from shadowvmm.testing.plugin import require_peer

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = {"median_ms", "min_ms", "max_ms"}
PROFILE_ROW = {"function", "calls_per_request", "own_us_per_request", "cum_us_per_request"}


def run_benchmark(script: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                         text=True, timeout=timeout, cwd=ROOT, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    assert isinstance(doc, dict)
    return doc


def check_profile(profile: dict[str, Any]) -> None:
    assert profile["top"] and all(set(row) == PROFILE_ROW for row in profile["top"])


def test_stop_latency_prints_stop_floor_ratio_and_goal() -> None:
    require_peer("qemu-storage-daemon")
    doc = run_benchmark("stop_latency.py", "--iterations", "3", "--profile")
    assert doc["benchmark"] == "stop_latency" and doc["iterations"] == 3
    for part in ("stop", "floor"):
        assert set(doc[part]) == SUMMARY and 0 < doc[part]["min_ms"] <= doc[part]["median_ms"] <= doc[part]["max_ms"]
    # The stop of two idle rings: both disables written back to back, then one round trip per
    # GET_VRING_BASE; the floor replays exactly these.
    assert doc["messages"] == ["SET_VRING_ENABLE flags=0x1 size=8"] * 2 + ["GET_VRING_BASE flags=0x1 size=8"] * 2
    assert doc["round_trips"] == 2
    assert doc["ratio"] == round(doc["stop"]["median_ms"] / doc["floor"]["median_ms"], 3)
    goal = doc["goal"]
    assert (goal["stop_median_ms_at_most"], goal["ratio_at_most"]) == (0.5, 1.5)
    assert goal["met"] == (goal["stop_met"] and goal["ratio_met"])
    assert goal["stop_met"] == (doc["stop"]["median_ms"] <= 0.5) and goal["ratio_met"] == (doc["ratio"] <= 1.5)
    check_profile(doc["profile"])


def test_migration_prints_downtime_goals() -> None:
    doc = run_benchmark("migration.py", "--runs", "1", "--rounds", "1", "--devices", "2", "--profile")
    goals = {"guest_paused": 2.0, "guest_running": 3.0}
    for variant, goal in goals.items():
        figures = doc["downtime"][variant]
        assert figures["runs"] == 1 and figures["all_verified"] is True
        # A stop beyond its bound on a loaded host abandons that migration: listed, not fatal.
        assert len(figures["abandoned"]) == (figures["median_ms"] is None)
        met = figures["median_ms"] is not None and figures["median_ms"] <= goal
        assert figures["goal_ms"] == goal and figures["meets_goal"] == met
        record = next(g for g in doc["goals"] if g["name"] == f"migration.downtime.{variant}")
        assert (record["value"], record["goal"], record["met"]) == (figures["median_ms"], goal, met)
        check_profile(figures["profile"])
    assert {"under_io", "idle", "goal_ratio", "meets_goal"} <= set(doc["stop"])
