"""Device state model (msgpack, versioned) and the framed migration stream."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import pytest

from shadowvmm.backends.base import RingState
from shadowvmm.errors import IncompatibleStateError, StreamError
from shadowvmm.migration.state import (
    FORMAT_VERSION,
    BlkStandard,
    DeviceState,
    FsStandard,
    NetStandard,
    OpaquePart,
    QueueState,
    RingPart,
    StateFormatError,
    TransportState,
    UnknownRequiredFieldError,
)
from shadowvmm.migration.stream import (
    Endpoint,
    FileChannel,
    PageBatch,
    RecordHeader,
    RecordType,
    StreamHeader,
    StreamReader,
    StreamWriter,
)
from shadowvmm.virtio.constants import DeviceId, Feature


def transport(packed: bool = False, kind: str = "pci") -> TransportState:
    features = int(Feature.VERSION_1) | (int(Feature.RING_PACKED) if packed else 0)
    queues = (QueueState(0, 128, True, 0x10000, 0x11000, 0x12000, 1, 256),
              QueueState(1, 256, False, 0, 0, 0, 0xFFFF, 256))
    config = (2048).to_bytes(8, "little") + bytes(24) + b"\x01" + bytes(27)
    return TransportState(kind, 0x0F, False, False, False, features | 0x46, features | 0x46, 1, 0, 1, 0, True, 3,
                          config, 0, queues, bytes(256) if kind == "pci" else None,
                          bytes(48) if kind == "pci" else None)


def blk_state(**kw) -> DeviceState:
    regs = kw.pop("transport", transport())
    rings = kw.pop("rings", (RingPart.from_ring_state(RingState(0, 641), regs.packed),))
    return DeviceState("blk0", int(DeviceId.BLOCK), regs, rings, BlkStandard.capture(regs.config, regs), **kw)


def test_round_trip_with_every_part() -> None:
    state = blk_state(opaque=OpaquePart("vhost-user", 1, b"\x00blob"))
    again = DeviceState.unpack(state.pack())
    assert again == state
    assert again.standard == BlkStandard(2048, 1)
    assert again.ring_states() == {0: RingState(0, 641)}


def test_packed_ring_part_keeps_indexes_and_wraps() -> None:
    regs = transport(packed=True)
    part = RingPart.from_ring_state(RingState.packed(0, 5, False, 3, True), packed=True)
    state = blk_state(transport=regs, rings=(part,))
    again = DeviceState.unpack(state.pack())
    assert again.rings[0].describe() == {"avail_idx": 5, "avail_wrap": False, "used_idx": 3, "used_wrap": True}
    with pytest.raises(StateFormatError, match="layout"):
        blk_state(transport=regs, rings=(RingPart(0, "split", 1),)).pack()


def test_standard_parts() -> None:
    net_cfg = bytes.fromhex("525400123456") + (1).to_bytes(2, "little") + (2).to_bytes(2, "little")
    regs = transport()
    assert NetStandard.capture(net_cfg, regs) == NetStandard(bytes.fromhex("525400123456"), 1, 0)
    fs = FsStandard.capture(b"myfs".ljust(36, b"\0") + (1).to_bytes(4, "little"), regs)
    assert fs == FsStandard("myfs", 1)
    with pytest.raises(IncompatibleStateError, match="tag"):
        fs.check_destination(b"other".ljust(40, b"\0"), "fs0")
    with pytest.raises(IncompatibleStateError, match="sectors"):
        BlkStandard(2048, 1).check_destination((4096).to_bytes(8, "little"), "blk0")
    assert BlkStandard(2048, 0).backend_writes(regs.config) == [(32, b"\x00")]


def _rewrite(blob: bytes, edit) -> bytes:
    data = msgpack.unpackb(blob, raw=False)
    edit(data)
    return msgpack.packb(data, use_bin_type=True)


def test_unknown_required_field_refused_optional_ignored() -> None:
    blob = blk_state().pack()
    ignored = _rewrite(blob, lambda d: d["!device"]["!transport"].__setitem__("future_hint", 7))
    assert DeviceState.unpack(ignored) == blk_state()
    refused = _rewrite(blob, lambda d: d["!device"]["!transport"].__setitem__("!future_thing", 7))
    with pytest.raises(UnknownRequiredFieldError, match="future_thing"):
        DeviceState.unpack(refused)
    top = _rewrite(blob, lambda d: d.__setitem__("!encryption", "aes"))
    with pytest.raises(UnknownRequiredFieldError, match="encryption"):
        DeviceState.unpack(top)
    kind = _rewrite(blob, lambda d: d["!device"]["!standard"].__setitem__("!type", "gpu"))
    with pytest.raises(UnknownRequiredFieldError, match="gpu"):
        DeviceState.unpack(kind)


def test_field_read_under_either_spelling_and_bad_keys_refused() -> None:
    """The one-lookup decode (Section.WIRE_KEYS) reads a field written with or without the
    required prefix, and still refuses keys that are not names."""
    blob = blk_state().pack()
    plain = _rewrite(blob, lambda d: d["!device"]["!transport"].__setitem__(
        "kind", d["!device"]["!transport"].pop("!kind")))
    assert DeviceState.unpack(plain) == blk_state()
    for key in ("!", "!!", ""):
        bad = _rewrite(blob, lambda d, key=key: d["!device"]["!transport"].__setitem__(key, 1))
        with pytest.raises(StateFormatError, match="bad key"):
            DeviceState.unpack(bad)


def test_newer_reader_accepts_older_state() -> None:
    older = _rewrite(blk_state().pack(), lambda d: d["!device"]["!transport"]["!queues"][0].pop("max_size"))
    assert DeviceState.unpack(older).transport.queues[0].max_size == 0


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 99])
def test_newer_format_refused_naming_the_version(version: int) -> None:
    newer = _rewrite(blk_state().pack(), lambda d: d.__setitem__("!format", version))
    with pytest.raises(IncompatibleStateError, match=rf"blk0: state format {version} is newer than this "
                                                     rf"reader supports \(formats 1\.\.{FORMAT_VERSION}\)"):
        DeviceState.unpack(newer)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["!device"]["!transport"].pop("!guest_status"), "guest_status"),
    (lambda d: d["!device"]["!transport"].__setitem__("!guest_status", "x"), "expected int"),
    (lambda d: d["!device"]["!transport"].__setitem__("!guest_status", 300), "outside"),
    (lambda d: d["!device"]["!transport"].__setitem__("!kind", "usb"), "kind"),
    (lambda d: d["!device"]["!rings"][0].__setitem__("!index", 9), "distinct queue"),
    (lambda d: d.__setitem__("!format", 0), "format"),
])
def test_malformed_states_refused(edit, match: str) -> None:
    with pytest.raises(StateFormatError, match=match):
        DeviceState.unpack(_rewrite(blk_state().pack(), edit))
    with pytest.raises(StateFormatError):
        DeviceState.unpack(b"\xc1not msgpack")


def test_opaque_part_compatibility() -> None:
    part = OpaquePart("inproc-blk", 2, b"x")
    part.check_loadable("inproc-blk", 2, "blk0")
    with pytest.raises(IncompatibleStateError, match="'inproc-blk'.*'vhost-user'"):
        part.check_loadable("vhost-user", 9, "blk0")
    with pytest.raises(IncompatibleStateError, match="newer"):
        part.check_loadable("inproc-blk", 1, "blk0")


# ---------------------------------------------------------------------- stream


async def write_stream(path: Path, records: list[tuple[RecordType, bytes]], end: bool = True) -> bytes:
    channel = FileChannel(str(path), "wb")
    writer = StreamWriter(channel)
    await writer.start()
    for rtype, payload in records:
        await writer.write(rtype, payload)
    if end:
        await writer.end()
    await channel.close()
    return path.read_bytes()


async def read_all(path: Path) -> list:
    channel = FileChannel(str(path), "rb")
    reader = StreamReader(channel)
    await reader.start()
    out = []
    while not reader.ended:
        out.append(await reader.read())
    await channel.close()
    return out


async def test_stream_round_trip_and_faults(tmp_path: Path) -> None:
    page = PageBatch(((0x2000, b"\xab" * 4096), (0x5000, bytes(4096))))
    records = [(RecordType.HELLO, msgpack.packb({"mode": "copy"})), (RecordType.PAGES, page.pack()),
               (RecordType.DEVICE, blk_state().pack())]
    path = tmp_path / "s.bin"
    raw = await write_stream(path, records)
    got = await read_all(path)
    assert [r.type for r in got] == [RecordType.HELLO, RecordType.PAGES, RecordType.DEVICE, RecordType.END]
    assert PageBatch.unpack(got[1].payload) == page
    assert DeviceState.unpack(got[2].payload) == blk_state()
    header = StreamHeader.STRUCT.size
    for cut in (header - 3, header + 5, len(raw) // 2, len(raw) - 1):
        path.write_bytes(raw[:cut])
        with pytest.raises(StreamError, match="truncated"):
            await read_all(path)
    for index in (header + RecordHeader.STRUCT.size + 2, len(raw) - 30):
        bad = bytearray(raw)
        bad[index] ^= 0xFF
        path.write_bytes(bytes(bad))
        with pytest.raises(StreamError, match="CRC32|not msgpack|unknown|exceeds|records"):
            await read_all(path)
    path.write_bytes(b"NOTSVMM!" + raw[8:])
    with pytest.raises(StreamError, match="magic"):
        await read_all(path)
    await write_stream(path, records, end=False)
    with pytest.raises(StreamError, match="truncated"):
        await read_all(path)


def test_record_header_validation() -> None:
    with pytest.raises(StreamError, match="unknown record type"):
        RecordHeader.unpack(RecordHeader.STRUCT.pack(99, 0, 0, 0))
    with pytest.raises(StreamError, match="exceeds"):
        RecordHeader.unpack(RecordHeader.STRUCT.pack(3, 0, 1 << 30, 0))
    with pytest.raises(StreamError, match="version"):
        StreamHeader.unpack(StreamHeader.STRUCT.pack(b"SVMMIGR\n", 9, 0, 0))
    with pytest.raises(StreamError, match="aligned"):
        PageBatch(((0x1001, bytes(4096)),)).pack()


def test_endpoints() -> None:
    assert Endpoint.parse("tcp:10.99.1.2:4444") == Endpoint("tcp", "10.99.1.2", 4444)
    assert Endpoint.parse("tcp:[::1]:80") == Endpoint("tcp", "::1", 80)
    assert Endpoint.parse("unix:/run/m.sock") == Endpoint("unix", "/run/m.sock")
    assert str(Endpoint.parse("file:/tmp/x")) == "file:/tmp/x"
    for bad in ("tcp:host", "tcp:host:0", "ftp:x", "unix:", "nothing"):
        with pytest.raises(StreamError):
            Endpoint.parse(bad)


async def test_socket_channel_end_to_end(tmp_path: Path) -> None:
    endpoint = Endpoint.parse(f"unix:{tmp_path / 'x.sock'}")
    listener = await endpoint.listen()

    async def serve() -> list:
        channel = await listener.accept(5)
        reader = StreamReader(channel)
        await reader.start()
        out = [await reader.read(), await reader.read()]
        await channel.close()
        return out
    task = asyncio.ensure_future(serve())
    channel = await endpoint.connect()
    writer = StreamWriter(channel)
    await writer.start()
    await writer.write_map(RecordType.HELLO, {"a": 1})
    await writer.end()
    got = await task
    await channel.close()
    await listener.close()
    assert got[0].decode() == {"a": 1} and got[1].type is RecordType.END
