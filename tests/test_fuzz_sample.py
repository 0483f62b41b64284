"""A bounded sample of every fuzz target (fuzz/targets.py) through hypothesis, plus every input
that once broke a target (fuzz/regressions/TARGET/*). ``make fuzz`` runs the targets at length
under atheris."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuzz.targets import TARGETS  # noqa: E402

REGRESSIONS = sorted((ROOT / "fuzz" / "regressions").glob("*/*"))
EXAMPLES = {"vhost_user_replies": 40}


@pytest.mark.leaks_fds      # the targets keep one event loop, memory and device for the whole process
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_sample(name: str) -> None:
    target = TARGETS[name]
    calls = []

    @settings(max_examples=EXAMPLES.get(name, 150), deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=2048))
    def run(data: bytes) -> None:
        calls.append(len(data))
        target(data)      # raises ContractBroken (or an untyped error) when the contract breaks

    run()
    assert len(calls) >= min(EXAMPLES.get(name, 150), 20), f"{name}: hypothesis ran only {len(calls)} inputs"
    assert max(calls) > 0, f"{name}: never given a non-empty input"


@pytest.mark.leaks_fds
@pytest.mark.parametrize("path", REGRESSIONS, ids=[f"{p.parent.name}/{p.name}" for p in REGRESSIONS])
def test_regression_input(path: Path) -> None:
    TARGETS[path.parent.name](path.read_bytes())
