"""TOML configuration (stdlib ``tomllib``), validated into frozen dataclasses.

Every error is a :class:`~shadowvmm.errors.ConfigError` naming the bad key
with its full path (``device[0].queue_size``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .lifecycle import ReconnectPolicy
from .shadow import STOP_FEATURE_BITS, StopDialect

TRANSPORTS = ("pci", "mmio")


@dataclass(frozen=True)
class DeviceConfig:
    name: str
    backend: str
    backend_config: dict[str, Any]
    transport: str = "pci"
    queue_size: int = 256
    num_queues: int | None = None
    stop_dialect: StopDialect = StopDialect.NONE
    stop_feature_bit: int = 44
    packed: bool = False
    #: Device feature bits the VMM serves itself (e.g. net MAC/STATUS over a
    #: config it synthesises); offered to the guest, never forwarded.
    vmm_features: int = 0
    #: What the device does when its backend session dies (see shadowvmm.lifecycle).
    reconnect: ReconnectPolicy = field(default_factory=ReconnectPolicy.off)


@dataclass(frozen=True)
class RunConfig:
    requests: int = 2000
    queue_depth: int = 16
    request_bytes: int = 4096
    stop_after: int = 500
    stop_hold_ms: float = 20.0
    seed: int = 1


@dataclass(frozen=True)
class MachineConfig:
    memory_mib: int = 64
    devices: tuple[DeviceConfig, ...] = ()
    run: RunConfig = field(default_factory=RunConfig)


def _take(table: dict, key: str, path: str, kind: type | tuple, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigError(f"{path}.{key}" if path else key, "missing")
        return default
    value = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{path}.{key}" if path else key, f"expected {kinds[0].__name__}, got bool")
    if not isinstance(value, kinds):
        raise ConfigError(f"{path}.{key}" if path else key,
                          f"expected {kinds[0].__name__}, got {type(value).__name__}")
    return value


def _no_unknown(table: dict, known: set[str], path: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{path}.{key}" if path else key,
                              f"unknown key (known: {', '.join(sorted(known))})")


def _positive(value: int, key: str) -> int:
    if value <= 0:
        raise ConfigError(key, f"must be positive, got {value}")
    return value


def parse(data: dict) -> MachineConfig:
    """Validate a decoded TOML document."""
    _no_unknown(data, {"machine", "device", "run"}, "")
    machine = _take(data, "machine", "", dict, {})
    _no_unknown(machine, {"memory_mib"}, "machine")
    memory = _positive(_take(machine, "memory_mib", "machine", int, 64), "machine.memory_mib")
    devices = []
    names = set()
    for i, dev in enumerate(_take(data, "device", "", list, [])):
        path = f"device[{i}]"
        if not isinstance(dev, dict):
            raise ConfigError(path, "must be a table")
        _no_unknown(dev, {"name", "backend", "backend_config", "transport", "queue_size",
                          "num_queues", "stop_dialect", "stop_feature_bit", "packed",
                          "vmm_features", "reconnect"}, path)
        name = _take(dev, "name", path, str)
        if name in names:
            raise ConfigError(f"{path}.name", f"duplicate device name {name!r}")
        names.add(name)
        transport = _take(dev, "transport", path, str, "pci")
        if transport not in TRANSPORTS:
            raise ConfigError(f"{path}.transport", f"{transport!r} is not one of {TRANSPORTS}")
        qsize = _take(dev, "queue_size", path, int, 256)
        if not 0 < qsize <= 32768 or qsize & (qsize - 1):
            raise ConfigError(f"{path}.queue_size", f"{qsize} is not a power of 2 in 1..32768")
        dialect_name = _take(dev, "stop_dialect", path, str, "none")
        try:
            dialect = StopDialect(dialect_name)
        except ValueError:
            raise ConfigError(f"{path}.stop_dialect",
                              f"{dialect_name!r} is not one of {[d.value for d in StopDialect]}") from None
        stop_bit = _take(dev, "stop_feature_bit", path, int, 44)
        if stop_bit not in STOP_FEATURE_BITS:
            raise ConfigError(f"{path}.stop_feature_bit",
                              f"{stop_bit} collides with a published feature bit; use 44..49")
        num_queues = _take(dev, "num_queues", path, int, None)
        if num_queues is not None:
            _positive(num_queues, f"{path}.num_queues")
        devices.append(DeviceConfig(
            name=name, backend=_take(dev, "backend", path, str),
            backend_config=dict(_take(dev, "backend_config", path, dict, {})),
            transport=transport, queue_size=qsize, num_queues=num_queues, stop_dialect=dialect,
            stop_feature_bit=stop_bit,
            vmm_features=_take(dev, "vmm_features", path, int, 0),
            packed=_take(dev, "packed", path, bool, False),
            reconnect=ReconnectPolicy.parse(dev.get("reconnect", "off"), f"{path}.reconnect")))
    run = _take(data, "run", "", dict, {})
    _no_unknown(run, set(RunConfig.__dataclass_fields__), "run")
    defaults = RunConfig()
    run_cfg = RunConfig(**{
        key: _take(run, key, "run", (int, float) if isinstance(getattr(defaults, key), float) else int,
                   getattr(defaults, key))
        for key in RunConfig.__dataclass_fields__})
    for key in ("requests", "queue_depth", "request_bytes"):
        _positive(getattr(run_cfg, key), f"run.{key}")
    if run_cfg.request_bytes % 512:
        raise ConfigError("run.request_bytes", "must be a multiple of 512")
    return MachineConfig(memory_mib=memory, devices=tuple(devices), run=run_cfg)


def load(path: str | Path) -> MachineConfig:
    """Read and validate a TOML config file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"invalid TOML: {exc}") from exc
    return parse(data)
