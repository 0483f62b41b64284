"""vhost-vdpa backend: a kernel vDPA device driven through ``/dev/vhost-vdpa-N``.

The operations are QEMU's ``vhost_vdpa`` ops (hw/virtio/vhost-vdpa.c) over
the ioctls of :mod:`.ioctl`. Guest memory is mapped with IOTLB v2 messages at
IOVA = GPA, so vring addresses are programmed as GPAs. The mapping must be a
shared file mapping (:class:`~shadowvmm.memory.GuestMemory` uses memfd +
MAP_SHARED): in VA mode (vdpa_sim on 6.12, VDUSE) the kernel silently skips
anonymous or private memory; :meth:`VdpaBackend.set_mem_table` refuses it.

Transparent stop: :meth:`~VdpaBackend.suspend` (VHOST_VDPA_SUSPEND), then
``get_vring_base`` per ring; :meth:`~VdpaBackend.resume` (VHOST_VDPA_RESUME)
needs ``VHOST_BACKEND_F_RESUME`` (Linux 6.4+; not in 6.1). Ioctls are short
blocking syscalls and are issued directly from the coroutines.
"""

from __future__ import annotations

import asyncio
import errno
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
    RingState,
    VringAddr,
)
from shadowvmm.errors import (
    ConfigError,
    DeviceStateError,
    UnsupportedError,
    VdpaError,
    VdpaIoctlError,
    VdpaMappingError,
)
from shadowvmm.memory import GuestMemory
from shadowvmm.options import REQUIRED, Option, OptionSchema
from shadowvmm.virtio.constants import DeviceId, Feature, Status

from .ioctl import (
    U8,
    U64,
    BackendFeature,
    Int,
    Ioctl,
    IotlbMsgV2,
    IovaRange,
    VdpaConfig,
    VringAddrArg,
    VringFile,
    VringState,
)

DEVICE_NAMES: Mapping[str, DeviceId] = {"net": DeviceId.NET, "blk": DeviceId.BLOCK,
                                        "block": DeviceId.BLOCK}

#: Backend features asked for; the kernel's offer is ANDed in (as QEMU does).
WANTED_BACKEND_FEATURES = (
    BackendFeature.IOTLB_MSG_V2.mask | BackendFeature.IOTLB_BATCH.mask
    | BackendFeature.IOTLB_ASID.mask | BackendFeature.SUSPEND.mask | BackendFeature.RESUME.mask
    | BackendFeature.ENABLE_AFTER_DRIVER_OK.mask | BackendFeature.IOTLB_PERSIST.mask)


_ACK_DRIVER = Status.ACKNOWLEDGE | Status.DRIVER


def _shared_file_mappings() -> list[tuple[int, int]]:
    """``(start, end)`` of this process's shared file mappings (/proc/self/maps)."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) >= 6 and fields[1][3] == "s":
                start, _, end = fields[0].partition("-")
                spans.append((int(start, 16), int(end, 16)))
    return spans


class VdpaBackend(BackendBase):
    """A vhost-vdpa device (``/dev/vhost-vdpa-N``) behind the :class:`~..base.Backend` protocol.

    Config keys: ``path`` (the vhost-vdpa node), ``device`` (``"net"`` or
    ``"blk"``, required: the device layer reads :attr:`device_id` before
    :meth:`connect`, which checks it against VHOST_VDPA_GET_DEVICE_ID), optional
    ``backend_features`` (a mask ANDed into :data:`WANTED_BACKEND_FEATURES`,
    e.g. to run without RESUME; a negative value is a complement, ``~RESUME``) and
    ``asid`` (IOTLB address space, default 0). Other keys are refused (:attr:`OPTIONS`).
    """

    implementation = "vhost-vdpa"
    implementation_version = 1
    OPTIONS = OptionSchema(
        Option("path", Path, REQUIRED, "the /dev/vhost-vdpa-N node"),
        Option("device", str, REQUIRED, "virtio device type", choices=tuple(sorted(DEVICE_NAMES))),
        Option("backend_features", int, None, "mask ANDed into the backend features asked for "
               "(negative: a complement, ~bits)", min=-(1 << 64), max=(1 << 64) - 1),
        Option("asid", int, 0, "IOTLB address space", min=0, max=(1 << 32) - 1),
    )

    def __init__(self, config: Mapping[str, Any]) -> None:
        options = self.OPTIONS.validate(config)
        self.path = options["path"]
        self.device_id: DeviceId = DEVICE_NAMES[options["device"]]
        mask = options["backend_features"]
        self._wanted = WANTED_BACKEND_FEATURES & (mask if mask is not None else ~0)
        self.asid = options["asid"]
        self._fd: int | None = None
        self.offered_backend_features = 0
        self.backend_features = 0
        self.device_features = 0
        self.vqs_count = 0
        self.vring_num_max = 0
        self.iova_range = IovaRange(0, 0)
        self._config_size = 0
        self._maps: dict[int, tuple[int, int]] = {}
        self._suspended = False
        self._config_handler: BackendEventHandler | None = None
        self._config_efd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ session

    def _dev(self) -> int:
        if self._fd is None:
            raise DeviceStateError(f"{self.path} is not connected")
        return self._fd

    def _has(self, feature: BackendFeature) -> bool:
        return bool(self.backend_features & feature.mask)

    async def connect(self) -> None:
        """Open the node, negotiate backend features, SET_OWNER, read the device's limits."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise VdpaIoctlError(f"open {self.path}", exc.errno or errno.EIO) from exc
        self._fd = fd
        try:
            self.offered_backend_features = self._call(Ioctl.VHOST_GET_BACKEND_FEATURES).value
            self.backend_features = self.offered_backend_features & self._wanted
            self._call(Ioctl.VHOST_SET_BACKEND_FEATURES, U64(self.backend_features))
            if not self._has(BackendFeature.IOTLB_MSG_V2):
                raise UnsupportedError(f"{self.path} does not offer VHOST_BACKEND_F_IOTLB_MSG_V2")
            self._call(Ioctl.VHOST_SET_OWNER)
            device_id = self._call(Ioctl.VHOST_VDPA_GET_DEVICE_ID).value
            if device_id != self.device_id:
                raise ConfigError("device", f"{self.path} is virtio device {device_id}, "
                                            f"not {self.device_id.name.lower()} ({self.device_id.value})")
            self.device_features = self._call(Ioctl.VHOST_GET_FEATURES).value
            self.vqs_count = self._call(Ioctl.VHOST_VDPA_GET_VQS_COUNT).value
            self.vring_num_max = self._call(Ioctl.VHOST_VDPA_GET_VRING_NUM).value
            self._config_size = self._call(Ioctl.VHOST_VDPA_GET_CONFIG_SIZE).value
            self.iova_range = self._call(Ioctl.VHOST_VDPA_GET_IOVA_RANGE)
            self._loop = asyncio.get_running_loop()
            if self._config_handler is not None:
                self._arm_config_call()
        except BaseException:
            self._teardown()
            raise

    async def close(self) -> None:
        """Close the node; the kernel resets the device and drops its IOTLB."""
        self._teardown()

    def _teardown(self) -> None:
        self._disarm_config_call(unbind=False)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._maps.clear()
        self._suspended = False

    def _call(self, ioctl: Ioctl, arg: Any = None) -> Any:
        return ioctl.call(self._dev(), arg)

    # ------------------------------------------------------------ capabilities

    def capabilities(self) -> Capability:
        caps = Capability.CONFIG | Capability.STATUS | Capability.MQ | Capability.EVENTS
        if self._has(BackendFeature.SUSPEND):
            caps |= Capability.SUSPEND
        if self._has(BackendFeature.RESUME):
            caps |= Capability.RESUME
        # No RING_RESTART: vhost-vdpa takes VHOST_SET_VRING_BASE after DRIVER_OK only while the
        # whole device is suspended (EINVAL otherwise), so one ring cannot restart while the
        # others run and VIRTIO_F_RING_RESET is not offered (as QEMU's vhost-vdpa does not).
        return caps

    def capability_notes(self) -> str:
        """How this device stops and restarts, for logs and the device layer's fallback choice."""
        if self._fd is None:
            return "not connected: capabilities are known after connect()"
        names = ", ".join(BackendFeature.decode(self.backend_features)) or "none"
        notes = [f"backend features {self.backend_features:#x} ({names})"]
        if not self._has(BackendFeature.SUSPEND):
            notes.append("no VHOST_BACKEND_F_SUSPEND: GET_VRING_BASE is only a snapshot; "
                         "stop by reset (SET_STATUS 0) and replay ring bases and config")
        elif not self._has(BackendFeature.RESUME):
            notes.append("SUSPEND without RESUME (e.g. Linux 6.1): after suspend() and "
                         "get_vring_base the device layer must reset and replay features, "
                         "ring num/base/addr/kick/call, enable and status (no RESUME)")
        else:
            notes.append("SUSPEND + RESUME: suspend(), get_vring_base, then resume(); "
                         "ring addr/base may be reprogrammed while suspended")
        if not self._has(BackendFeature.IOTLB_PERSIST):
            notes.append("no IOTLB_PERSIST: reset() remaps guest memory itself")
        return "; ".join(notes)

    # ---------------------------------------------------------------- features

    async def get_features(self) -> int:
        return self._call(Ioctl.VHOST_GET_FEATURES).value

    async def set_features(self, features: int) -> None:
        """SET_FEATURES, then FEATURES_OK, as QEMU's vhost_vdpa_set_features does.

        ACK|DRIVER are added first when missing; a device that refuses the
        features (FEATURES_OK does not stick) raises :class:`VdpaError`.
        VIRTIO_F_ACCESS_PLATFORM is added when the device offers it: vhost-vdpa
        always translates ring and buffer addresses through the IOTLB this
        backend programs (IOVA = GPA), whatever the guest negotiated.
        """
        features |= self.device_features & Feature.ACCESS_PLATFORM
        status = self._call(Ioctl.VHOST_VDPA_GET_STATUS).value
        if status & _ACK_DRIVER != _ACK_DRIVER:
            status |= _ACK_DRIVER
            self._call(Ioctl.VHOST_VDPA_SET_STATUS, U8(status))
        self._call(Ioctl.VHOST_SET_FEATURES, U64(features))
        await self.set_status(status | Status.FEATURES_OK)

    async def get_queue_num(self) -> int:
        return self.vqs_count

    def config_size(self) -> int:
        return self._config_size

    # ------------------------------------------------------------------ memory

    async def set_mem_table(self, memory: GuestMemory) -> None:
        """Map every region with IOTLB UPDATE (iova = gpa, uaddr = host address, RW).

        Ranges no longer in the table, or changed, are invalidated first; with
        IOTLB_BATCH the whole change is one batch.
        """
        self._dev()
        wanted = {r.gpa: (r.size, r.host_addr) for r in memory}
        shared = _shared_file_mappings()
        for gpa, (size, uaddr) in wanted.items():
            if gpa < self.iova_range.first or gpa + size - 1 > self.iova_range.last:
                raise VdpaMappingError(f"region [{gpa:#x}, +{size:#x}) is outside the device IOVA range "
                                       f"[{self.iova_range.first:#x}, {self.iova_range.last:#x}]")
            if not any(start <= uaddr and uaddr + size <= end for start, end in shared):
                raise VdpaMappingError(f"region at gpa {gpa:#x} is not a shared file mapping: "
                                       "vhost-vdpa would silently not map it (use memfd + MAP_SHARED)")
        stale = {iova: m for iova, m in self._maps.items() if wanted.get(iova) != m}
        fresh = {iova: m for iova, m in wanted.items() if self._maps.get(iova) != m}
        self._apply(stale, fresh)

    def _apply(self, stale: Mapping[int, tuple[int, int]], fresh: Mapping[int, tuple[int, int]]) -> None:
        if not stale and not fresh:
            return
        msgs = [IotlbMsgV2.invalidate(iova, size, self.asid) for iova, (size, _) in stale.items()]
        msgs += [IotlbMsgV2.update(iova, size, uaddr, asid=self.asid) for iova, (size, uaddr) in fresh.items()]
        if self._has(BackendFeature.IOTLB_BATCH):
            msgs = [IotlbMsgV2.batch_begin(self.asid), *msgs, IotlbMsgV2.batch_end(self.asid)]
        fd = self._dev()
        for iova in stale:
            self._maps.pop(iova, None)
        try:
            for msg in msgs:
                msg.write(fd)
        except VdpaIoctlError as exc:
            if exc.errno == errno.ENOMEM:
                raise VdpaMappingError(f"{exc} (PA mode pins pages: raise RLIMIT_MEMLOCK)") from exc
            raise
        self._maps.update(fresh)

    async def iotlb_update(self, iova: int, size: int, uaddr: int) -> None:
        """Map one extra range (e.g. shadow rings) outside the guest memory table."""
        self._apply({}, {iova: (size, uaddr)})

    async def iotlb_invalidate(self, iova: int) -> None:
        """Unmap a range previously mapped at *iova*."""
        if iova in self._maps:
            self._apply({iova: self._maps[iova]}, {})

    # ------------------------------------------------------------------- rings

    async def set_vring_num(self, index: int, num: int) -> None:
        self._call(Ioctl.VHOST_SET_VRING_NUM, VringState(index, num))

    async def set_vring_addr(self, addr: VringAddr) -> None:
        """Program ring addresses; they are IOVAs, which equal GPAs here."""
        if addr.log_enabled:
            raise UnsupportedError("vhost-vdpa has no dirty log (VHOST_VRING_F_LOG)")
        self._call(Ioctl.VHOST_SET_VRING_ADDR,
                   VringAddrArg(addr.index, 0, addr.desc, addr.device, addr.driver, addr.log))

    async def set_vring_base(self, index: int, base: int) -> None:
        self._call(Ioctl.VHOST_SET_VRING_BASE, VringState(index, base))

    async def get_vring_base(self, index: int) -> RingState:
        """Ring *index*'s position (VHOST_GET_VRING_BASE); exact only after :meth:`suspend`."""
        state = self._call(Ioctl.VHOST_GET_VRING_BASE, VringState(index))
        return RingState(index, state.num)

    async def set_vring_kick(self, index: int, fd: int) -> None:
        self._call(Ioctl.VHOST_SET_VRING_KICK, VringFile(index, fd))

    async def set_vring_call(self, index: int, fd: int) -> None:
        self._call(Ioctl.VHOST_SET_VRING_CALL, VringFile(index, fd))

    async def set_vring_enable(self, index: int, enable: bool) -> None:
        self._call(Ioctl.VHOST_VDPA_SET_VRING_ENABLE, VringState(index, int(enable)))

    def get_vring_group(self, index: int) -> int:
        return self._call(Ioctl.VHOST_VDPA_GET_VRING_GROUP, VringState(index)).num

    def get_vring_desc_group(self, index: int) -> int:
        return self._call(Ioctl.VHOST_VDPA_GET_VRING_DESC_GROUP, VringState(index)).num

    def get_vring_size(self, index: int) -> int:
        return self._call(Ioctl.VHOST_VDPA_GET_VRING_SIZE, VringState(index)).num

    def group_num(self) -> int:
        return self._call(Ioctl.VHOST_VDPA_GET_GROUP_NUM).value

    def as_num(self) -> int:
        return self._call(Ioctl.VHOST_VDPA_GET_AS_NUM).value

    def set_group_asid(self, group: int, asid: int) -> None:
        self._call(Ioctl.VHOST_VDPA_SET_GROUP_ASID, VringState(group, asid))

    # ------------------------------------------------------------ config/status

    async def get_config(self, offset: int, size: int) -> bytes:
        return self._call(Ioctl.VHOST_VDPA_GET_CONFIG, VdpaConfig(offset, size)).buf

    async def set_config(self, offset: int, data: bytes) -> None:
        self._call(Ioctl.VHOST_VDPA_SET_CONFIG, VdpaConfig(offset, len(data), bytes(data)))

    async def get_status(self) -> int:
        return self._call(Ioctl.VHOST_VDPA_GET_STATUS).value

    async def set_status(self, status: int) -> None:
        """SET_STATUS, then read back: bits the device refused raise :class:`VdpaError`.

        The kernel only adds bits; 0 resets (see :meth:`reset`).
        """
        if status == 0:
            await self.reset()
            return
        self._call(Ioctl.VHOST_VDPA_SET_STATUS, U8(status))
        got = self._call(Ioctl.VHOST_VDPA_GET_STATUS).value
        if got & status != status:
            raise VdpaError(f"device status is {got:#x} after setting {status:#x}")

    async def reset(self) -> None:
        """SET_STATUS 0; without IOTLB_PERSIST the device lost its maps, so remap them."""
        self._call(Ioctl.VHOST_VDPA_SET_STATUS, U8(0))
        self._suspended = False
        if self._maps and not self._has(BackendFeature.IOTLB_PERSIST):
            maps = dict(self._maps)
            self._apply(maps, maps)

    async def suspend(self) -> None:
        """VHOST_VDPA_SUSPEND: the device processes no more descriptors (a no-op before DRIVER_OK)."""
        if not self._has(BackendFeature.SUSPEND):
            raise UnsupportedError(f"{self.path}: no VHOST_BACKEND_F_SUSPEND; {self.capability_notes()}")
        self._call(Ioctl.VHOST_VDPA_SUSPEND)
        self._suspended = True

    async def resume(self) -> None:
        """VHOST_VDPA_RESUME (needs VHOST_BACKEND_F_RESUME: Linux 6.4+)."""
        if not self._has(BackendFeature.RESUME):
            raise UnsupportedError(f"{self.path}: no VHOST_BACKEND_F_RESUME; {self.capability_notes()}")
        self._call(Ioctl.VHOST_VDPA_RESUME)
        self._suspended = False

    @property
    def suspended(self) -> bool:
        return self._suspended

    async def load_state(self, blob: bytes) -> None:
        raise UnsupportedError("vhost-vdpa carries no opaque device state")

    async def prepare_inflight(self, num_queues: int, queue_size: int) -> None:
        raise UnsupportedError("vhost-vdpa has no inflight area")

    # ----------------------------------------------------------- config change

    def set_event_handler(self, handler: BackendEventHandler | None) -> None:
        """Route VHOST_VDPA_SET_CONFIG_CALL's eventfd to *handler* on the connect() loop.

        Config changes only: the char device stays open for the life of the backend, and an
        ioctl that fails reports its own error (the device then shows NEEDS_RESET)."""
        self._config_handler = handler
        if self._fd is None:
            return
        if handler is None:
            self._disarm_config_call()
        else:
            self._arm_config_call()

    def _arm_config_call(self) -> None:
        if self._config_efd is not None or self._loop is None:
            return
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self._call(Ioctl.VHOST_VDPA_SET_CONFIG_CALL, Int(efd))
        except BaseException:
            os.close(efd)
            raise
        self._config_efd = efd
        self._loop.add_reader(efd, self._on_config_call)

    def _disarm_config_call(self, unbind: bool = True) -> None:
        """Stop watching the config eventfd; *unbind* also tells the kernel (not needed at close)."""
        efd, self._config_efd = self._config_efd, None
        if efd is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(efd)
        try:
            if unbind and self._fd is not None:
                self._call(Ioctl.VHOST_VDPA_SET_CONFIG_CALL, Int(-1))
        finally:
            os.close(efd)

    def _on_config_call(self) -> None:
        if self._config_efd is None:
            return
        try:
            os.eventfd_read(self._config_efd)
        except BlockingIOError:
            return
        if self._config_handler is not None:
            self._config_handler(BackendEvent(BackendEventKind.CONFIG_CHANGED))
