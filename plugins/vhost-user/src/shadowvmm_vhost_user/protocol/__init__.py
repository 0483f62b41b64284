"""vhost-user wire formats, as data.

Everything here follows QEMU's ``docs/interop/vhost-user.rst`` ("the spec";
section names are quoted). The package is layered along the spec's own parts:

- :mod:`.codes`: the header, request codes, header flags and wire limits;
- :mod:`.features`: the vhost feature bits and the protocol feature set;
- :mod:`.payloads`: every payload as a frozen dataclass owning its ``struct.Struct``
  (``pack()``, ``unpack(buf)``, ``validate()`` raising :class:`~shadowvmm.errors.ProtocolError`);
- :mod:`.messages`: :data:`FRONTEND_SPECS` and :data:`BACKEND_SPECS`, which map every
  request code to its payload types, reply and fd counts, and the one reply validator.

Every name is re-exported here: ``from shadowvmm_vhost_user.protocol import X``.
"""

from __future__ import annotations

from .codes import (
    BACKEND_MAX_FDS,
    DEVICE_STATE_ERROR_MASK,
    DEVICE_STATE_NOFD,
    KNOWN_FLAGS,
    LOG_PAGE,
    MAX_CONFIG_SIZE,
    MAX_FDS,
    MAX_MSG_SIZE,
    MEMORY_BASELINE_NREGIONS,
    VERSION,
    VERSION_MASK,
    VRING_F_LOG,
    VRING_IDX_MASK,
    VRING_NOFD,
    BackendRequest,
    ConfigFlags,
    FrontendRequest,
    Header,
    HeaderFlags,
    IotlbPerm,
    IotlbType,
    TransferDirection,
    TransferPhase,
)
from .features import (
    F_ACCESS_PLATFORM,
    F_LOG_ALL,
    F_PROTOCOL_FEATURES,
    VHOST_ONLY_FEATURES,
    ProtocolFeature,
)
from .messages import (
    BACKEND_SPECS,
    FD_REQUESTS,
    FRONTEND_SPECS,
    NO_GATE,
    UNSPECIFIED_BACKEND,
    UNSPECIFIED_FRONTEND,
    MessageSpec,
    ReplyCheck,
    decode_payload,
    decode_reply,
)
from .payloads import (
    U64,
    Config,
    DeviceStateResult,
    DeviceStateTransfer,
    Empty,
    FdResult,
    Inflight,
    IotlbMsg,
    Log,
    MemoryTable,
    MemRegion,
    Opaque,
    Payload,
    SharedObject,
    SingleMemRegion,
    VringAddr,
    VringArea,
    VringFile,
    VringState,
)

__all__ = [
    "VERSION",
    "VERSION_MASK",
    "KNOWN_FLAGS",
    "MAX_MSG_SIZE",
    "MAX_FDS",
    "MEMORY_BASELINE_NREGIONS",
    "MAX_CONFIG_SIZE",
    "BACKEND_MAX_FDS",
    "LOG_PAGE",
    "VRING_F_LOG",
    "VRING_IDX_MASK",
    "VRING_NOFD",
    "DEVICE_STATE_ERROR_MASK",
    "DEVICE_STATE_NOFD",
    "HeaderFlags",
    "FrontendRequest",
    "BackendRequest",
    "ConfigFlags",
    "IotlbPerm",
    "IotlbType",
    "TransferDirection",
    "TransferPhase",
    "Header",
    "F_PROTOCOL_FEATURES",
    "F_LOG_ALL",
    "VHOST_ONLY_FEATURES",
    "F_ACCESS_PLATFORM",
    "ProtocolFeature",
    "Payload",
    "Empty",
    "U64",
    "FdResult",
    "DeviceStateResult",
    "VringState",
    "VringFile",
    "VringAddr",
    "MemRegion",
    "MemoryTable",
    "SingleMemRegion",
    "Log",
    "Config",
    "Inflight",
    "DeviceStateTransfer",
    "IotlbMsg",
    "VringArea",
    "SharedObject",
    "Opaque",
    "NO_GATE",
    "ReplyCheck",
    "MessageSpec",
    "FRONTEND_SPECS",
    "BACKEND_SPECS",
    "UNSPECIFIED_FRONTEND",
    "UNSPECIFIED_BACKEND",
    "FD_REQUESTS",
    "decode_payload",
    "decode_reply",
]
