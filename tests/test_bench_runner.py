"""benchmarks/run_all.py (make bench): discovery, the goals convention, --quick passed down.

No timing is asserted: only that the runner runs, passes --quick down and prints one valid
JSON document with a goals list.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"

GOOD = '''
import argparse, json, sys
sys.path.insert(0, {bench!r})
from _common import Goal, goals
p = argparse.ArgumentParser(); p.add_argument("--quick", action="store_true")
p.add_argument("--profile", action="store_true")
a = p.parse_args()
print("a log line before the document")
print(json.dumps({{"quick": a.quick, "goals": goals(Goal("good.time", 3.0, 5.0, "ms"),
                                                    Goal("good.rate", 1.0, 2.0, "ratio", "higher"))}}, indent=2))
'''


def run_all(*args: str) -> tuple[int, dict]:
    res = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--no-chart", *args],
                         capture_output=True, text=True, timeout=120, check=False)
    return res.returncode, json.loads(res.stdout)


def test_the_runner_collects_goals_and_reports_broken_benchmarks(tmp_path: Path) -> None:
    (tmp_path / "good.py").write_text(GOOD.format(bench=str(BENCH)))
    (tmp_path / "crash.py").write_text("raise SystemExit(3)\n")
    (tmp_path / "nogoals.py").write_text("print('{\"figure\": 1}')\n")
    (tmp_path / "_helper.py").write_text("raise SystemExit('not a benchmark')\n")
    code, doc = run_all("--quick", "--dir", str(tmp_path))
    assert code == 1
    assert doc["benchmarks"] == ["crash", "good", "nogoals"]
    assert sorted(doc["failed"]) == ["crash", "nogoals"]
    assert [(g["name"], g["met"], g["ratio"], g["benchmark"]) for g in doc["goals"]] == [
        ("good.time", True, 0.6, "good"), ("good.rate", False, 0.5, "good")]
    assert doc["not_met"] == ["good.rate"] and doc["all_met"] is False
    good = next(r for r in doc["runs"] if r["benchmark"] == "good")
    assert good["result"]["quick"] is True and "--quick" in good["argv"]


def test_every_benchmark_follows_the_convention() -> None:
    """Each benchmark takes --quick and --profile and emits goals (read from its source: cheap)."""
    sys.path.insert(0, str(BENCH))
    try:
        import run_all as runner
    finally:
        sys.path.remove(str(BENCH))
    scripts = runner.discover(BENCH)
    assert {"register_access", "migration", "footprint"} <= {s.stem for s in scripts}
    for script in scripts:
        text = script.read_text()
        assert '"--quick"' in text and '"--profile"' in text and "goals(" in text, script.name


@pytest.mark.peer
def test_quick_run_of_real_benchmarks_prints_one_document_with_goals(tmp_path: Path) -> None:
    code, doc = run_all("--quick", "--only", "register_access,footprint,migration")
    assert doc["failed"] == [], doc["runs"]
    assert code == 0
    names = {g["name"] for g in doc["goals"]}
    assert {"register_access.pci.read", "migration.stop_64_vs_1.under_io",
            "footprint.inproc.anon_rss_8_devices"} <= names
    assert all({"value", "goal", "unit", "met", "ratio"} <= g.keys() for g in doc["goals"])
    assert all(r["result"]["quick"] for r in doc["runs"])


def test_the_chart_is_skipped_with_a_reason_without_matplotlib(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    import run_all as runner

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert "matplotlib is missing" in (runner.chart([], tmp_path / "x.png") or "")
    assert not (tmp_path / "x.png").exists()
