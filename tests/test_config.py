"""TOML configuration: the shipped config loads; every bad input is a ConfigError naming its key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from shadowvmm.config import DeviceConfig, MachineConfig, RunConfig, load, parse
from shadowvmm.errors import ConfigError, ShadowVmmError
from shadowvmm.lifecycle import ReconnectPolicy
from shadowvmm.shadow import StopDialect

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "configs" / "default.toml"


def base() -> dict:
    """A small valid decoded document."""
    return {
        "machine": {"memory_mib": 32},
        "device": [
            {"name": "blk0", "backend": "inproc", "backend_config": {"device": "blk"}},
            {"name": "rng0", "backend": "inproc", "transport": "mmio", "queue_size": 64,
             "backend_config": {"device": "rng"}},
        ],
        "run": {"requests": 10},
    }


def with_change(path: tuple, value=None, *, delete: bool = False) -> dict:
    doc = copy.deepcopy(base())
    node = doc
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


def expect_key(doc: dict, key: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(doc)
    assert info.value.key == key, str(info.value)
    assert str(info.value).startswith(f"{key}: ")
    assert isinstance(info.value, ShadowVmmError)
    return info.value


# ---------------------------------------------------------------------------- valid input


def test_default_config_loads():
    cfg = load(DEFAULT)
    assert isinstance(cfg, MachineConfig)
    assert cfg.memory_mib == 96
    assert [d.name for d in cfg.devices] == ["blk0", "rng0"]
    blk, rng = cfg.devices
    assert blk == DeviceConfig(
        name="blk0", backend="inproc",
        backend_config={"device": "blk", "size": 67108864, "queues": 2,
                        "serial": "shadowvmm-disk0", "latency_us": 1000},
        transport="pci", queue_size=256)
    assert (rng.transport, rng.queue_size, rng.backend_config) == ("mmio", 64, {"device": "rng"})
    assert rng.stop_dialect is StopDialect.NONE and rng.num_queues is None and rng.packed is False
    assert cfg.run == RunConfig(requests=4000, queue_depth=16, request_bytes=4096, stop_after=1500,
                                stop_hold_ms=25, seed=1)


def test_load_accepts_str_path():
    assert load(str(DEFAULT)).memory_mib == 96


def test_parse_defaults():
    cfg = parse({})
    assert cfg == MachineConfig(memory_mib=64, devices=(), run=RunConfig())
    cfg = parse(base())
    assert cfg.memory_mib == 32
    blk = cfg.devices[0]
    assert (blk.transport, blk.queue_size, blk.num_queues, blk.stop_dialect, blk.stop_feature_bit,
            blk.packed) == ("pci", 256, None, StopDialect.NONE, 44, False)
    assert cfg.run.requests == 10 and cfg.run.queue_depth == 16


def test_parse_all_device_fields():
    doc = with_change(("device", 0), {
        "name": "d", "backend": "vhost-user", "backend_config": {"socket": "/tmp/x", "device": "blk"},
        "transport": "mmio", "queue_size": 1, "num_queues": 3, "stop_dialect": "stop",
        "stop_feature_bit": 45, "packed": True})
    dev = parse(doc).devices[0]
    assert dev == DeviceConfig("d", "vhost-user", {"socket": "/tmp/x", "device": "blk"}, "mmio", 1, 3,
                               StopDialect.STOP, 45, True)
    doc = with_change(("device", 0, "stop_dialect"), "suspend")
    assert parse(doc).devices[0].stop_dialect is StopDialect.SUSPEND
    doc = with_change(("device", 0, "queue_size"), 32768)
    assert parse(doc).devices[0].queue_size == 32768


def test_run_float_field_accepts_int_and_float():
    assert parse(with_change(("run", "stop_hold_ms"), 2.5)).run.stop_hold_ms == 2.5
    assert parse(with_change(("run", "stop_hold_ms"), 3)).run.stop_hold_ms == 3


def test_load_valid_file(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text('[machine]\nmemory_mib = 8\n\n[[device]]\nname = "x"\nbackend = "inproc"\n'
                    'queue_size = 16\n[device.backend_config]\ndevice = "rng"\n')
    cfg = load(path)
    assert cfg.memory_mib == 8
    assert cfg.devices == (DeviceConfig("x", "inproc", {"device": "rng"}, queue_size=16),)


# ---------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize("path,key", [
    ((), "bogus"),
    (("machine",), "machine.cpus"),
    (("device", 0), "device[0].queue_sizes"),
    (("device", 1), "device[1].transport_kind"),
    (("run",), "run.duration"),
])
def test_unknown_key_at_each_level(path, key):
    doc = copy.deepcopy(base())
    node = doc
    for part in path:
        node = node[part]
    node[key.rsplit(".", 1)[-1]] = 1
    expect_key(doc, key)


# ---------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize("path,value,key", [
    (("machine",), 5, "machine"),
    (("machine", "memory_mib"), "64", "machine.memory_mib"),
    (("machine", "memory_mib"), 64.0, "machine.memory_mib"),
    (("machine", "memory_mib"), True, "machine.memory_mib"),
    (("device",), {"name": "x"}, "device"),
    (("device", 0), "blk0", "device[0]"),
    (("device", 0, "name"), 7, "device[0].name"),
    (("device", 1, "backend"), ["inproc"], "device[1].backend"),
    (("device", 0, "backend_config"), "blk", "device[0].backend_config"),
    (("device", 0, "transport"), 1, "device[0].transport"),
    (("device", 0, "queue_size"), "256", "device[0].queue_size"),
    (("device", 0, "queue_size"), True, "device[0].queue_size"),
    (("device", 0, "queue_size"), 256.0, "device[0].queue_size"),
    (("device", 0, "num_queues"), "2", "device[0].num_queues"),
    (("device", 0, "stop_dialect"), 1, "device[0].stop_dialect"),
    (("device", 0, "stop_feature_bit"), "44", "device[0].stop_feature_bit"),
    (("device", 0, "packed"), 1, "device[0].packed"),
    (("device", 0, "packed"), "yes", "device[0].packed"),
    (("run",), [], "run"),
    (("run", "requests"), 1.5, "run.requests"),
    (("run", "requests"), False, "run.requests"),
    (("run", "stop_hold_ms"), "20", "run.stop_hold_ms"),
    (("run", "stop_hold_ms"), True, "run.stop_hold_ms"),
    (("run", "seed"), "1", "run.seed"),
])
def test_wrong_type(path, value, key):
    expect_key(with_change(path, value), key)


# ---------------------------------------------------------------------------- bad values


def test_duplicate_device_name():
    doc = with_change(("device", 1, "name"), "blk0")
    err = expect_key(doc, "device[1].name")
    assert "blk0" in str(err)


@pytest.mark.parametrize("transport", ["PCI", "ccw", "", "virtio-pci"])
def test_bad_transport(transport):
    expect_key(with_change(("device", 1, "transport"), transport), "device[1].transport")


@pytest.mark.parametrize("size", [0, -1, 3, 100, 255, 257, 65536, 1 << 20])
def test_bad_queue_size(size):
    expect_key(with_change(("device", 0, "queue_size"), size), "device[0].queue_size")


@pytest.mark.parametrize("dialect", ["SUSPEND", "stopped", "", "vdpa"])
def test_bad_stop_dialect(dialect):
    expect_key(with_change(("device", 0, "stop_dialect"), dialect), "device[0].stop_dialect")


def test_missing_backend():
    expect_key(with_change(("device", 1, "backend"), delete=True), "device[1].backend")


def test_missing_name():
    expect_key(with_change(("device", 0, "name"), delete=True), "device[0].name")


@pytest.mark.parametrize("path,value,key", [
    (("machine", "memory_mib"), 0, "machine.memory_mib"),
    (("machine", "memory_mib"), -8, "machine.memory_mib"),
    (("device", 0, "num_queues"), 0, "device[0].num_queues"),
    (("run", "requests"), 0, "run.requests"),
    (("run", "queue_depth"), -1, "run.queue_depth"),
    (("run", "request_bytes"), 0, "run.request_bytes"),
    (("run", "request_bytes"), 1000, "run.request_bytes"),
])
def test_out_of_range_values(path, value, key):
    expect_key(with_change(path, value), key)


def test_stop_feature_bit_out_of_range():
    doc = with_change(("device", 0, "stop_dialect"), "stop")
    doc["device"][0]["stop_feature_bit"] = 40              # RING_RESET's bit
    expect_key(doc, "device[0].stop_feature_bit")


# ---------------------------------------------------------------------------- files


def test_invalid_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[machine\nmemory_mib = 1\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == str(path)
    assert "invalid TOML" in str(info.value)
    assert info.value.__cause__ is not None


def test_duplicate_toml_key_is_invalid(tmp_path):
    path = tmp_path / "dup.toml"
    path.write_text("[machine]\nmemory_mib = 1\nmemory_mib = 2\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == str(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == str(path)
    assert "not found" in str(info.value)


def test_file_errors_name_the_nested_key(tmp_path):
    path = tmp_path / "q.toml"
    path.write_text('[[device]]\nname = "a"\nbackend = "inproc"\n\n'
                    '[[device]]\nname = "b"\nbackend = "inproc"\nqueue_size = 100\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.key == "device[1].queue_size"


@pytest.mark.parametrize("value,expected", [
    ("off", ReconnectPolicy.off()),
    ("unbounded", ReconnectPolicy.unbounded()),
    ({"interval_ms": 20, "deadline_ms": 1500}, ReconnectPolicy(True, 0.02, 1.5)),
    ({"interval_ms": 5}, ReconnectPolicy(True, 0.005, None)),
    ({"interval_ms": 5, "track_interval_ms": 2}, ReconnectPolicy(True, 0.005, None, 0.002)),
])
def test_reconnect_policy(value, expected):
    doc = base()
    doc["device"][0]["reconnect"] = value
    assert parse(doc).devices[0].reconnect == expected
    assert parse(base()).devices[0].reconnect == ReconnectPolicy.off()


@pytest.mark.parametrize("value,key", [
    ("sometimes", "device[0].reconnect"),
    (3, "device[0].reconnect"),
    ({"interval_ms": 0}, "device[0].reconnect.interval_ms"),
    ({"interval_ms": "fast"}, "device[0].reconnect.interval_ms"),
    ({"deadline_ms": -1}, "device[0].reconnect.deadline_ms"),
    ({"retries": 3}, "device[0].reconnect.retries"),
])
def test_bad_reconnect_policy(value, key):
    doc = base()
    doc["device"][0]["reconnect"] = value
    with pytest.raises(ConfigError) as info:
        parse(doc)
    assert info.value.key == key
