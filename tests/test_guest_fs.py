"""virtio-fs: the FUSE wire format and FsConfig in process, then FsDriver against a real virtiofsd."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import wait_until

from shadowvmm.config import DeviceConfig
from shadowvmm.errors import ProtocolError, ShadowVmmError
from shadowvmm.guest import fuse
from shadowvmm.guest.fs import FsDriver, FuseRequest
from shadowvmm.guest.fuse import (
    Attr,
    CreateOut,
    Dirent,
    EntryOut,
    FuseError,
    InHeader,
    InitIn,
    InitOut,
    Opcode,
    OutHeader,
    ReadIn,
    RenameIn,
    Wire,
    WriteIn,
)
from shadowvmm.machine import Machine
from shadowvmm.testing.peers import Virtiofsd
from shadowvmm.virtio.devcfg import FS_CONFIG_BASE_SIZE, FsConfig
from shadowvmm_vhost_user.backend import VhostUserBackend

# ---------------------------------------------------------------------- wire format (in process)

#: sizeof() of each struct in include/uapi/linux/fuse.h (7.36+ layouts).
UAPI_SIZES = {
    "InHeader": 40, "OutHeader": 16, "InitIn": 64, "InitOut": 64, "Attr": 88, "EntryOut": 128,
    "AttrOut": 104, "GetattrIn": 16, "ForgetIn": 8, "OpenIn": 8, "OpenOut": 16, "CreateIn": 16,
    "CreateOut": 144, "MkdirIn": 8, "RenameIn": 8, "Rename2In": 16, "ReadIn": 40, "WriteIn": 40,
    "WriteOut": 8, "ReleaseIn": 24, "FlushIn": 24, "FsyncIn": 16, "StatfsOut": 80, "DirentHeader": 24,
}

WIRE_TYPES = {cls.__name__: cls for cls in Wire.__subclasses__()}


def test_struct_sizes_match_uapi() -> None:
    assert set(WIRE_TYPES) == set(UAPI_SIZES)
    assert {name: cls.SIZE for name, cls in WIRE_TYPES.items()} == UAPI_SIZES


@pytest.mark.parametrize("name", sorted(UAPI_SIZES))
def test_struct_round_trip(name: str) -> None:
    cls = WIRE_TYPES[name]
    assert cls.field_count() == len(cls.STRUCT.unpack(bytes(cls.SIZE)))
    rng = random.Random(name)
    for _ in range(20):
        obj = cls.unpack(rng.randbytes(cls.SIZE))
        raw = obj.pack()
        assert len(raw) == cls.SIZE
        assert cls.unpack(raw) == obj
        assert cls.unpack(b"\xee" * 3 + raw, 3) == obj
    with pytest.raises(ValueError):
        cls.unpack(bytes(cls.SIZE - 1))


def test_field_offsets() -> None:
    head = InHeader(0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88).pack()
    assert [int.from_bytes(head[o:o + w], "little") for o, w in
            ((0, 4), (4, 4), (8, 8), (16, 8), (24, 4), (28, 4), (32, 4), (36, 2))] == \
        [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]
    assert OutHeader.unpack((16).to_bytes(4, "little") + (-2).to_bytes(4, "little", signed=True)
                            + (9).to_bytes(8, "little")) == OutHeader(16, -2, 9)
    init = InitIn(7, 36, 0x1000, 0xABCD, 0x5).pack()
    assert init[4:8] == (36).to_bytes(4, "little") and init[12:16] == (0xABCD).to_bytes(4, "little")
    assert init[16:20] == (5).to_bytes(4, "little") and init[20:] == bytes(44)
    out = InitOut(7, 36, max_write=1 << 20, max_pages=256, flags2=3, flags=fuse.InitFlag.INIT_EXT).pack()
    assert out[20:24] == (1 << 20).to_bytes(4, "little")
    assert out[28:30] == (256).to_bytes(2, "little") and out[32:36] == (3).to_bytes(4, "little")
    assert InitOut.unpack(out).all_flags == fuse.InitFlag.INIT_EXT | (3 << 32)
    entry = EntryOut(5, 1, 0, 0, 0, 0, Attr(ino=5, size=6, mode=stat.S_IFREG | 0o644)).pack()
    assert entry[40:48] == (5).to_bytes(8, "little") and entry[48:56] == (6).to_bytes(8, "little")
    assert entry[100:104] == (stat.S_IFREG | 0o644).to_bytes(4, "little")
    assert WriteIn(1, 2, 3).pack()[16:20] == ReadIn(1, 2, 3).pack()[16:20] == (3).to_bytes(4, "little")
    both = CreateOut.unpack(bytes(128) + (77).to_bytes(8, "little") + bytes(8))
    assert both.open.fh == 77 and both.entry.attr == Attr()


def test_opcodes() -> None:
    assert (Opcode.LOOKUP, Opcode.FORGET, Opcode.GETATTR, Opcode.MKDIR, Opcode.UNLINK, Opcode.RMDIR) == (
        1, 2, 3, 9, 10, 11)
    assert (Opcode.RENAME, Opcode.OPEN, Opcode.READ, Opcode.WRITE, Opcode.STATFS, Opcode.RELEASE) == (
        12, 14, 15, 16, 17, 18)
    assert (Opcode.FSYNC, Opcode.FLUSH, Opcode.INIT, Opcode.OPENDIR, Opcode.READDIR, Opcode.RELEASEDIR) == (
        20, 25, 26, 27, 28, 29)
    assert (Opcode.CREATE, Opcode.DESTROY, Opcode.RENAME2) == (35, 38, 45)
    for opcode, spec in fuse.OPS.items():
        assert not (spec.no_reply and (spec.reply or spec.data_reply)), opcode


def test_encode_request() -> None:
    raw = fuse.encode_request(Opcode.LOOKUP, 7, 1, names=(b"hello.txt",), uid=1, gid=2, pid=3)
    assert InHeader.unpack(raw) == InHeader(len(raw), Opcode.LOOKUP, 7, 1, 1, 2, 3)
    assert raw[40:] == b"hello.txt\0" and len(raw) == fuse.request_size(Opcode.LOOKUP, (b"hello.txt",))
    raw = fuse.encode_request(Opcode.RENAME, 8, 1, RenameIn(9), (b"a", b"bc"))
    assert raw[40:48] == (9).to_bytes(8, "little") and raw[48:] == b"a\0bc\0"
    raw = fuse.encode_request(Opcode.WRITE, 9, 2, WriteIn(3, 0, 4), payload=b"data")
    assert InHeader.unpack(raw).len == 40 + 40 + 4 and raw[-4:] == b"data"
    assert fuse.reply_room(Opcode.READ, 100) == 116
    assert fuse.reply_room(Opcode.CREATE) == 16 + 144
    assert fuse.reply_room(Opcode.FORGET) == 0
    assert fuse.reply_room(Opcode.UNLINK) == 16
    with pytest.raises(TypeError):
        fuse.encode_request(Opcode.READ, 1, 1, WriteIn(0, 0, 0))
    with pytest.raises(TypeError):
        fuse.encode_request(Opcode.LOOKUP, 1, 1, ReadIn(0, 0, 0), (b"x",))
    with pytest.raises(ValueError):
        fuse.encode_request(Opcode.RENAME, 1, 1, RenameIn(1), (b"x",))
    with pytest.raises(ValueError):
        fuse.encode_request(Opcode.READ, 1, 1, ReadIn(0, 0, 0), payload=b"x")
    for bad in (b"", b"a/b", b"a\0b", b"x" * (fuse.FUSE_NAME_MAX + 1)):
        with pytest.raises(ValueError):
            fuse.encode_request(Opcode.UNLINK, 1, 1, names=(bad,))


def test_decode_reply() -> None:
    body = EntryOut(2, 0, 0, 0, 0, 0, Attr(ino=2)).pack()
    reply = OutHeader(16 + len(body), 0, 5).pack() + body
    assert EntryOut.unpack(fuse.decode_reply(reply, 5, Opcode.LOOKUP)).nodeid == 2
    assert fuse.decode_reply(reply + b"junk", 5, Opcode.LOOKUP) == body
    with pytest.raises(FuseError) as err:
        fuse.decode_reply(OutHeader(16, -errno.ENOENT, 6).pack(), 6, Opcode.LOOKUP, "'nope'")
    assert err.value.errno == errno.ENOENT and err.value.opcode is Opcode.LOOKUP
    assert isinstance(err.value, ShadowVmmError)
    assert "LOOKUP 'nope': ENOENT" in str(err.value)
    for bad, unique in ((reply, 4), (reply[:10], 5), (OutHeader(40, 0, 5).pack(), 5),
                        (OutHeader(16, 2, 5).pack(), 5), (OutHeader(16, 0, 5).pack() + body[:10], 5)):
        with pytest.raises(ProtocolError):
            fuse.decode_reply(bad, unique, Opcode.LOOKUP)


def test_dirents() -> None:
    entries = [Dirent(1, 1, 4, b"."), Dirent(1, 2, 4, b".."), Dirent(9, 3, 8, b"hello.txt"),
               Dirent(10, 4, 8, b"x" * 255)]
    raw = fuse.pack_dirents(entries)
    assert len(raw) == sum(fuse.dirent_size(len(e.name)) for e in entries)
    assert fuse.dirent_size(1) == 32 and fuse.dirent_size(8) == 32 and fuse.dirent_size(9) == 40
    assert fuse.parse_dirents(raw) == entries
    assert fuse.parse_dirents(b"") == []
    with pytest.raises(ProtocolError):
        fuse.parse_dirents(raw[:-250])
    with pytest.raises(ProtocolError):
        fuse.parse_dirents(raw + bytes(10))


def test_fs_config() -> None:
    cfg = FsConfig("myfs", 2, 4096)
    raw = cfg.pack()
    assert len(raw) == FsConfig.SIZE == 44 and FS_CONFIG_BASE_SIZE == 40
    assert raw[:36] == b"myfs".ljust(36, b"\0")
    assert raw[36:40] == (2).to_bytes(4, "little") and raw[40:] == (4096).to_bytes(4, "little")
    assert FsConfig.unpack(raw) == cfg
    assert FsConfig.unpack(cfg.pack(FS_CONFIG_BASE_SIZE)) == FsConfig("myfs", 2, 0)
    full = FsConfig("é" * 18)
    assert full.pack()[:36] == ("é" * 18).encode() and FsConfig.unpack(full.pack()) == full
    for bad in ("", "x" * 37, "a\0b"):
        with pytest.raises(ValueError):
            FsConfig(bad)
    with pytest.raises(ValueError):
        FsConfig("x", 0)
    with pytest.raises(ValueError):
        cfg.pack(38)


# ---------------------------------------------------------------------- real virtiofsd

TAG = "shadowfs"


@dataclass
class FsRig:
    machine: Machine
    driver: FsDriver
    share: Path
    peer: Virtiofsd


@pytest.fixture
async def fs(virtiofsd: Virtiofsd) -> AsyncIterator[FsRig]:
    """A machine with one vhost-user-fs device on the virtiofsd fixture, driver started."""
    machine = Machine(memory_bytes=64 << 20)
    cfg = {"socket": str(virtiofsd.socket_path), "device": "fs", "timeout": 5.0}
    await machine.add_device(DeviceConfig("fs0", "vhost-user", cfg), backend=VhostUserBackend(cfg),
                             config_override=FsConfig(TAG).pack(FS_CONFIG_BASE_SIZE))
    driver = FsDriver(machine.guest("fs0"))
    try:
        await asyncio.wait_for(driver.start(), 10)
        yield FsRig(machine, driver, virtiofsd.source, virtiofsd)
    finally:
        if driver.init is not None:
            await asyncio.wait_for(driver.close(), 10)
        await machine.close()



@pytest.mark.peer
async def test_init_and_config(fs: FsRig) -> None:
    d = fs.driver
    assert d.config == FsConfig(TAG, 1)
    assert d.init is not None and d.init.major == 7
    assert fuse.FUSE_MIN_MINOR_VERSION <= d.minor <= fuse.FUSE_KERNEL_MINOR_VERSION
    assert 4096 <= d.max_write <= d.max_payload
    assert len(d.dev.queues) == 2
    st = await d.statfs()
    assert st.bsize > 0 and st.namelen >= 255
    root = await d.getattr(fuse.FUSE_ROOT_ID)
    assert stat.S_ISDIR(root.attr.mode)


@pytest.mark.peer
async def test_existing_file(fs: FsRig) -> None:
    d = fs.driver
    assert await d.listdir("/") == ["hello.txt"]
    assert await d.read_file("hello.txt") == b"hello\n"
    assert (await d.stat("/hello.txt")).size == 6
    with pytest.raises(FuseError) as err:
        await d.read_file("missing.txt")
    assert err.value.errno == errno.ENOENT


@pytest.mark.peer
async def test_low_level_operations(fs: FsRig) -> None:
    d = fs.driver
    created = await d.create(fuse.FUSE_ROOT_ID, "raw.bin", 0o600, os.O_RDWR)
    node, fh = created.entry.nodeid, created.open.fh
    assert stat.S_ISREG(created.entry.attr.mode) and created.entry.attr.mode & 0o777 == 0o600
    assert await d.write(node, fh, 0, b"0123456789") == 10
    assert await d.write(node, fh, 4, b"abcd") == 4
    await d.flush(node, fh)
    await d.fsync(node, fh)
    await d.fsync(node, fh, datasync=True)
    assert await d.read(node, fh, 2, 6) == b"23abcd"
    assert await d.read(node, fh, 8, 100) == b"89"
    assert await d.read(node, fh, 50, 100) == b""
    assert (await d.getattr(node, fh)).attr.size == 10
    await d.release(node, fh, os.O_RDWR, flush=True)
    assert (fs.share / "raw.bin").read_bytes() == b"0123abcd89"
    assert stat.S_IMODE((fs.share / "raw.bin").stat().st_mode) == 0o600

    again = await d.lookup(fuse.FUSE_ROOT_ID, "raw.bin")
    assert again.nodeid == node and again.attr.size == 10
    with pytest.raises(FuseError) as err:
        await d.create(fuse.FUSE_ROOT_ID, "raw.bin", 0o644, os.O_WRONLY | os.O_EXCL)
    assert err.value.errno == errno.EEXIST and err.value.opcode is Opcode.CREATE

    sub = await d.mkdir(fuse.FUSE_ROOT_ID, "sub", 0o750)
    assert stat.S_ISDIR(sub.attr.mode) and (fs.share / "sub").is_dir()
    handle = await d.opendir(sub.nodeid)
    names = {e.name for e in await d.readdir(sub.nodeid, handle.fh)}
    assert names == {b".", b".."}
    await d.releasedir(sub.nodeid, handle.fh)
    await d.rename(fuse.FUSE_ROOT_ID, "raw.bin", sub.nodeid, "moved.bin")
    assert not (fs.share / "raw.bin").exists() and (fs.share / "sub/moved.bin").read_bytes() == b"0123abcd89"
    with pytest.raises(FuseError) as err:
        await d.rmdir(fuse.FUSE_ROOT_ID, "sub")
    assert err.value.errno == errno.ENOTEMPTY
    await d.unlink(sub.nodeid, "moved.bin")
    await d.rmdir(fuse.FUSE_ROOT_ID, "sub")
    await d.forget([(node, 2), (sub.nodeid, 1)])
    assert sorted(p.name for p in fs.share.iterdir()) == ["hello.txt"]


@pytest.mark.peer
async def test_files_and_directories(fs: FsRig) -> None:
    d = fs.driver
    share = fs.share
    data = random.Random(1).randbytes(3 * d.max_payload + 12345)
    await d.write_file("big.bin", data)
    assert (share / "big.bin").read_bytes() == data
    assert await d.read_file("big.bin") == data
    await d.write_file("big.bin", b"short")
    assert (share / "big.bin").read_bytes() == b"short"
    await d.write_file("empty", b"")
    assert (share / "empty").read_bytes() == b"" and await d.read_file("empty") == b""

    await d.mkdir_path("a")
    await d.makedirs("a/b/c")
    await d.makedirs("a/b/c")
    assert (share / "a/b/c").is_dir()
    await d.write_file("a/b/c/deep.txt", b"deep")
    assert (share / "a/b/c/deep.txt").read_bytes() == b"deep"
    names = [f"f{i:03}" for i in range(150)]
    for name in names:
        (share / "a" / name).write_bytes(name.encode())
    assert sorted(await d.listdir("a")) == sorted(names + ["b"])
    assert await d.read_file("a/f042") == b"f042"

    await d.rename_path("a/b/c/deep.txt", "top.txt")
    assert (share / "top.txt").read_bytes() == b"deep" and not (share / "a/b/c/deep.txt").exists()
    await d.rename_path("a/b", "b2")
    assert (share / "b2/c").is_dir() and not (share / "a/b").exists()
    with pytest.raises(FuseError) as err:
        await d.rename_path("top.txt", "hello.txt", fuse.RENAME_NOREPLACE)
    assert err.value.errno == errno.EEXIST and err.value.opcode is Opcode.RENAME2
    await d.rename_path("top.txt", "hello.txt", fuse.RENAME_EXCHANGE)
    assert (share / "hello.txt").read_bytes() == b"deep" and (share / "top.txt").read_bytes() == b"hello\n"

    with pytest.raises(FuseError) as err:
        await d.rmdir_path("b2")
    assert err.value.errno == errno.ENOTEMPTY
    await d.rmdir_path("b2/c")
    await d.rmdir_path("b2")
    await d.remove("top.txt")
    for name in names:
        await d.remove(f"a/{name}")
    await d.rmdir_path("a")
    with pytest.raises(FuseError) as err:
        await d.remove("top.txt")
    assert err.value.errno == errno.ENOENT
    assert sorted(p.name for p in share.iterdir()) == ["big.bin", "empty", "hello.txt"]
    assert sorted(await d.listdir()) == ["big.bin", "empty", "hello.txt"]


@pytest.mark.peer
async def test_batch_is_one_kick(fs: FsRig) -> None:
    d = fs.driver
    for i in range(8):
        (fs.share / f"n{i}").write_bytes(bytes(i))
    queue = d.dev.queues[1]
    before = queue.notifies
    results = await d.submit([FuseRequest(Opcode.LOOKUP, fuse.FUSE_ROOT_ID, names=(f"n{i}".encode(),))
                              for i in range(8)] + [FuseRequest(Opcode.LOOKUP, fuse.FUSE_ROOT_ID, names=(b"zz",))])
    assert queue.notifies - before <= 1
    entries = [EntryOut.unpack(r) for r in results[:8] if isinstance(r, bytes)]
    assert [e.attr.size for e in entries] == list(range(8))
    assert isinstance(results[8], FuseError) and results[8].errno == errno.ENOENT
    await d.forget((e.nodeid, 1) for e in entries)
    with pytest.raises(ShadowVmmError):
        await d.submit([FuseRequest(Opcode.GETATTR, 1, fuse.GetattrIn())] * (d.slots_per_queue + 1))


@pytest.mark.peer
async def test_callers_beyond_the_slots_wait_for_them(fs: FsRig) -> None:
    """More concurrent callers than a request queue has slots: each waits for a slot (it used
    to fail with "N requests, 0 free slots", seen in the conformance stop-in-flight step)."""
    d = fs.driver
    callers = 3 * d.slots_per_queue
    await asyncio.wait_for(asyncio.gather(*(d.write_file(f"c{i}.txt", bytes([i]) * 100) for i in range(callers))), 20)
    got = await asyncio.wait_for(asyncio.gather(*(d.read_file(f"c{i}.txt") for i in range(callers))), 20)
    assert got == [bytes([i]) * 100 for i in range(callers)]
    assert sorted(p.name for p in fs.share.glob("c*.txt")) == sorted(f"c{i}.txt" for i in range(callers))


@pytest.mark.peer
async def test_destroy_and_disconnect_end_virtiofsd(fs: FsRig) -> None:
    await fs.driver.write_file("last.txt", b"bye")
    await asyncio.wait_for(fs.driver.close(), 10)
    assert fs.driver.init is None
    await fs.machine.close()
    await wait_until(lambda: not fs.peer.running, interval=0.01, what="virtiofsd to exit after DESTROY and disconnect")
    assert fs.peer.returncode == 0
    assert not Path(f"/proc/{fs.peer.pid}").exists()
    assert (fs.share / "last.txt").read_bytes() == b"bye"
