"""The users' toolkit: the pytest plugin's device fixtures, markers and failure reports, and
:mod:`shadowvmm.testing.ready` without pytest.

The user's view runs pytest in a subprocess on the files in ``tests/user_examples/``, copied
into an empty directory outside the repository (no configuration file, only documented
fixtures). ``scripts/user-fixtures-check.sh`` (``make test``) runs the same files in a fresh
venv with non-editable installs of ``shadowvmm[pytest]`` and the vhost-user plugin.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shadowvmm.errors import ArgumentError, DeviceNotReadyError, PeerStartError
from shadowvmm.testing import plugin, requires
from shadowvmm.testing.peers import Daemon, QsdBlk, RefBlk, Virtiofsd, process
from shadowvmm.testing.ready import NET_MAC, ReadyDevice, vhost_user_ready
from shadowvmm.testing.trace import TRACE_ONLY, MessageTrace, TraceOnlyFilter
from shadowvmm.virtio.devcfg import NetConfig
from shadowvmm_vhost_user.refbackend import RefBlkServer

EXAMPLES = Path(__file__).parent / "user_examples"
LOGGER = "shadowvmm_vhost_user"


def run_user_pytest(tmp_path: Path, *examples: str, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """pytest on *examples* (``tests/user_examples/NAME.py`` as ``test_NAME.py``) in an empty
    directory with no configuration: the plugin alone must make them work."""
    work = tmp_path / "user"
    work.mkdir()
    for name in examples:
        shutil.copy(EXAMPLES / f"{name}.py", work / f"test_{name}.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHONPATH"))}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *args],
                          cwd=work, env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.peer("qemu-storage-daemon")
@pytest.mark.parametrize("args", [(), ("-o", "asyncio_default_test_loop_scope=module")], ids=["default", "module-loop"])
def test_a_user_file_with_no_configuration_passes(tmp_path: Path, args: tuple[str, ...]) -> None:
    """As is, and with tests on a module-scoped loop: the fixtures follow the tests' loop."""
    result = run_user_pytest(tmp_path, "blk_roundtrip", args=args)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "2 passed" in out and "warning" not in out.lower(), out
    assert "PASSED test_blk_roundtrip.py::test_qsd_write_read" in out
    assert "PASSED test_blk_roundtrip.py::test_my_daemon" in out


@pytest.mark.peer("qemu-storage-daemon")
def test_a_failing_user_test_reports_the_trace_and_the_peer_log(tmp_path: Path) -> None:
    result = run_user_pytest(tmp_path, "failing", args=("--shadowvmm-trace-messages", "6"))
    out = result.stdout
    assert result.returncode == 1, out
    assert "1 failed" in out, out
    trace = out.split("vhost-user trace (last 6 of ", 1)[1].split("peer log: qsd-blk", 1)[0]
    assert "records) ---" in trace and "earlier records not kept" in trace, out
    assert trace.count("shadowvmm_vhost_user.connection: vhost-user ") == 6, trace
    assert " send SET_VRING_ENABLE " in trace, trace
    peer_log = out.split("peer log: qsd-blk (running, ", 1)[1]
    assert "last 40 lines)" in peer_log and "qemu-storage-daemon --blockdev driver=file" in peer_log, out
    # the trace has its own section: pytest's captured log stays free of the DEBUG records
    assert "DEBUG    shadowvmm_vhost_user" not in out, out


# --------------------------------------------------------------------- in process


async def test_ready_device_without_pytest_fixtures(tmp_path: Path) -> None:
    async with RefBlkServer(str(tmp_path / "ref.sock"), size=4 << 20) as server:
        async with vhost_user_ready(server.path, "blk", queues=2, queue_size=64) as rd:
            assert isinstance(rd, ReadyDevice) and rd.device_type == "blk"
            assert rd.device.rings_running and rd.device.failure is None
            assert rd.guest.status() & 0x04                         # DRIVER_OK (v1.4 §2.1)
            assert rd.socket_path == Path(server.path) and rd.peer is None
            assert rd.blk.capacity_bytes == 4 << 20
            await rd.blk.write(1, b"z" * 1024)
            assert await rd.blk.read(1, 1024) == b"z" * 1024
            with pytest.raises(ArgumentError, match="this is a blk device"):
                _ = rd.fs
        assert rd.machine.slots == {}                               # closed on leaving


async def test_not_ready_is_a_bounded_typed_error(tmp_path: Path) -> None:
    with pytest.raises(DeviceNotReadyError, match="blk0: blk device on vhost-user not ready") as info:
        async with vhost_user_ready(tmp_path / "nobody.sock", "blk", timeout=2.0):
            raise AssertionError("not reached")
    assert info.value.__cause__ is not None


async def test_unknown_device_type() -> None:
    with pytest.raises(ArgumentError, match="unknown device type 'gpu'"):
        async with vhost_user_ready("/nonexistent", "gpu"):
            raise AssertionError("not reached")


def test_daemon_waits_for_its_socket_and_is_reaped(tmp_path: Path) -> None:
    sock = tmp_path / "ref.sock"
    argv = [sys.executable, "-m", "shadowvmm_vhost_user.refbackend", sock]
    with Daemon(tmp_path, argv, sock, ready="get_features") as daemon:
        assert daemon.running and sock.exists()
        pid = daemon.pid
    assert not daemon.running and daemon.returncode is not None and not sock.exists()
    assert not Path(f"/proc/{pid}").exists() or "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_a_daemon_that_exits_fails_with_its_log(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import sys; print('bad option --x'); sys.exit(3)"]
    with pytest.raises(PeerStartError, match="exited with status 3") as info:
        Daemon(tmp_path, argv, tmp_path / "x.sock", start_timeout=5.0).start()
    assert "bad option --x" in info.value.log_tail


def test_daemon_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match="unknown ready probe"):
        Daemon(tmp_path, ["true"], tmp_path / "s.sock", ready="ping")
    with pytest.raises(ArgumentError, match="needs a command line"):
        Daemon(tmp_path, [], tmp_path / "s.sock")


def test_the_trace_keeps_the_last_records_and_marks_what_only_it_wanted() -> None:
    logger = logging.getLogger(LOGGER + ".unit")
    parent = logging.getLogger(LOGGER)
    before = parent.level
    with MessageTrace(3) as trace:
        for i in range(5):
            logger.debug("send M%d", i)
        logger.warning("careful")
    assert parent.level == before and trace not in parent.handlers
    assert [r.getMessage() for r in trace.records] == ["send M3", "send M4", "careful"] and trace.seen == 6
    assert [r.__dict__[TRACE_ONLY] for r in trace.records] == [True, True, False]
    assert not TraceOnlyFilter().filter(trace.records[0]) and TraceOnlyFilter().filter(trace.records[2])
    assert "3 earlier records not kept" in trace.format_tail() and "send M4" in trace.format_tail()
    logger.debug("after")                                       # not kept once uninstalled
    assert trace.seen == 6


def test_the_trace_yields_to_a_level_the_test_sets(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger(LOGGER + ".unit")
    with MessageTrace(4) as trace:
        caplog.set_level(logging.DEBUG, logger=LOGGER)
        logger.debug("wanted by the test")
    assert trace.records[-1].__dict__[TRACE_ONLY] is False
    assert "wanted by the test" in caplog.text


def test_the_peer_marker_skips_a_missing_peer_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "PEER_CANDIDATES", {"qemu-storage-daemon": ("/nonexistent/qsd",)})

    class Item:
        def iter_markers(self, name: str) -> list[pytest.Mark]:
            return [pytest.mark.peer("qemu-storage-daemon").mark] if name == "peer" else []

    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="qemu-storage-daemon not found"):
        plugin.pytest_runtest_setup(Item())  # type: ignore[arg-type]
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and a real peer is missing"):
        plugin.pytest_runtest_setup(Item())  # type: ignore[arg-type]
    with pytest.raises(pytest.fail.Exception, match="pip install shadowvmm-nothing"):
        requires.require_backend("no-such-backend", "shadowvmm-nothing")


def test_the_plugin_registers_its_markers_and_asyncio_defaults(pytestconfig: pytest.Config) -> None:
    markers = pytestconfig.getini("markers")
    assert any(m.startswith("peer(*names):") for m in markers)
    assert any(m.startswith("shadowvmm_trace:") for m in markers)
    assert pytestconfig.getini("asyncio_default_fixture_loop_scope") == "function"


# --------------------------------------------------------------------- the device fixtures


@pytest.mark.peer("qemu-storage-daemon")
@pytest.mark.parametrize("qsd_blk", ["null-co"], indirect=True)
async def test_qsd_blk_on_null_co(qsd_blk: ReadyDevice) -> None:
    assert qsd_blk.blk.capacity_bytes == 1 << 30 and len(qsd_blk.guest.queues) == 2
    assert isinstance(qsd_blk.peer, QsdBlk) and qsd_blk.peer.image is None and qsd_blk.peer.running
    await qsd_blk.blk.write(0, b"q" * 512)                          # taken and dropped


@pytest.mark.peer("virtiofsd")
async def test_virtiofsd_fs_shares_a_temporary_directory(virtiofsd_fs: ReadyDevice) -> None:
    assert isinstance(virtiofsd_fs.peer, Virtiofsd)
    await virtiofsd_fs.fs.write_file("note.txt", b"from the guest\n")
    assert (virtiofsd_fs.peer.source / "note.txt").read_bytes() == b"from the guest\n"
    assert await virtiofsd_fs.fs.listdir("/") == ["note.txt"]


@pytest.mark.peer("dpdk-testpmd")
async def test_dpdk_net_echoes_frames(dpdk_net: ReadyDevice) -> None:
    src = NetConfig.parse_mac(NET_MAC)
    frames = [b"\xff" * 6 + src + b"\x88\xb5" + bytes([i]) * 50 for i in range(4)]
    assert await dpdk_net.net.send(frames) == 4
    assert sorted(await dpdk_net.net.receive(4, timeout=5.0)) == frames


async def test_reference_backend_survives_a_stop(reference_backend: ReadyDevice) -> None:
    assert isinstance(reference_backend.peer, RefBlk) and reference_backend.peer.running
    await reference_backend.blk.write(2, b"r" * 4096)
    states = await reference_backend.device.stop()
    assert [s.index for s in states] == [0, 1]
    await reference_backend.device.resume()
    assert await reference_backend.blk.read(2, 4096) == b"r" * 4096
