"""Observability of the vhost-user plugin: every message traced at DEBUG in both directions
(request, flags, size, fds, reply latency) on the front-end connection and the back-end
channel, lifecycle transitions at INFO, and the identity of the peer process."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path

import pytest

from shadowvmm.backends.base import Capability, PeerIdentity
from shadowvmm.config import DeviceConfig
from shadowvmm.errors import BackendDisconnected
from shadowvmm.guest.blk import BlkDriver
from shadowvmm.machine import Machine
from shadowvmm.testing.peers import RefBlk
from shadowvmm.workload import blk_write_verify
from shadowvmm_vhost_user import VhostUserBackend
from shadowvmm_vhost_user import protocol as vu
from shadowvmm_vhost_user.fake import CLOSE, FakeBackend
from shadowvmm_vhost_user.refbackend import RefBlkServer

F = vu.FrontendRequest
LOGGER = "shadowvmm_vhost_user"
SEND = re.compile(r": send (\w+) flags=0x[0-9a-f]+ size=(\d+) fds=(\d+)$")
RECV = re.compile(r": recv (\w+) reply flags=0x[0-9a-f]+ size=(\d+) fds=(\d+) latency=(\d+)us$")


def messages(caplog: pytest.LogCaptureFixture, level: int, pattern: re.Pattern[str]) -> list[re.Match[str]]:
    return [m for r in caplog.records if r.levelno == level and r.name.startswith(LOGGER)
            if (m := pattern.search(r.getMessage()))]


async def test_a_realize_and_start_trace_every_message_both_ways(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Realize, start and a little I/O against the reference back-end: every request it received
    was traced when sent, in the same order, and every reply with its latency."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    server = await RefBlkServer(str(tmp_path / "ref.sock"), size=4 << 20).start()
    machine = Machine(16 << 20)
    try:
        backend = VhostUserBackend({"socket": server.path, "device": "blk", "queues": 2})
        await machine.add_device(DeviceConfig("blk0", "vhost-user", {}, queue_size=64), backend)
        guest = machine.guest("blk0")
        try:
            driver = BlkDriver(guest)
            await driver.start()
            result = await blk_write_verify(driver, requests=8, queue_depth=2, block_bytes=4096, seed=3)
            assert result.mismatches == []
        finally:
            guest.close()
    finally:
        await machine.close()
        await server.close()
    sent = messages(caplog, logging.DEBUG, SEND)
    replies = messages(caplog, logging.DEBUG, RECV)
    assert [m[1] for m in sent] == [F(code).name for code in server.received]
    assert {"GET_FEATURES", "SET_MEM_TABLE", "SET_VRING_KICK", "GET_VRING_BASE"} <= {m[1] for m in sent}
    assert all(int(m[3]) >= 1 for m in sent if m[1] in ("SET_MEM_TABLE", "SET_VRING_KICK", "SET_VRING_CALL"))
    # Every reply is traced with its latency: those of the requests with a reply body and of
    # the ones sent with NEED_REPLY (the spec's ``ack``, once REPLY_ACK is negotiated).
    specs = vu.FRONTEND_SPECS
    answered = [m[1] for m in sent if m[1] != "SET_PROTOCOL_FEATURES"
                and (specs[F[m[1]]].reply is not None or specs[F[m[1]]].ack)]
    assert [m[1] for m in replies] == answered
    assert "SET_VRING_ENABLE" in [m[1] for m in sent] and "SET_VRING_ENABLE" not in answered
    features = next(m for m in replies if m[1] == "GET_FEATURES")
    assert (features[2], features[3]) == ("8", "0")
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.name.startswith(LOGGER)]
    for transition in ("connected", "protocol features negotiated", "realized", "closed"):
        assert any(transition in line for line in info), f"no INFO line for {transition!r}: {info}"


async def test_the_back_end_channel_traces_requests_and_replies(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    fake = FakeBackend()
    backend = VhostUserBackend({"socket": "/nonexistent", "device": "blk"}, connector=fake.connector)
    try:
        await backend.connect()
        reply = await asyncio.to_thread(fake.backend_request, vu.BackendRequest.CONFIG_CHANGE_MSG)
        assert reply == (2, 0x5, vu.U64(0).pack(), 0)
    finally:
        await backend.close()
        fake.stop()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith(LOGGER)]
    assert any(re.search(r"back-end channel recv CONFIG_CHANGE_MSG flags=0x9 size=0 fds=0$", line) for line in lines)
    assert any(re.search(r"back-end channel send CONFIG_CHANGE_MSG reply flags=0x5 size=8 fds=0 latency=\d+us$",
                         line) for line in lines)
    assert any(line.endswith("back-end channel open") for line in lines)


async def test_a_lost_session_is_logged_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake = FakeBackend().on(F.GET_CONFIG, CLOSE)
    backend = VhostUserBackend({"socket": "/nonexistent", "device": "blk"}, connector=fake.connector)
    try:
        await backend.connect()
        with pytest.raises(BackendDisconnected):
            await backend.get_config(0, 8)
    finally:
        await backend.close()
        fake.stop()
    lost = [r for r in caplog.records if "connection lost" in r.getMessage()]
    assert lost and lost[0].levelno >= logging.INFO and "peer closed the connection" in lost[0].getMessage()
    assert not [r for r in caplog.records if r.levelno == logging.DEBUG], "DEBUG records while tracing is off"


async def test_peer_identity_names_the_process_holding_the_other_end(tmp_path: Path) -> None:
    """In process, the peer socket is ours; in its own process, the reference back-end's pid."""
    fake = FakeBackend()
    backend = VhostUserBackend({"socket": "/nonexistent", "device": "blk"}, connector=fake.connector)
    assert Capability.PEER_IDENTITY in backend.capabilities()
    assert backend.peer_identity() is None
    try:
        await backend.connect()
        identity = await asyncio.to_thread(backend.peer_identity)
        assert identity is not None
        assert identity == PeerIdentity(os.getpid(), os.getuid(), identity.description)
        assert f"(pid {os.getpid()})" in identity.description
    finally:
        await backend.close()
        fake.stop()
    assert backend.peer_identity() is None

    with RefBlk(tmp_path, size=1 << 20, queues=1) as peer:
        remote = VhostUserBackend({"socket": str(peer.socket_path), "device": "blk"})
        try:
            await remote.connect()
            identity = await asyncio.to_thread(remote.peer_identity)
            assert identity is not None and identity.pid == peer.pid
        finally:
            await remote.close()
