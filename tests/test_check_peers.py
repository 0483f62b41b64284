"""``shadowvmm check SOCKET`` as a subprocess against the real peers: qemu-storage-daemon (and a
migration between two of its exports), virtiofsd (one session: every step on it) and dpdk-testpmd
(io forwarding echoes the frames). A missing peer skips, and fails under ``CI=true``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shadowvmm.testing.conformance import STEP_NAMES
from shadowvmm.testing.peers import DpdkTestpmd, QsdBlk, Virtiofsd
from shadowvmm.testing.plugin import SHARE_FILE, SHARE_TEXT, require_peer

pytestmark = pytest.mark.peer


def check(*argv: str, timeout: float = 5) -> tuple[int, dict]:
    """``shadowvmm check ARGV --json`` in a subprocess: its exit status and report."""
    proc = subprocess.run([sys.executable, "-m", "shadowvmm.cli", "check", *argv, "--json", "--timeout", str(timeout)],
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def outcomes(report: dict) -> dict[str, tuple[str, str]]:
    return {step["step"]: (step["outcome"], step["detail"]) for step in report["steps"]}


def not_offered(report: dict) -> set[str]:
    return {name for name, (outcome, _) in outcomes(report).items() if outcome == "SKIP"}


def test_check_qsd_all_pass(qsd_blk_file: QsdBlk) -> None:
    code, report = check(str(qsd_blk_file.socket_path), "--device", "blk")
    assert code == 0 and report["passed"], json.dumps(report, indent=1)
    steps = outcomes(report)
    assert list(steps) == list(STEP_NAMES)
    assert {name for name, (outcome, _) in steps.items() if outcome == "FAIL"} == set()
    assert not_offered(report) == {"suspend-resume", "device-state", "migrate"}
    assert all(steps[name][1].startswith("not offered") for name in ("suspend-resume", "device-state"))
    assert "data from the first session intact" in steps["reconnect"][1]
    assert "writeback toggled by the guest and read back from the backend" in steps["config"][1]
    assert report["peer"]["process"].startswith("qemu-storage")
    assert report["warnings"][0].startswith("qemu-storage-daemon serves one front-end at a time")


def test_check_qsd_text_table_and_migration(tmp_path: Path) -> None:
    """Two exports of one disk: the data written before the migration is read on the second; with
    ``--queues 2`` the queues step does I/O on both."""
    binary = require_peer("qemu-storage-daemon")
    with QsdBlk(tmp_path, image=tmp_path / "disk.img", size=16 << 20, create=True, exports=2, num_queues=2,
                binary=binary) as qsd:
        first, second = (str(path) for path in qsd.socket_paths)
        proc = subprocess.run([sys.executable, "-m", "shadowvmm.cli", "check", first, "--device", "blk",
                               "--migrate-to", second, "--queues", "2", "--timeout", "5"], capture_output=True,
                              text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "conformance of vhost-user (block): 17 passed, 0 failed, 2 skipped"
    migrate = next(line for line in lines if line.startswith("migrate "))
    assert migrate.split()[1] == "PASS" and "vhost-user: GET_VRING_BASE at the source" in migrate
    assert "data written before read back there" in migrate
    assert "2 queue(s), I/O verified on each" in next(line for line in lines if line.startswith("queues "))
    assert lines[-1].startswith("warning: qemu-storage-daemon serves one front-end at a time")


def test_check_virtiofsd_one_session(virtiofsd: Virtiofsd) -> None:
    code, report = check(str(virtiofsd.socket_path), "--device", "fs")
    assert code == 0 and report["passed"], json.dumps(report, indent=1)
    steps = outcomes(report)
    assert not_offered(report) == {"suspend-resume", "reconnect", "device-state", "migrate"}
    assert steps["reconnect"][1] == "single-session peer: virtiofsd serves one session and exits after it"
    assert steps["io"] == ("PASS", "3 round trips verified")
    assert steps["queue-reset"][0] == "PASS" and "queue 1 reset" in steps["queue-reset"][1]
    assert report["peer"]["one_shot"] is True and report["peer"]["process"] == "virtiofsd"
    assert report["warnings"] == ["single-session peer: virtiofsd serves one session and exits after it; "
                                  "every step ran on one session"]
    # the files the round trips wrote through FUSE were removed again; the share is as it was
    assert [p.name for p in virtiofsd.source.iterdir()] == [SHARE_FILE]
    assert (virtiofsd.source / SHARE_FILE).read_bytes() == SHARE_TEXT


def test_check_testpmd_frames_echoed(testpmd: DpdkTestpmd) -> None:
    """Everything passes; the per-queue reset is not offered: DPDK's vhost library takes
    GET_VRING_BASE of one ring as a stop of the whole device (the other ring stalled until every
    ring restarted), so the vhost-user backend drops Capability.RING_RESTART for a DPDK peer
    (``ring_restart = "auto"``) and VIRTIO_F_RING_RESET is not offered to the guest."""
    code, report = check(str(testpmd.socket_path), "--device", "net", timeout=3)
    steps = outcomes(report)
    failed = {name for name, (outcome, _) in steps.items() if outcome == "FAIL"}
    assert not failed and code == 0 and report["passed"] is True, json.dumps(report, indent=1)
    assert not_offered(report) == {"suspend-resume", "queue-reset", "device-state", "migrate"}
    assert steps["io"][0] == "PASS"
    assert steps["io"][1].startswith("3 round trips verified: ") and steps["io"][1].endswith(" stray")
    sent = int(steps["io"][1].split(": ")[1].split()[0])
    assert sent >= 12 and steps["io"][1].endswith(", 0 stray")   # warm-up + 3 batches of 4
    bases = re.search(r"ring bases 0:(\d+), 1:(\d+);", steps["stop-resume"][1])
    assert bases is not None, steps["stop-resume"]
    assert int(bases[2]) >= 5 and 5 <= int(bases[1]) <= int(bases[2])    # warm-up frame(s) + 4, echoed
    assert report["peer"]["process"] == "dpdk-testpmd"
    assert report["warnings"] == ["dpdk-testpmd serves one front-end at a time per vhost port"]
