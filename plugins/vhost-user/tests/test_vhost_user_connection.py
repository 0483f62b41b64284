"""vhost-user Connection against a scripted fake back-end: typed errors, no fd leaks."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from shadowvmm.errors import (
    BackendDisconnected,
    BackendError,
    BackendTimeout,
    DeviceStateError,
    ProtocolError,
    UnsupportedError,
)
from shadowvmm_vhost_user import protocol as vu
from shadowvmm_vhost_user.connection import BackendMessage, Connection, RequestFailed, Runstate, unix_connector
from shadowvmm_vhost_user.fake import CLOSE, SILENT, U64, Action, FakeBackend, Received, Send
from shadowvmm_vhost_user.framing import Framer, Message

F = vu.FrontendRequest
B = vu.BackendRequest
PF = vu.ProtocolFeature


def fd_count() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


class Env:
    """Fakes and connections of one test; everything is closed at teardown."""

    def __init__(self) -> None:
        self.fakes: list[FakeBackend] = []
        self.conns: list[Connection] = []

    def fake(self, **kwargs: object) -> FakeBackend:
        fake = FakeBackend(**kwargs)  # type: ignore[arg-type]
        self.fakes.append(fake)
        return fake

    async def connect(self, fake: FakeBackend, **kwargs: object) -> Connection:
        conn = Connection(fake.connector, **kwargs)  # type: ignore[arg-type]
        self.conns.append(conn)
        await conn.connect()
        return conn

    async def close(self) -> None:
        for conn in self.conns:
            await conn.disconnect()
        for fake in self.fakes:
            fake.stop()


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    env = Env()
    yield env
    await env.close()


async def negotiate(conn: Connection, protocol: int) -> None:
    await conn.request(F.GET_FEATURES)
    await conn.request(F.GET_PROTOCOL_FEATURES)
    await conn.request(F.SET_PROTOCOL_FEATURES, vu.U64(protocol))


def with_fds(count: int, reply: Callable[[list[int]], Send]) -> Callable[[Received], Send]:
    """An action whose reply carries *count* fresh pipe fds (the fake closes its copies)."""

    def action(message: Received) -> Send:
        fds: list[int] = []
        while len(fds) < count:
            fds.extend(os.pipe())
        for fd in fds[count:]:
            os.close(fd)
        return reply(fds[:count])

    return action


GOOD_FEATURES = U64.pack(0x175007E46)

MALFORMED: dict[str, Action] = {
    "wrong request code": Send(int(F.GET_QUEUE_NUM), GOOD_FEATURES),
    "short payload": Send(int(F.GET_FEATURES), bytes(4)),
    "payload too long": Send(int(F.GET_FEATURES), bytes(16)),
    "empty payload": Send(int(F.GET_FEATURES), b""),
    "reply flag missing": Send(int(F.GET_FEATURES), GOOD_FEATURES, flags=0x1),
    "need_reply in a reply": Send(int(F.GET_FEATURES), GOOD_FEATURES, flags=0xD),
    "version 2": Send(int(F.GET_FEATURES), GOOD_FEATURES, flags=0x6),
    "oversized header": Send(int(F.GET_FEATURES), b"", size=vu.MAX_MSG_SIZE + 1),
    "extra fds": with_fds(2, lambda fds: Send(int(F.GET_FEATURES), GOOD_FEATURES, fds=fds, close_after=True)),
    "too many fds": with_fds(40, lambda fds: Send(int(F.GET_FEATURES), GOOD_FEATURES, fds=fds, close_after=True)),
    "truncated then hangup": Send(int(F.GET_FEATURES), bytes(4), size=8, hangup=True),
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_reply_is_a_typed_error_without_fd_leak(env: Env,
                                                                name: str) -> None:
    before = fd_count()
    fake = env.fake().on(F.GET_FEATURES, MALFORMED[name])
    conn = await env.connect(fake, timeout=5.0)
    start = time.monotonic()
    with pytest.raises(BackendError) as info:
        await conn.request(F.GET_FEATURES)
    assert time.monotonic() - start < 1.0, "a malformed reply must fail at once, not at the timeout"
    expected = BackendDisconnected if name == "truncated then hangup" else ProtocolError
    assert isinstance(info.value, expected), info.value
    assert conn.runstate is Runstate.DISCONNECTED
    with pytest.raises(BackendDisconnected):
        await conn.request(F.GET_FEATURES)
    await conn.disconnect()
    fake.stop()
    assert fd_count() == before


async def test_missing_reply_times_out(env: Env) -> None:
    before = fd_count()
    fake = env.fake().on(F.GET_FEATURES, SILENT)
    conn = await env.connect(fake, timeout=0.2)
    start = time.monotonic()
    with pytest.raises(BackendTimeout):
        await conn.request(F.GET_FEATURES)
    assert 0.2 <= time.monotonic() - start < 1.0
    assert conn.runstate is Runstate.DISCONNECTED
    assert isinstance(conn.error, BackendTimeout)
    with pytest.raises(BackendDisconnected):
        await conn.request(F.GET_FEATURES)
    fake.stop()
    assert fd_count() == before


async def test_per_request_timeout_override(env: Env) -> None:
    fake = env.fake().on(F.GET_FEATURES, SILENT)
    conn = await env.connect(fake, timeout=30.0)
    start = time.monotonic()
    with pytest.raises(BackendTimeout):
        await conn.request(F.GET_FEATURES, timeout=0.1)
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("where", [F.GET_FEATURES, F.GET_PROTOCOL_FEATURES, F.SET_PROTOCOL_FEATURES,
                                   F.GET_QUEUE_NUM])
async def test_backend_closing_mid_handshake(env: Env, where: F) -> None:
    before = fd_count()
    fake = env.fake().on(where, CLOSE)
    conn = await env.connect(fake, timeout=2.0)
    start = time.monotonic()
    with pytest.raises(BackendDisconnected):
        await negotiate(conn, PF.MQ | PF.REPLY_ACK)
        await conn.request(F.GET_QUEUE_NUM)
    assert time.monotonic() - start < 1.0
    assert conn.runstate is Runstate.DISCONNECTED
    fake.stop()
    assert fd_count() == before


async def test_other_device_keeps_working(env: Env) -> None:
    broken_fakes = [env.fake().on(F.GET_QUEUE_NUM, action)
                    for action in (SILENT, CLOSE, MALFORMED["extra fds"], Send(int(F.GET_FEATURES), U64.pack(2)))]
    good = env.fake(queue_num=7)
    healthy = await env.connect(good, timeout=2.0)
    await negotiate(healthy, PF.MQ | PF.REPLY_ACK)
    broken = [await env.connect(fake, timeout=0.2) for fake in broken_fakes]
    for conn in broken:
        await negotiate(conn, PF.MQ)

    async def hammer() -> list[int]:
        values = []
        for _ in range(20):
            reply = await healthy.request(F.GET_QUEUE_NUM)
            assert isinstance(reply.payload, vu.U64)
            values.append(reply.payload.value)
            await healthy.request(F.SET_VRING_NUM, vu.VringState(0, 256))
        return values

    async def fail(conn: Connection) -> BaseException:
        with pytest.raises(BackendError) as info:
            await conn.request(F.GET_QUEUE_NUM)
        return info.value

    results = await asyncio.gather(hammer(), *(fail(conn) for conn in broken))
    assert results[0] == [7] * 20
    assert [type(exc) for exc in results[1:]] == [BackendTimeout, BackendDisconnected, ProtocolError, ProtocolError]
    assert healthy.runstate is Runstate.RUNNING
    assert all(conn.runstate is Runstate.DISCONNECTED for conn in broken)


async def test_one_request_in_flight(env: Env) -> None:
    fake = env.fake(queue_num=3)
    conn = await env.connect(fake)
    await negotiate(conn, PF.MQ | PF.REPLY_ACK)
    replies = await asyncio.gather(*(conn.request(F.GET_QUEUE_NUM if i % 2 else F.GET_FEATURES)
                                     for i in range(100)))
    assert [r.payload for r in replies] == [vu.U64(3) if i % 2 else vu.U64(0x175007E46) for i in range(100)]


async def test_reply_ack_used_and_nonzero_ack_is_typed(env: Env) -> None:
    fake = env.fake()
    fake.acks[int(F.SET_FEATURES)] = 5
    fake.acks[int(F.SET_VRING_NUM)] = 6
    conn = await env.connect(fake)
    await conn.request(F.GET_FEATURES)
    await conn.request(F.GET_PROTOCOL_FEATURES)
    await conn.request(F.SET_PROTOCOL_FEATURES, vu.U64(PF.REPLY_ACK))
    with pytest.raises(RequestFailed) as info:
        await conn.request(F.SET_FEATURES, vu.U64(0))
    assert info.value.status == 5 and info.value.request is F.SET_FEATURES
    assert conn.runstate is Runstate.RUNNING
    # A ring message is acked only when the caller asks: by default it is only written.
    assert (await conn.request(F.SET_VRING_NUM, vu.VringState(0, 128))).payload is None
    with pytest.raises(RequestFailed) as info:
        await conn.request(F.SET_VRING_NUM, vu.VringState(0, 128), ack=True)
    assert info.value.status == 6
    await conn.request(F.SET_OWNER)
    flags = [(m.request, m.flags) for m in fake.received]
    assert dict(flags)[F.SET_PROTOCOL_FEATURES] == 0x1, "REPLY_ACK applies after SET_PROTOCOL_FEATURES"
    assert dict(flags)[F.SET_FEATURES] == 0x9 and dict(flags)[F.SET_OWNER] == 0x9
    assert [f for r, f in flags if r == F.SET_VRING_NUM] == [0x1, 0x9]
    assert dict(flags)[F.GET_FEATURES] == 0x1


async def test_without_reply_ack_nothing_waits(env: Env) -> None:
    fake = env.fake()
    conn = await env.connect(fake, timeout=0.5)
    await negotiate(conn, 0)
    reply = await conn.request(F.SET_VRING_NUM, vu.VringState(0, 128))
    assert reply.payload is None
    assert (await conn.request(F.GET_FEATURES)).payload == vu.U64(0x175007E46)
    assert fake.received[-2].flags == 0x1


async def test_unsolicited_message_disconnects(env: Env) -> None:
    fake = env.fake().on(F.SET_OWNER, Send(int(F.SET_OWNER), U64.pack(0)))
    conn = await env.connect(fake)
    await negotiate(conn, 0)
    await conn.request(F.SET_OWNER)
    for _ in range(100):
        if conn.runstate is Runstate.DISCONNECTED:
            break
        await asyncio.sleep(0.01)
    assert isinstance(conn.error, ProtocolError)
    with pytest.raises(BackendDisconnected):
        await conn.request(F.GET_FEATURES)


async def test_cancelled_request_disconnects(env: Env) -> None:
    fake = env.fake().on(F.GET_FEATURES, SILENT)
    conn = await env.connect(fake)
    task = asyncio.create_task(conn.request(F.GET_FEATURES))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert conn.runstate is Runstate.DISCONNECTED


async def test_runstate_guards(env: Env) -> None:
    fake = env.fake()
    conn = Connection(fake.connector)
    assert conn.runstate is Runstate.IDLE
    with pytest.raises(DeviceStateError):
        await conn.request(F.GET_FEATURES)
    await conn.connect()
    assert conn.runstate is Runstate.RUNNING
    with pytest.raises(DeviceStateError):
        await conn.connect()
    await conn.disconnect()
    assert conn.runstate is Runstate.DISCONNECTED and conn.error is None
    await conn.disconnect()
    with pytest.raises(BackendDisconnected):
        await conn.request(F.GET_FEATURES)
    await conn.connect()
    assert (await conn.request(F.GET_FEATURES)).payload == vu.U64(0x175007E46)
    await conn.disconnect()


async def test_requests_gated_on_negotiation(env: Env) -> None:
    fake = env.fake(features=0x100000000)
    conn = await env.connect(fake)
    with pytest.raises(UnsupportedError):
        await conn.request(F.GET_PROTOCOL_FEATURES)
    await conn.request(F.GET_FEATURES)
    with pytest.raises(UnsupportedError):
        await conn.request(F.GET_PROTOCOL_FEATURES)
    with pytest.raises(UnsupportedError):
        await conn.request(F.GET_CONFIG, vu.Config.read(0, 8))
    with pytest.raises(TypeError):
        await conn.request(F.SET_VRING_NUM, vu.U64(1))
    with pytest.raises(ValueError):
        await conn.request(F.SET_VRING_KICK, vu.VringFile(0), [])
    assert conn.runstate is Runstate.RUNNING
    assert fake.requests() == [F.GET_FEATURES]


async def test_fds_are_passed_and_reply_fds_returned(env: Env) -> None:
    fake = env.fake(protocol_features=0x8F2B | PF.INFLIGHT_SHMFD)
    conn = await env.connect(fake)
    await negotiate(conn, PF.REPLY_ACK | PF.INFLIGHT_SHMFD)
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        await conn.request(F.SET_VRING_KICK, vu.VringFile(1), [kick])
        await conn.request(F.SET_VRING_CALL, vu.VringFile(1, nofd=True))
    finally:
        os.close(kick)
    await conn.request(F.GET_FEATURES)       # a reply-bearing barrier: the ring messages carry no ack
    assert [(m.request, m.nfds) for m in fake.received[-3:-1]] == [(F.SET_VRING_KICK, 1), (F.SET_VRING_CALL, 0)]
    reply = await conn.request(F.GET_INFLIGHT_FD, vu.Inflight(0, 0, 2, 128))
    assert isinstance(reply.payload, vu.Inflight) and reply.payload.mmap_size > 0
    assert len(reply.fds) == 1 and os.fstat(reply.fds[0]).st_size == reply.payload.mmap_size
    os.close(reply.fds[0])


async def test_unix_connector(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "vu.sock")
    served = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        header = await reader.readexactly(12)
        request, _, _ = struct.unpack("<III", header)
        writer.write(struct.pack("<III", request, 0x5, 8) + U64.pack(42))
        await writer.drain()
        await reader.read()
        writer.close()
        await writer.wait_closed()
        served.set()

    server = await asyncio.start_unix_server(serve, path)
    async with server:
        async with Connection(unix_connector(path)) as conn:
            assert (await conn.request(F.GET_FEATURES)).payload == vu.U64(42)
        await asyncio.wait_for(served.wait(), 5)
    with pytest.raises(BackendDisconnected):
        await Connection(unix_connector(os.path.join(tmp_path, "missing.sock"))).connect()


class Recorder:
    def __init__(self, status: int = 0) -> None:
        self.calls: list[BackendMessage] = []
        self.status = status

    def __call__(self, message: BackendMessage) -> int:
        self.calls.append(message)
        return self.status


async def backend_channel(env: Env, fake: FakeBackend, protocol: int,
                          handlers: dict[B, Callable[[BackendMessage], int]]) -> Connection:
    conn = await env.connect(fake, backend_handlers=handlers)
    await negotiate(conn, protocol)
    await conn.open_backend_channel()
    assert fake.backend_channel is not None
    return conn


async def test_backend_channel_dispatch(env: Env) -> None:
    fake = env.fake()
    config_change = Recorder()
    conn = await backend_channel(env, fake, PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG,
                                 {B.CONFIG_CHANGE_MSG: config_change})
    assert fake.received[-1].request == F.SET_BACKEND_REQ_FD and fake.received[-1].nfds == 1
    assert fake.received[-1].need_reply
    reply = await asyncio.to_thread(fake.backend_request, B.CONFIG_CHANGE_MSG)
    assert reply == (B.CONFIG_CHANGE_MSG, 0x5, U64.pack(0), 0)
    assert len(config_change.calls) == 1 and config_change.calls[0].need_reply
    await asyncio.to_thread(fake.backend_request, B.CONFIG_CHANGE_MSG, need_reply=False)
    for _ in range(100):
        if len(config_change.calls) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(config_change.calls) == 2
    config_change.status = 3
    assert await asyncio.to_thread(fake.backend_request, B.CONFIG_CHANGE_MSG) == (2, 0x5, U64.pack(3), 0)
    assert conn.runstate is Runstate.RUNNING


@pytest.mark.parametrize("request_,payload,with_fd", [
    (B.SHARED_OBJECT_ADD, bytes(16), False),          # SHARED_OBJECT not negotiated
    (B.IOTLB_MSG, bytes(32), False),                   # ACCESS_PLATFORM not negotiated
    (B.VRING_HOST_NOTIFIER_MSG, bytes(24), True),      # HOST_NOTIFIER not negotiated; fd must be closed
    (B.VRING_CALL, bytes(8), False),                   # INBAND_NOTIFICATIONS not negotiated
    (B.SHMEM_MAP, bytes(40), True),                    # proposal without a wire format
    (99, b"", False),                                  # unknown code
    (B.CONFIG_CHANGE_MSG, bytes(8), False),            # payload where none is allowed
    (B.CONFIG_CHANGE_MSG, b"", True),                  # fd without BACKEND_SEND_FD
])
async def test_backend_channel_refusals(env: Env, request_: int, payload: bytes,
                                        with_fd: bool) -> None:
    before = fd_count()
    fake = env.fake()
    config_change = Recorder()
    conn = await backend_channel(env, fake, PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG,
                                 {B.CONFIG_CHANGE_MSG: config_change})
    fds = list(os.pipe()) if with_fd else []
    try:
        reply = await asyncio.to_thread(fake.backend_request, request_, payload, fds=fds[:1])
    finally:
        for fd in fds:
            os.close(fd)
    assert reply is not None
    code, flags, body, nfds = reply
    assert (code, flags, nfds) == (request_, 0x5, 0)
    assert U64.unpack(body)[0] != 0
    assert not config_change.calls
    assert await asyncio.to_thread(fake.backend_request, B.CONFIG_CHANGE_MSG) == (2, 0x5, U64.pack(0), 0)
    await conn.disconnect()
    fake.stop()
    assert fd_count() == before


async def test_backend_channel_lookup_always_answered(env: Env) -> None:
    fake = env.fake()
    await backend_channel(env, fake, PF.REPLY_ACK | PF.BACKEND_REQ, {})
    reply = await asyncio.to_thread(fake.backend_request, B.SHARED_OBJECT_LOOKUP, bytes(16), need_reply=True)
    assert reply is not None and reply[0] == B.SHARED_OBJECT_LOOKUP and reply[3] == 0
    assert U64.unpack(reply[2])[0] != 0


async def test_backend_channel_handler_exception_is_an_error_reply(env: Env) -> None:
    fake = env.fake()

    def broken(message: BackendMessage) -> int:
        raise RuntimeError("boom")

    await backend_channel(env, fake, PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG, {B.CONFIG_CHANGE_MSG: broken})
    reply = await asyncio.to_thread(fake.backend_request, B.CONFIG_CHANGE_MSG)
    assert reply is not None and U64.unpack(reply[2])[0] != 0


async def test_backend_channel_garbage_closes_only_that_channel(env: Env) -> None:
    fake = env.fake()
    conn = await backend_channel(env, fake, PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG, {})
    assert fake.backend_channel is not None
    fake.backend_channel.sendall(struct.pack("<III", 2, 0x3, 0))
    channel = conn.backend_channel
    assert channel is not None
    for _ in range(100):
        if channel.closed:
            break
        await asyncio.sleep(0.01)
    assert channel.closed
    assert (await conn.request(F.GET_FEATURES)).payload == vu.U64(0x175007E46)


async def test_backend_channel_bad_handler_result_keeps_channel(env: Env) -> None:
    fake = env.fake()
    conn = await backend_channel(env, fake, PF.REPLY_ACK | PF.BACKEND_REQ | PF.CONFIG,
                                 {B.CONFIG_CHANGE_MSG: lambda message: -1})
    for _ in range(2):
        reply = await asyncio.to_thread(fake.backend_request, B.CONFIG_CHANGE_MSG)
        assert reply is not None and U64.unpack(reply[2])[0] == 1
    channel = conn.backend_channel
    assert channel is not None and not channel.closed


async def test_busy_poll_keeps_every_check(env: Env) -> None:
    """Spinning for replies changes when they are read, not how they are checked."""
    before = fd_count()
    fake = env.fake(queue_num=5).on(F.GET_FEATURES, Send(int(F.GET_FEATURES), GOOD_FEATURES),
                                    MALFORMED["extra fds"])
    conn = await env.connect(fake, timeout=1.0)
    conn.busy_poll = 0.005
    await negotiate(conn, PF.MQ | PF.REPLY_ACK)
    for _ in range(20):
        assert (await conn.request(F.GET_QUEUE_NUM)).payload == vu.U64(5)
        await conn.request(F.SET_VRING_NUM, vu.VringState(0, 64))
    with pytest.raises(ProtocolError):
        await conn.request(F.GET_FEATURES)
    assert conn.runstate is Runstate.DISCONNECTED
    await conn.disconnect()
    fake.stop()
    assert fd_count() == before


async def test_busy_poll_leaves_a_late_reply_to_the_reader(env: Env) -> None:
    def late(message: Received) -> Send:
        time.sleep(0.05)
        return Send(int(F.GET_QUEUE_NUM), U64.pack(9))

    fake = env.fake().on(F.GET_QUEUE_NUM, late)
    conn = await env.connect(fake, timeout=2.0)
    conn.busy_poll = 0.001
    await negotiate(conn, PF.MQ)
    start = time.monotonic()
    assert (await conn.request(F.GET_QUEUE_NUM)).payload == vu.U64(9)
    assert time.monotonic() - start >= 0.05
    assert conn.runstate is Runstate.RUNNING


async def test_a_request_on_a_dead_connection_names_the_request_and_socket() -> None:
    """The error names the vhost-user request and the socket, not a Python method."""
    conn = Connection(unix_connector("/nonexistent.sock"), name="vhost-user /run/x.sock")
    with pytest.raises(BackendDisconnected) as info:
        conn._runstate = Runstate.DISCONNECTED
        await conn.request(F.SET_VRING_KICK)
    assert "vhost-user /run/x.sock: SET_VRING_KICK" in str(info.value)


async def test_messages_leave_in_call_order_whether_or_not_they_wait(env: Env) -> None:
    """A message without a reply written while another waits for its reply queues behind it:
    the back-end sees every message in the order the callers made them."""
    fake = env.fake(queue_num=3)
    conn = await env.connect(fake)
    await negotiate(conn, PF.MQ)
    calls = [(F.GET_QUEUE_NUM, None) if i % 3 == 0 else (F.SET_VRING_NUM, vu.VringState(0, i)) for i in range(30)]
    await conn.request(F.GET_FEATURES)      # the fake has recorded the negotiation
    before = len(fake.received)
    await asyncio.wait_for(asyncio.gather(*(conn.request(code, payload) for code, payload in calls)), 10.0)
    await conn.request(F.GET_FEATURES)      # a barrier: the fake has recorded everything before it
    sent = [(m.request, m.payload) for m in fake.received[before:before + 30]]
    assert sent == [(code, payload.pack() if payload else b"") for code, payload in calls]


async def test_a_waiter_cancelled_after_its_wake_up_passes_the_turn_on() -> None:
    from shadowvmm_vhost_user.connection import _Turn

    loop = asyncio.get_running_loop()
    turn = _Turn()
    assert turn.try_take()
    order: list[str] = []

    async def waiter(name: str) -> None:
        await turn.take(loop)
        order.append(name)
        turn.release()

    second, third = asyncio.create_task(waiter("second")), asyncio.create_task(waiter("third"))
    await asyncio.sleep(0)
    assert not turn.try_take(), "taken while others wait"
    turn.release()          # wakes "second" ...
    second.cancel()         # ... which is cancelled before it runs: "third" must get the turn
    await asyncio.wait_for(third, 1.0)
    assert order == ["third"] and second.cancelled()
    assert turn.try_take()


async def test_a_message_the_full_socket_takes_in_parts_arrives_whole() -> None:
    """The socket buffer fills while the back-end does not read: the rest of each message is
    written once it reads again, every message whole and in order."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ours.setblocking(False)

    async def connector() -> socket.socket:
        return ours

    conn = Connection(connector, timeout=5.0)
    await conn.connect()
    count = 2000
    got = bytearray()

    def drain() -> None:
        time.sleep(0.2)
        while len(got) < count * 20:
            got.extend(theirs.recv(65536))

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        for i in range(count):
            await conn.request(F.SET_VRING_NUM, vu.VringState(i % 8, i))
        await asyncio.to_thread(reader.join, 5.0)
    finally:
        await conn.disconnect()
        theirs.close()
    assert conn.error is None
    header, state = struct.Struct("<III"), struct.Struct("<II")
    messages = [(header.unpack_from(got, 20 * i), state.unpack_from(got, 20 * i + 12)) for i in range(count)]
    assert messages == [((int(F.SET_VRING_NUM), 1, 8), (i % 8, i)) for i in range(count)]


async def test_a_message_to_a_peer_that_hung_up_is_a_typed_loss(env: Env) -> None:
    """Written before the reader saw the hang-up: the send fails, the session is lost."""
    fake = env.fake()
    conn = await env.connect(fake)
    await negotiate(conn, 0)
    assert conn._sock is not None
    fake.stop()
    conn._sock.shutdown(socket.SHUT_WR)
    with pytest.raises(BackendDisconnected, match="SET_VRING_NUM: send failed"):
        await conn.request(F.SET_VRING_NUM, vu.VringState(0, 1))
    assert conn.runstate is Runstate.DISCONNECTED


class FramerRig:
    """A Framer on our non-blocking end of a socket pair: what it delivered, its errors, and the
    peer's end sending messages in pieces, an fd (a pipe's) with a message's first byte."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ours.setblocking(False)
        self.got: list[Message] = []
        self.errors: list[BaseException] = []
        self.framer = Framer(self.ours, self.got.append, self.errors.append)
        self.r, self.w = os.pipe()

    def send(self, wire: list[tuple[bytes, bool]], chunk: int) -> None:
        """Each ``(message, with_fd)`` of *wire* in pieces of *chunk* bytes, read after each."""
        for data, with_fd in wire:
            for start in range(0, len(data), chunk):
                anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", self.r))]
                       if with_fd and start == 0 else [])
                self.theirs.sendmsg([data[start:start + chunk]], anc)
                self.framer.on_readable()

    def close(self) -> None:
        for message in self.got:
            message.close_fds()
        for fd in (self.r, self.w):
            os.close(fd)
        self.ours.close()
        self.theirs.close()


@pytest.fixture
def rig() -> Iterator[FramerRig]:
    made = FramerRig()
    yield made
    made.close()


_HEADER = struct.Struct("<III")


@pytest.mark.parametrize("chunk", [1, 5, 12, 13, 1000])
def test_the_framer_assembles_messages_from_any_split_with_their_fds(rig: FramerRig, chunk: int) -> None:
    """Messages arriving in pieces of *chunk* bytes: each is delivered whole, once, with the fds
    that came with its first byte, and an empty payload makes a message of its own."""
    rig.send([(_HEADER.pack(11, 5, 8) + struct.pack("<II", 1, 77), True), (_HEADER.pack(1, 5, 0), False),
              (_HEADER.pack(15, 5, 8) + struct.pack("<Q", 0x1234), False)], chunk)
    for _ in range(3):
        rig.framer.on_readable()    # level-triggered: one message per call
    assert not rig.errors
    assert [(m.header.request, m.header.size, m.body, len(m.fds)) for m in rig.got] == [
        (11, 8, struct.pack("<II", 1, 77), 1), (1, 0, b"", 0), (15, 8, struct.pack("<Q", 0x1234), 0)]


@pytest.mark.parametrize("chunk", [1, 5, 12, 20, 64])
@pytest.mark.parametrize("expect", [0, 8, 64])
def test_a_reply_is_read_with_its_expected_body_from_any_split(rig: FramerRig, chunk: int, expect: int) -> None:
    """A front-end awaiting a reply reads header and expected body at once (``expect_body``):
    a reply of that size, a shorter one and a longer one each arrive whole with their fd,
    whatever the pieces they come in."""
    rig.framer.expect_body = expect
    rig.send([(_HEADER.pack(11, 5, 8) + struct.pack("<II", 1, 77), True), (_HEADER.pack(3, 5, 0), True),
              (_HEADER.pack(15, 5, 24) + bytes(range(24)), True)], chunk)
    assert not rig.errors
    assert [(m.header.request, m.body, len(m.fds)) for m in rig.got] == [
        (11, struct.pack("<II", 1, 77), 1), (3, b"", 1), (15, bytes(range(24)), 1)]


def test_bytes_right_after_an_expected_reply_are_refused_as_unsolicited(rig: FramerRig) -> None:
    """Only the awaited reply may be in the socket: a message sent right behind it, read in the
    same receive because the reply was shorter than expected, fails the session (typed)."""
    rig.framer.expect_body = 8
    rig.theirs.sendall(_HEADER.pack(3, 5, 0) + _HEADER.pack(1, 5, 8))
    rig.framer.on_readable()
    assert rig.got == [] and len(rig.errors) == 1
    assert isinstance(rig.errors[0], ProtocolError) and "unsolicited" in str(rig.errors[0])


async def test_each_reply_keeps_its_own_deadline_under_one_watchdog(env: Env) -> None:
    """Replies awaited one after another with short and long limits under one watchdog: an
    answered one never expires later, and a silent one awaited when the watchdog fires for an
    earlier, shorter limit expires at its own limit, neither sooner nor later."""
    fake = env.fake(queue_num=3).on(F.GET_QUEUE_NUM, SILENT)
    conn = await env.connect(fake, timeout=30.0)
    await negotiate(conn, PF.MQ)
    await conn.request(F.GET_FEATURES, timeout=0.05)       # arms the watchdog for 50 ms on
    start = time.monotonic()
    with pytest.raises(BackendTimeout, match="GET_QUEUE_NUM: no reply within 0.3 s"):
        await asyncio.wait_for(conn.request(F.GET_QUEUE_NUM, timeout=0.3), 5.0)   # awaited when it fires
    assert 0.3 <= time.monotonic() - start < 1.5
    assert conn.runstate is Runstate.DISCONNECTED


async def test_an_answered_reply_never_expires_later(env: Env) -> None:
    fake = env.fake()
    conn = await env.connect(fake, timeout=30.0)
    await conn.request(F.GET_FEATURES, timeout=0.05)
    await asyncio.sleep(0.15)           # the watchdog fires with nothing awaited
    assert conn.runstate is Runstate.RUNNING
    assert (await conn.request(F.GET_FEATURES)).payload == vu.U64(0x175007E46)
