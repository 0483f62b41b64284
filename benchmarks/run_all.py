#!/usr/bin/env python3
"""Run every benchmark and print ONE JSON document: each figure, its goal, met or not.

A benchmark is a ``benchmarks/*.py`` whose name does not start with ``_`` (this runner
excluded); the convention it follows is in ``_common.py``: it accepts ``--quick`` and
``--profile`` and its JSON carries ``"goals"`` (:class:`_common.Goal` records). Each runs in
its own process, one after the other (they share the machine's CPUs otherwise). A benchmark
that fails, prints no JSON or carries no ``goals`` is reported as such and the others still
run. ``--quick`` is passed down (tiny iteration counts: the figures only show the runner works).

Also writes a chart (``--chart``, default ``bench.png``): every goal's value/goal ratio, the
goal line at 1; it needs matplotlib (``pip install 'shadowvmm[plot]'``): without it the runner
says so on stderr and still prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

#: Arguments a benchmark gets in a full run besides the runner's own (the reference back-end
#: too for reconnect, as `make bench` always ran it).
EXTRA_ARGS: dict[str, list[str]] = {"reconnect": ["--ref"]}
TIMEOUT_S = {"quick": 300.0, "full": 3600.0}


def discover(directory: Path) -> list[Path]:
    """The benchmark scripts of *directory*, by name."""
    return sorted(p for p in directory.glob("*.py") if not p.name.startswith("_") and p.name != Path(__file__).name)


def last_json(text: str) -> dict[str, Any] | None:
    """The JSON document a benchmark printed (the last one starting a line, if it logged others)."""
    decoder = json.JSONDecoder()
    found = None
    for start in [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]:
        if text.startswith("{", start):
            try:
                doc, _ = decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                continue
            if isinstance(doc, dict):
                found = doc
    return found


def run_one(script: Path, quick: bool, profile: bool) -> dict[str, Any]:
    name = script.stem
    argv = [sys.executable, str(script), *EXTRA_ARGS.get(name, [])]
    if quick:
        argv.append("--quick")
    if profile:
        argv.append("--profile")
    t0 = time.monotonic()
    try:
        res = subprocess.run(argv, capture_output=True, text=True, check=False,
                             timeout=TIMEOUT_S["quick" if quick else "full"])
    except subprocess.TimeoutExpired:
        return {"benchmark": name, "ok": False, "error": "timed out", "goals": []}
    entry: dict[str, Any] = {"benchmark": name, "argv": argv[1:], "seconds": round(time.monotonic() - t0, 1)}
    doc = last_json(res.stdout) if res.returncode == 0 else None
    if doc is None:
        tail = (res.stdout + res.stderr).strip().splitlines()[-15:]
        entry.update(ok=False, error=f"exit status {res.returncode}, no JSON document", output_tail=tail, goals=[])
        return entry
    goals = doc.get("goals")
    if not isinstance(goals, list):
        entry.update(ok=False, error="its JSON carries no 'goals' list (benchmarks/_common.py: Goal)", goals=[])
    else:
        entry.update(ok=True, goals=goals)
    entry["result"] = doc
    return entry


def chart(goals: list[dict[str, Any]], path: Path) -> str | None:
    """Draw value/goal per goal; returns why not if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is missing (pip install 'shadowvmm[plot]'): no chart"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [g for g in goals if g.get("ratio") is not None]
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.5))
    names = [f"{g['name']} ({g['value']} {g['unit']}, goal {'≤' if g['better'] == 'lower' else '≥'} {g['goal']})"
             for g in rows]
    colours = ["tab:green" if g["met"] else "tab:red" for g in rows]
    ax.barh(range(len(rows)), [g["ratio"] for g in rows], color=colours)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("value / goal (dashed: the goal; green: met)")
    ax.set_title("shadowvmm benchmarks against their goals")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def run_all(directory: Path, quick: bool, profile: bool, only: set[str] | None) -> dict[str, Any]:
    scripts = [s for s in discover(directory) if only is None or s.stem in only]
    runs = []
    for script in scripts:
        print(f"run_all: {script.name}{' --quick' if quick else ''}", file=sys.stderr, flush=True)
        runs.append(run_one(script, quick, profile))
    goals = [dict(g, benchmark=r["benchmark"]) for r in runs for g in r["goals"]]
    return {"quick": quick, "benchmarks": [r["benchmark"] for r in runs],
            "failed": [r["benchmark"] for r in runs if not r["ok"]],
            "goals": goals, "all_met": bool(goals) and all(g["met"] for g in goals) and all(r["ok"] for r in runs),
            "not_met": [g["name"] for g in goals if not g["met"]],
            "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick down (a smoke run)")
    parser.add_argument("--profile", action="store_true", help="pass --profile down")
    parser.add_argument("--only", help="comma-separated benchmark names (default: every one)")
    parser.add_argument("--dir", type=Path, default=HERE, help="where the benchmarks are (default: here)")
    parser.add_argument("--chart", type=Path, default=Path("bench.png"), help="chart path (default bench.png)")
    parser.add_argument("--no-chart", action="store_true")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    doc = run_all(args.dir, args.quick, args.profile, only)
    if not args.no_chart:
        why = chart(doc["goals"], args.chart)
        if why is not None:
            print(f"run_all: {why}", file=sys.stderr)
        doc["chart"] = None if why else str(args.chart)
    json.dump(doc, sys.stdout, indent=2)
    print()
    return 0 if not doc["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
