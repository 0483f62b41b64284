"""Fuzz targets: each takes the fuzzer's bytes and holds shadowvmm to its contract.

The contract, for every input a guest, a backend, a migration peer or a config file can
send: a typed error (:class:`~shadowvmm.errors.ShadowVmmError`) or a clean result, never
another exception, never a hang past the target's bound, never an allocation the input
chose. A target raises :class:`ContractBroken` (or lets an untyped exception out) when the
contract breaks; both count as crashes in ``fuzz/run.py`` and in tests/test_fuzz_sample.py.

Targets that need a device or an event loop build it once per process (:class:`World`)
and bring it back to a known state between inputs.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import tempfile
import tomllib
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from shadowvmm import config as configmod
from shadowvmm.backends.inproc import BlkModel, RngModel
from shadowvmm.config import DeviceConfig
from shadowvmm.errors import ShadowVmmError
from shadowvmm.machine import Machine
from shadowvmm.memory import GuestMemory
from shadowvmm.migration.migrate import destination_of
from shadowvmm.migration.state import DeviceState
from shadowvmm.migration.stream import PageBatch, RecordType, StreamReader
from shadowvmm.transport.pci import Space
from shadowvmm.virtio.packed import PackedDeviceQueue, PackedLayout
from shadowvmm.virtio.split import SplitDeviceQueue, SplitLayout
from shadowvmm_vhost_user import protocol as vu
from shadowvmm_vhost_user.connection import BackendChannel, Connection

#: What one input may make the process allocate (Python objects, per tracemalloc).
ALLOCATION_LIMIT = 8 << 20


class ContractBroken(AssertionError):
    """An input broke the contract (module docstring)."""


class Data:
    """Reads typed values from the fuzzer's bytes (zeros once they run out)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        return chunk.ljust(size, b"\0")

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "little")

    def below(self, bound: int) -> int:
        return self.uint(4) % bound if bound > 0 else 0

    def pick(self, options: list[Any]) -> Any:
        return options[self.below(len(options))]

    @property
    def left(self) -> int:
        return max(0, len(self.data) - self.pos)

    def rest(self) -> bytes:
        chunk = self.data[self.pos:]
        self.pos = len(self.data)
        return chunk


class World:
    """What the targets share within one process: an event loop, guest memory, a device."""

    _instance: World | None = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="shadowvmm-fuzz-"))
        self.memory = GuestMemory.create([(0, 4 << 20)])
        self.machine: Machine | None = None

    @classmethod
    def get(cls) -> World:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def run(self, coro: Any, bound: float = 5.0) -> Any:
        async def bounded() -> Any:
            try:
                async with asyncio.timeout(bound):
                    return await coro
            except TimeoutError:
                raise ContractBroken(f"no answer within {bound} s (a hang)") from None

        return self.loop.run_until_complete(bounded())

    def device_machine(self) -> Machine:
        if self.machine is None:
            machine = Machine(memory=self.memory)
            self.run(machine.add_device(DeviceConfig("blk0", "inproc", {"device": "blk", "queues": 2,
                                                                           "size": 1 << 20}, transport="pci")))
            self.run(machine.add_device(DeviceConfig("rng0", "inproc", {"device": "rng"}, transport="mmio")))
            self.machine = machine
        return self.machine


def typed(call: Callable[[], Any]) -> Any:
    """Run *call*; a ShadowVmmError is an allowed outcome, anything else escapes."""
    try:
        return call()
    except ShadowVmmError:
        return None


def bounded_allocation(call: Callable[[], Any]) -> Any:
    tracemalloc.start()
    try:
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if peak > ALLOCATION_LIMIT:
        raise ContractBroken(f"one input made the process allocate {peak} bytes")
    return result


# ---------------------------------------------------------------------- configs


VOCABULARY = ["machine", "memory_mib", "device", "run", "name", "backend", "backend_config", "transport",
              "queue_size", "num_queues", "stop_dialect", "stop_feature_bit", "ring_state", "ring_state_feature_bit",
              "packed", "vmm_features",
              "reconnect", "interval_ms", "deadline_ms", "size", "queues", "image", "latency_us", "socket",
              "timeout", "requests", "queue_depth", "request_bytes", "stop_after", "stop_hold_ms", "seed",
              "inproc", "vhost-user", "vdpa", "blk", "rng", "pci", "mmio", "suspend", "stop", "none", "x",
              "config_space", "tag", "mac", "mtu", "num_request_queues", "max_virtqueue_pairs", "fs", "net",
              "verify", "files", "file_bytes", "frames", "peer", "source"]


def _value(d: Data, depth: int) -> Any:
    kind = d.below(9 if depth < 4 else 6)
    if kind == 0:
        return d.uint(1) - 64
    if kind == 1:
        return d.uint(8) - (1 << 63)
    if kind == 2:
        return d.pick(VOCABULARY)
    if kind == 3:
        return bool(d.uint(1) & 1)
    if kind == 4:
        return [float("nan"), float("inf"), -1.5, 0.0, 1e308][d.below(5)]
    if kind == 5:
        return d.take(d.below(12)).decode("latin-1")
    if kind == 6:
        return [_value(d, depth + 1) for _ in range(d.below(4))]
    return {d.pick(VOCABULARY): _value(d, depth + 1) for _ in range(d.below(5))}


def config_doc(data: bytes) -> None:
    """A decoded config document built from the bytes: ConfigError or a config, nothing else."""
    d = Data(data)
    doc = {d.pick(["machine", "device", "run", "extra"]): _value(d, 1) for _ in range(d.below(4))}
    if d.uint(1) & 1:
        doc["device"] = [_value(d, 2) for _ in range(d.below(3))]
    typed(lambda: configmod.parse(doc))


def config_file(data: bytes) -> None:
    """Raw bytes as a config file (text, binary, TOML or not): one ConfigError naming the file."""
    world = World.get()
    path = world.tmp / "fuzz.toml"
    path.write_bytes(data)
    try:
        configmod.load(path)
    except ShadowVmmError as exc:
        if str(path) not in str(exc):
            raise ContractBroken(f"a config error does not name the file: {exc}") from exc


def config_toml(data: bytes) -> None:
    """Bytes that parse as TOML go through the whole config check."""
    try:
        doc = tomllib.loads(data.decode("utf-8", "replace"))
    except (tomllib.TOMLDecodeError, RecursionError):
        return
    typed(lambda: configmod.parse(doc))


# ---------------------------------------------------------------------- migration


class BytesChannel:
    duplex = False

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)

    async def send(self, data: bytes) -> None:
        pass

    async def recv_exactly(self, size: int) -> bytes:
        from shadowvmm.errors import StreamError
        if size > len(self.data):
            raise StreamError(f"stream truncated: {len(self.data)} of {size} bytes")
        chunk, self.data = bytes(self.data[:size]), self.data[size:]
        return chunk

    async def close(self) -> None:
        pass

    async def abort(self) -> None:
        pass


def stream_bytes(data: bytes) -> None:
    """Raw bytes as a migration stream: records until END or a typed error."""
    world = World.get()

    async def read_all() -> None:
        reader = StreamReader(BytesChannel(data))
        await reader.start()
        for _ in range(64):
            record = await reader.read()
            if record.type is RecordType.PAGES:
                PageBatch.unpack(record.payload).validate()
            else:
                record.decode()
            if reader.ended:
                return

    bounded_allocation(lambda: typed(lambda: world.run(read_all())))


def _mutate(value: Any, d: Data, depth: int = 0) -> Any:
    if isinstance(value, dict) and value and depth < 6:
        key = d.pick(sorted(value, key=str))
        if d.uint(1) % 5 == 0:
            value = dict(value)
            del value[key]
            return value
        return {**value, key: _mutate(value[key], d, depth + 1)}
    if isinstance(value, list) and value and depth < 6:
        index = d.below(len(value))
        return value[:index] + [_mutate(value[index], d, depth + 1)] + value[index + 1:]
    return _value(d, 3) if d.uint(1) & 1 else value


def device_state(data: bytes) -> None:
    """A migrated device state, mutated field by field (the CRC is no help here): the
    destination check refuses it with a typed error or accepts a state it can load."""
    world = World.get()
    machine = world.device_machine()
    device, transport = machine.slots["blk0"].device, machine.slots["blk0"].transport
    blob = world.run(device.export_state(transport)).pack()
    d = Data(data)
    doc = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    for _ in range(1 + d.below(4)):
        doc = _mutate(doc, d)

    def check() -> None:
        state = DeviceState.unpack(msgpack.packb(doc, use_bin_type=True))
        destination_of(device, transport).check(state)
        device.check_import(state, transport)

    bounded_allocation(lambda: typed(check))


# ---------------------------------------------------------------------- guest register accesses


def registers(data: bytes) -> None:
    """A guest's register accesses (PCI blk and MMIO rng): never an exception, the device's
    worker alive, and a reset takes the device back to status 0."""
    world = World.get()
    machine = world.device_machine()
    d = Data(data)
    pci, mmio = machine.slots["blk0"].transport, machine.slots["rng0"].transport
    while d.left >= 4:
        op = d.uint(1)
        width = d.pick([1, 2, 4, 8, 3])
        value = d.uint(8)
        if op & 1:
            offset = d.uint(2) % 0x140 if op & 2 else d.uint(2)
            (mmio.write(offset, width, value) if op & 4 else mmio.read(offset, width))
        else:
            space = Space.BAR if op & 2 else Space.CONFIG
            offset = (d.uint(2) % 0x200) if op & 4 else d.uint(2)
            (pci.write(space, offset, width, value) if op & 8 else pci.read(space, offset, width))
    for name in ("blk0", "rng0"):
        device = machine.slots[name].device
        device.write_status(0)
        world.run(device.settle())
        if device._worker is None or device._worker.done():
            raise ContractBroken(f"{name}: the device worker died")
        if device.read_status() != 0:
            raise ContractBroken(f"{name}: status {device.read_status():#x} after a completed reset")


# ---------------------------------------------------------------------- descriptor chains


def chains(data: bytes) -> None:
    """Hostile descriptor tables and avail rings (split and packed, direct and indirect) under
    the blk and rng models: typed ring errors or served requests, no allocation the guest
    chose, nothing written outside the guest's own buffers' memory."""
    world = World.get()
    memory = world.memory
    d = Data(data)
    packed = bool(d.uint(1) & 1)
    size = 1 << d.below(5)
    base = 0x1000
    region = memory.view(base, 0x8000)
    region[:] = bytes(0x8000)
    raw = d.take(min(d.left, 0x6000))
    region[:len(raw)] = raw
    model: Any = BlkModel({"queues": 1, "size": 1 << 20}) if d.uint(1) & 1 else RngModel({})

    def serve() -> None:
        if packed:
            layout = PackedLayout(size, base, base + 0x4000, base + 0x5000)
            queue: Any = PackedDeviceQueue(memory, layout)
        else:
            layout = SplitLayout(size, base, base + 0x4000, base + 0x5000)
            queue = SplitDeviceQueue(memory, layout, event_idx=bool(d.uint(1) & 1))
        for _ in range(8):
            chain = queue.pop()
            if chain is None:
                return
            written = model.handle(memory, chain)
            queue.push(chain.head, written)

    try:
        bounded_allocation(lambda: typed(serve))
    finally:
        model.close()


# ---------------------------------------------------------------------- vhost-user replies


def _pair_connector(peer: list[socket.socket]) -> Callable[[], Any]:
    async def connect() -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        peer.append(theirs)
        return ours
    return connect


def vhost_user_replies(data: bytes) -> None:
    """A back-end answering each front-end request with the fuzzer's bytes (header fields,
    payload, maybe fds): every request ends in a reply or a typed error within its timeout,
    and every fd that came with a reply is closed."""
    world = World.get()
    d = Data(data)
    peer: list[socket.socket] = []
    fds_before = len(os.listdir("/proc/self/fd"))
    requests = [vu.FrontendRequest.GET_FEATURES, vu.FrontendRequest.GET_PROTOCOL_FEATURES,
                vu.FrontendRequest.GET_QUEUE_NUM, vu.FrontendRequest.GET_CONFIG, vu.FrontendRequest.GET_VRING_BASE,
                vu.FrontendRequest.SET_FEATURES, vu.FrontendRequest.GET_INFLIGHT_FD]

    async def session() -> None:
        conn = Connection(_pair_connector(peer), timeout=0.01, name="fuzz")
        await conn.connect()
        try:
            for _ in range(1 + d.below(4)):
                request = d.pick(requests)
                spec = vu.FRONTEND_SPECS[request]
                payload = None
                if spec.request is vu.U64:
                    payload = vu.U64(d.uint(8))
                elif spec.request is vu.VringState:
                    payload = vu.VringState(d.below(4), 0)
                elif spec.request is vu.Config:
                    payload = vu.Config.read(0, 1 + d.below(60))
                elif spec.request is vu.Inflight:
                    payload = vu.Inflight(0, 0, 1 + d.below(4), 1 << d.below(8))
                reply = struct.pack("<III", d.pick([int(request), d.uint(4)]), d.pick([0x5, 0x1, 0x9, d.uint(4)]),
                                    d.pick([8, 0, 12, d.below(300)])) + d.take(d.below(300))
                fds = []
                if d.uint(1) % 8 == 0:
                    fds = [os.memfd_create("fuzz", os.MFD_CLOEXEC)]
                try:
                    peer[0].sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fds[0]))]
                                    if fds else [])
                except OSError:
                    return          # the front-end hung up on an earlier reply: the session is over
                finally:
                    for fd in fds:
                        os.close(fd)
                try:
                    answer = await conn.request(request, payload)
                except ShadowVmmError:
                    continue
                for fd in answer.fds:
                    os.close(fd)
        finally:
            await conn.disconnect()
            for sock in peer:
                sock.close()

    typed(lambda: world.run(session(), bound=2.0))
    if len(os.listdir("/proc/self/fd")) > fds_before:
        raise ContractBroken(f"fds leaked: {fds_before} -> {len(os.listdir('/proc/self/fd'))}")


def backend_channel(data: bytes) -> None:
    """Back-end channel messages from the fuzzer: the front-end answers what asks for an
    answer with a well-formed reply, closes every fd it was sent, and never crashes."""
    world = World.get()
    fds_before = len(os.listdir("/proc/self/fd"))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    handled: list[int] = []

    async def session() -> None:
        def on_config_change(message: Any) -> int:
            handled.append(1)
            return 0

        channel = BackendChannel(ours, world.loop, {vu.BackendRequest.CONFIG_CHANGE_MSG: on_config_change},
                                 lambda: (vu.ProtocolFeature(d_protocol), 0), "fuzz")
        channel.start()
        theirs.setblocking(False)
        try:
            theirs.sendall(data)
        except BlockingIOError:
            pass
        theirs.shutdown(socket.SHUT_WR)
        for _ in range(20):
            await asyncio.sleep(0)
        await channel.aclose()

    d_protocol = int.from_bytes(data[:8].ljust(8, b"\0"), "little")
    try:
        typed(lambda: world.run(session(), bound=2.0))
    finally:
        theirs.close()
    if len(os.listdir("/proc/self/fd")) > fds_before:
        raise ContractBroken(f"fds leaked: {fds_before} -> {len(os.listdir('/proc/self/fd'))}")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "config_doc": config_doc,
    "config_file": config_file,
    "config_toml": config_toml,
    "stream_bytes": stream_bytes,
    "device_state": device_state,
    "registers": registers,
    "chains": chains,
    "vhost_user_replies": vhost_user_replies,
    "backend_channel": backend_channel,
}
