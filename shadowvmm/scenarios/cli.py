"""``shadowvmm scenario NAME --config FILE``: run one scenario and report (exit 0 pass, 1 fail).

``--list`` names every scenario; ``--timeline FILE`` writes the run's timeline as JSON and
``--plot FILE`` draws it as a PNG (``shadowvmm[plot]``). A bad config, an unknown scenario or
device, or one the device cannot run exits 2 (the CLI's rule for every ShadowVmmError).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TextIO

from .. import config as configmod
from ..errors import ScenarioError
from ..plot import plot_timeline
from ..timeline import Timeline
from . import all_scenarios, run_scenario

HELP = "run a stop/migration scenario against a configured device"
EXAMPLES = """examples:
  shadowvmm scenario --list
  shadowvmm scenario 2.1 --config configs/default.toml --device blk0 --json
  shadowvmm scenario 2.2 --config configs/nested-qsd.toml --timeline t.json --plot t.png"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``scenario`` options."""
    p.epilog = EXAMPLES
    p.add_argument("name", nargs="?", help="scenario name (--list names them)")
    p.add_argument("--config", help="machine config (TOML)")
    p.add_argument("--device", help="device of the config to run it on (default: the first)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--timeline", type=Path, help="write the timeline as JSON to this file")
    p.add_argument("--plot", type=Path, help="draw the timeline into this PNG file")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")


def write_outputs(timeline: Timeline, json_path: Path | None, png_path: Path | None, title: str) -> None:
    """The ``--timeline`` and ``--plot`` files of a command."""
    if json_path is not None:
        json_path.write_text(timeline.to_json(indent=1))
    if png_path is not None:
        plot_timeline(timeline, png_path, title=title)


async def run(args: argparse.Namespace, out: TextIO) -> int:
    scenarios = all_scenarios()
    if args.list:
        for scenario in scenarios.values():
            print(f"{scenario.name:20} {scenario.summary}", file=out)
        return 0
    if not args.name or not args.config:
        raise ScenarioError("give a scenario NAME and --config FILE (or --list)")
    if args.name not in scenarios:
        raise ScenarioError(f"no scenario {args.name!r} (known: {', '.join(scenarios)})")
    cfg = configmod.load(args.config)
    timeline = Timeline()
    report = await run_scenario(scenarios, args.name, cfg, args.device, timeline)
    write_outputs(timeline, args.timeline, args.plot, f"scenario {args.name} on {report.device}")
    if args.json:
        print(json.dumps(report.as_dict(), indent=2), file=out)
    else:
        print("\n".join(report.lines()), file=out)
    return 0 if report.ok else 1
