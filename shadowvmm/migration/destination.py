"""The destination side of a migration (:func:`migrate_in`) and the checks a device state
passes before any of it is applied (:func:`check_state`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ..device import VirtioDevice
from ..errors import (
    DeviceStateError,
    IncompatibleStateError,
    MigrationError,
    ShadowVmmError,
    StreamError,
)
from ..memory import PAGE_SIZE
from ..state.transport import StatefulTransport, TransportImage
from ..timeline import EventKind, Tap
from ..transport.pci import PCI_CAP_ID_MSIX
from .iommu import IommuTables, unmap_all
from .options import MODES, MachineLike, auto_busy_poll, busy_polling
from .pages import PageSet, memory_digest, memory_identity, memory_layout
from .report import DestinationReport, applied
from .state import Destination, DeviceState, shown
from .stream import Channel, PageBatch, Record, RecordType, StreamReader, StreamWriter

log = logging.getLogger(__name__)


async def migrate_in(machine: MachineLike, channel: Channel, *, digest: bool = False,
                     timeout: float | None = 60.0, busy_poll_us: int | None = None,
                     clock: Callable[[], float] = time.perf_counter,
                     timeline: Tap | None = None) -> DestinationReport:
    """Receive a migration into *machine*, whose devices are realized and never touched by a guest.

    Pages (copy model) are written into this machine's memory as they come
    (no guest runs on it yet). Each device record is decoded and checked
    against its device as it arrives (:func:`check_state`: one per device,
    no unknown or repeated one); after END the states are applied, and
    RESULT confirms them (:func:`~.report.applied`). Refusals raise (StreamError,
    IncompatibleStateError, MigrationError) and are reported to the source
    in RESULT; nothing was applied then, the pages written are zeroed again
    and the machine can take another attempt. *timeline* gets DEST_START once the states are
    applied (the devices named in ``devices``).
    """
    reader = StreamReader(channel)
    answer = StreamWriter(channel) if channel.duplex else None
    report = DestinationReport()
    devices = [slot.device for slot in machine.slots.values()]
    poll = auto_busy_poll(len(devices)) if busy_poll_us is None else busy_poll_us / 1e6
    with busy_polling(devices, poll):
        report = await _migrate_in(machine, channel, reader, answer, report, digest, timeout, clock, timeline)
    return report


async def _migrate_in(machine: MachineLike, channel: Channel, reader: StreamReader, answer: StreamWriter | None,
                      report: DestinationReport, digest: bool, timeout: float | None,
                      clock: Callable[[], float], timeline: Tap | None) -> DestinationReport:
    written = PageSet(machine.memory)
    try:
        async with asyncio.timeout(timeout):
            await reader.start()
            hello = (await reader.expect(RecordType.HELLO)).decode()
            report.mode = _check_hello(machine, hello)
            report.devices = list(machine.slots)
            log.info("incoming migration: %s model, device(s) %s", report.mode, report.devices)
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
            for slot in machine.slots.values():     # an owner looks at its admin ring once every
                if slot.device.admin is not None:   # member is in place (v1.4 §2.7.13: may be spurious)
                    slot.device.admin.poll()
            report.apply_ms = (clock() - t_apply) * 1e3
            if timeline is not None:
                timeline.record(EventKind.DEST_START, devices=",".join(states),
                                apply_ms=round(report.apply_ms, 3))
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
        await unmap_all(machine)
        if not _touched(machine):
            written.zero()
        if isinstance(exc, TimeoutError):
            raise StreamError(f"migration stream stalled for {timeout} s") from exc
        if error is not exc:
            raise error from exc
        raise
    log.info("incoming migration applied: %d pages, %d bytes of device state, applied in %.3f ms",
             report.pages_received, report.device_state_bytes, report.apply_ms)
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
    return str(mode)


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
    """Read to END: pages written as they come, the IOMMU tables programmed (:mod:`.iommu`), each
    device state decoded and checked as it comes."""
    memory = machine.memory
    states: dict[str, DeviceState] = {}
    mapped = False
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
        elif record.type is RecordType.IOMMU:
            if states or mapped:
                raise StreamError("IOMMU record after a device state, or sent twice")
            mapped = True
            await IommuTables.unpack(record).apply(machine)
        elif record.type is RecordType.ABORT:
            raise MigrationError(f"the source abandoned the migration: {record.decode().get('reason')}")
        elif record.type is RecordType.END:
            return states
        else:
            raise StreamError(f"unexpected {record.type.name} record")


def destination_of(device: VirtioDevice, transport: StatefulTransport | None) -> Destination:
    """*device* (behind *transport*) as the :class:`Destination` a state is checked against."""
    ints = device.interrupts
    assert ints is not None
    image = transport.save_state() if transport is not None else TransportImage("none")
    config_space, msix_table = image.pci_config_space, image.msix_table
    dialect = device.policy.dialect
    return Destination(
        device.name, int(device.device_id), image.kind, tuple(q.max_size for q in device.queues), ints.vectors,
        device.device_features, bytes(device.config), device.memory, dialect.status, dialect.feature,
        config_space, image.pci_writable if config_space is not None else None,
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


def check_state(state: DeviceState, device: VirtioDevice, transport: StatefulTransport | None) -> None:
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
