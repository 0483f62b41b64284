"""vhost-user message tables: every request code's payload, reply, fd counts and gates as data
(:data:`FRONTEND_SPECS`, :data:`BACKEND_SPECS`), and the one reply validator.

Connections check messages from these tables rather than from per-request code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from shadowvmm.errors import ProtocolError

from .codes import VERSION, BackendRequest, FrontendRequest, Header, HeaderFlags
from .features import F_ACCESS_PLATFORM, F_PROTOCOL_FEATURES, ProtocolFeature
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
    Opaque,
    Payload,
    SharedObject,
    SingleMemRegion,
    VringAddr,
    VringArea,
    VringFile,
    VringState,
)

#: No protocol feature needed.
NO_GATE = ProtocolFeature(0)

#: Consistency of a reply with its request: returns a complaint, or None if consistent.
ReplyCheck = Callable[[Payload | None, Payload], str | None]


def _same_ring(request: Payload | None, reply: Payload) -> str | None:
    assert isinstance(request, VringState) and isinstance(reply, VringState)
    if reply.index != request.index:
        return f"reply is for vring {reply.index}, asked for {request.index}"
    return None


def _same_config_window(request: Payload | None, reply: Payload) -> str | None:
    assert isinstance(request, Config)
    if isinstance(reply, Empty):
        return None
    assert isinstance(reply, Config)
    if (reply.offset, reply.size) != (request.offset, request.size):
        return (f"reply covers config [{reply.offset}, +{reply.size}), "
                f"asked for [{request.offset}, +{request.size})")
    return None


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """How one request code looks on the wire.

    ``request``: payload type (``None``: no payload). ``reply``: reply payload
    type (``None``: no reply body; with REPLY_ACK the back-end then answers a
    need_reply request with a :class:`U64` ack). ``reply_may_be_empty``: a
    zero-byte reply is also legal (error or implementation variant).
    ``fds``/``reply_fds``: file descriptors that travel with the message
    (``None``: the payload's :meth:`Payload.expected_fds` decides).
    ``gate``: protocol features that must be negotiated; ``virtio_gate``:
    virtio/vhost feature bits that must be offered (front-end requests) or
    acknowledged (back-end requests). ``check``: reply-vs-request consistency.
    ``ack``: with REPLY_ACK negotiated the front-end sets NEED_REPLY on it and waits for the
    ack ("REPLY_ACK": "the front-end *may* set" it); the rest goes out without a reply and a
    failure shows at the next message that has one. QEMU's vhost-user.c acks the same handful:
    the memory table, the back-end channel, config, MTU, status, features; shadowvmm adds
    SET_OWNER (the realize handshake ends on a known-good session), RESET_DEVICE and
    SET_INFLIGHT_FD, whose effect the next start relies on.
    """

    request: type[Payload] | None
    reply: type[Payload] | None = None
    fds: int | None = 0
    reply_fds: int | None = 0
    gate: ProtocolFeature = NO_GATE
    virtio_gate: int = 0
    reply_may_be_empty: bool = False
    check: ReplyCheck | None = None
    ack: bool = False

    @property
    def has_reply(self) -> bool:
        """The peer always answers with a body (REPLY_ACK changes nothing)."""
        return self.reply is not None

    @property
    def carries_fds(self) -> bool:
        return self.fds != 0

    def request_fds(self, payload: Payload | None) -> int:
        """Exact fd count for a request with *payload*."""
        if self.fds is not None:
            return self.fds
        assert payload is not None
        expected = payload.expected_fds()
        assert expected is not None
        return expected

    def reply_fd_count(self, payload: Payload) -> int:
        """Exact fd count for a reply with *payload*."""
        if self.reply_fds is not None:
            return self.reply_fds
        expected = payload.expected_fds()
        return 0 if expected is None else expected


F = FrontendRequest
P = ProtocolFeature

#: Every front-end request ("Front-end message types"), except GET_SHMEM_CONFIG.
FRONTEND_SPECS: Mapping[FrontendRequest, MessageSpec] = MappingProxyType({
    F.GET_FEATURES: MessageSpec(None, U64),
    F.SET_FEATURES: MessageSpec(U64, ack=True),
    F.SET_OWNER: MessageSpec(None, ack=True),
    F.RESET_OWNER: MessageSpec(None),
    F.SET_MEM_TABLE: MessageSpec(MemoryTable, fds=None, ack=True),
    F.SET_LOG_BASE: MessageSpec(Log, U64, fds=1, gate=P.LOG_SHMFD, reply_may_be_empty=True),
    F.SET_LOG_FD: MessageSpec(None, fds=1),
    F.SET_VRING_NUM: MessageSpec(VringState),
    F.SET_VRING_ADDR: MessageSpec(VringAddr),
    F.SET_VRING_BASE: MessageSpec(VringState),
    F.GET_VRING_BASE: MessageSpec(VringState, VringState, check=_same_ring),
    F.SET_VRING_KICK: MessageSpec(VringFile, fds=None),
    F.SET_VRING_CALL: MessageSpec(VringFile, fds=None),
    F.SET_VRING_ERR: MessageSpec(VringFile, fds=None),
    F.GET_PROTOCOL_FEATURES: MessageSpec(None, U64, virtio_gate=F_PROTOCOL_FEATURES),
    F.SET_PROTOCOL_FEATURES: MessageSpec(U64, virtio_gate=F_PROTOCOL_FEATURES),
    F.GET_QUEUE_NUM: MessageSpec(None, U64, gate=P.MQ),
    F.SET_VRING_ENABLE: MessageSpec(VringState, virtio_gate=F_PROTOCOL_FEATURES),
    F.SEND_RARP: MessageSpec(U64, gate=P.RARP),
    F.NET_SET_MTU: MessageSpec(U64, gate=P.NET_MTU, ack=True),
    F.SET_BACKEND_REQ_FD: MessageSpec(None, fds=1, gate=P.BACKEND_REQ, ack=True),
    F.IOTLB_MSG: MessageSpec(IotlbMsg, U64, virtio_gate=F_ACCESS_PLATFORM),
    F.SET_VRING_ENDIAN: MessageSpec(VringState, gate=P.CROSS_ENDIAN),
    F.GET_CONFIG: MessageSpec(Config, Config, gate=P.CONFIG, reply_may_be_empty=True,
                              check=_same_config_window),
    F.SET_CONFIG: MessageSpec(Config, gate=P.CONFIG, ack=True),
    F.CREATE_CRYPTO_SESSION: MessageSpec(Opaque, Opaque, gate=P.CRYPTO_SESSION),
    F.CLOSE_CRYPTO_SESSION: MessageSpec(U64, gate=P.CRYPTO_SESSION),
    F.POSTCOPY_ADVISE: MessageSpec(None, Empty, reply_fds=1, gate=P.PAGEFAULT),
    F.POSTCOPY_LISTEN: MessageSpec(None, gate=P.PAGEFAULT, ack=True),
    F.POSTCOPY_END: MessageSpec(None, U64, gate=P.PAGEFAULT),
    F.GET_INFLIGHT_FD: MessageSpec(Inflight, Inflight, reply_fds=None, gate=P.INFLIGHT_SHMFD),
    F.SET_INFLIGHT_FD: MessageSpec(Inflight, fds=1, gate=P.INFLIGHT_SHMFD, ack=True),
    F.GPU_SET_SOCKET: MessageSpec(None, fds=1),
    F.RESET_DEVICE: MessageSpec(None, gate=P.RESET_DEVICE, ack=True),
    F.VRING_KICK: MessageSpec(VringState, gate=P.INBAND_NOTIFICATIONS),
    F.GET_MAX_MEM_SLOTS: MessageSpec(None, U64, gate=P.CONFIGURE_MEM_SLOTS),
    F.ADD_MEM_REG: MessageSpec(SingleMemRegion, fds=1, gate=P.CONFIGURE_MEM_SLOTS, ack=True),
    F.REM_MEM_REG: MessageSpec(SingleMemRegion, gate=P.CONFIGURE_MEM_SLOTS, ack=True),
    F.SET_STATUS: MessageSpec(U64, gate=P.STATUS, ack=True),
    F.GET_STATUS: MessageSpec(None, U64, gate=P.STATUS),
    F.GET_SHARED_OBJECT: MessageSpec(SharedObject, FdResult, reply_fds=None, gate=P.SHARED_OBJECT),
    F.SET_DEVICE_STATE_FD: MessageSpec(DeviceStateTransfer, DeviceStateResult, fds=1, reply_fds=None,
                                       gate=P.DEVICE_STATE),
    F.CHECK_DEVICE_STATE: MessageSpec(None, U64, gate=P.DEVICE_STATE),
})

B = BackendRequest

#: Every back-end request ("Back-end message types") except the SHMEM proposal.
BACKEND_SPECS: Mapping[BackendRequest, MessageSpec] = MappingProxyType({
    B.IOTLB_MSG: MessageSpec(IotlbMsg, virtio_gate=F_ACCESS_PLATFORM),
    B.CONFIG_CHANGE_MSG: MessageSpec(None, gate=P.CONFIG),
    B.VRING_HOST_NOTIFIER_MSG: MessageSpec(VringArea, fds=None, gate=P.HOST_NOTIFIER),
    B.VRING_CALL: MessageSpec(VringState, gate=P.INBAND_NOTIFICATIONS),
    B.VRING_ERR: MessageSpec(VringState, gate=P.INBAND_NOTIFICATIONS),
    B.SHARED_OBJECT_ADD: MessageSpec(SharedObject, gate=P.SHARED_OBJECT),
    B.SHARED_OBJECT_REMOVE: MessageSpec(SharedObject, gate=P.SHARED_OBJECT),
    B.SHARED_OBJECT_LOOKUP: MessageSpec(SharedObject, FdResult, reply_fds=None, gate=P.SHARED_OBJECT),
})

del F, P, B

#: Front-end requests whose wire format is only proposed (no spec entry yet).
UNSPECIFIED_FRONTEND = frozenset({FrontendRequest.GET_SHMEM_CONFIG})
UNSPECIFIED_BACKEND = frozenset({BackendRequest.SHMEM_MAP, BackendRequest.SHMEM_UNMAP})

#: Front-end requests that carry file descriptors (fixed or payload-dependent count).
FD_REQUESTS = frozenset(code for code, spec in FRONTEND_SPECS.items() if spec.carries_fds)


def decode_payload(kind: type[Payload] | None, buf: bytes | bytearray | memoryview) -> Payload | None:
    """Decode *buf* as *kind* (``None``: the payload must be empty)."""
    if kind is None:
        if len(buf):
            raise ProtocolError(f"expected no payload, got {len(buf)} bytes")
        return None
    return kind.unpack(buf)


_REPLY_FLAGS = VERSION | int(HeaderFlags.REPLY)


def decode_reply(request: FrontendRequest, spec: MessageSpec, sent: Payload | None, header: Header,
                 body: bytes | bytearray | memoryview, nfds: int, acked: bool) -> Payload:
    """Check a reply against the table and decode it.

    *acked*: the request went out with NEED_REPLY and has no reply body of its
    own, so the reply is a :class:`U64` ack. Raises :class:`ProtocolError` on a
    wrong code, flags, size, fd count or inconsistent content.
    """
    if header.request != request:
        raise ProtocolError(f"{request.name}: reply carries request code {header.request}")
    if header.flags != _REPLY_FLAGS:
        raise ProtocolError(f"{request.name}: reply flags {header.flags:#x}, expected {_REPLY_FLAGS:#x}")
    if header.size != len(body):
        raise ProtocolError(f"{request.name}: header says {header.size} bytes, got {len(body)}")
    kind = U64 if acked else spec.reply
    if kind is None:
        raise ProtocolError(f"{request.name}: back-end replied to a request that has no reply")
    payload: Payload
    if not acked and spec.reply_may_be_empty and not body:
        payload = Empty()
        expected_fds = 0
    else:
        if not kind.accepts_size(len(body)):
            raise ProtocolError(f"{request.name}: reply payload of {len(body)} bytes does not fit {kind.__name__}")
        payload = kind.unpack(body)
        expected_fds = 0 if acked else spec.reply_fd_count(payload)
    if nfds != expected_fds:
        raise ProtocolError(f"{request.name}: reply carries {nfds} fds, expected {expected_fds}")
    if not acked and spec.check is not None and (complaint := spec.check(sent, payload)):
        raise ProtocolError(f"{request.name}: {complaint}")
    return payload
