"""What the vhost-user front-end offers and assumes per device type: the protocol features it
implements, the feature bits it hides from the device layer, and the virtio device tables
(names, config sizes, queue counts; virtio v1.4 §5)."""

from __future__ import annotations

from collections.abc import Mapping

from shadowvmm.virtio.constants import DeviceId

from .protocol import F_ACCESS_PLATFORM, VHOST_ONLY_FEATURES
from .protocol import ProtocolFeature as PF

__all__ = ["DEFAULT_CONFIG_SIZE", "DEFAULT_QUEUES", "DEVICES", "HIDDEN_FEATURES", "SUPPORTED_PROTOCOL_FEATURES"]

#: Protocol features shadowvmm implements (and so acknowledges when offered).
SUPPORTED_PROTOCOL_FEATURES = (
    PF.MQ | PF.LOG_SHMFD | PF.RARP | PF.REPLY_ACK | PF.NET_MTU | PF.BACKEND_REQ | PF.CONFIG
    | PF.INFLIGHT_SHMFD | PF.RESET_DEVICE | PF.CONFIGURE_MEM_SLOTS | PF.STATUS | PF.DEVICE_STATE
)

#: Feature bits never reported to the device layer (vhost-only, or needing a vIOMMU).
HIDDEN_FEATURES = VHOST_ONLY_FEATURES | F_ACCESS_PLATFORM

DEVICES: Mapping[str, DeviceId] = {
    "net": DeviceId.NET, "blk": DeviceId.BLOCK, "block": DeviceId.BLOCK, "console": DeviceId.CONSOLE,
    "rng": DeviceId.RNG, "scsi": DeviceId.SCSI, "gpu": DeviceId.GPU, "input": DeviceId.INPUT,
    "vsock": DeviceId.VSOCK, "crypto": DeviceId.CRYPTO, "sound": DeviceId.SOUND, "fs": DeviceId.FS,
}

#: Device config bytes up to the last field every driver knows (v1.4 §5.x config layouts).
DEFAULT_CONFIG_SIZE: Mapping[DeviceId, int] = {
    DeviceId.NET: 12,       # mac, status, max_virtqueue_pairs, mtu
    DeviceId.BLOCK: 60,     # capacity .. write_zeroes_may_unmap + unused1[3]
    DeviceId.CONSOLE: 12,   # cols, rows, max_nr_ports, emerg_wr
    DeviceId.RNG: 0,
    DeviceId.SCSI: 36,      # num_queues .. max_lun
    DeviceId.GPU: 16,       # events_read, events_clear, num_scanouts, num_capsets
    DeviceId.INPUT: 136,    # select, subsel, size, reserved[5], u[128]
    DeviceId.VSOCK: 8,      # guest_cid
    DeviceId.FS: 40,        # tag[36], num_request_queues
}

#: Minimum queue count of each device type (v1.4 §5.x "Virtqueues").
DEFAULT_QUEUES: Mapping[DeviceId, int] = {
    DeviceId.NET: 2, DeviceId.BLOCK: 1, DeviceId.CONSOLE: 2, DeviceId.RNG: 1, DeviceId.SCSI: 3,
    DeviceId.GPU: 2, DeviceId.INPUT: 2, DeviceId.VSOCK: 3, DeviceId.FS: 2,
}
