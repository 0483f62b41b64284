"""``shadowvmm check --config FILE --name DEVICE`` on devices configured through ``faulty``: each
injected fault is reported at the step that meets it (the same outcomes the kit gives in
test_faulty.py), the exit status is 1 when a step failed and 0 when every step passed or was
not offered."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shadowvmm import cli
from shadowvmm.backends.base import load_backend
from shadowvmm.testing.conformance import Outcome, expected_outcomes, not_offered
from shadowvmm.testing.conformance.command import COMMAND

INNER_SKIPS = not_offered(load_backend("inproc")({"device": "blk"}).capabilities())

DEVICES: dict[str, str] = {
    "clean": "",
    "slow": 'latency_ms = 5\nlatency_ops = ["get_vring_base", "suspend"]',
    "second_resume": 'fail_op = "resume"\nfail_at = 2',
    "ioerr7": "io_error_every = 7",
    "ioerr1": "io_error_every = 1",
    "hidden": 'hide = ["SUSPEND", "RESUME", "DEVICE_STATE", "MQ"]',
    "bad_state": 'fail_op = "save_state"\nfail_error = "protocol"',
}


@pytest.fixture(scope="module")
def faulty_toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("check") / "faulty.toml"
    parts = ["[machine]\nmemory_mib = 64\n"]
    for name, faults in DEVICES.items():
        parts.append(f'[[device]]\nname = "{name}"\nbackend = "faulty"\n[device.backend_config]\n'
                     f'inner = "inproc"\ninner_config = {{ device = "blk" }}\n{faults}\n')
    path.write_text("\n".join(parts))
    return path


async def check(config: Path, name: str) -> tuple[int, dict[str, Any]]:
    args = cli.build_parser({"check": COMMAND}).parse_args(
        ["check", "--config", str(config), "--name", name, "--json", "--timeout", "2"])
    out = io.StringIO()
    code = await COMMAND.run(args, out)
    return code, json.loads(out.getvalue())


def table(report: dict[str, Any]) -> dict[str, Outcome]:
    return {step["step"]: Outcome(step["outcome"]) for step in report["steps"]}


def expected(*, fail: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> dict[str, Outcome]:
    return expected_outcomes(fail=fail, skip={*INNER_SKIPS, "migrate", *skip})


@pytest.mark.parametrize("name,fail,skip,detail", [
    ("clean", (), (), None),
    ("slow", (), (), None),
    ("second_resume", ("suspend-resume",), (), "injected failure of resume() (call 2)"),
    ("ioerr7", ("stop-resume", "suspend-resume"), (), "BlkIOError"),
    ("ioerr1", ("io",), (), "BlkIOError: OUT sector"),
    ("hidden", (), ("suspend-resume", "queues", "device-state"), None),
])
async def test_check_reports_each_fault_at_its_step(faulty_toml: Path, name: str, fail: tuple[str, ...],
                                                    skip: tuple[str, ...], detail: str | None) -> None:
    code, report = await check(faulty_toml, name)
    assert table(report) == expected(fail=fail, skip=skip), json.dumps(report, indent=1)
    assert code == (1 if fail else 0) and report["passed"] is not bool(fail)
    steps = {step["step"]: step for step in report["steps"]}
    for step in fail:
        assert detail is not None and detail in steps[step]["detail"], steps[step]
    for step in skip:
        assert steps[step]["detail"].startswith("not offered: Capability."), steps[step]
    if name == "slow":
        assert steps["stop-resume"]["seconds"] >= 0.005


def test_check_subprocess_names_the_failed_step(faulty_toml: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "shadowvmm.cli", "check", "--config", str(faulty_toml),
                           "--name", "bad_state"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {line.split()[0]: line.split(None, 3) for line in proc.stdout.splitlines()[2:]}
    assert {name for name, row in rows.items() if row[1] == "FAIL"} == {"device-state"}
    assert "vhost-user: SET_DEVICE_STATE_FD" in rows["device-state"][3]
    assert "ProtocolError: faulty: injected failure of save_state() (call 1)" in rows["device-state"][3]
    assert proc.stdout.splitlines()[0].endswith("17 passed, 1 failed, 1 skipped")
