"""``shadowvmm check`` (shadowvmm.testing.conformance.command) on configured in-process devices, its
usage errors, the listener identification, and the kit's new steps and single-session runs."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shadowvmm import cli
from shadowvmm.backends.base import Backend
from shadowvmm.backends.inproc import InProcBackend
from shadowvmm.errors import ArgumentError, BackendError, ConfigError
from shadowvmm.testing.conformance import STEP_NAMES, Outcome, expected_outcomes, not_offered, run_conformance
from shadowvmm.testing.conformance.command import COMMAND, identify_listener, peer_info

PASS, FAIL, SKIP = Outcome.PASS, Outcome.FAIL, Outcome.SKIP
INPROC_SKIPS = not_offered(InProcBackend({"device": "blk"}).capabilities())

CONFIG = """
[machine]
memory_mib = 64

[[device]]
name = "disk"
backend = "inproc"
[device.backend_config]
device = "blk"
image = "{image}"
size = 4194304

[[device]]
name = "twin"
backend = "inproc"
[device.backend_config]
device = "blk"
image = "{image}"
size = 4194304

[[device]]
name = "entropy"
backend = "inproc"
transport = "mmio"
[device.backend_config]
device = "rng"
"""


@pytest.fixture
def machine_toml(tmp_path: Path) -> Path:
    path = tmp_path / "machine.toml"
    path.write_text(CONFIG.format(image=tmp_path / "disk.img"))
    return path


async def check(*argv: str) -> tuple[int, str]:
    """``shadowvmm check ARGV`` in this process (its exit status and output)."""
    args = cli.build_parser({"check": COMMAND}).parse_args(["check", *argv])
    out = io.StringIO()
    return await COMMAND.run(args, out), out.getvalue()


def test_check_config_subprocess_all_pass_with_migration(machine_toml: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "shadowvmm.cli", "check", "--config", str(machine_toml),
                           "--name", "disk", "--migrate-to", "twin"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("conformance of inproc-blk (block): 19 passed, 0 failed, 0 skipped"), proc.stdout
    assert lines[1].split()[:4] == ["step", "outcome", "seconds", "spec"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == set(STEP_NAMES)
    assert "virtio 1.2 §3.1.1" in rows["driver-init"] and "vhost-user: GET_VRING_BASE" in rows["migrate"]
    assert "data written before read back there" in rows["migrate"]
    assert "writeback toggled by the guest and read back from the backend" in rows["config"]
    assert "queue 0 reset (queue_reset read back 0)" in rows["queue-reset"]


async def test_check_config_json_and_not_offered(machine_toml: Path) -> None:
    code, text = await check("--config", str(machine_toml), "--name", "entropy", "--json")
    assert code == 0, text
    document = json.loads(text)
    assert document["passed"] is True and document["device_type"] == "rng"
    assert document["target"].endswith("machine.toml:entropy")
    steps = {step["step"]: step for step in document["steps"]}
    assert list(steps) == list(STEP_NAMES)
    assert steps["migrate"]["outcome"] == "SKIP" and "--migrate-to" in steps["migrate"]["detail"]
    assert steps["config"]["detail"].startswith("the device type has no device-specific config space")
    assert all(step["spec"] for step in document["steps"])
    assert {name for name, step in steps.items() if step["outcome"] == "SKIP"} == INPROC_SKIPS | {"migrate"}


@pytest.mark.parametrize("argv,message", [
    ([], "a SOCKET or --config"),
    (["/nonexistent.sock"], "needs --device"),
    (["/nonexistent.sock", "--device", "blk"], "no socket at"),
    (["SOCKET", "--device", "blk", "--queues", "0"], "queues"),
    (["--config", "CONFIG"], "needs --name"),
    (["--config", "CONFIG", "--name", "nope"], "no device named 'nope'"),
    (["--config", "CONFIG", "--name", "disk", "--migrate-to", "disk"], "name another configured device"),
    (["--config", "CONFIG", "--name", "disk", "--device", "net"], "is a BLOCK device"),
])
async def test_usage_errors(machine_toml: Path, argv: list[str], message: str) -> None:
    sock = machine_toml.parent / "listening.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(sock))
        listener.listen(1)
        names = {"CONFIG": str(machine_toml), "SOCKET": str(sock)}
        with pytest.raises((ArgumentError, ConfigError), match=message):
            await check(*[names.get(arg, arg) for arg in argv])


def test_usage_error_exit_status_is_2(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(sock))
        listener.listen(1)
        proc = subprocess.run([sys.executable, "-m", "shadowvmm.cli", "check", str(sock), "--device", "blk",
                               "--migrate-to", str(sock)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "shadowvmm: error: --migrate-to must name another socket than the one checked\n"


def test_the_command_line_does_not_import_pytest() -> None:
    code = "import sys, shadowvmm.cli; sys.exit('pytest' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0


def test_identify_listener_without_connecting(tmp_path: Path) -> None:
    path = tmp_path / "peer.sock"
    assert identify_listener(str(path)) is None
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        assert identify_listener(str(path)) is None        # bound, not listening
        listener.listen(1)
        found = identify_listener(str(path))
        assert found is not None and found[0] == os.getpid()
        with open(f"/proc/{os.getpid()}/comm") as comm:
            assert found[1] == comm.read().strip()
        blk = peer_info(str(path), "blk")
        assert not blk.one_shot and blk.warning is None and blk.pid == os.getpid()
        fs = peer_info(str(path), "fs")
        assert fs.one_shot and "taken as one-shot" in (fs.warning or "")
        assert peer_info(str(path), "blk", single_session=True).one_shot


# ---------------------------------------------------------------------- the kit's new steps


def counted(device: str, calls: list[int], **config: Any) -> Callable[[], Backend]:
    def make() -> Backend:
        calls.append(1)
        return InProcBackend({"device": device, **config})
    return make


async def test_single_session_runs_every_step_on_one_backend() -> None:
    calls: list[int] = []
    report = await run_conformance(counted("blk", calls), "blk", single_session="a test peer", io_timeout=2)
    assert report.outcomes() == expected_outcomes(skip=not_offered(InProcBackend({}).capabilities(),
                                                                   single_session=True)), report.format()
    assert len(calls) == 2          # contract's (never connected) and the one shared device's
    assert report["reconnect"].detail == "single-session peer: a test peer"
    assert report.warnings == ["single-session peer: a test peer; every step ran on one session"]
    assert "every fd and task released" in report["close"].detail


async def test_single_session_skips_the_rest_after_a_failure() -> None:
    class BadRead(InProcBackend):
        async def get_vring_base(self, index: int) -> Any:
            raise BackendError("broken")

    report = await run_conformance(lambda: BadRead({"device": "blk", "queues": 1}), "blk", single_session="x",
                                   io_timeout=1, step_timeout=5, steps=("connect", "driver-init", "io",
                                                                        "stop-resume", "reset-reinit", "close"))
    assert [s.outcome for s in report] == [PASS, PASS, PASS, FAIL, SKIP, PASS], report.format()
    assert report["reset-reinit"].detail == "the single session failed at stop-resume"


async def test_migrate_needs_data_on_the_destination() -> None:
    """Two in-memory disks: the data written before the migration is not on the destination."""
    report = await run_conformance(counted("blk", []), "blk", steps=("io", "migrate"), io_timeout=2,
                                   migrate_factory=counted("blk", []))
    assert report["migrate"].outcome is FAIL, report.format()
    assert "differs from what was written" in report["migrate"].detail


async def test_queue_reset_not_offered_without_ring_restart() -> None:
    class NoRestart(InProcBackend):
        def capabilities(self) -> Any:
            return super().capabilities() & ~type(super().capabilities()).RING_RESTART

    report = await run_conformance(lambda: NoRestart({"device": "blk"}), "blk", steps=("io", "queue-reset"))
    assert [(s.outcome, s.detail) for s in report][1] == (
        SKIP, "not offered: VIRTIO_F_RING_RESET (the backend lacks Capability.RING_RESTART)")
