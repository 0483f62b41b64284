"""The ``vdpa`` generic-netlink family: management devices and vDPA device lifecycle.

What ``vdpa mgmtdev show`` / ``vdpa dev add|del|show|config show`` send, on
pyroute2's generic-netlink base (pyroute2 0.9 has no vdpa family). Numbers
follow Linux ``include/uapi/linux/vdpa.h`` and the policy in
``drivers/vdpa/vdpa.c``.

Attribute 21 changed meaning: up to Linux 6.1 it is
``VDPA_ATTR_VDPA_DEV_SUPPORTED_FEATURES`` (the device's features in
DEV_CONFIG_GET); 6.12 removed it, reports device features in 20
(``VDPA_ATTR_DEV_FEATURES``) and numbers the virtio-blk config attributes
from 21 (``VDPA_ATTR_DEV_BLK_CFG_CAPACITY``). The family's ``maxattr``
(``VDPA_ATTR_MAX``, 22 on 6.1, 37 on 6.12, from CTRL_CMD_GETFAMILY) tells
which layout the running kernel speaks; :class:`Attr21` names it.

Replies carry the kernel's own command (e.g. DEV_NEW for a DEV_GET reply), so
replies are filtered by message class, never by ``cmd``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, genlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import AsyncGenericNetlinkSocket

from shadowvmm.errors import VdpaError, VdpaNetlinkError

VDPA_GENL_NAME = "vdpa"
VDPA_GENL_VERSION = 1

#: ``VDPA_ATTR_MAX`` of kernels whose attribute 21 is VDPA_ATTR_VDPA_DEV_SUPPORTED_FEATURES.
LEGACY_ATTR_MAX = 22


class VdpaCmd(enum.IntEnum):
    """``enum vdpa_command``."""

    UNSPEC = 0
    MGMTDEV_NEW = 1
    MGMTDEV_GET = 2       #: doit/dump
    DEV_NEW = 3           #: CAP_NET_ADMIN
    DEV_DEL = 4           #: CAP_NET_ADMIN
    DEV_GET = 5           #: doit/dump
    DEV_CONFIG_GET = 6    #: doit/dump
    DEV_VSTATS_GET = 7    #: CAP_NET_ADMIN
    DEV_ATTR_SET = 8      #: CAP_NET_ADMIN (newer kernels)


class Attr21(enum.Enum):
    """What attribute 21 means on the running kernel."""

    DEVICE_FEATURES = "VDPA_ATTR_VDPA_DEV_SUPPORTED_FEATURES"   #: Linux <= 6.1 layout
    BLK_CAPACITY = "VDPA_ATTR_DEV_BLK_CFG_CAPACITY"            #: Linux 6.12 layout


#: ``enum vdpa_attr`` as (number, name, pyroute2 type). Widths are what the
#: kernel emits (NET_STATUS is declared u8 but sent with nla_put_u16).
#: Attribute 21 is decoded under a neutral name and interpreted per :class:`Attr21`.
ATTRS: tuple[tuple[int, str, str], ...] = (
    (0, "VDPA_ATTR_UNSPEC", "none"),                 # also VDPA_ATTR_PAD
    (1, "VDPA_ATTR_MGMTDEV_BUS_NAME", "asciiz"),
    (2, "VDPA_ATTR_MGMTDEV_DEV_NAME", "asciiz"),
    (3, "VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES", "uint64"),
    (4, "VDPA_ATTR_DEV_NAME", "asciiz"),
    (5, "VDPA_ATTR_DEV_ID", "uint32"),
    (6, "VDPA_ATTR_DEV_VENDOR_ID", "uint32"),
    (7, "VDPA_ATTR_DEV_MAX_VQS", "uint32"),
    (8, "VDPA_ATTR_DEV_MAX_VQ_SIZE", "uint16"),
    (9, "VDPA_ATTR_DEV_MIN_VQ_SIZE", "uint16"),
    (10, "VDPA_ATTR_DEV_NET_CFG_MACADDR", "l2addr"),
    (11, "VDPA_ATTR_DEV_NET_STATUS", "uint16"),
    (12, "VDPA_ATTR_DEV_NET_CFG_MAX_VQP", "uint16"),
    (13, "VDPA_ATTR_DEV_NET_CFG_MTU", "uint16"),
    (14, "VDPA_ATTR_DEV_NEGOTIATED_FEATURES", "uint64"),
    (15, "VDPA_ATTR_DEV_MGMTDEV_MAX_VQS", "uint32"),
    (16, "VDPA_ATTR_DEV_SUPPORTED_FEATURES", "uint64"),
    (17, "VDPA_ATTR_DEV_QUEUE_INDEX", "uint32"),
    (18, "VDPA_ATTR_DEV_VENDOR_ATTR_NAME", "asciiz"),
    (19, "VDPA_ATTR_DEV_VENDOR_ATTR_VALUE", "uint64"),
    (20, "VDPA_ATTR_DEV_FEATURES", "uint64"),
    (21, "VDPA_ATTR_21", "uint64"),
    (22, "VDPA_ATTR_DEV_BLK_CFG_SIZE_MAX", "uint32"),
    (23, "VDPA_ATTR_DEV_BLK_CFG_BLK_SIZE", "uint32"),
    (24, "VDPA_ATTR_DEV_BLK_CFG_SEG_MAX", "uint32"),
    (25, "VDPA_ATTR_DEV_BLK_CFG_NUM_QUEUES", "uint16"),
    (26, "VDPA_ATTR_DEV_BLK_CFG_PHY_BLK_EXP", "uint8"),
    (27, "VDPA_ATTR_DEV_BLK_CFG_ALIGN_OFFSET", "uint8"),
    (28, "VDPA_ATTR_DEV_BLK_CFG_MIN_IO_SIZE", "uint16"),
    (29, "VDPA_ATTR_DEV_BLK_CFG_OPT_IO_SIZE", "uint32"),
    (30, "VDPA_ATTR_DEV_BLK_CFG_MAX_DISCARD_SEC", "uint32"),
    (31, "VDPA_ATTR_DEV_BLK_CFG_MAX_DISCARD_SEG", "uint32"),
    (32, "VDPA_ATTR_DEV_BLK_CFG_DISCARD_SEC_ALIGN", "uint32"),
    (33, "VDPA_ATTR_DEV_BLK_CFG_MAX_WRITE_ZEROES_SEC", "uint32"),
    (34, "VDPA_ATTR_DEV_BLK_CFG_MAX_WRITE_ZEROES_SEG", "uint32"),
    (35, "VDPA_ATTR_DEV_BLK_READ_ONLY", "uint8"),
    (36, "VDPA_ATTR_DEV_BLK_FLUSH", "uint8"),
)


class VdpaMessage(genlmsg):
    """A ``vdpa`` genl message (pyroute2 ``genlmsg`` with the :data:`ATTRS` map)."""

    prefix = "VDPA_ATTR_"
    nla_map = ATTRS


@dataclass(frozen=True, slots=True)
class MgmtDev:
    """A management device (``vdpa mgmtdev show``)."""

    bus: str | None
    name: str
    supported_classes: int       #: bitmask of virtio device ids
    max_vqs: int | None
    supported_features: int | None

    @property
    def handle(self) -> str:
        """``bus/name`` or ``name``: what :meth:`VdpaNetlink.add_device` takes."""
        return f"{self.bus}/{self.name}" if self.bus else self.name


@dataclass(frozen=True, slots=True)
class VdpaDevice:
    """A vDPA device (``vdpa dev show``)."""

    name: str
    device_id: int
    vendor_id: int
    max_vqs: int
    max_vq_size: int
    min_vq_size: int | None
    mgmtdev: str


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """A device's config (``vdpa dev config show``); absent attributes are ``None``."""

    name: str
    device_id: int
    negotiated_features: int | None
    device_features: int | None
    mac: str | None = None
    status: int | None = None
    max_vq_pairs: int | None = None
    mtu: int | None = None
    blk_capacity: int | None = None
    blk_size: int | None = None
    blk_seg_max: int | None = None
    blk_num_queues: int | None = None
    blk_read_only: int | None = None
    blk_flush: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)


class _VdpaSocket(AsyncGenericNetlinkSocket):
    """Generic netlink socket bound to the ``vdpa`` family; remembers its ``maxattr``."""

    maxattr: int | None = None
    module_err_level = "debug"     # a missing family becomes VdpaNetlinkError(ENOENT)

    async def setup_endpoint(self) -> None:
        if getattr(self.local, "transport", None) is not None:
            return
        await super().setup_endpoint()
        await self.bind(VDPA_GENL_NAME, VdpaMessage)

    async def discovery(self, proto: str) -> Any:
        msg = await super().discovery(proto)
        self.maxattr = msg.get_attr("CTRL_ATTR_MAXATTR")
        return msg


def _attrs(msg: VdpaMessage) -> dict[str, Any]:
    return {name: value for name, value in ((a[0], a[1]) for a in msg["attrs"]) if name != "UNKNOWN"}


class VdpaNetlink:
    """Async client of the ``vdpa`` family: ``async with VdpaNetlink() as nl: ...``."""

    def __init__(self) -> None:
        self._sock: _VdpaSocket | None = None

    async def __aenter__(self) -> VdpaNetlink:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def open(self) -> None:
        sock = _VdpaSocket(ext_ack=True)
        try:
            await sock.setup_endpoint()
        except NetlinkError as exc:
            sock.close()
            raise VdpaNetlinkError("GETFAMILY", exc.code,
                                   "no vdpa genl family (is the vdpa module loaded?)") from exc
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def attr_max(self) -> int:
        """The family's ``maxattr`` as the kernel reports it."""
        return self._socket().maxattr or 0

    @property
    def attr21(self) -> Attr21:
        return Attr21.DEVICE_FEATURES if self.attr_max <= LEGACY_ATTR_MAX else Attr21.BLK_CAPACITY

    def _socket(self) -> _VdpaSocket:
        if self._sock is None:
            raise VdpaError("VdpaNetlink is not open")
        return self._sock

    async def request(self, cmd: VdpaCmd, attrs: Sequence[tuple[str, Any]] = (),
                      dump: bool = False) -> list[VdpaMessage]:
        """Send one request; the vdpa replies (ACKs dropped). Errors are :class:`VdpaNetlinkError`."""
        sock = self._socket()
        msg = VdpaMessage()
        msg["cmd"] = cmd
        msg["version"] = VDPA_GENL_VERSION
        msg["attrs"] = list(attrs)
        flags = NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK)
        try:
            replies = await sock.nlm_request(msg, msg_type=sock.prid, msg_flags=flags)
            return [reply async for reply in replies if isinstance(reply, VdpaMessage)]
        except NetlinkError as exc:
            text = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else ""
            raise VdpaNetlinkError(cmd.name, exc.code, text) from exc

    async def mgmtdevs(self) -> list[MgmtDev]:
        """Every management device (VDPA_CMD_MGMTDEV_GET dump)."""
        out = []
        for reply in await self.request(VdpaCmd.MGMTDEV_GET, dump=True):
            a = _attrs(reply)
            out.append(MgmtDev(a.get("VDPA_ATTR_MGMTDEV_BUS_NAME"), a["VDPA_ATTR_MGMTDEV_DEV_NAME"],
                               a.get("VDPA_ATTR_MGMTDEV_SUPPORTED_CLASSES", 0),
                               a.get("VDPA_ATTR_DEV_MGMTDEV_MAX_VQS"),
                               a.get("VDPA_ATTR_DEV_SUPPORTED_FEATURES")))
        return out

    async def add_device(self, name: str, mgmtdev: str, *, mac: str | None = None,
                         mtu: int | None = None, max_vq_pairs: int | None = None,
                         features: int | None = None) -> None:
        """VDPA_CMD_DEV_NEW: create *name* on *mgmtdev* (``"bus/dev"`` or ``"dev"``)."""
        attrs: list[tuple[str, Any]] = []
        bus, _, dev = mgmtdev.rpartition("/")
        if bus:
            attrs.append(("VDPA_ATTR_MGMTDEV_BUS_NAME", bus))
        attrs += [("VDPA_ATTR_MGMTDEV_DEV_NAME", dev), ("VDPA_ATTR_DEV_NAME", name)]
        if mac is not None:
            attrs.append(("VDPA_ATTR_DEV_NET_CFG_MACADDR", mac))
        if mtu is not None:
            attrs.append(("VDPA_ATTR_DEV_NET_CFG_MTU", mtu))
        if max_vq_pairs is not None:
            attrs.append(("VDPA_ATTR_DEV_NET_CFG_MAX_VQP", max_vq_pairs))
        if features is not None:
            attrs.append(("VDPA_ATTR_DEV_FEATURES", features))
        await self.request(VdpaCmd.DEV_NEW, attrs)

    async def delete_device(self, name: str) -> None:
        """VDPA_CMD_DEV_DEL."""
        await self.request(VdpaCmd.DEV_DEL, [("VDPA_ATTR_DEV_NAME", name)])

    async def devices(self) -> list[VdpaDevice]:
        """Every vDPA device (VDPA_CMD_DEV_GET dump)."""
        return [self._device(r) for r in await self.request(VdpaCmd.DEV_GET, dump=True)]

    async def device(self, name: str) -> VdpaDevice:
        """One vDPA device (VDPA_CMD_DEV_GET doit)."""
        (reply,) = await self.request(VdpaCmd.DEV_GET, [("VDPA_ATTR_DEV_NAME", name)])
        return self._device(reply)

    @staticmethod
    def _device(reply: VdpaMessage) -> VdpaDevice:
        a = _attrs(reply)
        bus = a.get("VDPA_ATTR_MGMTDEV_BUS_NAME")
        mgmt = a.get("VDPA_ATTR_MGMTDEV_DEV_NAME", "")
        return VdpaDevice(a["VDPA_ATTR_DEV_NAME"], a["VDPA_ATTR_DEV_ID"], a["VDPA_ATTR_DEV_VENDOR_ID"],
                          a["VDPA_ATTR_DEV_MAX_VQS"], a["VDPA_ATTR_DEV_MAX_VQ_SIZE"],
                          a.get("VDPA_ATTR_DEV_MIN_VQ_SIZE"), f"{bus}/{mgmt}" if bus else mgmt)

    async def config(self, name: str) -> DeviceConfig:
        """VDPA_CMD_DEV_CONFIG_GET, with attribute 21 read per :attr:`attr21`."""
        (reply,) = await self.request(VdpaCmd.DEV_CONFIG_GET, [("VDPA_ATTR_DEV_NAME", name)])
        return self.decode_config(_attrs(reply), self.attr21)

    @staticmethod
    def decode_config(a: Mapping[str, Any], attr21: Attr21) -> DeviceConfig:
        raw = dict(a)
        value21 = raw.pop("VDPA_ATTR_21", None)
        raw[attr21.value] = value21
        legacy = attr21 is Attr21.DEVICE_FEATURES
        return DeviceConfig(
            name=a["VDPA_ATTR_DEV_NAME"], device_id=a["VDPA_ATTR_DEV_ID"],
            negotiated_features=a.get("VDPA_ATTR_DEV_NEGOTIATED_FEATURES"),
            device_features=value21 if legacy else a.get("VDPA_ATTR_DEV_FEATURES"),
            mac=a.get("VDPA_ATTR_DEV_NET_CFG_MACADDR"), status=a.get("VDPA_ATTR_DEV_NET_STATUS"),
            max_vq_pairs=a.get("VDPA_ATTR_DEV_NET_CFG_MAX_VQP"), mtu=a.get("VDPA_ATTR_DEV_NET_CFG_MTU"),
            blk_capacity=None if legacy else value21,
            blk_size=a.get("VDPA_ATTR_DEV_BLK_CFG_BLK_SIZE"),
            blk_seg_max=a.get("VDPA_ATTR_DEV_BLK_CFG_SEG_MAX"),
            blk_num_queues=a.get("VDPA_ATTR_DEV_BLK_CFG_NUM_QUEUES"),
            blk_read_only=a.get("VDPA_ATTR_DEV_BLK_READ_ONLY"),
            blk_flush=a.get("VDPA_ATTR_DEV_BLK_FLUSH"),
            raw={k: v for k, v in raw.items() if v is not None})


def vhost_vdpa_path(name: str, *, sysfs: Path = Path("/sys"), dev: Path = Path("/dev"),
                    timeout: float = 2.0) -> Path:
    """``/dev/vhost-vdpa-N`` of vDPA device *name* (bound to the vhost_vdpa driver).

    N is an allocation index, not derived from the name: it is read from
    ``/sys/bus/vdpa/devices/<name>/vhost-vdpa-N``.
    """
    base = sysfs / "bus" / "vdpa" / "devices" / name
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(base.glob("vhost-vdpa-*")) if base.exists() else []
        if found and (dev / found[0].name).exists():
            return dev / found[0].name
        if time.monotonic() >= deadline:
            raise VdpaError(f"vDPA device {name} has no vhost-vdpa node (bound to another driver?)")
        time.sleep(0.02)
