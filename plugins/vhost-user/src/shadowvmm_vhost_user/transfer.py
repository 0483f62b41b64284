"""Back-end state transfer ("Migrating back-end state" in QEMU's ``docs/interop/vhost-user.rst``).

SET_DEVICE_STATE_FD hands the back-end one end of a pipe (or the back-end
answers with its own fd); the opaque state then flows through it, SAVE from
the back-end, LOAD to it, and CHECK_DEVICE_STATE reports whether the
back-end accepted it. Every ring must be stopped first.
"""

from __future__ import annotations

import asyncio
import os

from shadowvmm.errors import ProtocolError, RequestFailed

from .connection import Connection
from .framing import wait_fd
from .protocol import U64, DeviceStateResult, DeviceStateTransfer, FrontendRequest, TransferDirection, TransferPhase

__all__ = ["MAX_STATE_BYTES", "load", "save"]

#: Upper bound of an opaque DEVICE_STATE stream read by :func:`save`.
MAX_STATE_BYTES = 1 << 30
_CHUNK = 1 << 16


async def save(conn: Connection, timeout: float) -> bytes:
    """The back-end's opaque state (SAVE); *timeout* bounds every stall of the stream."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        read_end = await _open(conn, TransferDirection.SAVE, read_end, write_end)
    finally:
        os.close(write_end)
    try:
        blob = await _read_all(read_end, timeout)
    finally:
        os.close(read_end)
    await _check(conn)
    return blob


async def load(conn: Connection, blob: bytes, timeout: float) -> None:
    """Hand *blob* to the back-end (LOAD); *timeout* bounds every stall of the stream."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        write_end = await _open(conn, TransferDirection.LOAD, write_end, read_end)
    finally:
        os.close(read_end)
    try:
        await _write_all(write_end, blob, timeout)
    finally:
        os.close(write_end)
    await _check(conn)


async def _open(conn: Connection, direction: TransferDirection, ours: int, theirs: int) -> int:
    """SET_DEVICE_STATE_FD with *theirs*; returns our end (the back-end's own fd if it sent one)."""
    try:
        reply = await conn.request(FrontendRequest.SET_DEVICE_STATE_FD,
                                   DeviceStateTransfer(direction, TransferPhase.STOPPED), [theirs])
    except BaseException:
        os.close(ours)
        raise
    result = reply.payload
    assert isinstance(result, DeviceStateResult)
    if result.error:
        os.close(ours)
        raise RequestFailed(FrontendRequest.SET_DEVICE_STATE_FD, result.error)
    if result.has_fd:
        os.close(ours)
        return reply.fds[0]
    return ours


async def _check(conn: Connection) -> None:
    reply = await conn.request(FrontendRequest.CHECK_DEVICE_STATE)
    assert isinstance(reply.payload, U64)
    if status := reply.payload.value:
        raise RequestFailed(FrontendRequest.CHECK_DEVICE_STATE, status)


async def _wait(fd: int, writable: bool, timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await wait_fd(fd, writable=writable)
    except TimeoutError:
        raise ProtocolError(f"device state transfer stalled for {timeout:g} s") from None


async def _read_all(fd: int, timeout: float) -> bytes:
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = os.read(fd, _CHUNK)
        except BlockingIOError:
            await _wait(fd, False, timeout)
            continue
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > MAX_STATE_BYTES:
            raise ProtocolError(f"back-end state exceeds {MAX_STATE_BYTES} bytes")
        chunks.append(chunk)


async def _write_all(fd: int, blob: bytes, timeout: float) -> None:
    os.set_blocking(fd, False)
    view = memoryview(blob)
    while view:
        try:
            view = view[os.write(fd, view[:_CHUNK]):]
        except BlockingIOError:
            await _wait(fd, True, timeout)
