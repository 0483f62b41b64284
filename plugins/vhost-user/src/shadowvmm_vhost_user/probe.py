"""Control-plane probe of a vhost-user back-end (what ``shadowvmm probe`` prints).

The probe opens a session and negotiates like the realize handshake, minus
SET_OWNER and the back-end channel: GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
GET_QUEUE_NUM (MQ), GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS), GET_CONFIG
(CONFIG). A one-shot back-end (virtiofsd, vhost-user-gpu) exits after the probe
disconnects: the probe *is* its session.

Before connecting, the probe looks up the process listening on the socket (``/proc/net/unix``
and ``/proc/PID/fd``, no connection): it names the device bits for the peer's device type when
``--device`` is not given (qemu-storage-daemon: blk, virtiofsd: fs, dpdk-testpmd: net), refuses
(:class:`~shadowvmm.errors.ProbeRefused`) to use up a one-shot back-end's session unless forced
(virtiofsd, or ``--device fs``), and says that qemu-storage-daemon serves one front-end at a time
(a probe of an export a VMM holds waits, then times out: the error says why).
"""

from __future__ import annotations

import argparse
import enum
import json
import os
from pathlib import Path
from typing import Any, TextIO

from shadowvmm.backends.peer import socket_listener as find_listener
from shadowvmm.errors import BackendTimeout, ProbeRefused
from shadowvmm.options import seconds_argument
from shadowvmm.virtio.constants import BlkFeature, DeviceId, FsFeature, NetFeature, feature_names

from . import protocol as vu
from .connection import DEFAULT_TIMEOUT, Connection, Connector, RequestFailed, unix_connector
from .devices import DEFAULT_CONFIG_SIZE, DEVICES, SUPPORTED_PROTOCOL_FEATURES

#: Config sizes tried, largest first, when neither the device nor a size is given.
CONFIG_SIZE_CANDIDATES = (vu.MAX_CONFIG_SIZE, 128, 64, 60, 44, 40, 36, 24, 16, 12, 8, 4)

_DEVICE_FLAGS: dict[DeviceId, tuple[type[enum.IntFlag], ...]] = {
    DeviceId.BLOCK: (BlkFeature,), DeviceId.NET: (NetFeature,), DeviceId.FS: (FsFeature,),
}
_VHOST_NAMES = {vu.F_PROTOCOL_FEATURES: "PROTOCOL_FEATURES", vu.F_LOG_ALL: "LOG_ALL"}

#: Known peers (by executable name): the device type they serve.
PEER_DEVICES = {"qemu-storage-daemon": "blk", "virtiofsd": "fs", "dpdk-testpmd": "net"}
#: Device types whose back-ends serve one session and exit after it.
ONE_SHOT_DEVICES = ("fs",)
ONE_SHOT = ("virtiofsd serves one front-end session and exits when it ends: the probe would be "
            "that session. Pass --force to probe anyway (then start virtiofsd again), or probe a "
            "virtiofsd started for the purpose")
ONE_AT_A_TIME = ("qemu-storage-daemon serves one front-end at a time per export: while a VMM is "
                 "connected a probe waits for it, and times out")
def socket_listener(path: str | os.PathLike[str], proc: Path = Path("/proc")) -> dict[str, Any] | None:
    """The process listening on unix socket *path* ({"pid", "name"}), found without connecting
    (:func:`shadowvmm.backends.peer.socket_listener`); None when it cannot be told."""
    found = find_listener(path, proc)
    return None if found is None else {"pid": found.pid, "name": found.name}


def protocol_feature_names(value: int) -> list[str]:
    """Names of the protocol feature bits in *value* (``bit N`` when unnamed)."""
    names = []
    for bit in range(64):
        if value >> bit & 1:
            try:
                member = vu.ProtocolFeature(1 << bit)
            except ValueError:
                member = None
            names.append(member.name if member is not None and member.name else f"bit {bit}")
    return names


async def _read_config(conn: Connection, sizes: tuple[int, ...]) -> dict[str, Any] | None:
    for size in sizes:
        try:
            reply = await conn.request(vu.FrontendRequest.GET_CONFIG, vu.Config.read(0, size))
        except RequestFailed:
            continue
        if isinstance(reply.payload, vu.Config):
            return {"offset": 0, "size": size, "hex": reply.payload.payload.hex()}
    return None


def _plan(path: str | os.PathLike[str], device: str | None, force: bool,
          listener: dict[str, Any] | None) -> tuple[str | None, list[str]]:
    """The device type to name bits for and the notes to report; ProbeRefused for a one-shot peer."""
    notes: list[str] = []
    name = listener["name"] if listener else ""
    if device is None and name in PEER_DEVICES:
        device = PEER_DEVICES[name]
        notes.append(f"device type {device} assumed from the listening process ({name}); --device overrides")
    elif device is None:
        notes.append("device type unknown: device feature bits are shown by number (give --device blk|fs|net)")
    if (name == "virtiofsd" or device in ONE_SHOT_DEVICES) and not force:
        raise ProbeRefused(f"{os.fspath(path)}: {ONE_SHOT}")
    if name == "virtiofsd" or device in ONE_SHOT_DEVICES:
        notes.append("forced: this probe was the one-shot back-end's session; it has exited or will exit now")
    if name == "qemu-storage-daemon":
        notes.append(ONE_AT_A_TIME)
    return device, notes


async def probe(path: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT, *, device: str | None = None,
                config_size: int | None = None, connector: Connector | None = None,
                force: bool = False, identify: bool = True) -> dict[str, Any]:
    """Negotiate with the back-end at *path* and describe it.

    *device* (a key of :data:`~.backend.DEVICES`) names device feature bits and
    picks the config size; *config_size* overrides it. Without either, GET_CONFIG
    is tried with :data:`CONFIG_SIZE_CANDIDATES` until one is accepted.
    With *identify*, the listening process is looked up first (:func:`socket_listener`): it
    picks the device type when none is given, and a one-shot back-end (virtiofsd, or *device*
    ``fs``) raises ProbeRefused unless *force*. Raises the connection's typed errors
    (BackendTimeout, with the one-front-end-at-a-time hint for qemu-storage-daemon,
    BackendDisconnected, ProtocolError, ...).
    """
    listener = socket_listener(path) if identify and connector is None else None
    device, notes = _plan(path, device, force, listener) if identify else (device, [])
    device_id = DEVICES[device] if device is not None else None
    if config_size is not None:
        sizes: tuple[int, ...] = (config_size,)
    elif device_id is not None:
        sizes = (DEFAULT_CONFIG_SIZE.get(device_id, 0),)
    else:
        sizes = CONFIG_SIZE_CANDIDATES
    sizes = tuple(size for size in sizes if size > 0)
    conn = Connection(connector or unix_connector(path), timeout=timeout, name=f"probe {os.fspath(path)}")
    result: dict[str, Any] = {"socket": os.fspath(path), "device": device, "listener": listener, "notes": notes}
    try:
        await _negotiate(conn, result, device_id, sizes)
    except BackendTimeout as exc:
        if listener is not None and listener["name"] == "qemu-storage-daemon":
            raise BackendTimeout(f"{exc}: {ONE_AT_A_TIME}") from exc
        raise
    return result


async def _negotiate(conn: Connection, result: dict[str, Any], device_id: DeviceId | None,
                     sizes: tuple[int, ...]) -> None:
    await conn.connect()
    try:
        features = (await conn.request(vu.FrontendRequest.GET_FEATURES)).payload
        assert isinstance(features, vu.U64)
        virtio = features.value & ~vu.VHOST_ONLY_FEATURES
        flag_types = _DEVICE_FLAGS.get(device_id, ()) if device_id is not None else ()
        result.update(
            features=features.value,
            virtio_features=virtio,
            feature_names=feature_names(virtio, *flag_types),
            vhost_features=[name for bit, name in _VHOST_NAMES.items() if features.value & bit],
            protocol_features=None,
            protocol_feature_names=[],
            acked_protocol_features=0,
            queue_num=None,
            max_mem_slots=None,
            config=None,
        )
        if features.value & vu.F_PROTOCOL_FEATURES:
            offered = (await conn.request(vu.FrontendRequest.GET_PROTOCOL_FEATURES)).payload
            assert isinstance(offered, vu.U64)
            acked = int(vu.ProtocolFeature(offered.value) & SUPPORTED_PROTOCOL_FEATURES)
            await conn.request(vu.FrontendRequest.SET_PROTOCOL_FEATURES, vu.U64(acked))
            result.update(protocol_features=offered.value,
                          protocol_feature_names=protocol_feature_names(offered.value),
                          acked_protocol_features=acked)
        protocol = conn.protocol_features
        if vu.ProtocolFeature.MQ in protocol:
            reply = (await conn.request(vu.FrontendRequest.GET_QUEUE_NUM)).payload
            assert isinstance(reply, vu.U64)
            result["queue_num"] = reply.value
        if vu.ProtocolFeature.CONFIGURE_MEM_SLOTS in protocol:
            reply = (await conn.request(vu.FrontendRequest.GET_MAX_MEM_SLOTS)).payload
            assert isinstance(reply, vu.U64)
            result["max_mem_slots"] = reply.value
        if vu.ProtocolFeature.CONFIG in protocol and sizes:
            result["config"] = await _read_config(conn, sizes)
    finally:
        await conn.disconnect()


def format_probe(info: dict[str, Any]) -> str:
    """Human-readable text of a :func:`probe` result."""
    lines = [f"vhost-user back-end at {info['socket']}" + (f" ({info['device']})" if info.get("device") else "")]
    if info.get("listener"):
        lines.append(f"  listener           {info['listener']['name']} (pid {info['listener']['pid']})")
    lines.append(f"  features           {info['features']:#x}")
    lines.append(f"    virtio           {', '.join(info['feature_names']) or '-'}")
    lines.append(f"    vhost            {', '.join(info['vhost_features']) or '-'}")
    if info["protocol_features"] is None:
        lines.append("  protocol features  not offered (no VHOST_USER_F_PROTOCOL_FEATURES)")
    else:
        lines.append(f"  protocol features  {info['protocol_features']:#x}: "
                     f"{', '.join(info['protocol_feature_names']) or '-'}")
        lines.append(f"    acknowledged     {info['acked_protocol_features']:#x}")
    for key, label in (("queue_num", "queues (max)"), ("max_mem_slots", "memory slots")):
        lines.append(f"  {label:<18} {info[key] if info[key] is not None else '-'}")
    config = info["config"]
    if config is None:
        lines.append("  config             -")
    else:
        lines.append(f"  config             {config['size']} bytes at offset {config['offset']}")
        data = config["hex"]
        for start in range(0, len(data), 32):
            chunk = data[start:start + 32]
            lines.append(f"    {start // 2:04x}  {' '.join(chunk[i:i + 2] for i in range(0, len(chunk), 2))}")
    lines += [f"  note: {note}" for note in info.get("notes", ())]
    return "\n".join(lines)


class ProbeCommand:
    """``shadowvmm probe SOCKET``: the control-plane probe as a CLI command (``shadowvmm.commands``)."""

    help = "probe a vhost-user backend socket: features by name, protocol features, queues, config"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.description = (
            "Probe a vhost-user back-end: its features by name, protocol features, queues, memory "
            "slots and config space. The process listening on SOCKET is looked up first, without "
            "connecting: its device type (qemu-storage-daemon: blk, virtiofsd: fs, dpdk-testpmd: "
            "net) names the device feature bits unless --device is given.\n\n"
            "virtiofsd serves one session and exits when it ends, so a probe would use it up: "
            "probe refuses (exit 2) unless --force, also for --device fs. qemu-storage-daemon "
            "serves one front-end at a time per export: while a VMM holds the export a probe "
            "waits, then times out, and says why.")
        parser.epilog = ("examples:\n  shadowvmm probe /run/qsd/blk0.sock\n"
                         "  shadowvmm probe --device net --json /tmp/testpmd.sock\n"
                         "  shadowvmm probe --device fs --force /tmp/virtiofsd.sock   # uses up its session")
        parser.add_argument("socket", help="the back-end's unix socket")
        parser.add_argument("--device", choices=sorted(DEVICES),
                            help="device type whose feature bits to name (default: from the listening process)")
        parser.add_argument("--force", action="store_true",
                            help="probe a one-shot back-end (virtiofsd) although the probe uses up its session")
        parser.add_argument("--json", action="store_true", help="print the report as JSON")
        parser.add_argument("--timeout", type=seconds_argument, default=DEFAULT_TIMEOUT, help="seconds per request")

    async def run(self, args: argparse.Namespace, out: TextIO) -> int:
        info = await probe(args.socket, args.timeout, device=args.device, force=args.force)
        print(json.dumps(info, indent=2) if args.json else format_probe(info), file=out)
        return 0


COMMAND = ProbeCommand()
