"""The conformance kit runs where pytest is not installed (a backend author's script, `shadowvmm
check`): found by docs/guide-plugin.md in a fresh venv, where importing it failed on pytest."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import asyncio, sys
sys.modules["pytest"] = None                       # as if it were not installed
from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.testing.conformance import run_conformance
report = asyncio.run(run_conformance(lambda: InProcBackend({"device": "rng"}), "rng"))
assert not report.failed, report.format()
print(len(report.steps))
"""


def test_the_kit_imports_and_runs_without_pytest() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) >= 10
