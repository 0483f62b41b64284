"""vhost-user backend: the :class:`~shadowvmm.backends.base.Backend` operations over a socket.

The handshake follows what QEMU 7.2 sends at device realize
(``/work/shared/lab/qemu-vhost-user-order.md`` section 1): GET_FEATURES,
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (offered features shadowvmm
implements), GET_QUEUE_NUM (MQ), GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS),
SET_BACKEND_REQ_FD (BACKEND_REQ), SET_OWNER. Everything after that is driven
one-to-one by the device layer, which sequences it as QEMU's vhost layer does.

vhost-only feature bits stay in here: bit 30 (``VHOST_USER_F_PROTOCOL_FEATURES``)
is added to every SET_FEATURES when the back-end offered it, and bit 26
(``VHOST_F_LOG_ALL``) is switched by :meth:`VhostUserBackend.set_dirty_logging`;
neither is reported by :meth:`~VhostUserBackend.get_features`. Nor is
``VIRTIO_F_ACCESS_PLATFORM``: without a vIOMMU shadowvmm cannot answer IOTLB
misses, and ring addresses are sent as front-end user addresses ("Memory
access": without IOMMU_PLATFORM they are user addresses), translated from the
GPAs of :class:`~shadowvmm.backends.base.VringAddr` through the guest memory
last given to :meth:`~VhostUserBackend.set_mem_table`.

Reset: with RESET_DEVICE negotiated :meth:`~VhostUserBackend.reset` sends it.
Otherwise it does what QEMU does on every stop and guest reset (trace section
3): SET_VRING_ENABLE 0 for every enabled ring, then GET_VRING_BASE for every
started ring, one at a time in index order, then SET_STATUS 0 with STATUS.
RESET_OWNER is never sent: the spec deprecates it and back-ends disagree on
what it means.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import mmap
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shadowvmm.backends.base import (
    BackendBase,
    BackendEvent,
    BackendEventHandler,
    BackendEventKind,
    Capability,
    PeerIdentity,
    RingState,
    VringAddr,
)
from shadowvmm.errors import (
    ArgumentError,
    BackendDisconnected,
    ConfigError,
    DeviceStateError,
    ProtocolError,
    UnsupportedError,
)
from shadowvmm.memory import GuestMemory
from shadowvmm.options import MAX_QUEUES, REQUIRED, Option, OptionSchema
from shadowvmm.virtio.constants import Feature

from . import protocol as vu
from . import transfer
from .connection import (
    DEFAULT_TIMEOUT,
    BackendMessage,
    Connection,
    Connector,
    Reply,
    RequestFailed,
    Runstate,
    close_fds,
    process_has_memory,
    unix_connector,
    wait_for_path,
)
from .devices import DEFAULT_CONFIG_SIZE, DEFAULT_QUEUES, DEVICES, HIDDEN_FEATURES, SUPPORTED_PROTOCOL_FEATURES
from .peer import identify, process_name
from .refbackend.inflight import INFLIGHT_DESC, INFLIGHT_HEADER, inflight_queue_bytes

__all__ = ["DEFAULT_CONFIG_SIZE", "DEFAULT_QUEUES", "DEVICES", "HIDDEN_FEATURES", "SUPPORTED_PROTOCOL_FEATURES",
           "VhostUserBackend"]

log = logging.getLogger(__name__)

FR = vu.FrontendRequest
PF = vu.ProtocolFeature

#: Capabilities of every session, whatever was negotiated.
BASE_CAPABILITIES = (Capability.RING_RESTART | Capability.RECONNECT | Capability.EVENTS | Capability.BUSY_POLL
                     | Capability.PEER_IDENTITY)
#: Protocol features and the capability each one brings.
PROTOCOL_CAPABILITIES: tuple[tuple[vu.ProtocolFeature, Capability], ...] = (
    (PF.CONFIG, Capability.CONFIG), (PF.STATUS, Capability.STATUS), (PF.RESET_DEVICE, Capability.RESET_DEVICE),
    (PF.DEVICE_STATE, Capability.DEVICE_STATE), (PF.INFLIGHT_SHMFD, Capability.INFLIGHT), (PF.MQ, Capability.MQ),
)


#: Peer processes (``/proc/PID/comm``, 15 characters at most) whose libvhost-user keeps
#: processing a ring after SET_VRING_ENABLE 0 (qemu-storage-daemon 7.2, QEMU's contrib daemons).
RING_DISABLE_IGNORED = frozenset({"qemu-storage-da", "vhost-user-blk", "vhost-user-scsi"})
#: Peer processes whose vhost library treats GET_VRING_BASE on one ring as the stop of the whole
#: device (DPDK's ``vhost_user_get_vring_base`` destroys the device): a single ring cannot be
#: stopped and restarted under a running device, so VIRTIO_F_RING_RESET is not offered.
RING_RESTART_UNSUPPORTED = frozenset({"dpdk-testpmd", "ovs-vswitchd"})


class VhostUserBackend(BackendBase):
    """A vhost-user back-end reached over a unix socket.

    *config* keys: ``socket`` (path, required), ``device`` (one of
    :data:`DEVICES`, required), ``timeout`` (seconds per request, default 5),
    ``queues`` (queue count; must not exceed GET_QUEUE_NUM with MQ),
    ``config_size`` (config bytes served, default per device type),
    ``protocol_features`` (mask further restricting what is acknowledged) and
    ``busy_poll_us`` (spin up to this long for each reply before sleeping, default 0;
    :meth:`set_busy_poll` changes it at run time, as migration does for its downtime).
    Other keys are refused (:attr:`OPTIONS`). *connector* replaces the unix-socket connector.
    """

    implementation = "vhost-user"
    implementation_version = 1
    OPTIONS = OptionSchema(
        Option("socket", Path, REQUIRED, "the back-end's unix socket"),
        Option("device", str, REQUIRED, "virtio device type", choices=tuple(sorted(DEVICES))),
        Option("timeout", float, DEFAULT_TIMEOUT, "seconds per request", max=86_400,
               check=lambda value: None if value > 0 else "must be a positive number of seconds"),
        Option("queues", int, None, "queues (default: the device type's minimum, else GET_QUEUE_NUM)",
               min=1, max=MAX_QUEUES),
        Option("config_size", int, None, "config bytes served (default: per device type)",
               min=0, max=vu.MAX_CONFIG_SIZE),
        Option("protocol_features", int, None, "mask restricting the protocol features acknowledged",
               min=0, max=(1 << 64) - 1),
        Option("busy_poll_us", int, 0, "spin this long for each reply before sleeping", min=0, max=100_000),
        Option("ring_disable", str, "auto", "whether the back-end stops fetching from a disabled ring: "
               "\"stops\", \"ignored\" (libvhost-user) or \"auto\" (known peers by process name)",
               choices=("auto", "stops", "ignored")),
        Option("ring_restart", str, "auto", "whether one ring can be stopped and restarted under a running "
               "device (VIRTIO_F_RING_RESET): \"yes\", \"no\" or \"auto\" (no for DPDK peers by process name)",
               choices=("auto", "yes", "no")),
    )

    def __init__(self, config: Mapping[str, Any], *, loop: asyncio.AbstractEventLoop | None = None,
                 connector: Connector | None = None) -> None:
        options = self.OPTIONS.validate(config)
        self.socket_path = options["socket"]
        self.device_id = DEVICES[options["device"]]
        self.timeout = options["timeout"]
        self._queues = options["queues"]
        self._config_size = options["config_size"]
        mask = options["protocol_features"]
        self._protocol_mask = PF(int(SUPPORTED_PROTOCOL_FEATURES) & (mask if mask is not None else -1))
        self._loop = loop
        self._connector = connector or unix_connector(self.socket_path)
        self.busy_poll = options["busy_poll_us"] / 1e6
        self._ring_disable = options["ring_disable"]
        self._ring_restart = options["ring_restart"]
        self._conn: Connection | None = None
        #: The inflight area (GET_INFLIGHT_FD) and its fd: kept across sessions, dropped by reset().
        self._inflight: tuple[vu.Inflight, int] | None = None
        #: A read-only map of that area, for :meth:`in_flight`.
        self._inflight_map: mmap.mmap | None = None
        #: (pid, /proc/PID/comm) of the peer last asked about (:meth:`disable_stops_fetch`).
        self._peer_name: tuple[int, str | None] | None = None
        self._reset_session()

    def _reset_session(self) -> None:
        self._offered = 0
        self._acked = 0
        self._log_all = False
        self._queue_num: int | None = None
        self._max_mem_slots: int | None = None
        self._memory: GuestMemory | None = None
        self._sent_regions: set[vu.MemRegion] = set()
        self._vring_num: dict[int, int] = {}
        self._kicked: set[int] = set()
        self._enabled: set[int] = set()

    def __repr__(self) -> str:
        state = self._conn.runstate.name if self._conn is not None else "IDLE"
        return f"<VhostUserBackend {self.device_id.name.lower()} {self.socket_path} {state}>"

    @property
    def connection(self) -> Connection:
        if self._conn is None:
            raise DeviceStateError(f"vhost-user {self.socket_path}: not connected")
        return self._conn

    def _live(self) -> Connection:
        conn = self.connection
        if conn.runstate is not Runstate.RUNNING:
            raise BackendDisconnected(f"vhost-user {self.socket_path}: connection is {conn.runstate.name}") \
                from conn.error
        return conn

    @property
    def protocol_features(self) -> vu.ProtocolFeature:
        """Protocol features acknowledged on this session."""
        return self._conn.protocol_features if self._conn is not None else PF(0)

    @property
    def backend_features(self) -> int:
        """GET_FEATURES as the back-end answered it, vhost bits included."""
        return self._offered

    @property
    def max_mem_slots(self) -> int | None:
        return self._max_mem_slots

    def capabilities(self) -> Capability:
        """:data:`BASE_CAPABILITIES`, those of the negotiated protocol features
        (:data:`PROTOCOL_CAPABILITIES`), and DIRTY_LOG with LOG_SHMFD and LOG_ALL offered."""
        caps = BASE_CAPABILITIES
        protocol = self.protocol_features
        for feature, cap in PROTOCOL_CAPABILITIES:
            if feature in protocol:
                caps |= cap
        if PF.LOG_SHMFD in protocol and self._offered & vu.F_LOG_ALL:
            caps |= Capability.DIRTY_LOG
        if not self._rings_restart():
            caps &= ~Capability.RING_RESTART
        return caps

    def _rings_restart(self) -> bool:
        """From the ``ring_restart`` option; ``auto``: False for a peer process known to stop the
        whole device at one ring's GET_VRING_BASE (:data:`RING_RESTART_UNSUPPORTED`)."""
        if self._ring_restart != "auto":
            return self._ring_restart == "yes"
        return self._peer_process() not in RING_RESTART_UNSUPPORTED

    def set_busy_poll(self, seconds: float) -> float:
        """Busy-poll each reply for up to *seconds* (0: off); returns the previous setting."""
        previous, self.busy_poll = self.busy_poll, max(0.0, seconds)
        if self._conn is not None:
            self._conn.busy_poll = self.busy_poll
        return previous

    async def connect(self) -> None:
        """Connect and run the realize handshake (module docstring)."""
        if self._conn is not None and self._conn.runstate is Runstate.RUNNING:
            raise DeviceStateError(f"vhost-user {self.socket_path}: already connected")
        self._reset_session()
        self._peer_name = None
        conn = Connection(self._connector, timeout=self.timeout, loop=self._loop,
                          name=f"vhost-user {self.socket_path}",
                          backend_handlers={vu.BackendRequest.CONFIG_CHANGE_MSG: self._on_config_change})
        conn.busy_poll = self.busy_poll
        await conn.connect()
        try:
            await self._handshake(conn)
        except BaseException:
            await conn.disconnect()
            raise
        self._conn = conn
        conn.on_lost = functools.partial(self._on_lost, conn)
        log.info("%s: realized: features %#x, protocol features %#x, queues %s, memory slots %s", conn.name,
                 self._offered, int(conn.protocol_features), self._queue_num, self._max_mem_slots)

    def _on_lost(self, conn: Connection, error: BaseException) -> None:
        if conn is self._conn:
            self.emit(BackendEvent(BackendEventKind.DISCONNECTED, error))

    async def _handshake(self, conn: Connection) -> None:
        self._offered = await self._u64(conn, FR.GET_FEATURES)
        if self._offered & vu.F_PROTOCOL_FEATURES:
            offered = await self._u64(conn, FR.GET_PROTOCOL_FEATURES)
            await conn.request(FR.SET_PROTOCOL_FEATURES, vu.U64(int(PF(offered) & self._protocol_mask)))
        protocol = conn.protocol_features
        if PF.MQ in protocol:
            self._queue_num = await self._u64(conn, FR.GET_QUEUE_NUM)
            if self._queues is not None and self._queues > self._queue_num:
                raise ConfigError("queues", f"{self._queues} queues wanted, back-end supports {self._queue_num}")
        if PF.CONFIGURE_MEM_SLOTS in protocol:
            self._max_mem_slots = await self._u64(conn, FR.GET_MAX_MEM_SLOTS)
            if self._max_mem_slots < 1:
                raise ProtocolError(f"GET_MAX_MEM_SLOTS answered {self._max_mem_slots}")
        if PF.BACKEND_REQ in protocol:
            await conn.open_backend_channel()
        await conn.request(FR.SET_OWNER)

    @staticmethod
    async def _u64(conn: Connection, request: vu.FrontendRequest, payload: vu.Payload | None = None) -> int:
        reply = await conn.request(request, payload)
        assert isinstance(reply.payload, vu.U64)
        return reply.payload.value

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.disconnect()
            self._conn = None
        self._drop_inflight()

    def _drop_inflight(self) -> None:
        if self._inflight_map is not None:
            self._inflight_map.close()
            self._inflight_map = None
        if self._inflight is not None:
            os.close(self._inflight[1])
            self._inflight = None

    async def get_features(self) -> int:
        """Virtio features of the back-end (vhost-only bits and ACCESS_PLATFORM removed)."""
        self._live()
        return self._offered & ~HIDDEN_FEATURES

    async def set_features(self, features: int) -> None:
        """SET_FEATURES; bit 30 is added when offered. LOG_ALL may be included to log at once."""
        allowed = (self._offered & ~HIDDEN_FEATURES) | (self._offered & vu.F_LOG_ALL)
        if extra := features & ~allowed:
            raise UnsupportedError(f"vhost-user {self.socket_path}: features {extra:#x} were not offered")
        self._acked = features & ~vu.F_LOG_ALL
        self._log_all = bool(features & vu.F_LOG_ALL)
        await self._send_features()

    async def _send_features(self) -> None:
        value = self._acked | (vu.F_LOG_ALL if self._log_all else 0) | (self._offered & vu.F_PROTOCOL_FEATURES)
        await self.connection.request(FR.SET_FEATURES, vu.U64(value))

    async def set_dirty_logging(self, enabled: bool) -> None:
        """Re-send the acknowledged features with or without VHOST_F_LOG_ALL ("Migration")."""
        if enabled and not self._offered & vu.F_LOG_ALL:
            raise UnsupportedError(f"vhost-user {self.socket_path}: back-end does not offer LOG_ALL")
        self._log_all = enabled
        await self._send_features()

    async def get_queue_num(self) -> int:
        """The configured ``queues``, else the device minimum, else the back-end's GET_QUEUE_NUM."""
        self._live()
        if self._queues is not None:
            return self._queues
        if self.device_id in DEFAULT_QUEUES:
            return DEFAULT_QUEUES[self.device_id]
        if self._queue_num is not None:
            return self._queue_num
        raise ConfigError("queues", f"required for device {self.device_id.name.lower()} without MQ")

    def config_size(self) -> int:
        if self._conn is not None and PF.CONFIG not in self.protocol_features:
            return 0
        if self._config_size is not None:
            return self._config_size
        return DEFAULT_CONFIG_SIZE.get(self.device_id, 0)

    async def set_mem_table(self, memory: GuestMemory) -> None:
        """SET_MEM_TABLE (<= 8 regions) or, with CONFIGURE_MEM_SLOTS, REM/ADD_MEM_REG deltas."""
        conn = self.connection
        wanted = {vu.MemRegion(r.gpa, r.size, r.host_addr, r.fd_offset): r.fd for r in memory}
        if not wanted:
            raise ArgumentError("guest memory has no regions")
        if PF.CONFIGURE_MEM_SLOTS in conn.protocol_features:
            assert self._max_mem_slots is not None
            if len(wanted) > self._max_mem_slots:
                raise UnsupportedError(f"vhost-user {self.socket_path}: {len(wanted)} regions, "
                                       f"back-end has {self._max_mem_slots} memory slots")
            for old in sorted(self._sent_regions - wanted.keys(), key=lambda r: r.guest_phys_addr):
                await conn.request(FR.REM_MEM_REG, vu.SingleMemRegion(old))
                self._sent_regions.discard(old)
            for region, fd in wanted.items():
                if region not in self._sent_regions:
                    await conn.request(FR.ADD_MEM_REG, vu.SingleMemRegion(region), [fd])
                    self._sent_regions.add(region)
        else:
            if len(wanted) > vu.MEMORY_BASELINE_NREGIONS:
                raise UnsupportedError(f"vhost-user {self.socket_path}: {len(wanted)} regions need "
                                       "CONFIGURE_MEM_SLOTS (SET_MEM_TABLE takes 8)")
            await conn.request(FR.SET_MEM_TABLE, vu.MemoryTable(tuple(wanted)), list(wanted.values()))
            self._sent_regions = set(wanted)
        self._memory = memory

    async def set_vring_num(self, index: int, num: int) -> None:
        await self.connection.request(FR.SET_VRING_NUM, vu.VringState(index, num))
        self._vring_num[index] = num

    def _user_address(self, gpa: int, length: int) -> int:
        if self._memory is None:
            raise DeviceStateError("set_vring_addr needs the memory table (set_mem_table) first")
        region, offset = self._memory.translate(gpa, length)
        return region.host_addr + offset

    async def set_vring_addr(self, addr: VringAddr) -> None:
        """SET_VRING_ADDR with user addresses; ``log`` is the used ring's GPA unless given."""
        num = self._vring_num.get(addr.index, 1)
        if self._acked & Feature.RING_PACKED:
            driver_len = device_len = 4
        else:
            driver_len, device_len = 6 + 2 * num, 6 + 8 * num
        payload = vu.VringAddr(
            index=addr.index,
            flags=vu.VRING_F_LOG if addr.log_enabled else 0,
            desc=self._user_address(addr.desc, 16 * num),
            used=self._user_address(addr.device, device_len),
            avail=self._user_address(addr.driver, driver_len),
            log=addr.log or addr.device,
        )
        # Acked while logging (QEMU does the same): the ring's used-ring writes must be logged
        # before the caller goes on to copy memory.
        await self.connection.request(FR.SET_VRING_ADDR, payload, ack=addr.log_enabled)

    async def set_vring_base(self, index: int, base: int) -> None:
        await self.connection.request(FR.SET_VRING_BASE, vu.VringState(index, base))

    async def get_vring_base(self, index: int) -> RingState:
        """GET_VRING_BASE: stops ring *index* and returns where it stopped."""
        reply = await self.connection.request(FR.GET_VRING_BASE, vu.VringState(index, 0))
        self._kicked.discard(index)
        assert isinstance(reply.payload, vu.VringState)
        return RingState(index, reply.payload.num)

    async def _set_vring_file(self, request: vu.FrontendRequest, index: int, fd: int) -> None:
        await self.connection.request(request, vu.VringFile(index, nofd=fd < 0), [fd] if fd >= 0 else [])

    async def set_vring_kick(self, index: int, fd: int) -> None:
        """SET_VRING_KICK (fd < 0: no fd, the back-end polls); the ring counts as started."""
        await self._set_vring_file(FR.SET_VRING_KICK, index, fd)
        self._kicked.add(index)

    async def set_vring_call(self, index: int, fd: int) -> None:
        await self._set_vring_file(FR.SET_VRING_CALL, index, fd)

    async def set_vring_err(self, index: int, fd: int) -> None:
        await self._set_vring_file(FR.SET_VRING_ERR, index, fd)

    async def set_vring_enable(self, index: int, enable: bool) -> None:
        """SET_VRING_ENABLE.

        Without bit 30 SET_FEATURES enables every ring and nothing disables one
        ("Ring states"), so the call does nothing; QEMU ignores the failure of
        its vhost_user_set_vring_enable() the same way. Rings still stop with
        GET_VRING_BASE.
        """
        if not self._offered & vu.F_PROTOCOL_FEATURES:
            return
        await self.connection.request(FR.SET_VRING_ENABLE, vu.VringState(index, int(enable)))
        if enable:
            self._enabled.add(index)
        else:
            self._enabled.discard(index)

    async def get_config(self, offset: int, size: int) -> bytes:
        reply = await self.connection.request(FR.GET_CONFIG, vu.Config.read(offset, size))
        if isinstance(reply.payload, vu.Empty):
            raise RequestFailed(FR.GET_CONFIG, 1, " (zero-size reply)")
        assert isinstance(reply.payload, vu.Config)
        return reply.payload.payload

    async def set_config(self, offset: int, data: bytes, flags: int = vu.ConfigFlags.WRITABLE) -> None:
        """SET_CONFIG; ``flags=ConfigFlags.MIGRATION`` restores read-only fields too."""
        await self.connection.request(FR.SET_CONFIG, vu.Config(offset, len(data), flags, bytes(data)))

    async def set_status(self, status: int) -> None:
        """SET_STATUS with STATUS negotiated, else nothing (QEMU does the same)."""
        conn = self.connection
        if PF.STATUS in conn.protocol_features:
            await conn.request(FR.SET_STATUS, vu.U64(status))

    async def get_status(self) -> int:
        return await self._u64(self.connection, FR.GET_STATUS)

    async def reset(self) -> None:
        """RESET_DEVICE if negotiated, else QEMU's stop sequence (module docstring)."""
        conn = self.connection
        if PF.RESET_DEVICE in conn.protocol_features:
            await conn.request(FR.RESET_DEVICE)
        else:
            for index in sorted(self._enabled):
                await conn.request(FR.SET_VRING_ENABLE, vu.VringState(index, 0))
            for index in sorted(self._kicked):
                await conn.request(FR.GET_VRING_BASE, vu.VringState(index, 0))
            if PF.STATUS in conn.protocol_features:
                await conn.request(FR.SET_STATUS, vu.U64(0))
        self._enabled.clear()
        self._kicked.clear()
        self._drop_inflight()

    async def suspend(self) -> None:
        raise UnsupportedError("vhost-user has no device suspend; rings stop with GET_VRING_BASE")

    async def resume(self) -> None:
        raise UnsupportedError("vhost-user has no device suspend; rings restart with SET_VRING_KICK")

    async def save_state(self) -> bytes | None:
        """The back-end's opaque state ("Migrating back-end state", SAVE); rings must be stopped."""
        return await transfer.save(self._state_transfer_connection(), self.timeout)

    async def load_state(self, blob: bytes) -> None:
        """Hand *blob* to the back-end ("Migrating back-end state", LOAD); rings must be stopped."""
        await transfer.load(self._state_transfer_connection(), blob, self.timeout)

    def _state_transfer_connection(self) -> Connection:
        conn = self.connection
        if PF.DEVICE_STATE not in conn.protocol_features:
            raise UnsupportedError(f"vhost-user {self.socket_path}: back-end state needs DEVICE_STATE")
        if self._kicked:
            raise DeviceStateError(f"device state transfer needs every ring stopped; started: {sorted(self._kicked)}")
        return conn

    def set_event_handler(self, handler: BackendEventHandler | None) -> None:
        """CONFIG_CHANGE_MSG from the back-end channel, and the session's loss (hang-up,
        error, reply timeout, unsolicited message) the moment the connection sees it."""
        super().set_event_handler(handler)

    def _on_config_change(self, message: BackendMessage) -> int:
        self.emit(BackendEvent(BackendEventKind.CONFIG_CHANGED))
        return 0

    async def wait_for_endpoint(self, timeout: float) -> bool:
        """Wait (at most *timeout* s) for the socket to be created again: a restarted daemon."""
        return await wait_for_path(self.socket_path, timeout)

    def peer_identity(self) -> PeerIdentity | None:
        """The process holding the other end of the session's socket, found with sock_diag and
        ``/proc`` (not SO_PEERCRED, which names whoever called listen(): a launcher passing the
        socket on); None when not connected or not found. It walks ``/proc``: call it in a thread."""
        sock = self._conn.socket if self._conn is not None else None
        return None if sock is None else identify(sock, f"vhost-user {self.socket_path}")

    def disable_stops_fetch(self) -> bool:
        """From the ``ring_disable`` option; ``auto``: False for a peer process known to be built
        on libvhost-user, which keeps popping a disabled ring (:data:`RING_DISABLE_IGNORED`)."""
        if self._ring_disable != "auto":
            return self._ring_disable == "stops"
        return self._peer_process() not in RING_DISABLE_IGNORED

    def _peer_process(self) -> str | None:
        """The peer's process name (``/proc/PID/comm``), read once per peer; None if unknown."""
        pid = self._conn.peer_pid if self._conn is not None else None
        if pid is None:
            return None
        if self._peer_name is None or self._peer_name[0] != pid:
            self._peer_name = (pid, process_name(pid))     # /proc read once per peer, not per stop
        return self._peer_name[1]

    def lost_peer_alive(self) -> bool | None:
        """Whether the process behind the last session (SO_PEERCRED) can still write guest memory."""
        pid = self._conn.peer_pid if self._conn is not None else None
        return None if pid is None else process_has_memory(pid)

    async def prepare_inflight(self, num_queues: int, queue_size: int) -> None:
        """GET_INFLIGHT_FD once, then SET_INFLIGHT_FD on every session ("Inflight I/O tracking").

        The area survives the back-end: after a crash the new session gets it back and
        resubmits the descriptors still marked in flight (QEMU vhost-user-blk does the same).
        """
        if self._inflight is None:
            info, fd = await self.get_inflight_fd(num_queues, queue_size)
            if fd is None:
                return
            self._inflight = (info, fd)
            self._inflight_map = mmap.mmap(fd, info.mmap_size, mmap.MAP_SHARED, mmap.PROT_READ,
                                           offset=info.mmap_offset)
        info, fd = self._inflight
        await self.set_inflight_fd(fd, info)

    def in_flight(self, index: int) -> int | None:
        """Heads of ring *index* marked in flight in the inflight area ("Inflight I/O tracking",
        split layout: libvhost-user's per-queue region, a 16-byte header, then 16 bytes per
        descriptor whose first byte is ``inflight``). None without an area."""
        area, info = self._inflight_map, self._inflight
        if area is None or info is None or not 0 <= index < info[0].num_queues:
            return None
        size = info[0].queue_size
        start = index * inflight_queue_bytes(size) + INFLIGHT_HEADER.size
        return area[start:start + INFLIGHT_DESC.size * size:INFLIGHT_DESC.size].count(1)

    async def set_log_base(self, log_fd: int, size: int, offset: int = 0) -> None:
        """SET_LOG_BASE with LOG_SHMFD: the dirty log is *size* bytes of *log_fd* at *offset*."""
        reply = await self.connection.request(FR.SET_LOG_BASE, vu.Log(size, offset), [log_fd])
        close_fds(reply.fds)

    async def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[vu.Inflight, int | None]:
        """GET_INFLIGHT_FD: the back-end's inflight area and its fd (caller closes; None if empty)."""
        if not (num_queues and queue_size):
            raise ArgumentError("num_queues and queue_size must be non-zero")
        reply = await self.connection.request(FR.GET_INFLIGHT_FD, vu.Inflight(0, 0, num_queues, queue_size))
        assert isinstance(reply.payload, vu.Inflight)
        return reply.payload, (reply.fds[0] if reply.fds else None)

    async def set_inflight_fd(self, fd: int, inflight: vu.Inflight) -> None:
        """SET_INFLIGHT_FD: hand an inflight area back (after a reconnect)."""
        await self.connection.request(FR.SET_INFLIGHT_FD, inflight, [fd])

    async def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: the first 6 payload bytes are the guest MAC."""
        if len(mac) != 6:
            raise ArgumentError("a MAC address is 6 bytes")
        await self.connection.request(FR.SEND_RARP, vu.U64(int.from_bytes(mac + bytes(2), "little")))

    async def net_set_mtu(self, mtu: int) -> None:
        await self.connection.request(FR.NET_SET_MTU, vu.U64(mtu))

    async def request(self, request: vu.FrontendRequest, payload: vu.Payload | None = None,
                      fds: list[int] | None = None) -> Reply:
        """Send any request as-is (diagnostics); the caller owns the reply's fds."""
        return await self.connection.request(request, payload, fds or [])
