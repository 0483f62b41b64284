"""vhost-user feature sets: the vhost bits inside the virtio feature word and the protocol
features ("Protocol features" in QEMU's ``docs/interop/vhost-user.rst``)."""

from __future__ import annotations

import enum

#: Virtio feature bit 30 reused as ``VHOST_USER_F_PROTOCOL_FEATURES`` ("Communication").
F_PROTOCOL_FEATURES = 1 << 30
#: ``VHOST_F_LOG_ALL`` ("Migration"): dirty logging switch inside SET_FEATURES.
F_LOG_ALL = 1 << 26
#: Feature bits that belong to vhost(-user) itself, never to the virtio device.
VHOST_ONLY_FEATURES = F_PROTOCOL_FEATURES | F_LOG_ALL
#: ``VIRTIO_F_ACCESS_PLATFORM`` (``IOMMU_PLATFORM``), gate of the IOTLB messages.
F_ACCESS_PLATFORM = 1 << 33


class ProtocolFeature(enum.IntFlag):
    """Protocol feature bits ("Protocol features", ``VHOST_USER_PROTOCOL_F_*``).

    Bits 20 and up are not named: bit 20 is GET_VRING_BASE_INFLIGHT in QEMU's
    current spec but SHMEM in rust-vmm releases, so a name would be a guess.
    """

    MQ = 1 << 0                     #: "Multiple queue support": GET_QUEUE_NUM
    LOG_SHMFD = 1 << 1              #: "Migration": SET_LOG_BASE carries a shared-memory fd
    RARP = 1 << 2                   #: "VHOST_USER_SEND_RARP"
    REPLY_ACK = 1 << 3              #: "VHOST_USER_PROTOCOL_F_REPLY_ACK": need_reply on any request
    NET_MTU = 1 << 4                #: "VHOST_USER_NET_SET_MTU" (spec name ``F_MTU``)
    BACKEND_REQ = 1 << 5            #: "Back-end communication" channel (old SLAVE_REQ)
    CROSS_ENDIAN = 1 << 6           #: "VHOST_USER_SET_VRING_ENDIAN"
    CRYPTO_SESSION = 1 << 7         #: "VHOST_USER_CREATE_CRYPTO_SESSION"
    PAGEFAULT = 1 << 8              #: "Migration" (postcopy): POSTCOPY_ADVISE/LISTEN/END
    CONFIG = 1 << 9                 #: "VHOST_USER_GET_CONFIG"/SET_CONFIG, CONFIG_CHANGE_MSG
    BACKEND_SEND_FD = 1 << 10       #: "Back-end communication": fds on the back-end channel
    HOST_NOTIFIER = 1 << 11         #: "VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG"
    INFLIGHT_SHMFD = 1 << 12        #: "Inflight I/O tracking": GET/SET_INFLIGHT_FD
    RESET_DEVICE = 1 << 13          #: "VHOST_USER_RESET_DEVICE"
    INBAND_NOTIFICATIONS = 1 << 14  #: "In-band notifications": VRING_KICK, BACKEND_VRING_CALL/ERR
    CONFIGURE_MEM_SLOTS = 1 << 15   #: "VHOST_USER_GET_MAX_MEM_SLOTS", ADD_MEM_REG, REM_MEM_REG
    STATUS = 1 << 16                #: "VHOST_USER_SET_STATUS"/GET_STATUS
    XEN_MMAP = 1 << 17              #: "Memory region description" Xen fields
    SHARED_OBJECT = 1 << 18         #: "VHOST_USER_GET_SHARED_OBJECT", BACKEND_SHARED_OBJECT_*
    DEVICE_STATE = 1 << 19          #: "Migrating back-end state": SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE
