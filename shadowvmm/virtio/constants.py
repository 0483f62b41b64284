"""Virtio spec constants.

Citations: "v1.x §N" is the OASIS virtio specification (v1.4-cs01 section
names are used; the numbers are v1.4's). "2021 STOP" is the private STOP
proposal of the virtio-dev thread shadowvmm grew from (never merged).
"""

from __future__ import annotations

import enum


class Status(enum.IntFlag):
    """Device status field bits (v1.4 §2.1 "Device Status Field")."""

    ACKNOWLEDGE = 0x01   #: v1.0 §2.1: guest OS found the device
    DRIVER = 0x02        #: v1.0 §2.1: guest knows how to drive it
    DRIVER_OK = 0x04     #: v1.0 §2.1: driver is set up, device is live
    FEATURES_OK = 0x08   #: v1.0 §2.1: feature negotiation complete
    SUSPEND = 0x10       #: v1.4 §2.1 / §3.4 "Device Suspend" (with VIRTIO_F_SUSPEND)
    #: 2021 STOP proposal (Eugenio's prototype: DEVICE_STOPPED = 32); unassigned in every published spec
    STOP = 0x20
    NEEDS_RESET = 0x40   #: v1.0 §2.1: device hit an error, driver must reset
    FAILED = 0x80        #: v1.0 §2.1: driver gave up on the device


#: Bits a driver sets during initialisation, in order (v1.4 §3.1.1).
INIT_ORDER = (Status.ACKNOWLEDGE, Status.DRIVER, Status.FEATURES_OK, Status.DRIVER_OK)


class Feature(enum.IntFlag):
    """Reserved (transport) feature bits 24..43 (v1.4 §6 "Reserved Feature Bits")."""

    NOTIFY_ON_EMPTY = 1 << 24      #: legacy (pre-1.0), v1.4 §6 legacy interface
    LOG_ALL = 1 << 26              #: vhost-only (VHOST_F_LOG_ALL), never offered to a guest
    ANY_LAYOUT = 1 << 27           #: legacy (pre-1.0); implied by VERSION_1
    INDIRECT_DESC = 1 << 28        #: v1.0 §2.7.5.3 indirect descriptors
    EVENT_IDX = 1 << 29            #: v1.0 §2.7.7 used_event / avail_event
    UNUSED_30 = 1 << 30            #: legacy bad-feature bit; vhost-user VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 1 << 32            #: v1.0 §6 modern device
    ACCESS_PLATFORM = 1 << 33      #: v1.1 §6 platform IOMMU translation
    RING_PACKED = 1 << 34          #: v1.1 §2.8 packed virtqueue
    IN_ORDER = 1 << 35             #: v1.1 §6 in-order use of buffers
    ORDER_PLATFORM = 1 << 36       #: v1.1 §6 platform memory ordering
    SR_IOV = 1 << 37               #: v1.1 §6 SR-IOV (PCI only)
    NOTIFICATION_DATA = 1 << 38    #: v1.1 §6 notifications carry next_off/next_wrap
    NOTIF_CONFIG_DATA = 1 << 39    #: v1.2 §6 queue_notif_config_data in notifications
    RING_RESET = 1 << 40           #: v1.2 §2.6.1 per-queue reset
    ADMIN_VQ = 1 << 41             #: v1.3 §2.12 administration virtqueues (PCI only)
    SUSPEND = 1 << 43              #: v1.4 §3.4 device suspend (status SUSPEND 0x10)


#: Every transport bit, with the spec version that introduced it (v1.4 §6).
FEATURE_SINCE: dict[Feature, str] = {
    Feature.NOTIFY_ON_EMPTY: "legacy", Feature.LOG_ALL: "vhost", Feature.ANY_LAYOUT: "legacy",
    Feature.INDIRECT_DESC: "1.0", Feature.EVENT_IDX: "1.0", Feature.UNUSED_30: "legacy",
    Feature.VERSION_1: "1.0", Feature.ACCESS_PLATFORM: "1.1", Feature.RING_PACKED: "1.1",
    Feature.IN_ORDER: "1.1", Feature.ORDER_PLATFORM: "1.1", Feature.SR_IOV: "1.1",
    Feature.NOTIFICATION_DATA: "1.1", Feature.NOTIF_CONFIG_DATA: "1.2", Feature.RING_RESET: "1.2",
    Feature.ADMIN_VQ: "1.3", Feature.SUSPEND: "1.4",
}

#: Mask of the transport/extension bit range 24..43 (v1.4 §6).
TRANSPORT_FEATURE_MASK = ((1 << 44) - 1) & ~((1 << 24) - 1)


class DeviceId(enum.IntEnum):
    """Virtio device IDs (v1.4 §5 "Device Types")."""

    NET = 1          #: v1.0 §5.1
    BLOCK = 2        #: v1.0 §5.2
    CONSOLE = 3      #: v1.0 §5.3
    RNG = 4          #: v1.0 §5.4 entropy device
    BALLOON = 5      #: v1.0 §5.5 traditional balloon
    SCSI = 8         #: v1.0 §5.6
    NINEP = 9        #: v1.0 9P transport
    GPU = 16         #: v1.1 §5.7
    INPUT = 18       #: v1.1 §5.8
    VSOCK = 19       #: v1.1 §5.10
    CRYPTO = 20      #: v1.1 §5.9
    IOMMU = 23       #: v1.2 §5.13
    MEM = 24         #: v1.2 §5.15
    SOUND = 25       #: v1.2 §5.14
    FS = 26          #: v1.2 §5.11 virtio-fs


class BlkFeature(enum.IntFlag):
    """virtio-blk feature bits (v1.4 §5.2.3)."""

    SIZE_MAX = 1 << 1      #: v1.0 §5.2.3 max segment size in size_max
    SEG_MAX = 1 << 2       #: v1.0 §5.2.3 max segments in seg_max
    GEOMETRY = 1 << 4      #: v1.0 §5.2.3
    RO = 1 << 5            #: v1.0 §5.2.3 read-only
    BLK_SIZE = 1 << 6      #: v1.0 §5.2.3 blk_size valid
    FLUSH = 1 << 9         #: v1.0 §5.2.3 cache flush command
    TOPOLOGY = 1 << 10     #: v1.0 §5.2.3
    CONFIG_WCE = 1 << 11   #: v1.0 §5.2.3 writeback toggle
    MQ = 1 << 12           #: v1.1 §5.2.3 num_queues valid
    DISCARD = 1 << 13      #: v1.1 §5.2.3
    WRITE_ZEROES = 1 << 14  #: v1.1 §5.2.3
    LIFETIME = 1 << 15     #: v1.2 §5.2.3
    SECURE_ERASE = 1 << 16  #: v1.2 §5.2.3


class BlkRequestType(enum.IntEnum):
    """virtio-blk request types (v1.4 §5.2.6)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class BlkStatus(enum.IntEnum):
    """virtio-blk request status byte (v1.4 §5.2.6)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


BLK_SECTOR_SIZE = 512
BLK_ID_BYTES = 20


class NetFeature(enum.IntFlag):
    """virtio-net feature bits (v1.4 §5.1.3)."""

    CSUM = 1 << 0              #: v1.0 §5.1.3
    GUEST_CSUM = 1 << 1        #: v1.0 §5.1.3
    CTRL_GUEST_OFFLOADS = 1 << 2  #: v1.0 §5.1.3
    MTU = 1 << 3               #: v1.0 §5.1.3 mtu field valid
    MAC = 1 << 5               #: v1.0 §5.1.3 mac field valid
    GUEST_TSO4 = 1 << 7        #: v1.0 §5.1.3
    GUEST_TSO6 = 1 << 8        #: v1.0 §5.1.3
    GUEST_ECN = 1 << 9         #: v1.0 §5.1.3
    GUEST_UFO = 1 << 10        #: v1.0 §5.1.3
    HOST_TSO4 = 1 << 11        #: v1.0 §5.1.3
    HOST_TSO6 = 1 << 12        #: v1.0 §5.1.3
    HOST_ECN = 1 << 13         #: v1.0 §5.1.3
    HOST_UFO = 1 << 14         #: v1.0 §5.1.3
    MRG_RXBUF = 1 << 15        #: v1.0 §5.1.3 mergeable receive buffers
    STATUS = 1 << 16           #: v1.0 §5.1.3 status field valid
    CTRL_VQ = 1 << 17          #: v1.0 §5.1.3 control virtqueue
    CTRL_RX = 1 << 18          #: v1.0 §5.1.3
    CTRL_VLAN = 1 << 19        #: v1.0 §5.1.3
    GUEST_ANNOUNCE = 1 << 21   #: v1.0 §5.1.3
    MQ = 1 << 22               #: v1.0 §5.1.3 multiqueue
    CTRL_MAC_ADDR = 1 << 23    #: v1.0 §5.1.3


class FsFeature(enum.IntFlag):
    """virtio-fs feature bits (v1.4 §5.11.3)."""

    NOTIFICATION = 1 << 0      #: v1.2 §5.11.3 notification queue


class RngFeature(enum.IntFlag):
    """virtio-rng has no device feature bits (v1.4 §5.4.3)."""

    NONE = 0


#: MSI-X "no vector" (v1.4 §4.1.4.3 / §4.1.5.1.2).
NO_VECTOR = 0xFFFF

#: ISR status bits (v1.4 §4.1.4.5).
ISR_QUEUE = 0x1
ISR_CONFIG = 0x2

#: Largest split/packed queue size (v1.4 §2.7 / §2.8).
MAX_QUEUE_SIZE = 32768


def feature_names(value: int, *flag_types: type[enum.IntFlag]) -> list[str]:
    """Decode a feature word into names, unknown bits as ``bit N``."""
    names = []
    for bit in range(128):
        if not value >> bit & 1:
            continue
        for flag_type in flag_types + (Feature,):
            try:
                member = flag_type(1 << bit)
            except ValueError:
                continue
            if member.name:
                names.append(member.name)
                break
        else:
            names.append(f"bit {bit}")
    return names
