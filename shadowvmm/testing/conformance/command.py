"""``shadowvmm check``: the conformance kit as a command, for backend authors.

Two forms::

    shadowvmm check SOCKET --device blk|fs|net [--json] [--migrate-to SOCKET2]
    shadowvmm check --config FILE --name DEVICE [--json] [--migrate-to DEVICE2]

The socket form drives a vhost-user back-end through the ``vhost-user`` backend,
loaded by name through the entry points (the core never imports a plugin); the
config form drives any configured backend (``inproc``, ``faulty`` around another
one, ...). Every step of :data:`~.runner.STEP_NAMES` runs; the table gives each
step's outcome and the spec section it checks. Exit status: 0 when every step
passed or was not offered, 1 when one failed, 2 for a usage or config error.

Before the first connection the listener of a socket is identified from
``/proc/net/unix`` (connecting would use up a one-shot peer's only session): a
peer known to serve one session and exit (virtiofsd) runs every step on one
session; one serving a front-end at a time (qemu-storage-daemon) gets a warning.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from ... import config as configmod
from ...backends.base import Backend, load_backend
from ...backends.peer import socket_listener
from ...errors import ArgumentError, ConfigError
from ...options import seconds_argument
from .rig import Factory
from .runner import run_conformance
from .workloads import device_id_of

__all__ = ["COMMAND", "CheckCommand", "PeerInfo", "identify_listener", "peer_info"]

#: The backend the socket form loads (an entry point of the ``shadowvmm.backends`` group).
SOCKET_BACKEND = "vhost-user"
SOCKET_DEVICES = ("blk", "fs", "net")


@dataclass(frozen=True)
class KnownPeer:
    """What a peer, known by its process name, does with sessions."""

    prefix: str             #: of ``/proc/PID/comm`` (15 characters at most)
    one_shot: bool          #: serves one session, then exits
    note: str


KNOWN_PEERS: tuple[KnownPeer, ...] = (
    KnownPeer("virtiofsd", True, "virtiofsd serves one session and exits after it"),
    KnownPeer("vhost-user-gpu", True, "vhost-user-gpu serves one session and exits after it"),
    KnownPeer("qemu-storage", False, "qemu-storage-daemon serves one front-end at a time per export: "
                                     "the steps open their sessions one after another, and the migration "
                                     "destination must be another export"),
    KnownPeer("dpdk-testpmd", False, "dpdk-testpmd serves one front-end at a time per vhost port"),
)


@dataclass(frozen=True)
class PeerInfo:
    """Who listens on a socket, and the session warning that goes with it."""

    pid: int | None
    name: str | None
    one_shot: bool
    warning: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "process": self.name, "one_shot": self.one_shot, "warning": self.warning}


def identify_listener(path: str) -> tuple[int, str] | None:
    """(pid, process name as in ``/proc/PID/comm``) of the process listening on *path*, without
    connecting to it (:func:`shadowvmm.backends.peer.socket_listener`); None when it cannot be told."""
    found = socket_listener(path)
    return None if found is None else (found.pid, found.comm)


def peer_info(path: str, device: str, *, single_session: bool = False) -> PeerInfo:
    """What :func:`identify_listener` finds, matched against :data:`KNOWN_PEERS`; an unknown
    virtio-fs peer is taken as one-shot (virtiofsd in C and Rust exit after their session)."""
    found = identify_listener(path)
    pid, name = found if found is not None else (None, None)
    for known in KNOWN_PEERS:
        if name is not None and name.startswith(known.prefix):
            one_shot = known.one_shot or single_session
            return PeerInfo(pid, name, one_shot, known.note)
    if single_session:
        return PeerInfo(pid, name, True, "single session requested (--single-session)")
    if device == "fs":
        who = f"{name} (pid {pid})" if name else "an unidentified peer"
        return PeerInfo(pid, name, True, f"{who} serving virtio-fs is taken as one-shot (virtiofsd exits "
                                         f"after its session): every step runs on one session")
    return PeerInfo(pid, name, False, None)


def _factory(name: str, config: Mapping[str, Any]) -> Factory:
    build = load_backend(name)

    def make() -> Backend:
        return build(config)
    return make


def _socket_backend(socket: str, args: argparse.Namespace) -> dict[str, Any]:
    config = {"socket": socket, "device": args.device, "timeout": args.timeout}
    return config if args.queues is None else {**config, "queues": args.queues}


async def _socket_form(args: argparse.Namespace) -> tuple[str, dict[str, Any], PeerInfo]:
    """(device type, run_conformance options, peer) of ``check SOCKET --device ...``."""
    if args.device is None:
        raise ArgumentError(f"check SOCKET needs --device ({'|'.join(SOCKET_DEVICES)})")
    if args.name is not None:
        raise ArgumentError("--name goes with --config")
    if not os.path.exists(args.socket):
        raise ArgumentError(f"no socket at {args.socket}")
    peer = peer_info(args.socket, args.device, single_session=args.single_session)
    options: dict[str, Any] = {"net_echo": args.device == "net"}
    if args.migrate_to is not None:
        if os.path.abspath(args.migrate_to) == os.path.abspath(args.socket):
            raise ArgumentError("--migrate-to must name another socket than the one checked")
        options["migrate_factory"] = _factory(SOCKET_BACKEND,
                                              _socket_backend(args.migrate_to, args))
    options["factory"] = _factory(SOCKET_BACKEND, _socket_backend(args.socket, args))
    await options["factory"]().close()      # its options refused now are a usage error, not a step's
    if peer.one_shot:
        options["single_session"] = peer.warning
    return args.device, options, peer


async def _config_form(args: argparse.Namespace) -> tuple[str, dict[str, Any], PeerInfo]:
    """(device type, run_conformance options, peer) of ``check --config FILE --name DEVICE``."""
    if args.name is None:
        raise ArgumentError("check --config FILE needs --name DEVICE")
    cfg = configmod.load(args.config)
    devices = {dev.name: (index, dev) for index, dev in enumerate(cfg.devices)}
    if args.name not in devices:
        raise cfg.error("device", f"no device named {args.name!r} (configured: {', '.join(devices) or 'none'})")
    index, dev = devices[args.name]
    try:
        backend = load_backend(dev.backend)(dev.backend_config)
    except ConfigError as exc:
        raise cfg.backend_error(index, exc) from exc
    await backend.close()       # built for its device type only (a backend takes it from its config)
    device = backend.device_id.name.lower() if args.device is None else args.device
    if device_id_of(device) is not backend.device_id:
        raise ArgumentError(f"--device {device}, but {args.name} is a {backend.device_id.name} device")
    options: dict[str, Any] = {"factory": _factory(dev.backend, dev.backend_config), "transport": dev.transport,
                               "queue_size": min(dev.queue_size, 256), "packed": dev.packed,
                               "memory_mib": max(cfg.memory_mib, 32), "net_echo": device == "net"}
    if args.migrate_to is not None:
        if args.migrate_to not in devices or args.migrate_to == args.name:
            raise cfg.error("device", f"--migrate-to {args.migrate_to!r}: name another configured device")
        target = devices[args.migrate_to][1]
        options["migrate_factory"] = _factory(target.backend, target.backend_config)
    peer = PeerInfo(None, None, args.single_session,
                    "single session requested (--single-session)" if args.single_session else None)
    if peer.one_shot:
        options["single_session"] = peer.warning
    return device, options, peer


EXAMPLES = """examples:
  shadowvmm check /run/qsd/blk0.sock --device blk --queues 2
  shadowvmm check /run/qsd/blk0.sock --device blk --migrate-to /run/qsd/blk1.sock --json
  shadowvmm check /run/virtiofsd.sock --device fs
  shadowvmm check --config configs/default.toml --name blk0
"""


class CheckCommand:
    """``shadowvmm check``: see the module docstring."""

    help = "run the backend conformance kit against a vhost-user socket or a configured device"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.epilog = EXAMPLES
        parser.add_argument("socket", nargs="?", help="a vhost-user back-end's unix socket")
        parser.add_argument("--device", choices=SOCKET_DEVICES, help="the device type behind SOCKET")
        parser.add_argument("--config", help="a machine config (TOML) naming the device to check")
        parser.add_argument("--name", help="the device of --config to check")
        parser.add_argument("--migrate-to", metavar="SOCKET2",
                            help="migrate to this second socket (with --config: another device's name)")
        parser.add_argument("--queues", type=int, help="queues the socket's backend serves (default: the "
                                                       "device type's minimum); the queues step uses each")
        parser.add_argument("--json", action="store_true", help="print the report as JSON")
        parser.add_argument("--single-session", action="store_true",
                            help="run every step on one session (a peer that exits after its session)")
        parser.add_argument("--timeout", type=seconds_argument, default=10.0,
                            help="seconds per request and per I/O round trip (default 10)")

    async def run(self, args: argparse.Namespace, out: TextIO) -> int:
        if (args.socket is None) == (args.config is None):
            raise ArgumentError("check takes a SOCKET or --config FILE --name DEVICE (one of them)")
        form = _socket_form if args.socket is not None else _config_form
        device, options, peer = await form(args)
        factory = options.pop("factory")
        report = await run_conformance(factory, device, io_timeout=args.timeout,
                                       step_timeout=max(60.0, 6 * args.timeout), **options)
        if peer.warning and not peer.one_shot:
            report.warnings.insert(0, peer.warning)
        if args.json:
            document = report.to_dict()
            document["target"] = args.socket or f"{args.config}:{args.name}"
            document["peer"] = peer.to_dict()
            print(json.dumps(document, indent=2, ensure_ascii=False), file=out)
        else:
            print(report.format(), file=out)
        return 1 if report.failed else 0


COMMAND = CheckCommand()
