"""TOML configuration (stdlib ``tomllib``), validated into frozen dataclasses.

Every error is a :class:`~shadowvmm.errors.ConfigError` naming the bad key
with its full path (``device[0].queue_size``) and what was expected. The
tables are :class:`~shadowvmm.options.OptionSchema` s (``DOCUMENT``,
``MACHINE``, ``DEVICE``, ``RUN``); a device's ``backend_config`` is validated
by its plugin's ``OPTIONS``. :func:`load` prefixes every message with the file
(``configs/x.toml: device[0].backend_config.size: expected int, got str``)
and names the file alone when it is not a readable UTF-8 TOML file.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .backends import base as plugins
from .errors import ArgumentError, ConfigError, PluginError
from .lifecycle import ReconnectPolicy
from .options import MAX_QUEUES, REQUIRED, Option, OptionSchema
from .shadow import STOP_FEATURE_BITS, DialectSpec, FeaturePolicy, StopDialect
from .virtio.constants import MAX_QUEUE_SIZE, Feature
from .virtio.devcfg import FS_CONFIG_BASE_SIZE, FS_TAG_BYTES, NET_CONFIG_BASE_SIZE, FsConfig, NetConfig

TRANSPORTS = ("pci", "mmio")
#: Guest memory a machine may have (one memfd, mapped lazily).
MAX_MEMORY_MIB = 65536
#: A config file is read up to this size (a larger one is not a config: /dev/zero, an image).
MAX_CONFIG_BYTES = 1 << 20
#: Feature bits a config may name (the 64 the transports here negotiate).
FEATURE_BITS = 64
#: Device-type feature bits (v1.4 §6: 0-23 and 50-127; the transports here negotiate 64).
DEVICE_FEATURE_MASK = ((1 << 24) - 1) | (((1 << FEATURE_BITS) - 1) & ~((1 << 50) - 1))
#: What ``vmm_features`` may hold: device-type bits the VMM serves over a config it
#: synthesises, and the transport bits the device layer emulates itself
#: (:attr:`FeaturePolicy.vmm_emulated`: RING_RESET). Every other transport bit is the
#: transport's and the backend's (VERSION_1, rings, IN_ORDER...): owning one would keep it
#: from the backend, whose rings then stall; the stop bits come from ``stop_dialect``.
VMM_FEATURES_ALLOWED = DEVICE_FEATURE_MASK | FeaturePolicy().vmm_emulated


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
    #: Offer VIRTIO_F_RING_STATE (the ring-state registers, docs/nested.md); STOP dialect only.
    ring_state: bool = False
    #: Its feature bit (44..49, not the stop bit); None: ``stop_feature_bit + 1``.
    ring_state_feature_bit: int | None = None
    #: Device feature bits the VMM serves itself (e.g. net MAC/STATUS over a
    #: config it synthesises); offered to the guest, never forwarded.
    vmm_features: int = 0
    #: What the device does when its backend session dies (see shadowvmm.lifecycle).
    reconnect: ReconnectPolicy = field(default_factory=ReconnectPolicy.off)
    #: A ``[[peer]]`` whose socket the backend takes as its ``socket`` option ("" for none).
    peer: str = ""
    #: Devices of the same machine this one owns through an admin queue (v1.4 §2.12, SR-IOV
    #: group, member ids 1..N in this order); PCI only.
    admin_members: tuple[str, ...] = ()
    #: Device config space the VMM serves when the backend serves none (``[device.config_space]``:
    #: a virtio-fs tag, a virtio-net MAC), packed (:mod:`shadowvmm.virtio.devcfg`); None: the backend's.
    config_space: bytes | None = None

    def dialect_spec(self) -> DialectSpec:
        """The stop dialect's bits (ConfigError with ``device.*`` keys if unusable)."""
        return DialectSpec.make(self.stop_dialect, self.stop_feature_bit, ring_state=self.ring_state,
                                ring_state_feature_bit=self.ring_state_feature_bit)


#: Peers a ``[[peer]]`` table may start (``kind``).
PEER_KINDS = ("qemu-storage-daemon", "virtiofsd", "dpdk-testpmd")
#: Block node drivers of a qemu-storage-daemon peer: an image file (created sparse in the
#: peer's work directory unless ``image`` names one) or ``null-co`` (reads return no data).
PEER_DRIVERS = ("file", "null-co")


@dataclass(frozen=True)
class PeerConfig:
    """A back-end process the command starts before the devices and stops after them
    (``[[peer]]``). A device names it with ``peer = NAME``; each device on a peer gets its own
    export(s) of the one block node: a source and, for a migration, a destination export."""

    name: str
    kind: str = PEER_KINDS[0]
    driver: str = "file"
    image: str = ""
    size: int = 64 << 20
    num_queues: int = 1
    #: virtiofsd: the shared directory ("": a new empty one in the peer's work directory).
    source: str = ""


@dataclass(frozen=True)
class RunConfig:
    requests: int = 2000
    queue_depth: int = 16
    request_bytes: int = 4096
    stop_after: int = 500
    stop_hold_ms: float = 20.0
    seed: int = 1
    #: blk: compare what is read back with what was written (false for a disk that keeps
    #: nothing: a qemu-storage-daemon null-co node reads zeroes).
    verify: bool = True
    #: virtio-fs: files created, written, read back and unlinked through FUSE.
    files: int = 16
    #: virtio-fs: bytes per file.
    file_bytes: int = 16384
    #: virtio-net: frames sent (and expected back from a looping peer).
    frames: int = 512


@dataclass(frozen=True)
class MachineConfig:
    memory_mib: int = 64
    devices: tuple[DeviceConfig, ...] = ()
    run: RunConfig = field(default_factory=RunConfig)
    peers: tuple[PeerConfig, ...] = ()
    #: The file it was read from: errors found later (a backend refusing its options,
    #: guest memory too small for the run) name it too.
    source: str | None = field(default=None, compare=False)

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError about *key* of this config, naming its file."""
        return ConfigError(key, message, self.source)

    def backend_error(self, index: int, exc: ConfigError) -> ConfigError:
        """*exc*, raised by device *index*'s backend about one of its options (its key
        relative to ``backend_config``), with the full key path and the file."""
        return self.error(f"device[{index}].backend_config.{exc.key}", exc.message)


def _power_of_2(value: int) -> str | None:
    return None if value & (value - 1) == 0 else "must be a power of 2"


def _sectors(value: int) -> str | None:
    return None if value % 512 == 0 else "must be a multiple of 512"


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _bit_names(mask: int) -> str:
    names = {int(f): f.name for f in Feature}
    return ", ".join(f"{bit} ({names[1 << bit]})" if 1 << bit in names else str(bit)
                     for bit in range(mask.bit_length()) if mask >> bit & 1)


def _vmm_features(value: int) -> str | None:
    if not 0 <= value < 1 << FEATURE_BITS:
        return f"expected a {FEATURE_BITS}-bit feature mask (0..{(1 << FEATURE_BITS) - 1:#x}), got {value}"
    if value & ~VMM_FEATURES_ALLOWED:
        return (f"bit(s) {_bit_names(value & ~VMM_FEATURES_ALLOWED)} are transport bits the VMM does "
                f"not emulate; give device-type bits (0-23, 50-63) or RING_RESET (40); "
                f"SUSPEND and the STOP bits come from stop_dialect")
    return None


DOCUMENT = OptionSchema(
    Option("machine", dict, {}, "the machine ([machine])"),
    Option("device", list, [], "the devices ([[device]])"),
    Option("run", dict, {}, "the main job ([run])"),
    Option("peer", list, [], "back-end processes the command starts ([[peer]])"),
)

PEER = OptionSchema(
    Option("name", str, REQUIRED, "peer name, unique in the file; a device names it with peer = NAME",
           check=_non_empty),
    Option("kind", str, PeerConfig.kind, "what to start", choices=PEER_KINDS),
    Option("driver", str, PeerConfig.driver, "block node driver", choices=PEER_DRIVERS),
    Option("image", str, PeerConfig.image, 'image file (driver "file"; "": a new sparse file in a '
                                            "temporary directory, removed afterwards)"),
    Option("size", int, PeerConfig.size, "bytes of a new image or of null-co", min=1 << 20, max=1 << 40,
           check=_sectors),
    Option("num_queues", int, PeerConfig.num_queues, "queues of each export (testpmd: of its port)",
           min=1, max=64),
    Option("source", str, PeerConfig.source, 'virtiofsd: the shared directory ("": a new empty one in '
                                              "a temporary directory, removed afterwards)"),
)

MACHINE = OptionSchema(
    Option("memory_mib", int, MachineConfig.memory_mib, "guest memory in MiB",
           min=1, max=MAX_MEMORY_MIB),
)

DEVICE = OptionSchema(
    Option("name", str, REQUIRED, "device name, unique in the machine", check=_non_empty),
    Option("backend", str, REQUIRED, "backend plugin (shadowvmm.backends entry point)"),
    Option("backend_config", dict, {}, "the plugin's options (its OPTIONS)"),
    Option("transport", str, DeviceConfig.transport, "guest transport", choices=TRANSPORTS),
    Option("queue_size", int, DeviceConfig.queue_size, "ring size, a power of 2",
           min=1, max=MAX_QUEUE_SIZE, check=_power_of_2),
    Option("num_queues", int, None, "queues (default: the backend's count)", min=1, max=MAX_QUEUES),
    Option("stop_dialect", str, DeviceConfig.stop_dialect.value, "stop offered to the guest",
           choices=tuple(d.value for d in StopDialect)),
    Option("stop_feature_bit", int, DeviceConfig.stop_feature_bit,
           "feature bit of the stop dialect (reserved bits, no published meaning); required with "
           'stop_dialect = "stop"', min=STOP_FEATURE_BITS.start, max=STOP_FEATURE_BITS.stop - 1),
    Option("ring_state", bool, DeviceConfig.ring_state,
           'offer VIRTIO_F_RING_STATE, the per-queue ring-state registers (stop_dialect = "stop" only)'),
    Option("ring_state_feature_bit", int, None,
           "feature bit of VIRTIO_F_RING_STATE (default: stop_feature_bit + 1)",
           min=STOP_FEATURE_BITS.start, max=STOP_FEATURE_BITS.stop - 1),
    Option("packed", bool, DeviceConfig.packed, "packed rings"),
    Option("vmm_features", int, DeviceConfig.vmm_features,
           "device feature bits the VMM serves itself", check=_vmm_features),
    Option("reconnect", object, "off", 'backend loss policy: "off", "unbounded" or a table'),
    Option("peer", str, DeviceConfig.peer, "a [[peer]] whose socket is the backend's socket option"),
    Option("admin_members", list, [], "names of the devices this owner controls through its admin queue"),
    Option("config_space", dict, {}, "config space the VMM serves for a backend that serves none "
                                     '(vhost-user without CONFIG): device = "fs" with tag, or "net" with mac'),
)

#: ``[device.config_space]`` per device type (v1.4 §5.11.4 virtio_fs_config, §5.1.4 virtio_net_config).
CONFIG_SPACES = {
    "fs": OptionSchema(
        Option("device", str, REQUIRED, "device type"),
        Option("tag", str, REQUIRED, f"the file system tag (1..{FS_TAG_BYTES} bytes)"),
        Option("num_request_queues", int, 1, "request queues", min=1, max=MAX_QUEUES)),
    "net": OptionSchema(
        Option("device", str, REQUIRED, "device type"),
        Option("mac", str, REQUIRED, 'MAC address ("52:54:00:12:34:56"); offer it with vmm_features'),
        Option("mtu", int, 1500, "MTU", min=68, max=65535),
        Option("max_virtqueue_pairs", int, 1, "queue pairs", min=1, max=0x8000)),
}

#: What ``socket`` is while a peer-fed backend_config is validated (the peer gives the real one).
PEER_SOCKET_PLACEHOLDER = "/run/shadowvmm-peer.sock"

_RUN = RunConfig()
RUN = OptionSchema(
    Option("requests", int, _RUN.requests, "random writes of the main job", min=1, max=10**9),
    Option("queue_depth", int, _RUN.queue_depth, "requests in flight per queue", min=1, max=MAX_QUEUE_SIZE),
    Option("request_bytes", int, _RUN.request_bytes, "bytes per request, a multiple of 512",
           min=512, max=64 << 10, check=_sectors),
    Option("stop_after", int, _RUN.stop_after, "completions before the transparent stop", min=0),
    Option("stop_hold_ms", float, _RUN.stop_hold_ms, "how long the backend stays stopped",
           min=0, max=60_000),
    Option("seed", int, _RUN.seed, "workload seed", min=-(1 << 63), max=(1 << 63) - 1),
    Option("verify", bool, _RUN.verify, "blk: compare the read-back with what was written "
           "(false for a null-co disk, which reads zeroes)"),
    Option("files", int, _RUN.files, "virtio-fs: files created, read back and unlinked", min=1, max=10**6),
    Option("file_bytes", int, _RUN.file_bytes, "virtio-fs: bytes per file", min=1, max=16 << 20),
    Option("frames", int, _RUN.frames, "virtio-net: frames sent and expected back", min=1, max=10**8),
)


def _config_space(table: dict[str, Any], path: str) -> bytes | None:
    """``[device.config_space]`` packed, or None when the table is empty."""
    if not table:
        return None
    kind = table.get("device")
    if not isinstance(kind, str) or kind not in CONFIG_SPACES:
        raise ConfigError(f"{path}.device", f"expected one of {', '.join(map(repr, CONFIG_SPACES))}, got {kind!r}")
    values = CONFIG_SPACES[kind].validate(table, path)
    try:
        if kind == "fs":
            return FsConfig(values["tag"], values["num_request_queues"]).pack(FS_CONFIG_BASE_SIZE)
        return NetConfig(mac=NetConfig.parse_mac(values["mac"]), mtu=values["mtu"],
                         max_virtqueue_pairs=values["max_virtqueue_pairs"]).pack(NET_CONFIG_BASE_SIZE)
    except (ArgumentError, ValueError) as exc:
        if kind == "fs":
            raise ConfigError(f"{path}.tag", str(exc)) from None
        raise ConfigError(f"{path}.mac", f'expected six hex bytes such as "52:54:00:12:34:56", got '
                                         f"{values['mac']!r} ({exc})") from None


def plugin_options(name: str, key: str) -> OptionSchema | None:
    """The options backend *name* declares (``OPTIONS`` on its factory); None if it declares
    none or fails to load (running the config reports why). An unregistered name is a
    ConfigError for *key*."""
    registered = plugins.available_backends()
    if name not in registered:
        raise ConfigError(key, f"no backend named {name!r} (registered: {', '.join(sorted(registered)) or 'none'})")
    try:
        factory = plugins.load_backend(name)
    except PluginError:
        return None
    options = getattr(factory, "OPTIONS", None)
    return options if isinstance(options, OptionSchema) else None


def _device(table: Any, path: str) -> DeviceConfig:
    values = DEVICE.validate(table, path)
    schema = plugin_options(values["backend"], f"{path}.backend")
    if values["peer"] and "socket" in values["backend_config"]:
        raise ConfigError(f"{path}.backend_config.socket", f"given twice: the device's peer "
                                                           f"{values['peer']!r} supplies it")
    if schema is not None:
        placeholder = {"socket": PEER_SOCKET_PLACEHOLDER} if values["peer"] else {}
        schema.validate({**values["backend_config"], **placeholder}, f"{path}.backend_config")
    dialect = StopDialect(values["stop_dialect"])
    if dialect is StopDialect.STOP and "stop_feature_bit" not in table:
        raise ConfigError(f"{path}.stop_feature_bit",
                          'required with stop_dialect = "stop": the 2021 STOP proposal has no assigned bit, and '
                          "44-49 are reserved by virtio 1.4 §6 (a future spec may assign them): name the bit "
                          "to opt in to using one")
    config = DeviceConfig(
        name=values["name"], backend=values["backend"], backend_config=dict(values["backend_config"]),
        transport=values["transport"], queue_size=values["queue_size"], num_queues=values["num_queues"],
        stop_dialect=dialect, stop_feature_bit=values["stop_feature_bit"],
        packed=values["packed"], ring_state=values["ring_state"],
        ring_state_feature_bit=values["ring_state_feature_bit"], vmm_features=values["vmm_features"],
        reconnect=ReconnectPolicy.parse(values["reconnect"], f"{path}.reconnect"), peer=values["peer"],
        admin_members=_admin_members(values["admin_members"], f"{path}.admin_members"),
        config_space=_config_space(values["config_space"], f"{path}.config_space"))
    try:
        config.dialect_spec()
    except ConfigError as exc:
        raise ConfigError(f"{path}.{exc.key.removeprefix('device.')}", exc.message) from None
    return config


def _peers(tables: list[Any], devices: list[DeviceConfig]) -> tuple[PeerConfig, ...]:
    peers: list[PeerConfig] = []
    for index, table in enumerate(tables):
        values = PEER.validate(table, f"peer[{index}]")
        if any(p.name == values["name"] for p in peers):
            raise ConfigError(f"peer[{index}].name", f"duplicate peer name {values['name']!r}")
        if values["source"] and values["kind"] != "virtiofsd":
            raise ConfigError(f"peer[{index}].source",
                              f"only a virtiofsd peer shares a directory, not {values['kind']!r}")
        if values["image"] and values["driver"] != "file":
            raise ConfigError(f"peer[{index}].image", f"an image needs driver \"file\", not {values['driver']!r}")
        peers.append(PeerConfig(**values))
    names = {p.name for p in peers}
    for index, device in enumerate(devices):
        if device.peer and device.peer not in names:
            raise ConfigError(f"device[{index}].peer", f"no [[peer]] named {device.peer!r} "
                                                       f"(defined: {', '.join(sorted(names)) or 'none'})")
    return tuple(peers)


def _admin_members(value: list[Any], key: str) -> tuple[str, ...]:
    if not all(isinstance(name, str) and name.strip() for name in value):
        raise ConfigError(key, "expected a list of device names")
    if len(set(value)) != len(value):
        raise ConfigError(key, "names a device twice")
    return tuple(value)


def check_admin_groups(devices: tuple[DeviceConfig, ...]) -> None:
    """Owners and members (v1.4 §2.12): both PCI, members are other devices of the machine,
    each with one owner at most. Raises ConfigError naming the bad key."""
    index = {d.name: i for i, d in enumerate(devices)}
    owner_of: dict[str, str] = {}
    for i, d in enumerate(devices):
        if not d.admin_members:
            continue
        key = f"device[{i}].admin_members"
        if d.transport != "pci":
            raise ConfigError(key, f"{d.name!r} uses {d.transport}: an admin queue exists on PCI only "
                                   "(v1.4 §2.12, VIRTIO_F_ADMIN_VQ); use transport = \"pci\"")
        for name in d.admin_members:
            if name not in index:
                raise ConfigError(key, f"no device named {name!r} in this machine")
            if name == d.name:
                raise ConfigError(key, "a device cannot be its own member")
            if devices[index[name]].transport != "pci":
                raise ConfigError(key, f"member {name!r} uses {devices[index[name]].transport}: "
                                       "members of an SR-IOV group are PCI devices")
            if name in owner_of:
                raise ConfigError(key, f"{name!r} already belongs to {owner_of[name]!r}")
            owner_of[name] = d.name


def parse(data: Any) -> MachineConfig:
    """Validate a decoded TOML document."""
    top = DOCUMENT.validate(data)
    machine = MACHINE.validate(top["machine"], "machine")
    devices: list[DeviceConfig] = []
    for index, table in enumerate(top["device"]):
        device = _device(table, f"device[{index}]")
        if any(d.name == device.name for d in devices):
            raise ConfigError(f"device[{index}].name", f"duplicate device name {device.name!r}")
        devices.append(device)
    check_admin_groups(tuple(devices))
    return MachineConfig(memory_mib=machine["memory_mib"], devices=tuple(devices),
                         run=RunConfig(**RUN.validate(top["run"], "run")), peers=_peers(top["peer"], devices))


def _read(source: str) -> str:
    try:
        with open(source, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(source, "file not found") from None
    except IsADirectoryError:
        raise ConfigError(source, "is a directory, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(source, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(source, f"larger than {MAX_CONFIG_BYTES >> 10} KiB: not a config file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(source, f"not a UTF-8 text file (byte {raw[exc.start]:#04x} at offset "
                                  f"{exc.start})") from None


_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?$")


def _override_value(text: str) -> Any:
    """A ``--set`` value: a TOML value (``200``, ``true``, ``"x"``), else the text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (ValueError, RecursionError):
        return text


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Set ``KEY.PATH=VALUE`` (``run.requests=200``, ``device[0].queue_size=64``) in a decoded
    document; a missing table is created. ConfigError (key ``--set``) for a malformed one."""
    key, sep, text = assignment.partition("=")
    steps = [_STEP.match(part) for part in key.strip().split(".")]
    if not sep or not key.strip() or not all(steps):
        raise ConfigError("--set", f"expected KEY.PATH=VALUE (run.requests=200, device[0].packed=true), "
                                   f"got {assignment!r}")
    node: Any = data
    for i, match in enumerate(steps):
        assert match is not None
        name, index = match.group(1), match.group(2)
        last = i == len(steps) - 1
        if index is not None:
            items = node.get(name) if isinstance(node, dict) else None
            if not isinstance(items, list) or int(index) >= len(items) or not isinstance(items[int(index)], dict):
                raise ConfigError("--set", f"{key}: the config has no table {name}[{index}]")
            if last:
                raise ConfigError("--set", f"{key}: give a key inside {name}[{index}]")
            node = items[int(index)]
        elif last:
            node[name] = _override_value(text.strip())
        else:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError("--set", f"{key}: {name} is not a table")


def load(path: str | Path, overrides: Sequence[str] = ()) -> MachineConfig:
    """Read and validate a TOML config file (each of *overrides*, ``KEY.PATH=VALUE``, applied
    before validation); every error names the file."""
    source = str(path)
    text = _read(source)
    try:
        data = tomllib.loads(text)
    except ValueError as exc:           # TOMLDecodeError, or an integer past Python's digit limit
        raise ConfigError(source, f"invalid TOML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(source, "invalid TOML: nested too deeply") from exc
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        cfg = parse(data)
    except ConfigError as exc:
        raise exc.located(source) from None
    return replace(cfg, source=source)
