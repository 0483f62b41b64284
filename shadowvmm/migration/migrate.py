"""Live migration of a machine's devices (and, in the copy model, its memory).

Phases, source side (:func:`migrate_out`):

1. **setup**: refuse early if a device cannot migrate (:func:`blockers`);
   send HELLO (memory layout and model, devices); the destination creates
   its devices, connects their backends and answers READY. Copy model: dirty
   logging on (guest memory log + every backend, QEMU's vhost order).
2. **pre-copy** (copy model): every non-zero page, then rounds of the pages
   the dirty log marked, until a round's dirty set is small.
3. **stop-and-copy**: every device stopped at once (``asyncio.gather``) with
   a per-device bound; one that misses it abandons the migration. Then the
   final dirty pages, each device's state (ring bases, DEVICE_STATE where
   negotiated) and END.
4. **resume** on the destination: it validates everything it buffered,
   applies the device states and starts the backends from the saved ring
   bases, then answers RESULT.
5. **cleanup** on the source: devices stay stopped, dirty logging is off.

A failure or cancellation at any phase resumes every source device and
turns dirty logging off: the source runs as if nothing happened.

Memory models: ``local`` (both sides map the same guest memory memfds; only
device state moves) and ``copy`` (the destination has its own memory; pages
travel in the stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..backends.base import Capability
from ..device import VirtioDevice
from ..errors import (
    DestinationRefused,
    DeviceStateError,
    IncompatibleStateError,
    MigrationError,
    ShadowVmmError,
    StopTimeoutError,
    StreamError,
)
from ..memory import PAGE_SHIFT, PAGE_SIZE, DirtyLog, GuestMemory
from ..shadow import RunState
from ..transport.pci import PCI_CAP_ID_MSIX
from ..virtio.constants import DeviceId
from .state import Destination, DeviceState, shown
from .stream import Channel, PageBatch, Record, RecordType, StreamReader, StreamWriter

log = logging.getLogger(__name__)

MODES = ("local", "copy")
_ZERO_PAGE = bytes(PAGE_SIZE)
#: Pages scanned between two chances for the guest to run during pre-copy.
_SCAN_PAGES = 512


class SlotLike(Protocol):
    device: VirtioDevice
    transport: Any


class MachineLike(Protocol):
    """What migration needs of a machine (:class:`~shadowvmm.machine.Machine` fits)."""

    memory: GuestMemory
    slots: Mapping[str, SlotLike]


@dataclass(frozen=True)
class MigrationOptions:
    """Tunables; ``stop_timeout`` bounds each device's stop (seconds).

    ``fs_session``: what to do with a started virtio-fs device whose backend cannot hand its
    FUSE session over (no DEVICE_STATE, e.g. the C virtiofsd): ``refuse`` (default; QEMU marks
    such a device unmigratable) or ``remount``: migrate it anyway when the backend holds no open
    file; the destination backend has no session, answers EIO until the guest mounts again
    (a new FUSE_INIT on the same queues), and the guest's inode numbers are void.

    ``busy_poll_us``: from the stop to the end, each device's backend spins up to this long
    for every reply instead of sleeping (:meth:`VirtioDevice.set_busy_poll`). Spinning holds
    the event loop, which serializes the round trips of devices stopped together, so the
    default (None) spins :data:`AUTO_BUSY_POLL_US` for a single device and not at all for more.
    """

    mode: str = "copy"
    stop_timeout: float = 0.1
    max_rounds: int = 16
    converge_pages: int = 256
    batch_pages: int = 256
    ready_timeout: float = 30.0
    result_timeout: float = 30.0
    #: Seconds the destination may take to accept one send (a stalled reader fails the migration).
    send_timeout: float = 10.0
    include_opaque: bool = True
    digest: bool = False
    busy_poll_us: int | None = None
    fs_session: str = "refuse"

    def busy_poll_seconds(self, devices: int) -> float:
        if self.busy_poll_us is None:
            return auto_busy_poll(devices)
        return self.busy_poll_us / 1e6

    def validate(self) -> None:
        if self.mode not in MODES:
            raise MigrationError(f"memory model {self.mode!r} is not one of {MODES}")
        if not self.stop_timeout > 0 or self.max_rounds < 1 or self.batch_pages < 1:
            raise MigrationError("stop_timeout must be > 0, max_rounds and batch_pages >= 1")
        if not self.send_timeout > 0:
            raise MigrationError(f"send_timeout must be > 0, not {self.send_timeout}")
        if self.fs_session not in FS_SESSION_POLICIES:
            raise MigrationError(f"fs_session must be one of {FS_SESSION_POLICIES}, not {self.fs_session!r}")
        if self.busy_poll_us is not None and not 0 <= self.busy_poll_us <= 100_000:
            raise MigrationError(f"busy_poll_us must be in [0, 100000], not {self.busy_poll_us}")


FS_SESSION_POLICIES = ("refuse", "remount")

#: Reply busy-poll of a lone migrating device (µs): about one backend round trip's worth.
AUTO_BUSY_POLL_US = 300


def auto_busy_poll(devices: int) -> float:
    """Busy-poll seconds for *devices* migrating together (:class:`MigrationOptions`)."""
    return AUTO_BUSY_POLL_US / 1e6 if devices == 1 else 0.0


@contextlib.contextmanager
def _busy_polling(devices: Iterable[VirtioDevice], seconds: float) -> Iterator[None]:
    """Busy-poll backend replies while the block runs, then restore each previous setting."""
    previous = [(device, device.set_busy_poll(seconds)) for device in devices] if seconds > 0 else []
    try:
        yield
    finally:
        for device, before in previous:
            device.set_busy_poll(before)


@dataclass
class MigrationHooks:
    """Callbacks into the VMM: vCPU pause/resume around stop-and-copy, and switch-over."""

    pause_guest: Callable[[], Awaitable[None] | None] | None = None
    resume_guest: Callable[[], Awaitable[None] | None] | None = None
    switch_over: Callable[[], Awaitable[None] | None] | None = None
    progress: Callable[[RoundInfo], None] | None = None


@dataclass(frozen=True)
class RoundInfo:
    round: int
    pages: int
    dirty: int
    seconds: float


@dataclass
class MigrationReport:
    """What the source measured."""

    mode: str
    ok: bool = False
    total_s: float = 0.0
    setup_s: float = 0.0
    precopy_s: float = 0.0
    downtime_s: float = 0.0
    stop_s: float = 0.0
    rounds: int = 0
    pages_sent: int = 0
    bytes_sent: int = 0
    device_state_bytes: int = 0
    stop_times_s: dict[str, float] = field(default_factory=dict)
    round_info: list[RoundInfo] = field(default_factory=list)
    memory_digest: str = ""
    destination: dict[str, Any] = field(default_factory=dict)
    #: The destination confirmed what it applied (False: a one-way channel without ``confirm``).
    confirmed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "confirmed": self.confirmed, "mode": self.mode, "total_ms": round(self.total_s * 1e3, 3),
            "setup_ms": round(self.setup_s * 1e3, 3), "precopy_ms": round(self.precopy_s * 1e3, 3),
            "downtime_ms": round(self.downtime_s * 1e3, 3), "stop_ms": round(self.stop_s * 1e3, 3),
            "rounds": self.rounds, "pages_sent": self.pages_sent, "bytes_sent": self.bytes_sent,
            "device_state_bytes": self.device_state_bytes,
            "stop_ms_per_device": {k: round(v * 1e3, 3) for k, v in self.stop_times_s.items()},
            "dirty_per_round": [r.dirty for r in self.round_info],
            "memory_digest": self.memory_digest, "destination": self.destination,
        }


@dataclass
class DestinationReport:
    """What the destination measured; ``applied`` is its confirmation (:func:`applied`)."""

    mode: str = ""
    devices: list[str] = field(default_factory=list)
    pages_received: int = 0
    rounds: int = 0
    bytes_received: int = 0
    device_state_bytes: int = 0
    memory_digest: str = ""
    apply_s: float = 0.0
    applied: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "devices": self.devices, "pages_received": self.pages_received,
                "rounds": self.rounds, "bytes_received": self.bytes_received,
                "device_state_bytes": self.device_state_bytes, "memory_digest": self.memory_digest,
                "apply_ms": round(self.apply_s * 1e3, 3), "applied": self.applied}


def applied(states: Iterable[DeviceState], pages: int) -> dict[str, Any]:
    """The confirmation a destination sends in RESULT, and the source expects: each device
    state's :meth:`~DeviceState.digest` by name, and the pages written (copy model)."""
    return {"devices": {state.name: state.digest() for state in states}, "pages": pages}


def check_confirmation(confirmed: Any, expected: dict[str, Any]) -> None:
    """Refuse (:class:`DestinationRefused`) a confirmation that is missing or differs from what was sent."""
    if not isinstance(confirmed, dict) or not isinstance(confirmed.get("devices"), dict):
        raise DestinationRefused("the destination did not confirm what it applied (no device digests in "
                                 "its answer); the migration is not complete, source resumed")
    theirs, ours = confirmed["devices"], expected["devices"]
    for name in sorted(set(ours) | set(map(str, theirs))):
        if theirs.get(name) != ours.get(name):
            raise DestinationRefused(f"the destination confirmed device {shown(name)!r} with digest "
                                     f"{str(theirs.get(name))[:16]}, the source sent "
                                     f"{str(ours.get(name))[:16]}; source resumed")
    if confirmed.get("pages") != expected["pages"]:
        raise DestinationRefused(f"the destination confirmed {confirmed.get('pages')!r} pages applied, the "
                                 f"source sent {expected['pages']}; source resumed")


# ---------------------------------------------------------------------- blockers


def peer_pid(backend: object) -> int | None:
    """The pid of the process holding the other end of a vhost-user backend's socket.

    SO_PEERCRED would name whoever called listen() (a launcher that passed
    the socket with ``--fd``), so the peer socket's inode is looked up with
    sock_diag and then searched for in /proc/*/fd.
    """
    conn = getattr(backend, "_conn", None)
    sock = getattr(conn, "_sock", None)
    if not isinstance(sock, socket.socket) or sock.family != socket.AF_UNIX:
        return None
    from pyroute2 import DiagSocket
    ours = os.fstat(sock.fileno()).st_ino
    peer = None
    with DiagSocket() as diag:
        diag.bind()
        for entry in diag.get_sock_stats(family=socket.AF_UNIX):
            if entry["udiag_ino"] == ours:
                peer = dict(entry["attrs"]).get("UNIX_DIAG_PEER")
                break
    if not peer:
        return None
    wanted = f"socket:[{peer}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == wanted:
                    return int(pid)
            except OSError:
                continue
    return None


def open_file_handles(pid: int) -> list[str]:
    """Files and directories process *pid* holds open for I/O (O_PATH inode handles excluded)."""
    handles = []
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        if int(name) <= 2:
            continue
        try:
            target = os.readlink(f"{base}/{name}")
            with open(f"/proc/{pid}/fdinfo/{name}") as info:
                flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
        except (OSError, StopIteration, ValueError):
            continue
        if not target.startswith("/") or target.startswith(("/proc/", "/dev/", "/memfd:")):
            continue
        if flags & os.O_PATH:
            continue
        handles.append(target)
    return sorted(handles)


async def blockers(name: str, device: VirtioDevice, mode: str, fs_session: str = "refuse") -> list[str]:
    """Why *device* cannot migrate now (empty: it can); checked before anything stops."""
    out = []
    caps = device.backend_caps
    b = device.backend
    if mode == "copy" and getattr(b, "memory", None) is not device.memory and not caps & Capability.DIRTY_LOG:
        out.append(f"{name}: backend {b.implementation!r} cannot log the guest memory it writes "
                   "(no LOG_ALL/LOG_SHMFD), so copy migration would lose its writes")
    if device.device_id == DeviceId.FS and not caps & Capability.DEVICE_STATE and device.started:
        if fs_session != "remount":
            out.append(f"{name}: the guest's FUSE session (INIT, the inode table, open files) lives only "
                       f"in the virtio-fs backend {b.implementation!r}, which does not offer DEVICE_STATE "
                       "(vhost-user protocol feature 19) to hand it over: the destination would answer EIO "
                       "until the guest mounts again; to migrate anyway and have the guest remount, use "
                       "fs_session='remount' (shadowvmm migrate --fs-remount)")
            return out
        pid = await asyncio.to_thread(peer_pid, b)
        if pid is None:
            out.append(f"{name}: cannot verify that the virtio-fs backend holds no open files, and it "
                       "does not offer DEVICE_STATE (vhost-user protocol feature 19)")
        else:
            try:
                handles = open_file_handles(pid)
            except OSError as exc:
                handles = []
                out.append(f"{name}: cannot inspect the virtio-fs backend (pid {pid}): {exc}")
            if handles:
                shown = ", ".join(handles[:4]) + (", ..." if len(handles) > 4 else "")
                out.append(f"{name}: the virtio-fs backend (pid {pid}) holds {len(handles)} open file "
                           f"handle(s) ({shown}); open handles are backend state, and this backend does "
                           "not offer DEVICE_STATE (vhost-user protocol feature 19) to migrate them; "
                           "close the files in the guest and retry")
    return out


async def _refuse_if_blocked(devices: Mapping[str, VirtioDevice], options: MigrationOptions) -> None:
    found = await asyncio.gather(*(blockers(name, device, options.mode, options.fs_session)
                                   for name, device in devices.items()))
    reasons = [reason for group in found for reason in group]
    if reasons:
        raise MigrationError("migration refused before anything stopped: " + "; ".join(reasons))


# ---------------------------------------------------------------------- helpers


async def _call(hook: Callable[..., Awaitable[None] | None] | None, *args: Any) -> None:
    if hook is not None:
        result = hook(*args)
        if result is not None:
            await result


def memory_layout(memory: GuestMemory) -> list[list[int]]:
    return [[r.gpa, r.size] for r in memory]


def memory_identity(memory: GuestMemory) -> list[list[int]]:
    """(st_dev, st_ino, fd offset) of each region's memfd: equal iff both sides map the same memory."""
    out = []
    for r in memory:
        st = os.fstat(r.fd)
        out.append([st.st_dev, st.st_ino, r.fd_offset])
    return out


def memory_digest(memory: GuestMemory) -> str:
    h = hashlib.sha256()
    for region in memory:
        h.update(struct.pack("<QQ", region.gpa, region.size))
        h.update(region.view)
    return h.hexdigest()


def _page_gpas(memory: GuestMemory) -> Iterable[int]:
    for region in memory:
        yield from range(region.gpa, region.end, PAGE_SIZE)


def _snapshot(memory: GuestMemory, gpas: Iterable[int], skip_zero: bool) -> list[tuple[int, bytes]]:
    out = []
    for gpa in gpas:
        try:
            data = memory.read(gpa, PAGE_SIZE)
        except ShadowVmmError:
            continue
        if skip_zero and data == _ZERO_PAGE:
            continue
        out.append((gpa, data))
    return out


async def _send_pages(writer: StreamWriter, pages: list[tuple[int, bytes]], batch: int) -> None:
    for start in range(0, len(pages), batch):
        await writer.write(RecordType.PAGES, PageBatch(tuple(pages[start:start + batch])).pack())


async def _copy_chunk(memory: GuestMemory, writer: StreamWriter, gpas: list[int], skip_zero: bool,
                      batch: int) -> int:
    """Pre-copy one scan chunk, then let the guest run (it keeps dirtying memory meanwhile)."""
    pages = _snapshot(memory, gpas, skip_zero)
    await _send_pages(writer, pages, batch)
    await asyncio.sleep(0)
    return len(pages)


async def _stop_all(devices: Mapping[str, VirtioDevice], bound: float,
                    clock: Callable[[], float]) -> dict[str, float]:
    """Stop every device at once; raise :class:`StopTimeoutError` if any misses *bound*.

    A device that is late is not cancelled (a half-done stop would leave it
    inconsistent): the caller waits for it and resumes everything.
    """
    started = clock()
    times: dict[str, float] = {}
    tasks: dict[asyncio.Task, str] = {}
    for name, device in devices.items():
        task = asyncio.ensure_future(device.stop())
        task.add_done_callback(lambda _t, n=name: times.__setitem__(n, clock() - started))
        tasks[task] = name
    if not tasks:
        return times
    done, pending = await asyncio.wait(tasks, timeout=bound)
    failed = [t for t in done if t.exception() is not None]
    if pending or failed:
        if pending:
            await asyncio.wait(pending)
        late = {tasks[t]: times.get(tasks[t], clock() - started) for t in pending}
        late.update({tasks[t]: times[tasks[t]] for t in done if times.get(tasks[t], 0) > bound})
        if failed and not late:
            exc = failed[0].exception()
            raise MigrationError(f"device {tasks[failed[0]]} failed to stop: {exc}") from exc
        raise StopTimeoutError(late, bound)
    return times


async def _resume_all(devices: Mapping[str, VirtioDevice]) -> None:
    async def one(name: str, device: VirtioDevice) -> None:
        try:
            if device.run_state is RunState.STOPPED:
                await device.resume()
        except (ShadowVmmError, OSError) as exc:
            log.error("%s: resume after abandoned migration failed: %s", name, exc)
    await asyncio.gather(*(one(n, d) for n, d in devices.items()))


async def _stop_logging(devices: Mapping[str, VirtioDevice], memory: GuestMemory, logging_on: bool) -> None:
    if not logging_on:
        return
    async def one(name: str, device: VirtioDevice) -> None:
        try:
            await device.stop_dirty_log()
        except (ShadowVmmError, OSError) as exc:
            log.warning("%s: turning dirty logging off failed: %s", name, exc)
    await asyncio.gather(*(one(n, d) for n, d in devices.items()))
    memory.disable_dirty_log()


# ---------------------------------------------------------------------- source


async def migrate_out(machine: MachineLike, channel: Channel, options: MigrationOptions = MigrationOptions(),
                      hooks: MigrationHooks | None = None, *,
                      confirm: Callable[[], Awaitable[dict[str, Any] | None]] | None = None,
                      clock: Callable[[], float] = time.perf_counter) -> MigrationReport:
    """Migrate *machine*'s devices (and memory in the copy model) over *channel*.

    The migration is complete only once the destination confirmed what it
    applied: its RESULT carries each device state's digest and the pages it
    wrote (:func:`applied`), compared with what was sent
    (:func:`check_confirmation`); a RESULT before END, a missing or a
    different confirmation is a refusal. On a one-way channel (a file) the
    stream is closed after END and *confirm* is awaited in place of RESULT:
    it returns the destination's report (whose ``applied`` is checked the
    same way) or raises to refuse; without *confirm* the report says
    ``confirmed=False``. Any failure resumes the source and raises
    :class:`MigrationError` (the cause chained).
    """
    options.validate()
    hooks = hooks or MigrationHooks()
    report = MigrationReport(options.mode)
    memory = machine.memory
    devices = {name: slot.device for name, slot in machine.slots.items()}
    await _refuse_if_blocked(devices, options)
    t0 = clock()
    writer = StreamWriter(channel, send_timeout=options.send_timeout)
    reply = StreamReader(channel) if channel.duplex else None
    outcome: asyncio.Future[dict[str, Any]] | None = None
    logging_on = False
    stopped = False
    paused = False
    polling = contextlib.ExitStack()
    try:
        await writer.start()
        await writer.write_map(RecordType.HELLO, {
            "mode": options.mode, "memory": memory_layout(memory),
            "identity": memory_identity(memory) if options.mode == "local" else [],
            "devices": [{"name": n, "device_id": int(d.device_id), "queues": d.num_queues,
                         "preview": d.start_preview()} for n, d in devices.items()]})
        if reply is not None:
            async with asyncio.timeout(options.ready_timeout):
                await reply.start()
                first = await reply.expect(RecordType.READY, RecordType.RESULT)
                ready = first.decode()
            if first.type is not RecordType.READY or not ready.get("ok"):
                raise DestinationRefused(f"destination refused at setup: {ready.get('error')}")
            outcome = asyncio.ensure_future(_read_result(reply))
        pending: set[int] = set()
        dirty_log: DirtyLog | None = None
        if options.mode == "copy":
            dlog = memory.enable_dirty_log()
            logging_on = True
            dirty_log = dlog
            await asyncio.gather(*(d.start_dirty_log(dlog) for d in devices.values()))
        report.setup_s = clock() - t0
        if dirty_log is not None:
            t_pre = clock()
            dirty_log.take()
            await _precopy(memory, writer, dirty_log, options, hooks, report, pending, clock, outcome)
            report.precopy_s = clock() - t_pre
            await _refuse_if_blocked(devices, options)
        _check_outcome(outcome)
        await _call(hooks.pause_guest)
        paused = True
        t_stop = clock()
        stopped = True
        polling.enter_context(_busy_polling(devices.values(), options.busy_poll_seconds(len(devices))))
        report.stop_times_s = await _stop_all(devices, options.stop_timeout, clock)
        report.stop_s = clock() - t_stop
        final: list[tuple[int, bytes]] = []
        if dirty_log is not None:
            pending.update(dirty_log.take())
            final = _snapshot(memory, ((p << PAGE_SHIFT) for p in sorted(pending)), False)
        if options.digest:
            report.memory_digest = memory_digest(memory)
        states = await asyncio.gather(*(slot.device.export_state(slot.transport,
                                                                 include_opaque=options.include_opaque)
                                        for slot in machine.slots.values()))
        _check_outcome(outcome)
        await _send_pages(writer, final, options.batch_pages)
        report.pages_sent += len(final)
        sent: dict[str, str] = {}
        for state in states:
            blob = state.pack()
            sent[state.name] = hashlib.sha256(blob).hexdigest()    # = state.digest(): packed at its format
            report.device_state_bytes += len(blob)
            await writer.write(RecordType.DEVICE, blob)
        _check_outcome(outcome)
        await writer.end()
        expected = {"devices": sent, "pages": report.pages_sent if options.mode == "copy" else 0}
        if outcome is not None:
            async with asyncio.timeout(options.result_timeout):
                result = await asyncio.shield(outcome)
            if not result.get("ok"):
                raise DestinationRefused(f"destination refused: {result.get('error')}")
            destination = result.get("report")
            report.destination = dict(destination) if isinstance(destination, dict) else {}
            check_confirmation(report.destination.get("applied"), expected)
            report.confirmed = True
        elif confirm is not None:
            await channel.close()
            destination = await confirm()
            report.destination = dict(destination) if isinstance(destination, dict) else {}
            check_confirmation(report.destination.get("applied"), expected)
            report.confirmed = True
        else:
            await channel.close()
        report.downtime_s = clock() - t_stop
        await _call(hooks.switch_over)
    except BaseException as exc:
        reason = await _destination_reason(outcome) if isinstance(exc, StreamError) else None
        await _abandon(writer, channel, devices, memory, stopped, logging_on, hooks if paused else None, exc)
        polling.close()
        if outcome is not None:
            outcome.cancel()
            if not outcome.cancelled() and outcome.done():
                outcome.exception()
        if reason is not None:
            raise DestinationRefused(f"destination refused: {reason}; source resumed") from exc
        if isinstance(exc, MigrationError):
            raise
        if isinstance(exc, TimeoutError):
            raise MigrationError("migration abandoned: the destination did not answer in time; "
                                 "source resumed") from exc
        if isinstance(exc, (ShadowVmmError, OSError)):
            raise MigrationError(f"migration abandoned, source resumed: {exc}") from exc
        raise
    polling.close()
    if logging_on:
        memory.disable_dirty_log()
    report.bytes_sent = writer.bytes
    report.ok = True
    report.total_s = clock() - t0
    if channel.duplex:
        await channel.close()
    return report


async def _precopy(memory: GuestMemory, writer: StreamWriter, dirty_log: DirtyLog,
                   options: MigrationOptions, hooks: MigrationHooks, report: MigrationReport,
                   pending: set[int], clock: Callable[[], float],
                   outcome: asyncio.Future[dict[str, Any]] | None) -> None:
    """Round 0 sends every non-zero page; later rounds the dirty ones, until few remain."""
    gpas: Iterable[int] = _page_gpas(memory)
    for round_no in range(options.max_rounds):
        _check_outcome(outcome)
        t_round = clock()
        sent = 0
        chunk: list[int] = []
        for gpa in gpas:
            chunk.append(gpa)
            if len(chunk) == _SCAN_PAGES:
                sent += await _copy_chunk(memory, writer, chunk, round_no == 0, options.batch_pages)
                chunk = []
        sent += await _copy_chunk(memory, writer, chunk, round_no == 0, options.batch_pages)
        report.pages_sent += sent
        dirty = dirty_log.take()
        report.rounds = round_no + 1
        info = RoundInfo(round_no, sent, len(dirty), clock() - t_round)
        report.round_info.append(info)
        await writer.write_map(RecordType.ROUND, {"round": round_no, "pages": sent})
        if hooks.progress is not None:
            hooks.progress(info)
        if len(dirty) <= options.converge_pages or round_no + 1 == options.max_rounds:
            pending.update(dirty)
            return
        gpas = [p << PAGE_SHIFT for p in dirty]


async def _read_result(reply: StreamReader) -> dict[str, Any]:
    """The destination's RESULT, read as soon as it arrives (a refusal can come at any time)."""
    return (await reply.expect(RecordType.RESULT)).decode()


def _check_outcome(outcome: asyncio.Future[dict[str, Any]] | None) -> None:
    """Before END the destination has nothing to answer: a RESULT now is a refusal, even an ok one."""
    if outcome is None or not outcome.done():
        return
    exc = outcome.exception()
    if exc is not None:
        raise DestinationRefused(f"destination went away: {exc}") from exc
    result = outcome.result()
    if not result.get("ok"):
        raise DestinationRefused(f"destination refused: {result.get('error')}")
    raise DestinationRefused("destination answered RESULT ok before the stream ended; nothing was confirmed")


async def _destination_reason(outcome: asyncio.Future[dict[str, Any]] | None) -> str | None:
    """The destination's RESULT error, if it sent one before the stream broke."""
    if outcome is None:
        return None
    try:
        async with asyncio.timeout(0.5):
            result = await asyncio.shield(outcome)
    except (StreamError, TimeoutError, OSError):
        return None
    return None if result.get("ok") else str(result.get("error"))


async def _abandon(writer: StreamWriter, channel: Channel, devices: Mapping[str, VirtioDevice],
                   memory: GuestMemory, stopped: bool, logging_on: bool, hooks: MigrationHooks | None,
                   exc: BaseException) -> None:
    """Put the source back as it was: devices resumed, logging off, the destination told."""
    log.warning("migration abandoned: %s", exc)
    if stopped:
        await _resume_all(devices)
    if hooks is not None:
        await _call(hooks.resume_guest)
    await _stop_logging(devices, memory, logging_on)
    try:
        async with asyncio.timeout(1.0):
            await writer.write_map(RecordType.ABORT, {"reason": str(exc)})
    except (StreamError, TimeoutError, OSError):
        pass
    try:
        await channel.abort()
    except OSError:
        pass


# ---------------------------------------------------------------------- destination


async def migrate_in(machine: MachineLike, channel: Channel, *, digest: bool = False,
                     timeout: float | None = 60.0, busy_poll_us: int | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> DestinationReport:
    """Receive a migration into *machine*, whose devices are realized and never touched by a guest.

    Pages (copy model) are written into this machine's memory as they come
    (no guest runs on it yet). Each device record is decoded and checked
    against its device as it arrives (:func:`check_state`: one per device,
    no unknown or repeated one); after END the states are applied, and
    RESULT confirms them (:func:`applied`). Refusals raise (StreamError,
    IncompatibleStateError, MigrationError) and are reported to the source
    in RESULT; nothing was applied then, the pages written are zeroed again
    and the machine can take another attempt.
    """
    reader = StreamReader(channel)
    answer = StreamWriter(channel) if channel.duplex else None
    report = DestinationReport()
    devices = [slot.device for slot in machine.slots.values()]
    poll = auto_busy_poll(len(devices)) if busy_poll_us is None else busy_poll_us / 1e6
    with _busy_polling(devices, poll):
        return await _migrate_in(machine, channel, reader, answer, report, digest, timeout, clock)


async def _migrate_in(machine: MachineLike, channel: Channel, reader: StreamReader, answer: StreamWriter | None,
                      report: DestinationReport, digest: bool, timeout: float | None,
                      clock: Callable[[], float]) -> DestinationReport:
    written = PageSet(machine.memory)
    try:
        async with asyncio.timeout(timeout):
            await reader.start()
            hello = (await reader.expect(RecordType.HELLO)).decode()
            report.mode = _check_hello(machine, hello)
            report.devices = list(machine.slots)
            await asyncio.gather(*(slot.device.preload_memory_table() for slot in machine.slots.values()))
            await _prestage(machine, hello)
            if answer is not None:
                await answer.start()
                await answer.write_map(RecordType.READY, {"ok": True})
            states = await _receive(machine, reader, report, written)
            t_apply = clock()
            _check_complete(machine, states)
            if digest:
                report.memory_digest = memory_digest(machine.memory)
            await asyncio.gather(*(machine.slots[name].device.import_state(state, machine.slots[name].transport)
                                   for name, state in states.items()))
            report.apply_s = clock() - t_apply
            report.bytes_received = reader.bytes
            report.applied = applied(states.values(), report.pages_received)
    except BaseException as exc:
        error: BaseException = exc
        if isinstance(exc, Exception) and not isinstance(exc, (ShadowVmmError, OSError, TimeoutError)):
            log.exception("incoming migration failed unexpectedly")
            error = MigrationError(f"destination failed: {type(exc).__name__}: {exc}")
        if answer is not None and isinstance(exc, Exception):
            await _refuse(answer, error)
        await channel.close()
        await _unstage_all(machine)
        if not _touched(machine):
            written.zero()
        if isinstance(exc, TimeoutError):
            raise StreamError(f"migration stream stalled for {timeout} s") from exc
        if error is not exc:
            raise error from exc
        raise
    if answer is not None:
        await answer.write_map(RecordType.RESULT, {"ok": True, "report": report.as_dict()})
    await channel.close()
    return report


async def _refuse(answer: StreamWriter, exc: BaseException) -> None:
    """Tell the source why (RESULT not ok), as far as the stream still goes."""
    try:
        async with asyncio.timeout(1.0):
            if not answer.records and not _header_sent(answer):
                await answer.start()
            await answer.write_map(RecordType.RESULT, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    except (StreamError, TimeoutError, OSError):
        pass


class PageSet:
    """Pages of *memory* an incoming migration wrote (a bitmap over its span), to zero them
    again when the attempt fails: the next attempt's first round skips the source's zero pages."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self._bits = bytearray((memory.span // PAGE_SIZE + 7) // 8)

    def add(self, gpa: int) -> None:
        page = gpa >> PAGE_SHIFT
        self._bits[page >> 3] |= 1 << (page & 7)

    def zero(self) -> None:
        bits = self._bits
        for index, byte in enumerate(bits):
            if not byte:
                continue
            for bit in range(8):
                if byte >> bit & 1:
                    self.memory.view(((index << 3) | bit) << PAGE_SHIFT, PAGE_SIZE)[:] = _ZERO_PAGE
            bits[index] = 0


def _header_sent(writer: StreamWriter) -> bool:
    return writer.bytes > 0


def _check_hello(machine: MachineLike, hello: dict[str, Any]) -> str:
    mode = hello.get("mode")
    if mode not in MODES:
        raise StreamError(f"HELLO: unknown memory model {mode!r}")
    if hello.get("memory") != memory_layout(machine.memory):
        raise MigrationError(f"memory layout differs: source {hello.get('memory')}, "
                             f"destination {memory_layout(machine.memory)}")
    if mode == "local" and hello.get("identity") != memory_identity(machine.memory):
        raise MigrationError("local migration needs the destination to map the source's guest memory memfds")
    devices = hello.get("devices")
    if not isinstance(devices, list):
        raise StreamError("HELLO: no device list")
    theirs = {d.get("name"): d for d in devices if isinstance(d, dict)}
    if set(theirs) != set(machine.slots):
        raise MigrationError(f"device sets differ: source {sorted(map(str, theirs))}, "
                             f"destination {sorted(machine.slots)}")
    for name, slot in machine.slots.items():
        d = theirs[name]
        if d.get("device_id") != int(slot.device.device_id) or d.get("queues") != slot.device.num_queues:
            raise IncompatibleStateError(f"{name}: source is device {d.get('device_id')} with {d.get('queues')} "
                                         f"queues, destination {int(slot.device.device_id)} with "
                                         f"{slot.device.num_queues}")
    return mode


async def _prestage(machine: MachineLike, hello: dict[str, Any]) -> None:
    """Send each destination backend the start messages the source's preview fixes, so that
    the downtime carries only what depends on where the rings stopped."""
    previews = {d.get("name"): d.get("preview") for d in hello["devices"] if isinstance(d, dict)}
    staged = []
    for name, slot in machine.slots.items():
        preview = previews.get(name)
        if preview is None:
            continue
        if not isinstance(preview, dict):
            raise StreamError(f"HELLO: {name}: start preview is not a map")
        staged.append(slot.device.prestage(preview))
    await asyncio.gather(*staged)


async def _unstage_all(machine: MachineLike) -> None:
    """A failed incoming migration takes back what :func:`_prestage` sent, so the destination
    devices are untouched again and may take another attempt."""
    async def one(name: str, device: VirtioDevice) -> None:
        try:
            await device.unstage()
        except (ShadowVmmError, OSError) as exc:
            log.error("%s: taking back the staged start after a failed migration: %s", name, exc)
    await asyncio.gather(*(one(name, slot.device) for name, slot in machine.slots.items()))


async def _receive(machine: MachineLike, reader: StreamReader, report: DestinationReport,
                   written: PageSet) -> dict[str, DeviceState]:
    """Read to END: pages written as they come, each device state decoded and checked as it comes."""
    memory = machine.memory
    states: dict[str, DeviceState] = {}
    while True:
        record: Record = await reader.read()
        if record.type is RecordType.PAGES:
            if report.mode != "copy":
                raise StreamError("PAGES record in a local migration")
            for gpa, data in PageBatch.unpack(record.payload).pages:
                try:
                    memory.view(gpa, PAGE_SIZE)[:] = data
                except ShadowVmmError as exc:
                    raise StreamError(f"page {gpa:#x} is outside destination memory") from exc
                written.add(gpa)
                report.pages_received += 1
        elif record.type is RecordType.ROUND:
            report.rounds += 1
        elif record.type is RecordType.DEVICE:
            state = DeviceState.unpack(record.payload)
            slot = machine.slots.get(state.name)
            if slot is None:
                raise MigrationError(f"stream carries state for device {shown(state.name)!r}, which the "
                                     f"destination does not have ({sorted(machine.slots)})")
            if state.name in states:
                raise StreamError(f"device {state.name!r} sent twice")
            check_state(state, slot.device, slot.transport)
            states[state.name] = state
            report.device_state_bytes += len(record.payload)
        elif record.type is RecordType.ABORT:
            raise MigrationError(f"the source abandoned the migration: {record.decode().get('reason')}")
        elif record.type is RecordType.END:
            return states
        else:
            raise StreamError(f"unexpected {record.type.name} record")


def destination_of(device: VirtioDevice, transport: object | None) -> Destination:
    """*device* (behind *transport*) as the :class:`Destination` a state is checked against."""
    ints = device.interrupts
    assert ints is not None
    config_space = getattr(transport, "config_space", None)
    msix_table = getattr(transport, "msix_table", None)
    kind = "none" if transport is None else ("pci" if config_space is not None else "mmio")
    dialect = device.policy.dialect
    return Destination(
        device.name, int(device.device_id), kind, tuple(q.max_size for q in device.queues), ints.vectors, device.device_features,
        bytes(device.config), device.memory, dialect.status, dialect.feature,
        bytes(config_space) if config_space is not None else None,
        bytes(getattr(transport, "wmask", b"")) if config_space is not None else None,
        _msix_control(config_space) if config_space is not None else None,
        len(msix_table) if msix_table is not None else None)


def _msix_control(config_space: bytes | bytearray) -> int | None:
    """Offset of the MSI-X Message Control word: the capability list walked from 0x34 (PCI 3.0 §6.7)."""
    pointer, seen = config_space[0x34] & ~3, set()
    while pointer and pointer not in seen and pointer + 4 <= len(config_space):
        if config_space[pointer] == PCI_CAP_ID_MSIX:
            return pointer + 2
        seen.add(pointer)
        pointer = config_space[pointer + 1] & ~3
    return None


def check_state(state: DeviceState, device: VirtioDevice, transport: object | None) -> None:
    """Everything a destination checks of a state before applying any of it: the state against
    the device (:meth:`Destination.check`), then the device's own :meth:`~VirtioDevice.check_import`."""
    destination_of(device, transport).check(state)
    device.check_import(state, transport)


def _touched(machine: MachineLike) -> list[str]:
    """Destination devices something was applied to (started, or a guest status set)."""
    return [name for name, slot in machine.slots.items() if slot.device.started or slot.device.shadow.guest_status]


def _check_complete(machine: MachineLike, states: dict[str, DeviceState]) -> None:
    if set(states) != set(machine.slots):
        raise MigrationError(f"stream carries state for {sorted(states)}, destination has {sorted(machine.slots)}")
    touched = _touched(machine)
    if touched:
        raise DeviceStateError(f"{touched[0]}: destination device was touched before the state arrived")


__all__ = [
    "DestinationRefused", "DestinationReport", "MachineLike", "MigrationHooks", "MigrationOptions",
    "MigrationReport", "PageSet", "RoundInfo", "StopTimeoutError", "applied", "blockers", "check_confirmation",
    "check_state", "destination_of", "memory_digest", "migrate_in", "migrate_out", "open_file_handles", "peer_pid",
]
