"""vhost-user wire formats: round trips, validation, and the request tables."""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shadowvmm.errors import ProtocolError
from shadowvmm_vhost_user import protocol as vu

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)


def regions() -> st.SearchStrategy[vu.MemRegion]:
    return st.builds(
        lambda gpa, size, uaddr, off: vu.MemRegion(gpa, size, uaddr, off),
        st.integers(0, 1 << 48), st.integers(1, 1 << 40), st.integers(0, 1 << 47), st.integers(0, 1 << 40))


PAYLOADS = st.one_of(
    st.builds(vu.U64, u64),
    st.builds(vu.FdResult, u64),
    st.builds(vu.DeviceStateResult, st.integers(0, 0x1FF)),
    st.builds(vu.VringState, u32, u32),
    st.builds(vu.VringFile, u8, st.booleans()),
    st.builds(vu.VringAddr, u32, st.sampled_from([0, vu.VRING_F_LOG]), u64.map(lambda a: a & ~0xF),
              u64.map(lambda a: a & ~0x3), u64.map(lambda a: a & ~0x1), u64),
    regions(),
    st.builds(vu.MemoryTable, st.lists(regions(), min_size=1, max_size=8).map(tuple)),
    st.builds(vu.SingleMemRegion, regions()),
    st.builds(vu.Log, st.integers(1, 1 << 40), st.integers(0, 1 << 40)),
    st.integers(1, vu.MAX_CONFIG_SIZE).flatmap(
        lambda n: st.builds(vu.Config, u32, st.just(n), st.sampled_from([0, 1]), st.binary(min_size=n, max_size=n))),
    st.builds(vu.Inflight, u64, u64, u16, u16),
    st.builds(vu.DeviceStateTransfer, st.sampled_from([0, 1]), st.just(0)),
    st.builds(vu.IotlbMsg, u64, u64, u64, st.integers(0, 3), st.integers(1, 4)),
    st.builds(vu.VringArea, st.integers(0, 0x1FF), u64, u64),
    st.builds(vu.SharedObject, st.binary(min_size=16, max_size=16)),
    st.builds(vu.Opaque, st.binary(max_size=vu.MAX_MSG_SIZE)),
)


@given(PAYLOADS)
def test_payload_round_trip(payload: vu.Payload) -> None:
    wire = payload.pack()
    assert type(payload).accepts_size(len(wire))
    assert len(wire) <= type(payload).max_size()
    assert type(payload).unpack(wire) == payload


@given(u32, st.sampled_from([0x1, 0x5, 0x9, 0xD]), st.integers(0, vu.MAX_MSG_SIZE))
def test_header_round_trip(request: int, flags: int, size: int) -> None:
    header = vu.Header(request, flags, size)
    wire = header.pack()
    assert len(wire) == 12 and wire == struct.pack("<III", request, flags, size)
    assert vu.Header.unpack(wire) == header


@pytest.mark.parametrize("flags,size", [(0x0, 0), (0x2, 0), (0x3, 0), (0x15, 0), (0x5, vu.MAX_MSG_SIZE + 1)])
def test_header_rejects_bad_version_flags_and_size(flags: int, size: int) -> None:
    with pytest.raises(ProtocolError):
        vu.Header.unpack(struct.pack("<III", 1, flags, size))


def test_payload_sizes_match_the_spec() -> None:
    expected: dict[type[vu.Payload], int] = {
        vu.U64: 8, vu.VringState: 8, vu.VringFile: 8, vu.VringAddr: 40, vu.MemRegion: 32, vu.SingleMemRegion: 40,
        vu.Log: 16, vu.Inflight: 24, vu.DeviceStateTransfer: 8, vu.IotlbMsg: 32, vu.VringArea: 24,
        vu.SharedObject: 16, vu.Empty: 0}
    for kind, size in expected.items():
        assert kind.max_size() == size, kind
    assert vu.Header.STRUCT.size == 12
    assert vu.MemoryTable.max_size() == 8 + 8 * 32
    assert vu.Config.max_size() == 12 + 256


def test_known_encodings() -> None:
    assert vu.VringFile(3, nofd=True).pack() == struct.pack("<Q", 0x103)
    assert vu.VringFile(3).expected_fds() == 1 and vu.VringFile(3, True).expected_fds() == 0
    table = vu.MemoryTable((vu.MemRegion(0, 0x1000, 0x7F00_0000_0000, 0),))
    assert table.pack() == struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 0x1000, 0x7F00_0000_0000, 0)
    assert table.expected_fds() == 1
    single = vu.SingleMemRegion(vu.MemRegion(0x1000, 0x2000, 0x3000, 0x10))
    assert single.pack() == struct.pack("<5Q", 0, 0x1000, 0x2000, 0x3000, 0x10)
    assert vu.Inflight(1, 2, 3, 4).pack() == struct.pack("<QQHH", 1, 2, 3, 4) + bytes(4)
    assert vu.IotlbMsg(1, 2, 3, 3, 2).pack() == struct.pack("<QQQBB", 1, 2, 3, 3, 2) + bytes(6)
    assert vu.Config.read(4, 2).pack() == struct.pack("<III", 4, 2, 0) + bytes(2)
    value = uuid.UUID("12345678-9abc-def0-1122-334455667788")
    shared = vu.SharedObject.from_uuid(value)
    assert shared.pack()[:4] == bytes.fromhex("12345678") and shared.as_uuid() == value


@pytest.mark.parametrize("payload", [
    vu.VringFile(256),
    vu.VringAddr(0, 2, 0, 0, 0, 0),
    vu.VringAddr(0, 0, 8, 0, 0, 0),
    vu.VringAddr(0, 0, 0, 2, 0, 0),
    vu.VringAddr(0, 0, 0, 0, 1, 0),
    vu.MemRegion(0, 0, 0, 0),
    vu.MemRegion((1 << 64) - 0x1000, 0x2000, 0, 0),
    vu.MemoryTable(()),
    vu.MemoryTable(tuple(vu.MemRegion(i << 20, 1 << 20, 0, 0) for i in range(9))),
    vu.Log(0, 0),
    vu.Config(0, 0, 0, b""),
    vu.Config(0, 2, 0, b"x"),
    vu.Config(0, 257, 0, bytes(257)),
    vu.Config(0, 1, 2, b"x"),
    vu.DeviceStateTransfer(2, 0),
    vu.DeviceStateTransfer(0, 1),
    vu.DeviceStateResult(0x200),
    vu.IotlbMsg(0, 0, 0, 4, 1),
    vu.IotlbMsg(0, 0, 0, 1, 5),
    vu.VringArea(0x200, 0, 0),
    vu.SharedObject(bytes(15)),
    vu.U64(1 << 64),
    vu.VringState(-1, 0),
])
def test_validate_rejects(payload: vu.Payload) -> None:
    with pytest.raises(ProtocolError):
        payload.validate()
    with pytest.raises(ProtocolError):
        payload.pack()


@pytest.mark.parametrize("kind,wire", [
    (vu.U64, bytes(7)), (vu.U64, bytes(9)), (vu.VringState, bytes(4)), (vu.VringAddr, bytes(32)),
    (vu.MemoryTable, struct.pack("<II", 2, 0) + bytes(32)), (vu.MemoryTable, struct.pack("<II", 1, 7) + bytes(32)),
    (vu.MemoryTable, bytes(8 + 9 * 32)), (vu.Config, struct.pack("<III", 0, 4, 0) + bytes(3)),
    (vu.Config, bytes(12)), (vu.VringFile, struct.pack("<Q", 0x200)), (vu.SingleMemRegion, bytes(32)),
])
def test_unpack_rejects_malformed(kind: type[vu.Payload], wire: bytes) -> None:
    with pytest.raises(ProtocolError):
        kind.unpack(wire)


def test_protocol_feature_bits() -> None:
    assert [f.value.bit_length() - 1 for f in vu.ProtocolFeature] == list(range(20))
    assert vu.ProtocolFeature(0x8F2B) == (vu.ProtocolFeature.MQ | vu.ProtocolFeature.LOG_SHMFD
                                          | vu.ProtocolFeature.REPLY_ACK | vu.ProtocolFeature.BACKEND_REQ
                                          | vu.ProtocolFeature.PAGEFAULT | vu.ProtocolFeature.CONFIG
                                          | vu.ProtocolFeature.BACKEND_SEND_FD | vu.ProtocolFeature.HOST_NOTIFIER
                                          | vu.ProtocolFeature.CONFIGURE_MEM_SLOTS)
    assert vu.ProtocolFeature.STATUS == 1 << 16 and vu.ProtocolFeature.DEVICE_STATE == 1 << 19
    assert vu.F_PROTOCOL_FEATURES == 1 << 30 and vu.F_LOG_ALL == 1 << 26


def test_request_codes() -> None:
    assert [r.value for r in vu.FrontendRequest] == list(range(1, 45))
    assert [r.value for r in vu.BackendRequest] == list(range(1, 11))
    assert vu.FrontendRequest.SET_BACKEND_REQ_FD == 21 and vu.FrontendRequest.GET_MAX_MEM_SLOTS == 36
    assert vu.FrontendRequest.SET_DEVICE_STATE_FD == 42 and vu.FrontendRequest.CHECK_DEVICE_STATE == 43


def test_tables_cover_every_request() -> None:
    assert set(vu.FRONTEND_SPECS) | vu.UNSPECIFIED_FRONTEND == set(vu.FrontendRequest)
    assert not set(vu.FRONTEND_SPECS) & vu.UNSPECIFIED_FRONTEND
    assert set(vu.BACKEND_SPECS) | vu.UNSPECIFIED_BACKEND == set(vu.BackendRequest)


@pytest.mark.parametrize("code,spec", list(vu.FRONTEND_SPECS.items()) + list(vu.BACKEND_SPECS.items()))
def test_table_entries_are_consistent(code: int, spec: vu.MessageSpec) -> None:
    for kind in (spec.request, spec.reply):
        assert kind is None or (isinstance(kind, type) and issubclass(kind, vu.Payload))
        assert kind is None or kind.max_size() <= vu.MAX_MSG_SIZE
    if spec.fds is None:
        assert spec.request is not None
        assert "expected_fds" in vars(spec.request), f"{code}: fd count must come from the payload"
    if spec.reply_fds is None:
        assert spec.reply is not None and "expected_fds" in vars(spec.reply)
    if spec.reply is None:
        assert spec.reply_fds == 0 and spec.check is None and not spec.reply_may_be_empty
    assert int(spec.gate) & ~((1 << 20) - 1) == 0


def test_fd_carrying_requests_match_the_spec_list() -> None:
    # "Communication": requests the front-end sends with fds, plus GPU_SET_SOCKET.
    F = vu.FrontendRequest
    expected = {F.ADD_MEM_REG, F.SET_MEM_TABLE, F.SET_LOG_BASE, F.SET_LOG_FD, F.SET_VRING_KICK, F.SET_VRING_CALL,
                F.SET_VRING_ERR, F.SET_BACKEND_REQ_FD, F.SET_INFLIGHT_FD, F.SET_DEVICE_STATE_FD, F.GPU_SET_SOCKET}
    assert expected == vu.FD_REQUESTS


def test_always_reply_requests_include_the_spec_list() -> None:
    F = vu.FrontendRequest
    with_body = {code for code, spec in vu.FRONTEND_SPECS.items() if spec.has_reply}
    assert {F.GET_FEATURES, F.GET_PROTOCOL_FEATURES, F.GET_VRING_BASE, F.SET_LOG_BASE,
            F.GET_INFLIGHT_FD} <= with_body
    assert F.SET_VRING_NUM not in with_body and F.SET_MEM_TABLE not in with_body


def _header(request: int, size: int, flags: int = 0x5) -> vu.Header:
    return vu.Header(request, flags, size)


def decode(request: vu.FrontendRequest, sent: vu.Payload | None, body: bytes, nfds: int = 0, *,
           acked: bool = False, flags: int = 0x5, code: int | None = None) -> vu.Payload:
    return vu.decode_reply(request, vu.FRONTEND_SPECS[request], sent,
                           _header(request if code is None else code, len(body), flags), body, nfds, acked)


def test_decode_reply_accepts_good_replies() -> None:
    F = vu.FrontendRequest
    assert decode(F.GET_FEATURES, None, struct.pack("<Q", 7)) == vu.U64(7)
    assert decode(F.SET_VRING_NUM, vu.VringState(0, 8), struct.pack("<Q", 0), acked=True) == vu.U64(0)
    state = decode(F.GET_VRING_BASE, vu.VringState(1, 0), struct.pack("<II", 1, 5))
    assert state == vu.VringState(1, 5)
    config = decode(F.GET_CONFIG, vu.Config.read(0, 4), struct.pack("<III", 0, 4, 0) + b"abcd")
    assert isinstance(config, vu.Config) and config.payload == b"abcd"
    assert decode(F.GET_CONFIG, vu.Config.read(0, 4), b"") == vu.Empty()
    assert decode(F.SET_LOG_BASE, vu.Log(8, 0), b"") == vu.Empty()
    assert decode(F.SET_LOG_BASE, vu.Log(8, 0), struct.pack("<Q", 8)) == vu.U64(8)
    inflight = struct.pack("<QQHH4x", 4096, 0, 2, 128)
    assert decode(F.GET_INFLIGHT_FD, vu.Inflight(0, 0, 2, 128), inflight, nfds=1).expected_fds() == 1
    assert decode(F.SET_DEVICE_STATE_FD, vu.DeviceStateTransfer(0, 0), struct.pack("<Q", 0), nfds=1)
    assert decode(F.SET_DEVICE_STATE_FD, vu.DeviceStateTransfer(0, 0), struct.pack("<Q", 0x100), nfds=0)


@pytest.mark.parametrize("request_,sent,body,nfds,kwargs", [
    (vu.FrontendRequest.GET_FEATURES, None, struct.pack("<Q", 1), 0, {"code": 17}),
    (vu.FrontendRequest.GET_FEATURES, None, struct.pack("<Q", 1), 0, {"flags": 0x1}),
    (vu.FrontendRequest.GET_FEATURES, None, struct.pack("<Q", 1), 0, {"flags": 0xD}),
    (vu.FrontendRequest.GET_FEATURES, None, bytes(4), 0, {}),
    (vu.FrontendRequest.GET_FEATURES, None, bytes(16), 0, {}),
    (vu.FrontendRequest.GET_FEATURES, None, b"", 0, {}),
    (vu.FrontendRequest.GET_FEATURES, None, bytes(8), 1, {}),
    (vu.FrontendRequest.SET_VRING_NUM, vu.VringState(0, 8), bytes(4), 0, {"acked": True}),
    (vu.FrontendRequest.SET_VRING_NUM, vu.VringState(0, 8), bytes(8), 0, {}),
    (vu.FrontendRequest.GET_VRING_BASE, vu.VringState(1, 0), struct.pack("<II", 0, 5), 0, {}),
    (vu.FrontendRequest.GET_CONFIG, vu.Config.read(0, 4), struct.pack("<III", 0, 2, 0) + b"ab", 0, {}),
    (vu.FrontendRequest.GET_CONFIG, vu.Config.read(0, 4), struct.pack("<III", 4, 4, 0) + b"abcd", 0, {}),
    (vu.FrontendRequest.GET_INFLIGHT_FD, vu.Inflight(0, 0, 2, 128), struct.pack("<QQHH4x", 4096, 0, 2, 128), 0, {}),
    (vu.FrontendRequest.SET_DEVICE_STATE_FD, vu.DeviceStateTransfer(0, 0), struct.pack("<Q", 1), 1, {}),
])
def test_decode_reply_rejects(request_: vu.FrontendRequest, sent: vu.Payload | None, body: bytes, nfds: int,
                              kwargs: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        decode(request_, sent, body, nfds, **kwargs)  # type: ignore[arg-type]
