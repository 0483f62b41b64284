"""The users' toolkit: every config in configs/ validates and runs (its peers started by the
command), ``--version``, ``--json`` on every report, help with examples, SKIPPED for a device
without a workload, the not-negotiated warning, ``run --check`` / ``--set``, the progress line."""

from __future__ import annotations

import asyncio
import io
import json
import re
from importlib import metadata
from pathlib import Path

import pytest

from shadowvmm import cli, config
from shadowvmm.errors import ConfigError
from shadowvmm.job import run as job
from shadowvmm.job.report import Outcome, not_negotiated
from shadowvmm.progress import Progress
from shadowvmm.testing.plugin import require_peer
from shadowvmm.virtio.constants import DeviceId, Feature

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))
#: Keeps each config's run short (the shipped sizes are for users).
SMALL = ["run.requests=300", "run.stop_after=100", "run.files=4", "run.frames=128"]
#: Configs whose backend exists only in the vDPA VM lane: validated here, run there.
VM_LANE = {"vdpa.toml"}


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


@pytest.fixture(autouse=True)
def plain_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop keeps a pipe per process from its first loop on, which the fd check would count
    (as tests/test_config_schema.py does)."""
    monkeypatch.setattr(cli, "_runner", asyncio.Runner)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


# ---------------------------------------------------------------------- configs/

@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
def test_every_config_validates(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config.load(path)
    assert cfg.devices, f"{path.name} has no device"
    assert cli.main(["run", "--check", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: OK: {len(cfg.devices)} device(s)")


def test_the_configs_cover_every_peer_kind_and_dialect() -> None:
    """The examples the README promises: each [[peer]] kind, each stop dialect, a migration pair."""
    cfgs = [config.load(p) for p in CONFIGS]
    assert {p.kind for c in cfgs for p in c.peers} == set(config.PEER_KINDS)
    assert {d.stop_dialect.value for c in cfgs for d in c.devices} == {"none", "suspend", "stop"}
    assert {p.driver for c in cfgs for p in c.peers if p.kind == "qemu-storage-daemon"} == {"file", "null-co"}
    src, dst = config.load(ROOT / "configs/src.toml"), config.load(ROOT / "configs/dst.toml")
    assert [d.name for d in src.devices] == [d.name for d in dst.devices]
    assert src.devices[0].backend_config["image"] == dst.devices[0].backend_config["image"]


def _image_overrides(cfg: config.MachineConfig, tmp_path: Path) -> list[str]:
    """A file image of the config goes to *tmp_path* (tests never write the shared /tmp path)."""
    return [f'device[{i}].backend_config.image="{tmp_path / f"img{i}"}"'
            for i, d in enumerate(cfg.devices) if "image" in d.backend_config]


@pytest.mark.peer
@pytest.mark.parametrize("path", CONFIGS, ids=_ids(CONFIGS))
async def test_every_config_runs(path: Path, tmp_path: Path) -> None:
    """Each config runs as shipped (smaller), its peers started and stopped by the command; the
    run passes, every device has a workload, and nothing asked for went un-negotiated."""
    if path.name in VM_LANE:
        pytest.skip("vhost-vdpa: runs in the vDPA VM lane (plugins/vdpa), validated here")
    cfg = config.load(path)
    for peer in cfg.peers:
        require_peer(peer.kind)
    cfg = config.load(path, SMALL + _image_overrides(cfg, tmp_path))
    out = io.StringIO()
    report = await job.run(cfg, out)
    doc = report.as_dict()
    assert doc["result"] == "PASS", out.getvalue()
    assert report.exit_code == 0
    for device in doc["devices"]:
        assert device["outcome"] == "PASS", device
        assert device["warnings"] == [], device["warnings"]
        assert device["guest_faults"] == 0
    assert out.getvalue().rstrip().endswith("RESULT: PASS")


# ---------------------------------------------------------------------- run

async def test_run_reports_skipped_for_a_device_without_a_workload() -> None:
    cfg = config.load(ROOT / "configs/default.toml", SMALL)
    workloads = {k: v for k, v in job.WORKLOADS.items() if k is not DeviceId.RNG}
    out = io.StringIO()
    report = await job.run(cfg, out, workloads=workloads)
    outcomes = {d.name: d.outcome for d in report.devices}
    assert outcomes == {"blk0": Outcome.PASS, "rng0": Outcome.SKIPPED}
    assert "SKIPPED: no workload for device type RNG" in out.getvalue()
    assert out.getvalue().rstrip().endswith("RESULT: PASS (1 device(s) skipped)")
    assert report.as_dict()["devices"][1]["outcome"] == "SKIPPED"
    only_rng = await job.run(cfg, None, workloads={})
    assert only_rng.result is Outcome.SKIPPED and only_rng.exit_code == 0


async def test_run_fails_when_a_workload_fails() -> None:
    async def broken(run: job.DeviceRun) -> bool:
        run.report.reason = "injected"
        return False
    cfg = config.load(ROOT / "configs/default.toml", SMALL)
    report = await job.run(cfg, None, workloads={**job.WORKLOADS, DeviceId.RNG: ("broken", broken)})
    assert report.result is Outcome.FAIL and report.exit_code == 1 and report.failures == 1
    rng = report.as_dict()["devices"][1]
    assert (rng["outcome"], rng["reason"]) == ("FAIL", "injected")


def test_run_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--json", str(ROOT / "configs/default.toml"), *(f"--set={s}" for s in SMALL)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["result"] == "PASS" and doc["failures"] == 0
    blk, rng = doc["devices"]
    assert blk["name"] == "blk0" and blk["device_type"] == "BLOCK" and blk["workload"].startswith("blk")
    m = blk["measurements"]
    assert m["writes"] == 300 and m["reads"] > 0 and m["mismatches"] == 0 and m["status_values"] == ["0x0f"]
    assert m["stop"]["stop_ms"] > 0 and m["stop"]["in_flight_at_stop"] > 0 and m["elapsed_ms"] > 0
    assert rng["measurements"] == {"read_bytes": 64}


@pytest.mark.peer
def test_run_warns_about_what_was_not_negotiated(capsys: pytest.CaptureFixture[str]) -> None:
    """packed = true against qemu-storage-daemon, which does not offer VIRTIO_F_RING_PACKED: the
    run goes on with split rings and says so (text and JSON)."""
    require_peer("qemu-storage-daemon")
    argv = ["run", str(ROOT / "configs/blk-qsd.toml"), "--set", "device[0].packed=true",
            *(f"--set={s}" for s in SMALL)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert ("WARNING: packed = true asked for, VIRTIO_F_RING_PACKED not negotiated (split rings used): "
            "the device did not offer it") in out
    assert cli.main([*argv, "--json"]) == 0
    (device,) = json.loads(capsys.readouterr().out)["devices"]
    assert device["outcome"] == "PASS" and len(device["warnings"]) == 1 and "RING_PACKED" in device["warnings"][0]


def test_not_negotiated_names_each_missing_bit() -> None:
    dev = config.load(ROOT / "configs/stop-stop.toml").devices[0]
    spec = dev.dialect_spec()
    assert not_negotiated(dev, spec.feature | spec.ring_state, spec.feature | spec.ring_state) == []
    warnings = not_negotiated(dev, spec.feature, 0)
    assert warnings == [
        'stop_dialect = "stop" asked for, its feature bit 44 not negotiated: the device offered it but the guest '
        "driver did not accept it",
        "ring_state = true asked for, VIRTIO_F_RING_STATE (bit 45) not negotiated: the device did not offer it"]
    suspend = config.load(ROOT / "configs/stop-suspend.toml").devices[0]
    assert not_negotiated(suspend, 0, int(Feature.SUSPEND)) == []


async def test_run_negotiates_the_configured_stop_dialect() -> None:
    report = await job.run(config.load(ROOT / "configs/stop-stop.toml", SMALL), None)
    assert report.result is Outcome.PASS
    assert {"STOP (bit 44)", "RING_STATE (bit 45)"} <= set(report.devices[0].negotiated)
    report = await job.run(config.load(ROOT / "configs/stop-suspend.toml", SMALL), None)
    assert "SUSPEND" in report.devices[0].negotiated and not report.devices[0].warnings


def test_run_check_exits_2_with_the_typed_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[device]]\nname = "d"\nbackend = "inproc"\nqueue_size = 100\n')
    assert cli.main(["run", "--check", str(bad)]) == 2
    assert "device[0].queue_size" in capsys.readouterr().err
    assert cli.main(["run", "--check", str(ROOT / "configs/default.toml"), "--set", "run.requests=0"]) == 2
    assert "run.requests" in capsys.readouterr().err
    assert cli.main(["run", "--check", str(ROOT / "configs/default.toml"), "--set", "nonsense"]) == 2
    assert "--set: expected KEY.PATH=VALUE" in capsys.readouterr().err
    assert cli.main(["run", "--check", "--json", str(ROOT / "configs/default.toml")]) == 0
    assert json.loads(capsys.readouterr().out) == {"config": str(ROOT / "configs/default.toml"), "ok": True,
                                                    "devices": ["blk0", "rng0"], "peers": []}


def test_set_overrides_values_and_indexes_tables() -> None:
    cfg = config.load(ROOT / "configs/default.toml", ["run.requests=200", "device[1].packed=true",
                                                      'device[0].backend_config.serial="x"'])
    assert cfg.run.requests == 200 and cfg.devices[1].packed and cfg.devices[0].backend_config["serial"] == "x"
    with pytest.raises(ConfigError, match=r"no table device\[5\]"):
        config.load(ROOT / "configs/default.toml", ["device[5].packed=true"])


def test_config_space_is_validated_and_packed() -> None:
    cfg = config.load(ROOT / "configs/net-testpmd.toml")
    assert cfg.devices[0].config_space is not None and cfg.devices[0].config_space[:6] == bytes.fromhex("525400123456")
    with pytest.raises(ConfigError, match=r"device\[0\]\.config_space\.mac"):
        config.load(ROOT / "configs/net-testpmd.toml", ['device[0].config_space.mac="nope"'])
    with pytest.raises(ConfigError, match=r"device\[0\]\.config_space\.device"):
        config.load(ROOT / "configs/fs-virtiofsd.toml", ['device[0].config_space.device="gpu"'])
    with pytest.raises(ConfigError, match=r"peer\[0\]\.source: only a virtiofsd peer"):
        config.load(ROOT / "configs/blk-qsd.toml", ['peer[0].source="/tmp"'])


# ---------------------------------------------------------------------- the command line

def test_version_names_the_package_and_every_plugin(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"shadowvmm {metadata.version('shadowvmm')}\n")
    vhost = metadata.version("shadowvmm-vhost-user")
    assert f"  shadowvmm-vhost-user {vhost} (backends:vhost-user, commands:probe)" in out
    assert all(name in out for name in ("shadowvmm-vdpa", "shadowvmm-faulty", "shadowvmm-nested"))


def test_help_lists_every_command_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    commands = cli.all_commands()
    assert list(commands)[:3] == ["run", "migrate", "scenario"] and "probe" in commands
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in commands:
        assert re.search(rf"^  {name} +\S.*\n +e\.g\. shadowvmm {name} ", out, re.M), name
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        assert "examples:\n  shadowvmm " + name in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["-v", "run", "x"], ["run", "-v", "x"], ["run", "x", "--trace"],
                                  ["--trace", "migrate", "a", "b", "--to", "unix:/x"], ["scenario", "--list", "-v"]])
def test_verbosity_options_anywhere_on_the_line(argv: list[str]) -> None:
    args = cli.build_parser(cli.all_commands()).parse_args(argv)
    assert getattr(args, "verbose", False) or getattr(args, "trace", False)


def test_scenario_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["scenario", "2.1", "--config", str(ROOT / "configs/default.toml"), "--device", "rng0",
                     "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["scenario"] == "2.1" and doc["device"] == "rng0"
    assert doc["downtime_ms"] is not None and doc["downtime_ms"] > 0


@pytest.mark.parametrize("mode", ["local", "copy"])
def test_migrate_the_shipped_pair_with_json(mode: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """configs/src.toml -> configs/dst.toml (their image moved to tmp_path), both memory models;
    the JSON report's names are the Python report's (milliseconds, ``_ms``)."""
    pair = []
    for name in ("src.toml", "dst.toml"):
        text = (ROOT / "configs" / name).read_text().replace("/tmp/shadowvmm-migrate.img", str(tmp_path / "disk.img"))
        (tmp_path / name).write_text(text)
        pair.append(str(tmp_path / name))
    assert cli.main(["migrate", *pair, "--to", f"unix:{tmp_path / 'm.sock'}", "--mode", mode, "--warmup", "0.1",
                     "--after", "0.1", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["confirmed"] and doc["mode"] == mode
    assert 0 < doc["downtime_ms"] <= doc["total_ms"] and set(doc["stop_ms_per_device"]) == {"blk0"}
    assert not any(key.endswith("_s") for key in doc)


# ---------------------------------------------------------------------- progress

def test_progress_draws_only_on_a_terminal_and_throttles() -> None:
    now = [0.0]
    tty = Tty()
    progress = Progress("blk0: writes", 100, stream=tty, clock=lambda: now[0], interval=0.5)
    progress.update(10)
    now[0] = 0.2
    progress.update(20)             # within the interval: not drawn
    now[0] = 0.6
    progress.update(30, "busy")
    progress.note("round 1 done")
    progress.close()
    assert tty.getvalue() == ("\r\033[Kblk0: writes: 10/100 (10%)\r\033[Kblk0: writes: 30/100 (30%) busy"
                              "\r\033[Kround 1 done\n")
    pipe = io.StringIO()
    with Progress("x", 10, stream=pipe) as quiet:
        quiet.update(5, force=True)
        quiet.note("n")
    assert pipe.getvalue() == ""
    Progress("x", stream=None).update(1)


async def test_run_shows_progress_on_a_terminal_only() -> None:
    cfg = config.load(ROOT / "configs/default.toml", SMALL)
    tty, pipe = Tty(), io.StringIO()
    await job.run(cfg, None, tty)
    await job.run(cfg, None, pipe)
    assert "blk0: blk writes: " in tty.getvalue() and "/300 (" in tty.getvalue()
    assert tty.getvalue().endswith("\r\033[K") and pipe.getvalue() == ""
