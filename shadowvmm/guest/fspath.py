"""Path helpers of the virtio-fs guest model (:class:`~.fs.FsDriver`): paths resolved from
the root node (nodeid 1) with LOOKUP, each lookup reference given back with FORGET.

The functions take the driver; :class:`~.fs.FsDriver` offers each public one as a method
(``await fs.read_file("/a/b")``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import ArgumentError, ProtocolError
from . import fuse
from .fuse import FUSE_ROOT_ID, FuseError

if TYPE_CHECKING:
    from .fs import FsDriver


def split(path: str | bytes) -> list[bytes]:
    """*path*'s components, without empty ones and ``.``."""
    return [part for part in os.fsencode(path).split(b"/") if part and part != b"."]


async def walk(fs: FsDriver, parts: Sequence[bytes], held: list[int]) -> int:
    """The nodeid of *parts* from the root; every LOOKUP's nodeid is appended to *held*."""
    nodeid = FUSE_ROOT_ID
    for part in parts:
        entry = await fs.lookup(nodeid, part)
        held.append(entry.nodeid)
        nodeid = entry.nodeid
    return nodeid


async def release_lookups(fs: FsDriver, held: list[int]) -> None:
    counts: dict[int, int] = {}
    for nodeid in held:
        counts[nodeid] = counts.get(nodeid, 0) + 1
    await fs.forget(counts.items())


async def resolve_parent(fs: FsDriver, path: str | bytes, held: list[int]) -> tuple[int, bytes]:
    parts = split(path)
    if not parts:
        raise ArgumentError(f"path {path!r} names the root")
    return await walk(fs, parts[:-1], held), parts[-1]


async def stat(fs: FsDriver, path: str | bytes) -> fuse.Attr:
    held: list[int] = []
    try:
        return (await fs.getattr(await walk(fs, split(path), held))).attr
    finally:
        await release_lookups(fs, held)


async def read_file(fs: FsDriver, path: str | bytes) -> bytes:
    """The whole content of the file at *path*."""
    held: list[int] = []
    try:
        nodeid = await walk(fs, split(path), held)
        handle = await fs.open(nodeid, os.O_RDONLY)
        try:
            return await fs.read_all(nodeid, handle.fh)
        finally:
            await fs.release(nodeid, handle.fh, os.O_RDONLY)
    finally:
        await release_lookups(fs, held)


async def write_file(fs: FsDriver, path: str | bytes, data: bytes, mode: int = 0o644) -> None:
    """Truncate (OPEN O_TRUNC) or CREATE the file at *path*, write *data*, FLUSH, RELEASE."""
    held: list[int] = []
    flags = os.O_WRONLY | os.O_TRUNC
    try:
        parent, name = await resolve_parent(fs, path, held)
        try:
            entry = await fs.lookup(parent, name)
        except FuseError as exc:
            if exc.errno != errno.ENOENT:
                raise
            created = await fs.create(parent, name, mode, flags)
            nodeid, fh = created.entry.nodeid, created.open.fh
        else:
            nodeid = entry.nodeid
            held.append(nodeid)
            fh = (await fs.open(nodeid, flags)).fh
        if nodeid not in held:
            held.append(nodeid)
        try:
            written = await fs.write_all(nodeid, fh, data)
            if written != len(data):
                raise ProtocolError(f"short write to {path!r}: {written} of {len(data)} bytes")
            await fs.flush(nodeid, fh)
        finally:
            await fs.release(nodeid, fh, flags)
    finally:
        await release_lookups(fs, held)


async def listdir(fs: FsDriver, path: str | bytes = "/") -> list[str]:
    """Names in the directory at *path*, without ``.`` and ``..``, in device order."""
    held: list[int] = []
    try:
        nodeid = await walk(fs, split(path), held)
        entries = await fs.readdir_all(nodeid)
    finally:
        await release_lookups(fs, held)
    return [os.fsdecode(e.name) for e in entries if e.name not in (b".", b"..")]


async def makedirs(fs: FsDriver, path: str | bytes, mode: int = 0o755) -> None:
    """``mkdir -p``."""
    held: list[int] = []
    try:
        nodeid = FUSE_ROOT_ID
        for part in split(path):
            try:
                entry = await fs.lookup(nodeid, part)
            except FuseError as exc:
                if exc.errno != errno.ENOENT:
                    raise
                entry = await fs.mkdir(nodeid, part, mode)
            held.append(entry.nodeid)
            nodeid = entry.nodeid
    finally:
        await release_lookups(fs, held)


async def mkdir_path(fs: FsDriver, path: str | bytes, mode: int = 0o755) -> None:
    held: list[int] = []
    try:
        parent, name = await resolve_parent(fs, path, held)
        held.append((await fs.mkdir(parent, name, mode)).nodeid)
    finally:
        await release_lookups(fs, held)


async def lookup_held(fs: FsDriver, parent: int, name: bytes, held: list[int], *, missing_ok: bool = False) -> None:
    """LOOKUP a victim before UNLINK/RMDIR/RENAME, as the kernel has its dentry: virtiofsd
    resolves the name through its inode table and answers EIO for a node it does not know."""
    try:
        held.append((await fs.lookup(parent, name)).nodeid)
    except FuseError as exc:
        if not (missing_ok and exc.errno == errno.ENOENT):
            raise


async def remove(fs: FsDriver, path: str | bytes) -> None:
    """UNLINK the file at *path*."""
    held: list[int] = []
    try:
        parent, name = await resolve_parent(fs, path, held)
        await lookup_held(fs, parent, name, held)
        await fs.unlink(parent, name)
    finally:
        await release_lookups(fs, held)


async def rmdir_path(fs: FsDriver, path: str | bytes) -> None:
    held: list[int] = []
    try:
        parent, name = await resolve_parent(fs, path, held)
        await lookup_held(fs, parent, name, held)
        await fs.rmdir(parent, name)
    finally:
        await release_lookups(fs, held)


async def rename_path(fs: FsDriver, old: str | bytes, new: str | bytes, flags: int = 0) -> None:
    """RENAME (RENAME2 with *flags*) *old* to *new*; both are paths from the root."""
    held: list[int] = []
    try:
        old_parent, old_name = await resolve_parent(fs, old, held)
        await lookup_held(fs, old_parent, old_name, held)
        new_parent, new_name = await resolve_parent(fs, new, held)
        await lookup_held(fs, new_parent, new_name, held, missing_ok=True)
        await fs.rename(old_parent, old_name, new_parent, new_name, flags)
    finally:
        await release_lookups(fs, held)
