"""The FUSE wire format as data (Linux ``include/uapi/linux/fuse.h``, protocol 7.36).

virtio-fs carries FUSE requests unchanged (virtio v1.4 §5.11.6): every
request is ``fuse_in_header`` (40 B) + the opcode's argument struct + NUL-
terminated names + payload, and every reply is ``fuse_out_header`` (16 B) +
the opcode's reply. Each struct is a frozen dataclass owning its
:class:`struct.Struct` (``pack``/``unpack``; padding and ``unused`` fields
are pad bytes, not fields). :data:`OPS` says, per opcode, what a request
carries and what its reply is. Errors come back as a negative errno in
``fuse_out_header.error`` and are raised as :class:`FuseError`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from ..errors import ArgumentError, ArgumentTypeError, FuseError, ProtocolError
from .wire import Wire

FUSE_KERNEL_VERSION = 7
#: The minor version this driver speaks (the fuse_init_in/out layout with flags2 is 7.36's).
FUSE_KERNEL_MINOR_VERSION = 36
#: Oldest minor accepted from the device (virtio-fs needs 7.31 and later; ``virtiofsd`` checks it).
FUSE_MIN_MINOR_VERSION = 31
FUSE_ROOT_ID = 1
#: Longest name the kernel sends in one request (fs/fuse/fuse_i.h ``FUSE_NAME_MAX``).
FUSE_NAME_MAX = 1024
#: Smallest read buffer a FUSE server may demand (``FUSE_MIN_READ_BUFFER``).
FUSE_MIN_READ_BUFFER = 8192


class Opcode(enum.IntEnum):
    """``enum fuse_opcode``."""

    LOOKUP = 1
    FORGET = 2            #: no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42     #: no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51


class InitFlag(enum.IntFlag):
    """``fuse_init_in/out.flags`` (bits 0-31) and ``flags2`` (shifted up by 32)."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30     #: flags2 is valid
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33


class OpenOutFlag(enum.IntFlag):
    """``fuse_open_out.open_flags`` (``FOPEN_*``)."""

    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3
    STREAM = 1 << 4
    NOFLUSH = 1 << 5
    PARALLEL_DIRECT_WRITES = 1 << 6


RELEASE_FLUSH = 1 << 0          #: fuse_release_in.release_flags
GETATTR_FH = 1 << 0             #: fuse_getattr_in.getattr_flags: fh is valid
FSYNC_FDATASYNC = 1 << 0        #: fuse_fsync_in.fsync_flags
RENAME_NOREPLACE = 1 << 0       #: renameat2 flags (uapi linux/fs.h), fuse_rename2_in.flags
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2


@dataclass(frozen=True)
class InHeader(Wire, layout="IIQQIIIH2x"):
    """``fuse_in_header`` (40 B); ``total_extlen`` counts 8-byte extension units (7.38)."""

    len: int
    opcode: int
    unique: int
    nodeid: int
    uid: int = 0
    gid: int = 0
    pid: int = 0
    total_extlen: int = 0


@dataclass(frozen=True)
class OutHeader(Wire, layout="IiQ"):
    """``fuse_out_header`` (16 B): ``error`` is 0 or ``-errno``."""

    len: int
    error: int
    unique: int


@dataclass(frozen=True)
class InitIn(Wire, layout="IIIII44x"):
    """``fuse_init_in`` (64 B since 7.36: ``flags2`` + ``unused[11]``)."""

    major: int = FUSE_KERNEL_VERSION
    minor: int = FUSE_KERNEL_MINOR_VERSION
    max_readahead: int = 0
    flags: int = 0
    flags2: int = 0


@dataclass(frozen=True)
class InitOut(Wire, layout="IIIIHHIIHHI28x"):
    """``fuse_init_out`` (64 B; servers older than 7.23 send 24 B, padded on unpack)."""

    major: int
    minor: int
    max_readahead: int = 0
    flags: int = 0
    max_background: int = 0
    congestion_threshold: int = 0
    max_write: int = 0
    time_gran: int = 0
    max_pages: int = 0
    map_alignment: int = 0
    flags2: int = 0

    @property
    def all_flags(self) -> InitFlag:
        """``flags | flags2 << 32`` (flags2 only counts with INIT_EXT)."""
        high = self.flags2 << 32 if self.flags & InitFlag.INIT_EXT else 0
        return InitFlag(self.flags | high)


@dataclass(frozen=True)
class Attr(Wire, layout="6Q10I"):
    """``fuse_attr`` (88 B)."""

    ino: int = 0
    size: int = 0
    blocks: int = 0
    atime: int = 0
    mtime: int = 0
    ctime: int = 0
    atimensec: int = 0
    mtimensec: int = 0
    ctimensec: int = 0
    mode: int = 0
    nlink: int = 0
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    blksize: int = 0
    flags: int = 0


@dataclass(frozen=True)
class EntryOut(Wire, layout="4Q2I" + Attr.LAYOUT):
    """``fuse_entry_out`` (128 B): the reply of LOOKUP, MKDIR, MKNOD, SYMLINK, LINK."""

    nodeid: int
    generation: int
    entry_valid: int
    attr_valid: int
    entry_valid_nsec: int
    attr_valid_nsec: int
    attr: Attr

    NESTED = MappingProxyType({"attr": Attr})


@dataclass(frozen=True)
class AttrOut(Wire, layout="QI4x" + Attr.LAYOUT):
    """``fuse_attr_out`` (104 B): the reply of GETATTR and SETATTR."""

    attr_valid: int
    attr_valid_nsec: int
    attr: Attr

    NESTED = MappingProxyType({"attr": Attr})


@dataclass(frozen=True)
class GetattrIn(Wire, layout="I4xQ"):
    """``fuse_getattr_in`` (16 B)."""

    getattr_flags: int = 0
    fh: int = 0


@dataclass(frozen=True)
class ForgetIn(Wire, layout="Q"):
    """``fuse_forget_in`` (8 B): drop *nlookup* references to the request's nodeid."""

    nlookup: int


@dataclass(frozen=True)
class OpenIn(Wire, layout="II"):
    """``fuse_open_in`` (8 B): ``flags`` are open(2) flags; OPEN and OPENDIR."""

    flags: int = 0
    open_flags: int = 0


@dataclass(frozen=True)
class OpenOut(Wire, layout="QI4x"):
    """``fuse_open_out`` (16 B)."""

    fh: int
    open_flags: int = 0


@dataclass(frozen=True)
class CreateIn(Wire, layout="IIII"):
    """``fuse_create_in`` (16 B); the name follows."""

    flags: int
    mode: int
    umask: int = 0
    open_flags: int = 0


@dataclass(frozen=True)
class CreateOut(Wire, layout=EntryOut.LAYOUT + OpenOut.LAYOUT):
    """CREATE's reply: ``fuse_entry_out`` then ``fuse_open_out`` (144 B)."""

    entry: EntryOut
    open: OpenOut

    NESTED = MappingProxyType({"entry": EntryOut, "open": OpenOut})


@dataclass(frozen=True)
class MkdirIn(Wire, layout="II"):
    """``fuse_mkdir_in`` (8 B); the name follows."""

    mode: int
    umask: int = 0


@dataclass(frozen=True)
class RenameIn(Wire, layout="Q"):
    """``fuse_rename_in`` (8 B); old name and new name follow."""

    newdir: int


@dataclass(frozen=True)
class Rename2In(Wire, layout="QI4x"):
    """``fuse_rename2_in`` (16 B): RENAME with renameat2 flags; old and new name follow."""

    newdir: int
    flags: int = 0


@dataclass(frozen=True)
class ReadIn(Wire, layout="QQIIQI4x"):
    """``fuse_read_in`` (40 B): READ and READDIR."""

    fh: int
    offset: int
    size: int
    read_flags: int = 0
    lock_owner: int = 0
    flags: int = 0


@dataclass(frozen=True)
class WriteIn(Wire, layout="QQIIQI4x"):
    """``fuse_write_in`` (40 B); ``size`` bytes of data follow."""

    fh: int
    offset: int
    size: int
    write_flags: int = 0
    lock_owner: int = 0
    flags: int = 0


@dataclass(frozen=True)
class WriteOut(Wire, layout="I4x"):
    """``fuse_write_out`` (8 B)."""

    size: int


@dataclass(frozen=True)
class ReleaseIn(Wire, layout="QIIQ"):
    """``fuse_release_in`` (24 B): RELEASE and RELEASEDIR."""

    fh: int
    flags: int = 0
    release_flags: int = 0
    lock_owner: int = 0


@dataclass(frozen=True)
class FlushIn(Wire, layout="Q8xQ"):
    """``fuse_flush_in`` (24 B)."""

    fh: int
    lock_owner: int = 0


@dataclass(frozen=True)
class FsyncIn(Wire, layout="QI4x"):
    """``fuse_fsync_in`` (16 B): FSYNC and FSYNCDIR."""

    fh: int
    fsync_flags: int = 0


@dataclass(frozen=True)
class StatfsOut(Wire, layout="5Q3I4x24x"):
    """``fuse_statfs_out`` = ``fuse_kstatfs`` (80 B)."""

    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int


@dataclass(frozen=True)
class DirentHeader(Wire, layout="QQII"):
    """``fuse_dirent`` without its name (24 B = ``FUSE_NAME_OFFSET``)."""

    ino: int
    off: int
    namelen: int
    type: int


@dataclass(frozen=True)
class Dirent:
    """One READDIR entry; ``type`` is the ``DT_*`` value (``mode >> 12``), ``off`` the next offset."""

    ino: int
    off: int
    type: int
    name: bytes


def dirent_size(namelen: int) -> int:
    """``FUSE_DIRENT_SIZE``: header + name, rounded up to 8 bytes."""
    return (DirentHeader.SIZE + namelen + 7) & ~7


def pack_dirents(entries: Sequence[Dirent]) -> bytes:
    """A READDIR reply body (what a server sends)."""
    out = bytearray()
    for e in entries:
        record = DirentHeader(e.ino, e.off, len(e.name), e.type).pack() + e.name
        out += record.ljust(dirent_size(len(e.name)), b"\0")
    return bytes(out)


def parse_dirents(data: bytes | memoryview) -> list[Dirent]:
    """Parse a READDIR reply body; a truncated trailing record is a protocol error."""
    out: list[Dirent] = []
    pos = 0
    while pos < len(data):
        head = DirentHeader.unpack(data, pos) if len(data) - pos >= DirentHeader.SIZE else None
        if head is None or head.namelen == 0 or head.namelen > FUSE_NAME_MAX \
                or pos + DirentHeader.SIZE + head.namelen > len(data):
            raise ProtocolError(f"malformed fuse_dirent at byte {pos} of {len(data)}")
        start = pos + DirentHeader.SIZE
        out.append(Dirent(head.ino, head.off, head.type, bytes(data[start:start + head.namelen])))
        pos += dirent_size(head.namelen)
    return out


@dataclass(frozen=True)
class OpSpec:
    """What one opcode's request carries and what comes back."""

    args: type[Wire] | None = None      #: fixed argument struct after the header
    names: int = 0                      #: NUL-terminated names after the struct
    payload: bool = False               #: raw data follows (WRITE)
    reply: type[Wire] | None = None     #: fixed-size reply struct
    data_reply: bool = False            #: the reply is raw data of at most the requested size
    no_reply: bool = False              #: the server sends nothing back (FORGET)


#: Request/reply shapes of the opcodes this package speaks (fuse.h comments and fs/fuse/*.c).
OPS: Mapping[Opcode, OpSpec] = MappingProxyType({
    Opcode.INIT: OpSpec(InitIn, reply=InitOut),
    Opcode.DESTROY: OpSpec(),
    Opcode.LOOKUP: OpSpec(names=1, reply=EntryOut),
    Opcode.FORGET: OpSpec(ForgetIn, no_reply=True),
    Opcode.GETATTR: OpSpec(GetattrIn, reply=AttrOut),
    Opcode.STATFS: OpSpec(reply=StatfsOut),
    Opcode.OPEN: OpSpec(OpenIn, reply=OpenOut),
    Opcode.OPENDIR: OpSpec(OpenIn, reply=OpenOut),
    Opcode.CREATE: OpSpec(CreateIn, names=1, reply=CreateOut),
    Opcode.MKDIR: OpSpec(MkdirIn, names=1, reply=EntryOut),
    Opcode.READ: OpSpec(ReadIn, data_reply=True),
    Opcode.READDIR: OpSpec(ReadIn, data_reply=True),
    Opcode.WRITE: OpSpec(WriteIn, payload=True, reply=WriteOut),
    Opcode.RELEASE: OpSpec(ReleaseIn),
    Opcode.RELEASEDIR: OpSpec(ReleaseIn),
    Opcode.FLUSH: OpSpec(FlushIn),
    Opcode.FSYNC: OpSpec(FsyncIn),
    Opcode.FSYNCDIR: OpSpec(FsyncIn),
    Opcode.UNLINK: OpSpec(names=1),
    Opcode.RMDIR: OpSpec(names=1),
    Opcode.RENAME: OpSpec(RenameIn, names=2),
    Opcode.RENAME2: OpSpec(Rename2In, names=2),
})


def check_name(name: bytes) -> bytes:
    """A path component as FUSE carries it: 1..FUSE_NAME_MAX bytes, no NUL, no ``/``."""
    if not name or len(name) > FUSE_NAME_MAX or b"\0" in name or b"/" in name:
        raise ArgumentError(f"invalid FUSE name {name!r}")
    return name


def encode_request(opcode: Opcode, unique: int, nodeid: int, args: Wire | None = None,
                   names: Sequence[bytes] = (), payload: bytes | bytearray | memoryview = b"", *,
                   uid: int = 0, gid: int = 0, pid: int = 0) -> bytes:
    """``fuse_in_header`` + args + names + payload, checked against :data:`OPS`."""
    spec = OPS.get(opcode)
    if spec is None:
        raise ArgumentError(f"no wire spec for {opcode!r}")
    if spec.args is not None and type(args) is not spec.args:
        raise ArgumentTypeError(f"{opcode.name} takes {spec.args.__name__}, not {type(args).__name__}")
    if spec.args is None and args is not None:
        raise ArgumentTypeError(f"{opcode.name} takes no argument struct")
    if len(names) != spec.names:
        raise ArgumentError(f"{opcode.name} takes {spec.names} name(s), got {len(names)}")
    if payload and not spec.payload:
        raise ArgumentError(f"{opcode.name} carries no payload")
    body = (args.pack() if args is not None else b"") + b"".join(check_name(n) + b"\0" for n in names)
    length = InHeader.SIZE + len(body) + len(payload)
    return InHeader(length, int(opcode), unique, nodeid, uid, gid, pid).pack() + body + bytes(payload)


def request_size(opcode: Opcode, names: Sequence[bytes] = (), payload_len: int = 0) -> int:
    """Bytes :func:`encode_request` produces for these arguments."""
    spec = OPS[opcode]
    return (InHeader.SIZE + (spec.args.SIZE if spec.args is not None else 0)
            + sum(len(n) + 1 for n in names) + payload_len)


def reply_room(opcode: Opcode, data_size: int = 0) -> int:
    """Device-writable bytes a request needs: out header + reply (0 for FORGET)."""
    spec = OPS[opcode]
    if spec.no_reply:
        return 0
    body = data_size if spec.data_reply else (spec.reply.SIZE if spec.reply is not None else 0)
    return OutHeader.SIZE + body


def decode_reply(data: bytes | memoryview, unique: int, opcode: Opcode, what: str = "") -> bytes:
    """Check a reply (header, unique, length) and return its body; ``-errno`` raises :class:`FuseError`."""
    if len(data) < OutHeader.SIZE:
        raise ProtocolError(f"FUSE {opcode.name}: reply of {len(data)} bytes has no fuse_out_header")
    head = OutHeader.unpack(data)
    if head.unique != unique:
        raise ProtocolError(f"FUSE {opcode.name}: reply for unique {head.unique}, expected {unique}")
    if head.len < OutHeader.SIZE or head.len > len(data):
        raise ProtocolError(f"FUSE {opcode.name}: out header len {head.len}, {len(data)} bytes written")
    if head.error:
        if not -4095 <= head.error < 0:
            raise ProtocolError(f"FUSE {opcode.name}: error field {head.error} is not -errno")
        raise FuseError(-head.error, opcode, what)
    body = bytes(data[OutHeader.SIZE:head.len])
    spec = OPS[opcode]
    if spec.reply is not None and len(body) < spec.reply.SIZE and opcode is not Opcode.INIT:
        raise ProtocolError(f"FUSE {opcode.name}: {len(body)}-byte reply, {spec.reply.__name__} "
                            f"is {spec.reply.SIZE}")
    return body
