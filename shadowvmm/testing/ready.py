"""A device ready for I/O in one call, with or without pytest (:func:`ready_device`).

Building a device by hand takes a machine, a backend from its plugin, a device config,
the guest driver model for the device type and its initialisation, and knowing that the
backend starts after DRIVER_OK returns. :func:`ready_device` does all of it and yields a
:class:`ReadyDevice` only once everything has happened, within a bound::

    async with vhost_user_ready("/tmp/vhost.sock", "blk") as rd:
        await rd.blk.write(0, b"x" * 4096)
        assert await rd.blk.read(0, 4096) == b"x" * 4096

"Ready" means: the machine is built, the device realized (its backend connected), the
guest driver initialised to DRIVER_OK (virtio v1.4 §3.1.1) and the device's worker has
acted on it, so the backend's rings are running (:meth:`VirtioDevice.settle` was
awaited). On leaving, the driver is closed (virtio-fs: FUSE_DESTROY; net and fs: a device
reset), then the machine with its devices, backends, fds and tasks; a peer passed in is
not stopped (its owner does that). The pytest fixtures in :mod:`shadowvmm.testing.fixtures`
are thin wrappers around this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TypeVar

from ..backends.base import load_backend
from ..config import DeviceConfig
from ..device import VirtioDevice
from ..errors import ArgumentError, DeviceNotReadyError
from ..guest.blk import BlkDriver
from ..guest.driver import GuestDevice
from ..guest.fs import FsDriver
from ..guest.net import NetDriver
from ..guest.rng import RngDriver
from ..lifecycle import ReconnectPolicy
from ..machine import Machine
from ..migration.harness import machine_sharing, move_guest
from ..virtio.constants import NetFeature
from ..virtio.devcfg import FS_CONFIG_BASE_SIZE, NET_CONFIG_BASE_SIZE, FsConfig, NetConfig, NetStatus
from .peers import Peer

Driver = BlkDriver | FsDriver | NetDriver | RngDriver
D = TypeVar("D", BlkDriver, FsDriver, NetDriver, RngDriver)

#: Seconds from the start of the build to a started backend.
READY_TIMEOUT: Final = 10.0
#: Seconds the teardown of the driver may take (FUSE_DESTROY, a device reset).
CLOSE_TIMEOUT: Final = 10.0
#: virtio-fs tag served when the back-end serves no config space (virtiofsd does not).
FS_TAG: Final = "shadowfs"
#: MAC address served when the virtio-net back-end serves no config space (DPDK does not).
NET_MAC: Final = "52:54:00:12:34:56"


@dataclass(frozen=True)
class DeviceKind:
    """What one device type needs: its guest driver, the config space the VMM serves in
    place of a back-end that serves none, and the feature bits the VMM serves with it."""

    driver: Callable[..., Driver]
    config: Callable[[Mapping[str, Any]], bytes | None] = lambda _: None
    vmm_features: int = 0
    packed: bool = True


def _fs_config(options: Mapping[str, Any]) -> bytes:
    return FsConfig(str(options.get("tag", FS_TAG)), 1).pack(FS_CONFIG_BASE_SIZE)


def _net_config(options: Mapping[str, Any]) -> bytes:
    mac = NetConfig.parse_mac(str(options.get("mac", NET_MAC)))
    return NetConfig(mac=mac, status=NetStatus.LINK_UP, max_virtqueue_pairs=1).pack(NET_CONFIG_BASE_SIZE)


DEVICE_KINDS: Final[Mapping[str, DeviceKind]] = MappingProxyType({
    "blk": DeviceKind(BlkDriver),
    "fs": DeviceKind(FsDriver, _fs_config, packed=False),
    "net": DeviceKind(NetDriver, _net_config, int(NetFeature.MAC | NetFeature.STATUS)),
    "rng": DeviceKind(RngDriver),
})
"""Device type -> how :func:`ready_device` builds it (virtio v1.4 §5.2 blk, §5.11 fs, §5.1 net, §5.4 rng)."""


@dataclass(frozen=True)
class ReadyDevice:
    """A device whose backend has started: use :attr:`driver` (or the typed :attr:`blk`,
    :attr:`fs`, :attr:`net`, :attr:`rng`) for guest I/O, :attr:`device` for VMM-side
    operations (``await rd.device.stop()``, ``resume()``), :attr:`guest` for the driver core
    (status, queues), :attr:`peer` for the back-end process when it was launched for you."""

    device_type: str
    machine: Machine
    device: VirtioDevice
    guest: GuestDevice
    driver: Driver
    socket_path: Path | None = None
    peer: Peer | None = None
    #: Options the device was built with (backend and device), for the report.
    options: Mapping[str, Any] = field(default_factory=dict)

    def _typed(self, kind: type[D]) -> D:
        if not isinstance(self.driver, kind):
            raise ArgumentError(f"this is a {self.device_type} device, its driver is a {type(self.driver).__name__}")
        return self.driver

    @property
    def blk(self) -> BlkDriver:
        """The virtio-blk driver (:class:`ArgumentError` for another device type)."""
        return self._typed(BlkDriver)

    @property
    def fs(self) -> FsDriver:
        """The virtio-fs driver, FUSE session initialised."""
        return self._typed(FsDriver)

    @property
    def net(self) -> NetDriver:
        """The virtio-net driver, receive queues filled."""
        return self._typed(NetDriver)

    @property
    def rng(self) -> RngDriver:
        """The virtio-rng driver."""
        return self._typed(RngDriver)


@contextlib.asynccontextmanager
async def ready_device(device_type: str, backend_config: Mapping[str, Any], *, backend: str = "vhost-user",
                       peer: Peer | None = None, socket_path: str | os.PathLike[str] | None = None,
                       transport: str = "pci", queue_size: int = 256, packed: bool = False,
                       memory_bytes: int = 64 << 20, name: str | None = None,
                       start: Mapping[str, Any] | None = None, driver: Mapping[str, Any] | None = None,
                       device_options: Mapping[str, Any] | None = None, vmm_config: bool = True,
                       reconnect: ReconnectPolicy | None = None,
                       timeout: float = READY_TIMEOUT) -> AsyncIterator[ReadyDevice]:
    """Build a *device_type* device on backend plugin *backend* with *backend_config*; yield
    it ready (see the module docstring), close everything on leaving.

    *transport*: ``pci`` or ``mmio``; *queue_size*: the device's queue size; *packed*: offer
    and negotiate packed rings (§2.8); *driver*: keyword arguments of the guest driver's
    constructor (e.g. ``BlkDriver``'s ``max_request``); *start*: those of its ``start()``;
    *device_options*: ``tag`` (fs) or ``mac`` (net) of the config space the VMM serves for
    fs and net (vhost-user back-ends such as virtiofsd and DPDK serve none); *vmm_config*
    False takes the back-end's config space instead (vDPA); *reconnect*: what the device does
    when the back-end's session is lost (default: NEEDS_RESET at once, no reconnect). Raises
    :class:`DeviceNotReadyError` (cause chained) if the device is not ready within *timeout*
    seconds or fails on the way.
    """
    kind = DEVICE_KINDS.get(device_type)
    if kind is None:
        raise ArgumentError(f"unknown device type {device_type!r}; known: {', '.join(DEVICE_KINDS)}")
    if packed and not kind.packed:
        raise ArgumentError(f"the {device_type} driver model has no packed rings")
    name = name or f"{device_type}0"
    extra = dict(device_options or {})
    config = dict(backend_config)
    machine = Machine(memory_bytes)
    model: Driver | None = None
    try:
        try:
            async with asyncio.timeout(timeout):
                device = await machine.add_device(
                    DeviceConfig(name, backend, config, transport=transport, queue_size=queue_size, packed=packed,
                                 vmm_features=kind.vmm_features if vmm_config else 0,
                                 reconnect=reconnect or ReconnectPolicy.off()),
                    load_backend(backend)(config), config_override=kind.config(extra) if vmm_config else None)
                guest = machine.guest(name)
                model = kind.driver(guest, **(driver or {}))
                await model.start(**_start_options(packed, start))
                await device.settle()
        except TimeoutError as exc:
            raise DeviceNotReadyError(f"{name}: {device_type} device on {backend} not ready within {timeout:g} s"
                                      f"{_peer_note(peer)}") from exc
        except Exception as exc:
            raise DeviceNotReadyError(f"{name}: {device_type} device on {backend} not ready: "
                                      f"{type(exc).__name__}: {exc}{_peer_note(peer)}") from exc
        if device.failure is not None or not device.rings_running:
            raise DeviceNotReadyError(f"{name}: backend did not start (failure: {device.failure})"
                                      f"{_peer_note(peer)}") from device.failure
        yield ReadyDevice(device_type, machine, device, guest, model,
                          None if socket_path is None else Path(socket_path), peer,
                          MappingProxyType({**config, **extra, "transport": transport, "packed": packed}))
    finally:
        try:
            # a failed device (a peer the test killed) is not reset through: it is closed below
            if isinstance(model, FsDriver | NetDriver) and model.dev.queues and machine.slots \
                    and machine.device(name).failure is None:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await model.close()
        finally:
            await machine.close()


def _start_options(packed: bool, start: Mapping[str, Any] | None) -> dict[str, Any]:
    options = dict(start or {})
    if packed:
        options.setdefault("packed", True)
    return options


def _peer_note(peer: Peer | None) -> str:
    if peer is None:
        return ""
    state = "running" if peer.running else f"exited with status {peer.returncode}"
    return f"\n--- {peer.name} ({state}), log tail ---\n{peer.log_tail()}"


def vhost_user_ready(socket_path: str | os.PathLike[str], device_type: str, *, peer: Peer | None = None,
                     **options: Any) -> contextlib.AbstractAsyncContextManager[ReadyDevice]:
    """:func:`ready_device` on the vhost-user plugin for a back-end listening on *socket_path*.

    *options* takes :func:`ready_device`'s keywords (``transport``, ``queue_size``,
    ``packed``, ``memory_bytes``, ``name``, ``driver``, ``start``, ``timeout``, ``reconnect``), ``tag`` and
    ``mac`` for the config space the VMM serves, and every other key as a vhost-user backend
    option (``queues``; ``timeout`` is the ready bound, so the backend's per-request
    ``timeout`` is given as ``request_timeout``; see ``shadowvmm_vhost_user.backend``).
    """
    keywords = {k: options.pop(k) for k in _READY_KEYWORDS if k in options}
    device_options: dict[str, Any] = {k: options.pop(k) for k in ("tag", "mac") if k in options}
    if "request_timeout" in options:
        options["timeout"] = options.pop("request_timeout")
    config = {"socket": os.fspath(socket_path), "device": device_type, **options}
    return ready_device(device_type, config, backend="vhost-user", peer=peer, socket_path=socket_path,
                        device_options=device_options, **keywords)


_READY_KEYWORDS: Final = ("transport", "queue_size", "packed", "memory_bytes", "name", "start", "driver", "timeout",
                          "reconnect")


@contextlib.asynccontextmanager
async def migrated(rd: ReadyDevice, socket_path: str | os.PathLike[str], *, peer: Peer | None = None,
                   timeout: float = READY_TIMEOUT) -> AsyncIterator[ReadyDevice]:
    """Move *rd*'s device to the vhost-user back-end on *socket_path*: a local migration (both
    sides map the same guest memory, as ``shadowvmm migrate --mode local``).

    The source stops (its rings drained, GET_VRING_BASE), its state is exported (ring bases,
    the standard part, DEVICE_STATE where negotiated), a destination device on *socket_path*
    imports it and starts its rings from those bases, and the guest's driver moves to it
    without noticing (it reads DRIVER_OK throughout). Yields the destination as a
    :class:`ReadyDevice` with the same :attr:`~ReadyDevice.driver`; it is closed on leaving (the
    source stays stopped, and is closed by its own owner).
    """
    name = rd.device.name
    src = rd.machine.slots[name]
    config = dict(src.config.backend_config)
    config["socket"] = os.fspath(socket_path)
    dst = machine_sharing(rd.machine.memory)
    try:
        async with asyncio.timeout(timeout):
            await rd.device.stop()
            state = await rd.device.export_state(src.transport)
            device = await dst.add_device(replace(src.config, backend_config=config),
                                          load_backend(src.config.backend)(config),
                                          config_override=rd.device.config_override)
            await device.import_state(state, dst.slots[name].transport)
            move_guest(rd.guest, rd.device, device, dst.slots[name].transport)
            await device.settle()
        yield ReadyDevice(rd.device_type, dst, device, rd.guest, rd.driver, Path(socket_path), peer,
                          MappingProxyType({**rd.options, "socket": os.fspath(socket_path)}))
    finally:
        rd.guest.close()        # it takes the destination's interrupts, whose fds close next
        await dst.close()
