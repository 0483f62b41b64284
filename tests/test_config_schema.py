"""Hostile configs: every bad value, key or file is one typed error naming the file, the key
path and what was expected; the CLI prints it on one line and exits with 2.

The option schemas (``shadowvmm.options``), each plugin's ``OPTIONS`` (checked when a backend
is built from Python too), and the device, machine and run tables of ``shadowvmm.config``.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from shadowvmm import cli
from shadowvmm.backends import base
from shadowvmm.backends.inproc import BlkModel, InProcBackend, RngModel
from shadowvmm.config import (
    DEVICE,
    MACHINE,
    MAX_CONFIG_BYTES,
    RUN,
    VMM_FEATURES_ALLOWED,
    load,
    parse,
)
from shadowvmm.errors import ArgumentError, ConfigError
from shadowvmm.options import MAX_QUEUES, REQUIRED, Option, OptionSchema
from shadowvmm.transport import pci
from shadowvmm.virtio.constants import Feature, NetFeature
from shadowvmm_vdpa.backend import VdpaBackend
from shadowvmm_vdpa.ioctl import BackendFeature
from shadowvmm_vhost_user.backend import VhostUserBackend

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------- the command line


def blk(*, memory: object = 16, backend_name: str = '"inproc"', device: str = "",
        model: str = '"blk"', options: str = "", run: str = "") -> str:
    """A small in-process disk whose main job takes well under a second; each part replaceable."""
    return (f"[machine]\nmemory_mib = {memory}\n\n[[device]]\nname = \"blk0\"\n"
            f"backend = {backend_name}\n{device}\n[device.backend_config]\ndevice = {model}\n{options}\n"
            f"[run]\nrequests = 40\nstop_after = 10\n{run}\n")


def plugin(backend: str, options: str) -> str:
    return f'[[device]]\nname = "d0"\nbackend = "{backend}"\n[device.backend_config]\n{options}\n'


def text(content: str) -> Callable[[Path], Path]:
    """A config file holding *content* (``{tmp}`` is the test's directory)."""
    def make(tmp: Path) -> Path:
        path = tmp / "machine.toml"
        path.write_text(content.replace("{tmp}", str(tmp)))
        return path
    return make


def raw(content: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / "machine.toml"
        path.write_bytes(content)
        return path
    return make


def directory(tmp: Path) -> Path:
    return tmp


def missing(tmp: Path) -> Path:
    return tmp / "no-such.toml"


#: (case, config file maker, key path named; None: the file itself is refused)
CLI_CASES: list[tuple[str, Callable[[Path], Path], str | None]] = [
    # the in-process backend's options
    ("size-str", text(blk(options='size = "big"')), "device[0].backend_config.size"),
    ("size-negative", text(blk(options="size = -4096")), "device[0].backend_config.size"),
    ("size-not-sectors", text(blk(options="size = 1000")), "device[0].backend_config.size"),
    ("size-float", text(blk(options="size = 4096.0")), "device[0].backend_config.size"),
    ("queues-zero", text(blk(options="queues = 0")), "device[0].backend_config.queues"),
    ("queues-huge", text(blk(options="queues = 100000")), "device[0].backend_config.queues"),
    ("queues-bool", text(blk(options="queues = true")), "device[0].backend_config.queues"),
    ("image-directory", text(blk(options='image = "{tmp}"')), "device[0].backend_config.image"),
    ("image-fifo", text(blk(options='image = "{tmp}/fifo"')), "device[0].backend_config.image"),
    ("image-no-dir", text(blk(options='image = "{tmp}/none/disk.img"')), "device[0].backend_config.image"),
    ("image-empty", text(blk(options='image = ""')), "device[0].backend_config.image"),
    ("image-read-only-absent", text(blk(options='image = "{tmp}/absent.img"\nread_only = true')),
     "device[0].backend_config.image"),
    ("latency-str", text(blk(options='latency_us = "slow"')), "device[0].backend_config.latency_us"),
    ("latency-negative", text(blk(options="latency_us = -1")), "device[0].backend_config.latency_us"),
    ("latency-nan", text(blk(options="latency_us = nan")), "device[0].backend_config.latency_us"),
    ("inproc-typo", text(blk(options="sise = 4096")), "device[0].backend_config.sise"),
    ("read-only-str", text(blk(options='read_only = "yes"')), "device[0].backend_config.read_only"),
    ("model-unknown", text(blk(model='"gpu"')), "device[0].backend_config.device"),
    ("rng-with-queues", text(blk(model='"rng"', options="queues = 2")), "device[0].backend_config.queues"),
    # the device table
    ("vmm-features-negative", text(blk(device="vmm_features = -1")), "device[0].vmm_features"),
    ("vmm-features-2**64", text(blk(device="vmm_features = 18446744073709551616")), "device[0].vmm_features"),
    ("vmm-features-version-1", text(blk(device="vmm_features = 0x100000000")), "device[0].vmm_features"),
    ("vmm-features-suspend", text(blk(device="vmm_features = 0x80000000000")), "device[0].vmm_features"),
    ("num-queues-huge", text(blk(device="num_queues = 100000")), "device[0].num_queues"),
    ("num-queues-zero", text(blk(device="num_queues = 0")), "device[0].num_queues"),
    ("queue-size-100", text(blk(device="queue_size = 100")), "device[0].queue_size"),
    ("queue-size-65536", text(blk(device="queue_size = 65536")), "device[0].queue_size"),
    ("transport", text(blk(device='transport = "ccw"')), "device[0].transport"),
    ("backend-unknown", text(blk(backend_name='"nope"')), "device[0].backend"),
    ("stop-feature-bit", text(blk(device='stop_dialect = "stop"\nstop_feature_bit = 40')),
     "device[0].stop_feature_bit"),
    ("stop-dialect", text(blk(device='stop_dialect = "pause"')), "device[0].stop_dialect"),
    ("packed-int", text(blk(device="packed = 1")), "device[0].packed"),
    ("reconnect", text(blk(device="reconnect = { interval_ms = -1 }")), "device[0].reconnect.interval_ms"),
    ("name-empty", text(blk(device='name = ""').replace('name = "blk0"\n', "")), "device[0].name"),
    ("device-typo", text(blk(device="queue_sizes = 4")), "device[0].queue_sizes"),
    ("backend-config-str", text('[[device]]\nname = "a"\nbackend = "inproc"\nbackend_config = "blk"\n'),
     "device[0].backend_config"),
    ("device-not-table", text("device = [1]\n"), "device[0]"),
    # the machine and run tables
    ("memory-huge", text(blk(memory=10**9)), "machine.memory_mib"),
    ("memory-zero", text(blk(memory=0)), "machine.memory_mib"),
    ("memory-str", text(blk(memory='"64"')), "machine.memory_mib"),
    ("memory-too-small", text(blk(memory=1)), "machine.memory_mib"),
    ("request-bytes-huge", text(blk(run="request_bytes = 1048576")), "run.request_bytes"),
    ("request-bytes-over-disk", text(blk(options="size = 2048")), "run.request_bytes"),
    ("queue-depth-over-slots", text(blk(device="queue_size = 8", run="queue_depth = 9")), "run.queue_depth"),
    ("stop-hold-nan", text(blk(run="stop_hold_ms = nan")), "run.stop_hold_ms"),
    ("run-typo", text(blk(run="duration = 5")), "run.duration"),
    ("top-level-typo", text("bogus = 1\n"), "bogus"),
    # the other plugins
    ("vhost-user-typo", text(plugin("vhost-user", 'device = "blk"\nsockett = "/x"')),
     "device[0].backend_config.sockett"),
    ("vhost-user-no-socket", text(plugin("vhost-user", 'device = "blk"')), "device[0].backend_config.socket"),
    ("vhost-user-timeout", text(plugin("vhost-user", 'device = "blk"\nsocket = "/x"\ntimeout = 0')),
     "device[0].backend_config.timeout"),
    ("vhost-user-busy-poll", text(plugin("vhost-user", 'device = "blk"\nsocket = "/x"\nbusy_poll_us = 1e9')),
     "device[0].backend_config.busy_poll_us"),
    ("vhost-user-device", text(plugin("vhost-user", 'device = "toaster"\nsocket = "/x"')),
     "device[0].backend_config.device"),
    ("vdpa-typo", text(plugin("vdpa", 'device = "blk"\npath = "/dev/vhost-vdpa-0"\nassid = 1')),
     "device[0].backend_config.assid"),
    ("vdpa-asid", text(plugin("vdpa", 'device = "blk"\npath = "/dev/vhost-vdpa-0"\nasid = -1')),
     "device[0].backend_config.asid"),
    ("vdpa-no-path", text(plugin("vdpa", 'device = "net"')), "device[0].backend_config.path"),
    # the file itself
    ("file-is-directory", directory, None),
    ("file-missing", missing, None),
    ("file-binary", raw(bytes(range(256)) * 4), None),
    ("file-nul-bytes", raw(b"[machine]\nmemory_mib = 1\0\n"), None),
    ("file-toml-syntax", text("[machine\nmemory_mib = 1\n"), None),
    ("file-duplicate-key", text("[machine]\nmemory_mib = 1\nmemory_mib = 2\n"), None),
    ("file-huge-integer", text("[machine]\nmemory_mib = " + "9" * 5000 + "\n"), None),
    ("file-deep-nesting", text("a = " + "[" * 5000 + "]" * 5000 + "\n"), None),
    ("file-too-large", text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1)), None),
]


@pytest.fixture(autouse=True)
def plain_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop keeps a pipe per process from its first loop on, which the fd check would count;
    the real process (uvloop included) is run by test_bad_config_in_a_real_process."""
    monkeypatch.setattr(cli, "_runner", asyncio.Runner)


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "fifo")
    return tmp_path


def test_the_small_machine_runs(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The cases below fail for what they change, not for the rest of the file."""
    assert cli.main(["run", str(text(blk())(tmp))]) == 0
    assert "RESULT: PASS" in capsys.readouterr().out


@pytest.mark.parametrize("make,key", [case[1:] for case in CLI_CASES], ids=[case[0] for case in CLI_CASES])
def test_bad_config_is_one_line_naming_file_and_key(tmp: Path, capsys: pytest.CaptureFixture[str],
                                                     make: Callable[[Path], Path], key: str | None) -> None:
    path = make(tmp)
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    prefix = f"shadowvmm: error: {path}: " + (f"{key}: " if key else "")
    assert err.startswith(prefix), err
    assert len(err) > len(prefix) + 5, err


def test_cli_case_table_is_large_enough() -> None:
    assert len(CLI_CASES) >= 30


@pytest.mark.parametrize("case", ["inproc-typo", "memory-too-small", "image-read-only-absent",
                                  "file-binary", "vmm-features-negative"])
def test_bad_config_in_a_real_process(tmp: Path, case: str) -> None:
    """Outside pytest (real stderr, logging as configured by the CLI): one line, exit code 2."""
    _, make, key = next(c for c in CLI_CASES if c[0] == case)
    path = make(tmp)
    proc = subprocess.run([sys.executable, "-m", "shadowvmm.cli", "run", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"shadowvmm: error: {path}: {key + ': ' if key else ''}")


def test_an_os_error_is_one_line_too(tmp: Path) -> None:
    """Out of file descriptors (two eventfds per queue): one line and exit code 1, no traceback."""
    path = text(blk(device="num_queues = 200", options="queues = 200"))(tmp)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128)); "
            "from shadowvmm import cli; sys.exit(cli.main(['run', sys.argv[1]]))")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Too many open files" in proc.stderr, proc.stderr


def test_migrate_loads_its_configs_through_the_same_errors(tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = text(blk(options="sise = 1"))(tmp)
    assert cli.main(["migrate", str(ROOT / "configs" / "default.toml"), str(bad), "--to", "file:/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"shadowvmm: error: {bad}: device[0].backend_config.sise: ")
    assert cli.main(["migrate", str(tmp), str(bad), "--to", "file:/nonexistent"]) == 2
    assert capsys.readouterr().err.startswith(f"shadowvmm: error: {tmp}: is a directory")


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "soon"])
def test_probe_timeout_is_checked(timeout: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["probe", "--timeout", timeout, "/nonexistent.sock"])
    assert info.value.code == 2
    assert "--timeout" in capsys.readouterr().err


def test_probe_of_a_missing_socket_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["probe", "--timeout", "1", "/nonexistent.sock"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("shadowvmm: error: ") and "/nonexistent.sock" in err


# ---------------------------------------------------------------------------- the schema mechanism

SCHEMA = OptionSchema(
    Option("name", str, REQUIRED, "who"),
    Option("count", int, 1, "how many", min=1, max=8),
    Option("ratio", float, 0.5, "share", min=0, max=1),
    Option("flag", bool, False, "a switch"),
    Option("mode", str, "fast", "speed", choices=("fast", "slow")),
    Option("even", int, None, "an even number", check=lambda v: None if v % 2 == 0 else "must be even"),
    Option("file", Path, None, "a path"),
)


def refused(schema: OptionSchema, table: object, key: str, *words: str, path: str = "") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        schema.validate(table, path)
    assert info.value.key == key, str(info.value)
    for word in words:
        assert word in str(info.value), str(info.value)
    return info.value


def test_validate_fills_defaults_and_normalises() -> None:
    assert SCHEMA.validate({"name": "x"}) == {"name": "x", "count": 1, "ratio": 0.5, "flag": False,
                                              "mode": "fast", "even": None, "file": None}
    values = SCHEMA.validate({"name": "x", "ratio": 1, "file": Path("/a/b"), "even": 4, "count": 8})
    assert values["ratio"] == 1.0 and isinstance(values["ratio"], float)
    assert values["file"] == "/a/b" and values["even"] == 4 and values["count"] == 8
    assert SCHEMA.validate({"name": "x", "even": None})["even"] is None


@pytest.mark.parametrize("table,key,words", [
    ({}, "name", ("missing", "who")),
    ({"name": "x", "cuont": 2}, "cuont", ("unknown key", "did you mean 'count'", "known: name, count")),
    ({"name": "x", "zzz": 2}, "zzz", ("unknown key", "known: name, count, ratio")),
    ({"name": 5}, "name", ("expected str, got int",)),
    ({"name": "x", "count": True}, "count", ("expected int, got bool",)),
    ({"name": "x", "count": 2.0}, "count", ("expected int, got float",)),
    ({"name": "x", "count": "2"}, "count", ("expected int, got str",)),
    ({"name": "x", "count": 0}, "count", ("must be 1..8, got 0",)),
    ({"name": "x", "count": 9}, "count", ("must be 1..8, got 9",)),
    ({"name": "x", "ratio": True}, "ratio", ("expected number, got bool",)),
    ({"name": "x", "ratio": math.nan}, "ratio", ("finite",)),
    ({"name": "x", "ratio": math.inf}, "ratio", ("finite",)),
    ({"name": "x", "ratio": 1.5}, "ratio", ("0..1",)),
    ({"name": "x", "flag": 1}, "flag", ("expected bool, got int",)),
    ({"name": "x", "mode": "FAST"}, "mode", ('"FAST" is not one of "fast", "slow"',)),
    ({"name": "x", "even": 3}, "even", ("must be even",)),
    ({"name": "x", "file": ""}, "file", ("empty",)),
    ({"name": "x", "file": "a\0b"}, "file", ("NUL",)),
    ({"name": "x", "file": 3}, "file", ("expected path, got int",)),
    ({"name": "x", "count": [1]}, "count", ("expected int, got array",)),
    ({"name": "x", "count": {"a": 1}}, "count", ("expected int, got table",)),
])
def test_validate_refuses(table: dict, key: str, words: tuple[str, ...]) -> None:
    refused(SCHEMA, table, key, *words)


def test_errors_carry_the_full_key_path() -> None:
    err = refused(SCHEMA, {"name": "x", "count": "many"}, "device[3].backend_config.count",
                  path="device[3].backend_config")
    assert str(err) == "device[3].backend_config.count: expected int, got str"
    refused(SCHEMA, "x", "device[3].backend_config", "expected a table, got str", path="device[3].backend_config")


VARIANTS = OptionSchema(
    Option("device", str, "a", "which"),
    Option("common", int, 0, "for all"),
    select="device",
    variants={"a": OptionSchema(Option("size", int, 1, "a's size")), "b": OptionSchema()},
)


def test_variants_pick_their_options() -> None:
    assert VARIANTS.validate({}) == {"device": "a", "common": 0, "size": 1}
    assert VARIANTS.validate({"device": "b", "common": 2}) == {"device": "b", "common": 2}
    refused(VARIANTS, {"device": "b", "size": 2}, "size", 'not an option of device = "b"', 'only of "a"')
    refused(VARIANTS, {"device": "c"}, "device", '"c" is not one of "a", "b"')
    assert "size" in VARIANTS and "device" in VARIANTS and "other" not in VARIANTS


def test_describe_lists_name_type_default_help() -> None:
    lines = SCHEMA.describe()
    assert len(lines) == len(SCHEMA.options)
    assert lines[0].split() == ["name", "str", "required", "who"]
    assert lines[1].split()[:4] == ["count", "int", "1", "how"] and lines[1].endswith("(1..8)")
    assert lines[4].split()[:3] == ["mode", "str", '"fast"'] and 'one of "fast", "slow"' in lines[4]
    assert len({line.index(line.split()[1]) for line in lines}) == 1     # aligned columns
    assert all(line == line.rstrip() for line in lines)
    lines = VARIANTS.describe()
    assert lines[2] == 'device = "a":' and lines[3].split()[:3] == ["size", "int", "1"]
    assert lines[3].startswith("  ") and lines[4] == 'device = "b": no more options'


@pytest.mark.parametrize("make", [
    lambda: Option("x", complex, 0),
    lambda: OptionSchema(Option("x", int), Option("x", str)),
    lambda: OptionSchema(Option("x", str), select="x"),
    lambda: OptionSchema(Option("x", str), variants={"a": OptionSchema()}),
    lambda: OptionSchema(Option("x", str), select="y", variants={"a": OptionSchema()}),
])
def test_a_misdeclared_schema_is_a_programming_error(make: Callable[[], object]) -> None:
    with pytest.raises(ArgumentError):
        make()


# ---------------------------------------------------------------------------- plugin schemas


def test_every_registered_plugin_declares_its_options() -> None:
    for name in ("inproc", "vhost-user", "vdpa"):
        options = getattr(base.load_backend(name), "OPTIONS", None)
        assert isinstance(options, OptionSchema), name
        assert options.describe()


def test_plugin_schemas() -> None:
    assert list(InProcBackend.OPTIONS.options) == ["device", "latency_us"]
    assert set(InProcBackend.OPTIONS.variants) == {"blk", "rng"}
    assert list(BlkModel.OPTIONS.options) == ["image", "size", "queues", "read_only", "serial"]
    assert not RngModel.OPTIONS.options
    assert list(VhostUserBackend.OPTIONS.options) == ["socket", "device", "timeout", "queues", "config_size",
                                                      "protocol_features", "busy_poll_us",
                                                      "ring_disable", "ring_restart"]
    assert list(VdpaBackend.OPTIONS.options) == ["path", "device", "backend_features", "asid"]


#: backend_config dicts the tests, benchmarks and shipped configs pass today.
ACCEPTED = [
    ("inproc", {}),
    ("inproc", {"device": "rng"}),
    ("inproc", {"device": "blk", "size": 64 << 20, "queues": 2, "serial": "shadowvmm-disk0", "latency_us": 1000}),
    ("inproc", {"device": "blk", "queues": 2, "latency_us": 1500.5, "read_only": False}),
    ("vhost-user", {"socket": "/x.sock", "device": "blk", "queues": 4, "timeout": 5.0}),
    ("vhost-user", {"socket": Path("/x.sock"), "device": "net", "timeout": 3, "queues": None,
                    "config_size": 12, "protocol_features": (1 << 64) - 1, "busy_poll_us": 300}),
    ("vdpa", {"path": "/dev/vhost-vdpa-0", "device": "blk"}),
    ("vdpa", {"path": "/dev/vhost-vdpa-0", "device": "net", "asid": 1,
              "backend_features": ~(BackendFeature.RESUME.mask | BackendFeature.IOTLB_PERSIST.mask)}),
]


@pytest.mark.parametrize("name,options", ACCEPTED)
def test_existing_options_stay_accepted(name: str, options: dict) -> None:
    schema = getattr(base.load_backend(name), "OPTIONS", None)
    assert isinstance(schema, OptionSchema), name
    schema.validate(options, "backend_config")
    parse({"device": [{"name": "d", "backend": name, "backend_config": options}]})


async def test_image_file_is_opened_created_and_extended(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    backend = InProcBackend({"device": "blk", "image": str(image), "size": 1 << 20})
    assert isinstance(backend.model, BlkModel)
    assert image.stat().st_size == 1 << 20 and backend.model.size == 1 << 20
    await backend.close()
    backend = InProcBackend({"device": "blk", "image": image, "read_only": True})
    assert isinstance(backend.model, BlkModel)
    assert backend.model.size == 1 << 20 and backend.model.read_only
    await backend.close()


@pytest.mark.parametrize("options,key,words", [
    ({"sise": 1}, "sise", ("did you mean 'size'",)),
    ({"size": "big"}, "size", ("expected int, got str",)),
    ({"size": -4096}, "size", ("must be 512..",)),
    ({"size": 1000}, "size", ("multiple of 512",)),
    ({"size": 1 << 59}, "size", ("no memory",)),
    ({"queues": 0}, "queues", ("1..1024",)),
    ({"latency_us": "slow"}, "latency_us", ("expected number, got str",)),
    ({"device": "rng", "serial": "x"}, "serial", ('not an option of device = "rng"',)),
    ({"device": 1}, "device", ("expected str, got int",)),
    ({"image": "{tmp}"}, "image", ("is a directory",)),
    ({"image": "{tmp}/fifo"}, "image", ("is a FIFO",)),
    ({"image": "/dev/null"}, "image", ("character device",)),
    ({"image": "{tmp}/none/disk.img"}, "image", ("does not exist",)),
    ({"image": "{tmp}/absent.img", "read_only": True}, "image", ("No such file",)),
    ({"image": "{tmp}/odd.img"}, "image", ("1000 bytes, not a multiple of 512",)),
])
def test_inproc_refuses_at_construction(tmp: Path, options: dict, key: str, words: tuple[str, ...]) -> None:
    (tmp / "odd.img").write_bytes(bytes(1000))
    options = {k: v.replace("{tmp}", str(tmp)) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises(ConfigError) as info:
        InProcBackend(options)
    assert info.value.key == key, str(info.value)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_blk_model_validates_on_its_own() -> None:
    with pytest.raises(ConfigError) as info:
        BlkModel({"queues": 2, "size": 1 << 20, "serial": "x", "latency_us": 5})
    assert info.value.key == "latency_us"
    assert BlkModel({"queues": 2, "size": 1 << 20, "serial": "refblk"}).queues == 2


@pytest.mark.parametrize("factory,options,key", [
    (VhostUserBackend, {"socket": "/x", "device": "blk", "sockett": "/y"}, "sockett"),
    (VhostUserBackend, {"socket": "", "device": "blk"}, "socket"),
    (VhostUserBackend, {"socket": "/x", "device": "blk", "timeout": math.nan}, "timeout"),
    (VhostUserBackend, {"socket": "/x", "device": "blk", "timeout": True}, "timeout"),
    (VhostUserBackend, {"socket": "/x", "device": "blk", "queues": 1025}, "queues"),
    (VhostUserBackend, {"socket": "/x", "device": "blk", "protocol_features": -1}, "protocol_features"),
    (VhostUserBackend, {"socket": "/x", "device": "blk", "busy_poll_us": 2.5}, "busy_poll_us"),
    (VhostUserBackend, {"socket": "/x", "device": "blk", "ring_disable": "sometimes"}, "ring_disable"),
    (VdpaBackend, {"path": "/dev/vhost-vdpa-0", "device": "blk", "assid": 0}, "assid"),
    (VdpaBackend, {"path": "/dev/vhost-vdpa-0", "device": "blk", "asid": -1}, "asid"),
    (VdpaBackend, {"path": "/dev/vhost-vdpa-0", "device": "blk", "backend_features": "all"}, "backend_features"),
    (VdpaBackend, {"path": "/dev/vhost-vdpa-0", "device": "blk", "backend_features": 1 << 64},
     "backend_features"),
    (VdpaBackend, {"path": 7, "device": "blk"}, "path"),
])
def test_remote_backends_refuse_at_construction(factory: type, options: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        factory(options)
    assert info.value.key == key, str(info.value)


def test_vdpa_backend_features_mask() -> None:
    without_resume = ~BackendFeature.RESUME.mask
    assert not VdpaBackend({"path": "/p", "device": "blk", "backend_features": without_resume})._wanted \
        & BackendFeature.RESUME.mask
    assert VdpaBackend({"path": "/p", "device": "blk"})._wanted & BackendFeature.RESUME.mask


# ---------------------------------------------------------------------------- the config tables


@pytest.mark.parametrize("value", [
    int(NetFeature.MAC | NetFeature.STATUS), int(Feature.RING_RESET), 1 << 63, 1 << 50, (1 << 24) - 1, 0])
def test_vmm_features_accepts_device_bits_and_ring_reset(value: int) -> None:
    assert value & VMM_FEATURES_ALLOWED == value
    doc = {"device": [{"name": "d", "backend": "inproc", "vmm_features": value}]}
    assert parse(doc).devices[0].vmm_features == value


@pytest.mark.parametrize("value,words", [
    (-1, "64-bit feature mask"),
    (1 << 64, "64-bit feature mask"),
    (int(Feature.VERSION_1), "32 (VERSION_1)"),
    (int(Feature.RING_PACKED | Feature.EVENT_IDX), "29 (EVENT_IDX), 34 (RING_PACKED)"),
    (int(Feature.SUSPEND), "stop_dialect"),
    (1 << 44, "44"),
    (1 << 24, "24 (NOTIFY_ON_EMPTY)"),
])
def test_vmm_features_refuses_transport_bits(value: int, words: str) -> None:
    doc = {"device": [{"name": "d", "backend": "inproc", "vmm_features": value}]}
    with pytest.raises(ConfigError) as info:
        parse(doc)
    assert info.value.key == "device[0].vmm_features"
    assert words in str(info.value)


def test_queue_cap_is_what_the_pci_notify_region_addresses() -> None:
    assert MAX_QUEUES == pci.REGION_SIZE // pci.NOTIFY_MULTIPLIER
    assert DEVICE.options["num_queues"].max == MAX_QUEUES


def test_tables_describe_themselves() -> None:
    for schema in (MACHINE, DEVICE, RUN):
        assert all(len(line.split()) >= 3 for line in schema.describe())


def test_load_prefixes_the_file_and_keeps_the_key(tmp_path: Path) -> None:
    path = text(blk(options='size = "big"'))(tmp_path)
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == "device[0].backend_config.size"
    assert str(info.value) == f"{path}: device[0].backend_config.size: expected int, got str"


def test_loaded_config_remembers_its_file(tmp_path: Path) -> None:
    path = text(blk())(tmp_path)
    cfg = load(path)
    assert cfg.source == str(path)
    err = cfg.backend_error(0, ConfigError("queues", "4 queues wanted, back-end supports 2"))
    assert err.key == "device[0].backend_config.queues"
    assert str(err) == f"{path}: device[0].backend_config.queues: 4 queues wanted, back-end supports 2"
    assert parse({}).error("run.seed", "x").args == ("run.seed: x",)


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(config: Path) -> None:
    load(config)


@pytest.mark.parametrize("text, ok", [("2.5", 2.5), ("10", 10.0), ("0", None), ("-1", None), ("inf", None),
                                      ("nan", None), ("soon", None)])
def test_the_commands_take_a_positive_finite_number_of_seconds(text: str, ok: float | None) -> None:
    import argparse

    from shadowvmm.options import seconds_argument

    if ok is None:
        with pytest.raises(argparse.ArgumentTypeError):
            seconds_argument(text)
    else:
        assert seconds_argument(text) == ok
